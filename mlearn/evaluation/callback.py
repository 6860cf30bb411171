"""Verification on insightface ``.bin`` sets during training (a Lightning callback)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pytorch_lightning as pl
from torch import nn

from mlearn.data import read_bin
from mlearn.evaluation.metrics.verification import verify_pairs
from mlearn.inference import DEFAULT_IMAGE_SPEC, TorchEmbedder, embed_batches

log = logging.getLogger(__name__)


class VerificationCallback(pl.Callback):
    """Log ``val/<name>/accuracy`` (LFW 10-fold, flip fusion), ``accuracy_std``, ``tar@far=1e-3`` and
    ``eer`` for each ``.bin`` set at the end of every ``every_n_epochs`` training epochs, or every
    ``every_n_train_steps`` optimizer steps when that is > 0: never at step 0, and once per optimizer
    step under gradient accumulation (not once per micro-batch).

    Every rank computes the (small) sets itself, so a ``ModelCheckpoint(monitor="val/<name>/accuracy",
    mode="max")`` selects the best checkpoint under DDP too. A missing file fails at fit start.
    """

    def __init__(self, bins: List[str], every_n_epochs: int = 1, every_n_train_steps: int = 0,
                 batch_size: int = 64, flip: bool = True) -> None:
        super().__init__()
        self.bins = [Path(b) for b in bins]
        self.every_n_epochs = every_n_epochs
        self.every_n_train_steps = every_n_train_steps
        self.batch_size = batch_size
        self.flip = flip
        self._sets: Dict[str, Tuple[np.ndarray, np.ndarray]] = {}
        self._last_step: Optional[int] = None  # the global step evaluated last (or resumed at)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for path in self.bins:
            if not path.is_file():
                raise FileNotFoundError(f"VerificationCallback: {path} not found (see datasets/face_bins.md)")
            self._sets[path.stem] = read_bin(path)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_step = trainer.global_step  # a resumed run evaluated its current step already

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step  # optimizer steps done; unchanged between micro-batches
        if self.every_n_train_steps <= 0 or step == 0 or step == self._last_step:
            return
        if step % self.every_n_train_steps == 0:
            self._last_step = step
            self.evaluate(pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_train_steps <= 0 and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.evaluate(pl_module)

    def evaluate(self, pl_module: pl.LightningModule) -> Dict[str, float]:
        backbone = pl_module.backbone
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"VerificationCallback: the LightningModule's backbone is a "
                            f"{type(backbone).__name__}, expected a torch.nn.Module")
        spec = dict(getattr(backbone, "input_spec", DEFAULT_IMAGE_SPEC))
        was_training = backbone.training
        embedder = TorchEmbedder(backbone, spec, device=str(pl_module.device))  # sets eval mode
        metrics: Dict[str, float] = {}
        try:
            for name, (images, issame) in self._sets.items():
                batches = (images[i:i + self.batch_size] for i in range(0, len(images), self.batch_size))
                result = verify_pairs(embed_batches(embedder, batches, self.flip), issame)
                metrics.update({f"val/{name}/accuracy": result["accuracy"],
                                f"val/{name}/accuracy_std": result["accuracy_std"],
                                f"val/{name}/tar@far=1e-3": result["tar_at_far"][1e-3],
                                f"val/{name}/eer": result["eer"]})
                log.info("%s: accuracy %.5f ± %.5f", name, result["accuracy"], result["accuracy_std"])
        finally:
            backbone.train(was_training)
        pl_module.log_dict(metrics)
        return metrics
