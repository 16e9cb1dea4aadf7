"""The ``pullgeom`` command and ``python -m pullgeom``: the paper pipeline's command line
(``pullgeom.paper.cli``), which needs the ``paper`` extra; without it, one line saying so."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    try:
        from pullgeom.paper.cli import main as cli_main
    except ImportError as error:
        if not str(error).startswith("the pullgeom paper pipeline"):
            raise
        print(f"pullgeom: {error}", file=sys.stderr)
        return 2
    return cli_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
