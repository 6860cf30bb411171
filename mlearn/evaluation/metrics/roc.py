"""Score-based verification metrics: TAR@FAR (IJB style), EER (NIST interpolation), AUC, minDCF."""
from __future__ import annotations

from typing import Any, Dict, Sequence

import numpy as np

DEFAULT_FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def roc_metrics(scores: np.ndarray, labels: np.ndarray,
                fars: Sequence[float] = DEFAULT_FARS) -> Dict[str, Any]:
    """TAR@FAR (nearest FPR on sklearn's default ROC, ties to the larger TPR), strict TAR@FAR
    (max TPR with FPR <= target, over every distinct threshold), EER (fraction), AUC and minDCF
    (p_target 0.01). Higher score = more likely the same identity."""
    from sklearn.metrics import auc, roc_curve

    scores, labels = _check_binary(scores, labels, "roc_metrics")
    fpr, tpr, _ = roc_curve(labels, scores)
    rev_fpr, rev_tpr = fpr[::-1], tpr[::-1]
    sweep = _Sweep(scores, labels)  # one sort shared by the strict TAR, the EER and minDCF
    full_fpr, full_tpr = sweep.roc_at_distinct_thresholds()
    tar = {}
    strict = {}
    for far in fars:
        tar[far] = float(rev_tpr[int(np.argmin(np.abs(rev_fpr - far)))])
        # not on sklearn's curve: drop_intermediate can drop the last point with FPR <= far
        ok = full_fpr <= far
        strict[far] = float(full_tpr[ok].max()) if ok.any() else 0.0
    return {"tar_at_far": tar, "tar_at_far_strict": strict, "eer": sweep.eer_nist(),
            "auc": float(auc(fpr, tpr)), "min_dcf": sweep.min_dcf(p_target=0.01)}


class _Sweep:
    """The Kaldi/NIST robust sweep (docs/protocols.md c.2): scores sorted ascending (stable), threshold at
    each sorted score. FNR_i = targets among the i lowest / n_t, FPR_i = 1 - non-targets among them / n_n."""

    def __init__(self, scores: np.ndarray, labels: np.ndarray) -> None:
        order = np.argsort(scores, kind="mergesort")
        self.scores = scores[order]
        sorted_labels = labels[order]
        n_target = sorted_labels.sum()
        n_non = len(labels) - n_target
        self.fnr = np.concatenate([[0.0], np.cumsum(sorted_labels) / n_target])
        self.fpr = np.concatenate([[1.0], 1.0 - np.cumsum(1 - sorted_labels) / n_non])

    def roc_at_distinct_thresholds(self):
        """(FPR, TPR) accepting score >= t for every distinct score t (sklearn's drop_intermediate=False)."""
        first_of_run = np.flatnonzero(np.r_[True, self.scores[1:] != self.scores[:-1]])
        return self.fpr[first_of_run], 1.0 - self.fnr[first_of_run]

    def eer_nist(self) -> float:
        fnr, fpr = self.fnr, self.fpr
        diff = fnr - fpr
        x1 = int(np.flatnonzero(diff >= 0)[0])
        x2 = int(np.flatnonzero(diff < 0)[-1])
        a = (fnr[x1] - fpr[x1]) / (fpr[x2] - fpr[x1] - (fnr[x2] - fnr[x1]))
        return float(fnr[x1] + a * (fnr[x2] - fnr[x1]))

    def min_dcf(self, p_target: float, c_miss: float = 1.0, c_fa: float = 1.0) -> float:
        cost = c_miss * self.fnr * p_target + c_fa * self.fpr * (1 - p_target)
        return float(cost.min() / min(c_miss * p_target, c_fa * (1 - p_target)))


def eer_nist(scores: np.ndarray, labels: np.ndarray) -> float:
    """EER by linear interpolation between the sweep points bracketing FNR = FPR (WeSpeaker)."""
    return _Sweep(*_check_binary(scores, labels, "eer_nist")).eer_nist()


def min_dcf(scores: np.ndarray, labels: np.ndarray, p_target: float = 0.01, c_miss: float = 1.0,
            c_fa: float = 1.0) -> float:
    """min over the sweep of C_miss·P_miss·p + C_fa·P_fa·(1-p), normalised by min(C_miss·p, C_fa·(1-p))."""
    return _Sweep(*_check_binary(scores, labels, "min_dcf")).min_dcf(p_target, c_miss, c_fa)


def _check_binary(scores: np.ndarray, labels: np.ndarray, what: str):
    """float64 scores and int 0/1 labels, both [n]; ``ValueError`` naming ``what`` and what is missing
    (a length mismatch, labels other than 0/1, no targets or no non-targets, a non-finite score)."""
    scores = np.asarray(scores, np.float64).ravel()
    labels = np.asarray(labels).astype(int).ravel()
    if scores.shape != labels.shape:
        raise ValueError(f"{what}: scores {scores.shape} and labels {labels.shape} differ in length")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"{what}: labels must be 0/1 (1 = target, same identity); "
                         f"got {np.unique(labels)[:5]}")
    n_target = int(labels.sum())
    for count, missing in ((n_target, "target (same-identity)"), (len(labels) - n_target, "non-target")):
        if count == 0:
            raise ValueError(f"{what}: no {missing} pairs among the {len(labels)} labels; ROC, EER and "
                             "minDCF need both targets and non-targets")
    bad = np.flatnonzero(~np.isfinite(scores))
    if len(bad):
        raise ValueError(f"{what}: {len(bad)} of {len(scores)} scores are NaN or inf "
                         f"(first at index {bad[0]}); the embeddings they come from are not finite")
    return scores, labels


def eer_sklearn(scores: np.ndarray, labels: np.ndarray) -> float:
    """EER variant 2 (voxceleb_trainer ``tuneThresholdfromScore``): on sklearn's ``roc_curve`` (distinct
    thresholds, accept score >= t, ``drop_intermediate``), idx = nanargmin |FNR - FPR|,
    EER = max(FPR[idx], FNR[idx]) with FNR = 1 - TPR.

    >>> eer_sklearn(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]))
    0.5
    """
    from sklearn.metrics import roc_curve

    scores, labels = _check_binary(scores, labels, "eer_sklearn")
    fpr, tpr, _ = roc_curve(labels, scores, pos_label=1)
    fnr = 1.0 - tpr
    idx = int(np.nanargmin(np.abs(fnr - fpr)))
    return float(max(fpr[idx], fnr[idx]))


def eer_speechbrain(scores: np.ndarray, labels: np.ndarray) -> float:
    """EER variant 3 (speechbrain ``metric_stats.EER``): thresholds t = unique scores and the mid-points
    between consecutive ones; FRR(t) = #targets <= t / n_t, FAR(t) = #non-targets > t / n_n; at the
    first t minimising |FAR - FRR|, EER = (FAR + FRR) / 2.

    >>> eer_speechbrain(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]))
    0.5
    """
    scores, labels = _check_binary(scores, labels, "eer_speechbrain")
    unique = np.unique(scores)
    thresholds = np.sort(np.concatenate([unique, (unique[:-1] + unique[1:]) / 2]))
    target = np.sort(scores[labels == 1])
    non = np.sort(scores[labels == 0])
    frr = np.searchsorted(target, thresholds, side="right") / len(target)
    far = 1.0 - np.searchsorted(non, thresholds, side="right") / len(non)
    idx = int(np.argmin(np.abs(far - frr)))
    return float((far[idx] + frr[idx]) / 2)


# EER variants by name (docs/protocols.md c.3): "nist" is the reference the reports print.
EER_VARIANTS = {"nist": eer_nist, "sklearn": eer_sklearn, "speechbrain": eer_speechbrain}
