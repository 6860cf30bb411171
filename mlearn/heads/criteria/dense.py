"""The dense reference path of a criterion (PartialFC ``engine="dense"``): the streamed formulas on a
rank's full [B, C_local] logits, wrapped for autograd."""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch

from mlearn.heads.chunked import StreamedCriterion


class _DenseCriterion(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, bias: Optional[torch.Tensor], x_hat: torch.Tensor,
                labels: torch.Tensor, streamed: StreamedCriterion, group: Any) -> torch.Tensor:
        rows = torch.nonzero(labels >= 0).squeeze(1)
        cols = labels[rows]
        values = logits.detach()
        masked = values.clone()
        masked[rows, cols] = float("-inf")
        stat = streamed.accumulate(streamed.init_stat(values.shape[0], values), masked)
        target = values.new_zeros(values.shape[0]).index_put((rows,), values[rows, cols])
        loss, state = streamed.finish(stat, target, labels >= 0, group)
        ctx.streamed, ctx.rows, ctx.cols = streamed, rows, cols
        ctx.save_for_backward(values, state, target, x_hat)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return loss

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        values, state, target, x_hat = ctx.saved_tensors
        streamed, rows, cols = ctx.streamed, ctx.rows, ctx.cols
        d = streamed.grad_logits(values, state, values.new_ones(()))
        d[rows, cols] = streamed.grad_target(target[rows], state[rows], values.shape[0])
        grad_x = torch.zeros_like(x_hat)
        streamed.extra_grad_x(x_hat, state, grad_x)
        bias_grad = None
        if ctx.bias_dtype is not None and streamed.bias_grad is not None:
            bias_grad = (streamed.bias_grad * grad).to(ctx.bias_dtype)
        return d * grad, bias_grad, grad_x * grad, None, None, None


def dense_criterion_loss(logits: torch.Tensor, labels: torch.Tensor, streamed: StreamedCriterion,
                         x_hat: torch.Tensor, group: Any,
                         bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The reference path: a criterion on this rank's full logits [B, C_local] (the cosines for
    own-margin criteria), labels [B] local column or −1; gradients for ``logits``, ``bias`` and
    ``x_hat`` [B, D] (UNPG's pair terms) by autograd through the streamed formulas."""
    return _DenseCriterion.apply(logits, bias, x_hat, labels, streamed, group)
