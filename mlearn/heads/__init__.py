"""Margin heads (cosine -> logits) and the Partial FC classifier (sharded, sampled class centers;
exact loss computed over class blocks by :mod:`mlearn.heads.chunked`)."""

from mlearn.heads.margins import (
    AdaFace,
    ArcFace,
    CircleMargin,
    CombinedMargin,
    CosFace,
    CurricularFace,
    ElasticArcFace,
    ElasticCosFace,
    Margin,
    Softmax,
    build_margin,
    list_margins,
    register_margin,
)
from mlearn.heads.partial_fc import PartialFC

__all__ = [
    "AdaFace",
    "ArcFace",
    "CircleMargin",
    "CombinedMargin",
    "CosFace",
    "CurricularFace",
    "ElasticArcFace",
    "ElasticCosFace",
    "Margin",
    "PartialFC",
    "Softmax",
    "build_margin",
    "list_margins",
    "register_margin",
]
