"""CR-FIQA quality head: the head's recorded certainty (CCS, NNCCS) against a direct computation, world 2
equals one process, no quality gradient into the class centers, and one training step of the module."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Optional

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mlearn.heads import ArcFace, CosFace, CurricularFace, PartialFC
from mlearn.quality import QualityConfig, QualityHead, certainty_ratio

DIM, CLASSES, BATCH = 8, 10, 6
ROOT = Path(__file__).resolve().parents[1]


def _head(engine: str, margin: Any = "arc", **kw: Any) -> PartialFC:
    torch.manual_seed(0)
    margins = {"arc": ArcFace(s=8.0, m=0.3), "cos": CosFace(s=8.0, m=0.2),
               "curricular": CurricularFace(s=8.0, m=0.3), None: None}
    head = PartialFC(margins[margin], DIM, CLASSES, engine=engine, chunk_size=3, record_certainty=True, **kw)
    return head.double()


def _data(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, DIM, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 3, 3, 7, 9, 1])
    return x, labels


def direct_certainty(weight: torch.Tensor, k: int, x: torch.Tensor, labels: torch.Tensor,
                     kept: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(CCS, NNCCS) from the normalised centers [C·K, D]: max over sub-centers, clamp, over ``kept``."""
    centers = F.normalize(weight.detach().view(-1, k, weight.shape[1]), dim=2)
    cos = torch.einsum("bd,ckd->bck", F.normalize(x.detach(), dim=1), centers).amax(dim=2).clamp(-1, 1)
    classes = torch.arange(cos.shape[1]) if kept is None else kept
    rows = torch.arange(x.shape[0])
    ccs = cos[rows, labels]
    others = cos.clone()
    others[rows, labels] = float("-inf")
    return ccs, others[:, classes].amax(dim=1)


CASES: Dict[str, Dict[str, Any]] = {
    "arcface": {},
    "cosface": {"margin": "cos"},
    "curricular": {"margin": "curricular"},
    "subcenters": {"num_subcenters": 3},
    "sampled": {"sample_rate": 0.5},
    "sphereface2": {"margin": None, "criterion": "sphereface2"},
    "straight_through": {"straight_through": True},
}


@pytest.mark.parametrize("engine", ["chunked", "dense"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_certainty_matches_a_direct_computation(engine: str, case: str) -> None:
    head = _head(engine, **CASES[case])
    x, labels = _data()
    head(x.requires_grad_(), labels).backward()
    assert head.last_certainty is not None and head.last_global_batch == BATCH
    ccs, nnccs = head.last_certainty
    assert not ccs.requires_grad and not nnccs.requires_grad
    want_ccs, want_nn = direct_certainty(head.weight, head.num_subcenters, x, labels, head.last_sample_index)
    if case == "sampled":
        kept = head.last_sample_index
        assert kept is not None and kept.numel() < CLASSES  # the max really runs over a subset
    torch.testing.assert_close(ccs, want_ccs, rtol=0, atol=1e-12)
    torch.testing.assert_close(nnccs, want_nn, rtol=0, atol=1e-12)
    cr = certainty_ratio(ccs, nnccs)
    torch.testing.assert_close(cr, want_ccs / (want_nn + 1 + 1e-9), rtol=1e-12, atol=0)


def test_recording_is_off_by_default_and_in_eval() -> None:
    torch.manual_seed(0)
    head = PartialFC(ArcFace(s=8.0, m=0.3), DIM, CLASSES)
    x, labels = _data()
    head(x.float(), labels)
    assert head.last_certainty is None
    head = _head("chunked", sample_rate=0.5).eval()
    with torch.no_grad():
        head(x, labels)
    assert head.last_certainty is not None  # eval: every class is in use
    torch.testing.assert_close(head.last_certainty[1], direct_certainty(head.weight, 1, x, labels)[1])


@pytest.mark.parametrize("engine", ["chunked", "dense"])
def test_quality_loss_sends_no_gradient_into_the_centers(engine: str) -> None:
    x, labels = _data()
    grads = []
    for weight in (0.0, 10.0):
        head = _head(engine, num_subcenters=2)
        quality = QualityHead(DIM).double()
        emb = x.clone().requires_grad_()
        loss = head(emb, labels)
        ccs, nnccs = head.last_certainty  # type: ignore[misc]
        loss = loss + QualityConfig(weight=weight).loss(quality(emb), ccs, nnccs)
        loss.backward()
        grads.append((head.weight.grad.clone(), emb.grad.clone(), quality.fc.weight.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=0)
    assert not torch.equal(grads[0][1], grads[1][1])  # it does reach the embeddings
    assert grads[1][2].abs().sum() > 0


def test_loss_over_the_global_batch() -> None:
    predicted, ccs, nnccs = torch.randn(4).double(), torch.rand(4).double(), torch.rand(4).double()
    config = QualityConfig(weight=10.0, beta=0.5)
    mean = config.loss(predicted, ccs, nnccs)
    torch.testing.assert_close(mean, 10 * F.smooth_l1_loss(predicted, certainty_ratio(ccs, nnccs), beta=0.5))
    halves = config.loss(predicted[:1], ccs[:1], nnccs[:1], global_batch=4) \
        + config.loss(predicted[1:], ccs[1:], nnccs[1:], global_batch=4)
    torch.testing.assert_close(halves, mean)
    with pytest.raises(ValueError, match="model.quality.method='magface'"):
        QualityConfig(method="magface")


SPLIT = 4  # rank 0's rows of the global batch; rank 1 holds the rest (uneven on purpose)


def _world_certainty(rank: int, world: int, engine: str) -> Dict[str, torch.Tensor]:
    head = _head(engine, num_subcenters=2)
    x, labels = _data()
    rows = slice(0, BATCH) if world == 1 else slice(0, SPLIT) if rank == 0 else slice(SPLIT, BATCH)
    torch.manual_seed(2)  # the same quality head on every rank
    quality = QualityHead(DIM).double()
    emb = x[rows].clone().requires_grad_()
    loss = head(emb, labels[rows])
    ccs, nnccs = head.last_certainty  # type: ignore[misc]
    term = QualityConfig().loss(quality(emb), ccs, nnccs, global_batch=head.last_global_batch)
    term.backward()
    # what EmbeddingModule's DDP hook does: sum the replicated gradients over ranks
    grad = quality.fc.weight.grad
    if world > 1:
        torch.distributed.all_reduce(grad)
    return {"ccs": ccs, "nnccs": nnccs, "emb_grad": emb.grad, "q_grad": grad, "loss": loss.detach()}


def _certainty_both_engines(rank: int, world: int) -> Dict[str, Dict[str, torch.Tensor]]:
    return {engine: _world_certainty(rank, world, engine) for engine in ("chunked", "dense")}


def test_world_two_matches_one_process(ddp_run: Callable[..., list]) -> None:
    one = _certainty_both_engines(0, 1)
    ranks = ddp_run(2, _certainty_both_engines)
    for engine in ("chunked", "dense"):
        for key in ("ccs", "nnccs", "emb_grad"):
            both = torch.cat([ranks[0][engine][key], ranks[1][engine][key]])
            torch.testing.assert_close(both, one[engine][key], rtol=0, atol=1e-12, msg=key)
        for r in range(2):
            torch.testing.assert_close(ranks[r][engine]["q_grad"], one[engine]["q_grad"], rtol=1e-12,
                                       atol=1e-14)
        torch.testing.assert_close(ranks[0][engine]["loss"], one[engine]["loss"], rtol=1e-12, atol=0)


class _TinyNet(nn.Module):
    embedding_size = 4

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(DIM, 16), nn.Tanh(), nn.Linear(16, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_module_training_step_with_quality() -> None:
    from mlearn.module import EmbeddingModule, HeadConfig

    torch.manual_seed(0)
    model = EmbeddingModule(_TinyNet(), HeadConfig(margin=ArcFace(s=8.0, m=0.3)), num_classes=5,
                            quality=QualityConfig(weight=10.0))
    model.configure_model()
    assert model.head is not None and model.head.record_certainty
    x, labels = torch.randn(6, DIM), torch.tensor([0, 1, 2, 3, 4, 0])
    loss = model.training_step((x, labels), 0)
    assert loss is not None and torch.isfinite(loss)
    with torch.no_grad():
        head_only = model.head(model(x), labels)
    assert float(loss.detach()) > float(head_only)  # the quality term was added
    loss.backward()
    assert model.quality_head is not None and model.quality_head.fc.weight.grad.abs().sum() > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.backbone.parameters())
    groups = model._param_groups()
    # backbone, quality head (its own group: lr scaled by QualityConfig.lr_scale), centers
    assert len(groups) == 3 and id(model.quality_head.fc.weight) in map(id, groups[1]["params"])
    assert {"quality_head.fc.weight", "quality_head.fc.bias"} <= set(model.state_dict())
    without = EmbeddingModule(_TinyNet(), HeadConfig(margin=ArcFace()), num_classes=5)
    assert without.quality_head is None


def test_quality_config_builds_through_the_cli(tiny_recordio: Callable[..., Path], tmp_path: Path) -> None:
    from mlearn.train_cli import build_cli

    rec = tiny_recordio(classes=4, per_class=2, size=112)
    cli = build_cli(["--config", str(ROOT / "configs/face/quickstart.yaml"),
                     "--config", str(ROOT / "configs/face/quality/cr_fiqa.yaml"),
                     "--data.root", str(rec), "--data.synthetic", "null", "--data.image_size", "112",
                     "--run_dir", str(tmp_path / "run"), "--model.quality.weight", "5"])
    model = cli.model
    assert isinstance(model.quality, QualityConfig) and model.quality.weight == 5.0
    assert model.quality_head is not None


def test_quality_head_trains_at_its_scaled_learning_rate() -> None:
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    from mlearn.module import EmbeddingModule, HeadConfig

    torch.manual_seed(0)
    model = EmbeddingModule(_TinyNet(), HeadConfig(margin=ArcFace(s=8.0, m=0.3)), num_classes=5,
                            quality=QualityConfig(lr_scale=0.01), backbone_lr_scale=0.5)
    data = TensorDataset(torch.randn(40, DIM), torch.arange(40) % 5)
    trainer = pl.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, DataLoader(data, batch_size=8))
    base = [group["initial_lr"] for group in trainer.optimizers[0].param_groups]
    assert base == pytest.approx([0.05, 0.0005, 0.1])  # backbone, quality head (x 0.5 x 0.01), centers
    assert torch.isfinite(model.quality_head(model(torch.randn(4, DIM)))).all()


def _module_pair(train_backbone: bool) -> tuple[Any, Any]:
    """The same seed, once without and once with a quality head: (without, with), configured."""
    from mlearn.module import EmbeddingModule, HeadConfig

    models = []
    for quality in (None, QualityConfig(weight=10.0, train_backbone=train_backbone)):
        torch.manual_seed(0)
        model = EmbeddingModule(_TinyNet(), HeadConfig(margin=ArcFace(s=8.0, m=0.3)), num_classes=5,
                                quality=quality)
        model.configure_model()
        models.append(model)
    return models[0], models[1]


def test_adding_a_quality_head_leaves_the_recogniser_initialisation_alone() -> None:
    without, with_head = _module_pair(train_backbone=True)
    for name, tensor in without.state_dict().items():
        assert torch.equal(tensor, with_head.state_dict()[name]), name


@pytest.mark.parametrize("train_backbone", [False, True])
def test_train_backbone_false_stops_the_quality_gradient_at_the_embedding(train_backbone: bool) -> None:
    """Off: the backbone and centre gradients equal the run without a head bit for bit, and the head still
    learns. On (CR-FIQA's joint training): the backbone gradient changes."""
    without, with_head = _module_pair(train_backbone)
    x = torch.randn(6, DIM, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    for model in (without, with_head):
        model.training_step((x, labels), 0).backward()
    assert with_head.quality_head is not None and with_head.quality_head.fc.weight.grad.abs().sum() > 0
    pairs = zip(without.backbone.parameters(), with_head.backbone.parameters())
    same = [torch.equal(p.grad, q.grad) for p, q in pairs]
    assert all(same) != train_backbone
    assert without.head is not None and with_head.head is not None
    assert torch.equal(without.head.weight.grad, with_head.head.weight.grad)
