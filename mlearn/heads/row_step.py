"""One optimizer step on a subset of a parameter's rows (Partial FC v1: only sampled centers move).

:func:`step_rows` narrows a [R, D] parameter, its gradient and its elementwise optimizer state
(SGD's momentum, Adam's moments) to N rows for the duration of a ``with`` block, and scatters the
updated rows back on exit: the other R − N rows, and their state, stay exactly as they were (no weight
decay, no momentum). Cost: gathering and scattering N rows of the weight, its gradient and each state
tensor; nothing proportional to the unsampled rows.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Dict, Iterator

import torch


def is_elementwise_state(value: Any, shape: tuple) -> bool:
    """A per-element optimizer state tensor of the parameter's ``shape`` (momentum, Adam's moments), not
    the step count nor factored row/column state."""
    return torch.is_tensor(value) and tuple(value.shape) == shape


def _check_state(optimizer: torch.optim.Optimizer, state: Dict[str, Any], shape: tuple) -> None:
    for key, value in state.items():
        if torch.is_tensor(value) and value.dim() > 0 and tuple(value.shape) != shape:
            raise ValueError(
                f"{type(optimizer).__name__} keeps state {key!r} of shape {tuple(value.shape)} for a "
                f"parameter of shape {shape}: updating only the sampled class centers "
                "(update_unsampled=False) needs an optimizer whose state is elementwise (SGD, Adam, AdamW, "
                "RMSprop, ...)")


@contextmanager
def step_rows(param: torch.nn.Parameter, rows: torch.Tensor,
              optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Within the block, ``optimizer`` sees only ``rows`` [N] (long) of ``param`` [R, ...]: their values,
    gradient and elementwise state. A parameter without a gradient is left alone."""
    if param.grad is None:
        yield
        return
    full, grad = param.data, param.grad
    shape = tuple(full.shape)
    state = optimizer.state[param]
    _check_state(optimizer, state, shape)
    full_state = {key: value for key, value in state.items() if is_elementwise_state(value, shape)}
    with torch.no_grad():
        param.data = full[rows]
        param.grad = grad[rows]
        for key, value in full_state.items():
            state[key] = value[rows]
    try:
        yield
    finally:
        with torch.no_grad():
            sub_shape = tuple(param.data.shape)
            full[rows] = param.data
            for key, value in list(state.items()):
                if is_elementwise_state(value, sub_shape):
                    # state the step created (the first step) starts at zero for the other rows
                    target = full_state.get(key)
                    if target is None:
                        target = torch.zeros(shape, dtype=value.dtype, device=value.device)
                    target[rows] = value
                    state[key] = target
            param.data = full
            param.grad = grad
    _check_state(optimizer, state, shape)  # state the step created in another layout


__all__ = ["is_elementwise_state", "step_rows"]
