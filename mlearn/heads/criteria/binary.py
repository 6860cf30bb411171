"""Criteria with their own margins and a learned scalar bias: SphereFace2 and UniFace (binary terms
per class, no softmax normaliser: one SUM all-reduce per step)."""

from __future__ import annotations

import math
from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from mlearn.heads import distributed as D
from mlearn.heads.chunked import StreamedCriterion
from mlearn.heads.criteria.base import Criterion, _finite, _mean, _positive, register_criterion

MAGN_TYPES = ("C", "A", "M")


def softplus_sigmoid_sums(z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(Σ softplus(z), Σ sigmoid(z)) per row of z [B, c] (−inf entries give 0); consumes ``z``.

    Why not ``F.softplus``: torch's softplus and log1p are not vectorised on CPU (~20x slower than exp
    and log). With e = exp(z), u = 1 + e: log1p(e) = log(u)·e/(u − 1) (accurate to a few ulps); a term
    whose e is below half the float epsilon (u = 1: e < 6e-8 in float32) counts 0 in the loss value
    (not in the gradients, which use the sigmoid). Above z = 20, softplus(z) = z + log1p(e^{−z}) is
    taken as z + softplus(20) − 20 (error below e^{−20}).
    """
    over = None
    if z.is_cuda or bool(z.max() > 20.0):  # rare on CPU: skip the extra pass when no entry is above 20
        over = (z - 20.0).clamp_min_(0.0).sum(dim=1)
    # two [B, c] buffers besides z (fresh allocations dominate these cheap elementwise passes on CPU)
    e = z.clamp_(max=20.0).exp_()
    u = e + 1.0
    work = torch.div(e, u)
    sig = work.sum(dim=1)
    ratio = e.div_(torch.sub(u, 1.0, out=work)).nan_to_num_(nan=1.0, posinf=1.0)  # e/(u − 1); 1 at u = 1
    soft = u.log_().mul_(ratio).sum(dim=1)
    return (soft if over is None else soft + over), sig


class _SphereFace2Stream(StreamedCriterion):
    def __init__(self, crit: "SphereFace2", bias: torch.Tensor) -> None:
        self.c, self.b = crit, bias
        self.k = crit.lw / crit.r

    def init_stat(self, rows: int, like: torch.Tensor, linear: bool = False) -> torch.Tensor:
        return like.new_zeros(rows, 2)

    def _z_negative_(self, cos: torch.Tensor) -> torch.Tensor:
        """z = r·G_other(cos) + b of a block, in place (consumes ``cos``); cos <= −1 (and −inf) count
        as −1."""
        c = self.c
        offset = self.b + (c.r * (c.m - 1.0) if c.magn_type == "C" else -c.r)
        return cos.add_(1.0).mul_(0.5).clamp_(min=0.0).pow_(c.t).mul_(2.0 * c.r).add_(offset)

    def accumulate(self, stat: torch.Tensor, logits: torch.Tensor, linear: bool = False) -> torch.Tensor:
        # consumes logits; no mask: a skipped (−inf) entry becomes cos = −1, whose term ``finish``
        # takes back from the row that holds the target
        soft, sig = softplus_sigmoid_sums(self._z_negative_(logits))
        stat[:, 0] += soft
        stat[:, 1] += sig
        return stat

    def finish(self, stat: torch.Tensor, target: torch.Tensor, owner: torch.Tensor,
               group: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        alpha = self.c.alpha
        z = self.c.r * self.c.g_positive(target) + self.b
        skipped = self.c.r * self.c.g_negative(torch.full_like(target, -1.0)) + self.b
        local = stat * (1.0 - alpha)
        terms = (torch.stack([F.softplus(-z), -torch.sigmoid(-z)], dim=1) * alpha
                 - torch.stack([F.softplus(skipped), torch.sigmoid(skipped)], dim=1) * (1.0 - alpha))
        local = local + torch.where(owner[:, None], terms, torch.zeros_like(terms))
        total = _mean(D.all_reduce_sum(local, group)) * self.k
        self.bias_grad = total[1]
        return total[0], stat.new_zeros(stat.shape[0])

    def grad_logits(self, logits: torch.Tensor, state: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        weight = scale * (self.k * (1.0 - self.c.alpha) * self.c.r / max(state.shape[0], 1))
        d = self._z_negative_(logits.clone()).sigmoid_().mul_(weight)
        return d if self.c.straight_through else d.mul_(self.c.g_prime(logits))

    def grad_target(self, target: torch.Tensor, state: torch.Tensor, batch: int) -> torch.Tensor:
        cos = target.detach().clone().requires_grad_()
        with torch.enable_grad():
            g = self.c.g_positive(cos, differentiable=not self.c.straight_through)
            if self.c.straight_through:
                slope = torch.full_like(cos, self.c.r)
            else:
                (slope,) = torch.autograd.grad(g.sum() * self.c.r, cos)
        z = self.c.r * g.detach() + self.b
        return -torch.sigmoid(-z) * slope * (self.k * self.c.alpha / max(batch, 1))


@register_criterion("sphereface2")
class SphereFace2(Criterion):
    """SphereFace2 (Wen et al. 2022; official opensphere code): binary one-vs-all training.

    g(z) = 2((z+1)/2)^t − 1. Adjusted similarities by ``magn_type``: 'C' target g(cos_y) − m, others
    g(cos_j) + m; 'A' target g(cos(min(θ_y + m, π))), others g(cos_j); 'M' target
    g(cos(min(m·θ_y, π))), others g(cos_j). Logits z = r·G + b; loss = (lw/r)·mean over rows of
    [α·softplus(−z_y) + (1−α)·Σ_{j≠y} softplus(z_j)].

    Gradient: ``straight_through=True`` (default, as the official code) back-propagates as if
    z_j = r·cos_j + b (g and the margin under no_grad); ``False`` differentiates the whole formula
    (for 'A'/'M' the target's derivative grows like 1/sin θ_y near θ_y = 0). The bias is always exact.

    Bias init: the value where dL/db = 0 when every cosine is 0, from
    α·σ(−(a_y + b)) = (1−α)(C'−1)·σ(a_i + b) with a_y = r·G_target(0), a_i = r·G_other(0): with
    z = α/((1−α)(C'−1)) and v = e^{a_i+b}, e^{a_y−a_i}·v² + (1−z)·v − z = 0, so
    b = log(2z) − a_i − log(1 − z + sqrt((1−z)² + 4z·e^{a_y−a_i})). C' = max(C·sample_rate, 2).

    Args: alpha (the paper's λ, weight of the positive term), r (scale), m (margin; default by type:
    0.4 for C, 0.5 for A, 1.7 for M), t (g's exponent), lw (loss weight), magn_type ('C', 'A', 'M').
    Sharding: one SUM all-reduce per step (no max, no sum-exp).
    """

    own_margin = True
    name = "sphereface2"

    def __init__(self, alpha: float = 0.7, r: float = 40.0, m: Optional[float] = None, t: float = 3.0,
                 lw: float = 50.0, magn_type: str = "C", straight_through: bool = True) -> None:
        super().__init__()
        if magn_type not in MAGN_TYPES:
            raise ValueError(f"magn_type={magn_type!r}: expected one of {', '.join(MAGN_TYPES)}")
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha={alpha!r}: expected a number in (0, 1) (weight of the positive term)")
        self.alpha = float(alpha)
        self.r = _positive("r", r)
        self.m = _finite("m", {"C": 0.4, "A": 0.5, "M": 1.7}[magn_type] if m is None else m)
        self.t = _positive("t", t)
        self.lw = _positive("lw", lw)
        self.magn_type = magn_type
        self.straight_through = bool(straight_through)
        self.bias = nn.Parameter(torch.zeros(()))

    def g(self, cos: torch.Tensor) -> torch.Tensor:
        return 2.0 * ((cos + 1.0) / 2.0).clamp_min(0.0) ** self.t - 1.0

    def g_prime(self, cos: torch.Tensor) -> torch.Tensor:
        return self.t * ((cos + 1.0) / 2.0).clamp_min(0.0) ** (self.t - 1.0)

    def g_negative(self, cos: torch.Tensor) -> torch.Tensor:
        """G of the non-target entries."""
        return self.g(cos) + self.m if self.magn_type == "C" else self.g(cos)

    def g_positive(self, cos: torch.Tensor, differentiable: bool = False) -> torch.Tensor:
        """G of the target entries; angles clamped at π (the cosine kept off ±1 when differentiable)."""
        if self.magn_type == "C":
            return self.g(cos) - self.m
        eps = 1e-7 if differentiable else 0.0
        theta = torch.acos(cos.clamp(-1.0 + eps, 1.0 - eps))
        shifted = theta + self.m if self.magn_type == "A" else theta * self.m
        return self.g(torch.cos(shifted.clamp(max=math.pi)))

    def configure(self, num_classes: int, sample_rate: float = 1.0) -> None:
        super().configure(num_classes, sample_rate)
        columns = max(num_classes * sample_rate, 2.0)
        zero = torch.zeros((), dtype=torch.float64)
        a_y = self.r * float(self.g_positive(zero))
        a_i = self.r * float(self.g_negative(zero))
        z = self.alpha / ((1.0 - self.alpha) * (columns - 1.0))
        root = math.sqrt((1.0 - z) ** 2 + 4.0 * z * math.exp(a_y - a_i))
        with torch.no_grad():
            self.bias.fill_(math.log(2.0 * z) - a_i - math.log(1.0 - z + root))

    def stream(self, scale: float, x_hat: torch.Tensor, labels: torch.Tensor, group: Any,
               dtype: torch.dtype) -> StreamedCriterion:
        return _SphereFace2Stream(self, self._bias_value(dtype))

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, r={self.r}, m={self.m}, t={self.t}, lw={self.lw}, "
                f"magn_type={self.magn_type}, straight_through={self.straight_through}")


# ---------------------------------------------------------------------------------------- UniFace
class _UniFaceStream(StreamedCriterion):
    def __init__(self, crit: "UniFace", bias: torch.Tensor) -> None:
        self.c, self.b = crit, bias

    def init_stat(self, rows: int, like: torch.Tensor, linear: bool = False) -> torch.Tensor:
        return like.new_zeros(rows, 2)

    def accumulate(self, stat: torch.Tensor, logits: torch.Tensor, linear: bool = False) -> torch.Tensor:
        # consumes logits; a skipped (−inf) entry gives softplus = sigmoid = 0: no mask needed
        soft, sig = softplus_sigmoid_sums(logits.mul_(self.c.s).sub_(self.b))
        stat[:, 0] += soft
        stat[:, 1] -= sig
        return stat

    def finish(self, stat: torch.Tensor, target: torch.Tensor, owner: torch.Tensor,
               group: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        pos = self.c.s * (target - self.c.m) - self.b
        terms = torch.stack([F.softplus(-pos), torch.sigmoid(-pos)], dim=1)
        local = stat * self.c.l + torch.where(owner[:, None], terms, torch.zeros_like(terms))
        total = _mean(D.all_reduce_sum(local, group))
        self.bias_grad = total[1]
        return total[0], stat.new_zeros(stat.shape[0])

    def grad_logits(self, logits: torch.Tensor, state: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        weight = scale * (self.c.l * self.c.s / max(state.shape[0], 1))
        return torch.add(-self.b, logits, alpha=self.c.s).sigmoid_().mul_(weight)

    def grad_target(self, target: torch.Tensor, state: torch.Tensor, batch: int) -> torch.Tensor:
        pos = self.c.s * (target - self.c.m) - self.b
        return -torch.sigmoid(-pos) * (self.c.s / max(batch, 1))


@register_criterion("uniface")
class UniFace(Criterion):
    """UniFace's unified cross-entropy (Zhou et al. 2023; official CVI-SZU code): one learned threshold
    b for every class. pos = s(cos_y − m) − b, neg_j = s·cos_j − b;
    loss = mean over rows of [softplus(−pos) + l·Σ_{j≠y} softplus(neg_j)].

    The official code clamps pos and neg to [−s, s] before the softplus; we do not: softplus is
    computed stably here, and the clamp would only zero the gradient of rows beyond ±s (e.g. a target
    with cos_y < m − 1 + b/s). Bias init log(10·C·r·sample_rate) (C the global class count; ``r`` is
    the official Partial-FC ratio and multiplies the head's own sample rate: leave it at 1 under a
    sampled PartialFC). Sharding: one SUM all-reduce per step.
    """

    own_margin = True
    name = "uniface"

    def __init__(self, s: float = 64.0, m: float = 0.4, l: float = 1.0, r: float = 1.0) -> None:  # noqa: E741
        super().__init__()
        self.s = _positive("s", s)
        self.m = _finite("m", m)
        if isinstance(l, bool) or not (l >= 0 and math.isfinite(l)):
            raise ValueError(f"l={l!r}: expected a finite weight >= 0 of the negative terms")
        self.l = float(l)
        self.r = _positive("r", r)
        self.bias = nn.Parameter(torch.zeros(()))

    def configure(self, num_classes: int, sample_rate: float = 1.0) -> None:
        super().configure(num_classes, sample_rate)
        with torch.no_grad():
            self.bias.fill_(math.log(10.0 * num_classes * self.r * sample_rate))

    def stream(self, scale: float, x_hat: torch.Tensor, labels: torch.Tensor, group: Any,
               dtype: torch.dtype) -> StreamedCriterion:
        return _UniFaceStream(self, self._bias_value(dtype))

    def extra_repr(self) -> str:
        return f"s={self.s}, m={self.m}, l={self.l}, r={self.r}"
