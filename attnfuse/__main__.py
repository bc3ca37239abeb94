"""``python -m attnfuse`` (also the ``attnfuse`` console script).

Commands:

* ``calibrate [-o FILE] [--device auto|cuda|cpu] [--quick]``: measure the present device (`attnfuse.calibrate`)
  and write its `DeviceSpec` as JSON (usable as ``options={"device": FILE}``); prints the spec.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def _calibrate(args: argparse.Namespace) -> int:
    from .calibrate import measure

    spec = measure(args.device, quick=args.quick)
    print(json.dumps(spec.to_dict(), indent=2))
    if args.output:
        spec.save(args.output)
        print(f"attnfuse: wrote {args.output}; use it with options={{'device': {args.output!r}}}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="attnfuse", description="attnfuse command-line tools")
    commands = parser.add_subparsers(dest="command", required=True)
    cal = commands.add_parser("calibrate", help="measure this device and write a DeviceSpec JSON file")
    cal.add_argument("-o", "--output", help="where to write the spec JSON")
    cal.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    cal.add_argument("--quick", action="store_true", help="smaller, fewer measurements (seconds, less accurate)")
    cal.set_defaults(run=_calibrate)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except ValueError as exc:
        print(f"attnfuse {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
