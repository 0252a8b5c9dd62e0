"""Execution on a runner: transports (local, SSH), Docker command lines, the source
mirror, running one job, and health checks."""
