"""``narwhal artifacts``: list a job's artifacts, or fetch one or all of them into a directory."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import quote

from narwhal.cli import report
from narwhal.cli.client import Client
from narwhal.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    UsageError,
    add_client_options,
    add_command,
    is_plain,
    job_id,
    make_client,
    make_console,
    print_json,
)
from narwhal.execution.artifacts import member_path
from narwhal.text import printable

EPILOG = """\
examples:
  narwhal artifacts 42                       # what job 42 kept: path, size, sha256, expiry
  narwhal artifacts 42 -o out/               # fetch them all into out/ (paths kept)
  narwhal artifacts 42 dist/app.whl -o out/  # one of them, into out/dist/app.whl
  narwhal artifacts 42 report.xml -o -       # one of them to stdout
Each file is checked against its sha256 before it takes its name; a name from the
dispatcher that would land outside the directory (absolute, '..', through a link) is
refused.
"""


def register(commands: Any) -> None:
    p = add_command(commands, "artifacts", "list a job's artifacts, or fetch them", cmd_artifacts, epilog=EPILOG)
    p.add_argument("id", metavar="JOB", type=job_id)
    p.add_argument("path", metavar="PATH", nargs="?", default=None, help="one artifact, by its listed path")
    p.add_argument("-o", "--output", metavar="DIR", default=None,
                   help="fetch into DIR (made if missing); '-' writes the one PATH to stdout")
    add_client_options(p)


def cmd_artifacts(args: argparse.Namespace) -> int:
    client = make_client(args)
    listing = client.get(f"/jobs/{args.id}/artifacts")
    files = [a for a in listing.get("artifacts", []) if isinstance(a, dict)]
    if args.path is None and args.output is None:
        if args.json:
            print_json(listing)
        else:
            console = make_console()
            console.print(report.artifacts_table(args.id, files, plain=is_plain(console)))
        return EXIT_OK
    if args.output == "-":
        if args.path is None:
            raise UsageError("artifacts: -o - writes one artifact: name its PATH")
        wanted = _find(files, args.path, args.id)
        try:
            _fetch(client, args.id, wanted, sys.stdout.buffer)
        except FetchRefused as exc:
            print(f"narwhal: {exc}", file=sys.stderr)
            return EXIT_FAILED
        sys.stdout.flush()
        return EXIT_OK
    target = Path(args.output or ".")
    chosen = [_find(files, args.path, args.id)] if args.path is not None else files
    saved, problems = [], []
    for artifact in chosen:
        try:
            saved.append(save(client, args.id, artifact, target))
        except FetchRefused as exc:
            problems.append(str(exc))
    if args.json:
        print_json({"job_id": args.id, "saved": [str(p) for p in saved], "refused": problems})
    else:
        for path in saved:
            print(f"saved {printable(str(path), 500)}")
        for problem in problems:
            print(f"narwhal: {problem}", file=sys.stderr)
    return EXIT_FAILED if problems else EXIT_OK


class FetchRefused(Exception):  # noqa: N818 - one artifact not saved; the others go on
    pass


def _find(files: list[dict], path: str, job: int) -> dict:
    for artifact in files:
        if artifact.get("path") == path:
            return artifact
    raise UsageError(f"job {job} has no artifact {printable(path, 200)!r} (narwhal artifacts {job} lists them)")


def destination(root: Path, name: object) -> Path:
    """Where an artifact the dispatcher named ``name`` goes under ``root``; FetchRefused when it
    would land anywhere else (absolute, ``..``, control characters, through a symbolic link)."""
    rel = member_path(name) if isinstance(name, str) else None
    if rel is None or rel != name:
        raise FetchRefused(f"refused the artifact name {printable(str(name), 200)!r}: not a plain path inside "
                           f"{root}")
    base = root.resolve()
    dest = base.joinpath(*rel.split("/"))
    parent = dest.parent
    parent.mkdir(parents=True, exist_ok=True)
    if not parent.resolve().is_relative_to(base) or dest.is_symlink():
        raise FetchRefused(f"refused the artifact name {printable(rel, 200)!r}: it would be written through a "
                           f"link out of {root}")
    return dest


def save(client: Client, job: int, artifact: dict, root: Path) -> Path:
    """Fetch one artifact under ``root``: into a temp file, checked by sha256, then renamed."""
    dest = destination(root, artifact.get("path"))
    if artifact.get("url") is None:
        raise FetchRefused(f"{printable(str(artifact.get('path')), 200)}: expired")
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".narwhal-")
    try:
        with os.fdopen(fd, "wb") as out:
            _fetch(client, job, artifact, out)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return dest


def _fetch(client: Client, job: int, artifact: dict, out: Any) -> None:
    """Stream one artifact into ``out``, checking its size and sha256 as it comes."""
    path = str(artifact.get("path"))
    digest = hashlib.sha256()
    size = 0
    for chunk in client.download(f"/jobs/{job}/artifacts/{quote(path, safe='/')}"):
        digest.update(chunk)
        size += len(chunk)
        out.write(chunk)
    if digest.hexdigest() != artifact.get("sha256") or size != artifact.get("size"):
        raise FetchRefused(f"{printable(path, 200)}: what came is not what the dispatcher listed "
                           f"({size} bytes, sha256 {digest.hexdigest()[:12]}...)")
