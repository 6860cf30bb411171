"""Training guards that ``mlearn train`` installs: a run never ends silently in a bad state.

* :class:`NonFiniteLossGuard`: the first non-finite loss stops training (every rank together) with one
  line naming the step and the likely causes; no checkpoint holding non-finite weights is ever written,
  so ``last.ckpt`` stays the last good one.
* :class:`FinalCheckpoint`: ``last.ckpt`` is written at the end of fit when the periodic checkpoints
  (``checkpoint.every_n_train_steps``) missed the final steps.
* :class:`PreemptionCheckpoint`: on SIGTERM (cluster preemption) Lightning stops after the current
  batch; this writes ``last.ckpt`` there, and the CLI exits with :data:`PREEMPTED_EXIT_CODE`.
* :class:`NoUsableDataGuard`: an epoch in which every batch was skipped (all samples corrupt or
  unreadable) stops training with one line naming the data and the corrupt count.

A guard stops training by raising :class:`TrainingStopped` (``str()`` is the line for the user,
``exit_code`` the process status the CLI returns).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities.exceptions import SIGTERMException

from mlearn import _compat
from mlearn.heads import distributed as D
from mlearn.module import unpack_batch  # the one reader of the batch formats

log = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM, as a shell reports a process killed by SIGTERM
LAST_CHECKPOINT = "last.ckpt"


class TrainingStopped(RuntimeError):
    """A guard stopped training; the message is one line naming the cause."""

    exit_code = 1


class Preempted(TrainingStopped):
    """SIGTERM received; ``last.ckpt`` written (when the weights were finite)."""

    exit_code = PREEMPTED_EXIT_CODE


def _sum_ranks(values: list) -> list:
    """Element-wise sum over all ranks of a short list of ints (a collective)."""
    return [int(v) for v in D.all_reduce_sum(torch.tensor(values, dtype=torch.long)).tolist()]


def _loss_of(outputs: Any) -> Optional[torch.Tensor]:
    if isinstance(outputs, dict):
        outputs = outputs.get("loss")
    return outputs if torch.is_tensor(outputs) else None


def weights_finite(module: torch.nn.Module) -> bool:
    """Whether every parameter and floating-point buffer of ``module`` is finite on every rank."""
    tensors = [t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point() and t.numel()]
    local = bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()) if tensors else True
    return D.all_ranks_true(local)


def last_checkpoint_path(trainer: pl.Trainer) -> Optional[Path]:
    """``<checkpoint dir>/last.ckpt`` of the trainer's ModelCheckpoint (None without one)."""
    callback = trainer.checkpoint_callback
    if not isinstance(callback, ModelCheckpoint) or callback.dirpath is None:
        return None
    return Path(callback.dirpath) / LAST_CHECKPOINT


class NonFiniteLossGuard(pl.Callback):
    """Stop at the first non-finite training loss, and refuse to write a checkpoint whose weights are not
    finite (so that ``last.ckpt`` keeps the last good state).

    The loss is checked after every training batch, before the checkpoint callbacks of that step run;
    under DDP the decision is all-reduced, so every rank stops at the same step.
    """

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        loss = _loss_of(outputs)
        bad = loss is not None and not bool(torch.isfinite(loss.detach()).all())
        if not D.all_ranks_true(not bad):
            value = float(loss.detach().float().flatten()[0]) if bad and loss is not None else None
            what = (f"training loss is {value}" if value is not None
                    else "training loss is not finite on another rank")
            raise TrainingStopped(
                f"{what} at step {trainer.global_step} (epoch {trainer.current_epoch}, "
                f"batch {batch_idx}); likely causes: learning rate too high, fp16 overflow (try "
                f"--trainer.precision bf16-mixed or 32), corrupt inputs; {_kept_checkpoint(trainer)}")

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict) -> None:
        # runs on every rank inside save_checkpoint, before rank 0 writes: raising aborts the write
        if not weights_finite(pl_module):
            raise TrainingStopped(
                f"weights are not finite at step {trainer.global_step} (epoch {trainer.current_epoch}); "
                f"checkpoint not written; likely causes: learning rate too high, fp16 overflow, corrupt "
                f"inputs; {_kept_checkpoint(trainer)}")


def _kept_checkpoint(trainer: pl.Trainer) -> str:
    last = last_checkpoint_path(trainer)
    if last is not None and last.is_file():
        return f"{last} holds the last good state"
    return "no checkpoint was written"


class FinalCheckpoint(pl.Callback):
    """Write ``last.ckpt`` at the end of fit unless the ModelCheckpoint already saved the final step."""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        callback = trainer.checkpoint_callback
        last = last_checkpoint_path(trainer)
        if last is None or trainer.global_step == 0:
            return
        if _compat.last_global_step_saved(callback) == trainer.global_step and last.is_file():
            return
        trainer.save_checkpoint(last, weights_only=False)
        log.info("saved the final step %d to %s", trainer.global_step, last)


class PreemptionCheckpoint(pl.Callback):
    """On SIGTERM, write ``last.ckpt`` where Lightning stopped (after the current batch)."""

    def __init__(self) -> None:
        self.saved: Optional[Path] = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        last = last_checkpoint_path(trainer)
        if last is None or trainer.global_step == 0:
            return
        try:
            trainer.save_checkpoint(last, weights_only=False)
        except TrainingStopped as exc:  # non-finite weights: keep the older last.ckpt
            log.warning("SIGTERM: %s", exc)
            return
        self.saved = last


class NoUsableDataGuard(pl.Callback):
    """Stop when a whole training epoch held no usable sample (every one corrupt or unreadable), on
    every rank (the counts are summed over the ranks).

    Args:
        source: the training data (path or description) named in the error.
    """

    def __init__(self, source: str = "the training data") -> None:
        self.source = source
        self._batches = self._good = self._corrupt = 0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._batches = self._good = self._corrupt = 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        try:
            _, labels, num_corrupt = unpack_batch(batch)
            good, corrupt = int(labels.numel()), int(num_corrupt)
        except (TypeError, ValueError, AttributeError):  # a batch format of another data module: usable
            good, corrupt = 1, 0
        self._batches += 1
        self._good += good
        self._corrupt += corrupt

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        batches, good, corrupt = _sum_ranks([self._batches, self._good, self._corrupt])
        if batches and not good:
            raise TrainingStopped(
                f"no usable training sample in epoch {trainer.current_epoch}: all {corrupt} samples of its "
                f"{batches} batches were corrupt or unreadable in {self.source} (check it with `mlearn data "
                f"inspect`)")
