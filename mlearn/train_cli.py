"""``mlearn train``: LightningCLI over :class:`EmbeddingModule` and a data module; YAML maps 1:1 onto
constructor arguments, dotted flags override it (``--model.head.margin.m 0.4``).

Besides ``model``, ``data`` and ``trainer``, a config has ``run_dir`` (checkpoints, logs, config copy),
``ckpt_path`` (resume; ``last`` = ``<run_dir>/checkpoints/last.ckpt``), ``checkpoint`` (the arguments of
the run's :class:`~pytorch_lightning.callbacks.ModelCheckpoint`: ``every_n_train_steps``, ``monitor``,
``mode``, ``save_top_k``; ``last.ckpt`` is kept and overwritten) and ``dry_run`` (build everything,
print a summary, do not train).
"""
from __future__ import annotations

import math
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from jsonargparse import ArgumentError
from pytorch_lightning import LightningDataModule, Trainer
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

from mlearn.module import EmbeddingModule


def _checkpoint_dir(run_dir: str) -> str:
    return str(Path(run_dir) / "checkpoints")


class MLearnCLI(LightningCLI):
    """Adds ``--run_dir``, ``--ckpt_path``, ``--dry_run`` and the ``checkpoint`` group (a ModelCheckpoint)."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument("--run_dir", type=str, default="runs/train",
                            help="output folder: checkpoints/, CSV + TensorBoard logs, config.yaml, "
                                 "label_map.json")
        parser.add_argument("--ckpt_path", type=Optional[str], default=None,
                            help="resume from this checkpoint ('last' = <run_dir>/checkpoints/last.ckpt)")
        parser.add_argument("--dry_run", type=bool, default=False,
                            help="build the model, data and trainer, print a summary and exit without "
                                 "training")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        # the run dir owns its checkpoints: overwrite (no last-v1.ckpt), so that --ckpt_path last is the newest
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.enable_version_counter": False})
        parser.link_arguments("run_dir", "trainer.default_root_dir")
        parser.link_arguments("run_dir", "checkpoint.dirpath", compute_fn=_checkpoint_dir)
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")

    def parse_arguments(self, parser: Any, args: Any) -> None:
        from mlearn.cli import UsageError

        try:
            super().parse_arguments(parser, args)
        except ArgumentError as exc:
            raise UsageError(describe_parse_error(parser, str(exc))) from None

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        run_dir = Path(self._get(self.config, "run_dir"))
        trainer_config = self._get(self.config_init, "trainer", default={})
        if trainer_config.get("logger") in (None, True):
            kwargs["logger"] = [CSVLogger(run_dir, name="", version=""),
                                TensorBoardLogger(run_dir, name="", version="")]
        return super().instantiate_trainer(**kwargs)


def run_training(argv: List[str]) -> int:
    """Parse ``argv`` (LightningCLI syntax), train (or, with ``--dry_run true``, summarise), and report
    where the run went."""
    cli = build_cli(argv)
    if cli.config.get("dry_run"):
        print(describe_run(cli.model, cli.datamodule, cli.trainer))
        return 0
    ckpt_path = cli.config.get("ckpt_path")
    run_dir = Path(cli.config.get("run_dir"))
    if ckpt_path == "last":
        ckpt_path = str(run_dir / "checkpoints" / "last.ckpt")
    if ckpt_path and not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"--ckpt_path {ckpt_path}: no such checkpoint")
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    print(f"run dir: {run_dir} (checkpoints/last.ckpt, metrics.csv, config.yaml)")
    return 0


def build_cli(argv: List[str]) -> MLearnCLI:
    """Parse ``argv`` and instantiate the model, data module and trainer (nothing is trained)."""
    program, sys.argv[1:] = sys.argv[1:], []  # LightningCLI warns when sys.argv and args both hold options
    try:
        return MLearnCLI(
            EmbeddingModule,
            LightningDataModule,
            subclass_mode_data=True,
            args=argv,
            run=False,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"exit_on_error": False, "prog": "mlearn train"},
            auto_configure_optimizers=False,
        )
    finally:
        sys.argv[1:] = program


def plan_steps(trainer: Trainer, num_samples: int, batch_size: int) -> Dict[str, int]:
    """Steps the trainer will run on ``num_samples`` images at ``batch_size`` per process, as the
    training loop counts them: ``{world_size, global_batch, steps_per_epoch, total_steps}``."""
    world = max(int(trainer.world_size), 1)
    batches = num_samples // (batch_size * world)
    limit = trainer.limit_train_batches
    if isinstance(limit, int):
        batches = min(batches, limit)
    elif limit is not None:
        batches = int(batches * float(limit))
    per_epoch = max(math.ceil(batches / trainer.accumulate_grad_batches), 1)
    epochs = trainer.max_epochs if trainer.max_epochs not in (None, -1) else None
    by_epochs = per_epoch * epochs if epochs is not None else None
    max_steps = trainer.max_steps if trainer.max_steps not in (None, -1) else None
    totals = [t for t in (by_epochs, max_steps) if t is not None]
    total = min(totals) if totals else per_epoch * 1000  # Lightning's default max_epochs
    return {"world_size": world, "global_batch": batch_size * world, "steps_per_epoch": per_epoch,
            "total_steps": int(total)}


def describe_run(model: EmbeddingModule, datamodule: Any, trainer: Trainer) -> str:
    """A few lines describing what training would do: backbone size, head, data, batch, steps, lr."""
    backbone = model.backbone
    params = sum(p.numel() for p in backbone.parameters())
    cfg = model.head_config
    lines = [f"backbone      {type(backbone).__name__}: {params / 1e6:.2f} M parameters, embedding "
             + str(model.embedding_size),
             f"head          {cfg.margin!r}, sample_rate {cfg.sample_rate}, {model.num_classes} classes"]
    dataset = getattr(datamodule, "dataset", None)
    batch_size = int(getattr(datamodule, "batch_size", 0) or 0)
    optimizer = model.optimizer_factory([{"params": list(backbone.parameters())}])
    base_lr = float(optimizer.param_groups[0]["lr"])
    clip = model.clip_backbone_grad_norm
    lines.append(f"optimizer     {type(optimizer).__name__}({_group_settings(optimizer)})"
                 + (f", backbone gradient norm clipped at {clip}" if clip else ""))
    lines.append(f"precision     {trainer.precision}, {trainer.num_devices} device(s) x {trainer.num_nodes} "
                 f"node(s) ({type(trainer.strategy).__name__})")
    if dataset is not None and batch_size > 0:
        plan = plan_steps(trainer, len(dataset), batch_size)
        schedule = model.build_schedule(plan["total_steps"], plan["steps_per_epoch"])
        source = getattr(datamodule, "train_path", "?")
        lines.append(f"data          {len(dataset)} images from {source}; batch {batch_size} per process, "
                     f"{plan['global_batch']} global; {plan['steps_per_epoch']} steps per epoch, "
                     f"{plan['total_steps']} steps in all")
        if len(dataset) < plan["global_batch"]:
            lines.append("warning       fewer images than one global batch: training would stop with an "
                         "error")
        total = plan["total_steps"]
        marks = sorted({0, schedule.warmup_steps, total // 4, total // 2, 3 * total // 4, total - 1})
        lrs = ", ".join(f"{t}: {base_lr * schedule(t):.3g}" for t in marks if 0 <= t < total)
        lines.append(f"schedule      {model.schedule}, warmup {schedule.warmup_steps} steps; "
                     f"lr at step {lrs}")
    return "\n".join(lines)


def _group_settings(optimizer: Any) -> str:
    group = optimizer.param_groups[0]
    keys = [k for k in ("lr", "momentum", "weight_decay", "betas", "eps", "nesterov") if k in group]
    return ", ".join(f"{k}={group[k]}" for k in keys)


def describe_parse_error(parser: Any, message: str) -> str:
    """One line from jsonargparse's multi-line error, plus the valid choices for the offending key."""
    lines = [line.strip(" -") for line in message.splitlines() if line.strip(" -")]
    text = "; ".join(dict.fromkeys(lines))
    key = _offending_key(message)
    if key is None:
        return text
    bad_class = (re.search(r"Expected a dot import path string: (\S+)", message)
                 or re.search(r"Problem with given class_path '([^']+)':\s+module", message))
    if key.endswith("margin") and bad_class:
        from mlearn.heads.margins import MARGINS

        classes = sorted({f"mlearn.heads.{MARGINS.get(name).__name__}" for name in MARGINS.names()})
        return (f"{key}: unknown margin '{bad_class.group(1)}'; known: {classes} "
                f"(short names also work, e.g. CosFace; registry names: {MARGINS.names()})")
    if key.endswith("backbone") and bad_class:
        from mlearn.models import list_backbones

        return (f"{key}: unknown backbone class '{bad_class.group(1)}'; give a class_path such as "
                f"mlearn.models.IResNet or mlearn.models.TimmBackbone (registered backbones: {list_backbones()})")
    bad_option = re.search(r"Option '(\w+)' is not accepted", message)
    classes = re.findall(r"class_path '([^']+)'", message)
    if bad_option and classes:
        return f"{key}: {classes[-1]} has no argument '{bad_option.group(1)}'; accepted: {_init_args(classes[-1])}"
    parent = key.rpartition(".")[0]
    if "unrecognized" in text or "not expected" in text:
        children = sorted({a.dest[len(parent) + 1:].split(".")[0] for a in parser._actions
                           if parent and a.dest.startswith(parent + ".")})
        if children:
            return f"{text} (valid keys under '{parent}': {children})"
    return text


def _offending_key(message: str) -> Optional[str]:
    """The full dotted key: jsonargparse nests relative keys (``model.head`` then ``margin``)."""
    keys = re.findall(r'(?:Parser key|Key) "([\w.]+)"', message)
    if not keys:
        match = re.search(r"--([\w.]+)", message)
        return match.group(1) if match else None
    full = keys[0]
    for key in keys[1:]:
        full = key if key.startswith(full) else f"{full}.{key}"
    return full


def _init_args(class_path: str) -> List[str]:
    import importlib
    import inspect

    module, _, name = class_path.rpartition(".")
    params = inspect.signature(getattr(importlib.import_module(module), name)).parameters
    return [p for p in params if p != "self"]
