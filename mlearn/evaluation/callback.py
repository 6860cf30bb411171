"""Verification on insightface ``.bin`` sets during training (a Lightning callback)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pytorch_lightning as pl
import torch

from mlearn.data.bins import read_bin
from mlearn.evaluation.face_bins import bin_embeddings, verification_row
from mlearn.inference import DEFAULT_IMAGE_SPEC, preprocess_images

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
        spec = dict(getattr(backbone, "input_spec", DEFAULT_IMAGE_SPEC))
        was_training = backbone.training
        backbone.eval()

        def embed(batch: np.ndarray) -> np.ndarray:
            x = torch.from_numpy(preprocess_images(batch, spec)).to(pl_module.device)
            with torch.no_grad():
                return backbone(x).float().cpu().numpy()

        metrics: Dict[str, float] = {}
        try:
            for name, (images, issame) in self._sets.items():
                row = verification_row(name, "model", bin_embeddings(embed, images, self.batch_size, self.flip,
                                                                     progress=False), issame, self.flip)
                metrics.update({f"val/{name}/accuracy": row["accuracy"],
                                f"val/{name}/accuracy_std": row["accuracy_std"],
                                f"val/{name}/tar@far=1e-3": row["tar_at_far"][1e-3],
                                f"val/{name}/eer": row["eer"]})
                log.info("%s: accuracy %.5f ± %.5f", name, row["accuracy"], row["accuracy_std"])
        finally:
            backbone.train(was_training)
        pl_module.log_dict(metrics)
        return metrics
