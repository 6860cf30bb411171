"""A few DDP training steps (2 gloo processes, CPU) through Lightning's Trainer with the real data path
(RecordIO -> seeded sampler -> augmentation) and a sharded Partial FC head equal the same steps in one
process with the whole global batch; and a checkpoint written by the 2-process run resumes in one process
as if the run had never changed its rank count."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn

from mlearn.data.images.datamodule import FaceDataModule

CLASSES, PER_CLASS, SIZE, WORLD, PER_RANK, STEPS = 5, 8, 16, 2, 4, 4  # 40 images, 5 global batches/epoch


class FlatNet(nn.Module):
    """No batch norm: per-rank BN statistics would legitimately differ from the global ones."""

    embedding_size = 8

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, 16), nn.Tanh(), nn.Linear(16, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def make_module(variant: str = "adaface"):
    """``adaface``: AdaFace (batch statistics shared over ranks); ``sphereface2_quality``: SphereFace2
    (a learned bias, all-reduced by the head, outside DDP) and a CR-FIQA quality head (inside DDP)."""
    from mlearn.heads import AdaFace
    from mlearn.module import EmbeddingModule, HeadConfig
    from mlearn.quality import QualityConfig
    from mlearn.schedules import LRSchedule

    class Module(EmbeddingModule):
        def configure_model(self) -> None:
            # the centers' initial seed is drawn from the global generator, which DDP's setup re-seeds
            # (from PL_GLOBAL_SEED, left by any earlier seed_everything) and a single process does not
            if self.head is None:
                torch.manual_seed(1)
            super().configure_model()

    torch.manual_seed(0)
    if variant == "adaface":
        head, quality = HeadConfig(margin=AdaFace(s=16.0, m=0.3)), None
    else:
        head, quality = HeadConfig(margin=None, criterion="sphereface2"), QualityConfig(lr_scale=0.1)
    return Module(FlatNet(), head, num_classes=CLASSES, quality=quality,
                  schedule=LRSchedule("poly", warmup_epochs=0.4), clip_backbone_grad_norm=50.0)


def fit(rec: Path, out: Path, batch_size: int, devices: int = 1, strategy: object = "auto",
        ckpt_path: str | None = None, variant: str = "adaface") -> pl.Trainer:
    module = make_module(variant)
    data = FaceDataModule(str(rec), batch_size=batch_size, num_workers=0, image_size=SIZE,
                          augmentation="standard")
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=STEPS, logger=False,
                         callbacks=[ModelCheckpoint(dirpath=out, every_n_train_steps=2, save_top_k=-1)],
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=out)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path, weights_only=False)  # hparams hold objects
    trainer.save_checkpoint(out / "final.ckpt")  # collective under DDP: gathers the center shards
    return trainer


def _worker(rank: int, world: int, rec: Path, out: Path, variant: str = "adaface") -> None:
    from pytorch_lightning.strategies import DDPStrategy

    fit(rec, out, PER_RANK, devices=world, strategy=DDPStrategy(process_group_backend="gloo"),
        variant=variant)


def load(path: Path) -> Dict:
    return torch.load(path, weights_only=False)


def assert_same_training_state(got: Dict, expected: Dict) -> None:
    """Weights and momentum equal up to float rounding (the summation order differs between layouts)."""
    assert got["global_step"] == expected["global_step"] == STEPS
    assert set(got["state_dict"]) == set(expected["state_dict"])
    for key, value in expected["state_dict"].items():
        torch.testing.assert_close(got["state_dict"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    got_state, expected_state = got["optimizer_states"][0]["state"], expected["optimizer_states"][0]["state"]
    assert set(got_state) == set(expected_state)
    for index, state in expected_state.items():
        torch.testing.assert_close(got_state[index]["momentum_buffer"], state["momentum_buffer"], rtol=1e-4,
                                   atol=1e-5, msg=f"momentum of parameter {index}")


@pytest.mark.distributed
def test_ddp_training_run_equals_one_process_and_resumes_on_one(tmp_path: Path, ddp_run: Callable,
                                                                tiny_recordio: Callable) -> None:
    rec = tiny_recordio(tmp_path / "rec", CLASSES, PER_CLASS, SIZE, seed=1, grid=2, noise=30.0)
    ddp_run(WORLD, _worker, rec, tmp_path / "ddp", lightning=True)
    ddp = load(tmp_path / "ddp" / "final.ckpt")
    assert ddp["state_dict"]["head.weight"].shape == (CLASSES, FlatNet.embedding_size)  # gathered shards
    assert ddp["FaceDataModule"]["global_batch"] == WORLD * PER_RANK

    fit(rec, tmp_path / "single", WORLD * PER_RANK)
    single = load(tmp_path / "single" / "final.ckpt")
    initial = make_module().state_dict()
    assert not torch.equal(single["state_dict"]["backbone.body.1.weight"], initial["backbone.body.1.weight"])
    assert single["state_dict"]["head.margin.batch_mean"].item() != 20.0  # AdaFace statistics moved
    assert_same_training_state(ddp, single)

    # resume the 2-process run's step-2 checkpoint in one process with the same global batch
    step2 = next((tmp_path / "ddp").glob("*step=2.ckpt"))
    fit(rec, tmp_path / "resumed", WORLD * PER_RANK, ckpt_path=str(step2))
    assert_same_training_state(load(tmp_path / "resumed" / "final.ckpt"), single)


@pytest.mark.distributed
def test_ddp_training_with_a_bias_criterion_and_a_quality_head_equals_one_process(
        tmp_path: Path, ddp_run: Callable, tiny_recordio: Callable) -> None:
    rec = tiny_recordio(tmp_path / "rec", CLASSES, PER_CLASS, SIZE, seed=1, grid=2, noise=30.0)
    ddp_run(WORLD, _worker, rec, tmp_path / "ddp", "sphereface2_quality", lightning=True)
    fit(rec, tmp_path / "single", WORLD * PER_RANK, variant="sphereface2_quality")
    ddp, single = load(tmp_path / "ddp" / "final.ckpt"), load(tmp_path / "single" / "final.ckpt")
    built = make_module("sphereface2_quality")
    built.configure_model()
    initial = built.state_dict()
    for key in ("head.criterion.bias", "quality_head.fc.weight"):  # both trained, not left as built
        assert not torch.equal(single["state_dict"][key], initial[key]), key
    assert_same_training_state(ddp, single)

