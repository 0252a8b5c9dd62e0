"""``python -m bench --only cache``: a step that installs a wheel from a local index, cold and warm.

The real thing, not a stand-in: ``pip install`` (Debian's pip 23 on Debian's Python 3.11,
copied from this host into an image made with ``docker import``, cached by tag) from a
PEP 503 index that a service of the job serves on the job's network. The step keeps pip's
cache in the workspace (``--cache-dir .cache/pip``), and the pipeline caches that directory
under a key that hashes ``round.txt``:

* cold: a commit that changes ``round.txt`` (a new key): restore misses, pip downloads the
  wheel, the job saves the cache;
* warm: the next commit changes only ``README.md`` (the same key): the cache is restored,
  pip finds the wheel in its cache (the index answers 304 Not Modified), and nothing is saved.

Cold and warm jobs alternate. Two indexes: one at loopback speed (the least a cache can
save), and one that sends at ``RATE`` bytes/s, as a real index over a real link would.
Figures: the step's own time (from the job's steps), the whole job's (started -> finished),
and narwhal's restore and save times (its log notes), medians side by side with ratios.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import testbed
from bench.env import Environment, make_repo

PYTHON = "/usr/bin/python3.11"
WHEEL_MB = 20
RATE = 10 * 1000 * 1000  # bytes/s of the "remote" index: a good link to a public index
INDEX_SCRIPT = r'''
import http.server, io, os, random, socketserver, time, zipfile
name, version = "demo_pkg", "1.0"
wheel = f"{name}-{version}-py3-none-any.whl"
rng = random.Random(13)
buf = io.BytesIO()
with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
    files = {f"{name}/__init__.py": b"VERSION = '1.0'\n",
             f"{name}/blob.bin": rng.randbytes(int(os.environ["WHEEL_MB"]) * 1024 * 1024),
             f"{name}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: demo-pkg\nVersion: {version}\n".encode(),
             f"{name}-{version}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: bench\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{p},,\n" for p in files) + f"{name}-{version}.dist-info/RECORD,,\n"
    files[f"{name}-{version}.dist-info/RECORD"] = record.encode()
    for path, data in files.items():
        info = zipfile.ZipInfo(path, date_time=(2020, 1, 1, 0, 0, 0))
        z.writestr(info, data)
os.makedirs("/srv/simple/demo-pkg", exist_ok=True)
os.makedirs("/srv/files", exist_ok=True)
open(f"/srv/files/{wheel}", "wb").write(buf.getvalue())
open("/srv/simple/demo-pkg/index.html", "w").write(f'<a href="../../files/{wheel}">{wheel}</a>\n')
for root, dirs, names in os.walk("/srv"):
    for n in dirs + names:
        os.utime(os.path.join(root, n), (1577836800, 1577836800))  # a stable Last-Modified
rate = int(os.environ["RATE"])
class Handler(http.server.SimpleHTTPRequestHandler):
    def copyfile(self, source, out):
        if not rate:
            return super().copyfile(source, out)
        began, sent = time.monotonic(), 0
        while chunk := source.read(65536):
            out.write(chunk)
            sent += len(chunk)
            ahead = sent / rate - (time.monotonic() - began)
            if ahead > 0:
                time.sleep(ahead)
    def end_headers(self):
        # What PyPI says of a file: the same URL never changes (so pip keeps it in its cache).
        if self.path.startswith("/files/"):
            self.send_header("Cache-Control", "max-age=365000000, immutable, public")
        super().end_headers()
    def log_message(self, *args):
        pass
os.chdir("/srv")
socketserver.ThreadingTCPServer.allow_reuse_address = True
http.server.ThreadingHTTPServer(("", 8000), Handler).serve_forever()
'''
INSTALL = ("python3 -m pip install --disable-pip-version-check --no-input --no-deps --cache-dir .cache/pip "
           "--index-url http://index:8000/simple/ --trusted-host index --target /tmp/site demo-pkg && ls -la .cache/pip | head -3")


def _libs(paths: list[str]) -> set[str]:
    """Every shared library ``paths`` load (ldd), with the loader."""
    out: set[str] = set()
    for path in paths:
        done = subprocess.run(["ldd", path], capture_output=True, text=True)
        for line in done.stdout.splitlines():
            found = re.search(r"(/\S+)", line.split("=>")[-1])
            if found and os.path.exists(found.group(1)):
                out.add(found.group(1))
    return out


def python_image() -> str:
    """An image of this host's Debian Python 3.11 and pip, with busybox for the shell; made
    once with ``docker import`` and found again by its tag (a hash of what went in)."""
    if not os.path.exists(PYTHON) or not os.path.isdir("/usr/lib/python3/dist-packages/pip"):
        raise testbed.TestbedUnavailable(f"the cache bench needs {PYTHON} and Debian's python3-pip on this host")
    stamp = hashlib.sha256(f"{os.stat(PYTHON).st_mtime}{os.stat('/usr/lib/python3/dist-packages/pip').st_mtime}"
                           .encode()).hexdigest()[:12]
    tag = f"narwhal-bench/python:3.11-{stamp}"
    if subprocess.run(["docker", "image", "inspect", tag], capture_output=True).returncode == 0:
        return tag
    base = testbed.ensure_image()
    root = Path(tempfile.mkdtemp(prefix="narwhal-pyimage-"))
    try:
        exported = subprocess.run(["docker", "create", base, "true"], capture_output=True, text=True, check=True)
        cid = exported.stdout.strip()
        try:
            tar = subprocess.run(["docker", "export", cid], capture_output=True, check=True).stdout
        finally:
            subprocess.run(["docker", "rm", cid], capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(root)], input=tar, check=True)
        dynload = [str(p) for p in Path("/usr/lib/python3.11/lib-dynload").glob("*.so")]
        for path in [PYTHON, *sorted(_libs([PYTHON, *dynload]))]:
            dest = root / path.lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest)
        shutil.copytree("/usr/lib/python3.11", root / "usr/lib/python3.11", symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__", "test", "idlelib", "tkinter"))
        for name in ("pip", "pip-23.0.1.dist-info"):
            src = Path("/usr/lib/python3/dist-packages") / name
            if src.exists():
                shutil.copytree(src, root / "usr/lib/python3/dist-packages" / name, symlinks=True,
                                ignore=shutil.ignore_patterns("__pycache__"))
        for link in ("usr/bin/python3", "bin/python3"):
            target = root / link
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists() or target.is_symlink():
                target.unlink()
            target.symlink_to("/usr/bin/python3.11")
        packed = subprocess.run(["tar", "-C", str(root), "-c", "."], capture_output=True, check=True).stdout
        subprocess.run(["docker", "import", "-", tag], input=packed, capture_output=True, check=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return tag


def pipeline(repo: str, image: str, rate: int) -> dict:
    return {"repo": [repo], "image": image,
            "services": [{"name": "index", "image": image, "env": {"RATE": str(rate), "WHEEL_MB": str(WHEEL_MB)},
                          "command": ["python3", "-c", INDEX_SCRIPT],
                          "ready": {"port": 8000, "timeout": "60s"}}],
            "cache": [{"key": "pip-{{ hash 'round.txt' }}", "paths": [".cache/pip"]}],
            "steps": [{"name": "install", "run": INSTALL}]}


def _seconds(what: str, log: str) -> float | None:
    found = re.search(rf"cache pip-[0-9a-f]+: {what} \([^)]* in ([0-9.]+)s\)", log)
    return float(found.group(1)) if found else None


def _commit(repo: str, files: dict[str, str]) -> str:
    return testbed.add_commit(repo, files)


def scenario(env: Environment, rounds: int, narwhal_src: str | None, log: Callable[[str], None]) -> dict:
    image = python_image()
    log(f"cache: image {image}; {rounds} cold and {rounds} warm jobs per index, alternating")
    out: dict = {"image": image, "wheel_mb": WHEEL_MB, "rounds": rounds, "indexes": {}}
    for label, rate in (("loopback", 0), (f"{RATE / 1e6:.0f} MB/s", RATE)):
        repo = str(env.workdir / f"repo-cache-{rate}")
        make_repo(repo, 0)
        d = env.dispatcher(f"cache{rate}", {"pip": pipeline(repo, image, rate)}, {}, capacity=1,
                           narwhal_src=narwhal_src)
        d.wait_runners_healthy()
        samples: dict[str, dict[str, list[float]]] = {k: {"step": [], "job": [], "cache": []}
                                                      for k in ("cold", "warm")}
        for i in range(rounds + 1):  # round 0 warms the engine and the image up and is not counted
            for kind, files in (("cold", {"round.txt": f"{label} {i} {time.time()}\n"}),
                                ("warm", {"README.md": f"# warm {label} {i}\n"})):
                commit = _commit(repo, files)
                job_id = d.submit(repo, commit)
                d.follow_to_end(job_id)
                job = d.get(f"/jobs/{job_id}")
                text = d.session.get(f"{d.url}/jobs/{job_id}/log", timeout=60).text
                assert job["status"] == "passed", text
                expect = "saved" if kind == "cold" else "restored"
                assert re.search(rf"cache pip-[0-9a-f]+: {expect} ", text), text
                if i == 0:
                    continue
                [step] = job["steps"]
                samples[kind]["step"].append(step["duration"])
                samples[kind]["job"].append(job["finished_at"] - job["started_at"])
                took = _seconds(expect, text)
                if took is not None:
                    samples[kind]["cache"].append(took)
        d.stop()
        medians = {kind: {k: statistics.median(v) if v else None for k, v in s.items()}
                   for kind, s in samples.items()}
        out["indexes"][label] = {"samples": samples, "median": medians,
                                 "step_ratio": medians["warm"]["step"] / medians["cold"]["step"],
                                 "job_ratio": medians["warm"]["job"] / medians["cold"]["job"]}
        log(f"cache [{label}]: step {medians['cold']['step']:.2f} s cold, {medians['warm']['step']:.2f} s warm; "
            f"job {medians['cold']['job']:.2f} s / {medians['warm']['job']:.2f} s")
    return out


def rows(s: dict) -> list[tuple[str, str]]:
    """(what, value) rows for the bench table."""
    out = []
    for label, r in s["indexes"].items():
        m = r["median"]
        out.append((f"cache, pip install of a {s['wheel_mb']} MiB wheel, index at {label}: step cold / warm (median)",
                    f"{m['cold']['step']:.2f} / {m['warm']['step']:.2f} s = {r['step_ratio']:.2f}x"))
        out.append(("cache, same: whole job cold (with save) / warm (with restore)",
                    f"{m['cold']['job']:.2f} / {m['warm']['job']:.2f} s = {r['job_ratio']:.2f}x"))
        out.append(("cache, same: save (cold) / restore (warm), narwhal's helper containers",
                    f"{m['cold']['cache']:.2f} / {m['warm']['cache']:.2f} s"))
    return out
