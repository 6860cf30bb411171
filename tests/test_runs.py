"""Run dirs of ``mlearn train`` (in process): the final steps are always saved, a resume keeps the
metrics history (and equals an uninterrupted run), ``--overwrite true`` starts over cleanly, a bad config
writes nothing, legacy pickled checkpoints need ``--unsafe_load true``, and the training guards of
:mod:`mlearn.callbacks` stop a diverging run before a non-finite checkpoint is written."""
from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Any, Callable, Dict, List

import pytest
import pytorch_lightning as pl
import torch
import yaml
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mlearn.callbacks import FinalCheckpoint, NonFiniteLossGuard, NoUsableDataGuard, TrainingStopped
from mlearn.train_cli import run_training

ROOT = Path(__file__).resolve().parents[1]


def write_config(folder: Path, faces: Path, callbacks: List[Dict[str, Any]] = (), **trainer: Any) -> Path:
    """A tiny quickstart config: 6 synthetic identities x 4 images at batch 8 (3 steps per epoch), CPU."""
    config = yaml.safe_load((ROOT / "configs" / "face" / "quickstart.yaml").read_text())
    config["trainer"].update({"max_epochs": 1, "log_every_n_steps": 1, "enable_progress_bar": False,
                              "enable_model_summary": False, "accelerator": "cpu", **trainer})
    if callbacks:
        config["trainer"]["callbacks"] = list(callbacks)
    config["data"]["init_args"].update(root=str(faces), batch_size=8, num_workers=0,
                                       synthetic={"num_identities": 6, "images_per_identity": 4,
                                                  "num_val_identities": 6, "num_val_pairs": 40})
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"tiny{len(list(folder.glob('tiny*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def faces(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("faces")


def train(config: Path, run: Path, *args: str) -> int:
    return run_training(["--config", str(config), "--run_dir", str(run), *args])


def rows(run: Path) -> List[Dict[str, str]]:
    with (run / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def losses(run: Path) -> Dict[int, float]:
    """``{step: train/loss}``; a step logged twice fails."""
    found: Dict[int, float] = {}
    for row in rows(run):
        if row.get("train/loss"):
            step = int(row["step"])
            assert step not in found, f"step {step} logged twice"
            found[step] = float(row["train/loss"])
    return found


def global_step(path: Path) -> int:
    return int(torch.load(path, weights_only=True, map_location="cpu")["global_step"])


def test_the_final_steps_are_always_saved(faces: Path, tmp_path: Path) -> None:
    """every_n_train_steps 3, 8 steps: the periodic checkpoints stop at step 6, last.ckpt holds step 8."""
    config = write_config(tmp_path, faces, max_epochs=3, max_steps=8)
    assert train(config, tmp_path / "run", "--checkpoint.every_n_train_steps", "3") == 0
    checkpoints = tmp_path / "run" / "checkpoints"
    assert global_step(checkpoints / "epoch=1-step=6.ckpt") == 6
    assert global_step(checkpoints / "last.ckpt") == 8


class Kill(pl.Callback):
    """The job dies just before optimizer step ``step + 1``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            raise KeyError("killed")


@pytest.mark.slow
def test_resume_keeps_the_metrics_history_and_equals_a_straight_run(faces: Path, tmp_path: Path) -> None:
    straight = write_config(tmp_path, faces, max_epochs=2)
    assert train(straight, tmp_path / "straight", "--checkpoint.every_n_train_steps", "2") == 0
    killed = write_config(tmp_path, faces, max_epochs=2,
                          callbacks=[{"class_path": f"{__name__}.Kill", "init_args": {"step": 5}}])
    run = tmp_path / "run"
    with pytest.raises(KeyError, match="killed"):
        train(killed, run, "--checkpoint.every_n_train_steps", "2")
    assert global_step(run / "checkpoints" / "last.ckpt") == 4
    assert sorted(losses(run)) == [0, 1, 2, 3, 4]  # step 4 was logged, but not checkpointed
    first = losses(run)

    assert train(straight, run, "--checkpoint.every_n_train_steps", "2", "--ckpt_path", "last") == 0
    resumed, expected = losses(run), losses(tmp_path / "straight")
    assert sorted(resumed) == [0, 1, 2, 3, 4, 5]  # the history kept, step 4 logged once (its rerun)
    assert all(resumed[step] == first[step] for step in range(4))
    assert resumed == pytest.approx(expected, rel=1e-5)
    corrupt = [row["train/corrupt_samples"] for row in rows(run) if row.get("train/corrupt_samples")]
    assert corrupt == ["0.0"] * 2  # one epoch-end row per epoch


def test_overwrite_starts_over(faces: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path, faces)
    run = tmp_path / "run"
    assert train(config, run) == 0
    (run / "notes.txt").write_text("mine")
    assert train(config, run, "--overwrite", "true", "--trainer.limit_train_batches", "2") == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch=0-step=2.ckpt", "last.ckpt"]
    assert sorted(losses(run)) == [0, 1]  # nothing of the first run mixed in
    assert len(list(run.glob("events.out.tfevents.*"))) == 1
    assert (run / "notes.txt").read_text() == "mine"  # files training does not write stay


@pytest.mark.parametrize("option, value, match", [
    ("--data.num_classes", "7", "num_classes"),
    ("--model.head.sample_rate", "0", r"model.head: sample_rate=0.0: expected a number in \(0, 1\]"),
])
def test_a_bad_config_writes_nothing(option: str, value: str, match: str, faces: Path,
                                     tmp_path: Path) -> None:
    """Checked before the run dir is created (the head is otherwise built at fit start, after Lightning
    wrote config.yaml and label_map.json)."""
    config = write_config(tmp_path, faces)
    with pytest.raises(ValueError, match=match):
        train(config, tmp_path / "run", option, value)
    assert not (tmp_path / "run").exists()


def test_the_files_of_a_start_that_never_trained_are_replaced(faces: Path, tmp_path: Path) -> None:
    """A start that failed at fit start left config.yaml, label_map.json and TensorBoard events but no
    checkpoint or metrics: the retry is not refused, and leaves one events file."""
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.yaml", "label_map.json", "hparams.yaml", "events.out.tfevents.1.host.1.0"):
        (run / name).write_text("stale")
    assert train(write_config(tmp_path, faces), run, "--trainer.limit_train_batches", "1") == 0
    assert (run / "config.yaml").read_text() != "stale" and (run / "label_map.json").read_text() != "stale"
    assert not (run / "events.out.tfevents.1.host.1.0").exists()
    assert len(list(run.glob("events.out.tfevents.*"))) == 1


@pytest.mark.slow
def test_legacy_pickled_checkpoint_needs_unsafe_load(faces: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path, faces, max_epochs=2)
    first = write_config(tmp_path, faces, max_epochs=2, max_steps=3)
    assert train(first, tmp_path / "a") == 0
    checkpoint = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", weights_only=True)
    checkpoint["legacy"] = argparse.Namespace(note="a plain-Python object, as old checkpoints held")
    legacy = tmp_path / "legacy.ckpt"
    torch.save(checkpoint, legacy)
    with pytest.raises(ValueError, match="--unsafe-load"):
        train(config, tmp_path / "b", "--ckpt_path", str(legacy))
    assert not (tmp_path / "b").exists()
    assert train(config, tmp_path / "b", "--ckpt_path", str(legacy), "--unsafe-load") == 0
    assert global_step(tmp_path / "b" / "checkpoints" / "last.ckpt") == 6


class _Diverging(pl.LightningModule):
    """A linear model whose loss turns NaN at batch ``nan_at``."""

    def __init__(self, nan_at: int) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 1)
        self.nan_at = nan_at

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.layer(batch[0]).pow(2).mean()
        return loss * float("nan") if batch_idx == self.nan_at else loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.randn(24, 4)), batch_size=4)


def test_nonfinite_loss_stops_before_its_checkpoint(tmp_path: Path) -> None:
    checkpoints = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_last=True)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False,
                         callbacks=[NonFiniteLossGuard(), FinalCheckpoint(), checkpoints])
    with pytest.raises(TrainingStopped, match=r"loss is nan at step 3 .*learning rate too high"):
        trainer.fit(_Diverging(nan_at=2))
    last = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert last["global_step"] == 2  # the NaN step's checkpoint was never written
    assert all(bool(torch.isfinite(v).all()) for v in last["state_dict"].values())


def test_a_checkpoint_with_nonfinite_weights_is_never_written(tmp_path: Path) -> None:
    module = _Diverging(nan_at=-1)
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[NonFiniteLossGuard()],
                         enable_checkpointing=False)
    trainer.fit(module)
    trainer.save_checkpoint(tmp_path / "good.ckpt")
    with torch.no_grad():
        module.layer.weight[0, 0] = float("inf")
    with pytest.raises(TrainingStopped, match="weights are not finite"):
        trainer.save_checkpoint(tmp_path / "bad.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.ckpt"]


class _Corrupt(pl.LightningModule):
    """Batches ``(x [B', 4], labels [B'], num_corrupt)`` of 4 samples; those of ``good`` batches all usable,
    the others all corrupt (B' = 0, as collate_skip_corrupt leaves them)."""

    def __init__(self, good: List[int]) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 1)
        self.good = good

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, labels, _ = batch
        return self.layer(x).pow(2).mean() if labels.numel() else None

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self) -> Any:
        def batch(i: int) -> tuple:
            n = 4 if i in self.good else 0
            return torch.randn(n, 4), torch.zeros(n, dtype=torch.long), 4 - n
        return DataLoader([batch(i) for i in range(3)], batch_size=None)  # already batched


@pytest.mark.parametrize("good", [[], [1]])
def test_an_epoch_without_a_usable_sample_stops_training(good: List[int]) -> None:
    trainer = pl.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False,
                         callbacks=[NoUsableDataGuard("data/faces")])
    if good:  # one usable batch per epoch is enough
        trainer.fit(_Corrupt(good))
        assert trainer.current_epoch == 2 and trainer.state.finished
        return
    with pytest.raises(TrainingStopped, match=r"epoch 0: all 12 samples of its 3 batches .* in data/faces"):
        trainer.fit(_Corrupt(good))


class _DivergingOnRank1(_Diverging):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.layer(batch[0]).pow(2).mean()
        return loss * float("nan") if batch_idx == self.nan_at and self.global_rank == 1 else loss


def _nonfinite_worker(rank: int, world: int, out: Path) -> str:
    import datetime

    from pytorch_lightning.strategies import DDPStrategy

    strategy = DDPStrategy(process_group_backend="gloo", timeout=datetime.timedelta(seconds=60))
    checkpoints = ModelCheckpoint(dirpath=out, every_n_train_steps=1, save_last=True)
    trainer = pl.Trainer(accelerator="cpu", devices=world, strategy=strategy, max_epochs=1, logger=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[NonFiniteLossGuard(), FinalCheckpoint(), checkpoints])
    try:
        trainer.fit(_DivergingOnRank1(nan_at=1))
        return "finished"
    except TrainingStopped as exc:
        return str(exc)


@pytest.mark.distributed
def test_nonfinite_loss_on_one_rank_stops_every_rank(tmp_path: Path, ddp_run: Callable) -> None:
    """Rank 1 alone sees a NaN loss at its second batch: both ranks stop at the same step (no rank waits
    in a collective for the other), and last.ckpt holds the step before."""
    messages = ddp_run(2, _nonfinite_worker, tmp_path, lightning=True)
    assert all("at step 2 " in m for m in messages), messages
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 1
