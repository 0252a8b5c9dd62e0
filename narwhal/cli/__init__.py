"""The ``narwhal`` command line: argument parsing, the HTTP client, rendering, the demo."""
