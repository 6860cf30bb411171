"""Evaluation in three layers: ``metrics`` (pure functions, arrays in, dicts out), ``protocols``
(file readers, typed suite options, suite adapters: bins, ijb, trials, retrieval) and the runners
(``suite``, ``report``, the training ``callback``).

Names are imported lazily (``mlearn.evaluation.retrieval_metrics`` loads FAISS only when used).
"""
from __future__ import annotations

from mlearn.lazy import lazy_exports

_EXPORTS = {
    "kfold_verification": "mlearn.evaluation.metrics.verification",
    "verify_pairs": "mlearn.evaluation.metrics.verification",
    "roc_metrics": "mlearn.evaluation.metrics.roc",
    "eer_nist": "mlearn.evaluation.metrics.roc",
    "eer_sklearn": "mlearn.evaluation.metrics.roc",
    "eer_speechbrain": "mlearn.evaluation.metrics.roc",
    "EER_VARIANTS": "mlearn.evaluation.metrics.roc",
    "min_dcf": "mlearn.evaluation.metrics.roc",
    "retrieval_metrics": "mlearn.evaluation.metrics.retrieval",
    "cosine_scores": "mlearn.evaluation.metrics.trials",
    "as_norm": "mlearn.evaluation.metrics.trials",
    "speaker_mean_cohort": "mlearn.evaluation.metrics.trials",
    "template_features": "mlearn.evaluation.metrics.ijb",
    "pair_scores": "mlearn.evaluation.metrics.ijb",
    "open_set_identification": "mlearn.evaluation.metrics.ijb",
    "read_trials": "mlearn.evaluation.protocols.trials",
    "load_ijb_meta": "mlearn.evaluation.protocols.ijb_meta",
    "score_ijb": "mlearn.evaluation.protocols.ijb",
    "build_options": "mlearn.evaluation.protocols.options",
    "ResultRow": "mlearn.evaluation.report",
    "run_suite": "mlearn.evaluation.suite",
    "VerificationCallback": "mlearn.evaluation.callback",
}


__getattr__ = lazy_exports(__name__, _EXPORTS)


__all__ = sorted(_EXPORTS)
