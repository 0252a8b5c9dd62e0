"""Asking runners what ``narwhal check`` wants to know: which images they hold.

Each runner is reached as the dispatcher would reach it (``make_transport``: SSH with its
key and known_hosts, or this machine), asked ``docker image inspect`` for each image, and
let go. A runner that cannot be reached says why instead; nothing here raises.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, replace

from narwhal.config.inventory import Runner
from narwhal.config.settings import Settings
from narwhal.errors import NarwhalError
from narwhal.execution import docker
from narwhal.execution.transport import make_transport

PROBE_TIMEOUT = 30.0  # seconds for one runner, connection included (check --runners)
QUICK_TIMEOUT = 5.0  # the same for plain check: runners that answer by then are asked, the rest noted


@dataclass
class Images:
    """What one runner said: the images it has and lacks, or why it could not be asked."""

    runner: str
    present: set[str] = field(default_factory=set)
    missing: set[str] = field(default_factory=set)
    unreachable: str | None = None


async def _probe(runner: Runner, images: list[str], settings: Settings, timeout: float) -> Images:
    answer = Images(runner.name)
    transport = make_transport(runner, settings)
    try:
        async def ask(image: str) -> None:
            result = await transport.run([docker.DOCKER, "image", "inspect", "--format", "{{.Id}}", "--", image],
                                         timeout=timeout)
            (answer.present if result.ok else answer.missing).add(image)

        async def ask_all() -> None:
            engine = await transport.run([docker.DOCKER, "version", "--format", "{{.Server.Version}}"],
                                         timeout=timeout)
            if not engine.ok:
                answer.unreachable = "docker does not answer: " + (engine.output.strip().splitlines() or ["?"])[-1]
                return
            await asyncio.gather(*(ask(image) for image in images))

        await asyncio.wait_for(ask_all(), timeout)
    except TimeoutError:
        answer.unreachable = f"no answer within {timeout:g}s"
    except NarwhalError as exc:
        answer.unreachable = str(exc)
    except OSError as exc:
        answer.unreachable = exc.strerror or type(exc).__name__
    finally:
        try:
            await asyncio.wait_for(transport.close(), timeout)
        except Exception:  # noqa: BLE001 - letting go of a runner that may be gone
            pass
    return answer


def probe_images(wanted: dict[str, list[str]], runners: list[Runner], settings: Settings,
                 timeout: float = PROBE_TIMEOUT) -> list[Images]:
    """Ask every runner in ``wanted`` (runner name -> images) at once whether Docker answers and
    which of the images it has, each within ``timeout`` seconds; one answer per runner."""
    by_name = {r.name: r for r in runners}
    settings = replace(settings, connect_timeout=min(settings.connect_timeout, timeout))

    async def every() -> list[Images]:
        return list(await asyncio.gather(*(_probe(by_name[name], images, settings, timeout)
                                           for name, images in wanted.items())))

    return asyncio.run(every())
