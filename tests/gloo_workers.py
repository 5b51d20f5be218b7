"""Process groups of gloo workers on the CPU for the distributed tests.

A test module spawns its workers once (spawning is slow: each process
imports torch); each worker joins the group through a file store in the
test's work folder, runs every case and saves its results as
``result_<rank>.pt`` there, which the parent then loads. A machine that
cannot spawn processes or set up a gloo group skips these tests, saying why.
"""

import datetime
import os
import time
import traceback

import pytest
import torch


def init_gloo(rank: int, world_size: int, workdir: str) -> bool:
    """Joins this worker to the gloo group (one thread per rank: the machine is
    shared). On failure the traceback goes to ``init_error_<rank>.txt`` for the
    parent and False is returned."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{workdir}/store", rank=rank,
                                world_size=world_size, timeout=datetime.timedelta(seconds=60))
    except Exception:  # noqa: BLE001
        with open(os.path.join(workdir, f"init_error_{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        return False
    return True


def finish(out, rank: int, workdir: str) -> None:
    """Saves a worker's results and leaves the group once every rank is done."""
    import torch.distributed as dist

    torch.save(out, os.path.join(workdir, f"result_{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def run_workers(worker, world_size: int, workdir, timeout_s: float) -> list:
    """Runs ``worker(rank, world_size, workdir)`` in ``world_size`` spawned processes and
    returns each rank's saved results."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available in this PyTorch build")
    try:
        ctx = mp.start_processes(worker, args=(world_size, str(workdir)), nprocs=world_size,
                                 join=False, start_method="spawn")
    except (OSError, RuntimeError) as e:
        pytest.skip(f"cannot spawn worker processes here: {e!r}")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:  # only the processes this test started
                if p.is_alive():
                    p.terminate()
            pytest.fail(f"{world_size} gloo workers did not finish within {timeout_s} s")
    init_errors = [open(os.path.join(workdir, f)).read() for f in sorted(os.listdir(workdir))
                   if f.startswith("init_error_")]
    if init_errors:
        pytest.skip("cannot set up a gloo process group on this machine (init_process_group "
                    f"failed):\n{init_errors[0]}")
    return [torch.load(os.path.join(workdir, f"result_{r}.pt")) for r in range(world_size)]
