"""Command line: ``python -m sd3ref <command>``."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="sd3ref", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    from . import verify
    p = commands.add_parser("verify", help="compare every component with the golden KerasHub / diffusers outputs")
    p.add_argument("sets", nargs="*", help="golden sets to check (default: all)")
    p.add_argument("--golden", default=str(verify.GOLDEN), help="golden fixture folder (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the rows as a JSON list instead of a table")
    p.set_defaults(func=verify.main)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
