"""narwhal: agentless CI. Pipelines as YAML, runners reached over SSH, steps in Docker."""

__version__ = "0.1.0"
