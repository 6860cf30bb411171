"""Exact resume: what a checkpoint holds beyond weights and optimizer state so that ``--ckpt_path``
continues a run as if it had not stopped.

* Random streams (:func:`save_rng_states`, :func:`rng_state_to_restore`, :func:`set_rng_state`): every
  rank's torch, CUDA, numpy and python states, saved under ``checkpoint["rng_states"]`` and restored at
  train start when the rank count matches (dropout, stochastic margins draw the same numbers).
* Sample position (:func:`sample_position`, :func:`position_to_resume`): the epoch and the samples of it
  already consumed, saved by the data module (Lightning stores its ``state_dict``), from which its
  sampler restarts mid-epoch.

States are stored in types that ``torch.load(weights_only=True)`` accepts.
"""
from __future__ import annotations

import logging
import random
import warnings
from typing import Any, Dict, List, Optional

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist

from mlearn._compat import train_batches_processed
from mlearn.heads.distributed import rank_and_world

log = logging.getLogger(__name__)

RNG_KEY = "rng_states"

# ------------------------------------------------------------------------------ random streams


def rng_state(device: torch.device) -> Dict[str, Any]:
    """This process's random-number state (CUDA's too when ``device`` is a GPU)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = {"kind": kind, "keys": torch.from_numpy(np.asarray(keys).astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "gauss": float(gauss)}
    state: Dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate(),
                             "numpy": numpy_state}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Dict[str, Any], device: torch.device) -> None:
    """Restore a state of :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["gauss"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def gather_rng_states(device: torch.device) -> List[Dict[str, Any]]:
    """Every rank's random-number state, in rank order (a collective call when distributed)."""
    state = rng_state(device)
    _, world = rank_and_world()
    if world == 1:
        return [state]
    states: List[Any] = [None] * world
    dist.all_gather_object(states, state)
    return states


def save_rng_states(checkpoint: Dict[str, Any], device: torch.device) -> None:
    """Store every rank's random state in ``checkpoint`` (a collective: every rank calls it)."""
    checkpoint[RNG_KEY] = gather_rng_states(device)


def rng_state_to_restore(checkpoint: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """This rank's saved random state, or None when there is none or the checkpoint was saved on another
    number of ranks (then the streams restart from this run's seed, with a warning)."""
    states = checkpoint.get(RNG_KEY)
    if not states:
        return None
    rank, world = rank_and_world()
    if len(states) == world:
        return states[rank]
    log.warning("checkpoint saved on %d ranks, resuming on %d: random streams (dropout, stochastic "
                "margins) restart from this run's seed", len(states), world)
    return None


# ------------------------------------------------------------------------------ sample position


def sample_position(trainer: Optional[pl.Trainer], seed: int, global_batch: int) -> Dict[str, int]:
    """Where the training data stands: ``{seed, epoch, samples, global_batch}`` (``samples``: global
    samples of ``epoch`` consumed); empty when unknown (no trainer, or a loader without length)."""
    if trainer is None:
        return {}
    per_epoch = trainer.num_training_batches
    if not isinstance(per_epoch, int) or per_epoch <= 0:
        return {}
    epoch, within = divmod(train_batches_processed(trainer), per_epoch)
    return {"seed": seed, "epoch": epoch, "samples": within * global_batch, "global_batch": global_batch}


def position_to_resume(state: Dict[str, Any], seed: int) -> Optional[Dict[str, int]]:
    """``{epoch, samples}`` to restart the sampler from, given a :func:`sample_position` (None: empty)."""
    if not state:
        return None
    if int(state.get("seed", seed)) != seed:
        log.warning("resuming with data seed %d, the checkpoint used %s: the sample order changes",
                    seed, state["seed"])
    # Lightning warns that a mid-epoch resume is unreliable unless the DataLoader itself is stateful;
    # here the data module restores the position instead
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")
    return {"epoch": int(state["epoch"]), "samples": int(state["samples"])}
