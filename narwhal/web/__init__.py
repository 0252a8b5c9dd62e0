"""The web dashboard: server-rendered pages over the API's app (``mount``), a layer above ``api``.

``narwhal serve`` mounts it (``narwhal.cli.main``); ``narwhal.api`` knows nothing of it
beyond the ``pages`` hook of ``make_app``. Modules: ``pages`` (handlers, guard, routes),
``render`` (templates and what they show), ``ansi`` (colours as CSS classes); templates
and static assets ship as package data.
"""

from __future__ import annotations

from narwhal.web.pages import ROUTES, job_page_url, mount

__all__ = ["ROUTES", "job_page_url", "mount"]
