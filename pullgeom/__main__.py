"""``python -m pullgeom``: the command line."""

from pullgeom.paper.cli import main

raise SystemExit(main())
