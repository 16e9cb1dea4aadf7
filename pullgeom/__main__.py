"""``python -m pullgeom``: the command line."""

from pullgeom.cli import main

raise SystemExit(main())
