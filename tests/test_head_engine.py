"""The chunked head engine (mlearn.heads.chunked, PartialFC's default): loss and gradients equal the dense
float64 computation for every registered margin, on 1, 2 and 3 gloo ranks, with and without sampling and
sub-centers; the block size changes results only by rounding; bad chunk options fail clearly."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from ddp_utils import run_in_ddp

from mlearn.heads import ArcFace, PartialFC, build_margin, list_margins
from mlearn.heads import distributed as D

NUM_CLASSES, DIM = 13, 5
MARGIN_KWARGS = {"circle": {"s": 16.0}, "adaface": {"s": 8.0, "t_alpha": 0.5}}


def margins() -> list:
    return [m for m in list_margins() if m != "normface"]


def _batch(world: int, rank: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    sizes = [4, 3, 5][:world] if world > 1 else [7]
    emb = torch.randn(sum(sizes), DIM, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, NUM_CLASSES, (sum(sizes),), generator=g)
    labels[0] = labels[-1]
    lo = sum(sizes[:rank])
    return emb, labels, lo, lo + sizes[rank]


def _reference(margin, rows, emb, labels, k, seed):
    """Dense float64: margin on the full cosine matrix of the kept rows, F.cross_entropy."""
    rows = rows.clone().requires_grad_()
    emb = emb.clone().requires_grad_()
    cos = F.linear(F.normalize(emb), F.normalize(rows)).view(emb.shape[0], -1, k).max(dim=2).values
    torch.manual_seed(seed)
    gen = D.shared_generator(None)  # PartialFC draws it first from the default generator
    loss = F.cross_entropy(margin(cos.clamp(-1, 1), labels, emb.norm(dim=1), generator=gen), labels)
    loss.backward()
    return loss.detach(), emb.grad, rows.grad


def _check_exact(rank: int, world: int) -> dict:
    emb, labels, lo, hi = _batch(world, rank)
    out = {}
    for name in margins():
        for k, rate in ((1, 1.0), (2, 1.0), (1, 0.5), (3, 0.6)):
            kw = dict(MARGIN_KWARGS.get(name, {"s": 8.0}))
            torch.manual_seed(7)
            head = PartialFC(build_margin(name, **kw), DIM, NUM_CLASSES, sample_rate=rate,
                             num_subcenters=k, chunk_size=2).double()
            assert head.uses_chunked_engine()
            if name == "curricularface":
                head.margin.t.fill_(0.3)
            ref_margin = copy.deepcopy(head.margin)
            full = D.all_gather_variable(head.weight)
            for step in range(2):  # stateful margins evolve identically
                x = emb[lo:hi].clone().requires_grad_()
                torch.manual_seed(100 + step)
                loss = head(x, labels[lo:hi])
                loss.backward()
                if head.last_sample_index is None:
                    kept = torch.arange(NUM_CLASSES)
                else:
                    kept = D.all_gather_variable(head.last_sample_index + head.class_start)
                remap = torch.full((NUM_CLASSES,), -1, dtype=torch.long)
                remap[kept] = torch.arange(kept.numel())
                rows = full.view(NUM_CLASSES, k, DIM)[kept].reshape(-1, DIM)
                ref_loss, ref_x, ref_rows = _reference(ref_margin, rows, emb, remap[labels], k, 100 + step)
                ref_w = torch.zeros_like(full).view(NUM_CLASSES, k, DIM)
                ref_w[kept] = ref_rows.view(-1, k, DIM)
                start = head.class_start * k
                ref_w = ref_w.view(-1, DIM)[start : start + head.num_local * k]
                case = f"{name} K={k} rate={rate} step={step}"
                torch.testing.assert_close(loss.detach(), ref_loss, msg=case)
                torch.testing.assert_close(x.grad, ref_x[lo:hi], msg=f"{case} embedding grad")
                torch.testing.assert_close(head.weight.grad, ref_w, msg=f"{case} weight grad")
                head.weight.grad = None
                for key, value in ref_margin.state_dict().items():
                    torch.testing.assert_close(head.margin.state_dict()[key], value, msg=f"{case} {key}")
            out[f"{name}-{k}-{rate}"] = loss.item()
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("world", [1, 2, 3])
def test_chunked_equals_dense_float64(world: int) -> None:
    results = run_in_ddp(world, _check_exact)
    for other in results[1:]:
        assert other == results[0]  # the same global loss on every rank


def _loss_and_grads(head: PartialFC, emb: torch.Tensor, labels: torch.Tensor):
    x = emb.clone().requires_grad_()
    loss = head(x, labels)
    loss.backward()
    return loss.detach(), x.grad, head.weight.grad


@pytest.mark.parametrize("name", ["arcface", "curricularface", "circle"])
def test_chunk_size_changes_only_rounding(name: str) -> None:
    torch.manual_seed(0)
    emb, labels = torch.randn(16, 32), torch.randint(0, 300, (16,))
    state = PartialFC(build_margin(name), 32, 300).state_dict()
    results = []
    for options in ({"chunk_size": 1}, {"chunk_size": 7}, {"chunk_size": 1000}, {"chunk_memory_mb": 0.01},
                    {"engine": "dense"}):
        head = PartialFC(build_margin(name), 32, 300, **options)
        head.load_state_dict(state)
        results.append(_loss_and_grads(head, emb, labels))
    for loss, gx, gw in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-5, atol=1e-5)
        # float32 rounding, relative to each gradient's scale
        torch.testing.assert_close(gx, results[0][1], rtol=1e-4, atol=1e-5 * results[0][1].abs().max().item())
        torch.testing.assert_close(gw, results[0][2], rtol=1e-4, atol=1e-5 * results[0][2].abs().max().item())


def test_eval_no_grad_and_second_backward() -> None:
    torch.manual_seed(0)
    head = PartialFC(ArcFace(s=16.0), 8, 40, chunk_size=6).double()
    emb, labels = torch.randn(6, 8, dtype=torch.float64), torch.randint(0, 40, (6,))
    loss, gx, gw = _loss_and_grads(head, emb, labels)
    with torch.no_grad():
        assert head(emb, labels).item() == pytest.approx(loss.item(), rel=1e-12)
    head.weight.grad = None
    x = emb.clone().requires_grad_()
    again = head(x, labels)
    first = torch.autograd.grad(again, (x, head.weight), retain_graph=True)
    second = torch.autograd.grad(again * 2.0, (x, head.weight))  # pass 2 recomputed, scaled
    torch.testing.assert_close(first[0], gx)
    torch.testing.assert_close(first[1], gw)
    torch.testing.assert_close(second[0], 2 * gx)
    torch.testing.assert_close(second[1], 2 * gw)


def test_weight_gradient_is_not_copied() -> None:
    head = PartialFC(ArcFace(), 8, 50, chunk_size=16)
    head(torch.randn(4, 8), torch.tensor([0, 1, 2, 49])).backward()
    grad = head.weight.grad
    assert grad is not None and grad.shape == head.weight.shape and grad.is_contiguous()


def test_bad_chunk_options() -> None:
    with pytest.raises(ValueError, match=r"chunk_size=0: expected a positive number"):
        PartialFC(ArcFace(), 4, 5, chunk_size=0)
    with pytest.raises(ValueError, match=r"chunk_size=-3"):
        PartialFC(ArcFace(), 4, 5, chunk_size=-3)
    with pytest.raises(ValueError, match=r"chunk_memory_mb=0: expected a positive memory budget"):
        PartialFC(ArcFace(), 4, 5, chunk_memory_mb=0)
    with pytest.raises(ValueError, match=r"engine='fast': expected one of chunked, dense"):
        PartialFC(ArcFace(), 4, 5, engine="fast")
    head = PartialFC(ArcFace(), 4, 5, chunk_memory_mb=1e-6)
    with pytest.raises(ValueError, match=r"chunk_memory_mb=1e-06: too small for one class"):
        head(torch.randn(3, 4), torch.tensor([0, 1, 2]))


def test_autocast_bf16_close_to_float32() -> None:
    torch.manual_seed(0)
    head = PartialFC(ArcFace(), 64, 500, chunk_size=128)
    emb, labels = torch.randn(32, 64), torch.randint(0, 500, (32,))
    exact, gx, gw = _loss_and_grads(head, emb, labels)
    head.weight.grad = None
    x = emb.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = head(x, labels)
    mixed.backward()
    assert mixed.dtype == torch.float32 and head.weight.grad.dtype == torch.float32
    assert mixed.item() == pytest.approx(exact.item(), rel=1e-2)
    assert ((x.grad - gx).norm() / gx.norm()).item() < 0.05
    assert ((head.weight.grad - gw).norm() / gw.norm()).item() < 0.05


def test_head_config_selects_engine_and_chunk() -> None:
    from mlearn.module import EmbeddingModule, HeadConfig

    backbone = torch.nn.Linear(6, 8)
    backbone.embedding_size = 8  # type: ignore[assignment]
    config = HeadConfig(margin=ArcFace(), engine="dense", chunk_size=7, chunk_memory_mb=2.0)
    module = EmbeddingModule(backbone, config, num_classes=20)
    module.configure_model()
    assert (module.head.engine, module.head.chunk_size, module.head.chunk_memory_mb) == ("dense", 7, 2.0)
    bad = EmbeddingModule(backbone, HeadConfig(margin=ArcFace(), chunk_size=0), num_classes=20)
    with pytest.raises(ValueError, match="chunk_size=0"):
        bad.configure_model()
