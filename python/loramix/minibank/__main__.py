"""``python -m loramix.minibank build (--suite default | --tasks DIR) -o DIR [--scale tiny] [--force]``"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("build",):
        print(__doc__.strip("`"), file=sys.stderr)
        return 2
    from loramix.minibank.build import main as build_main

    return build_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
