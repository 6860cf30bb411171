"""Distributed hardening of EmbeddingModule / PartialFC (gloo, CPU):

* a batch left empty by corrupt samples on ONE rank is skipped on every rank (no hang, no crash), with
  the weights equal to a single process that skips the same step;
* world > 1 under a wrapper other than plain DDP fails at fit start;
* fp16: a non-finite class-center gradient on one rank makes every rank's loss scaler skip;
* checkpoints gather the center shards and their momentum onto rank 0 only, and resume on W' ranks;
* a checkpoint keeps the negative-sampling seed (the draws themselves: tests/test_partial_fc.py).
"""
from __future__ import annotations

import datetime
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Dict, List

import pytest
import pytorch_lightning as pl
import torch
from test_module_ddp import TinyNet  # the same DIM-6 network, no batch norm
from torch import nn
from torch.utils.data import DataLoader

from mlearn.heads import ArcFace, PartialFC
from mlearn.heads import distributed as D
from mlearn.module import EmbeddingModule, HeadConfig, sync_nonfinite_grads
from mlearn.schedules import LRSchedule

NUM_CLASSES, DIM, GLOBAL_BATCH, STEPS = 7, 6, 8, 3


def rank_batches(rank: int, world: int) -> List[tuple]:
    """This rank's (inputs, labels, num_corrupt) per step, as a data module hands them over: step 1 is
    all corrupt on the last rank, step 2 lost its first sample on rank 0 (a partially corrupt batch)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(STEPS, GLOBAL_BATCH, DIM, generator=g)
    y = torch.randint(0, NUM_CLASSES, (STEPS, GLOBAL_BATCH), generator=g)
    per = GLOBAL_BATCH // world
    batches = []
    for step in range(STEPS):
        xs, ys = x[step, rank * per:(rank + 1) * per], y[step, rank * per:(rank + 1) * per]
        corrupt = 0
        if step == 1 and rank == world - 1:
            xs, ys, corrupt = xs[:0], ys[:0], per
        if step == 2 and rank == 0:
            xs, ys, corrupt = xs[1:], ys[1:], 1
        batches.append((xs, ys, torch.tensor(corrupt)))
    return batches


class CorruptModule(EmbeddingModule):
    def configure_model(self) -> None:
        if self.head is None:
            torch.manual_seed(1)  # the same initial centers in both layouts (DDP re-seeds the generator)
        super().configure_model()

    def train_dataloader(self) -> DataLoader:
        return DataLoader(rank_batches(self.global_rank, self.trainer.world_size), batch_size=None)


class Snapshots(pl.Callback):
    """The first backbone weight after every optimizer step."""

    def __init__(self) -> None:
        self.weights: List[torch.Tensor] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        self.weights.append(pl_module.backbone.body[0].weight.detach().clone())


def _fit_corrupt(devices: int, strategy: Any = "auto") -> Dict[str, Any]:
    torch.manual_seed(0)
    module = CorruptModule(TinyNet(), HeadConfig(margin=ArcFace(s=8.0, m=0.3)), num_classes=NUM_CLASSES,
                           optimizer=partial(torch.optim.SGD, lr=0.5, momentum=0.9),
                           schedule=LRSchedule("constant"))
    snapshots = Snapshots()
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_epochs=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         use_distributed_sampler=False, callbacks=[snapshots])
    trainer.fit(module)
    return {"global_step": trainer.global_step, "snapshots": snapshots.weights,
            "backbone": {k: v.detach().clone() for k, v in module.backbone.state_dict().items()},
            "head": D.all_gather_variable(module.head.weight.detach()),
            "momentum": D.all_gather_variable(_momentum(trainer, module)),
            "scheduler_steps": trainer.lr_scheduler_configs[0].scheduler.last_epoch,
            "corrupt": float(trainer.callback_metrics["train/corrupt_samples"])}


def _momentum(trainer: pl.Trainer, module: EmbeddingModule) -> torch.Tensor:
    return trainer.optimizers[0].state[module.head.weight]["momentum_buffer"]


def _corrupt_worker(rank: int, world: int) -> Dict[str, Any]:
    from pytorch_lightning.strategies import DDPStrategy

    strategy = DDPStrategy(process_group_backend="gloo", timeout=datetime.timedelta(seconds=60))
    return _fit_corrupt(world, strategy)


@pytest.mark.distributed
def test_all_corrupt_batch_on_one_rank_is_skipped_on_every_rank(ddp_run: Callable) -> None:
    ranks = ddp_run(2, _corrupt_worker, lightning=True)
    single = _fit_corrupt(1)  # one process, whole global batch: step 1 is empty, so skipped
    for result in ranks:
        assert result["global_step"] == STEPS and result["scheduler_steps"] == STEPS
        assert result["corrupt"] == 4 + 1  # rank 1's empty batch and rank 0's lost sample
        for key, value in single["backbone"].items():
            torch.testing.assert_close(result["backbone"][key], value, rtol=1e-5, atol=1e-6, msg=key)
        torch.testing.assert_close(result["head"], single["head"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(result["momentum"], single["momentum"], rtol=1e-5, atol=1e-6)
    for key in single["backbone"]:  # the backbones never diverged
        assert torch.equal(ranks[0]["backbone"][key], ranks[1]["backbone"][key]), key
    assert single["corrupt"] == GLOBAL_BATCH + 1
    # the skipped step moved nothing (no momentum step either); the others did
    before, skipped, after = ranks[0]["snapshots"]
    assert torch.equal(before, skipped) and not torch.equal(skipped, after)


# --------------------------------------------------------------------------------- strategies


def _tiny_module(num_classes: int = NUM_CLASSES, **head: Any) -> EmbeddingModule:
    return EmbeddingModule(TinyNet(), HeadConfig(margin=ArcFace(s=8.0, m=0.3), **head),
                           num_classes=num_classes, optimizer=partial(torch.optim.SGD, lr=0.5, momentum=0.9),
                           schedule=LRSchedule("constant"))


class FakeFSDPStrategy:
    def __init__(self) -> None:
        self.model = nn.Linear(2, 2)  # what FSDP or DeepSpeed would have wrapped the module into


@pytest.mark.parametrize("world", [1, 2])
def test_non_ddp_wrapper_on_several_ranks_fails_at_fit_start(world: int) -> None:
    module = _tiny_module()
    module._trainer = SimpleNamespace(strategy=FakeFSDPStrategy(), world_size=world)
    if world == 1:
        module.on_fit_start()  # nothing to sum over: any strategy is fine
        return
    with pytest.raises(ValueError, match=r"FakeFSDPStrategy wraps the model in Linear on 2 processes; "
                                         r"EmbeddingModule supports plain DDP only"):
        module.on_fit_start()


# ------------------------------------------------------------------------------------- fp16


def _fp16_step(rank: int, world: int, inject: bool, sync: bool) -> Dict[str, Any]:
    torch.manual_seed(0)
    module = _tiny_module()
    module.configure_model()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    module._trainer = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=scaler))
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    before = [p.detach().clone() for p in module.parameters()]
    g = torch.Generator().manual_seed(rank)
    x, y = torch.randn(4, DIM, generator=g), torch.randint(0, NUM_CLASSES, (4,), generator=g)
    loss = module.head(module.backbone(x), y)
    scaler.scale(loss).backward()
    for p in module.backbone.parameters():  # what DDP with the sum hook does
        p.grad = D.all_reduce_sum(p.grad)
    if inject and rank == world - 1:
        module.head.weight.grad[0, 0] = float("inf")  # an fp16 overflow in this rank's shard only
    if sync:
        module.on_after_backward()
    scaler.step(optimizer)
    scaler.update()
    moved = any(not torch.equal(a, p) for a, p in zip(before, module.parameters()))
    return {"moved": moved, "scale": scaler.get_scale()}


def _fp16_cases(rank: int, world: int) -> Dict[str, Any]:
    cases = (("clean", False, True), ("synced", True, True), ("unsynced", True, False))
    return {name: _fp16_step(rank, world, inject, sync) for name, inject, sync in cases}


@pytest.mark.distributed
def test_fp16_nonfinite_center_grad_on_one_rank_skips_every_rank(ddp_run: Callable) -> None:
    ranks = ddp_run(2, _fp16_cases)
    assert [r["clean"] for r in ranks] == [{"moved": True, "scale": 1024.0}] * 2
    assert [r["synced"] for r in ranks] == [{"moved": False, "scale": 512.0}] * 2
    # what the sync prevents: rank 0 steps and keeps its scale while rank 1 skips
    assert [r["unsynced"] for r in ranks] == [{"moved": True, "scale": 1024.0},
                                              {"moved": False, "scale": 512.0}]


def test_sync_nonfinite_grads_single_process() -> None:
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3))
    a.grad, b.grad = torch.tensor([1.0, float("nan")]), torch.ones(3)
    assert sync_nonfinite_grads([a], [a, b]) and torch.isinf(b.grad).all()
    a.grad, b.grad = torch.ones(2), torch.ones(3)
    assert not sync_nonfinite_grads([a], [a, b]) and torch.equal(b.grad, torch.ones(3))


# -------------------------------------------------------------------------------- checkpoints


def _trained_module(rank: int, num_subcenters: int = 2) -> tuple:
    torch.manual_seed(10)
    module = _tiny_module(num_subcenters=num_subcenters)
    module.configure_model()
    optimizer = module.optimizer_factory(module._param_groups())
    for p in module.parameters():
        p.grad = torch.full_like(p, 0.1 * (rank + 1))  # rank-dependent center momentum
    optimizer.step()
    return module, optimizer


def _save(rank: int, world: int, path: str) -> Dict[str, Any]:
    module, optimizer = _trained_module(rank)
    weight = module.head.weight
    expected = {"weight": D.all_gather_variable(weight),  # what every rank held before
                "momentum": D.all_gather_variable(optimizer.state[weight]["momentum_buffer"])}
    checkpoint = {"state_dict": module.state_dict(), "optimizer_states": [optimizer.state_dict()]}
    module.on_save_checkpoint(checkpoint)
    saved_weight = checkpoint["state_dict"]["head.weight"]
    head_index = sum(len(g["params"]) for g in optimizer.param_groups[:-1])  # the last group: the centers
    saved_momentum = checkpoint["optimizer_states"][0]["state"][head_index]["momentum_buffer"]
    if rank == 0:
        assert torch.equal(saved_weight, expected["weight"]) and saved_weight.device.type == "cpu"
        assert torch.equal(saved_momentum, expected["momentum"])
        torch.save({"checkpoint": checkpoint, "expected": expected}, path)
    else:  # only rank 0 writes: no full copy anywhere else
        assert saved_weight.numel() == 0 and saved_momentum.numel() == 0
    # the live optimizer state is untouched by the save
    assert optimizer.state[weight]["momentum_buffer"].shape == weight.shape
    return {"rows": weight.shape[0]}


def _load(rank: int, world: int, path: str) -> Dict[str, Any]:
    torch.manual_seed(99)  # another initialisation than the saved one
    module = _tiny_module(num_subcenters=2)
    module.configure_model()
    optimizer = module.optimizer_factory(module._param_groups())
    saved = torch.load(path, weights_only=False)
    checkpoint, expected = saved["checkpoint"], saved["expected"]
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"])
    optimizer.load_state_dict(checkpoint["optimizer_states"][0])
    head = module.head
    rows = slice(head.class_start * 2, (head.class_start + head.num_local) * 2)
    assert torch.equal(head.weight.detach(), expected["weight"][rows])
    assert torch.equal(optimizer.state[head.weight]["momentum_buffer"], expected["momentum"][rows])
    assert head.sample_seed == checkpoint["partial_fc_sample_seed"]
    if world > 1:
        _gather_blocks(rank, world)
    return {"rows": head.weight.shape[0]}


def _gather_blocks(rank: int, world: int) -> None:
    """gather_to_root in rounds of any size equals the plain all-gather, on rank 0 only."""
    local = torch.arange(rank * 100, rank * 100 + 3 * (rank + 1) * 5, dtype=torch.float32).view(-1, 5)
    expected = D.all_gather_variable(local)
    for block_bytes in (1, 40, 1 << 20):  # one row per round, a few rows, everything at once
        got = D.gather_to_root(local, block_bytes=block_bytes)
        assert (torch.equal(got, expected) if rank == 0 else got is None), block_bytes


@pytest.mark.distributed
def test_checkpoint_gathers_on_rank0_only_and_resumes_on_other_world_sizes(tmp_path: Path,
                                                                          ddp_run: Callable) -> None:
    path = str(tmp_path / "ckpt.pt")
    saved = ddp_run(2, _save, path)
    assert sum(r["rows"] for r in saved) == NUM_CLASSES * 2
    written = torch.load(path, weights_only=False)["checkpoint"]
    assert written["state_dict"]["head.weight"].shape == (NUM_CLASSES * 2, 4)
    loaded3 = ddp_run(3, _load, path)
    assert [r["rows"] for r in loaded3] == [6, 4, 4]  # 7 classes: 3 + 2 + 2, two sub-centers each
    assert _load(0, 1, path) == {"rows": NUM_CLASSES * 2}  # no torch.distributed at all


def test_single_process_state_dict_is_the_parameter() -> None:
    head = PartialFC(ArcFace(), 4, 5)
    assert head.state_dict(keep_vars=True)["weight"] is head.weight  # W = 1: unchanged, no copy


# --------------------------------------------------------------------------------- sampling


def test_module_checkpoint_keeps_the_sampling_seed() -> None:
    torch.manual_seed(1)
    saved = _tiny_module(sample_rate=0.5)
    saved.configure_model()
    checkpoint: Dict[str, Any] = {}
    saved.on_save_checkpoint(checkpoint)
    torch.manual_seed(2)
    resumed = _tiny_module(sample_rate=0.5)
    resumed.configure_model()
    assert resumed.head.sample_seed != saved.head.sample_seed
    resumed.on_load_checkpoint(checkpoint)
    assert resumed.head.sample_seed == saved.head.sample_seed


# ------------------------------------------------------------------------------ class count


def test_one_class_is_refused() -> None:
    with pytest.raises(ValueError, match=r"num_classes=1: a classifier needs at least 2 classes"):
        PartialFC(ArcFace(), 4, 1)
    with pytest.raises(ValueError, match=r"model.num_classes=1: a classifier needs at least 2 classes"):
        _tiny_module(num_classes=1)
    unlinked = _tiny_module(num_classes=0)  # 0: linked from the data later
    with pytest.raises(ValueError, match=r"model.num_classes=0: a classifier needs at least 2 classes"):
        unlinked.configure_model()
