"""Evaluation: plain metric functions over arrays, protocol runners and reports."""
from __future__ import annotations

from mlearn.evaluation.roc import EER_VARIANTS, eer_nist, eer_sklearn, eer_speechbrain, min_dcf, roc_metrics
from mlearn.evaluation.speaker import as_norm, cosine_scores, read_trials, speaker_mean_cohort
from mlearn.evaluation.verification import kfold_verification

__all__ = ["EER_VARIANTS", "as_norm", "cosine_scores", "eer_nist", "eer_sklearn", "eer_speechbrain",
           "kfold_verification", "min_dcf", "read_trials", "roc_metrics", "speaker_mean_cohort"]
