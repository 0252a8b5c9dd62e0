"""Configuration: YAML loading, settings, the inventory of runners, pipelines, and the
whole config directory (``loader``)."""
