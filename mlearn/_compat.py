"""Every use of a private Lightning, jsonargparse or argparse API in mlearn, one small function each.

These names carry no compatibility promise, so ``constraints.txt`` pins the versions they were checked
against (pytorch-lightning, jsonargparse); when upgrading, this file is the one to re-read. Callers in
mlearn use the functions below and never reach for a ``_private`` attribute of a library object. Torch
(pinned too): its normalisation-layer base class here; the shared-memory storage of the training batch
pool stays beside that pool (``mlearn/data/images/batches.py``).
"""
from __future__ import annotations

import argparse
from typing import Any, Callable, List, Optional, TypeVar, cast

import pytorch_lightning as pl
from pytorch_lightning.core.mixins.hparams_mixin import _given_hyperparameters
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from torch import nn

Writer = TypeVar("Writer", bound=ExperimentWriter)

# normalisation layers whose parameters may get their own weight decay (torch has no public base class
# covering BatchNorm1d/2d/3d, their lazy variants and SyncBatchNorm)
NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


def built_by_cli() -> bool:
    """Whether the LightningModule being constructed is built by LightningCLI, which hands it the config
    (``class_path`` + ``init_args``) as its hyper-parameters."""
    return _given_hyperparameters.get() is not None


def ignore_in_ddp(module: nn.Module, names: List[str]) -> None:
    """Keep the parameters and buffers ``names`` (dotted, relative to ``module``) out of Lightning's DDP
    wrapper: neither broadcast at start nor all-reduced after backward."""
    module._ddp_params_and_buffers_to_ignore = list(names)  # type: ignore[assignment]


def ddp_comm_hook(strategy: Any) -> Any:
    """The DDP communication hook configured on a Lightning strategy (None: none, or not a DDP strategy)."""
    return getattr(strategy, "_ddp_comm_hook", None)


def attached_trainer(module: pl.LightningModule) -> Optional[pl.Trainer]:
    """The trainer ``module`` is attached to, or None (``module.trainer`` raises when there is none)."""
    return module._trainer


def setup_train_data(trainer: pl.Trainer) -> None:
    """Set up the training dataloader now (idempotent), so ``num_training_batches`` is known."""
    trainer.fit_loop.setup_data()


def train_batches_processed(trainer: pl.Trainer) -> int:
    """Training batches processed since the run began, all epochs together (restored on resume)."""
    return int(trainer.fit_loop.epoch_loop.batch_progress.total.processed)  # type: ignore[attr-defined]


def last_global_step_saved(callback: Any) -> Optional[int]:
    """The global step a ModelCheckpoint saved last (None: not a ModelCheckpoint, or nothing saved)."""
    return getattr(callback, "_last_global_step_saved", None)


def cli_value(cli: Any, config: Any, key: str, default: Any = None) -> Any:
    """``key`` of a LightningCLI config namespace (inside the subcommand's namespace when there is one)."""
    return cli._get(config, key, default)


def parser_dests(parser: argparse.ArgumentParser) -> List[str]:
    """The ``dest`` of every option of an argparse (or jsonargparse) parser, in declaration order."""
    return [action.dest for action in parser._actions]


class KeepableExperimentWriter(ExperimentWriter):
    """Lightning's CSV experiment writer, whose check of an existing log dir (it warns and deletes
    ``metrics.csv``) is skipped when :meth:`keep_existing` returns True."""

    def keep_existing(self) -> bool:
        """Override: True when the existing ``metrics.csv`` was taken care of (kept)."""
        return False

    def _check_log_dir_exists(self) -> None:
        if not self.keep_existing():
            super()._check_log_dir_exists()


def cached_experiment(logger: CSVLogger, make: Callable[[], Writer]) -> Writer:
    """``logger``'s experiment writer, created by ``make`` on first use (what ``CSVLogger.experiment``
    does with its own writer class)."""
    if logger._experiment is None:
        logger._experiment = make()
    return cast(Writer, logger._experiment)
