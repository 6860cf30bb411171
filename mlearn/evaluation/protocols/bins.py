"""The insightface ``.bin`` verification protocol (LFW, CFP-FP, AgeDB-30, ...): suite type ``bin``.

PROTOCOLS.md §a: flip fusion (raw embeddings of image and mirror summed, then L2-normalised), squared-L2
distance, 10 contiguous folds, threshold grid 0..4 step 0.01 chosen on the other nine folds.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List

import numpy as np
from tqdm import tqdm

from mlearn.data.bins import read_bin
from mlearn.evaluation.roc import roc_metrics
from mlearn.evaluation.verification import kfold_verification

BASELINES = ("raw_pixels",)
PROTOCOL_KEYS = ("type", "name", "path", "flip", "baselines")
REQUIRED_KEYS = ("path",)


def run_protocol(model: Any, protocol: Dict[str, Any], root: Path, batch_size: int) -> List[Dict[str, Any]]:
    """Rows for the model (and each requested baseline) on one ``.bin`` set."""
    unknown = sorted(set(protocol) - set(PROTOCOL_KEYS))
    if unknown:
        raise ValueError(f"bin protocol: unknown key(s) {unknown}; accepted: {list(PROTOCOL_KEYS)}")
    if "path" not in protocol:
        raise ValueError("bin protocol: missing key 'path' (the .bin file, relative to --data-root)")
    name = protocol.get("name") or Path(protocol["path"]).stem
    path = Path(protocol["path"])
    path = path if path.is_absolute() else root / path
    if not path.is_file():
        raise FileNotFoundError(f"{name}: {path} not found (see datasets/face_bins.md for where to get it)")
    flip = bool(protocol.get("flip", True))
    images, issame = read_bin(path)
    check_both_kinds(issame, f"{name}: {path}")
    embed = lambda batch: model.embed(batch, normalize=False)  # noqa: E731
    rows = [verification_row(name, "model", bin_embeddings(embed, images, batch_size, flip), issame, flip)]
    for baseline in protocol.get("baselines", []):
        if baseline not in BASELINES:
            raise ValueError(f"{name}: baseline={baseline!r}; expected one of {list(BASELINES)}")
        pixels = (images.reshape(len(images), -1).astype(np.float32) - 127.5) / 127.5
        rows.append(verification_row(name, "raw_pixels", pixels, issame, False))
    return rows


def check_both_kinds(issame: np.ndarray, where: str) -> None:
    """``ValueError`` naming ``where`` when the pair labels [P] lack same- or different-identity pairs."""
    same = int(np.count_nonzero(issame))
    if same == 0 or same == len(issame):
        missing = "positive (same-identity)" if same == 0 else "negative (different-identity)"
        raise ValueError(f"{where}: no {missing} pairs among its {len(issame)} pairs; a verification set "
                         "needs both")


def bin_embeddings(embed: Callable[[np.ndarray], np.ndarray], images: np.ndarray, batch_size: int = 128,
                   flip: bool = True, progress: bool = True) -> np.ndarray:
    """Raw embeddings [N, D] of uint8 [N, H, W, 3] images; with ``flip`` the embedding of the
    horizontally flipped image is added before any normalisation (insightface's flip fusion)."""
    chunks = []
    for start in tqdm(range(0, len(images), batch_size), desc="embedding", unit="batch", disable=not progress):
        batch = images[start:start + batch_size]
        emb = embed(batch)
        if flip:
            emb = emb + embed(np.ascontiguousarray(batch[:, :, ::-1]))
        chunks.append(emb)
    return np.concatenate(chunks)


def verification_row(name: str, method: str, emb: np.ndarray, issame: np.ndarray, flip: bool) -> Dict[str, Any]:
    """10-fold accuracy and ROC metrics of pairs (emb[2i], emb[2i+1]) as one report row."""
    unit = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    verification = kfold_verification(unit[0::2], unit[1::2], issame)
    scores = (unit[0::2] * unit[1::2]).sum(1)
    roc = roc_metrics(scores, issame)
    table = {"benchmark": name, "method": method, "pairs": str(len(issame)),
             "fusion": "flip-sum" if flip else "none",
             "accuracy %": f"{verification['accuracy'] * 100:.2f} ± {verification['accuracy_std'] * 100:.2f}",
             "TAR@1e-3 %": f"{roc['tar_at_far'][1e-3] * 100:.2f}", "EER %": f"{roc['eer'] * 100:.2f}",
             "AUC": f"{roc['auc']:.4f}"}
    return {"benchmark": name, "method": method, "pairs": int(len(issame)),
            "fusion": "flip-sum" if flip else "none", "distance": "squared L2 (10-fold) / cosine (ROC)",
            "normalisation": "L2", "eer_variant": "NIST linear interpolation", "p_target": 0.01,
            **verification, **roc, "_scores": scores, "_labels": issame, "_table": table,
            "_legend": "accuracy: LFW 10-fold; TAR@FAR: nearest FPR on sklearn's ROC; EER: NIST interpolation"}
