"""``python -m fedwa.deploy``: see :mod:`fedwa.deploy.cli`."""

from fedwa.deploy.launcher import main

raise SystemExit(main())
