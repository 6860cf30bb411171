"""Training schedules: the learning rate (:class:`LRSchedule`, per step :class:`Schedule`) and the margin
of the head (:class:`MarginScheduler`).

Learning rate: the optimizer's lr times a per-step factor, a linear warmup over ``warmup_epochs`` then
the decay named ``decay`` (registered in :data:`DECAYS`):

- ``poly``: ``(1 - p)^poly_power``, ``p`` the progress after warmup (arcface_torch's PolyScheduler);
- ``cosine``: ``(1 + cos(pi p)) / 2``;
- ``constant``: 1;
- ``exponential``: ``final_lr_ratio^(t / T)`` over the whole run (t: step, T: total steps), so from the
  optimizer's lr to ``lr * final_lr_ratio`` at the last step, times the warmup ramp during warmup
  (WeSpeaker's ``ExponentialDecrease``; its VoxCeleb recipes go 0.1 -> 5e-5, ``final_lr_ratio: 5.0e-4``,
  over 150 epochs with 6 warmup epochs);
- ``step``: ``lr_gamma^k`` once ``k`` of ``lr_milestones`` are reached; a milestone ``m`` counts from the
  first step of 0-based epoch ``m`` (``MultiStepLR(milestones)`` stepped every epoch).

Margin: WeSpeaker trains its VoxCeleb recipes with the AAM margin held at ``initial_margin`` until epoch
``increase_start_epoch``, raised to ``final_margin`` by ``fix_start_epoch`` and fixed afterwards
(``initial_margin: 0.0, final_margin: 0.2, increase_start_epoch: 20, fix_start_epoch: 40`` of 150
epochs). Epochs are counted from 1 as there, so the ramp runs over optimizer steps
``[(increase_start_epoch - 1) * E, (fix_start_epoch - 1) * E)`` with E steps per epoch. With
progress ``p`` in [0, 1) through the ramp:

* ``exp``: ``m = m0 + (m1 - m0) * (1 - 10^(-3p))`` — fast at first, flattening towards ``m1``
  (WeSpeaker's ``1 - exp(p * ln(1e-3 / (1 + 1e-6)))``; the 1e-6 is dropped);
* ``linear``: ``m = m0 + (m1 - m0) * p``.

:class:`MarginScheduler` writes the value into ``pl_module.head.margin.<attribute>`` (default ``m``)
before every training batch (``interval: step``) or at the first batch of every epoch
(``interval: epoch``), and logs it as ``train/margin``.

Both schedules are functions of the global step, recomputed from the current config: a resumed run
continues where it stopped, and one resumed with a larger ``max_epochs`` decays towards the new end.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Literal, Optional, Sequence

import pytorch_lightning as pl

ScheduleName = Literal["poly", "cosine", "constant", "exponential", "step"]


# ------------------------------------------------------------------------------ learning rate


@dataclass(frozen=True)
class LRSchedule:
    """The learning-rate schedule of a run, in epochs (``model.schedule`` in a config; see the module doc).

    Args:
        decay: ``poly``, ``cosine``, ``constant``, ``exponential`` or ``step``.
        poly_power: exponent of ``poly``.
        warmup_epochs: linear warmup length (may be fractional).
        final_lr_ratio: lr at the last step / the optimizer's lr, for ``exponential``.
        lr_milestones: epochs (0-based) at which ``step`` multiplies the lr by ``lr_gamma``.
        lr_gamma: factor of ``step`` at each milestone.
    """

    decay: ScheduleName = "poly"
    poly_power: float = 2.0
    warmup_epochs: float = 0.0
    final_lr_ratio: float = 1.0e-3
    lr_milestones: Optional[List[float]] = None
    lr_gamma: float = 0.1

    def __post_init__(self) -> None:
        if self.decay not in DECAYS:
            raise KeyError(f"unknown learning-rate schedule '{self.decay}'; known: {sorted(DECAYS)}")
        if self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs={self.warmup_epochs}: expected >= 0")
        if self.decay == "exponential" and self.final_lr_ratio <= 0:
            raise ValueError(f"final_lr_ratio={self.final_lr_ratio}: expected a positive ratio")
        if self.decay == "step" and not self.lr_milestones:
            raise ValueError("schedule 'step' needs lr_milestones (epochs), e.g. [12, 20, 24]")

    def per_step(self, total_steps: int, steps_per_epoch: int) -> Schedule:
        """The per-step lr factor for a run of ``total_steps`` optimizer steps, ``steps_per_epoch`` each."""
        return Schedule(self.decay, total_steps=max(int(total_steps), 1),
                        warmup_steps=int(self.warmup_epochs * steps_per_epoch),
                        steps_per_epoch=steps_per_epoch,
                        poly_power=self.poly_power, final_lr_ratio=self.final_lr_ratio,
                        milestones=list(self.lr_milestones or []), gamma=self.lr_gamma)


@dataclass
class Schedule:
    """Learning-rate factor of optimizer step ``t`` (0-based): ``warmup(t) * decay(t)``.

    ``warmup(t) = min((t + 1) / warmup_steps, 1)`` (1 without warmup); ``decay`` is the registered
    function named ``kind`` (see :data:`DECAYS`).

    >>> s = Schedule("poly", total_steps=10, warmup_steps=2)
    >>> [round(s(t), 3) for t in (0, 1, 2, 6, 9)]
    [0.5, 1.0, 1.0, 0.25, 0.016]
    """

    kind: str
    total_steps: int
    warmup_steps: int = 0
    steps_per_epoch: int = 1
    poly_power: float = 2.0
    final_lr_ratio: float = 1.0e-3
    milestones: Sequence[float] = ()
    gamma: float = 0.1

    def __post_init__(self) -> None:
        if self.kind not in DECAYS:
            raise KeyError(f"unknown learning-rate schedule '{self.kind}'; known: {sorted(DECAYS)}")
        if self.total_steps < 1 or self.warmup_steps < 0 or self.steps_per_epoch < 1:
            raise ValueError(f"schedule steps: total={self.total_steps}, warmup={self.warmup_steps}, "
                             f"per epoch={self.steps_per_epoch}: expected positive counts (warmup >= 0)")
        self.milestones = [float(m) for m in self.milestones]

    def progress(self, step: int) -> float:
        """Fraction of the post-warmup steps done before ``step``, in [0, 1]."""
        span = max(self.total_steps - self.warmup_steps, 1)
        return min(max(step - self.warmup_steps, 0) / span, 1.0)

    def __call__(self, step: int) -> float:
        warm = min((step + 1) / self.warmup_steps, 1.0) if self.warmup_steps > 0 else 1.0
        return warm * DECAYS[self.kind](self, step)


def _poly(s: Schedule, step: int) -> float:
    return (1.0 - s.progress(step)) ** s.poly_power


def _cosine(s: Schedule, step: int) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * s.progress(step)))


def _constant(s: Schedule, step: int) -> float:
    return 1.0


def _exponential(s: Schedule, step: int) -> float:
    if not 0.0 < s.final_lr_ratio:
        raise ValueError(f"final_lr_ratio={s.final_lr_ratio}: expected a positive ratio")
    return s.final_lr_ratio ** (min(step, s.total_steps) / s.total_steps)


def _step(s: Schedule, step: int) -> float:
    epoch = step // s.steps_per_epoch
    return s.gamma ** sum(1 for m in s.milestones if epoch >= m)


DECAYS: Dict[str, Callable[[Schedule, int], float]] = {
    "poly": _poly, "cosine": _cosine, "constant": _constant, "exponential": _exponential, "step": _step,
}

DEFAULT_SCHEDULE = LRSchedule()  # frozen: safe to share as a default argument


# ------------------------------------------------------------------------------ margin


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

    def __init__(self, initial_margin: float = 0.0, final_margin: float = 0.2,
                 increase_start_epoch: float = 20, fix_start_epoch: float = 40,
                 increase_type: Literal["exp", "linear"] = "exp",
                 interval: Literal["step", "epoch"] = "step", attribute: str = "m") -> None:
        if fix_start_epoch < increase_start_epoch:
            raise ValueError(f"fix_start_epoch={fix_start_epoch} < "
                             f"increase_start_epoch={increase_start_epoch}")
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
