"""Partial FC: the (sharded, optionally sampled) class-center matrix + margin + softmax cross-entropy.

One classifier class covers the full FC (``sample_rate=1.0`` on one process), the model-parallel
sharded FC of arcface_torch and its negative-class sampling.
"""

from __future__ import annotations

import logging
import math
from contextlib import nullcontext
from typing import Any, ContextManager, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from mlearn.heads import chunked as C
from mlearn.heads import distributed as D
from mlearn.heads.criteria import Criterion, build_criterion, dense_criterion_loss
from mlearn.heads.margins import Margin, Softmax
from mlearn.heads.row_step import step_rows

log = logging.getLogger(__name__)

_INIT_CHUNK = 1 << 16  # rows per independently seeded chunk of the initial centers
ENGINES = ("chunked", "dense")
_COSINE_LOGITS = Softmax(s=1.0)  # the engine's margin for criteria with their own margins: logits = cos


def shard_range(num_classes: int, rank: int, world_size: int) -> Tuple[int, int]:
    """(first class id, number of classes) of ``rank``'s contiguous block; the first C mod W ranks get
    one extra class (arcface_torch's split)."""
    base, extra = divmod(num_classes, world_size)
    return base * rank + min(rank, extra), base + (1 if rank < extra else 0)


class PartialFC(nn.Module):
    """Margin-based softmax classifier with class centers sharded over ranks and optional sampling.

    ``loss = head(embeddings [B_r, D], labels [B_r])``: embeddings un-normalised, labels global class
    ids in [0, num_classes). Returns the mean softmax cross-entropy (or the ``criterion``'s loss) over
    the GLOBAL batch (all ranks), the same scalar on every rank.

    Distributed (``torch.distributed`` initialised, W ranks in ``process_group``): rank r holds the
    contiguous block ``[class_start, class_start + num_local)`` of the centers as ``weight``
    [num_local·K, D] (K = ``num_subcenters``, rows class-major). Embeddings and labels are all-gathered
    (the gradient flows back to the rank that owns the sample), every rank computes the logits of the
    global batch against its block, and the softmax normaliser is all-reduced (max, sum) in float32,
    also under autocast. Without ``torch.distributed`` it is a single shard.

    Gradients: after ``loss.backward()`` each rank's embedding gradient and ``weight`` gradient are
    the exact gradients of the global loss (for ``sample_rate=1``; with sampling, of the sampled
    loss). A backbone wrapped in DDP therefore needs the SUM of its per-rank gradients, while DDP
    averages over the W ranks: install an all-reduce-SUM communication hook (or multiply the
    backbone gradients by W). ``weight`` differs per rank: list :meth:`sharded_parameter_names` in
    DDP's ignore list so that DDP neither broadcasts nor averages it. The margin's buffers are
    identical on every rank (they are computed from the global batch).

    Sampling (``sample_rate < 1``): per step each rank keeps ``max(floor(sample_rate·num_local),
    #positives in its block)`` classes, always including every class of the global batch that it
    holds; the rest are drawn uniformly from its block with a generator seeded by (``seed``,
    ``sample_step``, rank): independent per rank, so the union over ranks is uniform (not the same
    local offsets on every rank), and reproducible: the same triple gives the same draw, also after a
    resume. ``sample_step`` counts the sampled training calls unless the owner sets it before each
    call (:class:`mlearn.module.EmbeddingModule` derives it from the global step). ``last_sample_index``
    holds the kept local class indices of the last training step. In ``eval()`` mode every class is
    used. As in arcface_torch's PartialFC_V2, ``weight.grad`` is dense with zero rows for the
    unsampled classes, so an optimizer still moves those rows: SGD momentum keeps applying their
    velocity (decaying by the momentum factor each step) and weight decay shrinks them every step,
    as if they had been sampled with a zero loss gradient. ``update_unsampled=False`` gives arcface_torch
    v1's behaviour instead: only the rows sampled since the last optimizer step move, their optimizer
    state included, when the step runs inside :meth:`step_sampled_rows` (:class:`mlearn.module.
    EmbeddingModule` does that); the other rows and their state stay exactly as they were. Optimizers
    with a step count (Adam) count steps per parameter, not per row.

    Engine (``engine="chunked"``, the default): the loss and its exact gradients are computed over
    blocks of classes (:mod:`mlearn.heads.chunked`): no [B, C] logits tensor and no normalised copy
    of the centers; the block size comes from ``chunk_size`` or the ``chunk_memory_mb`` budget and
    changes the result only by float rounding. ``engine="dense"`` is the reference computation
    (margin on the full [B, C_local] cosine matrix, autograd); a margin that is not a
    :class:`~mlearn.heads.Margin`, or overrides ``forward``, always uses it.

    Certainty (CR-FIQA targets, :mod:`mlearn.quality`): with ``record_certainty`` every forward leaves
    ``last_certainty = (ccs, nnccs)``, detached, for THIS rank's rows [B_r] (in its input order):
    ``ccs`` the clamped cosine to the sample's own class (max over its sub-centers), ``nnccs`` the
    largest clamped cosine to any other class in use, both before the margin (for criteria with their
    own margins: the cosines). "In use": every class in ``eval()`` mode or without sampling; with
    sampling only the classes kept this step (on every rank), so NNCCS is a max over a random subset.
    Under sharding NNCCS is the GLOBAL max (all-reduced over ranks): the same as on one process. Rows
    with no other class in use get −1; ``last_global_batch`` is the global batch size. Both engines
    record it without an extra GEMM (one small collective for the row offsets); off (the default)
    nothing is computed.

    Collectives: when distributed, construction (shared initialisation seed), ``forward`` and
    ``state_dict()`` are collective calls: every rank of ``process_group`` must make them.

    Checkpoints: ``state_dict()`` stores the full [num_classes·K, D] matrix, gathered block by block
    into rank 0's CPU memory (a collective call, so every rank must call it); the other ranks get an
    empty [0, D] placeholder, since only rank 0 writes a checkpoint (:meth:`gather_rows`). On one
    process it is the parameter itself, as for any module. ``load_state_dict()`` takes this rank's
    rows of the full matrix, so a checkpoint saved on W ranks loads on any W'.

    Args:
        margin: turns cosines into logits (:class:`mlearn.heads.Margin`).
        embedding_size: D.
        num_classes: C (global).
        sample_rate: fraction of each rank's classes used per training step (1.0: all).
        num_subcenters: K centers per class; a class's cosine is the max over its K centers
            (Sub-center ArcFace).
        straight_through: use the margin's logits in the forward pass but back-propagate as if the
            logits were s·cosθ (arcface_torch's ``no_grad`` ArcFace). Not the exact gradient; off by default.
        init_std: centers are initialised N(0, init_std), identically for any world size.
        process_group: the ranks sharing the centers (default: the whole world when initialised).
        seed: base seed of the negative-class sampling (default: the seed of the initial centers,
            drawn from the default generator and shared by all ranks).
        engine: ``"chunked"`` (default) or ``"dense"`` (see above).
        chunk_size: classes per block of the chunked engine (default: from ``chunk_memory_mb``).
        chunk_memory_mb: memory budget of one block's working tensors (default: 8 MB on CPU,
            1024 MB on CUDA); ignored when ``chunk_size`` is given.
        criterion: the loss on the logits (:mod:`mlearn.heads.criteria`; a module or a registered
            name): None keeps the margin softmax cross-entropy, bit for bit. ``sphereface2`` and
            ``uniface`` carry their own margins (``margin=None``); the others consume the margin's
            logits. The criterion is told C and ``sample_rate`` here; its scalar ``bias`` (if any) is
            replicated and its gradient all-reduced by the criterion
            (:meth:`replicated_parameter_names`: keep it out of DDP).
        record_certainty: record ``last_certainty`` on every forward (see Certainty above).
        update_unsampled: with ``sample_rate < 1``, True (arcface_torch v2): the optimizer moves every
            center; False (v1): only the sampled ones, through :meth:`step_sampled_rows`.
    """

    def __init__(
        self,
        margin: Margin,
        embedding_size: int,
        num_classes: int,
        sample_rate: float = 1.0,
        num_subcenters: int = 1,
        straight_through: bool = False,
        init_std: float = 0.01,
        process_group: Optional[Any] = None,
        seed: Optional[int] = None,
        engine: str = "chunked",
        chunk_size: Optional[int] = None,
        chunk_memory_mb: Optional[float] = None,
        criterion: Optional[Any] = None,
        record_certainty: bool = False,
        update_unsampled: bool = True,
    ) -> None:
        super().__init__()
        criterion = _check_criterion(margin, criterion)
        if criterion is None and not isinstance(margin, nn.Module):
            raise TypeError(
                f"margin: expected an nn.Module (e.g. mlearn.heads.ArcFace), got {type(margin).__name__}"
            )
        if embedding_size < 1:
            raise ValueError(f"embedding_size={embedding_size}: expected a positive integer")
        if num_classes < 2:
            raise ValueError(f"num_classes={num_classes}: a classifier needs at least 2 classes "
                             "(with one class the softmax loss is 0 whatever the embeddings)")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate={sample_rate}: expected a number in (0, 1]")
        if num_subcenters < 1:
            raise ValueError(f"num_subcenters={num_subcenters}: expected a positive integer")
        if straight_through and not hasattr(margin, "s"):
            raise ValueError("straight_through=True needs a margin with a scale attribute `s`")
        if engine not in ENGINES:
            raise ValueError(f"engine={engine!r}: expected one of {', '.join(ENGINES)}")
        C.check_chunk_options(chunk_size, chunk_memory_mb)
        self.engine = engine
        self.chunk_size = None if chunk_size is None else int(chunk_size)
        self.chunk_memory_mb = None if chunk_memory_mb is None else float(chunk_memory_mb)
        self.margin = margin
        self.criterion = criterion
        if criterion is not None:
            criterion.configure(int(num_classes), float(sample_rate))
        self.embedding_size = int(embedding_size)
        self.num_classes = int(num_classes)
        self.sample_rate = float(sample_rate)
        self.num_subcenters = int(num_subcenters)
        self.straight_through = bool(straight_through)
        self.init_std = float(init_std)
        self.process_group = process_group
        self.rank, self.world_size = D.rank_and_world(process_group)
        self.class_start, self.num_local = shard_range(self.num_classes, self.rank, self.world_size)
        shared_seed = int(D.shared_generator(self.process_group).initial_seed())
        self.weight = nn.Parameter(self._initial_weight(shared_seed))
        self.sample_seed = int(shared_seed if seed is None else seed)
        self.sample_step = 0
        self.last_sample_index: Optional[torch.Tensor] = None
        self.record_certainty = bool(record_certainty)
        self.update_unsampled = bool(update_unsampled)
        #: [num_local] True for the classes sampled since the last :meth:`step_sampled_rows` (v1 only)
        self._sampled_since_step: Optional[torch.Tensor] = None
        self.last_certainty: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self.last_global_batch = 0  # rows of the last forward's global batch (all ranks)
        self.register_state_dict_post_hook(_gather_weight_hook)
        self.register_load_state_dict_pre_hook(_slice_weight_hook)

    def sharded_parameter_names(self) -> List[str]:
        """Parameters that differ per rank (names relative to this module): exclude them from DDP."""
        return ["weight"]

    def replicated_parameter_names(self) -> List[str]:
        """Parameters identical on every rank whose gradient the head all-reduces itself (the
        criterion's ``bias``): exclude them from DDP too, or DDP would reduce them a second time."""
        if self.criterion is None:
            return []
        return [f"criterion.{name}" for name, _ in self.criterion.named_parameters()]

    def sharded_buffer_names(self) -> List[str]:
        """Buffers that differ per rank: none (margin statistics are computed on the global batch)."""
        return []

    def gather_rows(self, local: torch.Tensor) -> torch.Tensor:
        """This rank's rows [num_local·K, ...] -> the full [num_classes·K, ...] on rank 0's CPU, an
        empty [0, ...] placeholder on the other ranks (collective call); ``local`` itself on one rank.

        Rows are gathered block by block (:func:`mlearn.heads.distributed.gather_to_root`): no rank
        holds the full matrix on its device, and only rank 0 holds it at all.
        """
        if self.world_size == 1:
            return local
        full = D.gather_to_root(local, self.process_group)
        return full if full is not None else local.detach().new_empty((0,) + tuple(local.shape[1:]))

    def local_rows(self, full: torch.Tensor) -> torch.Tensor:
        """The full [num_classes·K, ...] -> this rank's rows [num_local·K, ...]."""
        k = self.num_subcenters
        start = self.class_start * k
        return full[start : start + self.num_local * k]

    def extra_repr(self) -> str:
        return (
            f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
            f"sample_rate={self.sample_rate}, num_subcenters={self.num_subcenters}, "
            f"straight_through={self.straight_through}, update_unsampled={self.update_unsampled}, "
            f"engine={self.engine}, "
            f"record_certainty={self.record_certainty}, shard=[{self.class_start}, "
            f"{self.class_start + self.num_local}) of rank {self.rank}/{self.world_size}"
        )

    def _initial_weight(self, seed: int) -> torch.Tensor:
        # Chunks of rows seeded from one shared seed: the same matrix for any world size, and no two
        # ranks start with equal centers; each rank only generates the chunks it holds.
        k = self.num_subcenters
        start, stop = self.class_start * k, (self.class_start + self.num_local) * k
        weight = torch.empty(stop - start, self.embedding_size)
        for chunk in range(start // _INIT_CHUNK, math.ceil(stop / _INIT_CHUNK)):
            lo, hi = chunk * _INIT_CHUNK, (chunk + 1) * _INIT_CHUNK
            gen = torch.Generator().manual_seed(seed + chunk)
            block = torch.randn(hi - lo, self.embedding_size, generator=gen)
            a, b = max(lo, start), min(hi, stop)
            if a < b:
                weight[a - start : b - start] = block[a - lo : b - lo]
        return weight.mul_(self.init_std)

    def _check_inputs(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(
                f"embeddings: expected [B, {self.embedding_size}], got {tuple(embeddings.shape)}"
            )
        if labels.shape != embeddings.shape[:1]:
            raise ValueError(f"labels: expected shape ({embeddings.shape[0]},), got {tuple(labels.shape)}")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"labels: expected integer class ids, got dtype {labels.dtype}")
        rank, world = D.rank_and_world(self.process_group)
        if (rank, world) != (self.rank, self.world_size):
            raise RuntimeError(
                f"PartialFC was built for rank {self.rank} of {self.world_size}, "
                f"now called on rank {rank} of {world}: rebuild it after the process group"
            )

    def _sample(self, local: torch.Tensor) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
        """local: [B] column in this block or -1 -> (kept local class indices [N] sorted, or None for
        all; labels remapped to the kept classes)."""
        if self.sample_rate >= 1.0 or not self.training:
            self.last_sample_index = None
            return None, local
        valid = local >= 0
        positives = torch.unique(local[valid])
        num_sample = max(int(self.sample_rate * self.num_local), positives.numel())
        device = self.weight.device
        with torch.no_grad():
            generator = D.step_generator(self.sample_seed, self.sample_step, self.rank, device)
            score = torch.rand(self.num_local, device=device, generator=generator)
            score[positives] = 2.0  # positives always win the top-k
            index = torch.topk(score, num_sample).indices.sort().values
        self.sample_step += 1
        remapped = local.clone()
        remapped[valid] = torch.searchsorted(index, local[valid])
        self.last_sample_index = index
        if not self.update_unsampled:
            if self._sampled_since_step is None:
                self._sampled_since_step = torch.zeros(self.num_local, dtype=torch.bool, device=device)
            self._sampled_since_step[index] = True
        return index, remapped

    def step_sampled_rows(self, optimizer: torch.optim.Optimizer) -> ContextManager[None]:
        """``with head.step_sampled_rows(optimizer): optimizer.step()``: with ``update_unsampled=False``
        the step moves only the centers of the classes sampled since the previous call (every forward
        of a gradient-accumulation window), their elementwise optimizer state included
        (:func:`mlearn.heads.row_step.step_rows`); otherwise, or when nothing was sampled, a plain step."""
        sampled, self._sampled_since_step = self._sampled_since_step, None
        if self.update_unsampled or sampled is None:
            return nullcontext()
        k = self.num_subcenters
        classes = torch.nonzero(sampled).squeeze(1)
        rows = (classes[:, None] * k + torch.arange(k, device=classes.device)).reshape(-1)
        return step_rows(self.weight, rows, optimizer)

    def uses_chunked_engine(self) -> bool:
        """True when forward runs :mod:`mlearn.heads.chunked` (see ``engine``)."""
        margin = self.margin
        if margin is None:  # a criterion with its own margins: the engine runs on the cosines
            return self.engine == "chunked"
        return (self.engine == "chunked" and isinstance(margin, Margin)
                and type(margin).forward is Margin.forward)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """embeddings [B_r, D] (un-normalised), labels [B_r] global ids -> scalar global mean CE loss."""
        self._check_inputs(embeddings, labels)
        group = self.process_group
        labels = labels.long()
        all_labels = D.all_gather_variable(labels, group)
        # checked on the gathered labels so that every rank raises together (no collective hangs)
        bad = (all_labels < 0) | (all_labels >= self.num_classes)
        if bool(bad.any()):
            raise ValueError(
                f"label {int(all_labels[bad][0])} out of range: expected class ids in [0, {self.num_classes})"
            )
        all_embeddings = D.all_gather_with_grad(embeddings, group)
        self.last_certainty = None
        self.last_global_batch = int(all_labels.shape[0])
        own_rows = D.local_row_range(embeddings.shape[0], group) if self.record_certainty else None

        # the shared seed is drawn before the sampling's draws: keeps every rank's stream aligned
        generator = D.shared_generator(group) if getattr(self.margin, "stochastic", False) else None
        local = all_labels - self.class_start
        local[(local < 0) | (local >= self.num_local)] = -1
        index, local = self._sample(local)
        if self.uses_chunked_engine():
            return self._chunked_loss(all_embeddings, local, index, generator, all_labels, own_rows)
        weight: torch.Tensor = self.weight
        if index is not None:
            k, dim = self.num_subcenters, self.embedding_size
            weight = weight.view(self.num_local, k, dim)[index].reshape(-1, dim)

        cosine = F.linear(F.normalize(all_embeddings, dim=1), F.normalize(weight, dim=1))
        batch = all_embeddings.shape[0]
        with torch.autocast(device_type=cosine.device.type, enabled=False):
            if cosine.dtype in (torch.float16, torch.bfloat16):
                cosine = cosine.float()
            if self.num_subcenters > 1:
                cosine = cosine.view(batch, -1, self.num_subcenters).max(dim=2).values
            cosine = cosine.clamp(-1.0, 1.0)
            if own_rows is not None:
                self._record_dense(cosine.detach(), local, own_rows)
            if self.criterion is not None:
                return self._dense_criterion_loss(cosine, local, all_embeddings, all_labels, generator)
            extra: Dict[str, Any] = {}
            if getattr(self.margin, "needs_target_cosine", False):
                extra["target_cosine"] = D.shared_target_cosine(cosine, local, group)
            if generator is not None:
                extra["generator"] = generator
            norms = (
                all_embeddings.float().norm(dim=1)
                if all_embeddings.dtype != torch.float64
                else all_embeddings.norm(dim=1)
            )
            logits = self.margin(cosine, local, norms, **extra)
            if self.straight_through:
                plain = cosine * self.margin.s
                logits = plain + (logits - plain).detach()
            return D.dist_cross_entropy(logits, local, group)

    def _record_dense(self, cosine: torch.Tensor, local: torch.Tensor, own_rows: Tuple[int, int]) -> None:
        """``last_certainty`` from the clamped pre-margin cosines [B, C_kept] and the columns ``local``."""
        ccs = D.shared_target_cosine(cosine, local, self.process_group)
        owned = torch.nonzero(local >= 0).squeeze(1)
        others = cosine.clone()
        others[owned, local[owned]] = float("-inf")
        if others.shape[1] > 0:
            nearest = others.amax(dim=1)
        else:
            nearest = cosine.new_full((cosine.shape[0],), float("-inf"))
        nnccs = D.all_reduce_max(nearest, self.process_group).clamp(-1.0, 1.0)
        self._keep_certainty(ccs, nnccs, own_rows)

    def _keep_certainty(self, ccs: torch.Tensor, nnccs: torch.Tensor, own_rows: Tuple[int, int]) -> None:
        start, stop = own_rows
        self.last_certainty = (ccs[start:stop].detach(), nnccs[start:stop].detach())

    def _dense_criterion_loss(self, cosine: torch.Tensor, local: torch.Tensor, embeddings: torch.Tensor,
                              labels: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        """Dense reference path of a criterion: cosine [B, C_kept] float32/64 (autograd), local [B]."""
        assert self.criterion is not None
        x_hat = F.normalize(embeddings.to(cosine.dtype), dim=1)
        if self.margin is None:
            logits, scale = cosine, 1.0
        else:
            extra: Dict[str, Any] = {}
            if getattr(self.margin, "needs_target_cosine", False):
                extra["target_cosine"] = D.shared_target_cosine(cosine, local, self.process_group)
            if generator is not None:
                extra["generator"] = generator
            norms = embeddings.to(cosine.dtype).norm(dim=1)
            logits, scale = self.margin(cosine, local, norms, **extra), self.margin.s
            if self.straight_through:
                plain = cosine * scale
                logits = plain + (logits - plain).detach()
        streamed = self.criterion.stream(scale, x_hat.detach(), labels, self.process_group, cosine.dtype)
        bias = getattr(self.criterion, "bias", None)
        return dense_criterion_loss(logits, local, streamed, x_hat, self.process_group, bias)

    def _chunked_loss(self, embeddings: torch.Tensor, local: torch.Tensor, index: Optional[torch.Tensor],
                      generator: Optional[torch.Generator], labels: torch.Tensor,
                      own_rows: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        device = self.weight.device
        stat_dtype = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
        compute_dtype = self.weight.dtype
        if torch.is_autocast_enabled(device.type) and self.weight.dtype == torch.float32:
            compute_dtype = torch.get_autocast_dtype(device.type)
        budget = self.chunk_memory_mb
        if budget is None:
            budget = C.DEFAULT_CHUNK_MB_CUDA if device.type == "cuda" else C.DEFAULT_CHUNK_MB_CPU
        itemsize = torch.finfo(stat_dtype).bits // 8
        chunk = C.chunk_classes(embeddings.shape[0], self.num_subcenters, itemsize, self.chunk_size, budget)
        with torch.autocast(device_type=device.type, enabled=False):
            x = embeddings.to(stat_dtype)
            x_hat = F.normalize(x, dim=1)
            criterion: C.StreamedCriterion = C.SoftmaxCE()
            bias = None
            margin = self.margin if self.margin is not None else _COSINE_LOGITS
            if self.criterion is not None:
                criterion = self.criterion.stream(margin.s, x_hat.detach(), labels, self.process_group,
                                                  stat_dtype)
                bias = getattr(self.criterion, "bias", None)
            step = C.Step(
                margin=margin,  # a Margin: checked by uses_chunked_engine
                labels=local,
                norms=x.detach().norm(dim=1),
                index=index,
                num_local=self.num_local,
                num_subcenters=self.num_subcenters,
                chunk=chunk,
                straight_through=self.straight_through,
                generator=generator,
                group=self.process_group,
                compute_dtype=compute_dtype,
                stat_dtype=stat_dtype,
                criterion=criterion,
                record_certainty=own_rows is not None,
            )
            loss = C.chunked_margin_loss(x_hat, self.weight, step, bias=bias,
                                         update_margin=self.margin is not None and self.margin.training)
            if own_rows is not None and step.certainty is not None:
                self._keep_certainty(*step.certainty, own_rows)
            return loss

    @torch.no_grad()
    def set_centers(self, centers: torch.Tensor, keep: Optional[torch.Tensor] = None) -> None:
        """Overwrite this rank's centers from the full matrix ``centers`` [num_classes, D] (the same on
        every rank): each of a class's K sub-centers gets the class's row. ``keep`` [num_classes] bool:
        classes whose rows stay as they are. Not a collective call (the optimizer state is untouched)."""
        if tuple(centers.shape) != (self.num_classes, self.embedding_size):
            raise ValueError(f"centers: expected [{self.num_classes}, {self.embedding_size}] (num_classes, "
                             f"embedding_size), got {list(centers.shape)}")
        rows = centers[self.class_start : self.class_start + self.num_local].to(self.weight)
        rows = rows.repeat_interleave(self.num_subcenters, dim=0)
        if keep is None:
            self.weight.copy_(rows)
            return
        if tuple(keep.shape) != (self.num_classes,):
            raise ValueError(f"keep: expected [{self.num_classes}] booleans, got {list(keep.shape)}")
        change = ~keep[self.class_start : self.class_start + self.num_local].to(self.weight.device).bool()
        change = change.repeat_interleave(self.num_subcenters)
        self.weight[change] = rows[change]


def _check_criterion(margin: Optional[Any], criterion: Optional[Any]) -> Optional[Criterion]:
    """The criterion as a module (a name is built with its defaults); one line when the margin does not
    fit it."""
    if criterion is None:
        if margin is None:
            raise ValueError("margin=None: the margin softmax needs a margin (e.g. mlearn.heads.ArcFace); "
                             "margin=None goes with a criterion with its own margins (sphereface2, uniface)")
        return None
    if isinstance(criterion, str):
        criterion = build_criterion(criterion)
    if not isinstance(criterion, Criterion):
        raise TypeError(f"criterion: expected a name or an mlearn.heads.criteria.Criterion, got "
                        f"{type(criterion).__name__}")
    name = criterion.name or type(criterion).__name__
    if criterion.own_margin and margin is not None:
        raise ValueError(f"criterion {name!r} carries its own margin: use margin=None, not margin="
                         f"{type(margin).__name__}")
    if not criterion.own_margin and margin is None:
        raise ValueError(f"criterion {name!r} consumes a margin's logits: margin=None is not allowed "
                         "(give e.g. mlearn.heads.ArcFace)")
    return criterion


def _gather_weight_hook(module: PartialFC, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    key = prefix + "weight"
    if key in state_dict:
        state_dict[key] = module.gather_rows(state_dict[key])


def _slice_weight_hook(
    module: PartialFC,
    state_dict: dict,
    prefix: str,
    local_metadata: dict,
    strict: bool,
    missing_keys: list,
    unexpected_keys: list,
    error_msgs: list,
) -> None:
    key = prefix + "weight"
    if key not in state_dict:
        return
    full = state_dict[key]
    k = module.num_subcenters
    expected = (module.num_classes * k, module.embedding_size)
    if tuple(full.shape) != expected:
        error_msgs.append(
            f"{key}: expected the gathered centers of shape {expected} (num_classes·num_subcenters, "
            f"embedding_size), got {tuple(full.shape)}"
        )
        state_dict.pop(key)  # reported above; avoid a second, less clear size-mismatch message
        return
    state_dict[key] = module.local_rows(full)
