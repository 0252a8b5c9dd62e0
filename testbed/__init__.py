"""The real test environment: a Docker engine, a tiny test image and sshd runner hosts.

Every end-to-end test and the benchmark stand on this package (the demo's own engine
set-up, which it reuses, is ``narwhal.cli.engine``), and CI
starts from a fresh Debian 12 clone, so each ``ensure_*`` function installs (apt-get)
and starts what is missing, is idempotent, and takes a lock file in /tmp so that several
processes on one machine do not collide. When something is missing and cannot be
installed here (not root, not Debian), ``TestbedUnavailable`` says exactly what.

Modules by noun: ``errors`` (what is unavailable), ``system`` (the runner user, process
trees), ``sshhost`` (sshd runner hosts and their keys), ``netns`` (hosts behind a veth
cable), ``forge`` (a stand-in GitHub/Gitea/GitLab that takes commit statuses), ``githttp`` (bare
repositories over dumb HTTP), ``images`` (test images beyond busybox: ``ensure_git_image``), ``browser`` (headless Chromium driven by Selenium), ``postgres`` (a throwaway PostgreSQL cluster), ``haproxy`` (Debian's HAProxy running the shipped example, deploy/haproxy.cfg). Everything
tests and the benchmark use is importable from ``testbed`` itself.
"""

from __future__ import annotations

from narwhal.api.server import port_free
from narwhal.cli.engine import BUSYBOX_IMAGE, ensure_docker, ensure_image, wait_until
from narwhal.cli.gitrepo import GIT_ENV, add_commit, make_git_repo
from testbed.browser import CHROMEDRIVER, CHROMIUM, ensure_browser, start_browser
from testbed.errors import PortInUse, TestbedUnavailable
from testbed.forge import RecordedStatus, StandInForge
from testbed.githttp import GitHttpServer
from testbed.haproxy import HAProxy, ensure_haproxy, start_haproxy
from testbed.netns import NetnsLink, existing_namespaces
from testbed.postgres import PostgresCluster, start_cluster
from testbed.privategit import PrivateGitServer
from testbed.sshhost import SSHD, SshHost, known_hosts_line, start_ssh_host, start_ssh_hosts
from testbed.system import RUNNER_USER, ensure_runner_user, every_cmdline, everything_under

TEST_IMAGE = BUSYBOX_IMAGE

__all__ = [
    "CHROMEDRIVER", "CHROMIUM", "GIT_ENV", "RUNNER_USER", "SSHD", "TEST_IMAGE",
    "GitHttpServer", "NetnsLink", "PortInUse", "RecordedStatus", "SshHost", "StandInForge", "TestbedUnavailable",
    "add_commit", "ensure_browser", "every_cmdline", "everything_under", "ensure_docker", "ensure_image", "ensure_runner_user", "existing_namespaces",
    "known_hosts_line", "make_git_repo", "port_free", "start_browser", "start_ssh_host", "start_ssh_hosts", "wait_until",
    "PostgresCluster", "start_cluster",  # testbed.postgres: a throwaway PostgreSQL cluster
    "PrivateGitServer",  # testbed.privategit: a git server over smart HTTP that wants credentials
    "HAProxy", "ensure_haproxy", "start_haproxy",  # testbed.haproxy: the shipped HAProxy example, running
]
