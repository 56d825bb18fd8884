"""``python -m fedwa.deploy``: see :mod:`fedwa.deploy.cli`."""

from fedwa.deploy.cli import main

raise SystemExit(main())
