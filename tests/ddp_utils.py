"""The one DDP launcher of the tests: ``run_in_ddp(world_size, fn, *args) -> [result per rank]``.

``fn(rank, world_size, *args)`` runs in ``world_size`` spawned CPU processes; it must be importable by
name (a module-level function of a test module, which is why this is a module and not a fixture) and
its arguments and return value picklable. Each process uses one CPU thread and a shared free localhost
port (``MASTER_ADDR`` / ``MASTER_PORT``). An exception in any rank fails the call with that rank's
traceback. Two ways to get the process group:

* default: the launcher initialises ``torch.distributed`` (gloo, 120 s collective timeout) before
  ``fn`` runs;
* ``lightning=True``: the processes look launched by torchrun (``RANK``, ``LOCAL_RANK``,
  ``WORLD_SIZE``, ``NODE_RANK`` set) and the group is left to the ``DDPStrategy`` of the Lightning
  ``Trainer`` that ``fn`` builds, with its own backend and timeout.

Either way every rank meets the others after ``fn`` and the group is closed before the process exits
(a process exiting with a live gloo group can abort). ``tests/conftest.py`` offers the same as the
``ddp_run`` and ``free_port`` fixtures.
"""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
from typing import Any, Callable, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A currently unused localhost TCP port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _entry(rank: int, world_size: int, port: int, out_dir: str, lightning: bool, fn: Callable[..., Any],
           args: tuple) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if lightning:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), NODE_RANK="0")
    else:
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=120))
    finished = False
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        finished = True
    finally:
        if dist.is_initialized():
            if finished:
                dist.barrier()
            dist.destroy_process_group()


def run_in_ddp(world_size: int, fn: Callable[..., Any], *args: Any, lightning: bool = False) -> List[Any]:
    """Spawn ``world_size`` processes running ``fn(rank, world_size, *args)``; their results by rank.
    ``lightning``: leave the process group to the Lightning ``DDPStrategy`` that ``fn`` builds."""
    if world_size < 1:
        raise ValueError(f"world_size={world_size}: expected a positive integer")
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_entry, args=(world_size, free_port(), out_dir, lightning, fn, args), nprocs=world_size,
                 join=True)
        return [
            torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)
        ]
