"""Partial FC v1 (``update_unsampled=False``): the optimizer step moves only the sampled class centers and
their optimizer state; the other rows stay bit for bit."""

from __future__ import annotations

import pytest
import torch

from mlearn.heads import ArcFace, PartialFC
from mlearn.heads.row_step import step_rows

DIM, CLASSES, BATCH = 6, 20, 4
LR, MOMENTUM, DECAY = 0.1, 0.9, 5e-4


def _head(update_unsampled: bool, k: int = 1, rate: float = 0.3) -> PartialFC:
    torch.manual_seed(0)
    return PartialFC(ArcFace(s=8.0), DIM, CLASSES, sample_rate=rate, num_subcenters=k,
                     update_unsampled=update_unsampled).double()


def _backward(head: PartialFC, seed: int) -> torch.Tensor:
    """One forward + backward on a seeded batch; returns the rows (K per class) sampled for it."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(BATCH, DIM, generator=g, dtype=torch.float64)
    head(emb, torch.randint(0, CLASSES, (BATCH,), generator=g)).backward()
    k = head.num_subcenters
    classes = head.last_sample_index
    return (classes[:, None] * k + torch.arange(k)).reshape(-1)


@pytest.mark.parametrize("k", [1, 2])
def test_sgd_moves_only_sampled_rows_as_sgd_on_those_rows(k: int) -> None:
    head = _head(False, k)
    optimizer = torch.optim.SGD(head.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=DECAY)
    expected = head.weight.detach().clone()
    velocity = torch.zeros_like(expected)
    for step in range(4):
        rows = _backward(head, step)
        assert 0 < rows.numel() < expected.shape[0]
        before = head.weight.detach().clone()
        grad = head.weight.grad.clone()
        # SGD (momentum, weight decay) applied to the sampled rows alone; a row's velocity starts at 0
        d = grad[rows] + DECAY * expected[rows]
        velocity[rows] = MOMENTUM * velocity[rows] + d
        expected[rows] -= LR * velocity[rows]
        with head.step_sampled_rows(optimizer):
            optimizer.step()
        optimizer.zero_grad()
        others = torch.ones(expected.shape[0], dtype=torch.bool)
        others[rows] = False
        assert torch.equal(head.weight.detach()[others], before[others])  # bit for bit
        torch.testing.assert_close(head.weight.detach(), expected, rtol=1e-12, atol=1e-15)
        momentum = optimizer.state[head.weight]["momentum_buffer"]
        assert momentum.shape == expected.shape  # full-size between steps (checkpoints, resharding)
        torch.testing.assert_close(momentum, velocity, rtol=1e-12, atol=1e-15)


def test_v2_default_still_moves_unsampled_rows() -> None:
    head = _head(True)
    optimizer = torch.optim.SGD(head.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=DECAY)
    before = head.weight.detach().clone()
    rows = _backward(head, 0)
    with head.step_sampled_rows(optimizer):  # a plain step with update_unsampled=True
        optimizer.step()
    moved = (head.weight.detach() != before).any(dim=1)
    assert moved.sum() == CLASSES  # weight decay shrinks the rows that were not sampled too
    assert rows.numel() < CLASSES


def test_adam_state_of_unsampled_rows_is_left_alone() -> None:
    head = _head(False)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=0.1)
    rows0 = _backward(head, 0)
    with head.step_sampled_rows(optimizer):
        optimizer.step()
    optimizer.zero_grad()
    state = optimizer.state[head.weight]
    first = {key: value.clone() for key, value in state.items()}
    assert first["exp_avg"].shape == head.weight.shape
    untouched = torch.ones(CLASSES, dtype=torch.bool)
    untouched[rows0] = False
    assert torch.equal(first["exp_avg"][untouched], torch.zeros_like(first["exp_avg"][untouched]))
    before = head.weight.detach().clone()
    rows1 = _backward(head, 1)
    with head.step_sampled_rows(optimizer):
        optimizer.step()
    others = torch.ones(CLASSES, dtype=torch.bool)
    others[rows1] = False
    assert torch.equal(head.weight.detach()[others], before[others])
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(state[key][others], first[key][others]), key
        assert not torch.equal(state[key][rows1], first[key][rows1]), key
    assert float(state["step"]) == 2.0  # Adam counts steps per parameter, not per row


def test_accumulated_forwards_step_the_union_of_their_samples() -> None:
    head = _head(False, rate=0.2)
    optimizer = torch.optim.SGD(head.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=DECAY)
    before = head.weight.detach().clone()
    union = torch.cat([_backward(head, 0), _backward(head, 1)]).unique()
    with head.step_sampled_rows(optimizer):
        optimizer.step()
    moved = torch.nonzero((head.weight.detach() != before).any(dim=1)).squeeze(1)
    assert torch.equal(moved, union)
    assert union.numel() < CLASSES
    with head.step_sampled_rows(optimizer):  # nothing sampled since: a plain step of every row
        optimizer.step()
    assert (head.weight.detach() != before).any(dim=1).all()


class _RowStatOptimizer(torch.optim.SGD):
    """Keeps a per-row statistic: state that is not elementwise."""

    def step(self, closure=None):  # type: ignore[no-untyped-def]
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["row_norm"] = p.detach().norm(dim=1)
        return super().step(closure)


def test_optimizer_with_row_state_is_refused_and_the_parameter_restored() -> None:
    head = _head(False)
    optimizer = _RowStatOptimizer(head.parameters(), lr=LR)
    _backward(head, 0)
    with pytest.raises(ValueError, match=r"_RowStatOptimizer keeps state 'row_norm'.*update_unsampled=False"):
        with head.step_sampled_rows(optimizer):
            optimizer.step()
    assert head.weight.shape == (CLASSES, DIM) and head.weight.grad.shape == (CLASSES, DIM)


def test_step_rows_leaves_a_parameter_without_gradient_alone() -> None:
    param = torch.nn.Parameter(torch.ones(5, 2))
    optimizer = torch.optim.SGD([param], lr=1.0, weight_decay=0.5)
    with step_rows(param, torch.tensor([1, 3]), optimizer):
        optimizer.step()
    assert torch.equal(param.detach(), torch.ones(5, 2))
