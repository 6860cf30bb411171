"""Margin heads against naive per-sample oracles written from the papers (float64)."""

from __future__ import annotations

import copy
import inspect
import math
import statistics

import pytest
import torch

from mlearn import heads
from mlearn.heads import Margin, build_margin, list_margins

B, C = 9, 7
# rows 2 and 6 have their class elsewhere (-1); row 4's target angle is beyond pi - m for m up to 0.5
LABELS = torch.tensor([0, 3, -1, 6, 2, 5, -1, 1, 4])
EDGE_ROW = 4


def make_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cosine = torch.rand(B, C, generator=g, dtype=torch.float64) * 1.9 - 0.95
    cosine[EDGE_ROW, LABELS[EDGE_ROW]] = -0.97  # theta + 0.5 > pi
    cosine[0, 0] = 0.99
    norms = torch.rand(B, generator=g, dtype=torch.float64) * 40 + 1
    return cosine, LABELS.clone(), norms


# ---------------------------------------------------------------- oracles: one sample, one class at a time


def _arc(c: float, m: float) -> float:
    theta = math.acos(c)
    return math.cos(theta + m) if theta + m < math.pi else c - m * math.sin(m)  # official easy_margin=False


def _draws(m: float, std: float, seed: int) -> list:
    return torch.normal(
        m, std, (B,), generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    ).tolist()


def _plus_assign(draws: list, targets: list, rows: list) -> list:
    out = list(draws)
    ranked = sorted(rows, key=lambda i: -targets[i])  # highest target cosine first
    for i, m in zip(ranked, sorted(draws[i] for i in rows)):
        out[i] = m  # ... gets the smallest margin
    return out


def oracle(name: str, kw: dict, cosine, labels, norms, seed: int = 0):
    cos = cosine.tolist()
    lab = labels.tolist()
    rows = [i for i in range(B) if lab[i] >= 0]
    targets = [cos[i][lab[i]] if lab[i] >= 0 else None for i in range(B)]
    margin = build_margin(name, **kw)
    s = margin.s
    out = [[s * c for c in row] for row in cos]
    if name == "circle":
        m = kw.get("m", 0.25)
        out = [[s * max(c + m, 0) * (c - m) for c in row] for row in cos]
    if name == "curricularface":
        m = kw.get("m", 0.5)
        t = 0.01 * statistics.fmean(targets[i] for i in rows)  # from t = 0, updated before use
        for i in rows:
            ct = math.cos(math.acos(targets[i]) + m)
            out[i] = [s * c * (t + c) if c > ct else s * c for c in cos[i]]
    if name.startswith("elasticface"):
        draws = _draws(kw["m"], kw["std"], seed)
        if kw.get("plus"):
            draws = _plus_assign(draws, targets, rows)
    if name == "adaface":
        m, h, a = kw.get("m", 0.4), kw.get("h", 0.333), kw.get("t_alpha", 0.01)
        n = [min(max(x, 0.001), 100) for x in norms.tolist()]
        mu = a * statistics.fmean(n) + (1 - a) * 20.0
        sd = a * statistics.stdev(n) + (1 - a) * 100.0
    for i in rows:
        c = targets[i]
        if name in ("softmax", "normface"):
            v = c
        elif name == "arcface":
            v = _arc(c, kw.get("m", 0.5))
        elif name == "cosface":
            v = c - kw.get("m", 0.4)
        elif name == "combined":
            m1, m2, m3 = kw.get("m1", 1.0), kw.get("m2", 0.5), kw.get("m3", 0.0)
            v = math.cos(min(m1 * math.acos(c) + m2, math.pi)) - m3
        elif name == "elasticface_arc":
            v = math.cos(math.acos(c) + draws[i])
        elif name == "elasticface_cos":
            v = c - draws[i]
        elif name == "adaface":
            z = min(max(h * (n[i] - mu) / (sd + 1e-3), -1), 1)
            theta = math.acos(min(max(c, -1 + 1e-3), 1 - 1e-3))
            v = math.cos(min(max(theta - m * z, 1e-3), math.pi - 1e-3)) - (m + m * z)
        elif name == "curricularface":
            v = _arc(c, kw.get("m", 0.5))
        elif name == "circle":
            m = kw.get("m", 0.25)
            v = max(1 + m - c, 0) * (c - (1 - m))
        else:
            raise AssertionError(name)
        out[i][lab[i]] = s * v
    return torch.tensor(out, dtype=torch.float64)


CASES = [
    ("softmax", {}),
    ("normface", {"s": 30.0}),
    ("arcface", {}),
    ("arcface", {"s": 32.0, "m": 0.3}),
    ("cosface", {}),
    ("combined", {}),
    ("combined", {"m1": 1.0, "m2": 0.3, "m3": 0.2}),
    ("combined", {"m1": 1.35, "m2": 0.25, "m3": 0.1}),
    ("elasticface_arc", {"m": 0.5, "std": 0.05}),
    ("elasticface_arc", {"m": 0.5, "std": 0.05, "plus": True}),
    ("elasticface_cos", {"m": 0.35, "std": 0.05}),
    ("elasticface_cos", {"m": 0.35, "std": 0.05, "plus": True}),
    ("adaface", {}),
    ("adaface", {"m": 0.5, "h": 0.5, "t_alpha": 0.5}),
    ("curricularface", {}),
    ("circle", {}),
]


def _call(margin: Margin, cosine, labels, norms, seed: int = 0, **extra):
    gen = torch.Generator().manual_seed(seed)
    return margin(cosine, labels, norms, generator=gen, **extra)


@pytest.mark.parametrize("name,kw", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_oracle(name: str, kw: dict) -> None:
    cosine, labels, norms = make_inputs()
    margin = build_margin(name, **kw).double().train()
    got = _call(margin, cosine, labels, norms)
    torch.testing.assert_close(got, oracle(name, kw, cosine, labels, norms), rtol=1e-9, atol=1e-9)


def test_every_margin_has_an_oracle_case() -> None:
    assert set(list_margins()) == {name for name, _ in CASES}


def test_table_defaults_and_signatures() -> None:
    table = {
        "Softmax": {"s": 64.0},
        "ArcFace": {"s": 64.0, "m": 0.5},
        "CosFace": {"s": 64.0, "m": 0.4},
        "CombinedMargin": {"s": 64.0, "m1": 1.0, "m2": 0.5, "m3": 0.0},
        "ElasticArcFace": {"s": 64.0, "m": 0.5, "std": 0.05, "plus": False},
        "ElasticCosFace": {"s": 64.0, "m": 0.35, "std": 0.05, "plus": False},
        "AdaFace": {"s": 64.0, "m": 0.4, "h": 0.333, "t_alpha": 0.01},
        "CurricularFace": {"s": 64.0, "m": 0.5},
        "CircleMargin": {"s": 256.0, "m": 0.25},
    }
    for cls_name, defaults in table.items():
        cls = getattr(heads, cls_name)
        assert issubclass(cls, Margin)
        params = dict(inspect.signature(cls).parameters)
        assert {k: p.default for k, p in params.items()} == defaults, cls_name
        assert all(p.annotation is not inspect.Parameter.empty for p in params.values()), cls_name
    assert type(build_margin("normface")) is heads.Softmax


def test_registry_errors() -> None:
    with pytest.raises(KeyError, match=r"unknown margin 'nope'.*arcface"):
        build_margin("nope")
    with pytest.raises(TypeError, match="margin_m"):
        build_margin("arcface", margin_m=0.5)


def test_bad_inputs() -> None:
    cosine, labels, _ = make_inputs()
    with pytest.raises(ValueError, match="AdaFace needs the embedding norms"):
        build_margin("adaface")(cosine, labels)
    bad = labels.clone()
    bad[1] = C
    with pytest.raises(ValueError, match=f"label {C} out of range"):
        build_margin("arcface")(cosine, bad)
    with pytest.raises(ValueError, match="s=0"):
        build_margin("cosface", s=0)


# (margin, kwargs, the error's "name=value" and range): each margin's hyper-parameters outside the
# range where the loss means anything are refused at construction
OUT_OF_RANGE = [
    ("arcface", {"m": math.pi}, "m=3.14159", "[0, 3.14159)"),  # every target in the fallback branch
    ("arcface", {"m": 3.2}, "m=3.2", "[0, 3.14159)"),
    ("arcface", {"m": -0.1}, "m=-0.1", "[0, 3.14159)"),
    ("arcface", {"s": 0.0}, "s=0.0", "positive"),
    ("arcface", {"s": -64.0}, "s=-64.0", "positive"),
    ("softmax", {"s": math.inf}, "s=inf", "positive finite"),
    ("curricularface", {"m": 3.5}, "m=3.5", "[0, 3.14159)"),
    ("combined", {"m2": 3.2}, "m2=3.2", "[0, 3.14159)"),
    ("combined", {"m1": 0.5}, "m1=0.5", "[1, inf)"),
    ("combined", {"m3": -0.2}, "m3=-0.2", "[0, 2)"),
    ("cosface", {"m": 2.0}, "m=2.0", "[0, 2)"),
    ("cosface", {"m": -0.35}, "m=-0.35", "[0, 2)"),
    ("elasticface_arc", {"m": 3.3}, "m=3.3", "[0, 3.14159)"),
    ("elasticface_cos", {"m": 2.5}, "m=2.5", "[0, 2)"),
    ("elasticface_cos", {"std": -0.05}, "std=-0.05", ">= 0"),
    ("adaface", {"m": 1.0}, "m=1.0", "[0, 1)"),
    ("adaface", {"h": -0.3}, "h=-0.3", ">= 0"),
    ("circle", {"m": 0.5}, "m=0.5", "[0, 0.5)"),
    ("circle", {"m": -0.25}, "m=-0.25", "[0, 0.5)"),
]


@pytest.mark.parametrize("name,kw,named,valid", OUT_OF_RANGE,
                         ids=[f"{n}-{'-'.join(map(str, kw.items()))}" for n, kw, _, _ in OUT_OF_RANGE])
def test_out_of_range_hyperparameters_are_refused(name: str, kw: dict, named: str, valid: str) -> None:
    with pytest.raises(ValueError) as error:
        build_margin(name, **kw)
    message = str(error.value)
    assert message.startswith(named) and valid in message, message


@pytest.mark.parametrize("name,kw", [
    ("arcface", {"m": 0.0}), ("arcface", {"m": 3.14}), ("cosface", {"m": 0.0}),
    ("combined", {"m1": 4.0, "m2": 0.0, "m3": 0.0}), ("circle", {"m": 0.0}),
    ("adaface", {"m": 0.0, "h": 0.0}), ("elasticface_cos", {"std": 0.0}),
])
def test_range_boundaries_that_are_accepted(name: str, kw: dict) -> None:
    cosine, labels, norms = make_inputs()
    assert torch.isfinite(_call(build_margin(name, **kw).double(), cosine, labels, norms)).all()


@pytest.mark.parametrize("name", list_margins())
def test_eval_leaves_buffers_and_rows_without_target(name: str) -> None:
    cosine, labels, norms = make_inputs()
    margin = build_margin(name).double().eval()
    before = copy.deepcopy(margin.state_dict())
    out = _call(margin, cosine, labels, norms)
    for key, value in margin.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert out.shape == (B, C) and torch.isfinite(out).all()
    if name != "circle":  # circle changes every non-target logit; the rest leave -1 rows at s·cos
        torch.testing.assert_close(out[labels < 0], margin.s * cosine[labels < 0])


def test_adaface_state_evolution() -> None:
    margin = build_margin("adaface", t_alpha=0.3).double()
    mean, std = 20.0, 100.0
    for step in range(4):
        cosine, labels, norms = make_inputs(step)
        margin(cosine, labels, norms)
        mean = 0.3 * norms.mean().item() + 0.7 * mean
        std = 0.3 * norms.std().item() + 0.7 * std
        assert margin.batch_mean.item() == pytest.approx(mean) and margin.batch_std.item() == pytest.approx(
            std
        )
    margin.eval()
    cosine, labels, norms = make_inputs(9)
    first = margin(cosine, labels, norms)
    assert margin.batch_mean.item() == pytest.approx(mean)
    torch.testing.assert_close(margin(cosine, labels, norms), first)
    margin.train()
    margin(cosine[:1], labels[:1], norms[:1])  # a batch of one: std is undefined and left alone
    assert margin.batch_std.item() == pytest.approx(std)
    assert margin.batch_mean.item() == pytest.approx(0.3 * norms[0].item() + 0.7 * mean)


def test_curricularface_state_evolution() -> None:
    margin = build_margin("curricularface").double()
    t = 0.0
    for step in range(4):
        cosine, labels, norms = make_inputs(step)
        margin(cosine, labels, norms)
        t = 0.01 * cosine[labels >= 0, labels[labels >= 0]].mean().item() + 0.99 * t
        assert margin.t.item() == pytest.approx(t)
    margin.eval()
    margin(*make_inputs(7))
    assert margin.t.item() == pytest.approx(t)
    assert "t" in margin.state_dict()


def test_elasticface_margin_distribution_and_plus_order() -> None:
    n = 20000
    g = torch.Generator().manual_seed(3)
    cosine = torch.rand(n, 1, generator=g, dtype=torch.float64) * 2 - 1
    labels = torch.zeros(n, dtype=torch.long)
    margin = build_margin("elasticface_cos", s=1.0, m=0.35, std=0.05)
    drawn = cosine[:, 0] - _call(margin, cosine, labels, None, seed=5)[:, 0]
    assert drawn.mean().item() == pytest.approx(0.35, abs=2e-3)
    assert drawn.std().item() == pytest.approx(0.05, rel=0.03)

    plus = build_margin("elasticface_cos", s=1.0, m=0.35, std=0.05, plus=True)
    sorted_drawn = cosine[:, 0] - _call(plus, cosine, labels, None, seed=5)[:, 0]
    torch.testing.assert_close(sorted_drawn.sort().values, drawn.sort().values)  # same draws, reassigned
    by_cosine = torch.argsort(cosine[:, 0], descending=True)
    assert (sorted_drawn[by_cosine].diff() >= -1e-12).all()  # highest cosine -> smallest margin

    # ElasticFace-Arc: the same draws enter as an angle
    arc = build_margin("elasticface_arc", s=1.0, m=0.5, std=0.05)
    out = _call(arc, cosine, labels, None, seed=5)[:, 0]
    angle = torch.acos(out.clamp(-1, 1)) - torch.acos(cosine[:, 0])
    ok = torch.acos(cosine[:, 0]) < 2.5
    assert angle[ok].mean().item() == pytest.approx(0.5, abs=3e-3)


@pytest.mark.parametrize("name", ["arcface", "curricularface", "elasticface_arc_plus", "adaface", "circle"])
def test_sharded_columns_with_target_cosine_match_full(name: str) -> None:
    """Splitting the columns (labels -1 where the target is in the other block) and passing the rows'
    target cosines reproduces the full computation: what PartialFC relies on."""
    cosine, _, norms = make_inputs()
    labels = torch.tensor([0, 3, 5, 6, 2, 5, 1, 1, 4])
    make = (
        (lambda: build_margin("elasticface_arc", plus=True))
        if name.endswith("plus")
        else (lambda: build_margin(name))
    )
    full_margin, m0, m1 = make().double(), make().double(), make().double()
    full = _call(full_margin, cosine, labels, norms, seed=1)
    target = cosine[torch.arange(B), labels]
    parts = []
    for margin, lo, hi in ((m0, 0, 3), (m1, 3, C)):
        local = torch.where((labels >= lo) & (labels < hi), labels - lo, -1)
        parts.append(_call(margin, cosine[:, lo:hi], local, norms, seed=1, target_cosine=target))
        for key, value in full_margin.state_dict().items():
            torch.testing.assert_close(margin.state_dict()[key], value)
    torch.testing.assert_close(torch.cat(parts, dim=1), full)


GRAD_CASES = [
    ("softmax", {}),
    ("arcface", {}),
    ("cosface", {}),
    ("combined", {"m1": 1.2, "m2": 0.3, "m3": 0.1}),
    ("combined", {}),
    ("elasticface_arc", {"m": 0.5, "std": 0.05, "plus": True}),
    ("elasticface_cos", {"m": 0.35, "std": 0.05}),
    ("adaface", {}),
    ("curricularface", {}),
]


@pytest.mark.parametrize("name,kw", GRAD_CASES, ids=[n for n, _ in GRAD_CASES])
def test_gradcheck(name: str, kw: dict) -> None:
    g = torch.Generator().manual_seed(1)
    cosine = (torch.rand(4, 5, generator=g, dtype=torch.float64) * 1.6 - 0.8).requires_grad_()
    labels = torch.tensor([1, -1, 4, 0])
    norms = torch.rand(4, generator=g, dtype=torch.float64) * 30 + 1
    margin = build_margin(name, **kw).double().eval()
    if name == "curricularface":
        margin.t.fill_(0.4)  # make the hard-negative modulation matter
    assert torch.autograd.gradcheck(lambda c: _call(margin, c, labels, norms, seed=2), (cosine,))


def test_circle_gradient_treats_alpha_as_constant() -> None:
    """Official Circle loss detaches α, so d logit / d cosθ = s·α (gradcheck's finite differences would
    also differentiate α)."""
    cosine, labels, _ = make_inputs()
    cosine.requires_grad_()
    margin = build_margin("circle", s=2.0, m=0.25)
    margin(cosine, labels).sum().backward()
    alpha = (cosine.detach() + 0.25).clamp_min(0)
    rows = labels >= 0
    alpha[rows, labels[rows]] = (1.25 - cosine.detach()[rows, labels[rows]]).clamp_min(0)
    torch.testing.assert_close(cosine.grad, 2.0 * alpha)


def test_finite_gradient_at_cosine_one() -> None:
    cosine = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 0])
    for name in list_margins():
        cosine.grad = None
        _call(
            build_margin(name).double(), cosine, labels, torch.ones(2, dtype=torch.float64)
        ).sum().backward()
        assert torch.isfinite(cosine.grad).all(), name


def test_margin_scheduler_refuses_values_the_margin_refuses() -> None:
    from mlearn.margin_schedule import MarginScheduler

    MarginScheduler(initial_margin=0.0, final_margin=0.2).check_values(build_margin("arcface"))
    with pytest.raises(
        ValueError, match=r"final_margin=3.3 for ArcFace: m=3.3: expected a number in \[0, 3.14"
    ):
        MarginScheduler(initial_margin=0.0, final_margin=3.3).check_values(build_margin("arcface"))
    with pytest.raises(ValueError, match=r"initial_margin=-0.1 for CosFace: m=-0.1"):
        MarginScheduler(initial_margin=-0.1, final_margin=0.2).check_values(build_margin("cosface"))

