"""Multi-process tests on the CPU: ``run(fn, ranks, *args)`` starts ``ranks`` processes with the gloo backend on
127.0.0.1 (a free port each call), calls ``fn(rank, ranks, *args)`` in each with the default process group set up,
and re-raises the first failure here (with the rank's traceback).  ``fn`` must be a module-level function (the
processes are spawned, so it is imported by name)."""

from __future__ import annotations

import os
import socket
import sys
import time

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, ranks: int, port: int, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    # tests/conftest.py puts .venv/corpus-libs on the path after defining torchvision's schemas; a spawned rank
    # inherits the path but not the schemas, and transformers would import that torchvision and fail
    sys.path[:] = [p for p in sys.path if not p.rstrip("/").endswith("corpus-libs")]
    import torch

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=ranks)
    try:
        fn(rank, ranks, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run(fn, ranks: int, *args, timeout: float = 120.0) -> None:
    """Run ``fn`` on ``ranks`` gloo processes; raise what any of them raised, or TimeoutError past ``timeout``."""
    context = mp.start_processes(_entry, args=(ranks, free_port(), fn, args), nprocs=ranks, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for p in context.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"{ranks} gloo processes running {fn.__name__} did not finish in {timeout:.0f} s")
