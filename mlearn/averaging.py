"""Checkpoint averaging (the element-wise mean of the last N checkpoints' weights) and starting a
run from averaged weights (:class:`LoadWeights`).

WeSpeaker averages the last 10 epoch checkpoints of its VoxCeleb recipes (``num_avg: 10``) before
scoring. :func:`average_checkpoints` takes Lightning ``.ckpt`` files (or plain state dicts) and
returns a checkpoint whose ``state_dict`` is the mean; everything else (hyper-parameters, so that
``mlearn.load_model`` / ``mlearn eval`` rebuild the model) is copied from the newest one, without
optimizer or scheduler state (a mean of weights has no meaningful momentum). Floating-point
tensors are averaged in float64 and cast back; integer tensors (BatchNorm's
``num_batches_tracked``) are taken from the newest checkpoint.

Checkpoints load through :func:`mlearn.trust.load_checkpoint` (``weights_only``); ``unsafe=True``
(``--unsafe-load``) admits legacy pickles, only for files you trust.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import pytorch_lightning as pl
import torch

from mlearn.trust import load_checkpoint, order_checkpoints

log = logging.getLogger(__name__)

PathLike = Union[str, Path]
_DROPPED = ("optimizer_states", "lr_schedulers", "loops", "callbacks")


def _state_dict(checkpoint: Dict[str, Any]) -> Dict[str, Any]:
    state = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError("expected a Lightning checkpoint (with 'state_dict') or a state dict of tensors")
    return state


def average_state_dicts(states: Sequence[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Element-wise mean of ``states`` (same keys and shapes); integer tensors from the last one."""
    if not states:
        raise ValueError("average_state_dicts: no state dicts given")
    keys = list(states[-1])
    for index, state in enumerate(states):
        if set(state) != set(keys):
            missing = sorted(set(keys) ^ set(state))[:5]
            raise ValueError(f"state dict {index} has different keys from the last one (e.g. {missing})")
    out: Dict[str, torch.Tensor] = {}
    for key in keys:
        last = states[-1][key]
        shapes = {tuple(s[key].shape) for s in states}
        if len(shapes) != 1:
            raise ValueError(f"'{key}': shapes differ between checkpoints: {sorted(shapes)}")
        if last.is_floating_point() or last.is_complex():
            total = torch.zeros_like(last, dtype=torch.complex128 if last.is_complex() else torch.float64)
            for state in states:
                total += state[key].to(total.dtype)
            out[key] = (total / len(states)).to(last.dtype)
        else:
            out[key] = last.clone()
    return out


def last_checkpoints(folder: PathLike, num: int, pattern: str = "*.ckpt", *,
                     unsafe: bool = False) -> List[Path]:
    """The ``num`` newest checkpoints in ``folder`` by their recorded (epoch, global_step), oldest first.

    ``last*.ckpt`` (Lightning's copy of the newest) is skipped so that no checkpoint counts twice.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {folder}")
    if num < 1:
        raise ValueError(f"num={num}: expected at least one checkpoint to average")
    paths = sorted(p for p in folder.glob(pattern) if not p.name.startswith("last"))
    if len(paths) < num:
        raise ValueError(f"{folder}: {len(paths)} checkpoint(s) ({[p.name for p in paths]}), {num} "
                         "requested; save more with ModelCheckpoint(save_top_k=-1, every_n_epochs=...)")
    return order_checkpoints(list(paths), unsafe=unsafe)[-num:]


def average_checkpoints(paths: Sequence[PathLike], output: Optional[PathLike] = None, *,
                        unsafe: bool = False) -> Dict[str, Any]:
    """Average the weights of ``paths`` (listed oldest first; the last gives the metadata).

    Returns the averaged checkpoint (``state_dict`` + the newest checkpoint's other entries minus
    optimizer/scheduler/loop state, plus ``averaged_from``: the file names); writes it to
    ``output`` when given (never over one of ``paths``).
    """
    if not paths:
        raise ValueError("average_checkpoints: no checkpoints given")
    if output is not None and any(Path(output).resolve() == Path(p).resolve() for p in paths):
        raise ValueError(f"--output {output} is one of the checkpoints being averaged; "
                         "expected a new file")
    checkpoints = [load_checkpoint(p, unsafe=unsafe) for p in paths]
    states = []
    for path, checkpoint in zip(paths, checkpoints):
        try:
            states.append(_state_dict(checkpoint))
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
    averaged = average_state_dicts(states)
    newest = checkpoints[-1]
    if "state_dict" in newest:
        result = {k: v for k, v in newest.items() if k not in _DROPPED and k != "state_dict"}
        result["state_dict"] = averaged
        result["averaged_from"] = [Path(p).name for p in paths]
    else:
        result = averaged
    if output is not None:
        output = Path(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        torch.save(result, output)
        log.info("averaged %d checkpoints -> %s", len(paths), output)
    return result


class LoadWeights(pl.Callback):
    """Start a run from the weights of a checkpoint (e.g. an averaged one), not its training state.

    For the large-margin fine-tune: ``trainer.callbacks: [{class_path: mlearn.averaging.LoadWeights,
    init_args: {path: runs/resnet34/avg10.ckpt}}]``. The state dict (backbone and head; the head's
    class count must match) is loaded at fit start, after the head is built; the optimizer, the
    schedule and the epoch count start afresh. Skipped when the run resumes from ``--ckpt_path``
    (the resumed checkpoint already holds the fine-tuned weights).

    Args:
        path: Lightning checkpoint or state dict.
        strict: every key must match (``False`` loads the matching ones and logs the rest).
        unsafe: load a legacy pickled checkpoint (``weights_only=False``; only for files you trust).
    """

    def __init__(self, path: str, strict: bool = True, unsafe: bool = False) -> None:
        super().__init__()
        self.path = path
        self.strict = strict
        self.unsafe = unsafe

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.ckpt_path:
            log.info("LoadWeights: resuming from %s, %s not loaded", trainer.ckpt_path, self.path)
            return
        state = _state_dict(load_checkpoint(self.path, unsafe=self.unsafe))
        result = pl_module.load_state_dict(state, strict=self.strict)
        if not self.strict and (result.missing_keys or result.unexpected_keys):
            log.warning("LoadWeights %s: %d missing, %d unexpected keys", self.path, len(result.missing_keys),
                        len(result.unexpected_keys))
        log.info("initial weights loaded from %s", self.path)
