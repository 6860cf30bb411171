"""Criteria on a margin's logits: UNPG (margin softmax + batch negative pairs), the spherical family
(log-Taylor, log-spherical softmax) and the Z-loss."""

from __future__ import annotations

import math
from typing import Any, Tuple

import torch
import torch.nn.functional as F

from mlearn.heads import distributed as D
from mlearn.heads.chunked import SoftmaxCE, StreamedCriterion
from mlearn.heads.criteria.base import Criterion, _finite, _mean, _positive, register_criterion


class _UNPGStream(SoftmaxCE):
    """Softmax CE whose every row's normaliser also holds e^{s·s_k} for the kept batch pairs k."""

    def __init__(self, scale: float, x_hat: torch.Tensor, labels: torch.Tensor, wisk: float, group: Any,
                 dtype: torch.dtype) -> None:
        self.scale = scale
        self.first_rank = D.rank_and_world(group)[0] == 0
        gram = _gram(x_hat.detach().to(dtype))  # [B, B]: no [P, D] copies of the pairs
        self.pairs = _pairs_from_gram(gram, labels, wisk)
        self.pair_logits = scale * gram[self.pairs]

    def add_extra_terms(self, lse: torch.Tensor) -> torch.Tensor:
        if self.pair_logits.numel() == 0:
            return lse
        return torch.logaddexp(lse, torch.logsumexp(self.pair_logits, dim=0))

    def extra_grad_x(self, x_hat: torch.Tensor, state: torch.Tensor, grad_x: torch.Tensor) -> None:
        # added on one rank only: the all-gather's backward sums dL/dx̂ over ranks
        if not self.first_rank or self.pair_logits.numel() == 0 or state.numel() == 0:
            return
        # dL/ds_k = s·e^{s·s_k}·(1/B)·Σ_b e^{−lse_b}, in the log domain
        log_coef = (self.pair_logits + math.log(self.scale) + torch.logsumexp(-state, dim=0)
                    - math.log(state.shape[0]))
        batch = x_hat.shape[0]
        coef = grad_x.new_zeros(batch, batch).index_put_(self.pairs, log_coef.exp().to(grad_x.dtype))
        # s_k = <x̂_i, x̂_j>: dL/dx̂ = (C + Cᵀ)·x̂ with C[i, j] = dL/ds_k
        grad_x.add_((coef + coef.t()) @ x_hat.to(grad_x.dtype))


def _gram(x_hat: torch.Tensor) -> torch.Tensor:
    return x_hat @ x_hat.t()


def _pairs_from_gram(gram: torch.Tensor, labels: torch.Tensor,
                     wisk: float) -> Tuple[torch.Tensor, torch.Tensor]:
    batch = labels.shape[0]
    i, j = torch.triu_indices(batch, batch, offset=1, device=labels.device)
    differ = labels[i] != labels[j]
    i, j = i[differ], j[differ]
    if i.numel() == 0:
        return i, j
    sims = gram[i, j]
    ordered = sims.sort().values
    q1, q3 = ordered[int(0.25 * sims.numel())], ordered[int(0.75 * sims.numel())]
    iqr = q3 - q1
    keep = (sims >= q1 - wisk * iqr) & (sims <= q3 + wisk * iqr)
    return i[keep], j[keep]


@torch.no_grad()
def unpg_pairs(x_hat: torch.Tensor, labels: torch.Tensor, wisk: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """UNPG's kept negative pairs (i [P], j [P]) of the global batch x̂ [B, D], labels [B]: every i < j
    with different labels whose similarity <x̂_i, x̂_j> lies in [Q1 − wisk·IQR, Q3 + wisk·IQR]; Q1, Q3
    the values at sorted indices floor(0.25·l), floor(0.75·l) of the l candidate similarities (no
    interpolation)."""
    return _pairs_from_gram(_gram(x_hat), labels, wisk)


@register_criterion("unpg")
class UNPG(Criterion):
    """Unified Negative Pair Generation (Jung et al. 2023) on a margin softmax: the negative pairs of
    the GLOBAL batch (the official code uses each GPU's local batch only) whose similarity passes the
    box-plot filter (:func:`unpg_pairs`, bounds not differentiated) add e^{s·s_k} to every row's
    softmax normaliser (s the margin's scale). No negative pair: the plain margin CE.

    Sharding: as the softmax CE; every rank computes the same pair terms from the gathered batch and
    adds them once to the all-reduced normaliser; their gradient is added on the group's first rank
    only, so the all-gather's backward counts it once.
    """

    name = "unpg"

    def __init__(self, wisk: float = 1.5) -> None:
        super().__init__()
        if isinstance(wisk, bool) or not (wisk >= 0 and math.isfinite(wisk)):
            raise ValueError(f"wisk={wisk!r}: expected a finite whisker length >= 0 (in IQRs)")
        self.wisk = float(wisk)

    def stream(self, scale: float, x_hat: torch.Tensor, labels: torch.Tensor, group: Any,
               dtype: torch.dtype) -> StreamedCriterion:
        return _UNPGStream(scale, x_hat, labels, self.wisk, group, dtype)

    def extra_repr(self) -> str:
        return f"wisk={self.wisk}"


# ---------------------------------------------------------------------------------------- spherical
class _SphericalStream(StreamedCriterion):
    """−log(f(o_y) / Σ_j f(o_j)) for a positive f; state [B, 2] = (Σ_j f(o_j), f(o_y))."""

    def __init__(self, crit: "_SphericalFamily") -> None:
        self.c = crit
        self.columns = 0

    def init_stat(self, rows: int, like: torch.Tensor, linear: bool = False) -> torch.Tensor:
        return like.new_zeros(rows)

    def accumulate(self, stat: torch.Tensor, logits: torch.Tensor, linear: bool = False) -> torch.Tensor:
        # consumes logits: Σ_j (f(o_j) − f0) with the skipped (−inf) entries giving 0; the constant f0
        # per column is added back in ``finish`` from the column count
        self.columns += logits.shape[1]
        return stat.add_(self.c.f_variable_sum(logits))

    def finish(self, stat: torch.Tensor, target: torch.Tensor, owner: torch.Tensor,
               group: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        f_y = torch.where(owner, self.c.f(target), torch.zeros_like(target))
        non_target = self.columns - owner.to(stat.dtype)
        total = stat + self.c.f_constant * non_target + f_y
        state = D.all_reduce_sum(torch.stack([total, f_y], dim=1), group)
        loss = _mean(torch.log(state[:, 0]) - torch.log(state[:, 1]))
        return loss, state

    def grad_logits(self, logits: torch.Tensor, state: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        inv = torch.reciprocal(state[:, :1] * max(state.shape[0], 1))
        return self.c.f_prime(logits).mul_(inv).mul_(scale)

    def grad_target(self, target: torch.Tensor, state: torch.Tensor, batch: int) -> torch.Tensor:
        slope = self.c.f_prime(target)
        return (slope / state[:, 0] - slope / state[:, 1]) / max(batch, 1)


class _SphericalFamily(Criterion):
    #: f = f_constant + a part that is +inf at z = −inf (summed by :meth:`f_variable_sum`)
    f_constant = 0.0

    def f(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def f_variable_sum(self, z: torch.Tensor) -> torch.Tensor:
        """Σ over columns of f(z) − f_constant per row [B], skipping −inf entries; consumes ``z``."""
        raise NotImplementedError

    def f_prime(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def stream(self, scale: float, x_hat: torch.Tensor, labels: torch.Tensor, group: Any,
               dtype: torch.dtype) -> StreamedCriterion:
        return _SphericalStream(self)


@register_criterion("log_taylor")
class LogTaylorSoftmax(_SphericalFamily):
    """Log-Taylor softmax (de Brébisson & Vincent 2016): f(z) = 1 + z + z²/2 (> 0, minimum 1/2 at
    z = −1) on the margin logits o; loss = −log(f(o_y) / Σ_j f(o_j)).

    Nearly sign-symmetric for large |z|: with s = 64 a class at cos = −1 (f ≈ 1985) weighs as much in
    the normaliser as one at cos = +1 (f ≈ 2113), so non-target classes are pushed towards o = −1
    (cos ≈ −1/64, near orthogonal), not away to cos = −1 as with the exponential.
    Sharding: SUM all-reduce of Σ_j f(o_j) and f(o_y).
    """

    name = "log_taylor"

    f_constant = 0.5  # f(z) = ((z + 1)² + 1)/2

    def f(self, z: torch.Tensor) -> torch.Tensor:
        return 1.0 + z + 0.5 * z * z

    def f_variable_sum(self, z: torch.Tensor) -> torch.Tensor:
        return z.add_(1.0).square_().nan_to_num_(posinf=0.0).sum(dim=1).mul_(0.5)

    def f_prime(self, z: torch.Tensor) -> torch.Tensor:
        return 1.0 + z


@register_criterion("log_spherical")
class LogSphericalSoftmax(_SphericalFamily):
    """Log-spherical softmax (same paper): f(z) = z² + eps; loss = −log(f(o_y) / Σ_j f(o_j)).

    Sign-symmetric: with s = 64 margin logits o and −o weigh the same, so non-target classes are
    pushed to o = 0 (orthogonal), and a target at cos_y = −1 scores as well as one at +1 (only the
    margin breaks the tie). Sharding: SUM all-reduce of Σ_j f(o_j) and f(o_y).
    """

    name = "log_spherical"

    def __init__(self, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = _positive("eps", eps)
        self.f_constant = self.eps

    def f(self, z: torch.Tensor) -> torch.Tensor:
        return z * z + self.eps

    def f_variable_sum(self, z: torch.Tensor) -> torch.Tensor:
        return z.square_().nan_to_num_(posinf=0.0).sum(dim=1)

    def f_prime(self, z: torch.Tensor) -> torch.Tensor:
        return 2.0 * z

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


# ---------------------------------------------------------------------------------------- Z-loss
class _ZLossStream(StreamedCriterion):
    """state [B, 5] = (μ, σ, z_y, dL/dz_y, n)."""

    def __init__(self, crit: "ZLoss") -> None:
        self.c = crit
        self.columns = 0

    def init_stat(self, rows: int, like: torch.Tensor, linear: bool = False) -> torch.Tensor:
        return like.new_zeros(rows, 3)

    def accumulate(self, stat: torch.Tensor, logits: torch.Tensor, linear: bool = False) -> torch.Tensor:
        # consumes logits; the skipped (−inf) entries become 0 (no mask), the count is per column
        self.columns += logits.shape[1]
        o = logits.nan_to_num_(neginf=0.0)
        stat[:, 0] += o.sum(dim=1)
        stat[:, 1] += torch.linalg.vecdot(o, o, dim=1)
        return stat

    def finish(self, stat: torch.Tensor, target: torch.Tensor, owner: torch.Tensor,
               group: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        t = torch.where(owner, target, torch.zeros_like(target))
        columns = torch.full_like(t, float(self.columns))  # every kept column, the target's included
        local = torch.cat([stat + torch.stack([t, t * t, columns], dim=1), t[:, None]], dim=1)
        total = D.all_reduce_sum(local, group)
        n = total[:, 2]
        mu = total[:, 0] / n
        # population variance; the tiny floor only acts when every logit of a row is equal
        sigma = (total[:, 1] / n - mu * mu).clamp_min(torch.finfo(total.dtype).tiny).sqrt()
        z = (total[:, 3] - mu) / sigma
        a, b = self.c.a, self.c.b
        loss = _mean(F.softplus(a * (b - z)) / a)
        dz = -torch.sigmoid(a * (b - z))
        return loss, torch.stack([mu, sigma, z, dz, n], dim=1)

    def grad_logits(self, logits: torch.Tensor, state: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        mu, sigma, z, dz, n = (state[:, k : k + 1] for k in range(5))
        # dz_y/do_j = −1/(nσ) − z_y·(o_j − μ)/(nσ²) for j ≠ y
        d = (logits - mu).mul_(-z / (n * sigma * sigma)).sub_(1.0 / (n * sigma))
        return d.mul_(dz / max(state.shape[0], 1)).mul_(scale)

    def grad_target(self, target: torch.Tensor, state: torch.Tensor, batch: int) -> torch.Tensor:
        mu, sigma, z, dz, n = state.unbind(dim=1)
        slope = (1.0 - 1.0 / n) / sigma - z * (target - mu) / (n * sigma * sigma)
        return dz * slope / max(batch, 1)


@register_criterion("zloss")
class ZLoss(Criterion):
    """The Z-loss (de Brébisson & Vincent 2016), shift and scale invariant, on the margin logits o:
    per row μ = mean_j o_j, σ = population std over the C columns (the kept ones under sampling),
    z_y = (o_y − μ)/σ; loss = mean over rows of (1/a)·softplus(a·(b − z_y)).

    Not the "z-loss" regulariser of PaLM / ST-MoE (a weight times log²Z of the softmax normaliser Z
    added to the cross-entropy): that one keeps the logits' scale small, this one replaces the
    softmax. σ² is computed as E[o²] − μ² in the statistic's dtype (float32 under mixed precision;
    logits |o| <= s keep the cancellation harmless). Sharding: SUM all-reduce of Σ o, Σ o², the
    column count and o_y.
    """

    name = "zloss"

    def __init__(self, a: float = 1.0, b: float = 0.0) -> None:
        super().__init__()
        self.a = _positive("a", a)
        self.b = _finite("b", b)

    def stream(self, scale: float, x_hat: torch.Tensor, labels: torch.Tensor, group: Any,
               dtype: torch.dtype) -> StreamedCriterion:
        return _ZLossStream(self)

    def extra_repr(self) -> str:
        return f"a={self.a}, b={self.b}"
