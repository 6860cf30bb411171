"""Evaluation: plain metric functions over arrays, protocol runners and reports.

Names are imported lazily (``mlearn.evaluation.retrieval_metrics`` loads FAISS only when used).
"""
from __future__ import annotations

from mlearn.lazy import lazy_exports

_EXPORTS = {
    "kfold_verification": "mlearn.evaluation.verification",
    "roc_metrics": "mlearn.evaluation.roc",
    "eer_nist": "mlearn.evaluation.roc",
    "eer_sklearn": "mlearn.evaluation.roc",
    "eer_speechbrain": "mlearn.evaluation.roc",
    "EER_VARIANTS": "mlearn.evaluation.roc",
    "min_dcf": "mlearn.evaluation.roc",
    "retrieval_metrics": "mlearn.evaluation.retrieval",
    "read_trials": "mlearn.evaluation.speaker",
    "cosine_scores": "mlearn.evaluation.speaker",
    "as_norm": "mlearn.evaluation.speaker",
    "speaker_mean_cohort": "mlearn.evaluation.speaker",
    "load_ijb_meta": "mlearn.evaluation.ijb",
    "template_features": "mlearn.evaluation.ijb",
    "pair_scores": "mlearn.evaluation.ijb",
    "score_ijb": "mlearn.evaluation.ijb",
    "open_set_identification": "mlearn.evaluation.ijb",
    "run_suite": "mlearn.evaluation.suite",
    "VerificationCallback": "mlearn.evaluation.callback",
}


__getattr__ = lazy_exports(__name__, _EXPORTS)


__all__ = sorted(_EXPORTS)
