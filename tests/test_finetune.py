"""Fine-tuning (mlearn.finetune + EmbeddingModule options): init_from rebuilds or fills the backbone, the
class-mean init of the centers (one process and two gloo ranks), the backbone freeze and its learning-rate
scale, the fine-tune recipes, and (slow) the measured benefit on the synthetic corpora."""
from __future__ import annotations

import copy
import sys
from functools import partial
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import yaml
from ddp_utils import run_in_ddp
from torch.utils.data import DataLoader, TensorDataset

from mlearn.finetune import (
    TrainAccuracy,
    class_mean_centers,
    class_mean_sums,
    load_initial_backbone,
    nearest_center_accuracy,
)
from mlearn.heads import ArcFace, PartialFC
from mlearn.inference import instantiate, load_model
from mlearn.module import EmbeddingModule, HeadConfig
from mlearn.schedules import LRSchedule

ROOT = Path(__file__).resolve().parents[1]
SPEC = {"class_path": "mlearn.models.IResNet",
        "init_args": {"layers": [1], "width": 8, "embedding_size": 16, "input_size": 16, "stem_stride": 2}}
CLASSES, PER_CLASS = 8, 4


def write_checkpoint(path: Path, spec: Dict[str, Any] = SPEC, seed: int = 0) -> Dict[str, torch.Tensor]:
    """A checkpoint as `mlearn train` writes it (backbone spec in the hyper-parameters); returns its
    backbone state."""
    torch.manual_seed(seed)
    backbone = instantiate(spec)
    for module in backbone.modules():  # non-trivial BatchNorm statistics
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    state = {k: v.clone() for k, v in backbone.state_dict().items()}
    torch.save({"hyper_parameters": {"backbone": spec}, "epoch": 0, "global_step": 0,
                "state_dict": {f"backbone.{k}": v for k, v in state.items()}}, path)
    return state


def clustered_images(classes: int = CLASSES, per_class: int = PER_CLASS, seed: int = 0) -> TensorDataset:
    """Normalised images [N, 3, 16, 16]: one smooth prototype per class plus noise; labels class-major."""
    g = torch.Generator().manual_seed(seed)
    prototypes = F.interpolate(torch.randn(classes, 3, 4, 4, generator=g), size=16, mode="bilinear")
    images = prototypes.repeat_interleave(per_class, 0) + 0.3 * torch.randn(classes * per_class, 3, 16, 16,
                                                                            generator=g)
    return TensorDataset(images, torch.arange(classes).repeat_interleave(per_class))


def make_module(init_from: Path, **kw: Any) -> EmbeddingModule:
    class Module(EmbeddingModule):
        def train_dataloader(self) -> DataLoader:
            return DataLoader(clustered_images(), batch_size=8, shuffle=True,
                              generator=torch.Generator().manual_seed(0))

    return Module(head=HeadConfig(margin=ArcFace(s=16.0, m=0.2)), num_classes=CLASSES,
                  init_from=str(init_from),
                  optimizer=partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=5e-4),
                  schedule=LRSchedule("constant"), **kw)


def trainer(max_steps: int, callbacks: List[pl.Callback]) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=callbacks, num_sanity_val_steps=0)


# ------------------------------------------------------------------------------------- init_from


def test_init_from_rebuilds_the_recorded_backbone(tmp_path: Path) -> None:
    state = write_checkpoint(tmp_path / "pre.ckpt")
    module = make_module(tmp_path / "pre.ckpt")
    assert module.backbone.training and module.init_centers == "class_mean"
    for key, value in module.backbone.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert module.hparams["backbone"] == SPEC  # what load_model / export rebuild the backbone from
    assert make_module(tmp_path / "pre.ckpt", init_centers="random").init_centers == "random"


def test_init_from_fills_a_given_backbone_only_when_the_weights_fit(tmp_path: Path) -> None:
    state = write_checkpoint(tmp_path / "pre.ckpt")
    backbone, spec, input_spec = load_initial_backbone(str(tmp_path / "pre.ckpt"), instantiate(SPEC))
    assert spec == SPEC and input_spec["input_size"] == [16, 16]
    assert all(torch.equal(v, state[k]) for k, v in backbone.state_dict().items())
    narrow = instantiate({**SPEC, "init_args": {**SPEC["init_args"], "width": 4}})
    with pytest.raises(ValueError, match=r"weights do not fit model.backbone \(IResNet\): "
                                         r"key 'stem.0.weight' has shape \[8, 3, 3, 3\], "
                                         r"model.backbone expects \[4, 3, 3, 3\]"):
        load_initial_backbone(str(tmp_path / "pre.ckpt"), narrow)
    deeper = instantiate({**SPEC, "init_args": {**SPEC["init_args"], "layers": [2]}})
    with pytest.raises(ValueError, match="missing key 'stages.0.1."):
        load_initial_backbone(str(tmp_path / "pre.ckpt"), deeper)


def test_options_are_checked(tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "pre.ckpt")
    head = HeadConfig(margin=ArcFace())
    with pytest.raises(ValueError, match="model.backbone: required unless model.init_from"):
        EmbeddingModule(head=head, num_classes=4)
    with pytest.raises(ValueError, match="model.head: required"):
        EmbeddingModule(instantiate(SPEC))
    for bad in ({"init_centers": "mean"}, {"freeze_backbone_steps": -1}, {"freeze_backbone_steps": 1.5},
                {"backbone_lr_scale": -0.1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            make_module(tmp_path / "pre.ckpt", **bad)
    with pytest.raises(FileNotFoundError):
        make_module(tmp_path / "missing")


# ---------------------------------------------------------------------------------- class means


def test_set_centers_fills_every_subcenter_and_keeps_masked_classes() -> None:
    head = PartialFC(ArcFace(), 4, 3, num_subcenters=2)
    before = head.weight.detach().clone()
    centers = torch.arange(12.0).view(3, 4)
    head.set_centers(centers, keep=torch.tensor([False, True, False]))
    assert torch.equal(head.weight[[0, 1, 4, 5]], centers[[0, 0, 2, 2]])
    assert torch.equal(head.weight[2:4], before[2:4])
    with pytest.raises(ValueError, match=r"centers: expected \[3, 4\]"):
        head.set_centers(torch.zeros(2, 4))


def _sharded_class_means(rank: int, world: int, features: torch.Tensor,
                         labels: torch.Tensor) -> Dict[str, Any]:
    """Each rank: its half of the samples, its shard of 5 classes x 2 sub-centers."""
    torch.manual_seed(0)
    head = PartialFC(ArcFace(), features.shape[1], 5, num_subcenters=2)
    before = head.weight.detach().clone()
    mine = slice(rank * len(labels) // world, (rank + 1) * len(labels) // world)
    batches = [(features[mine][i:i + 3], labels[mine][i:i + 3]) for i in range(0, len(labels) // world, 3)]
    sums, counts = class_mean_sums(lambda x: x, batches, 5, features.shape[1])
    centers, counts = class_mean_centers(sums, counts, norm=2.0, group=head.process_group)
    head.set_centers(centers, keep=counts == 0)
    accuracy = nearest_center_accuracy(head, features[mine], labels[mine])
    return {"before": before, "after": head.state_dict()["weight"], "counts": counts, "accuracy": accuracy,
            "shard": (head.class_start, head.num_local)}


def test_class_mean_centers_are_the_same_sharded_on_two_ranks() -> None:
    g = torch.Generator().manual_seed(3)
    labels = torch.tensor([0, 1, 3, 0, 1, 1, 3, 0, 1, 3, 0, 1])  # class 2 and 4: no sample
    features = torch.randn(5, 6, generator=g)[labels] + 0.2 * torch.randn(12, 6, generator=g)
    single = _sharded_class_means(0, 1, features, labels)
    ranks = run_in_ddp(2, _sharded_class_means, features, labels)
    assert [r["shard"] for r in ranks] == [(0, 3), (3, 2)]
    assert torch.equal(ranks[0]["counts"], torch.tensor([4, 5, 0, 3, 0]))
    full = ranks[0]["after"]  # gathered on rank 0
    torch.testing.assert_close(full, single["after"])
    for c in (0, 1, 3):  # both sub-centers: the mean direction of the normalised features, norm 2
        mean = F.normalize(F.normalize(features[labels == c], dim=1).sum(0), dim=0) * 2.0
        torch.testing.assert_close(full[2 * c:2 * c + 2], mean.expand(2, -1))
    before = torch.cat([ranks[0]["before"], ranks[1]["before"]])
    for c in (2, 4):  # no sample: the random rows stay
        torch.testing.assert_close(full[2 * c:2 * c + 2], before[2 * c:2 * c + 2])
    # the accuracy over the global batch and both shards equals the one-process value, on every rank
    reference = nearest_center_accuracy_one_process(single["after"], features, labels)
    assert ranks[0]["accuracy"] == ranks[1]["accuracy"] == pytest.approx(reference)


def nearest_center_accuracy_one_process(weight: torch.Tensor, features: torch.Tensor,
                                        labels: torch.Tensor) -> float:
    cosine = F.normalize(features, dim=1) @ F.normalize(weight, dim=1).t()
    return float((cosine.view(len(labels), -1, 2).amax(2).argmax(1) == labels).float().mean())


# ------------------------------------------------------------------------ fit: init, freeze, scale


class Snapshots(pl.Callback):
    """The centers at train start and the backbone state and optimizer lrs after every step."""

    def __init__(self) -> None:
        self.centers: torch.Tensor = torch.empty(0)
        self.backbone: List[Dict[str, torch.Tensor]] = []
        self.lrs: List[List[float]] = []

    def on_train_start(self, trainer: pl.Trainer, module: Any) -> None:
        self.centers = module.head.weight.detach().clone()
        self.backbone.append(copy.deepcopy(module.backbone.state_dict()))

    def on_train_batch_end(self, trainer: pl.Trainer, module: Any, *args: Any) -> None:
        self.backbone.append(copy.deepcopy(module.backbone.state_dict()))
        self.lrs.append([g["lr"] for g in trainer.optimizers[0].param_groups])


class Accuracies(TrainAccuracy):
    def __init__(self) -> None:
        super().__init__()
        self.values: List[float] = []

    def on_before_backward(self, trainer: pl.Trainer, module: Any, loss: torch.Tensor) -> None:
        super().on_before_backward(trainer, module, loss)
        self.values.append(float(trainer.callback_metrics["train/accuracy"]))


def test_fit_starts_from_class_means_with_a_frozen_backbone_then_scales_its_lr(tmp_path: Path) -> None:
    state = write_checkpoint(tmp_path / "pre.ckpt")
    module = make_module(tmp_path / "pre.ckpt", freeze_backbone_steps=2, backbone_lr_scale=0.5)
    snapshots, accuracies = Snapshots(), Accuracies()
    fit = trainer(4, [snapshots, accuracies])
    fit.fit(module)

    # class-mean init: the centers are the class means of the pretrained backbone's (eval) embeddings
    reference = instantiate(SPEC)
    reference.load_state_dict(state)
    images, labels = clustered_images().tensors
    with torch.no_grad():
        embeddings = F.normalize(reference.eval()(images), dim=1)
    norm = 1.0  # unit-length class-mean directions
    means = torch.stack([F.normalize(embeddings[labels == c].sum(0), dim=0) for c in range(CLASSES)]) * norm
    torch.testing.assert_close(snapshots.centers, means, atol=1e-5, rtol=1e-4)
    assert accuracies.values[0] >= 0.75  # chance: 1/8

    # frozen for two steps: weights and BatchNorm statistics as loaded; then trained at half the lr
    def same(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> bool:
        return all(torch.equal(a[k], b[k]) for k in a if not k.endswith("num_batches_tracked"))

    assert same(snapshots.backbone[0], state)
    assert same(snapshots.backbone[1], state) and same(snapshots.backbone[2], state)
    assert not same(snapshots.backbone[3], state)
    assert not torch.equal(module.head.weight.detach(), snapshots.centers)
    assert snapshots.lrs[-1] == [0.05, 0.1]  # backbone group, head group

    # the fine-tuned checkpoint loads for inference (the backbone spec came from init_from); unsafe: a
    # module built in Python (not by the CLI) pickles its HeadConfig into the hyper-parameters
    fit.save_checkpoint(tmp_path / "tuned.ckpt")
    model = load_model(tmp_path / "tuned.ckpt", device="cpu", unsafe=True)
    uint8 = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    with torch.no_grad():
        expected = module.backbone.eval()(torch.from_numpy((uint8.astype(np.float32) - 127.5) / 127.5)
                                          .permute(0, 3, 1, 2))
    np.testing.assert_allclose(model.embed(uint8, normalize=False), expected.numpy(), rtol=1e-4, atol=1e-5)


def test_random_init_and_resume_skip_the_class_mean_pass(tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "pre.ckpt")
    snapshots = Snapshots()
    trainer(1, [snapshots]).fit(make_module(tmp_path / "pre.ckpt", init_centers="random"))
    norms = snapshots.centers.norm(dim=1)  # class means would have unit norm
    assert norms.std() > 0.002 and float(norms.max()) < 0.2

    first = make_module(tmp_path / "pre.ckpt", freeze_backbone_steps=5)
    fit = trainer(1, [])
    fit.fit(first)
    fit.save_checkpoint(tmp_path / "step1.ckpt")
    resumed, snapshots = make_module(tmp_path / "pre.ckpt", freeze_backbone_steps=5), Snapshots()
    trainer(2, [snapshots]).fit(resumed, ckpt_path=str(tmp_path / "step1.ckpt"), weights_only=False)
    torch.testing.assert_close(snapshots.centers, first.head.weight.detach())  # not recomputed


# --------------------------------------------------------------------------------------- recipes


def _speaker_folder(root: Path, speakers: int = 3, utterances: int = 2) -> Path:
    import soundfile as sf

    rng = np.random.default_rng(0)
    for s in range(speakers):
        for u in range(utterances):
            path = root / f"id{s:05d}" / "v000" / f"{u:05d}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(str(path), (0.1 * rng.standard_normal(8000)).astype(np.float32), 16000, subtype="PCM_16")
    return root


def test_finetune_recipes_build_through_the_cli(tmp_path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from data_utils import write_palette_rec

    from mlearn.train_cli import build_cli, describe_run

    write_checkpoint(tmp_path / "face.ckpt")
    rec = write_palette_rec(tmp_path / "rec", 4, 5, 16)
    cli = build_cli(["--config", str(ROOT / "configs" / "face" / "finetune.yaml"), "--data.root", str(rec),
                     "--model.init_from", str(tmp_path / "face.ckpt"), "--data.image_size", "16",
                     "--run_dir", str(tmp_path / "face_run")])
    assert cli.model.num_classes == 4 and cli.model.init_centers == "class_mean"
    assert cli.model.hparams["backbone"] == SPEC
    assert "IResNet" in describe_run(cli.model, cli.datamodule, cli.trainer)

    recipe = yaml.safe_load((ROOT / "configs" / "speaker" / "finetune.yaml").read_text())
    assert recipe["model"]["head"]["margin"]["init_args"]["m"] == 0.2
    write_checkpoint(tmp_path / "speaker.ckpt", recipe["model"]["backbone"])
    cli = build_cli(["--config", str(ROOT / "configs" / "speaker" / "finetune.yaml"),
                     "--data.root", str(_speaker_folder(tmp_path / "wav")), "--data.noise_dir", "null",
                     "--data.rir_dir", "null", "--model.init_from", str(tmp_path / "speaker.ckpt"),
                     "--run_dir", str(tmp_path / "speaker_run")])
    assert cli.model.num_classes == 3 and cli.model.freeze_backbone_steps > 0


# ----------------------------------------------------------------------------- DDP: init and freeze


def _fit_on_two_ranks(rank: int, world: int, checkpoint: str) -> Dict[str, Any]:
    import os

    from pytorch_lightning.strategies import DDPStrategy

    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(world))
    module, snapshots = make_module(Path(checkpoint), freeze_backbone_steps=2), Snapshots()
    fit = pl.Trainer(accelerator="cpu", devices=world, strategy=DDPStrategy(process_group_backend="gloo"),
                     max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, callbacks=[snapshots], num_sanity_val_steps=0)
    fit.fit(module)
    return {"centers": module.head.gather_rows(snapshots.centers), "backbone": snapshots.backbone}


def test_class_means_and_freeze_under_ddp_on_two_ranks(tmp_path: Path) -> None:
    """Lightning DDP (gloo): the sharded class-mean centers equal the one-process ones, the frozen
    backbone stays as loaded for two steps on both ranks (DDP's reducer gets every gradient) and then
    trains identically on both."""
    state = write_checkpoint(tmp_path / "pre.ckpt")
    ranks = run_in_ddp(2, _fit_on_two_ranks, str(tmp_path / "pre.ckpt"))
    reference = instantiate(SPEC)
    reference.load_state_dict(state)
    images, labels = clustered_images().tensors
    with torch.no_grad():
        embeddings = F.normalize(reference.eval()(images), dim=1)
    means = torch.stack([F.normalize(embeddings[labels == c].sum(0), dim=0) for c in range(CLASSES)])
    torch.testing.assert_close(ranks[0]["centers"], means, atol=1e-5, rtol=1e-4)
    for rank in ranks:
        for step in (0, 1, 2):
            assert all(torch.equal(rank["backbone"][step][k], v) for k, v in state.items()
                       if not k.endswith("num_batches_tracked"))
    trained = ranks[0]["backbone"][3]
    assert not torch.equal(trained["stem.0.weight"], state["stem.0.weight"])
    for key, value in trained.items():  # BatchNorm running statistics are per rank (no SyncBatchNorm)
        if "running_" not in key and not key.endswith("num_batches_tracked"):
            torch.testing.assert_close(ranks[1]["backbone"][3][key], value)


# ------------------------------------------------------------------------------------ measured (slow)


@pytest.mark.slow
@pytest.mark.parametrize("modality", ["face", "speaker"])
def test_finetune_beats_untuned_and_scratch_on_disjoint_identities(modality: str, tmp_path: Path) -> None:
    """tools/bench_finetune.py at a small size: pretrain on one set of synthetic identities, fine-tune on
    DISJOINT identities with 3-5 samples each; on held-out samples of those identities the fine-tuned
    model verifies better than the pretrained one as it is and than the same budget from scratch, and
    with class-mean centers the first epoch's training accuracy is far above chance (the first batch's
    too, where random centers are near chance)."""
    sys.path.insert(0, str(ROOT / "tools"))
    from bench_finetune import SMALL, run_flow

    torch.set_num_threads(1)
    result = run_flow(modality, SMALL[modality], workdir=tmp_path,
                      models=("finetune", "finetune_random_centers", "scratch"))
    chance = result["chance"]
    tuned, random_centers = result["finetune"], result["finetune_random_centers"]
    assert tuned["first_epoch_accuracy"] >= 5 * chance, result
    assert tuned["first_batch_accuracy"] >= 3 * chance > random_centers["first_batch_accuracy"], result
    assert result["finetune"]["eer"] < result["untuned"]["eer"], result
    assert result["finetune"]["eer"] < result["scratch"]["eer"], result
