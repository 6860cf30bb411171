"""Criteria base: the registry (``build_criterion``, ``list_criteria``), the :class:`Criterion` module
and small shared helpers. The criteria themselves live in :mod:`~mlearn.heads.criteria.binary` and
:mod:`~mlearn.heads.criteria.softmax_family`."""

from __future__ import annotations

import math
from typing import Any, List, Tuple

import torch
from torch import nn

from mlearn.heads.chunked import StreamedCriterion
from mlearn.registry import Registry

CRITERIA: Registry["Criterion"] = Registry("criterion")
register_criterion = CRITERIA.register


def build_criterion(name: str, **kwargs: Any) -> "Criterion":
    """Build a registered criterion by name (``KeyError`` if unknown, ``TypeError`` on unknown kwargs);
    no kwargs: the official defaults."""
    return CRITERIA.build(name, **kwargs)


def list_criteria() -> List[str]:
    """Registered criterion names, sorted."""
    return CRITERIA.names()


def _positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not (float(value) > 0 and math.isfinite(value)):
        raise ValueError(f"{name}={value!r}: expected a positive finite number")
    return float(value)


def _finite(name: str, value: float) -> float:
    if isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r}: expected a finite number")
    return float(value)


def _kept(logits: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mask of the entries to use [B, c], logits with the skipped (−inf) entries set to 0)."""
    mask = torch.isfinite(logits)
    return mask, torch.where(mask, logits, torch.zeros_like(logits))


def _mean(rows: torch.Tensor) -> torch.Tensor:
    return rows.mean(dim=0) if rows.shape[0] > 0 else rows.new_zeros(rows.shape[1:])


class Criterion(nn.Module):
    """Base class: a loss over the class logits, streamed per step by :meth:`stream`.

    ``own_margin``: True when the criterion works on the cosines with its own margins (the head's
    ``margin`` must then be None); False when it consumes a margin's logits.
    """

    own_margin: bool = False
    name: str = ""

    def __init__(self) -> None:
        super().__init__()
        self.num_classes = 0
        self.sample_rate = 1.0

    def configure(self, num_classes: int, sample_rate: float = 1.0) -> None:
        """Told by the head at construction: C (global) and the sample rate (bias initialisation)."""
        self.num_classes = int(num_classes)
        self.sample_rate = float(sample_rate)

    def stream(self, scale: float, x_hat: torch.Tensor, labels: torch.Tensor, group: Any,
               dtype: torch.dtype) -> StreamedCriterion:
        """The per-step streamed form. scale: the margin's ``s`` (1 for own-margin criteria);
        x_hat [B, D] the normalised global embeddings (detached); labels [B] global class ids."""
        raise NotImplementedError

    def _bias_value(self, dtype: torch.dtype) -> torch.Tensor:
        return self.get_parameter("bias").detach().to(dtype)
