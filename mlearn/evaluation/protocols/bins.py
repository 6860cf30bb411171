"""The insightface ``.bin`` verification protocol (LFW, CFP-FP, AgeDB-30, ...): suite type ``bin``.

docs/protocols.md §a: flip fusion (raw embeddings of image and mirror summed, then L2-normalised),
squared-L2 distance, 10 contiguous folds, threshold grid 0..4 step 0.01 chosen on the other nine folds.
With ``quality: [head, norm]``, quality-aware rows of the same pairs (cosine of the flip-fused
embeddings, quality of each unflipped image) follow the model's row (docs/protocols.md g.4).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, MutableMapping, Optional

import numpy as np
from tqdm import tqdm

from mlearn.data import read_bin
from mlearn.evaluation.metrics.verification import verify_pairs
from mlearn.evaluation.protocols.options import BinOptions, build_options
from mlearn.evaluation.protocols.quality_eval import (
    check_sources,
    embed_batches_with_quality,
    quality_results,
)
from mlearn.evaluation.report import ResultRow
from mlearn.inference import SupportsEmbed, embed_batches

BASELINES = ("raw_pixels",)
LEGEND = "accuracy: LFW 10-fold; TAR@FAR: nearest FPR on sklearn's ROC; EER: NIST interpolation"


def run(model: SupportsEmbed, options: BinOptions, root: Path, batch_size: int,
        cache: Optional[MutableMapping[Any, Any]] = None) -> List[ResultRow]:
    """Rows for the model (and each requested baseline) on one ``.bin`` set."""
    name = options.benchmark
    path = Path(options.path)
    path = path if path.is_absolute() else root / path
    if not path.is_file():
        raise FileNotFoundError(f"{name}: {path} not found (see datasets/face_bins.md for where to get it)")
    for baseline in options.baselines:
        if baseline not in BASELINES:
            raise ValueError(f"{name}: baseline={baseline!r}; expected one of {list(BASELINES)}")
    sources = check_sources(model, options.quality, f"bin protocol {name}")
    images, issame = read_bin(path)
    check_both_kinds(issame, f"{name}: {path}")
    batches = tqdm([images[i:i + batch_size] for i in range(0, len(images), batch_size)],
                   desc="embedding", unit="batch")
    if sources:
        embeddings, qualities = embed_batches_with_quality(model, batches, sources, options.flip)
    else:
        embeddings = embed_batches(model, batches, options.flip)
    rows = [verification_row(name, "model", embeddings, issame, options.flip)]
    for baseline in options.baselines:  # raw_pixels: the pixels themselves as embeddings
        pixels = (images.reshape(len(images), -1).astype(np.float32) - 127.5) / 127.5
        rows.append(verification_row(name, baseline, pixels, issame, False))
    if sources:
        pairs = np.arange(len(issame))
        rows += quality_results(rows[0], np.asarray(rows[0].scores), issame, 2 * pairs, 2 * pairs + 1,
                                qualities, name, model, options.quality_fmrs, 0, cache)
    return rows


def run_protocol(model: SupportsEmbed, protocol: Dict[str, Any], root: Path,
                 batch_size: int) -> List[ResultRow]:
    """:func:`run` on a suite entry (a dict; ``type`` may be left out)."""
    return run(model, build_options({**protocol, "type": "bin"}, "bin protocol"), Path(root), batch_size)


def check_both_kinds(issame: np.ndarray, where: str) -> None:
    """``ValueError`` naming ``where`` when the pair labels [P] lack same- or different-identity pairs."""
    same = int(np.count_nonzero(issame))
    if same == 0 or same == len(issame):
        missing = "positive (same-identity)" if same == 0 else "negative (different-identity)"
        raise ValueError(f"{where}: no {missing} pairs among its {len(issame)} pairs; a verification set "
                         "needs both")


def verification_row(name: str, method: str, emb: np.ndarray, issame: np.ndarray, flip: bool) -> ResultRow:
    """10-fold accuracy and ROC metrics of pairs (emb[2i], emb[2i+1]) as one report row."""
    metrics = verify_pairs(emb, issame)
    scores = metrics.pop("scores")
    fusion = "flip-sum" if flip else "none"
    table = {"benchmark": name, "method": method, "pairs": str(len(issame)), "fusion": fusion,
             "accuracy %": f"{metrics['accuracy'] * 100:.2f} ± {metrics['accuracy_std'] * 100:.2f}",
             "TAR@1e-3 %": f"{metrics['tar_at_far'][1e-3] * 100:.2f}", "EER %": f"{metrics['eer'] * 100:.2f}",
             "AUC": f"{metrics['auc']:.4f}"}
    values = {"benchmark": name, "method": method, "pairs": int(len(issame)), "fusion": fusion,
              "distance": "squared L2 (10-fold) / cosine (ROC)", "normalisation": "L2",
              "eer_variant": "NIST linear interpolation", "p_target": 0.01, **metrics}
    return ResultRow(values, table=table, legend=LEGEND, scores=scores, labels=issame)
