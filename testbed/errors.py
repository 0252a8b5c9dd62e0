"""What the test environment raises when the machine cannot provide something."""

from __future__ import annotations

from narwhal.cli.engine import EngineUnavailable


class TestbedUnavailable(EngineUnavailable):
    """The machine lacks something the test environment needs and it cannot be set up here."""

    __test__ = False  # not a pytest test class despite the name


class PortInUse(TestbedUnavailable):
    """Another process already listens on the address and port asked for an sshd host."""
