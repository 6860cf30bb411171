"""Shared test fixtures.

* every test starts from the same seeds (python, numpy, torch): autouse;
* ``ddp_run(world_size, fn, *args, lightning=False) -> [result per rank]``: runs ``fn(rank, world_size,
  *args)`` in spawned gloo processes on CPU (:func:`ddp_utils.run_in_ddp`, the one DDP launcher: see
  its module for the process-group options). ``fn`` must be a module-level function of a test module,
  so that the spawned processes can import it by name; ``free_port``: an unused localhost port;
* ``tiny_recordio(root=None, classes=4, per_class=4, size=16, corrupt=(), **palette) -> Path``: writes
  a small insightface RecordIO set (``train.rec`` / ``train.idx`` / ``property``) of smooth random
  colour images, one colour palette per identity (:func:`data_utils.write_palette_rec`), into ``root``
  or a fresh temporary folder. ``per_class`` is a count or one count per class; the images at the
  positions ``corrupt`` are not decodable (their records stay well-formed). Session-scoped, so
  module-scoped fixtures can use it too; each call writes a new set.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import numpy as np
import pytest
import torch
from data_utils import write_palette_rec
from ddp_utils import free_port as _free_port
from ddp_utils import run_in_ddp


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread() -> Any:
    """Tiny models on shared CPUs: OpenMP threads spin-wait for each other; one thread is far faster.
    Use per module: ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def ddp_run() -> Callable[..., list]:
    """:func:`ddp_utils.run_in_ddp`."""
    return run_in_ddp


@pytest.fixture
def free_port() -> int:
    """An unused localhost TCP port (:func:`ddp_utils.free_port`)."""
    return _free_port()


@pytest.fixture(scope="session")
def tiny_recordio(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """A writer of small RecordIO sets: see the module docstring."""

    def write(root: Optional[Path] = None, classes: int = 4, per_class: Union[int, Sequence[int]] = 4,
              size: int = 16, corrupt: Iterable[int] = (), **palette: Any) -> Path:
        root = tmp_path_factory.mktemp("rec") if root is None else root
        return write_palette_rec(root, classes, per_class, size, corrupt=corrupt, **palette)

    return write
