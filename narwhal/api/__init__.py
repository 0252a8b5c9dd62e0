"""The HTTP surface: the Bottle app and its routes, the OpenAPI document, and the
server process (cheroot beside the scheduler)."""
