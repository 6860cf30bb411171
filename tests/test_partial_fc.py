"""PartialFC: sharded (gloo, CPU) loss and gradients equal the single-process full computation; negative
sampling is seeded by (seed, step, rank)."""

from __future__ import annotations

import copy
import os
from typing import Any, Dict

import pytest
import torch
import torch.nn.functional as F
from ddp_utils import run_in_ddp

from mlearn.heads import ArcFace, PartialFC, build_margin
from mlearn.heads import distributed as D

NUM_CLASSES, DIM = 11, 6  # 11 classes: uneven shards for W = 2 and 3
LOCAL_BATCH = [5, 3, 4]  # per-rank batch sizes differ (a smaller last batch)

# (margin name, kwargs, num_subcenters, prepare) - every case runs on every world size
CASES = [
    ("arcface", {"s": 8.0, "m": 0.5}, 1),
    ("arcface", {"s": 8.0, "m": 0.5}, 3),  # Sub-center ArcFace
    ("cosface", {"s": 8.0}, 1),
    ("curricularface", {"s": 8.0, "m": 0.5}, 1),
    ("elasticface_arc", {"s": 8.0, "plus": True}, 1),
    ("elasticface_cos", {"s": 8.0}, 2),
    ("adaface", {"s": 8.0, "t_alpha": 0.5}, 1),
    ("circle", {"s": 16.0}, 1),
]


def global_batch(world: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    sizes = LOCAL_BATCH[:world] if world > 1 else [sum(LOCAL_BATCH[:2])]
    emb = torch.randn(sum(sizes), DIM, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, NUM_CLASSES, (sum(sizes),), generator=g)
    labels[0] = labels[-1]  # a class seen twice, possibly from two ranks
    return emb, labels, sizes


def reference(margin, weight_full: torch.Tensor, emb: torch.Tensor, labels: torch.Tensor, k: int, seed: int):
    """Single process, full weight, whole global batch; the margin called directly."""
    weight_full = weight_full.clone().requires_grad_()
    emb = emb.clone().requires_grad_()
    cos = F.linear(F.normalize(emb), F.normalize(weight_full))
    cos = cos.view(emb.shape[0], -1, k).max(dim=2).values.clamp(-1, 1)
    torch.manual_seed(seed)
    gen = D.shared_generator(None)  # what PartialFC draws first from the default generator
    loss = F.cross_entropy(margin(cos, labels, emb.norm(dim=1), generator=gen), labels)
    loss.backward()
    return loss.detach(), emb.grad, weight_full.grad


def _check_cases(rank: int, world: int) -> dict:
    emb, labels, sizes = global_batch(world)
    lo = sum(sizes[:rank])
    hi = lo + sizes[rank]
    out = {}
    for i, (name, kw, k) in enumerate(CASES):
        torch.manual_seed(i)
        head = PartialFC(build_margin(name, **kw), DIM, NUM_CLASSES, num_subcenters=k).double()
        if name == "curricularface":
            head.margin.t.fill_(0.3)  # hard negatives modulated from the first step
        ref_margin = copy.deepcopy(head.margin)
        full = D.all_gather_variable(head.weight)  # every rank's shard, on every rank
        assert full.shape == (NUM_CLASSES * k, DIM)
        saved = head.state_dict()["weight"]  # gathered onto rank 0 only, placeholders elsewhere
        if rank == 0:
            assert torch.equal(saved, full) and saved.device.type == "cpu"
        else:
            assert saved.shape == (0, DIM)
        for step in range(2):  # two steps: the margin state evolves identically
            ref_loss, ref_emb_grad, ref_w_grad = reference(ref_margin, full, emb, labels, k, seed=100 + step)
            x = emb[lo:hi].clone().requires_grad_()
            torch.manual_seed(100 + step)
            loss = head(x, labels[lo:hi])
            loss.backward()
            start = head.class_start * k
            torch.testing.assert_close(loss.detach(), ref_loss, msg=f"{name} loss")
            torch.testing.assert_close(x.grad, ref_emb_grad[lo:hi], msg=f"{name} embedding grad")
            torch.testing.assert_close(
                head.weight.grad, ref_w_grad[start : start + head.num_local * k], msg=f"{name} weight grad"
            )
            head.weight.grad = None
            for key, value in ref_margin.state_dict().items():
                torch.testing.assert_close(head.margin.state_dict()[key], value, msg=f"{name} {key}")
        out[f"{name}-{k}"] = loss.item()
    out.update(_check_sampling(rank, world))
    out.update(_check_bad_label(rank, world))
    return out


def _check_sampling(rank: int, world: int) -> dict:
    num_classes, rate = 40, 0.3
    g = torch.Generator().manual_seed(5)
    emb = torch.randn(12 * world, DIM, generator=g, dtype=torch.float64)
    labels = torch.randint(0, num_classes, (12 * world,), generator=g)
    lo, hi = 12 * rank, 12 * (rank + 1)
    head = PartialFC(ArcFace(s=8.0), DIM, num_classes, sample_rate=rate).double()
    full = D.all_gather_variable(head.weight)
    x = emb[lo:hi].clone().requires_grad_()
    loss = head(x, labels[lo:hi])
    loss.backward()

    index = head.last_sample_index
    local_pos = torch.unique(
        labels[(labels >= head.class_start) & (labels < head.class_start + head.num_local)]
    )
    assert set((local_pos - head.class_start).tolist()) <= set(index.tolist())
    assert index.numel() == max(int(rate * head.num_local), local_pos.numel())
    rows_touched = (head.weight.grad.abs().sum(dim=1) > 0).sum().item()
    assert rows_touched == index.numel()

    # the sampled loss equals the full softmax restricted to the union of the ranks' sampled classes
    kept = D.all_gather_variable(index + head.class_start)
    remap = torch.full((num_classes,), -1, dtype=torch.long)
    remap[kept] = torch.arange(kept.numel())
    emb_ref = emb.clone().requires_grad_()
    cos = F.linear(F.normalize(emb_ref), F.normalize(full[kept])).clamp(-1, 1)
    ref = F.cross_entropy(ArcFace(s=8.0)(cos, remap[labels]), remap[labels])
    ref.backward()
    torch.testing.assert_close(loss.detach(), ref.detach())
    torch.testing.assert_close(x.grad, emb_ref.grad[lo:hi])
    return {"sampled_rows": index.numel(), "num_local": head.num_local}


def _check_bad_label(rank: int, world: int) -> dict:
    head = PartialFC(ArcFace(), DIM, NUM_CLASSES)
    labels = torch.zeros(3, dtype=torch.long)
    if rank == world - 1:
        labels[1] = NUM_CLASSES + 2
    with pytest.raises(ValueError, match=f"label {NUM_CLASSES + 2} out of range"):
        head(torch.randn(3, DIM), labels)  # every rank raises, none hangs
    return {"bad_label_raised": True}


@pytest.mark.distributed
@pytest.mark.parametrize("world", [1, 2, 3])
def test_sharded_matches_single_process(world: int) -> None:
    results = run_in_ddp(world, _check_cases)
    for r in results[1:]:
        assert {k: v for k, v in r.items() if k not in ("sampled_rows", "num_local")} == {
            k: v for k, v in results[0].items() if k not in ("sampled_rows", "num_local")
        }
    total = sum(r["num_local"] for r in results)
    assert total == 40
    assert sum(r["sampled_rows"] for r in results) == pytest.approx(0.3 * total, abs=world + 12)


def _save_or_load(rank: int, world: int, path: str, save: bool) -> float:
    torch.manual_seed(world)  # a different initialisation than the saved one
    head = PartialFC(build_margin("curricularface", s=8.0), DIM, NUM_CLASSES, num_subcenters=2).double()
    if save:
        head.margin.t.fill_(0.25)
        with torch.no_grad():
            head.weight.add_(0.01 * (head.class_start + 1))  # a trained-looking, rank-dependent shard
        state = head.state_dict()
        if rank == 0:
            torch.save(state, path)
    else:
        head.load_state_dict(torch.load(path))
    emb, labels, _ = global_batch(3, seed=4)
    per = -(-emb.shape[0] // world)
    lo, hi = min(rank * per, emb.shape[0]), min((rank + 1) * per, emb.shape[0])
    return head.eval()(emb[lo:hi], labels[lo:hi]).item()


@pytest.mark.distributed
def test_checkpoint_reshard(tmp_path) -> None:
    path = str(tmp_path / "head.pt")
    saved = run_in_ddp(2, _save_or_load, path, True)
    assert os.path.exists(path) and torch.load(path)["weight"].shape == (NUM_CLASSES * 2, DIM)
    loaded3 = run_in_ddp(3, _save_or_load, path, False)
    loaded1 = _save_or_load(0, 1, path, False)  # no torch.distributed at all
    for value in loaded3 + [loaded1]:
        assert value == pytest.approx(saved[0], rel=1e-12)


def test_single_process_full_fc_and_gradcheck() -> None:
    head = PartialFC(build_margin("curricularface", s=4.0), 4, 5, num_subcenters=2).double().eval()
    head.margin.t.fill_(0.2)
    emb = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 4, 4, 2, 3])
    weight = head.weight
    # PartialFC's loss equals the plain full computation, and its gradients pass gradcheck
    ref, _, _ = reference(head.margin, weight.detach(), emb.detach(), labels, 2, seed=0)
    torch.testing.assert_close(head(emb, labels), ref)
    assert torch.autograd.gradcheck(lambda e: head(e, labels), (emb,))
    assert torch.autograd.gradcheck(
        lambda w: _loss_with_weight(head, emb.detach(), labels, w),
        (weight.detach().clone().requires_grad_(),),
    )


def _loss_with_weight(head: PartialFC, emb, labels, weight):
    head_copy = copy.copy(head)  # shallow: shares the margin; swaps the parameter for a plain tensor
    head_copy._parameters = dict(head._parameters, weight=weight)
    return PartialFC.forward(head_copy, emb, labels)


def test_errors() -> None:
    head = PartialFC(ArcFace(), 4, 5)
    with pytest.raises(ValueError, match="label -1 out of range"):
        head(torch.randn(2, 4), torch.tensor([0, -1]))
    with pytest.raises(ValueError, match=r"embeddings: expected \[B, 4\]"):
        head(torch.randn(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="sample_rate=0"):
        PartialFC(ArcFace(), 4, 5, sample_rate=0.0)
    with pytest.raises(ValueError, match="num_classes=1: a classifier needs at least 2 classes"):
        PartialFC(ArcFace(), 4, 1)  # the loss would be 0 whatever the embeddings
    assert head.sharded_parameter_names() == ["weight"]


def test_autocast_bf16_is_float32_softmax() -> None:
    torch.manual_seed(0)
    head = PartialFC(ArcFace(), 16, 50)
    emb, labels = torch.randn(8, 16), torch.randint(0, 50, (8,))
    exact = head(emb, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = head(emb, labels)
    assert mixed.dtype == torch.float32
    assert mixed.item() == pytest.approx(exact.item(), rel=0.05)


def test_straight_through_option() -> None:
    torch.manual_seed(0)
    emb, labels = torch.randn(6, 8, requires_grad=True), torch.randint(0, 10, (6,))
    exact = PartialFC(ArcFace(s=8.0), 8, 10)
    st = PartialFC(ArcFace(s=8.0), 8, 10, straight_through=True)
    st.load_state_dict(exact.state_dict())
    assert st(emb, labels).item() == pytest.approx(exact(emb, labels).item())  # same forward value
    g_st = torch.autograd.grad(st(emb, labels), emb)[0]
    g_exact = torch.autograd.grad(exact(emb, labels), emb)[0]
    assert not torch.allclose(g_st, g_exact)  # the approximation is real and opt-in


def _draws(rank: int, world: int) -> Dict[str, Any]:
    def head() -> PartialFC:
        return PartialFC(ArcFace(s=8.0), DIM, 40, sample_rate=0.25, seed=123)

    a = head()
    emb = torch.randn(3, DIM, generator=torch.Generator().manual_seed(rank))
    labels = torch.tensor([0, 20, 0])  # local offset 0 in both ranks' blocks ([0, 20) and [20, 40))
    draws = []
    for _ in range(3):
        a(emb, labels)
        draws.append(a.last_sample_index.tolist())
    assert a.sample_step == 3
    resumed = head()
    resumed.sample_step = 2  # e.g. restored from the global step
    resumed(emb, labels)
    assert resumed.last_sample_index.tolist() == draws[2]
    assert len({tuple(d) for d in draws}) == 3  # every step draws anew
    return {"draws": draws}


@pytest.mark.distributed
def test_sampling_is_seeded_by_seed_step_and_rank() -> None:
    ranks = run_in_ddp(2, _draws)
    for step in range(3):
        first, second = ranks[0]["draws"][step], ranks[1]["draws"][step]
        assert 0 in first and 0 in second and len(first) == len(second) == 5
        assert first != second  # the ranks do not keep the same local offsets (striped sampling)


def test_sampling_is_uniform_over_the_block() -> None:
    head = PartialFC(ArcFace(s=8.0), DIM, 50, sample_rate=0.2, seed=7)
    counts = torch.zeros(50)
    emb, labels = torch.randn(2, DIM), torch.tensor([0, 0])
    for _ in range(400):
        head(emb, labels)
        counts[head.last_sample_index] += 1
    others = counts[1:] / 400  # class 0 is a positive: always kept
    assert counts[0] == 400
    assert others.mean().item() == pytest.approx(9 / 49, rel=1e-6)
    assert others.min().item() > 0.1 and others.max().item() < 0.28  # ~0.184 each, binomial spread
