"""Peak memory and time of parsing a RecordIO ``.idx`` (``key<TAB>offset`` lines) at WebFace scale.

Writes a synthetic ``train.idx`` of ``--lines`` lines (keys ``0..N-1``, offsets of records averaging
``--record-bytes``, so the lines are as long as those of a real set) and a sparse ``train.rec`` of the
matching size into a temporary folder (``--tmp``), then measures each row in a fresh child process:
the extra peak RSS (``VmHWM`` after the parse minus ``VmRSS`` before it, imports excluded) and the
wall time; ``held after, private``: the anonymous (not file-backed, so not shared) memory the row
still holds when done.

  old parser       the parser before the chunked one: ``np.array(text.split(), int64)`` over the whole
                   file (run on ``--old-lines`` lines only: it needs ~360 bytes per line)
  _read_index      the chunked parser (keys and offsets, int64 each)
  RecordIOReader   the whole reader: parse + order check + int32 spans (what every rank holds)
  ..., writing the cache / from the cache
                   the same with ``cache_index=True``: parse and write ``train.idx.npy``, then open
                   again from it (memory-mapped: its pages are file-backed and shared by every process
                   of the node, but count in each one's RSS once touched)

Exit status 1 when the ``_read_index`` row at ``--lines`` exceeds ``--limit-gb`` (default 1 GB).

Example:
  python tools/bench_idx.py --lines 42000000 --old-lines 2000000
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict

import numpy as np


def write_index(folder: Path, lines: int, record_bytes: int, chunk: int = 1_000_000) -> int:
    """``folder/train.idx`` with ``lines`` lines and a sparse ``train.rec`` covering its offsets.
    Returns the size of the index in bytes."""
    rng = np.random.default_rng(0)
    offset = 0
    with (folder / "train.idx").open("w") as f:
        for start in range(0, lines, chunk):
            count = min(chunk, lines - start)
            sizes = rng.integers(record_bytes // 2, record_bytes * 3 // 2, count) // 4 * 4 + 32
            offsets = offset + np.concatenate(([0], np.cumsum(sizes[:-1])))
            offset = int(offsets[-1] + sizes[-1])
            f.write("".join(f"{k}\t{o}\n" for k, o in zip(range(start, start + count), offsets.tolist())))
    with (folder / "train.rec").open("wb") as f:
        f.truncate(offset)  # sparse: offsets only need to lie inside the file
    return (folder / "train.idx").stat().st_size


def _status(field: str) -> int:
    """A ``/proc/self/status`` memory field in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _old_parser(idx_path: Path) -> tuple:
    text = idx_path.read_bytes()
    values = np.array(text.split(), dtype=np.int64)
    pairs = values.reshape(-1, 2)
    return pairs[:, 0].copy(), pairs[:, 1].copy()


def child(mode: str, folder: Path) -> Dict[str, float]:
    """Run one row in this (fresh) process: extra peak RSS in bytes and seconds."""
    from mlearn.data.images.recordio import RecordIOReader
    from mlearn.data.images.recordio_index import _read_index

    idx = folder / "train.idx"
    before, anon_before = _status("VmRSS"), _status("RssAnon")
    start = time.perf_counter()
    if mode == "old":
        keys, offsets = _old_parser(idx)
        n = len(keys)
    elif mode == "new":
        keys, offsets = _read_index(idx)
        n = len(keys)
    else:  # reader: no cache; cache: parse and write train.idx.npy; cached: open from it
        reader = RecordIOReader(folder / "train.rec", idx, cache_index=mode != "reader")
        n = len(reader)
    seconds = time.perf_counter() - start
    return {"lines": n, "extra_peak": _status("VmHWM") - before, "seconds": seconds,
            "private_after": _status("RssAnon") - anon_before}


def measure(mode: str, folder: Path) -> Dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--child", mode, "--tmp", str(folder)], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=42_000_000, help=".idx lines (WebFace42M: 42.5M)")
    parser.add_argument("--old-lines", type=int, default=2_000_000,
                        help="lines for the old parser's row (0: skip it)")
    parser.add_argument("--record-bytes", type=int, default=5200, help="mean record size (offset spacing)")
    parser.add_argument("--limit-gb", type=float, default=1.0,
                        help="fail above this extra peak (GB, 1e9 bytes)")
    parser.add_argument("--tmp", default=None, help="work folder (default: a new temporary folder, deleted)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, Path(args.tmp))))
        return 0
    base = Path(tempfile.mkdtemp(prefix="bench_idx_", dir=args.tmp))
    rows = []
    try:
        plan = ((args.old_lines, ("old", "new")), (args.lines, ("new", "reader", "cache", "cached")))
        for lines, modes in plan:
            if lines <= 0:
                continue
            folder = base / str(lines)
            folder.mkdir()
            t = time.perf_counter()
            size = write_index(folder, lines, args.record_bytes)
            print(f"wrote {lines:,} lines ({size / 1e6:,.0f} MB) in {time.perf_counter() - t:.1f} s",
                  flush=True)
            for mode in modes:
                row = measure(mode, folder)
                rows.append((mode, lines, size, row))
                print(f"  {mode:7s} {row['extra_peak'] / 1e6:9,.0f} MB extra peak  "
                      f"{row['extra_peak'] / lines:6.1f} B/line  {row['seconds']:6.2f} s", flush=True)
            shutil.rmtree(folder)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    names = {"old": "old parser", "new": "_read_index", "reader": "RecordIOReader",
             "cache": "RecordIOReader, writing the cache", "cached": "RecordIOReader, from the cache"}
    print("\n| parser | lines | .idx MB | extra peak RSS MB | bytes/line | held after, private MB "
          "| seconds |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for mode, lines, size, row in rows:
        print(f"| {names[mode]} | {lines:,} | {size / 1e6:,.0f} | {row['extra_peak'] / 1e6:,.0f} | "
              f"{row['extra_peak'] / lines:.1f} | {row['private_after'] / 1e6:,.0f} | {row['seconds']:.2f} |")
    target = [row for mode, lines, _, row in rows if mode == "new" and lines == args.lines]
    if target and target[0]["extra_peak"] > args.limit_gb * 1e9:
        print(f"FAIL: _read_index at {args.lines:,} lines peaks {target[0]['extra_peak'] / 1e9:.2f} GB extra "
              f"(limit {args.limit_gb} GB)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
