"""Distributed autograd pieces for the sharded classifier.

Every function works without ``torch.distributed`` (or with a world size of 1): the collectives are
then skipped and the single-process result is returned.

* :func:`all_gather_with_grad`: concatenate a tensor over ranks (dim 0 sizes may differ); the
  backward sums the incoming gradients over ranks and returns this rank's rows.
* :func:`dist_cross_entropy`: softmax cross-entropy over class logits sharded column-wise across
  ranks (max and sum all-reduced), averaged over the rows (the global batch).
* :func:`shared_target_cosine`, :func:`shared_generator`: per-step quantities every rank must agree on.
* :func:`gather_to_root`: concatenate rows onto rank 0's CPU memory, block by block (checkpoints).
* :func:`all_ranks_true`: one decision that every rank takes the same way.
* :func:`step_generator`: a generator seeded by (seed, step, rank), for draws that must differ per rank.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

ProcessGroup = Any  # torch.distributed.ProcessGroup (kept loose: it is not always importable)


def is_distributed(group: Optional[ProcessGroup] = None) -> bool:
    """True when ``torch.distributed`` is initialised and ``group`` has more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def rank_and_world(group: Optional[ProcessGroup] = None) -> Tuple[int, int]:
    """(rank, world size) in ``group``; (0, 1) without ``torch.distributed``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def collective_device(group: Optional[ProcessGroup] = None) -> torch.device:
    """The device collectives of ``group`` need: CUDA for NCCL, else CPU (gloo)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(tensor: torch.Tensor, op: Any, group: Optional[ProcessGroup]) -> torch.Tensor:
    """Out-of-place all-reduce on the group's collective device; returns a tensor on ``tensor.device``."""
    if not is_distributed(group):
        return tensor
    device = collective_device(group)
    work = tensor.detach().to(device, copy=True).contiguous()
    dist.all_reduce(work, op=op, group=group)
    return work.to(tensor.device)


def all_reduce_sum(tensor: torch.Tensor, group: Optional[ProcessGroup] = None) -> torch.Tensor:
    """Sum over ranks (no gradient)."""
    return _all_reduce(tensor, dist.ReduceOp.SUM, group)


def all_reduce_max(tensor: torch.Tensor, group: Optional[ProcessGroup] = None) -> torch.Tensor:
    """Element-wise max over ranks (no gradient)."""
    return _all_reduce(tensor, dist.ReduceOp.MAX, group)


def all_ranks_true(flag: bool, group: Optional[ProcessGroup] = None) -> bool:
    """True when ``flag`` holds on every rank of ``group`` (a collective call when distributed)."""
    if not is_distributed(group):
        return bool(flag)
    failed = torch.tensor([0.0 if flag else 1.0], device=collective_device(group))
    dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=group)
    return failed.item() == 0.0


def _gather_sizes(n: int, group: Optional[ProcessGroup]) -> list:
    device = collective_device(group)
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, torch.tensor([n], dtype=torch.long, device=device), group=group)
    return [int(s.item()) for s in sizes]


def local_row_range(n: int, group: Optional[ProcessGroup] = None) -> Tuple[int, int]:
    """(start, stop) of this rank's ``n`` rows in a tensor gathered over ranks in rank order (collective
    when distributed; ``(0, n)`` otherwise)."""
    if not is_distributed(group):
        return 0, n
    sizes = _gather_sizes(n, group)
    start = sum(sizes[: dist.get_rank(group)])
    return start, start + n


def all_gather_variable(tensor: torch.Tensor, group: Optional[ProcessGroup] = None) -> torch.Tensor:
    """Concatenate ``tensor`` [N_r, ...] over ranks along dim 0 (N_r may differ); no gradient.

    Returns [sum_r N_r, ...] on ``tensor.device``, ordered by rank.
    """
    if not is_distributed(group):
        return tensor.detach()
    sizes = _gather_sizes(tensor.shape[0], group)
    return _gather_padded(tensor.detach(), sizes, group)


def _gather_padded(tensor: torch.Tensor, sizes: list, group: Optional[ProcessGroup]) -> torch.Tensor:
    # gloo and NCCL all_gather need equal shapes: pad to the largest block, then strip the padding
    device = collective_device(group)
    largest = max(sizes)
    padded = tensor.new_zeros((largest,) + tuple(tensor.shape[1:]), device=device)
    padded[: tensor.shape[0]] = tensor.to(device)
    blocks = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(blocks, padded, group=group)
    return torch.cat([b[:n] for b, n in zip(blocks, sizes)]).to(tensor.device)


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, group: Optional[ProcessGroup]) -> torch.Tensor:
        sizes = _gather_sizes(tensor.shape[0], group)
        rank = dist.get_rank(group)
        ctx.group = group
        ctx.start = sum(sizes[:rank])
        ctx.stop = ctx.start + sizes[rank]
        return _gather_padded(tensor, sizes, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[torch.Tensor, None]:
        # every rank back-propagates the same global loss through its own class shard: the gradient
        # w.r.t. one sample is the sum of the shards' contributions
        total = all_reduce_sum(grad.contiguous(), ctx.group)
        return total[ctx.start : ctx.stop], None


def all_gather_with_grad(tensor: torch.Tensor, group: Optional[ProcessGroup] = None) -> torch.Tensor:
    """Concatenate ``tensor`` [N_r, ...] over ranks along dim 0, with gradient.

    Backward: the gradient of the concatenation is summed over ranks and each rank receives the rows
    of its own input, i.e. the exact gradient of a loss that every rank computes identically through
    its share of the graph. Identity without ``torch.distributed``.
    """
    if not is_distributed(group):
        return tensor
    return _AllGather.apply(tensor, group)


class _DistCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, logits: torch.Tensor, labels: torch.Tensor, group: Optional[ProcessGroup]
    ) -> torch.Tensor:
        rows = logits.shape[0]
        if logits.shape[1] > 0:
            local_max = logits.detach().amax(dim=1)
        else:  # a rank that holds (or sampled) no class still takes part in the collectives
            local_max = logits.new_full((rows,), float("-inf"))
        row_max = all_reduce_max(local_max, group)
        probs = torch.exp(logits.detach() - row_max[:, None])
        denom = all_reduce_sum(probs.sum(dim=1), group)
        probs.div_(denom[:, None])

        valid = labels >= 0
        target = logits.new_zeros(rows)
        target[valid] = logits.detach()[valid, labels[valid]] - row_max[valid]
        target = all_reduce_sum(target, group)  # each row's target column lives on exactly one rank
        loss = (torch.log(denom) - target).mean() if rows > 0 else logits.new_zeros(())

        ctx.save_for_backward(probs, labels)
        return loss

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[torch.Tensor, None, None]:
        probs, labels = ctx.saved_tensors
        valid = torch.nonzero(labels >= 0).squeeze(1)
        scale = grad / max(probs.shape[0], 1)
        grad_logits = probs * scale  # not in place: the graph may be back-propagated again
        grad_logits[valid, labels[valid]] -= scale
        return grad_logits, None, None


def dist_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, group: Optional[ProcessGroup] = None
) -> torch.Tensor:
    """Mean softmax cross-entropy with the class columns sharded over ranks.

    logits: [B, C_local] (this rank's columns of the [B, C] logit matrix; the same B rows on every
    rank). labels: [B] long, the target's column in this rank's block, or -1 where another rank holds
    it. Returns the scalar mean over the B rows, identical on every rank; the backward gives this rank
    the exact gradient of its columns. Computed in the dtype of ``logits`` (cast half precision to
    float32 before calling).
    """
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"expected logits [B, C] and labels [B]; got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    return _DistCrossEntropy.apply(logits, labels, group)


def shared_target_cosine(
    cosine: torch.Tensor, labels: torch.Tensor, group: Optional[ProcessGroup] = None
) -> torch.Tensor:
    """Each row's target cosine [B], contributed by the rank whose block holds the target (no grad).

    cosine: [B, C_local]; labels: [B] local column or -1. Every row's target must be held by exactly
    one rank (rows without any holder get 0).
    """
    valid = labels >= 0
    target = cosine.new_zeros(cosine.shape[0])
    target[valid] = cosine.detach()[valid, labels[valid]]
    return all_reduce_sum(target, group)


def shared_generator(group: Optional[ProcessGroup] = None) -> torch.Generator:
    """A CPU generator seeded identically on every rank (rank 0's draw from the default generator).

    Every rank draws from its default generator (keeping the streams aligned) and rank 0's draw is
    broadcast. Without ``torch.distributed``: ``Generator().manual_seed(torch.randint(2**62))``.
    """
    seed = torch.randint(0, 2**62, (1,), dtype=torch.long)
    if is_distributed(group):
        device = collective_device(group)
        seed = seed.to(device)
        src = dist.get_global_rank(group, 0) if group is not None else 0
        dist.broadcast(seed, src=src, group=group)
    return torch.Generator().manual_seed(int(seed.item()))


_GATHER_BLOCK_BYTES = 64 << 20  # device memory per round of gather_to_root, all ranks' blocks together


def gather_to_root(
    tensor: torch.Tensor, group: Optional[ProcessGroup] = None, block_bytes: int = _GATHER_BLOCK_BYTES
) -> Optional[torch.Tensor]:
    """Concatenate ``tensor`` [N_r, ...] over ranks (by rank, N_r may differ) into CPU memory of the
    group's rank 0; returns None on the other ranks (a collective call). No gradient.

    Rows travel in rounds of at most ``block_bytes`` on the collective device (every rank sends its
    next block, padded to the round's size), so the extra device memory is one round, not the full
    matrix; only rank 0 holds the [sum_r N_r, ...] result. Without ``torch.distributed``: a CPU copy.
    """
    if not is_distributed(group):
        return tensor.detach().cpu()
    sizes = _gather_sizes(tensor.shape[0], group)
    rank, world = dist.get_rank(group), len(sizes)
    device = collective_device(group)
    row_shape = tuple(tensor.shape[1:])
    row_bytes = max(int(np.prod(row_shape, dtype=np.int64)), 1) * tensor.element_size()
    rows = max(block_bytes // (row_bytes * world), 1)
    root = dist.get_global_rank(group, 0) if group is not None else 0
    starts = np.cumsum([0] + sizes[:-1]).tolist()
    out = torch.empty((sum(sizes),) + row_shape, dtype=tensor.dtype) if rank == 0 else None
    for lo in range(0, max(sizes), rows):
        count = min(rows, max(sizes) - lo)  # this round's rows per rank (the last round may be short)
        mine = tensor.detach()[lo : lo + count]
        block = tensor.new_zeros((count,) + row_shape, device=device)
        block[: mine.shape[0]] = mine.to(device)
        blocks = [torch.empty_like(block) for _ in sizes] if rank == 0 else None
        dist.gather(block, blocks, dst=root, group=group)
        if out is not None and blocks is not None:
            for start, size, received in zip(starts, sizes, blocks):
                n = min(max(size - lo, 0), count)
                out[start + lo : start + lo + n] = received[:n].cpu()
    return out


def step_generator(seed: int, step: int, rank: int, device: Any = "cpu") -> torch.Generator:
    """A generator on ``device`` seeded from (seed, step, rank) only: the same triple always gives
    the same stream, and different ranks (or steps) get unrelated streams."""
    mixed = np.random.SeedSequence([int(seed) & (2**63 - 1), int(step), int(rank)])
    value = int(mixed.generate_state(1, dtype=np.uint64)[0]) >> 1  # manual_seed takes < 2**63
    return torch.Generator(device=device).manual_seed(value)
