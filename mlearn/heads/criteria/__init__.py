"""Loss criteria on top of the class centers: the seed losses, side by side with the margin softmax CE.

``PartialFC(margin, D, C, ..., criterion=build_criterion("sphereface2"))``; ``criterion=None`` keeps the
margin softmax cross-entropy. Notation: cos_j the cosine between the normalised embedding and center
j, y the label, o_j a margin's logits (s·cos_j, the target's with the margin), B the GLOBAL batch,
softplus(x) = log(1 + eˣ). Every criterion returns the mean over the global batch, the same scalar on
every rank, and streams over class blocks in :mod:`mlearn.heads.chunked` (the default engine):

* ``sphereface2`` (own margin): (lw/r)·[α·sp(−z_y) + (1−α)·Σ_{j≠y} sp(z_j)]; all-reduced: Σ sp(z_j),
  Σ σ(z_j) and the target terms, one SUM call.
* ``uniface`` (own margin): sp(−pos) + l·Σ_{j≠y} sp(neg_j); all-reduced as sphereface2.
* ``unpg`` (consumes a margin): −o_y + log(Σ_j e^{o_j} + Σ_k e^{s·s_k}); max and sum-exp as the
  softmax CE, the pair terms added once.
* ``log_taylor`` (consumes): −log(f(o_y) / Σ_j f(o_j)), f(z) = 1 + z + z²/2; all-reduced: Σ_j f(o_j),
  f(o_y) (SUM).
* ``log_spherical`` (consumes): the same with f(z) = z² + eps.
* ``zloss`` (consumes): (1/a)·sp(a·(b − (o_y − μ)/σ)); all-reduced: Σ o_j, Σ o_j², the column count,
  o_y (SUM).

sp = softplus, σ = the logistic sigmoid. "Own margin": the criterion carries its margin
(``PartialFC(margin=None, ...)``); "consumes": it takes the logits of a margin (ArcFace, CosFace, …).
Sampling (``sample_rate < 1``): each criterion sees the kept columns only (positives always kept):
Σ_j, μ, σ and the count run over them; the bias initialisations use the expected number of columns
C' = C·sample_rate (told by the head through :meth:`Criterion.configure`).

Learned bias: one scalar ``nn.Parameter`` named ``bias`` (SphereFace2, UniFace), replicated on every
rank; its gradient is computed from the global batch and all-reduced by the criterion, so it is the
same on every rank. Under DDP it must stay out of DDP's own reduction
(:meth:`mlearn.heads.PartialFC.replicated_parameter_names`).
"""

from mlearn.heads.criteria.base import CRITERIA, Criterion, build_criterion, list_criteria, register_criterion
from mlearn.heads.criteria.binary import MAGN_TYPES, SphereFace2, UniFace
from mlearn.heads.criteria.dense import dense_criterion_loss
from mlearn.heads.criteria.softmax_family import (
    UNPG,
    LogSphericalSoftmax,
    LogTaylorSoftmax,
    ZLoss,
    unpg_pairs,
)

__all__ = [
    "CRITERIA",
    "MAGN_TYPES",
    "Criterion",
    "LogSphericalSoftmax",
    "LogTaylorSoftmax",
    "SphereFace2",
    "UNPG",
    "UniFace",
    "ZLoss",
    "build_criterion",
    "dense_criterion_loss",
    "list_criteria",
    "register_criterion",
    "unpg_pairs",
]
