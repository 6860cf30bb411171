"""Exact margin softmax cross-entropy over class chunks: no [B, C] logits, no normalised copy of W.

:func:`chunked_margin_loss` is the engine behind :class:`mlearn.heads.PartialFC` (``engine="chunked"``).
For the global batch x̂ [B, D] (L2-normalised embeddings) and this rank's centers W [R, D] (R = kept
classes · K sub-centers, un-normalised) it computes the mean margin softmax cross-entropy of the
global batch with two passes over blocks of ``chunk`` classes:

1. statistics: per block, cosines ``(x̂ · W_cᵀ) ⊙ 1/‖w_c‖`` (the inverse row norms scale the GEMM's
   columns, so W is never normalised as a whole), the margin's non-target logits, and an online
   log-sum-exp per row in float32 (float64 for float64 inputs). The target logits are computed once
   per step from the B target cosines. The per-rank log-sum-exp and target logits are all-reduced
   (max, sum) as in :func:`mlearn.heads.distributed.dist_cross_entropy`.
2. gradients: per block, the logits are recomputed, p = softmax, and dL/dlogits = (p − onehot)/B goes
   through the margin (autograd on the block only), the column scaling and the row normalisation of W
   in closed form: dW_c = Dᵀx̂ − (Σ_b D_bc·raw_bc / ‖w_c‖²)·w_c with D = dL/draw, dx̂ += D·W_c.

Why the gradient is computed during the forward pass: the loss is a scalar, so its gradient is known up
to the incoming scale once the normaliser is; computing it right away costs the same four GEMMs as a
recompute in backward but needs no second pass over the margin state (ElasticFace's draws, the step's
statistics). The gradients are kept until ``backward()``; a forward without grad mode (evaluation)
runs pass 1 only. A second backward through the same graph (``retain_graph``) recomputes pass 2.

The margin contract is the one of :class:`mlearn.heads.Margin`, called in pieces: ``update_state``
once per step on the global batch (by :class:`~mlearn.heads.PartialFC`), ``target_logit`` once on the
global target cosines, ``other_logits`` per block (block columns; label −1 where the target is in
another block or on another rank). Margins whose ``other_logits`` is the default (the cosine itself)
and K = 1 take a fast path; margins that give ``other_logits_with_grad`` (CurricularFace, Circle) a
closed-form one; otherwise (sub-centers, straight-through, custom margins) autograd runs on each block.
The cosine clamp to [−1, 1] is applied but not differentiated on the fast paths (it only acts on
rounding).

Certainty (CR-FIQA, ``Step.record_certainty``): pass 1 also keeps each row's largest non-target
clamped cosine (a running max over the blocks, from the logits before the exp on the fast path and
from the cosines before the margin otherwise: no extra GEMM), all-reduced (max) over ranks, next to
the global target cosines; off, it costs nothing.

Mixed precision: under autocast the GEMMs run in the autocast dtype with float32 results (CUDA:
``torch.mm(..., out_dtype=float32)``; CPU: the bf16/fp16 operands are widened first), so s·cosθ logits
are not quantised; the normaliser and the margin are float32. The gradient GEMMs take dL/dlogits in
the autocast dtype; under float16 they are computed before any loss scaler multiplies them, so entries
below float16's range (~6e-8) flush to zero: prefer bfloat16.

The loss is pluggable: a :class:`StreamedCriterion` (one per step) holds the per-row statistic, its
reduction over ranks, dL/dlogits and dL/d(target logit); :class:`SoftmaxCE` is the default. The
criteria of :mod:`mlearn.heads.criteria` stream the same way (SphereFace2 and UniFace on the cosines,
through an identity margin with s = 1; the others on the margin's logits); a criterion with a learned
scalar ``bias`` reports its gradient after ``finish`` (already all-reduced) and UNPG adds the gradient
of its batch-pair terms to dL/dx̂ once (:meth:`StreamedCriterion.extra_grad_x`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import torch

from mlearn.heads import distributed as D
from mlearn.heads.margins import Margin, MarginBatch

#: [B, chunk·K] working tensors alive at once in a block (raw/logits, probabilities, autograd copies)
WORKING_TENSORS = 4
DEFAULT_CHUNK_MB_CPU = 8.0  # 2048 classes at B=256: a block stays in the CPU caches (fastest measured)
DEFAULT_CHUNK_MB_CUDA = 1024.0  # few, large blocks: kernel launches, not memory, limit small ones


def chunk_classes(
    batch: int, num_subcenters: int, itemsize: int, chunk_size: Optional[int], chunk_memory_mb: float
) -> int:
    """Classes per block: ``chunk_size`` when given, else the most that ``chunk_memory_mb`` holds
    (``WORKING_TENSORS`` tensors of [batch, classes·K] elements of ``itemsize`` bytes)."""
    if chunk_size is not None:
        return int(chunk_size)
    per_class = max(batch, 1) * num_subcenters * itemsize * WORKING_TENSORS
    classes = int(chunk_memory_mb * 2**20) // per_class
    if classes < 1:
        raise ValueError(
            f"chunk_memory_mb={chunk_memory_mb}: too small for one class of the global batch "
            f"(B={batch}, K={num_subcenters} needs at least {per_class / 2**20:.3f} MB)"
        )
    return classes


def check_chunk_options(chunk_size: Optional[int], chunk_memory_mb: Optional[float]) -> None:
    """One clear error per bad chunk option (raised at construction)."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or int(chunk_size) != chunk_size
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size={chunk_size!r}: expected a positive number of classes per block "
                         "(or None: derived from chunk_memory_mb)")
    if chunk_memory_mb is not None and not (chunk_memory_mb > 0 and math.isfinite(chunk_memory_mb)):
        raise ValueError(f"chunk_memory_mb={chunk_memory_mb!r}: expected a positive memory budget in MB "
                         "(or None: the device default)")


class StreamedCriterion:
    """One step of a criterion as the engine streams it over class blocks.

    ``init_stat`` / ``accumulate`` build a per-row statistic from the non-target logits of every block
    (−inf marks entries to skip: the target, which enters once through ``finish``); ``finish``
    reduces it over ranks and returns (scalar loss, per-row state [B] or [B, k]); ``grad_logits`` and
    ``grad_target`` give dL/dlogits from that state. ``linear`` (a plain sum of exp instead of a
    running log-sum-exp) is only offered to criteria with ``linear_ok``.
    """

    #: the statistic may be a plain sum of exp(logits) when the logits are bounded (softmax only)
    linear_ok: bool = False
    #: dL/dbias of the global loss after ``finish`` (identical on every rank), or None without a bias
    bias_grad: Optional[torch.Tensor] = None

    def init_stat(self, rows: int, like: torch.Tensor, linear: bool = False) -> torch.Tensor:
        raise NotImplementedError

    def accumulate(self, stat: torch.Tensor, logits: torch.Tensor, linear: bool = False) -> torch.Tensor:
        raise NotImplementedError

    def finish(
        self, stat: torch.Tensor, target: torch.Tensor, owner: torch.Tensor, group: Any
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def grad_logits(self, logits: torch.Tensor, state: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def grad_target(self, target: torch.Tensor, state: torch.Tensor, batch: int) -> torch.Tensor:
        raise NotImplementedError

    def extra_grad_x(self, x_hat: torch.Tensor, state: torch.Tensor, grad_x: torch.Tensor) -> None:
        """Add dL/dx̂ [B, D] of terms that are not class logits (UNPG's pairs); default: none."""


class SoftmaxCE(StreamedCriterion):
    """Softmax cross-entropy as a streamed criterion: per-row log-sum-exp over the non-target logits
    of every block, plus the target logit; mean over the global batch."""

    linear_ok = True

    def init_stat(self, rows: int, like: torch.Tensor, linear: bool = False) -> torch.Tensor:
        return like.new_full((rows,), 0.0 if linear else float("-inf"))

    def accumulate(self, stat: torch.Tensor, logits: torch.Tensor, linear: bool = False) -> torch.Tensor:
        """stat [B] running log-sum-exp (``linear``: running sum of exp, for logits known to be bounded;
        consumes ``logits``), logits [B, c] (−inf at excluded entries) -> updated stat."""
        if logits.shape[1] == 0:
            return stat
        if linear:
            return stat.add_(logits.exp_().sum(dim=1))
        return torch.logaddexp(stat, torch.logsumexp(logits, dim=1))

    def finish(
        self, stat: torch.Tensor, target: torch.Tensor, owner: torch.Tensor, group: Any
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """-> (scalar loss, per-row state for the gradients: the global log-sum-exp [B]).

        target [B]: target logits on the rows whose target this rank holds (``owner``), else ignored.
        """
        local = torch.where(owner, torch.logaddexp(stat, target), stat)
        row_max = D.all_reduce_max(local, group)
        safe_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        lse = self.add_extra_terms(safe_max + torch.log(D.all_reduce_sum(torch.exp(local - safe_max), group)))
        target_all = D.all_reduce_sum(torch.where(owner, target, torch.zeros_like(target)), group)
        rows = lse.shape[0]
        loss = (lse - target_all).mean() if rows > 0 else lse.new_zeros(())
        return loss, lse

    def add_extra_terms(self, lse: torch.Tensor) -> torch.Tensor:
        """The global log-sum-exp [B] with terms beyond the class logits (UNPG); default: as is."""
        return lse

    def grad_logits(self, logits: torch.Tensor, lse: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """dL/dlogits ⊙ ``scale`` (per column [c]) of the non-target entries of a block, a new tensor
        (−inf entries give 0; the caller zeroes the target entries)."""
        return torch.sub(logits, lse[:, None]).exp_().mul_(scale / max(lse.shape[0], 1))

    def grad_target(self, target: torch.Tensor, lse: torch.Tensor, batch: int) -> torch.Tensor:
        """dL/d(target logit) [N] of N rows (``lse`` their log-sum-exp) of a global batch of ``batch``."""
        return (torch.exp(target - lse) - 1.0) / max(batch, 1)


@dataclass
class Step:
    """Everything one training step of the chunked head needs (built by PartialFC.forward).

    ``index``: this rank's kept class indices (sorted) or None for all ``num_local`` classes;
    ``labels``: [B] each row's target column in the kept classes, −1 when another rank holds it.
    """

    margin: Margin
    labels: torch.Tensor
    norms: torch.Tensor  # [B] detached embedding norms (float32/64)
    index: Optional[torch.Tensor]
    num_local: int
    num_subcenters: int
    chunk: int
    straight_through: bool
    generator: Optional[torch.Generator]
    group: Any
    compute_dtype: torch.dtype  # GEMM operands (the autocast dtype or the weight's)
    stat_dtype: torch.dtype  # cosines, margin, normaliser
    criterion: StreamedCriterion
    #: record each row's target cosine and largest non-target cosine (CR-FIQA) into ``certainty``
    record_certainty: bool = False
    #: after the forward when recording: (CCS [B], NNCCS [B]) of the global batch, detached; NNCCS is
    #: the all-reduced max over the kept classes of every rank (−1 when no other class is in use)
    certainty: Optional[Tuple[torch.Tensor, torch.Tensor]] = None


def _matmul(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """a [n, k] · b [k, m] -> [n, m] in ``out_dtype``, accumulated in at least that precision."""
    if a.dtype == out_dtype:
        return a @ b
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=out_dtype)
        except (RuntimeError, TypeError):  # older torch: no out_dtype; widen the operands instead
            pass
    return a.to(out_dtype) @ b.to(out_dtype)


def _block_rows(
    weight: torch.Tensor, step: Step, lo: int, hi: int
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Weight rows of kept classes [lo, hi) (a view for the full FC, a gathered copy when sampling)
    and their class indices (None for the full FC)."""
    k = step.num_subcenters
    if step.index is None:
        return weight[lo * k : hi * k], None
    classes = step.index[lo:hi]
    dim = weight.shape[1]
    return weight.view(step.num_local, k, dim)[classes].reshape(-1, dim), classes


def _has_default_others(margin: Margin) -> bool:
    return type(margin).other_logits is Margin.other_logits


class _Engine:
    """The two passes of one step (see the module docstring)."""

    def __init__(self, step: Step, x_hat: torch.Tensor, weight: torch.Tensor) -> None:
        self.step = step
        self.x_hat = x_hat  # [B, D] stat dtype, detached
        self.x_compute = x_hat.to(step.compute_dtype)
        self.weight = weight  # [R, D] detached (master dtype)
        self.batch = x_hat.shape[0]
        self.num_kept = step.num_local if step.index is None else step.index.numel()
        self.inv_norm = torch.empty(self.num_kept * step.num_subcenters, dtype=step.stat_dtype,
                                    device=weight.device)
        self.fast = step.num_subcenters == 1 and _has_default_others(step.margin)
        self.closed_form = (step.num_subcenters == 1 and not step.straight_through
                            and type(step.margin).other_logits_with_grad is not Margin.other_logits_with_grad)
        self.owner = step.labels >= 0
        # running max of the non-target clamped cosines per row (only when recording)
        self.nearest: Optional[torch.Tensor] = (
            x_hat.new_full((self.batch,), float("-inf")) if step.record_certainty else None)

    # ------------------------------------------------------------------ target part (once per step)
    def target_cosines(self) -> None:
        """Each owned row's target cosine (autograd leaves kept for the gradient) and the global [B]."""
        step, k = self.step, self.step.num_subcenters
        rows = torch.nonzero(self.owner).squeeze(1)
        cols = step.labels[rows]
        classes = cols if step.index is None else step.index[cols]
        dim = self.weight.shape[1]
        w = self.weight.view(-1, k, dim)[classes].to(step.stat_dtype)  # [N, K, D]
        self.t_rows, self.t_classes = rows, classes
        self.t_x = self.x_hat[rows].clone().requires_grad_()
        self.t_w = w.requires_grad_()
        with torch.enable_grad():
            normalized = self.t_w / self.t_w.norm(dim=2, keepdim=True).clamp_min(1e-12)
            cos = torch.einsum("nd,nkd->nk", self.t_x, normalized).amax(dim=1).clamp(-1.0, 1.0)
        self.t_cos = cos
        target = self.x_hat.new_zeros(self.batch).index_put((rows,), cos.detach())
        self.target_cosine = D.all_reduce_sum(target, step.group)

    def global_batch(self) -> MarginBatch:
        """The step's batch as the margin sees it for ``update_state`` and ``target_logit``."""
        step = self.step
        labels = torch.where(self.owner, torch.zeros_like(step.labels), step.labels.new_full((), -1))
        known = torch.ones(self.batch, dtype=torch.bool, device=self.x_hat.device)
        return MarginBatch(self.target_cosine[:, None], labels, self.t_rows, step.norms,
                           self.target_cosine, known, step.generator)

    def target_logits(self) -> None:
        step = self.step
        s = step.margin.s
        with torch.enable_grad():
            logit = step.margin.target_logit(self.t_cos, self.global_batch()) * s
            if step.straight_through:
                plain = self.t_cos * s
                logit = plain + (logit - plain).detach()
        self.t_logit = logit
        self.target = self.x_hat.new_zeros(self.batch).index_put((self.t_rows,), logit.detach())

    # ------------------------------------------------------------------ blocks
    def _raw(self, w_rows: torch.Tensor) -> torch.Tensor:
        return _matmul(self.x_compute, w_rows.to(self.step.compute_dtype).t(), self.step.stat_dtype)

    def _in_block(self, lo: int, hi: int) -> Tuple[torch.Tensor, torch.Tensor]:
        labels = self.step.labels
        rows = torch.nonzero((labels >= lo) & (labels < hi)).squeeze(1)
        return rows, labels[rows] - lo

    def _block_batch(self, cos: torch.Tensor, lo: int, hi: int) -> MarginBatch:
        labels = self.step.labels
        inside = (labels >= lo) & (labels < hi)
        local = torch.where(inside, labels - lo, labels.new_full((), -1))
        rows = torch.nonzero(inside).squeeze(1)
        known = torch.ones(self.batch, dtype=torch.bool, device=cos.device)
        return MarginBatch(cos, local, rows, self.step.norms, self.target_cosine, known, self.step.generator)

    def _general_logits(self, raw: torch.Tensor, lo: int, hi: int, inplace: bool = False) -> torch.Tensor:
        """Margin non-target logits of the block [B, hi−lo] from raw GEMM output (autograd-tracked
        unless ``inplace``: then ``raw`` is consumed, and the non-target cosines are tracked when
        recording)."""
        step, k = self.step, self.step.num_subcenters
        inv = self.inv_norm[lo * k : hi * k]
        cos = raw.mul_(inv) if inplace else raw * inv
        if k > 1:
            cos = cos.view(self.batch, hi - lo, k).amax(dim=2)
        cos = cos.clamp_(-1.0, 1.0) if inplace else cos.clamp(-1.0, 1.0)
        if inplace and self.nearest is not None:
            self._track_nearest(cos, *self._in_block(lo, hi))
        others = step.margin.other_logits(self._block_batch(cos, lo, hi))
        if step.straight_through:
            others = cos + (others - cos).detach()
        return others.mul_(step.margin.s) if inplace and others is not cos else others * step.margin.s

    def _closed_form_grad(self, raw: torch.Tensor, lo: int, hi: int, lse: torch.Tensor,
                          rows: torch.Tensor, cols: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(dL/draw, Σ_b dL/draw·raw) of a block from the margin's ``other_logits_with_grad`` (K = 1);
        consumes ``raw``.

        The clamp of the cosine to [−1, 1] is not differentiated here (it only acts on rounding).
        """
        step = self.step
        inv = self.inv_norm[lo:hi]
        cos = raw.mul_(inv).clamp_(-1.0, 1.0)  # raw is not needed again: Σ_b D·raw = Σ_b D·cos / inv
        pair = step.margin.other_logits_with_grad(self._block_batch(cos, lo, hi))
        assert pair is not None  # checked by _Engine.closed_form
        others, deriv = pair
        column_scale = inv * step.margin.s
        d_raw = step.criterion.grad_logits(others.mul_(step.margin.s), lse, column_scale)
        d_raw[rows, cols] = 0.0
        d_raw.mul_(deriv)
        return d_raw, torch.linalg.vecdot(d_raw, cos, dim=0).div_(inv)

    def _track_nearest(self, cos: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> None:
        """Fold the block's largest non-target cosine of ``cos`` [B, c] into ``nearest``; the target
        entries (rows, cols) are skipped and left as they were."""
        assert self.nearest is not None
        if cos.shape[1] == 0:
            return
        saved = cos[rows, cols]
        cos[rows, cols] = float("-inf")
        block_max = cos.amax(dim=1)
        cos[rows, cols] = saved
        torch.maximum(self.nearest, block_max, out=self.nearest)

    def certainty(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(CCS [B], NNCCS [B]) of the global batch after pass 1: NNCCS all-reduced (max) over ranks and
        clamped to [−1, 1] (−1 when no rank holds another kept class)."""
        assert self.nearest is not None
        nearest = D.all_reduce_max(self.nearest, self.step.group).clamp(-1.0, 1.0)
        return self.target_cosine.clone(), nearest

    def statistics(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Pass 1 -> (loss, global log-sum-exp [B])."""
        step = self.step
        k, s = step.num_subcenters, step.margin.s
        # every fast-path logit lies in [−s, s]: sum exp(logit) directly when that cannot overflow
        # or underflow (s = 64 in float32), saving the running max of a log-sum-exp
        limit = 85.0 if step.stat_dtype == torch.float32 else 700.0
        linear = self.fast and step.criterion.linear_ok and s + math.log(max(self.num_kept, 1)) + 1.0 < limit
        stat = step.criterion.init_stat(self.batch, self.x_hat, linear)
        for lo in range(0, self.num_kept, step.chunk):
            hi = min(lo + step.chunk, self.num_kept)
            w_rows, _ = _block_rows(self.weight, step, lo, hi)
            norms = torch.linalg.vector_norm(w_rows, dim=1, dtype=step.stat_dtype)
            inv = norms.clamp_min_(1e-12).reciprocal_()
            self.inv_norm[lo * k : hi * k] = inv
            raw = self._raw(w_rows)
            if self.fast:
                logits = raw.mul_(inv * s)
            else:
                logits = self._general_logits(raw, lo, hi, inplace=True)
            rows, cols = self._in_block(lo, hi)
            logits[rows, cols] = float("-inf")  # the target enters once, from the target part
            if self.fast and self.nearest is not None and logits.shape[1] > 0:
                # fast path: logits = s·cos (unclamped; the clamp is applied to the reduced max)
                torch.maximum(self.nearest, logits.amax(dim=1) / s, out=self.nearest)
            stat = step.criterion.accumulate(stat, logits, linear)
        if linear:
            stat = torch.log(stat)
        if self.nearest is not None:
            step.certainty = self.certainty()
        return step.criterion.finish(stat, self.target, self.owner, step.group)

    def gradients(self, lse: torch.Tensor, need_x: bool, need_w: bool) -> Tuple[Optional[torch.Tensor],
                                                                                 Optional[torch.Tensor]]:
        """Pass 2 -> (dL/dx̂ [B, D], dL/dW [R, D] with zero rows for unsampled classes)."""
        step = self.step
        k, s = step.num_subcenters, step.margin.s
        grad_x = torch.zeros_like(self.x_hat)
        weight = self.weight
        if step.index is None:
            grad_w = torch.empty_like(weight)
        else:
            grad_w = torch.zeros_like(weight)
        grad_w_k = grad_w.view(step.num_local, k, weight.shape[1])
        cd = step.compute_dtype
        for lo in range(0, self.num_kept, step.chunk):
            hi = min(lo + step.chunk, self.num_kept)
            w_rows, classes = _block_rows(weight, step, lo, hi)
            inv = self.inv_norm[lo * k : hi * k]
            raw = self._raw(w_rows)
            rows, cols = self._in_block(lo, hi)
            d_raw: Optional[torch.Tensor] = None
            col_dot: Optional[torch.Tensor] = None
            if self.fast:
                column_scale = inv * s
                logits = raw.mul_(column_scale)
                d_raw = step.criterion.grad_logits(logits, lse, column_scale)
                d_raw[rows, cols] = 0.0
                # Σ_b D_bc·raw_bc = Σ_b D_bc·logits_bc / (s·inv_c)
                col_dot = torch.linalg.vecdot(d_raw, logits, dim=0).div_(column_scale)
            elif self.closed_form:
                d_raw, col_dot = self._closed_form_grad(raw, lo, hi, lse, rows, cols)
            if d_raw is None:
                raw_leaf = raw.requires_grad_()
                with torch.enable_grad():
                    logits = self._general_logits(raw_leaf, lo, hi)
                    probs = step.criterion.grad_logits(logits.detach(), lse, logits.new_ones(()))
                    probs[rows, cols] = 0.0
                    (d_raw,) = torch.autograd.grad(logits, raw_leaf, probs)
                raw = raw_leaf.detach()
                col_dot = torch.linalg.vecdot(d_raw, raw, dim=0)
                del logits, probs
            assert d_raw is not None and col_dot is not None
            d_raw_c = d_raw.to(cd)
            if need_x:
                grad_x.add_(_matmul(d_raw_c, w_rows.to(cd), grad_x.dtype))
            if need_w:
                coef = (col_dot * inv * inv).to(grad_w.dtype)
                if classes is None and d_raw_c.dtype == grad_w.dtype:
                    block = torch.mm(d_raw_c.t(), self.x_compute, out=grad_w[lo * k : hi * k])
                else:
                    block = _matmul(d_raw_c.t(), self.x_compute, grad_w.dtype)
                block.addcmul_(w_rows.to(grad_w.dtype), coef[:, None], value=-1.0)
                if classes is not None:
                    grad_w_k[classes] = block.view(-1, k, weight.shape[1])
                elif block.data_ptr() != grad_w[lo * k :].data_ptr():
                    grad_w[lo * k : hi * k] = block
        self._target_gradients(lse, grad_x, grad_w_k, need_x, need_w)
        if need_x:
            step.criterion.extra_grad_x(self.x_hat, lse, grad_x)
        return (grad_x if need_x else None), (grad_w if need_w else None)

    def _target_gradients(self, lse: torch.Tensor, grad_x: torch.Tensor, grad_w_k: torch.Tensor,
                          need_x: bool, need_w: bool) -> None:
        if self.t_rows.numel() == 0:
            return
        d_logit = self.step.criterion.grad_target(self.t_logit.detach(), lse[self.t_rows], self.batch)
        with torch.enable_grad():
            gx, gw = torch.autograd.grad(self.t_logit, (self.t_x, self.t_w), d_logit, retain_graph=True)
        if need_x:
            grad_x.index_add_(0, self.t_rows, gx.to(grad_x.dtype))
        if need_w:
            grad_w_k.index_put_((self.t_classes,), gw.to(grad_w_k.dtype), accumulate=True)


class _ChunkedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x_hat: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                engine: _Engine, need_x: bool, need_w: bool) -> torch.Tensor:
        loss, lse = engine.statistics()
        bias_grad = engine.step.criterion.bias_grad
        ctx.bias_grad = None if bias is None or bias_grad is None else bias_grad.to(bias.dtype)
        ctx.engine, ctx.lse = engine, lse
        ctx.grads = engine.gradients(lse, need_x, need_w) if (need_x or need_w) else None
        return loss

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        grads = ctx.grads
        ctx.grads = None  # drop our reference: autograd then keeps the tensor as .grad without a copy
        if grads is None:  # a second backward (retain_graph): recompute pass 2
            with torch.autocast(device_type=ctx.engine.weight.device.type, enabled=False):
                grads = ctx.engine.gradients(ctx.lse, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        if not bool(grad == 1):  # e.g. a loss scaler: scale in place (the tensors are ours alone now)
            grads = tuple(None if g is None else g.mul_(grad.to(g.dtype)) for g in grads)
        bias_grad = None if ctx.bias_grad is None else ctx.bias_grad * grad.to(ctx.bias_grad.dtype)
        return grads[0], grads[1], bias_grad, None, None, None


def chunked_margin_loss(x_hat: torch.Tensor, weight: torch.Tensor, step: Step,
                        update_margin: bool, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Scalar mean loss of the global batch (``step.criterion``, default the margin softmax CE); exact
    gradients for ``x_hat``, ``weight`` and the criterion's scalar ``bias``.

    x_hat: [B, D] L2-normalised global embeddings (gradient flows to them); weight: [num_local·K, D]
    this rank's centers (un-normalised). ``update_margin``: call the margin's ``update_state`` once
    (train mode) on the global batch, before the formulas. ``bias``: the criterion's learned scalar
    (its value is read by the streamed criterion; here it only receives the gradient).
    """
    grad_mode = torch.is_grad_enabled()
    need_x = grad_mode and x_hat.requires_grad
    need_w = grad_mode and weight.requires_grad
    with torch.autocast(device_type=weight.device.type, enabled=False):
        engine = _Engine(step, x_hat.detach().to(step.stat_dtype), weight.detach())
        engine.target_cosines()
        if update_margin:
            with torch.no_grad():
                step.margin.update_state(engine.global_batch())
        engine.target_logits()
        return _ChunkedLoss.apply(x_hat, weight, bias, engine, need_x, need_w)


__all__: List[str] = [
    "SoftmaxCE",
    "Step",
    "StreamedCriterion",
    "check_chunk_options",
    "chunk_classes",
    "chunked_margin_loss",
    "DEFAULT_CHUNK_MB_CPU",
    "DEFAULT_CHUNK_MB_CUDA",
]
