"""Training schedules (:mod:`mlearn.schedules`): the learning-rate decays and warmup (checked against
arcface_torch's PolyScheduler and WeSpeaker's ExponentialDecrease), the typed ``model.schedule`` config
group, and the margin ramp of :class:`MarginScheduler` (WeSpeaker's)."""
from __future__ import annotations

import math
import typing
from types import SimpleNamespace
from typing import Any, List

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mlearn.module import EmbeddingModule, HeadConfig
from mlearn.schedules import DECAYS, LRSchedule, MarginScheduler, Schedule, ScheduleName, margin_at

# ----------------------------------------------------------------------------------- learning rate


def wespeaker_exponential(step: int, total: int, warmup: int, initial: float, final: float) -> float:
    """WeSpeaker ExponentialDecrease with warm_from_zero (its VoxCeleb setting), written from its formula;
    our ramp is (t + 1) / W instead of t / W so that the first step does not have lr 0."""
    ramp = (step + 1) / warmup if step < warmup else 1.0
    return ramp * initial * math.exp(step / total * math.log(final / initial))


def test_exponential_schedule_matches_wespeaker() -> None:
    per_epoch = 10
    total, warmup = 150 * per_epoch, 6 * per_epoch  # 150 epochs, 6 warmup epochs: lr 0.1 -> 5e-5
    schedule = Schedule("exponential", total_steps=total, warmup_steps=warmup, steps_per_epoch=per_epoch,
                        final_lr_ratio=5e-5 / 0.1)
    for step in (0, 29, 59, 60, 300, 750, total - 1):
        expected = wespeaker_exponential(step, total, warmup, 0.1, 5e-5)
        assert 0.1 * schedule(step) == pytest.approx(expected, rel=1e-9)
    assert 0.1 * schedule(total - 1) == pytest.approx(5e-5, rel=0.01)  # reaches lr * ratio at the end
    assert 0.1 * schedule(750) == pytest.approx(0.1 * math.sqrt(5e-4), rel=1e-9)


def test_poly_cosine_step_constant_schedules() -> None:
    poly = Schedule("poly", total_steps=100, warmup_steps=10)
    assert [poly(t) for t in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert poly(55) == pytest.approx((1 - 45 / 90) ** 2)  # arcface_torch PolyScheduler, power 2
    assert poly(100) == 0.0
    cosine = Schedule("cosine", total_steps=100)
    assert [cosine(0), cosine(50), cosine(100)] == pytest.approx([1.0, 0.5, 0.0])
    step = Schedule("step", total_steps=100, steps_per_epoch=10, milestones=[2, 5], gamma=0.1)
    assert [step(t) for t in (0, 19, 20, 49, 50, 99)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    assert Schedule("constant", total_steps=5)(4) == 1.0
    assert sorted(DECAYS) == sorted(typing.get_args(ScheduleName))  # the CLI's choices are the registry
    with pytest.raises(KeyError, match="unknown learning-rate schedule 'linear'"):
        Schedule("linear", total_steps=5)


class _Flat(nn.Module):
    embedding_size = 4

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class _Lrs(pl.Callback):
    def __init__(self) -> None:
        self.lrs: List[float] = []

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_module_runs_the_exponential_schedule_per_step() -> None:
    from mlearn.heads import ArcFace

    class Module(EmbeddingModule):
        def train_dataloader(self) -> DataLoader:
            g = torch.Generator().manual_seed(0)
            data = TensorDataset(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g))
            return DataLoader(data, batch_size=4)  # 4 steps per epoch

    module = Module(_Flat(), HeadConfig(margin=ArcFace(s=8.0, m=0.2)), num_classes=3,
                    optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
                    schedule=LRSchedule("exponential", final_lr_ratio=1e-2, warmup_epochs=0.5))
    lrs = _Lrs()
    pl.Trainer(accelerator="cpu", max_epochs=3, callbacks=[lrs], logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False).fit(module)
    total, warmup = 12, 2
    expected = [0.1 * min((t + 1) / warmup, 1.0) * 1e-2 ** (t / total) for t in range(total)]
    assert lrs.lrs == pytest.approx(expected, rel=1e-6)


def test_lr_schedule_validates_its_fields() -> None:
    with pytest.raises(ValueError, match="final_lr_ratio"):
        LRSchedule("exponential", final_lr_ratio=0.0)
    with pytest.raises(ValueError, match="lr_milestones"):
        LRSchedule("step")
    with pytest.raises(ValueError, match="warmup_epochs"):
        LRSchedule(warmup_epochs=-1.0)
    with pytest.raises(KeyError, match="unknown learning-rate schedule 'linear'"):
        LRSchedule("linear")  # type: ignore[arg-type]


def test_lr_schedule_in_epochs_becomes_a_per_step_schedule() -> None:
    per_step = LRSchedule("step", warmup_epochs=0.5, lr_milestones=[2, 5], lr_gamma=0.5).per_step(100, 10)
    assert (per_step.kind, per_step.total_steps, per_step.warmup_steps, per_step.steps_per_epoch) == \
        ("step", 100, 5, 10)
    assert per_step.milestones == [2.0, 5.0] and per_step.gamma == 0.5
    assert LRSchedule().per_step(0, 1).total_steps == 1  # never an empty run


def test_old_margin_schedule_path_still_resolves() -> None:
    from mlearn import margin_schedule

    assert margin_schedule.MarginScheduler is MarginScheduler and margin_schedule.margin_at is margin_at


# ----------------------------------------------------------------------------------- margin


def test_margin_schedule_values():
    kw = dict(steps_per_epoch=100, initial_margin=0.0, final_margin=0.2, increase_start_epoch=20,
              fix_start_epoch=40)
    assert margin_at(0, **kw) == 0.0
    assert margin_at(1899, **kw) == 0.0  # epoch 19 (1-based) still at the initial margin
    assert margin_at(1900, **kw) == 0.0  # the ramp starts at 0
    assert margin_at(2900, **kw) == pytest.approx(0.2 * (1 - 10 ** -1.5))  # half-way: 0.1937
    assert margin_at(2000, **kw) == pytest.approx(0.2 * (1 - 10 ** -0.15))
    assert margin_at(3899, **kw) == pytest.approx(0.2 * (1 - 10 ** (-3 * 1999 / 2000)))
    assert margin_at(3900, **kw) == 0.2 and margin_at(10 ** 6, **kw) == 0.2
    assert margin_at(2900, increase_type="linear", **kw) == pytest.approx(0.1)
    values = [margin_at(s, **kw) for s in range(1900, 3901, 50)]
    assert all(b >= a for a, b in zip(values, values[1:]))


def test_margin_scheduler_callback_sets_the_head_margin():
    callback = MarginScheduler(0.0, 0.2, increase_start_epoch=2, fix_start_epoch=4)
    margin = SimpleNamespace(m=0.5)
    logged = {}
    module = SimpleNamespace(head=SimpleNamespace(margin=margin), log=lambda k, v, **_: logged.update({k: v}))
    trainer = SimpleNamespace(num_training_batches=10, accumulate_grad_batches=1, global_step=0,
                              current_epoch=0)
    for step, expected in [(0, 0.0), (9, 0.0), (10, 0.0), (20, 0.2 * (1 - 10 ** -1.5)), (30, 0.2), (99, 0.2)]:
        trainer.global_step = step
        callback.on_train_batch_start(trainer, module, None, 0)
        assert margin.m == pytest.approx(expected) and logged["train/margin"] == pytest.approx(expected)
    per_epoch = MarginScheduler(0.0, 0.2, 2, 4, increase_type="linear", interval="epoch")
    trainer.global_step, trainer.current_epoch = 25, 2  # mid-epoch: the epoch's start value
    per_epoch.on_train_batch_start(trainer, module, None, 5)
    assert margin.m == pytest.approx(0.1)
    with pytest.raises(ValueError, match="no attribute 'm'"):
        no_margin = SimpleNamespace(head=SimpleNamespace(margin=object()))
        callback.on_train_batch_start(trainer, no_margin, None, 0)
