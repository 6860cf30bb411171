"""Evaluation: plain metric functions over arrays, protocol runners and reports."""
from __future__ import annotations

from mlearn.evaluation.roc import eer_nist, min_dcf, roc_metrics
from mlearn.evaluation.verification import kfold_verification

__all__ = ["eer_nist", "kfold_verification", "min_dcf", "roc_metrics"]
