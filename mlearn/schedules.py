"""``MarginScheduler``: ramp the margin of the training head during training (WeSpeaker's schedule).

WeSpeaker trains its VoxCeleb recipes with the AAM margin held at ``initial_margin`` until epoch
``increase_start_epoch``, raised to ``final_margin`` by ``fix_start_epoch`` and fixed afterwards
(``initial_margin: 0.0, final_margin: 0.2, increase_start_epoch: 20, fix_start_epoch: 40`` of 150
epochs). Epochs are counted from 1 as there, so the ramp runs over optimizer steps
``[(increase_start_epoch - 1) * E, (fix_start_epoch - 1) * E)`` with E steps per epoch. With
progress ``p`` in [0, 1) through the ramp:

* ``exp``: ``m = m0 + (m1 - m0) * (1 - 10^(-3p))`` — fast at first, flattening towards ``m1``
  (WeSpeaker's ``1 - exp(p * ln(1e-3 / (1 + 1e-6)))``; the 1e-6 is dropped);
* ``linear``: ``m = m0 + (m1 - m0) * p``.

The callback writes the value into ``pl_module.head.margin.<attribute>`` (default ``m``) before every
training batch (``interval: step``) or at the first batch of every epoch (``interval: epoch``), and
logs it as ``train/margin``. It derives the value from the global step, so a resumed run continues
the ramp where it stopped.
"""
from __future__ import annotations

import math
from typing import Any, Literal

import pytorch_lightning as pl


def margin_at(step: float, steps_per_epoch: float, initial_margin: float, final_margin: float,
              increase_start_epoch: float, fix_start_epoch: float,
              increase_type: Literal["exp", "linear"] = "exp") -> float:
    """The margin at optimizer step ``step`` (0-based); epochs 1-based as in WeSpeaker.

    >>> round(margin_at(0, 10, 0.0, 0.2, 20, 40), 3), round(margin_at(290, 10, 0.0, 0.2, 20, 40), 4)
    (0.0, 0.1937)
    >>> margin_at(390, 10, 0.0, 0.2, 20, 40)
    0.2
    """
    start = (increase_start_epoch - 1) * steps_per_epoch
    fix = (fix_start_epoch - 1) * steps_per_epoch
    if step >= fix:
        return float(final_margin)
    if step < start:
        return float(initial_margin)
    progress = (step - start) / (fix - start)
    if increase_type == "exp":
        ratio = 1.0 - math.exp(progress * math.log(1e-3))
    elif increase_type == "linear":
        ratio = progress
    else:
        raise ValueError(f"increase_type={increase_type!r}; expected 'exp' or 'linear'")
    return float(initial_margin + (final_margin - initial_margin) * ratio)


class MarginScheduler(pl.Callback):
    """Set the head's margin from the training progress (see the module docstring for the formula).

    Args:
        initial_margin: margin before ``increase_start_epoch`` (radians for ArcFace).
        final_margin: margin from ``fix_start_epoch`` on.
        increase_start_epoch: first epoch (1-based) of the ramp.
        fix_start_epoch: first epoch (1-based) at ``final_margin``; must not precede the start.
        increase_type: ``exp`` (WeSpeaker's default) or ``linear``.
        interval: update before every ``step`` or once per ``epoch``.
        attribute: attribute of ``pl_module.head.margin`` to set.
    """

    def __init__(self, initial_margin: float = 0.0, final_margin: float = 0.2, increase_start_epoch: float = 20,
                 fix_start_epoch: float = 40, increase_type: Literal["exp", "linear"] = "exp",
                 interval: Literal["step", "epoch"] = "step", attribute: str = "m") -> None:
        if fix_start_epoch < increase_start_epoch:
            raise ValueError(f"fix_start_epoch={fix_start_epoch} < increase_start_epoch={increase_start_epoch}")
        if increase_type not in ("exp", "linear"):
            raise ValueError(f"increase_type={increase_type!r}; expected 'exp' or 'linear'")
        if interval not in ("step", "epoch"):
            raise ValueError(f"interval={interval!r}; expected 'step' or 'epoch'")
        self.initial_margin = float(initial_margin)
        self.final_margin = float(final_margin)
        self.increase_start_epoch = increase_start_epoch
        self.fix_start_epoch = fix_start_epoch
        self.increase_type = increase_type
        self.interval = interval
        self.attribute = attribute
        self.margin = self.initial_margin
        self._checked = False

    def steps_per_epoch(self, trainer: pl.Trainer) -> float:
        """Optimizer steps per epoch of ``trainer`` (batches / gradient accumulation)."""
        batches = trainer.num_training_batches
        if not math.isfinite(batches) or batches <= 0:
            raise ValueError(f"MarginScheduler: the training loader has {batches} batches per epoch; "
                             "it needs a sized loader to place the ramp's epochs")
        return max(batches // max(trainer.accumulate_grad_batches, 1), 1)

    def value(self, trainer: pl.Trainer) -> float:
        steps = self.steps_per_epoch(trainer)
        step = trainer.global_step if self.interval == "step" else trainer.current_epoch * steps
        return margin_at(step, steps, self.initial_margin, self.final_margin, self.increase_start_epoch,
                         self.fix_start_epoch, self.increase_type)

    def check_values(self, margin: Any) -> None:
        """Refuse a schedule whose initial or final value the margin itself would refuse (its
        constructor validates the range): the scheduler sets the attribute directly."""
        hparams = getattr(margin, "_hparams", None)
        if hparams is None or self.attribute not in hparams():
            return
        for name in ("initial_margin", "final_margin"):
            try:
                type(margin)(**{**hparams(), self.attribute: getattr(self, name)})
            except ValueError as error:
                raise ValueError(f"MarginScheduler: {name}={getattr(self, name)} for "
                                 f"{type(margin).__name__}: {error}") from None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        margin = getattr(getattr(pl_module, "head", None), "margin", None)
        if margin is None or not hasattr(margin, self.attribute):
            raise ValueError(f"MarginScheduler: pl_module.head.margin has no attribute '{self.attribute}' "
                                 f"(head: {type(getattr(pl_module, 'head', None)).__name__}, margin: "
                                 f"{type(margin).__name__})")
        if not self._checked:
            self.check_values(margin)
            self._checked = True
        self.margin = self.value(trainer)
        setattr(margin, self.attribute, self.margin)
        pl_module.log("train/margin", self.margin, on_step=True, on_epoch=False)
