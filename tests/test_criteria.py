"""Loss criteria (mlearn.heads.criteria) against an independent float64 computation written from the
formulas of issue 19: loss and gradients of embeddings, centers and bias, on both engines, with
sampling, on 1, 2 and 3 gloo ranks; edge cases and the bad-input messages."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from ddp_utils import run_in_ddp

from mlearn.heads import (
    ArcFace,
    CosFace,
    PartialFC,
    SphereFace2,
    UniFace,
    build_criterion,
    list_criteria,
)
from mlearn.heads import distributed as D

NUM_CLASSES, DIM = 11, 6
NAMES = ["log_spherical", "log_taylor", "sphereface2", "uniface", "unpg", "zloss"]
# (criterion name, kwargs) cases checked against the reference
CASES = [
    ("sphereface2", {}),
    ("sphereface2", {"straight_through": False}),
    ("sphereface2", {"magn_type": "A"}),
    ("sphereface2", {"magn_type": "A", "straight_through": False}),
    ("sphereface2", {"magn_type": "M", "m": 1.5, "straight_through": False}),
    ("uniface", {"s": 16.0, "l": 0.7}),
    ("unpg", {}),
    ("unpg", {"wisk": 0.2}),
    ("log_taylor", {}),
    ("log_spherical", {"eps": 1e-3}),
    ("zloss", {"a": 2.0, "b": 0.5}),
]


# ------------------------------------------------------------------------------------ reference
def _g(c, t):
    return 2.0 * ((c + 1.0) / 2.0) ** t - 1.0


def _sphereface2_ref(cos, onehot, crit, bias):
    t, m, r = crit.t, crit.m, crit.r
    theta = torch.acos(cos.clamp(-1 + 1e-7, 1 - 1e-7))
    if crit.magn_type == "C":
        big = torch.where(onehot, _g(cos, t) - m, _g(cos, t) + m)
    elif crit.magn_type == "A":
        big = torch.where(onehot, _g(torch.cos(torch.clamp(theta + m, max=math.pi)), t), _g(cos, t))
    else:
        big = torch.where(onehot, _g(torch.cos(torch.clamp(theta * m, max=math.pi)), t), _g(cos, t))
    if crit.straight_through:  # as if z = r·cos + b
        z = r * cos + bias + (r * big - r * cos).detach()
    else:
        z = r * big + bias
    rows = crit.alpha * F.softplus(-z) * onehot + (1 - crit.alpha) * F.softplus(z) * ~onehot
    return crit.lw / r * rows.sum(dim=1).mean()


def _reference(name, crit, margin, x, w, labels, bias, s):
    """Float64 loss from the issue's formulas: x [B, D], w [C', D] (kept columns), labels [B] columns."""
    cos = F.normalize(x) @ F.normalize(w).t()
    onehot = F.one_hot(labels, w.shape[0]).bool()
    if name == "sphereface2":
        return _sphereface2_ref(cos, onehot, crit, bias)
    if name == "uniface":
        pos = crit.s * (cos - crit.m) - bias
        neg = crit.s * cos - bias
        return (F.softplus(-pos) * onehot + crit.l * F.softplus(neg) * ~onehot).sum(dim=1).mean()
    o = margin(cos, labels)
    o_y = o[onehot]
    if name == "unpg":
        xh = F.normalize(x)
        sims = [(xh[i] @ xh[j]) for i in range(len(labels)) for j in range(i + 1, len(labels))
                if labels[i] != labels[j]]
        extra = torch.zeros(0, dtype=x.dtype)
        if sims:
            sims_t = torch.stack(sims)
            ordered = sorted(float(v) for v in sims_t.detach())
            q1, q3 = ordered[int(0.25 * len(ordered))], ordered[int(0.75 * len(ordered))]
            lo, hi = q1 - crit.wisk * (q3 - q1), q3 + crit.wisk * (q3 - q1)
            extra = s * sims_t[(sims_t >= lo) & (sims_t <= hi)]
        full = torch.cat([o, extra.expand(o.shape[0], -1)], dim=1)
        return (torch.logsumexp(full, dim=1) - o_y).mean()
    if name in ("log_taylor", "log_spherical"):
        f = 1 + o + o * o / 2 if name == "log_taylor" else o * o + crit.eps
        return (-torch.log(f[onehot] / f.sum(dim=1))).mean()
    assert name == "zloss"
    z = (o_y - o.mean(dim=1)) / o.std(dim=1, unbiased=False)
    return (F.softplus(crit.a * (crit.b - z)) / crit.a).mean()


def _margin_for(crit):
    return None if crit.own_margin else ArcFace(s=8.0, m=0.3)


def _batch(world, rank, seed=0):
    g = torch.Generator().manual_seed(seed)
    sizes = [4, 3, 5][:world] if world > 1 else [9]
    emb = torch.randn(sum(sizes), DIM, generator=g, dtype=torch.float64)
    labels = torch.randint(0, NUM_CLASSES, (sum(sizes),), generator=g)
    labels[0] = labels[-1]
    lo = sum(sizes[:rank])
    return emb, labels, lo, lo + sizes[rank]


def _run_case(name, kwargs, emb, labels, lo, hi, engine="chunked", rate=1.0):
    """One training step of PartialFC with the criterion vs the float64 reference (loss, gradients of
    x, W and bias asserted) -> the bias gradient or None."""
    k = 1
    torch.manual_seed(3)
    crit = build_criterion(name, **kwargs)
    margin = _margin_for(crit)
    head = PartialFC(margin, DIM, NUM_CLASSES, sample_rate=rate, num_subcenters=k, criterion=crit,
                     engine=engine, chunk_size=2).double()
    full = D.all_gather_variable(head.weight.detach())
    x = emb[lo:hi].clone().requires_grad_()
    loss = head(x, labels[lo:hi])
    loss.backward()
    kept = torch.arange(NUM_CLASSES)
    if head.last_sample_index is not None:
        kept = D.all_gather_variable(head.last_sample_index + head.class_start)
    remap = torch.full((NUM_CLASSES,), -1, dtype=torch.long)
    remap[kept] = torch.arange(kept.numel())
    rows = full.view(NUM_CLASSES, k, DIM)[kept].reshape(-1, DIM).clone().requires_grad_()
    ref_x = emb.clone().requires_grad_()
    bias = getattr(head.criterion, "bias", None)
    ref_b = None if bias is None else bias.detach().clone().requires_grad_()
    s = margin.s if margin is not None else 1.0
    ref_margin = ArcFace(s=8.0, m=0.3).double() if margin is not None else None
    ref = _reference(name, head.criterion, ref_margin, ref_x, rows, remap[labels], ref_b, s)
    ref.backward()
    case = f"{name} {kwargs} {engine} rate={rate}"
    torch.testing.assert_close(loss.detach(), ref.detach(), msg=case)
    torch.testing.assert_close(x.grad, ref_x.grad[lo:hi], msg=f"{case} embedding grad")
    ref_w = torch.zeros_like(full).view(NUM_CLASSES, k, DIM)
    ref_w[kept] = rows.grad.view(-1, k, DIM)
    start = head.class_start * k
    torch.testing.assert_close(head.weight.grad, ref_w.view(-1, DIM)[start : start + head.num_local * k],
                               msg=f"{case} center grad")
    if bias is None:
        return None
    torch.testing.assert_close(bias.grad, ref_b.grad, msg=f"{case} bias grad")
    return float(bias.grad)


# ------------------------------------------------------------------------------------ API
def test_registry_names_defaults_and_errors():
    assert list_criteria() == NAMES
    crit = build_criterion("sphereface2")
    assert (crit.alpha, crit.r, crit.m, crit.t, crit.lw, crit.magn_type) == (0.7, 40.0, 0.4, 3.0, 50.0, "C")
    assert build_criterion("sphereface2", magn_type="A").m == 0.5
    assert build_criterion("sphereface2", magn_type="M").m == 1.7
    uni = build_criterion("uniface")
    assert (uni.s, uni.m, uni.l, uni.r) == (64.0, 0.4, 1.0, 1.0)
    assert build_criterion("unpg").wisk == 1.5
    assert build_criterion("log_spherical").eps == 1e-5
    z = build_criterion("zloss")
    assert (z.a, z.b) == (1.0, 0.0)
    for name in NAMES:
        assert isinstance(build_criterion(name), torch.nn.Module)
    with pytest.raises(KeyError, match="unknown criterion 'nope'"):
        build_criterion("nope")
    with pytest.raises(TypeError, match="unknown argument"):
        build_criterion("zloss", c=1.0)
    with pytest.raises(TypeError, match="unknown argument"):
        build_criterion("log_taylor", eps=1.0)


def test_bad_input_one_line_each():
    with pytest.raises(ValueError, match="'sphereface2' carries its own margin.*ArcFace") as info:
        PartialFC(ArcFace(), DIM, NUM_CLASSES, criterion="sphereface2")
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="'uniface' carries its own margin.*CosFace"):
        PartialFC(CosFace(), DIM, NUM_CLASSES, criterion=UniFace())
    with pytest.raises(ValueError, match="'zloss' consumes a margin's logits: margin=None"):
        PartialFC(None, DIM, NUM_CLASSES, criterion="zloss")
    with pytest.raises(ValueError, match="margin=None"):
        PartialFC(None, DIM, NUM_CLASSES)
    with pytest.raises(ValueError, match="magn_type='X': expected one of C, A, M"):
        SphereFace2(magn_type="X")
    with pytest.raises(TypeError, match="criterion: expected"):
        PartialFC(ArcFace(), DIM, NUM_CLASSES, criterion=3)
    with pytest.raises(ValueError, match="alpha"):
        SphereFace2(alpha=1.0)


def test_bias_is_one_replicated_scalar_parameter():
    head = PartialFC(None, DIM, 100, sample_rate=0.5, criterion="uniface")
    assert [n for n, _ in head.named_parameters()] == ["weight", "criterion.bias"]
    assert head.criterion.bias.shape == ()
    assert head.replicated_parameter_names() == ["criterion.bias"]
    assert head.criterion.bias.item() == pytest.approx(math.log(10 * 100 * 0.5))
    assert PartialFC(ArcFace(), DIM, 100, criterion="zloss").replicated_parameter_names() == []


@pytest.mark.parametrize("magn_type", ["C", "A", "M"])
def test_sphereface2_bias_init_zeroes_its_gradient_at_zero_cosines(magn_type):
    classes = 7
    crit = SphereFace2(magn_type=magn_type)
    head = PartialFC(None, classes + 1, classes, criterion=crit).double()
    with torch.no_grad():
        head.weight.copy_(torch.eye(classes, classes + 1))
    x = torch.zeros(3, classes + 1, dtype=torch.float64)
    x[:, -1] = 1.0  # orthogonal to every center: every cosine is 0
    head(x, torch.tensor([0, 3, 6])).backward()
    assert abs(crit.bias.grad.item()) < 1e-5


def test_none_criterion_is_todays_loss():
    torch.manual_seed(0)
    a = PartialFC(ArcFace(), DIM, NUM_CLASSES)
    torch.manual_seed(0)
    b = PartialFC(ArcFace(), DIM, NUM_CLASSES, criterion=None)
    x = torch.randn(5, DIM)
    y = torch.tensor([0, 1, 2, 3, 4])
    assert torch.equal(a(x, y), b(x, y))
    assert b.criterion is None


# ------------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("engine", ["chunked", "dense"])
@pytest.mark.parametrize("name,kwargs", CASES)
def test_matches_float64_reference(name, kwargs, engine):
    emb, labels, lo, hi = _batch(1, 0)
    _run_case(name, kwargs, emb, labels, lo, hi, engine=engine)
    _run_case(name, kwargs, emb, labels, lo, hi, engine=engine, rate=0.5)


def test_chunked_equals_dense_with_subcenters():
    emb, labels, _, _ = _batch(1, 0)
    for name in NAMES:
        results = []
        for engine in ("chunked", "dense"):
            torch.manual_seed(5)
            crit = build_criterion(name)
            head = PartialFC(_margin_for(crit), DIM, NUM_CLASSES, num_subcenters=2, criterion=crit,
                             engine=engine, chunk_size=3).double()
            x = emb.clone().requires_grad_()
            loss = head(x, labels)
            loss.backward()
            bias = getattr(crit, "bias", None)
            results.append((loss.detach(), x.grad, head.weight.grad, None if bias is None else bias.grad))
        for got, want in zip(results[0], results[1]):
            torch.testing.assert_close(got, want, msg=name)


def _ddp_case(rank, world):
    emb, labels, lo, hi = _batch(world, rank)
    out = []
    for name, kwargs in CASES[::2] + [("uniface", {"s": 16.0})]:
        for rate in (1.0, 0.6):
            out.append(_run_case(name, kwargs, emb, labels, lo, hi, rate=rate))
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 3])
def test_world_sizes_equal_one_process(world):
    results = run_in_ddp(world, _ddp_case)
    assert results[0] == results[-1]  # the bias gradient is the same on every rank


# ------------------------------------------------------------------------------------ edge cases
@pytest.mark.parametrize("name,kwargs", [("sphereface2", {"magn_type": "A", "straight_through": False}),
                                         ("sphereface2", {"magn_type": "M", "straight_through": False}),
                                         ("sphereface2", {}), ("uniface", {}), ("zloss", {}),
                                         ("log_taylor", {}), ("log_spherical", {}), ("unpg", {})])
@pytest.mark.parametrize("engine", ["chunked", "dense"])
def test_theta_near_pi_and_huge_logits_stay_finite(name, kwargs, engine):
    crit = build_criterion(name, **kwargs)
    margin = None if crit.own_margin else ArcFace(s=64.0)
    head = PartialFC(margin, DIM, 4, criterion=crit, engine=engine)
    with torch.no_grad():
        head.weight.copy_(torch.eye(4, DIM) * 50.0)
    x = torch.zeros(3, DIM)
    x[0, 0] = -1.0  # θ_y = π exactly
    x[1, 0], x[1, 1] = -1.0, 1e-4  # θ_y just below π
    x[2, 2] = 1e3  # aligned with its class: the largest logits
    x.requires_grad_()
    loss = head(x, torch.tensor([0, 0, 2]))
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(x.grad).all() and torch.isfinite(head.weight.grad).all()
    if getattr(crit, "bias", None) is not None:
        assert torch.isfinite(crit.bias.grad)


@pytest.mark.parametrize("engine", ["chunked", "dense"])
def test_unpg_with_one_identity_is_the_margin_softmax(engine):
    emb, _, _, _ = _batch(1, 0)
    labels = torch.full((emb.shape[0],), 4)
    grads = []
    for criterion in ("unpg", None):
        torch.manual_seed(1)
        head = PartialFC(ArcFace(s=8.0), DIM, NUM_CLASSES, criterion=criterion, engine=engine).double()
        x = emb.clone().requires_grad_()
        loss = head(x, labels)
        loss.backward()
        grads.append((loss.detach(), x.grad, head.weight.grad))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want)


def test_embedding_module_keeps_the_bias_out_of_ddp():
    from mlearn.module import EmbeddingModule, HeadConfig

    class Tiny(torch.nn.Module):
        embedding_size = DIM

        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, DIM)

        def forward(self, x):
            return self.lin(x)

    model = EmbeddingModule(Tiny(), HeadConfig(criterion="uniface"), num_classes=NUM_CLASSES)
    model.configure_model()
    assert model.head.margin is None and isinstance(model.head.criterion, UniFace)
    assert model._ddp_params_and_buffers_to_ignore == ["head.weight", "head.criterion.bias"]
    assert any(p is model.head.criterion.bias for g in model._param_groups() for p in g["params"])


def test_train_cli_head_check_accepts_own_margin_criteria_and_keeps_the_bias():
    from mlearn.module import EmbeddingModule, HeadConfig
    from mlearn.train_cli import check_head

    backbone = torch.nn.Linear(3, DIM)
    backbone.embedding_size = DIM  # type: ignore[assignment]
    criterion = build_criterion("uniface")
    model = EmbeddingModule(backbone, HeadConfig(criterion=criterion), num_classes=NUM_CLASSES)
    check_head(model)  # the 2-class stand-in must not touch the configured criterion
    model.configure_model()
    assert model.head.criterion.bias.item() == pytest.approx(math.log(10 * NUM_CLASSES))
    with pytest.raises(ValueError, match="model.head: "):
        check_head(EmbeddingModule(backbone, HeadConfig(margin=ArcFace(), criterion="uniface"),
                                   num_classes=NUM_CLASSES))
