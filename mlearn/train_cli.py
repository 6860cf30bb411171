"""``mlearn train``: LightningCLI over :class:`EmbeddingModule` and a data module; YAML maps 1:1 onto
constructor arguments, dotted flags override it (``--model.head.margin.m 0.4``).

Besides ``model``, ``data`` and ``trainer``, a config has ``run_dir`` (checkpoints, logs, config copy),
``ckpt_path`` (resume; ``last`` = ``<run_dir>/checkpoints/last.ckpt``), ``checkpoint`` (the arguments of
the run's :class:`~pytorch_lightning.callbacks.ModelCheckpoint`: ``every_n_train_steps``, ``monitor``,
``mode``, ``save_top_k``; ``last.ckpt`` is kept and overwritten, and always written at the end of fit),
``overwrite`` (start over in a run dir that holds a previous run), ``unsafe_load`` (resume from a legacy
pickled checkpoint: runs code from the file, only for files you trust) and ``dry_run`` (build everything,
print a summary, do not train).

Everything is built and checked before the run dir is touched: the model and data (bad values end in one
line), a run dir that already holds a run (refused unless ``--ckpt_path`` resumes it or ``--overwrite
true`` clears it), and a resume checkpoint (read with ``weights_only=True``; class count, embedding size
and backbone shapes compared with the config; a mismatch or an unreadable file names the intact
checkpoints of the run dir). A resume keeps the earlier ``metrics.csv`` rows (those of steps after the
checkpoint are dropped: those steps run again).

The guards of :mod:`mlearn.callbacks` run with every training: the first non-finite loss stops it
(``last.ckpt`` keeps the last good state), SIGTERM writes ``last.ckpt`` and exits with status 143, and an
epoch with no usable sample stops it naming the data.
"""
from __future__ import annotations

import copy
import csv
import json
import logging
import math
import shutil
import sys
import tempfile
import zipfile
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from jsonargparse import ArgumentError
from pytorch_lightning import LightningDataModule, Trainer
from pytorch_lightning.callbacks import Checkpoint, ModelCheckpoint
from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from pytorch_lightning.loggers.logger import rank_zero_experiment
from pytorch_lightning.utilities.exceptions import SIGTERMException

from mlearn import _compat
from mlearn.callbacks import (
    FinalCheckpoint,
    NonFiniteLossGuard,
    NoUsableDataGuard,
    Preempted,
    PreemptionCheckpoint,
)
from mlearn.config_errors import describe_parse_error
from mlearn.errors import UsageError
from mlearn.module import EmbeddingModule
from mlearn.trust import checkpoint_safe_globals, load_checkpoint

log = logging.getLogger(__name__)

# what a training run writes into its run dir (besides checkpoints/): cleared by --overwrite true
RUN_FILES = ("metrics.csv", "hparams.yaml", "config.yaml", "label_map.json")
EVENTS_GLOB = "events.out.tfevents.*"


def _checkpoint_dir(run_dir: str) -> str:
    return str(Path(run_dir) / "checkpoints")


class MLearnCLI(LightningCLI):
    """Adds ``--run_dir``, ``--ckpt_path``, ``--overwrite``, ``--unsafe_load``, ``--dry_run`` and the
    ``checkpoint`` group (a ModelCheckpoint); the trainer logs to ``<run_dir>/metrics.csv`` and TensorBoard
    and runs the guards of :mod:`mlearn.callbacks` before its checkpoint callbacks."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument("--run_dir", type=str, default="runs/train",
                            help="output folder: checkpoints/, CSV + TensorBoard logs, config.yaml, "
                                 "label_map.json")
        parser.add_argument("--ckpt_path", type=Optional[str], default=None,
                            help="resume from this checkpoint ('last' = <run_dir>/checkpoints/last.ckpt)")
        parser.add_argument("--overwrite", type=bool, nargs="?", const=True, default=False,
                            help="start over in a run dir that holds a previous run: delete its checkpoints "
                                 "and logs first (without it, such a run dir is refused)")
        parser.add_argument("--unsafe_load", "--unsafe-load", type=bool, nargs="?", const=True, default=False,
                            help="resume from a legacy pickled checkpoint (torch.load weights_only=False): "
                                 "runs code from the file, only for files you trust")
        parser.add_argument("--dry_run", type=bool, default=False,
                            help="build the model, data and trainer, print a summary and exit without "
                                 "training")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        # the run dir owns its checkpoints: overwrite (no last-v1.ckpt), so --ckpt_path last is the newest
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.enable_version_counter": False})
        parser.link_arguments("run_dir", "trainer.default_root_dir")
        parser.link_arguments("run_dir", "checkpoint.dirpath", compute_fn=_checkpoint_dir)
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")

    def parse_arguments(self, parser: Any, args: Any) -> None:

        try:
            super().parse_arguments(parser, args)
        except ArgumentError as exc:
            message = describe_parse_error(parser, str(exc))
            configs = [str(args[i + 1]) for i, a in enumerate(args[:-1]) if a == "--config"]
            if "Problems parsing config" in message and configs:  # jsonargparse names no file
                message = f"--config {', '.join(configs)}: {message}"
            raise UsageError(message) from None

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        run_dir = Path(_compat.cli_value(self, self.config, "run_dir"))
        trainer_config = _compat.cli_value(self, self.config_init, "trainer", default={})
        if trainer_config.get("logger") in (None, True):
            kwargs["logger"] = [RunCSVLogger(run_dir), TensorBoardLogger(run_dir, name="", version="")]
        trainer = super().instantiate_trainer(**kwargs)
        source = str(getattr(self.datamodule, "train_path", "the training data"))
        guards = [NonFiniteLossGuard(), NoUsableDataGuard(source), FinalCheckpoint(), PreemptionCheckpoint()]
        # before the checkpoint callbacks: a guard that stops a step stops its checkpoint too
        first = next((i for i, c in enumerate(trainer.callbacks) if isinstance(c, Checkpoint)),
                     len(trainer.callbacks))
        trainer.callbacks[first:first] = guards
        return trainer


class _HistoryWriter(_compat.KeepableExperimentWriter):
    """A metrics.csv writer that, on resume, appends to the earlier rows instead of deleting them, dropping
    the rows of steps at or after ``resume_step`` (steps that run again)."""

    def __init__(self, log_dir: str, resume_step: Optional[int]) -> None:
        self._resume_step = resume_step
        super().__init__(log_dir)

    def keep_existing(self) -> bool:
        if self._resume_step is None or not Path(self.metrics_file_path).is_file():
            return False
        path = Path(self.metrics_file_path)
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            keys, rows = list(reader.fieldnames or []), list(reader)
        kept = [row for row in rows if not _step_at_or_after(row.get("step"), self._resume_step)]
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(kept)
        self.metrics_keys = keys  # the file's header, in its order: appended rows must match it
        return True


def _step_at_or_after(value: Optional[str], step: int) -> bool:
    try:
        return int(float(value or "")) >= step
    except ValueError:
        return False


class RunCSVLogger(CSVLogger):
    """``<run_dir>/metrics.csv``; set ``resume_step`` (the checkpoint's global step) before fit to keep the
    earlier rows on resume."""

    def __init__(self, run_dir: Any) -> None:
        super().__init__(run_dir, name="", version="")
        self.resume_step: Optional[int] = None

    @property
    @rank_zero_experiment
    def experiment(self) -> _HistoryWriter:
        def make() -> _HistoryWriter:
            Path(self.root_dir).mkdir(parents=True, exist_ok=True)
            return _HistoryWriter(self.log_dir, self.resume_step)

        return _compat.cached_experiment(self, make)


def run_training(argv: List[str]) -> int:
    """Parse ``argv`` (LightningCLI syntax), train (or, with ``--dry_run true``, summarise), and report
    where the run went."""
    cli = build_cli(argv)
    check_head(cli.model)
    if cli.config.get("dry_run"):
        print(describe_run(cli.model, cli.datamodule, cli.trainer))
        return 0
    run_dir = Path(cli.config.get("run_dir"))
    unsafe = bool(cli.config.get("unsafe_load"))
    ckpt_path = prepare_start(cli, run_dir, unsafe)
    # Lightning's own load of the resume checkpoint admits the same plain-data globals as mlearn.trust
    allowed = nullcontext() if unsafe else torch.serialization.safe_globals(checkpoint_safe_globals())
    try:
        with allowed:
            cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path,
                            weights_only=not unsafe)
    except SIGTERMException:
        raise Preempted(_preempted_message(cli.trainer)) from None
    print(f"run dir: {run_dir} (checkpoints/last.ckpt, metrics.csv, config.yaml)")
    return 0


def prepare_start(cli: MLearnCLI, run_dir: Path, unsafe: bool) -> Optional[str]:
    """Every check before the run dir is written: the resume checkpoint (read safely, compared with the
    model and data), or a run dir holding a run (refused, or cleared with ``--overwrite``). Returns the
    resume checkpoint path (None: a fresh start) and creates the run dir."""
    overwrite = bool(cli.config.get("overwrite"))
    ckpt_path = resolve_ckpt_path(cli.config.get("ckpt_path"), run_dir)
    if ckpt_path is None:
        prepare_run_dir(run_dir, overwrite=overwrite)
    else:
        checkpoint = check_resume(ckpt_path, cli.model, cli.datamodule, run_dir, unsafe=unsafe)
        step = int(checkpoint.get("global_step", 0))
        if overwrite:  # a fine-tune from another run's checkpoint, starting over
            prepare_run_dir(run_dir, overwrite=True, keep=ckpt_path)
        for logger in cli.trainer.loggers if not overwrite else []:
            if isinstance(logger, RunCSVLogger):
                logger.resume_step = step
    run_dir.mkdir(parents=True, exist_ok=True)  # an unusable path fails here, naming it
    return ckpt_path


def _preempted_message(trainer: Trainer) -> str:
    saved = next((c.saved for c in trainer.callbacks if isinstance(c, PreemptionCheckpoint)), None)
    where = (f"saved {saved}; resume with --ckpt_path last" if saved is not None
             else "no checkpoint saved (no step finished, or non-finite weights)")
    return f"SIGTERM received: training stopped at step {trainer.global_step}; {where}"


def resolve_ckpt_path(ckpt_path: Optional[str], run_dir: Path) -> Optional[str]:
    """``--ckpt_path`` as a file (``last`` = ``<run_dir>/checkpoints/last.ckpt``); a missing file is an
    error naming the checkpoints the run dir does hold."""
    if not ckpt_path:
        return None
    path = run_dir / "checkpoints" / "last.ckpt" if ckpt_path == "last" else Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"--ckpt_path {ckpt_path}: no such checkpoint {path}"
                                + _checkpoints_note(path.parent))
    return str(path)


def _intact_checkpoints(folder: Path, exclude: Optional[Path] = None) -> List[str]:
    """Names of the ``*.ckpt`` in ``folder`` whose zip directory reads (a truncated file's does not),
    oldest first."""
    names = []
    for path in sorted(folder.glob("*.ckpt"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []:
        if exclude is not None and path.resolve() == exclude.resolve():
            continue
        try:
            with zipfile.ZipFile(path):
                names.append(path.name)
        except (OSError, zipfile.BadZipFile):
            continue
    return names


def _checkpoints_note(folder: Path, exclude: Optional[Path] = None) -> str:
    names = _intact_checkpoints(folder, exclude)
    if not names:
        return f"; no other intact checkpoint in {folder}" if folder.is_dir() else ""
    return f"; intact checkpoints in {folder}: {names} (pass one as --ckpt_path)"


def check_resume(ckpt_path: str, model: EmbeddingModule, datamodule: Any, run_dir: Path,
                 unsafe: bool = False) -> Dict[str, Any]:
    """Read the resume checkpoint safely (:func:`mlearn.trust.load_checkpoint`, memory-mapped) and check
    that it fits ``model`` and the data; returns it.

    Raises ValueError (one line: the mismatch, values on both sides, and the run dir's intact checkpoints)
    before anything is written, so a failed resume leaves the run dir as it was."""
    path = Path(ckpt_path)
    try:
        checkpoint = load_checkpoint(path, unsafe=unsafe, mmap=True)
    except ValueError as exc:
        raise ValueError(f"--ckpt_path {exc}" + _checkpoints_note(path.parent, path)) from None
    state = checkpoint.get("state_dict")
    if not isinstance(state, dict):
        raise ValueError(f"--ckpt_path {path}: not a Lightning checkpoint (no state_dict)"
                         + _checkpoints_note(path.parent, path))
    mismatch = _model_mismatch(state, model) or _label_map_mismatch(run_dir, path, datamodule)
    if mismatch:
        raise ValueError(f"--ckpt_path {path} does not fit this run: {mismatch}; the run dir is unchanged"
                         + _checkpoints_note(path.parent, path))
    return checkpoint


def _model_mismatch(state: Dict[str, Any], model: EmbeddingModule) -> Optional[str]:
    """The first difference between a checkpoint's state dict and the configured model, in words."""
    head = state.get("head.weight")
    if head is not None:
        subcenters = int(getattr(model.head_config, "num_subcenters", 1) or 1)
        rows, width = int(head.shape[0]), int(head.shape[-1])
        if rows != model.num_classes * subcenters:
            return (f"checkpoint has {rows // subcenters} classes, the data has {model.num_classes} "
                    f"(model.num_classes)")
        if width != model.embedding_size:
            return f"checkpoint embedding size {width}, the config's backbone gives {model.embedding_size}"
    ours = {f"backbone.{k}": v for k, v in model.backbone.state_dict().items()}
    theirs = {k: v for k, v in state.items() if k.startswith("backbone.")}
    missing, extra = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
    if missing or extra:
        return (f"backbone parameters differ (missing in the checkpoint: {missing[:3]}, not in the config's "
                f"backbone: {extra[:3]})")
    for key, value in ours.items():
        if tuple(theirs[key].shape) != tuple(value.shape):
            return f"{key}: checkpoint shape {tuple(theirs[key].shape)}, config shape {tuple(value.shape)}"
    return None


def _label_map_mismatch(run_dir: Path, ckpt: Path, datamodule: Any) -> Optional[str]:
    """Whether the training set's label map differs from the one the run dir recorded (resume in place)."""
    saved = run_dir / "label_map.json"
    dataset = getattr(datamodule, "dataset", None)
    if not saved.is_file() or not hasattr(dataset, "save_label_map"):
        return None
    if ckpt.resolve().parent.parent != run_dir.resolve():  # a checkpoint of another run: a fine-tune
        return None
    with tempfile.TemporaryDirectory() as folder:
        dataset.save_label_map(Path(folder) / "label_map.json")
        current = json.loads((Path(folder) / "label_map.json").read_text(encoding="utf-8"))
    try:
        before = json.loads(saved.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if before == current:
        return None
    changed = sorted(set(before.items()) ^ set(current.items()))
    return (f"the training set's identities differ from {saved} ({len(before)} recorded, {len(current)} now, "
            f"e.g. {changed[0][0]!r})")


def previous_run(run_dir: Path) -> List[str]:
    """What a run that trained left in ``run_dir``: its checkpoints and ``metrics.csv`` (empty: none)."""
    found = [f"checkpoints/{p.name}" for p in sorted((run_dir / "checkpoints").glob("*.ckpt"))]
    metrics = run_dir / "metrics.csv"
    if metrics.is_file() and metrics.stat().st_size > 0:
        found.append(metrics.name)
    return found


def _training_files(run_dir: Path) -> List[Path]:
    """Everything training writes into ``run_dir`` (other files are the user's)."""
    paths = [run_dir / "checkpoints", *(run_dir / name for name in RUN_FILES)]
    paths += sorted(run_dir.glob(EVENTS_GLOB))
    return [p for p in paths if p.exists()]


def prepare_run_dir(run_dir: Path, overwrite: bool, keep: Optional[str] = None) -> None:
    """Refuse a run dir that holds a run (checkpoints or metrics), or with ``overwrite`` delete what
    training writes there (checkpoints/, metrics, config, label map, TensorBoard events; other files
    stay). The files of a start that never trained (a config or data error at fit start) are replaced
    without asking. ``keep``: a checkpoint that must survive (the one a fine-tune starts from)."""

    found = previous_run(run_dir)
    if found and not overwrite:
        shown = ", ".join(found[:4]) + (f", ... ({len(found)} files)" if len(found) > 4 else "")
        raise UsageError(f"run dir {run_dir} already holds a run ({shown}): pass --ckpt_path last to resume "
                         f"it, or --overwrite true to delete its checkpoints and logs and start over")
    checkpoints = run_dir / "checkpoints"
    if keep is not None and Path(keep).resolve().parent == checkpoints.resolve():
        raise UsageError(f"--overwrite true would delete --ckpt_path {keep}: copy it out of {checkpoints} "
                         f"first, or resume without --overwrite")
    stale = _training_files(run_dir)
    if stale and not found:
        log.info("run dir %s: replacing the files of a start that never trained: %s", run_dir,
                 [p.name for p in stale])
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def check_head(model: EmbeddingModule) -> None:
    """Build a two-class stand-in of the model's head (same margin and settings): a bad head setting
    fails here, before the run dir is written. (The real head is built at fit start, once the ranks
    exist, after Lightning has written config.yaml and label_map.json.) The global random state is
    left as it was."""
    cfg = model.head_config
    try:
        with torch.random.fork_rng(devices=[]):
            # a copy of the criterion: the stand-in's C=2 would otherwise re-initialise its bias
            replace(cfg, criterion=copy.deepcopy(cfg.criterion)).build(model.embedding_size, 2)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"model.head: {exc}") from None


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
        lines.append(f"schedule      {model.schedule.decay}, warmup {schedule.warmup_steps} steps; "
                     f"lr at step {lrs}")
    return "\n".join(lines)


def _group_settings(optimizer: Any) -> str:
    group = optimizer.param_groups[0]
    keys = [k for k in ("lr", "momentum", "weight_decay", "betas", "eps", "nesterov") if k in group]
    return ", ".join(f"{k}={group[k]}" for k in keys)
