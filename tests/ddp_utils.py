"""Run a function in W gloo processes on CPU: ``run_in_ddp(world_size, fn, *args) -> [result per rank]``.

``fn(rank, world_size, *args)`` must be importable by name (a module-level function of a test module)
and its arguments and return value picklable. Each process initialises ``torch.distributed`` (gloo,
a free localhost port, 120 s collective timeout, one CPU thread) and tears it down afterwards. An
exception in any rank fails the call with that rank's traceback.
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


def _entry(rank: int, world_size: int, port: int, out_dir: str, fn: Callable[..., Any], args: tuple) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=120))
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_in_ddp(world_size: int, fn: Callable[..., Any], *args: Any) -> List[Any]:
    """Spawn ``world_size`` gloo processes running ``fn(rank, world_size, *args)``; results by rank."""
    if world_size < 1:
        raise ValueError(f"world_size={world_size}: expected a positive integer")
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_entry, args=(world_size, free_port(), out_dir, fn, args), nprocs=world_size, join=True)
        return [
            torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)
        ]
