"""``python -m narwhal`` is the ``narwhal`` command."""

from narwhal.cli.main import main

raise SystemExit(main())
