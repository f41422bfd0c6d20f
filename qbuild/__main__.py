"""``python -m qbuild``."""

from qbuild.cli import main

raise SystemExit(main())
