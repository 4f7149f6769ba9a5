"""Run a function on a local gloo process group of spawned processes (CPU), for tests and examples.

``run_ranks(fn, world, *args)`` starts ``world`` processes, each joining one gloo group (unless ``init=False``:
then ``fn`` sets up its own, e.g. through an engine that does), calls ``fn(rank, world, *args)`` and returns
every rank's ``("ok", value)`` or ``("error", traceback)``. A rank that doesn't finish within ``timeout`` is killed
and reported as ``("timeout", seconds)``; a rank that fails doesn't stop the others, so what they saw is reported.
``fn`` must be importable by name (a module-level function).
"""

from __future__ import annotations

import datetime
import os
import pickle
import socket
import tempfile
import time
import traceback

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world, port, out_dir, args, pg_timeout_s, init):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        if init:
            dist.init_process_group("gloo", rank=rank, world_size=world,
                                    timeout=datetime.timedelta(seconds=pg_timeout_s))
        result = ("ok", fn(rank, world, *args))
    except BaseException:   # noqa: BLE001 - reported to the parent
        result = ("error", traceback.format_exc())
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)
    if result[0] == "ok" and dist.is_initialized():
        dist.destroy_process_group()


def run_ranks(fn, world: int, *args, timeout: float = 300.0, pg_timeout_s: float = 60.0, init: bool = True) -> list:
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as out_dir:
        port = free_port()
        procs = [ctx.Process(target=_entry, args=(fn, r, world, port, out_dir, args, pg_timeout_s, init))
                 for r in range(world)]
        start = time.monotonic()
        for p in procs:
            p.start()
        for p in procs:
            p.join(max(0.0, timeout - (time.monotonic() - start)))
        results = []
        for r, p in enumerate(procs):
            if p.is_alive():
                p.kill()
                p.join()
                results.append(("timeout", time.monotonic() - start))
                continue
            path = os.path.join(out_dir, f"rank{r}.pkl")
            if not os.path.exists(path):
                results.append(("error", f"rank {r} exited with code {p.exitcode} without a result"))
                continue
            with open(path, "rb") as f:
                results.append(pickle.load(f))
        return results


def values(results: list) -> list:
    """Every rank's value, or an AssertionError carrying every failing rank's traceback."""
    bad = [f"rank {r}: {kind}\n{v}" for r, (kind, v) in enumerate(results) if kind != "ok"]
    assert not bad, "\n".join(bad)
    return [v for _, v in results]
