"""``python -m narwhal`` is the ``narwhal`` command."""

from narwhal.cli import main

raise SystemExit(main())
