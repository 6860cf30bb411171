"""The .bin verification callback logs metrics during training and drives best-checkpoint selection."""
from functools import partial

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from mlearn.data.images.bins import write_bin
from mlearn.evaluation.callback import VerificationCallback
from mlearn.heads import CosFace
from mlearn.models import IResNet
from mlearn.module import EmbeddingModule, HeadConfig
from mlearn.schedules import LRSchedule


class Module(EmbeddingModule):
    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        images = torch.randn(16, 3, 32, 32, generator=g)
        return DataLoader(TensorDataset(images, torch.arange(16) % 4), batch_size=8)


def test_callback_logs_verification_metrics_and_selects_best(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    write_bin(tmp_path / "tiny.bin", images, [True, False] * 10)
    backbone = IResNet(layers=[1], width=8, embedding_size=16, input_size=32, stem_stride=2)
    module = Module(backbone, HeadConfig(margin=CosFace(s=8.0, m=0.1)), num_classes=4,
                    optimizer=partial(torch.optim.SGD, lr=0.01), schedule=LRSchedule(decay="constant"))
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/tiny/accuracy",
                                              mode="max")
    callback = VerificationCallback([str(tmp_path / "tiny.bin")], batch_size=16)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[callback, checkpoint])
    trainer.fit(module)
    metrics = trainer.callback_metrics
    assert 0.0 <= float(metrics["val/tiny/accuracy"]) <= 1.0
    assert {"val/tiny/accuracy_std", "val/tiny/tar@far=1e-3", "val/tiny/eer"} <= set(metrics)
    assert checkpoint.best_model_path.endswith(".ckpt") and checkpoint.best_model_score is not None


def test_missing_bin_fails_at_setup(tmp_path):
    callback = VerificationCallback([str(tmp_path / "lfw.bin")])
    with pytest.raises(FileNotFoundError, match="lfw.bin not found"):
        callback.setup(None, None, "fit")


class StepRecorder(VerificationCallback):
    """Records the global step of every evaluation instead of evaluating (no .bin needed)."""

    def __init__(self, every_n_train_steps: int) -> None:
        super().__init__([], every_n_train_steps=every_n_train_steps)
        self.steps = []

    def evaluate(self, pl_module):
        self.steps.append(pl_module.trainer.global_step)
        return {}


class FourBatches(EmbeddingModule):
    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        images = torch.randn(16, 3, 32, 32, generator=g)
        return DataLoader(TensorDataset(images, torch.arange(16) % 4), batch_size=4)


@pytest.mark.parametrize("every,accumulate,expected", [
    (1, 2, [1, 2, 3, 4]),  # 8 batches, 4 optimizer steps: once per step, not per micro-batch
    (2, 1, [2, 4, 6, 8]),  # 8 steps: never at step 0
    (3, 2, [3]),
])
def test_callback_fires_once_per_optimizer_step_never_at_step_0(every, accumulate, expected):
    backbone = IResNet(layers=[1], width=8, embedding_size=16, input_size=32, stem_stride=2)
    module = FourBatches(backbone, HeadConfig(margin=CosFace(s=8.0, m=0.1)), num_classes=4,
                         optimizer=partial(torch.optim.SGD, lr=0.01), schedule=LRSchedule(decay="constant"))
    callback = StepRecorder(every)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, callbacks=[callback],
                         accumulate_grad_batches=accumulate)
    trainer.fit(module)
    assert trainer.global_step == 8 // accumulate
    assert callback.steps == expected
