"""Write a held-out synthetic face folder with graded degradations at known strengths.

Each image is one render of a synthetic identity (``mlearn.data.synthetic.faces``) degraded by one kind
(blur, noise, lowres, occlusion; ``mlearn.data.synthetic.degrade``) at one strength of a grid. The
(kind, strength) combinations are balanced over the whole set (tiled, then shuffled with the seed), so
each combination occurs equally often when the image count is a multiple of their number.

Layout::

    OUT/<identity>/<n>.png     images (PNG: no compression artefacts on top of the degradation)
    OUT/degradations.csv       file,identity,kind,strength (file relative to OUT)

Identities: the identity parameters are drawn from ``numpy.random.default_rng(seed)`` after skipping
``--identity-offset`` draws. ``make_face_dataset`` draws its training then validation identities first
from the same kind of stream, so with the quickstart corpus (seed 0, 200 training + 100 validation
identities) the defaults ``--seed 0 --identity-offset 300`` give identities disjoint from both.

    python tools/make_degraded_faces.py --out data/synthetic_degraded     # 50 x 12 images, a few seconds
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from tqdm import tqdm

from mlearn.data.synthetic.degrade import degradation_kinds, degrade
from mlearn.data.synthetic.faces import render_face, sample_identity

DEFAULT_STRENGTHS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
CSV_NAME = "degradations.csv"


def plan(count: int, kinds: Sequence[str], strengths: Sequence[float],
         rng: np.random.Generator) -> List[Tuple[str, float]]:
    """``count`` (kind, strength) assignments: every combination tiled, then shuffled by ``rng``."""
    combos = [(kind, float(s)) for kind in kinds for s in strengths]
    tiled = [combos[i % len(combos)] for i in range(count)]
    return [tiled[i] for i in rng.permutation(count)]


def make_degraded_faces(out: Path, identities: int, images_per_identity: int, seed: int = 0,
                        identity_offset: int = 300, size: int = 112,
                        kinds: Optional[Sequence[str]] = None,
                        strengths: Sequence[float] = DEFAULT_STRENGTHS, progress: bool = True,
                        detail: float = 0.0, clean: bool = False) -> int:
    """Write the folder and ``OUT/degradations.csv``; returns the number of images written. ``detail``:
    the identities' mid-frequency skin pattern (:func:`sample_identity`; 0 = the quickstart corpus's
    identities). ``clean``: render without the renderer's own blur, noise and occluders
    (:func:`render_face`), so each image's quality is exactly its listed degradation.
    ``ValueError`` for a non-empty ``out``, an unknown kind or a strength outside [0, 1]."""
    kinds = list(kinds) if kinds else degradation_kinds()
    unknown = sorted(set(kinds) - set(degradation_kinds()))
    if unknown:
        raise ValueError(f"unknown degradation kind(s) {unknown}; known: {degradation_kinds()}")
    bad = [s for s in strengths if not 0.0 <= s <= 1.0]
    if bad or not strengths:
        raise ValueError(f"strengths {list(strengths)}: expected one or more numbers in [0, 1]")
    if not detail >= 0:
        raise ValueError(f"detail={detail}: expected a number >= 0")
    if identities < 1 or images_per_identity < 1 or identity_offset < 0:
        raise ValueError(f"identities={identities}, images_per_identity={images_per_identity}, "
                         f"identity_offset={identity_offset}: expected >= 1, >= 1, >= 0")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out}: exists and is not an empty folder (nothing is overwritten)")
    identity_rng = np.random.default_rng(seed)
    for _ in range(identity_offset):
        sample_identity(identity_rng, detail)
    people = [sample_identity(identity_rng, detail) for _ in range(identities)]
    rng = np.random.default_rng([seed, 1])  # images: a stream apart from the identity draws
    assignments = plan(identities * images_per_identity, kinds, strengths, rng)
    rows = []
    steps = tqdm(range(identities), desc="degraded faces", unit="id", disable=not progress)
    for k in steps:
        name = f"id{identity_offset + k:05d}"
        folder = out / name
        folder.mkdir(parents=True)
        for n in range(images_per_identity):
            kind, strength = assignments[k * images_per_identity + n]
            image = degrade(render_face(people[k], rng, size, clean=clean), kind, strength, rng)
            Image.fromarray(image).save(folder / f"{n:03d}.png")
            rows.append((f"{name}/{n:03d}.png", name, kind, f"{strength:g}"))
    with open(out / CSV_NAME, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "identity", "kind", "strength"])
        writer.writerows(rows)
    return len(rows)


def _floats(text: str) -> List[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated numbers") from None


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="new or empty folder to write")
    parser.add_argument("--identities", type=int, default=50)
    parser.add_argument("--images-per-identity", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--identity-offset", type=int, default=300,
                        help="identity draws to skip (300: past the quickstart's 200 train + 100 val)")
    parser.add_argument("--size", type=int, default=112, help="image side in px")
    parser.add_argument("--kinds", nargs="+", default=None, help=f"subset of {degradation_kinds()}")
    parser.add_argument("--strengths", type=_floats, default=list(DEFAULT_STRENGTHS),
                        help="strength grid, comma-separated (default 0,0.2,0.4,0.6,0.8,1)")
    parser.add_argument("--detail", type=float, default=0.0,
                        help="std (grey levels) of the identities' mid-frequency skin pattern; 0 = none")
    parser.add_argument("--clean", action="store_true",
                        help="no blur/noise/occluder from the renderer: each image's only one is listed")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        written = make_degraded_faces(args.out, args.identities, args.images_per_identity, args.seed,
                                      args.identity_offset, args.size, args.kinds, args.strengths,
                                      progress=not args.no_progress, detail=args.detail,
                                      clean=args.clean)
    except ValueError as exc:
        print(f"make_degraded_faces: error: {exc}", file=sys.stderr)
        return 2
    kinds = args.kinds or degradation_kinds()
    print(f"wrote {written} images of {args.identities} identities ({', '.join(kinds)} at strengths "
          f"{', '.join(f'{s:g}' for s in args.strengths)}) to {args.out} + {CSV_NAME} "
          f"in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
