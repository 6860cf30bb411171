"""``mlearn train``: LightningCLI over :class:`EmbeddingModule` and a data module; YAML maps 1:1 onto
constructor arguments, dotted flags override it (``--model.head.margin.m 0.4``)."""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any, List, Optional

from jsonargparse import ArgumentError
from pytorch_lightning import LightningDataModule, Trainer
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

from mlearn.module import EmbeddingModule


class MLearnCLI(LightningCLI):
    """Adds ``--run_dir`` (checkpoints, logs and the config copy go there) and ``--ckpt_path``."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument("--run_dir", type=str, default="runs/train",
                            help="output folder: checkpoints/, CSV + TensorBoard logs, config.yaml, label_map.json")
        parser.add_argument("--ckpt_path", type=Optional[str], default=None,
                            help="resume from this checkpoint ('last' = <run_dir>/checkpoints/last.ckpt)")
        parser.link_arguments("run_dir", "trainer.default_root_dir")
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
        callbacks = list(trainer_config.get("callbacks") or [])
        if not any(isinstance(c, ModelCheckpoint) for c in callbacks):
            callbacks.append(ModelCheckpoint(dirpath=run_dir / "checkpoints", save_last=True))
        kwargs["callbacks"] = callbacks
        return super().instantiate_trainer(**kwargs)


def run_training(argv: List[str]) -> int:
    """Parse ``argv`` (LightningCLI syntax), train, and report where the run went."""
    program, sys.argv[1:] = sys.argv[1:], []  # LightningCLI warns when sys.argv and args both hold options
    try:
        cli = MLearnCLI(
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
    ckpt_path = cli.config.get("ckpt_path")
    run_dir = Path(cli.config.get("run_dir"))
    if ckpt_path == "last":
        ckpt_path = str(run_dir / "checkpoints" / "last.ckpt")
    if ckpt_path and not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"--ckpt_path {ckpt_path}: no such checkpoint")
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    print(f"run dir: {run_dir} (checkpoints/last.ckpt, metrics.csv, config.yaml)")
    return 0


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
