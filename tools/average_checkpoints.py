"""Average the weights of the last N checkpoints of a run (WeSpeaker's ``num_avg``).

Examples:
  python tools/average_checkpoints.py --dir runs/ecapa/checkpoints --num 10 --output runs/ecapa/avg10.ckpt
  python tools/average_checkpoints.py --ckpts a.ckpt b.ckpt c.ckpt --output avg.ckpt

The result is a Lightning checkpoint (no optimizer state) that ``mlearn eval --model avg10.ckpt`` and
``mlearn export --model avg10.ckpt`` accept like any other.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from mlearn.averaging import average_checkpoints, last_checkpoints


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dir", help="checkpoint folder: average its --num newest (by epoch/step)")
    source.add_argument("--ckpts", nargs="+", help="checkpoint files, oldest first")
    parser.add_argument("--num", type=int, default=10,
                        help="how many of --dir's newest checkpoints (default 10)")
    parser.add_argument("--output", required=True, help="averaged checkpoint to write")
    parser.add_argument("--unsafe-load", action="store_true",
                        help="load legacy pickled checkpoints (runs code named by the files: only for "
                             "files you trust; see docs/security.md)")
    args = parser.parse_args(argv)
    try:
        paths = (last_checkpoints(args.dir, args.num, unsafe=args.unsafe_load) if args.dir
                 else args.ckpts)
        average_checkpoints(paths, args.output, unsafe=args.unsafe_load)
    except (FileNotFoundError, ValueError) as exc:
        print(f"average_checkpoints: error: {exc}", file=sys.stderr)
        return 2
    print(f"averaged {len(paths)} checkpoints -> {args.output}")
    for path in paths:
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
