"""Pair verification on ``.bin`` sets: LFW-style 10-fold accuracy (insightface ``verification.py``
protocol, docs/protocols.md section a) and the ROC metrics of the same pairs."""
from __future__ import annotations

from typing import Any, Dict

import numpy as np

from mlearn.evaluation.metrics.roc import roc_metrics
from mlearn.inference import l2_normalize

THRESHOLDS = np.arange(0, 4, 0.01)


def kfold_verification(emb1: np.ndarray, emb2: np.ndarray, issame: np.ndarray,
                       n_folds: int = 10) -> Dict[str, Any]:
    """Mean/std accuracy over contiguous folds; the threshold is picked on the other folds.

    Embeddings are L2-normalised; distance d = ||e1 - e2||^2 in [0, 4]; "same" iff d < t for t in
    0, 0.01, ..., 3.99; the first t maximising training accuracy is applied to the held-out fold.

    >>> e = np.eye(4)[[0, 0, 1, 2, 3, 3, 1, 0]].astype(float)
    >>> kfold_verification(e[0::2], e[1::2], np.array([True, False, True, False]), n_folds=2)["accuracy"]
    1.0
    """
    e1 = l2_normalize(np.asarray(emb1, np.float64))
    e2 = l2_normalize(np.asarray(emb2, np.float64))
    issame = np.asarray(issame, bool)
    dist = ((e1 - e2) ** 2).sum(1)
    predictions = dist[None, :] < THRESHOLDS[:, None]  # [T, N]
    correct = predictions == issame[None, :]
    folds = np.array_split(np.arange(len(issame)), n_folds)
    accuracies, thresholds = [], []
    for test in folds:
        train = np.setdiff1d(np.arange(len(issame)), test)
        best = int(np.argmax(correct[:, train].mean(1)))
        thresholds.append(float(THRESHOLDS[best]))
        accuracies.append(float(correct[best, test].mean()))
    return {"accuracy": float(np.mean(accuracies)), "accuracy_std": float(np.std(accuracies)),
            "threshold": float(np.mean(thresholds)), "fold_accuracies": accuracies,
            "fold_thresholds": thresholds}


def verify_pairs(embeddings: np.ndarray, issame: np.ndarray) -> Dict[str, Any]:
    """Pairs (``embeddings[2i]``, ``embeddings[2i+1]``) of raw embeddings [2P, D] with labels [P]:
    :func:`kfold_verification` (squared L2 of unit vectors) and :func:`roc_metrics` of the cosine
    ``scores`` [P] (returned too, float32)."""
    unit = l2_normalize(embeddings)
    verification = kfold_verification(unit[0::2], unit[1::2], issame)
    scores = (unit[0::2] * unit[1::2]).sum(1)
    return {**verification, **roc_metrics(scores, issame), "scores": scores}
