"""The dispatcher: what the REST API asks of narwhal, in one place.

It validates a submission, records the jobs (committed before anyone is told),
and wakes the scheduler. It holds the current config, the store, the source
mirror and the scheduler; ``api.py`` only translates HTTP to these calls.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from narwhal import __version__
from narwhal.config.conditions import decide
from narwhal.config.forges import Forge
from narwhal.config.loader import Config
from narwhal.config.pipeline import Pipeline
from narwhal.config.repository import (
    RepositoryError,
    canonical_repo,
    glob_match,
    host_of,
    is_local,
    local_repository_problem,
    under_root,
)
from narwhal.config.settings import Settings
from narwhal.deadline import Stop
from narwhal.dispatch import outbox as outbox_mod
from narwhal.dispatch.artifacts import ArtifactElsewhere, ArtifactStore
from narwhal.dispatch.events import EventLog, RunnerWatch
from narwhal.dispatch.nodes import Node
from narwhal.dispatch.outbox import Outbox
from narwhal.dispatch.scheduler import Scheduler
from narwhal.dispatch.schedules import ScheduleLoop, utcnow
from narwhal.dispatch.store import Store, StoreUnavailable
from narwhal.errors import (
    BadRequest,
    Conflict,
    Gone,
    NarwhalError,
    NotFound,
    SourceError,
    Unauthorized,
    Unprocessable,
)
from narwhal.execution.clone import Workspaces
from narwhal.execution.source import Mirror, validate_commit
from narwhal.forge import webhook
from narwhal.job import Job, JobStatus, LogKind, Origin, is_ref_name
from narwhal.text import printable

MAX_REPO_LENGTH = 2048
log = logging.getLogger(__name__)


def validate_branch(branch: object) -> str | None:
    if branch is None:
        return None
    if not is_ref_name(branch):
        raise BadRequest(f"invalid branch {branch!r}: expected a git branch name "
                         "(letters, digits, . _ / + -; no leading '-', no '..')")
    return branch


class Dispatcher:
    """Config + store + mirror + scheduler, with the operations the API offers."""

    def __init__(self, config: Config, state_dir: str | Path,
                 schedule_clock: Callable[[], datetime] | None = None):
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.config = config
        # SQLite in the state directory, or the PostgreSQL database the store setting names.
        self.store = Store(config.settings.store or str(self.state_dir / "narwhal.db"),
                           password=config.store_password())
        self.mirror = Mirror(self.state_dir / "mirrors", timeout=config.settings.fetch_timeout,
                             credentials=lambda repo: self.config.git_credential(repo))
        self.fetches = Fetches(self.mirror, lambda: self.config.settings, self._fetched)
        self.workspaces = Workspaces(self.mirror, self.state_dir / "workspaces", lambda: self.config.settings)
        # Artifacts: in the state directory, or where settings.artifacts_dir says (the nodes of a
        # cluster share one, as they share the database).
        self.artifact_store = ArtifactStore(Path(config.settings.artifacts_dir or self.state_dir / "artifacts"),
                                            self.store, lambda: self.config.settings)
        # This dispatcher as a node of the store: its id and heartbeat (GET /health says whether it
        # holds the database). With settings.cluster, one of several on one PostgreSQL database:
        # the scheduler claims jobs and runner slots as this node, under its leases.
        cluster = config.settings.cluster
        self.node = Node(self.store, cluster=cluster, config=config.fingerprint())
        self.scheduler = Scheduler(config, self.store, self.mirror, self.artifact_store, workspaces=self.workspaces,
                                   node=self.node.id if cluster else None, lease=self.node.lease,
                                   takeover_interval=self.node.interval)
        # Commit statuses: the outbox looks again whenever the scheduler says a job changed.
        self.outbox = Outbox(self.store, lambda: self.config, shared=cluster)
        self.scheduler.listeners.append(self.outbox.wake)
        # GET /events: job events written by the store with each change, runner events by this watch.
        self.events = EventLog(self.store)
        self.runner_watch = RunnerWatch(self.events, self.scheduler.runners, self.wait_change, self.change_seen)
        self.started_at = time.time()
        try:  # before anything recovers or runs: one dispatcher per store, or the cluster's nodes together
            # (SQLite: the state dir's flock)
            self.node.hold()
        except BaseException:
            self.store.close()
            raise
        self._config_lock = threading.Lock()
        # Scheduled builds (pipelines' schedule:); tests give their own clock and call run_once.
        self.schedules = ScheduleLoop(self, schedule_clock or utcnow)

    def start(self) -> None:
        self.node.start(changed=self.scheduler.changed_elsewhere, held=self.scheduler.leased)
        self.scheduler.start()
        self.outbox.start()
        self.schedules.start()
        self.runner_watch.start()

    def stop_jobs(self, stop: Stop | float) -> None:
        """Take no more jobs; let running ones finish until ``stop.jobs``, then stop their steps at
        once and re-queue them (a number: a grace for the jobs, see ``Scheduler.stop``). The
        store stays open (``stop`` closes it)."""
        self.runner_watch.stop()
        self.schedules.stop()
        self.scheduler.stop(stop)
        self.node.stop()  # after the scheduler: its attempts' leases live until their last write

    def stop(self, stop: Stop | float = 0.0) -> None:
        self.runner_watch.stop()
        self.schedules.stop()
        self.scheduler.stop(stop)  # nothing left to do after stop_jobs
        self.node.stop()
        # After the scheduler: its last changes are in the outbox for next time.
        self.outbox.stop(stop.end.left() if isinstance(stop, Stop) else outbox_mod.STOP_WAIT)
        self.mirror.close()
        self.workspaces.close()
        self.store.close()

    # --- commits -----------------------------------------------------------------------

    def submit(self, repo: object, commit: object, branch: object = None,
               origin: Origin | None = None, changed: Sequence[str] | None = None,
               diff_base: str | None = None) -> list[tuple[Job, bool]]:
        """Queue one job per pipeline matching ``repo``/``branch``; idempotent per pipeline and origin key.

        ``origin`` says what started it (narwhal.job.Origin; the API's own submissions when
        None), set by narwhal, never by a caller's body: its event decides which secrets
        the jobs may have and which ``when`` conditions hold. ``changed`` lists the files
        the commit changed, when known (``when.paths``). A pipeline asking for a secret the
        job may not have gets its job in status error with the reason; one whose ``when``
        does not hold, a skipped job with the reason.
        """
        if not isinstance(repo, str) or len(repo) > MAX_REPO_LENGTH:
            raise BadRequest("repo: expected a string of at most 2048 characters")
        if not isinstance(commit, str):
            raise BadRequest("commit: expected a string")
        repo = canonical_repo(repo)  # RepositoryError: 400; from here on only the canonical form
        commit = _bad_request(validate_commit, commit)
        branch = validate_branch(branch)
        self.check_source(repo)
        pipelines = [p for p in self.config.pipelines if p.matches(repo, branch)]
        if not pipelines:
            on = f" on branch {branch!r}" if branch else " without a branch"
            raise Unprocessable(f"no pipeline matches repository {repo!r}{on}")
        for p in pipelines:
            if not self.scheduler.runners_for(p):
                raise Unprocessable(
                    f"pipeline {p.name!r} needs labels {sorted(p.labels)} and no runner has all of them"
                )
        if origin is None:
            forge = self.config.forge_for(repo)
            origin = Origin(forge=forge.name if forge is not None and forge.token is not None else None)
        submission = Submission(branch, origin, tuple(changed) if changed is not None else None, diff_base)
        if not self.mirror.present(repo, commit):
            self.fetches.wait(repo, commit, submission)  # SourceError (422), Busy (503) or Resolving
        return self._create(repo, commit, submission, pipelines)

    def _create(self, repo: str, commit: str, submission: Submission,
                pipelines: list[Pipeline]) -> list[tuple[Job, bool]]:
        config = self.config
        branch, origin = submission.branch, submission.origin
        refused = {p.name: why for p in pipelines
                   if (why := config.grant(p, repo, branch, origin.event).refused) is not None}
        changed = submission.changed
        if changed is None and submission.diff_base is not None and any(p.when and p.when.paths for p in pipelines):
            found = self.mirror.changed_files(repo, commit, submission.diff_base)
            changed = tuple(found) if found is not None else None
        skipped = {p.name: why for p in pipelines
                   if (why := decide(p.when, origin.event, changed)) is not None}
        # Steps with when.paths decide when the job runs: keep what the commit changed for them.
        kept = {p.name: changed for p in pipelines if changed is not None and p.steps_use_paths}
        created = self.store.create_jobs(repo, commit, branch, [p.name for p in pipelines], origin,
                                         refused, skipped, kept)
        for job, new in created:
            if new:
                log.info("job %s %s: %s for %s %s%s", job.id, job.status.value, job.pipeline, repo, commit[:10],
                         f" on {branch}" if branch else "")
        if any(new for _, new in created):
            self.scheduler.wake()
            self.scheduler.notify()  # the outbox, and event followers: job.queued
        return created

    def check_source(self, canonical: str) -> None:
        """Local repositories only under ``settings.local_roots``; remote ones only from ``fetch_hosts``."""
        config = self.config
        if is_local(canonical):
            if not under_root(canonical, config.settings.local_roots):
                raise BadRequest(f"repository {canonical!r} is a local path outside the allowed local roots "
                                 "(settings.local_roots in inventory.yaml)")
            problem = local_repository_problem(canonical, config.settings.local_roots)
            if problem is not None:
                raise BadRequest(f"repository {canonical!r} is refused: {problem}")
            return
        host = host_of(canonical) or ""
        if not any(glob_match(allowed, host) for allowed in config.fetch_hosts):
            raise BadRequest(f"repository {canonical!r}: the dispatcher does not fetch from host {host!r} "
                             "(settings.fetch_hosts in inventory.yaml, or a pipeline's repo pattern naming it)")

    def _fetched(self, repo: str, commit: str, submissions: list[Submission]) -> None:
        """A fetch that outlived its submission ended well: queue the jobs it was asked for."""
        for submission in submissions:
            pipelines = [p for p in self.config.pipelines if p.matches(repo, submission.branch)]
            if pipelines:
                self._create(repo, commit, submission, pipelines)

    # --- webhooks ------------------------------------------------------------------------

    def verify_hook(self, name: str, headers: Any, body: bytes) -> Forge:
        """The forge a delivery names, once its signature or token checks out (before any parsing)."""
        forge = self.config.forge(name)
        if forge is None:
            raise NotFound(f"no forge {name!r} (forges: in inventory.yaml)")
        secret = self.config.secrets.get(forge.webhook_secret)
        if secret is None or not webhook.verify(forge.kind, secret.value.encode("utf-8"), headers, body):
            raise Unauthorized(f"missing or wrong webhook signature for forge {name!r} "
                               f"({SIGNATURE_HEADERS[forge.kind]})")
        return forge

    def hook(self, forge: Forge, headers: Any, body: bytes) -> tuple[int, dict]:
        """A verified delivery: (HTTP status, answer). Jobs are committed before it returns."""
        hook = webhook.parse(forge.kind, headers, body)  # BadPayload: 400
        if isinstance(hook, webhook.Ping):
            return 200, {"ping": "ok", "forge": forge.name}
        if isinstance(hook, webhook.Ignored):
            return 200, {"ignored": hook.reason}
        if hook.delivery is not None:
            seen = self.store.delivery_answer(forge.name, hook.delivery)
            if seen is not None:
                return 200, {**seen, "redelivery": True}
        answer = self._hook_jobs(forge, hook)
        if hook.delivery is not None and answer.get("status") != "resolving":
            self.store.record_delivery(forge.name, hook.delivery, answer)
        return (202 if answer.get("status") == "resolving" else 200), answer

    def _hook_jobs(self, forge: Forge, hook: webhook.Trigger) -> dict:
        repo = hook.repo_url
        if not forge.serves(repo):
            # Its secret proves the forge (or anyone it was given to), which speaks for its own
            # repositories only: never a push to one on another host the dispatcher fetches from.
            return {"ignored": f"repository {repo} is not served by forge {forge.name!r} "
                               f"(its repositories are on {forge.web_host})"}
        if not any(p.matches(repo, hook.branch) for p in self.config.pipelines):
            on = f"branch {hook.branch}" if hook.branch else f"tag {hook.tag}" if hook.tag else "no branch"
            return {"ignored": f"no pipeline matches {repo} on {on}"}
        origin = Origin(event=hook.event, key=_origin_key(hook), ref=hook.ref, pr=hook.pr,
                        source_repo=hook.source_repo, author=hook.author, subject=hook.subject,
                        forge=forge.name if forge.token is not None else None)
        commit = {"repo": repo, "commit": hook.commit, "branch": hook.branch, "event": hook.event, "ref": hook.ref}
        try:
            created = self.submit(repo, hook.commit, hook.branch, origin, hook.changed,
                                  diff_base=hook.branch if hook.event == "pull_request" else None)
        except Resolving as exc:
            return {"commit": commit, "jobs": [], "status": "resolving", "detail": str(exc)}
        return {"commit": commit, "jobs": [{"id": j.id, "pipeline": j.pipeline, "status": j.status.value,
                                            "reason": j.reason, "created": new} for j, new in created]}
    def submit_head(self, repo: object, branch: object) -> tuple[str, list[tuple[Job, bool]]]:
        """Queue the head of branch (or tag) ``branch`` of ``repo``: the commit it names on the
        server now, then as ``submit``; returns that commit and the jobs.

        The lookup is a fetch in a fetch slot (Busy when none is free); one slower than
        ``fetch_wait`` is Resolving, and the jobs are queued when it ends.
        """
        if not isinstance(repo, str) or len(repo) > MAX_REPO_LENGTH:
            raise BadRequest("repo: expected a string of at most 2048 characters")
        repo = canonical_repo(repo)
        if branch is None:
            raise BadRequest("commit: required unless a branch (or tag) is given to build the head of")
        branch = validate_branch(branch)
        assert branch is not None
        self.check_source(repo)
        if not self.config.pipelines_for(repo, branch):
            raise Unprocessable(f"no pipeline matches repository {repo!r} on branch {branch!r}")
        forge = self.config.forge_for(repo)
        origin = Origin(forge=forge.name if forge is not None and forge.token is not None else None)
        commit = self.fetches.head(repo, branch, Submission(branch, origin))  # Busy, SourceError, Resolving
        return commit, self.submit(repo, commit, branch, origin)

    def submit_tick(self, pipeline: Pipeline, repo: str, tick: datetime,
                    stop: threading.Event | None = None) -> tuple[str, list[tuple[Job, bool]]]:
        """One tick of ``pipeline``'s schedule on ``repo``: a cron job of that pipeline alone on
        the head of the schedule's branch now. Its origin key names the tick, so an unchanged
        head gets a job each tick and a tick submitted again gets none.

        Waits for the head lookup up to the fetch timeout (or until ``stop`` is set), in a
        fetch slot like any fetch; NarwhalError when it cannot be done now.
        """
        assert pipeline.schedule is not None
        repo = canonical_repo(repo)
        branch = validate_branch(pipeline.schedule.branch)
        assert branch is not None
        self.check_source(repo)
        forge = self.config.forge_for(repo)
        origin = Origin(event="cron", key=f"cron:{tick.isoformat()}",
                        forge=forge.name if forge is not None and forge.token is not None else None)
        try:
            commit = self.fetches.head(repo, branch, wait=2 * self.config.settings.fetch_timeout + 60, stop=stop)
        except Resolving:
            raise SourceError(f"the head of {branch!r} in {repo} is still being fetched") from None
        return commit, self._create(repo, commit, Submission(branch, origin), [pipeline])

    def commits(self, repo: str | None, limit: int) -> list[dict]:
        return self.store.list_commits(repo=_as_filter(repo), limit=limit)

    # --- jobs ----------------------------------------------------------------------------

    def job(self, job_id: int) -> dict:
        job = self._job(job_id)
        data = job.to_dict()
        if job.is_queued:
            data["waiting"] = self.scheduler.waiting_reasons(job)
        return data

    def latest_jobs(self, repo: str | None, limit: int) -> list[dict]:
        """The newest job of each (repository, branch, pipeline): what is green and red now."""
        return [j.to_dict() for j in self.store.latest_jobs(repo=_as_filter(repo), limit=limit)]

    def jobs(self, status: str | None, repo: str | None, limit: int) -> list[dict]:
        if status is not None:
            try:
                JobStatus(status)
            except ValueError:
                allowed = ", ".join(s.value for s in JobStatus)
                raise BadRequest(f"status: expected one of {allowed}, got {status!r}") from None
        return [j.to_dict() for j in self.store.list_jobs(status=status, repo=_as_filter(repo), limit=limit)]

    def cancel(self, job_id: int) -> dict:
        self._job(job_id)
        job = self.store.cancel_job(job_id)
        if job.is_running:
            self.scheduler.cancel(job_id)
        self.scheduler.notify()  # wakes the outbox too
        return job.to_dict()

    def retry(self, job_id: int) -> dict:
        self._job(job_id)
        job = self.store.retry_job(job_id)  # Conflict unless final
        self.scheduler.wake()
        self.scheduler.notify()  # the outbox, and event followers: job.queued
        return job.to_dict()

    # --- logs (read-only: what the log endpoint streams) ---------------------------------

    def log(self, job_id: int, after: int = 0, limit: int = 5000) -> list[tuple[int, list[str], LogKind]]:
        """Up to ``limit`` log lines numbered above ``after``, as (first number, lines, kind) runs."""
        return self.store.read_log_blocks(job_id, after=after, limit=limit)

    def log_times(self, job_id: int, after: int = 0, limit: int = 5000) -> list[dict]:
        """When the lines above ``after`` were written: ``{"first", "lines", "at"}`` per run."""
        self._job(job_id)
        return [{"first": first, "lines": n, "at": at} for first, n, at in self.store.log_times(job_id, after, limit)]

    def change_seen(self) -> int:
        """A token for ``wait_change``: read it before looking, so no change is missed."""
        return self.scheduler.version

    def wait_change(self, seen: int, timeout: float) -> bool:
        """Block until something changed since ``seen`` (True) or ``timeout`` passes (False)."""
        return self.scheduler.wait_change(seen, timeout=timeout)

    # --- artifacts -------------------------------------------------------------------------

    def artifacts(self, job_id: int) -> list[dict]:
        """A job's artifacts: ``path size sha256 created_at expires_at expired``."""
        self._job(job_id)
        now = time.time()
        return [{**row, "expired": row["expires_at"] <= now} for row in self.store.artifacts(job_id)]

    def artifact(self, job_id: int, path: str) -> tuple[dict, Path]:
        """One artifact and its object's file, looked up by the job's manifest (never by joining
        ``path`` onto a directory). NotFound for a job or path it does not have; Gone once expired."""
        self._job(job_id)
        row = self.store.artifact(job_id, path) if len(path) <= 4096 else None
        if row is None:
            raise NotFound(f"job {job_id} has no artifact {printable(path, 200)!r}")
        if row["expires_at"] <= time.time():
            raise Gone(f"artifact {printable(path, 200)!r} of job {job_id} expired")
        file = self.artifact_store.path_of(row["sha256"])
        if not file.is_file():
            if self.config.settings.cluster:  # most likely kept by the node that ran the job, in its own directory
                raise ArtifactElsewhere(
                    f"artifact {printable(path, 200)!r} of job {job_id} is not in this node's artifacts_dir: "
                    "the node that collected it keeps it in its own; the nodes of a cluster need one shared "
                    "artifacts_dir (see docs/deploy.md, 'Several dispatchers on one PostgreSQL database')")
            raise Gone(f"artifact {printable(path, 200)!r} of job {job_id} is no longer stored (its object "
                       "is not in the artifacts directory)")
        return row, file

    def job_exists(self, job_id: int) -> bool:
        return self.store.get_job(job_id) is not None

    def job_end(self, job_id: int) -> dict | None:
        """None while the job may still write its log; else how it ended (a vanished job is 'unknown')."""
        job = self.store.get_job(job_id)
        if job is not None and not job.is_final:
            return None
        return {"status": job.status.value if job else "unknown", "reason": job.reason if job else None,
                "id": job_id}

    def _job(self, job_id: int) -> Job:
        job = self.store.get_job(job_id)
        if job is None:
            raise NotFound(f"no job {job_id}")
        return job

    # --- runners -------------------------------------------------------------------------

    def runners(self) -> list[dict]:
        return self.scheduler.runners()

    def add_runner(self, data: object) -> dict:
        from narwhal.config.inventory import validate_runner

        if not isinstance(data, dict):
            raise BadRequest("expected a JSON object describing a runner")
        config = self.config
        runner = validate_runner(data, source="api", defaults=config.inventory.defaults,
                                 settings=config.settings)
        if self.scheduler.runner(runner.name) is not None:
            raise Conflict(f"runner {runner.name!r} exists already")
        # What the caller said, not the result: a restart or reload applies the rules and the
        # inventory's defaults of that day, as it does to inventory runners.
        self.store.add_runner(data)
        return self.scheduler.add_runner(runner)

    def remove_runner(self, name: str) -> None:
        slot = self._slot(name)
        if slot["source"] != "api":
            raise Conflict(f"runner {name!r} comes from inventory.yaml; remove it there (the dispatcher reloads by itself when the file changes)")
        self.store.remove_runner(name)
        self.scheduler.remove_runner(name)

    def drain(self, name: str, draining: bool) -> dict:
        self._slot(name)
        return self.scheduler.set_draining(name, draining)

    def _slot(self, name: str) -> dict:
        slot = self.scheduler.runner(name)
        if slot is None:
            raise NotFound(f"no runner {name!r}")
        return slot

    # --- the rest ------------------------------------------------------------------------

    def stats(self) -> dict:
        data = self.store.stats()
        known = {r["name"]: r for r in data["runners"]}
        for slot in self.scheduler.runners():
            entry = known.setdefault(slot["name"], {
                "name": slot["name"], "jobs": 0, "passed": 0, "failed": 0, "pct_passed": None,
                "busy_seconds": 0.0, "utilisation": None, "running": 0,
            })
            entry["capacity"] = slot["capacity"]
            entry["health"] = slot["health"]["state"]
        data["runners"] = sorted(known.values(), key=lambda r: r["name"])
        return data

    def secrets(self) -> list[dict]:
        return self.config.secrets_overview()

    def forges(self) -> list[dict]:
        """Each forge with its commit statuses: pending, delivered, failed, the last error and
        delivery. A forge gone from the config that the outbox still names is listed too, with
        no kind or url. Never a token or a secret's name."""
        summary = self.store.outbox_summary()
        none = {"pending": 0, "delivered": 0, "failed": 0, "last_delivered_at": None,
                "last_error": None, "last_error_at": None}
        out = [{"name": f.name, "kind": f.kind, "url": f.url, "sends_statuses": f.token is not None,
                **summary.pop(f.name, none)} for f in self.config.forges]
        out += [{"name": name, "kind": None, "url": None, "sends_statuses": False, **counts}
                for name, counts in sorted(summary.items())]
        return out

    def nodes(self) -> dict:
        """``GET /nodes``: every dispatcher on this store, alive or recently gone."""
        return {"self": self.node.id, "nodes": self.store.nodes(stale_after=self.node.lease)}

    def health(self) -> dict:
        """``GET /health``; ``status`` is ``store unavailable`` (with the ``reason``) when the store
        does not answer, which the route answers 503."""
        try:
            queue: int | None = self.store.queue_length()
            status, reason = "ok", None
        except StoreUnavailable as exc:
            queue, status, reason = None, "store unavailable", str(exc)
        return {
            "status": status,
            **({"reason": reason} if reason else {}),
            "version": __version__,
            "uptime": round(time.time() - self.started_at, 3),
            "queue": queue,
            "runners": len(self.scheduler.runners()),
            "owner": self.store.owner_id,  # the narwhal.owner label on everything it creates
            "node": self.node.health(),  # which dispatcher answers, and whether it holds the database
        }

    def reload(self, config: Config) -> None:
        old = self.config.settings
        if (config.settings.store, config.settings.store_password) != (old.store, old.store_password):
            log.warning("settings.store and store_password are read at start: the store stays %s until a restart",
                        self.store.path)
        elif config.store_password() != self.config.store_password():  # the secret's value was rotated
            self.store.backend.set_password(config.store_password())
            log.info("store password changed: connections opened from now on use the new one")
        if config.settings.artifacts_dir != old.artifacts_dir:
            log.warning("settings.artifacts_dir is read at start: artifacts stay in %s until a restart",
                        self.artifact_store.root)
        if config.settings.cluster != old.cluster:
            log.warning("settings.cluster is read at start: this dispatcher stays %s until a restart",
                        "a node of a cluster" if old.cluster else "the one dispatcher on its store")
        with self._config_lock:
            self.config = config
            self.mirror.timeout = config.settings.fetch_timeout
            self.scheduler.reload(config)
        if config.fingerprint() != self.node.config:
            try:
                self.node.set_config(config.fingerprint())
            except NarwhalError as exc:  # the database is away: the next start records it
                log.warning("node %s: could not record the reloaded config: %s", self.node.id[-8:], exc)
        self.schedules.wake()


# What a forge signs a delivery with, named in a 401 (so a misconfigured hook says what is missing).
SIGNATURE_HEADERS = {"github": "X-Hub-Signature-256", "gitea": "X-Gitea-Signature",
                     "forgejo": "X-Forgejo-Signature or X-Gitea-Signature", "gitlab": "X-Gitlab-Token"}


def _origin_key(hook: webhook.Trigger) -> str:
    """Jobs of one commit apart by what started them: the push, each tag, each pull request."""
    if hook.event == "tag":
        return f"tag:{hook.tag}"
    if hook.event == "pull_request":
        return f"pr:{hook.pr}"
    return hook.event


def _as_filter(repo: str | None) -> str | None:
    """A ``?repo=`` filter in any spelling finds the canonical one; a bad spelling finds nothing."""
    if repo is None:
        return None
    try:
        return canonical_repo(repo)
    except RepositoryError:
        return repo


@dataclass(frozen=True)
class Submission:
    """One submission of a commit, as much as its jobs need: a late fetch queues them from it."""

    branch: str | None
    origin: Origin
    changed: tuple[str, ...] | None = None
    # A pull request's target branch: the files it changes are read from the mirror
    # (from the merge base) when ``changed`` is unknown and a pipeline filters on paths.
    diff_base: str | None = None


class Busy(NarwhalError):
    """Every fetch slot is taken: the client should try again shortly."""

    http_status = 503


class Resolving(Exception):  # noqa: N818 - an outcome, not a failure: POST /commit answers 202
    """The commit is being fetched; its jobs are queued when the fetch ends well."""

    def __init__(self, repo: str, message: str):
        super().__init__(message)
        self.repo = repo  # the canonical form


class Fetches:
    """Clones and fetches for submissions and head lookups (a branch's commit now, for a
    submission without a commit or a schedule's tick), each on its own thread, at most ``max_fetches``
    at once and ``max_fetches_per_host`` from one server (one more is a 503 at once, never
    a queue). A submission waits ``fetch_wait`` for its fetch (at most
    ``MAX_WAITING_THREADS`` request threads wait at once); a slower one is answered
    'resolving' and the fetch queues the jobs when it ends. A failure that nobody waited for is told to the next submission of the
    same commit (then forgotten, so that one fetches again)."""

    HEAD = "head:"  # (repo, "head:NAME") keys a head lookup; a commit id has no ':'
    MAX_WAITING = 100  # submissions (branches) waiting on one fetch
    MAX_WAITING_THREADS = 56  # request threads waiting up to fetch_wait (cheroot has 64: /health keeps 8)
    MAX_FAILURES = 1000

    def __init__(self, mirror: Mirror, settings: Callable[[], Settings],
                 fetched: Callable[[str, str, list[Submission]], None]):
        self.mirror = mirror
        self.settings = settings
        self.fetched = fetched  # (repo, commit, submissions) after a late success
        self._lock = threading.Lock()
        # (repo, commit or HEAD + name) -> (done, submissions, errors, the commit once found)
        self._running: dict[tuple[str, str], tuple[threading.Event, list[Submission], list[str], list[str]]] = {}
        self._waiting = 0  # request threads waiting on a fetch
        self._failed: dict[tuple[str, str], str] = {}

    def running(self) -> int:
        return len(self._running)

    def wait(self, repo: str, commit: str, submission: Submission | None = None) -> None:
        """Return once ``commit`` is in the mirror; else raise SourceError, Busy or Resolving."""
        self._join((repo, commit), submission, self.settings().fetch_wait)

    def head(self, repo: str, name: str, submission: Submission | None = None, wait: float | None = None,
             stop: threading.Event | None = None) -> str:
        """The commit branch or tag ``name`` names on the server now (``Mirror.head``: a fetch).

        A head lookup is a fetch like any other: it takes a slot (Busy when none is free),
        runs on its own thread, and lookups of one name share one fetch. The caller waits
        ``wait`` seconds (``fetch_wait`` by default), or until ``stop`` is set; slower, it
        is Resolving and ``submission``, if given, is queued when the commit is known.
        """
        wait = self.settings().fetch_wait if wait is None else wait
        return self._join((repo, self.HEAD + name), submission, wait, stop)

    def _join(self, key: tuple[str, str], submission: Submission | None, wait: float,
              stop: threading.Event | None = None) -> str:
        """Start the fetch for ``key`` or join the one running; the commit once it is in the mirror."""
        repo, target = key
        with self._lock:
            failure = self._failed.pop(key, None)
            if failure is not None:
                raise SourceError(failure)
            entry = self._running.get(key)
            if entry is not None:
                done, branches, errors, found = entry
                if len(branches) >= self.MAX_WAITING:
                    raise Busy(f"{len(branches)} submissions wait for {repo} already; try again later")
            else:
                settings = self.settings()
                host = host_of(repo) or ""
                same_host = sum(1 for r, _ in self._running if (host_of(r) or "") == host)
                if same_host >= settings.max_fetches_per_host:
                    raise Busy(f"{same_host} fetches from {host or 'local paths'} are running already "
                               f"(max_fetches_per_host); try again later")
                if len(self._running) >= settings.max_fetches:
                    raise Busy(f"{len(self._running)} repository fetches are running already "
                               f"(max_fetches); try again later")
                done, branches, errors, found = threading.Event(), [], [], []
                self._running[key] = (done, branches, errors, found)
                threading.Thread(target=self._fetch, args=(key,), name="narwhal-fetch", daemon=True).start()
            waiting = self._waiting < self.MAX_WAITING_THREADS
            self._waiting += waiting
        try:
            finished = waiting and _wait_for(done, wait, stop)
        finally:
            with self._lock:
                self._waiting -= waiting
                late = key in self._running
                if late and submission is not None and submission not in branches:
                    branches.append(submission)  # the fetch queues its jobs when it ends
        if late and not finished:
            what = f"the head of {target[len(self.HEAD):]!r} is known" if target.startswith(self.HEAD) \
                else f"{target} is there"
            raise Resolving(repo, f"fetching {repo}; the jobs are queued when {what}")
        if errors:
            raise SourceError(errors[0])
        return found[0] if found else target

    def _fetch(self, key: tuple[str, str]) -> None:
        error = None
        repo, commit = key
        try:
            if commit.startswith(self.HEAD):
                commit = self.mirror.head(repo, commit[len(self.HEAD):])
            else:
                self.mirror.resolve(repo, commit)
        except SourceError as exc:
            error = str(exc)
        except Exception as exc:  # noqa: BLE001 - told to the submitter, never lost on a thread
            log.exception("fetching %s failed", key[0])
            error = f"cannot fetch {key[0]}: {exc}"
        with self._lock:
            done, branches, errors, found = self._running.pop(key)
            late = bool(branches)  # submissions answered 'resolving' wait for these jobs
            if error is None:
                found.append(commit)
            else:
                errors.append(error)
                if late:
                    self._failed[key] = error
                    while len(self._failed) > self.MAX_FAILURES:
                        self._failed.pop(next(iter(self._failed)))
            done.set()
        if error is not None:
            if late:
                log.warning("submission of %s %s: %s", key[0], key[1], error)
            return
        if late:
            try:
                self.fetched(repo, commit, branches)
            except Exception:  # noqa: BLE001 - a thread has nobody else to tell
                log.exception("queueing the jobs for %s %s failed", *key)


def _wait_for(done: threading.Event, timeout: float, stop: threading.Event | None) -> bool:
    """``done.wait(timeout)``, cut short when ``stop`` is set (a schedule loop that is stopping)."""
    if stop is None:
        return done.wait(timeout)
    deadline = time.monotonic() + timeout
    while not done.is_set() and not stop.is_set() and (left := deadline - time.monotonic()) > 0:
        done.wait(min(left, 0.25))
    return done.is_set()


def _bad_request(validate: Callable[[str], str], value: str) -> str:
    """Format errors in a submission are the client's fault: 400, not 422."""
    try:
        return validate(value)
    except Unprocessable as exc:
        raise BadRequest(str(exc)) from None
