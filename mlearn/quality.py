"""Face image quality learned during recognition training (CR-FIQA).

CR-FIQA (Boutros et al., CVPR 2023) regresses each sample's *certainty ratio* from the embedding:
``CR = CCS / (NNCCS + 1 + 1e-9)`` with CCS the (clamped, pre-margin) cosine of the sample to its own
class center and NNCCS the largest (clamped) cosine to any other center in use. The target is detached:
the quality loss trains the regression head and the backbone, never the class centers. The ``+ 1``
keeps the ratio finite for NNCCS ≤ 0 (the official code's ``CCS / NNCCS`` is not).

The head maps the raw embedding [B, D] -> quality [B] (a linear unit plus a weighted norm), so an
exported model computes it from the same output the embedding comes from.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

QUALITY_METHODS = ("cr_fiqa",)
CR_EPS = 1e-9


def certainty_ratio(ccs: torch.Tensor, nnccs: torch.Tensor) -> torch.Tensor:
    """CR [B] from the cosine to the own center ``ccs`` [B] and the nearest other center ``nnccs`` [B]."""
    return ccs / (nnccs + 1.0 + CR_EPS)


class QualityHead(nn.Module):
    """Embedding [B, D] (un-normalised) -> predicted quality [B]: ``fc(x) + norm_weight * ||x||``.

    The norm term lets the head read the embedding's length, which a linear unit alone cannot, and gives
    the joint gradient a radial path: cosine scoring ignores the length. ``norm_weight`` starts at 0.
    """

    def __init__(self, embedding_size: int) -> None:
        super().__init__()
        self.fc = nn.Linear(int(embedding_size), 1)
        self.norm_weight = nn.Parameter(torch.zeros(1))

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.fc(embeddings).squeeze(-1) + self.norm_weight * embeddings.norm(dim=-1)


@dataclass
class QualityConfig:
    """``model.quality``: the quality head and its loss (CR-FIQA's defaults: smooth-L1, beta 0.5, weight 10).

    Args:
        method: ``cr_fiqa``.
        weight: the quality loss's factor in the total loss.
        beta: smooth-L1's transition point.
        lr_scale: the quality head's learning rate relative to the backbone's. The head's gradient is
            ``weight`` times the smooth-L1's, so at the backbone's rate (SGD 0.1, momentum 0.9) a linear
            head on the raw embedding diverges (measured on the synthetic faces: predictions of 1e6
            after 200 steps, and the embedding norm with them); 0.01 trains it stably.
        train_backbone: let the quality loss's gradient into the backbone (CR-FIQA's joint training).
            False stops it at the embedding: only the head learns, and the recogniser is exactly the
            run without a quality head.
    """

    method: str = "cr_fiqa"
    weight: float = 10.0
    beta: float = 0.5
    lr_scale: float = 0.01
    train_backbone: bool = True

    def __post_init__(self) -> None:
        if self.method not in QUALITY_METHODS:
            raise ValueError(f"model.quality.method={self.method!r}: expected one of "
                             f"{', '.join(QUALITY_METHODS)}")
        if not self.weight >= 0:
            raise ValueError(f"model.quality.weight={self.weight}: expected a number >= 0")
        if not self.beta > 0:
            raise ValueError(f"model.quality.beta={self.beta}: expected a positive number")
        if not self.lr_scale > 0:
            raise ValueError(f"model.quality.lr_scale={self.lr_scale}: expected a positive number")

    def loss(self, predicted: torch.Tensor, ccs: torch.Tensor, nnccs: torch.Tensor,
             global_batch: Optional[int] = None) -> torch.Tensor:
        """Weighted smooth-L1 between ``predicted`` [B] and the detached certainty ratio of ``ccs``,
        ``nnccs`` [B]: summed over the B rows and divided by ``global_batch`` (default B, the mean).

        Under DDP pass the global batch size: each rank's term is then its share of the global mean, and
        the summed per-rank gradients (:class:`mlearn.module.EmbeddingModule`) equal one process's.
        """
        target = certainty_ratio(ccs.detach(), nnccs.detach()).to(predicted.dtype)
        count = predicted.shape[0] if global_batch is None else int(global_batch)
        total = F.smooth_l1_loss(predicted, target, beta=self.beta, reduction="sum")
        return self.weight * total / max(count, 1)
