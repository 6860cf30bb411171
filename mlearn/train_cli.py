"""``mlearn train``: LightningCLI over :class:`EmbeddingModule` and a data module; YAML maps 1:1 onto
constructor arguments, dotted flags override it (``--model.head.margin.m 0.4``)."""
from __future__ import annotations

import re
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
    from mlearn.cli import UsageError

    try:
        cli = MLearnCLI(
            EmbeddingModule,
            LightningDataModule,
            subclass_mode_data=True,
            args=argv,
            run=False,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"exit_on_error": False},
            auto_configure_optimizers=False,
        )
    except ArgumentError as exc:
        raise UsageError(_one_line(str(exc))) from None
    ckpt_path = cli.config.get("ckpt_path")
    run_dir = Path(cli.config.get("run_dir"))
    if ckpt_path == "last":
        ckpt_path = str(run_dir / "checkpoints" / "last.ckpt")
    if ckpt_path and not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"--ckpt_path {ckpt_path}: no such checkpoint")
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    print(f"run dir: {run_dir} (checkpoints/last.ckpt, metrics.csv, config.yaml)")
    return 0


_KNOWN_HINTS = {
    "margin": ("mlearn.heads", "list_margins"),
    "backbone": ("mlearn.models", "list_backbones"),
}


def _one_line(message: str) -> str:
    """jsonargparse explains a bad key over several indented lines; keep the informative ones."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    text = "; ".join(dict.fromkeys(lines))
    for key, (module, lister) in _KNOWN_HINTS.items():
        if re.search(rf"\b{key}\b", text) and ("class_path" in text or "Import path" in text):
            import importlib

            names = getattr(importlib.import_module(module), lister)()
            text += f" (registered {key}s: {names})"
    return text
