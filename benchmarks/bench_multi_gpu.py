"""Sequence-parallel and head-parallel dilated attention across the GPUs of one host (NCCL), in one run:
equality with the single-GPU op, strong and weak scaling, bytes moved, ring overlap, PyTorch's context parallel
(dense SDPA) as the anchor, and the longest sequence reached for forward + backward of one layer.

    python benchmarks/bench_multi_gpu.py --out DIR [--world 2] [--n 262144] [--longest 8388608,12582912]

One process per GPU; every rank runs every phase in lockstep and rank 0 writes one JSON row per measurement to
``DIR/multi_gpu.jsonl`` as it goes (a phase that fails is recorded with its error and the run goes on), then
prints the tables (``DIR/bench_multi_gpu.md``) and plots the scaling (``DIR/bench_multi_gpu.png``, with
matplotlib). Without CUDA it runs on gloo CPU ranks (give it small shapes; with TRITON_INTERPRET=1 the window
kernels run in the interpreter): a dry run of the script, not a measurement.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from tests.tolerances import REL_ERR, rel_err  # noqa: E402


def _args(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--n", type=int, default=262144, help="sequence length of the checks and of strong scaling")
    ap.add_argument("--weak-per-rank", type=int, default=262144, help="weak scaling: world * this many tokens")
    ap.add_argument("--unaligned-extra", type=int, default=3000, help="rows added per shard for the check whose "
                                                                      "segments cross shard boundaries")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--segments", default="2048,4096,8192,16384")
    ap.add_argument("--rates", default="1,2,4,8")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--causal", default="true",
                    help="causality of the checks and scaling runs: true, false or both (true,false)")
    ap.add_argument("--longest", default="8388608,12582912")
    ap.add_argument("--deadline", type=float, default=300.0, help="seconds after which no new phase starts")
    ap.add_argument("--phases", default="check,scaling,anchor,longest,overlap", help="which phases run, in this order")
    return ap.parse_args(argv)


def _causal_flags(a) -> list[bool]:
    flags = a.causal.split(",")
    if any(f not in ("true", "false") for f in flags):
        raise ValueError(f"--causal must be true, false or both (true,false), got {a.causal!r}")
    return [f == "true" for f in flags]


class Run:
    def __init__(self, a, rank, world, device):
        self.a, self.rank, self.world, self.device = a, rank, world, device
        self.t0 = time.monotonic()
        self.path = os.path.join(a.out, "multi_gpu.jsonl")
        self.rows: list = []

    def log(self, **row):
        row = {"t": round(time.monotonic() - self.t0, 1), **row}
        self.rows.append(row)
        if self.rank == 0:
            print(json.dumps(row), flush=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def go(self, phase: str) -> bool:
        """Every rank gets rank 0's decision: run ``phase`` (not skipped, deadline not passed)."""
        ok = time.monotonic() - self.t0 < self.a.deadline
        flag = torch.tensor([int(ok)], device=self.device)
        dist.broadcast(flag, 0)
        if not flag.item():
            self.log(phase=phase, skipped=True)
        return bool(flag.item())

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def max_over_ranks(self, x: float) -> float:
        t = torch.tensor([x], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()

    def time_ms(self, fn, reps=None, warmup=2) -> float:
        """Median wall time of ``fn`` over ``reps`` calls started together on all ranks; the slowest rank's."""
        for _ in range(warmup):
            fn()
        self.sync()
        ts = []
        for _ in range(reps or self.a.reps):
            dist.barrier()
            self.sync()
            t = time.perf_counter()
            fn()
            self.sync()
            ts.append((time.perf_counter() - t) * 1e3)
        return self.max_over_ranks(statistics.median(ts))


def _inputs(run, n, seed=0, grad=True):
    a = run.a
    dt = getattr(torch, a.dtype)
    g = torch.Generator(device=run.device).manual_seed(seed)
    q, k, v, dout = (torch.randn(1, a.heads, n, a.head_dim, device=run.device, dtype=dt, generator=g)
                     for _ in range(4))
    return q, k, v, dout


def phase_check(run, strategy):
    """Each mode's output and dq/dk/dv shards against the single-GPU op on the whole sequence (each rank holds
    the whole inputs, made from one seed), and the bytes each moved."""
    import dilate_compiler as dc
    from dilate_compiler.distributed import count_bytes, head_parallel_attention, ring_attention, shard_sequence

    a, world = run.a, run.world
    unaligned = a.n + world * a.unaligned_extra
    cases = [(mode, layout, causal, n) for causal in _causal_flags(a)
             for mode, layout, n in [("sparse", "contiguous", a.n), ("ring", "contiguous", a.n),
                                     ("head_parallel", "contiguous", a.n), ("sparse", "zigzag", a.n),
                                     ("sparse", "contiguous", unaligned), ("ring", "contiguous", unaligned)]]
    for mode, layout, causal, n in cases:
        name = f"check {mode} {layout} causal={causal} N={n}"
        if not run.go(name):
            continue
        try:
            q, k, v, dout = _inputs(run, n)
            full = [t.clone().requires_grad_() for t in (q, k, v)]
            ref = dc.ops.dilated_attention(*full, strategy.segment_lengths, strategy.dilation_rates, is_causal=causal)
            ref_grads = torch.autograd.grad(ref, full, dout)
            shard = lambda t: shard_sequence(t, layout=layout)  # noqa: E731
            local = [shard(t).detach().requires_grad_() for t in (q, k, v)]
            if mode == "head_parallel":
                fn = lambda *t: head_parallel_attention(*t, strategy, is_causal=causal, layout=layout)  # noqa
            else:
                fn = lambda *t: ring_attention(*t, strategy, is_causal=causal, mode=mode, layout=layout)  # noqa
            with count_bytes() as fwd_bytes:
                out = fn(*local)
            with count_bytes() as bwd_bytes:
                grads = torch.autograd.grad(out, local, shard(dout))
            errs = [rel_err(out, shard(ref))] + [rel_err(x, shard(y)) for x, y in zip(grads, ref_grads)]
            errs = [run.max_over_ranks(e) for e in errs]
            sent = [run.max_over_ranks(float(c.sent_bytes())) for c in (fwd_bytes, bwd_bytes)]
            run.log(phase="check", mode=mode, layout=layout, causal=causal, n=n, world=world,
                    rel_err={"out": errs[0], "dq": errs[1], "dk": errs[2], "dv": errs[3]},
                    ok=max(errs) <= REL_ERR[getattr(torch, a.dtype)], sent_bytes_per_rank_fwd=sent[0],
                    sent_bytes_per_rank_bwd=sent[1])
            del q, k, v, dout, full, ref, ref_grads, local, out, grads
        except Exception:   # noqa: BLE001 - recorded, the run goes on
            run.log(phase="check", mode=mode, layout=layout, causal=causal, n=n, error=traceback.format_exc()[-2000:])
        if run.device.type == "cuda":
            torch.cuda.empty_cache()


def phase_scaling(run, strategy):
    """Strong scaling (N fixed) and weak scaling (N per GPU fixed): the single-GPU op on each rank's own GPU,
    then the distributed modes; forward and forward+backward."""
    import dilate_compiler as dc
    from dilate_compiler.distributed import head_parallel_attention, ring_attention

    a, world = run.a, run.world

    def single(n, causal):
        q, k, v, dout = _inputs(run, n)
        ins = [t.requires_grad_() for t in (q, k, v)]
        f = lambda: dc.ops.dilated_attention(*ins, strategy.segment_lengths, strategy.dilation_rates,  # noqa
                                             is_causal=causal)
        return f, ins, dout

    def sharded(n, causal, mode):
        q, k, v, dout = _inputs(run, n // world, seed=1 + run.rank)
        ins = [t.requires_grad_() for t in (q, k, v)]
        if mode == "head_parallel":
            f = lambda: head_parallel_attention(*ins, strategy, is_causal=causal)  # noqa: E731
        else:
            f = lambda: ring_attention(*ins, strategy, is_causal=causal, mode=mode)  # noqa: E731
        return f, ins, dout

    def both(f, ins, dout):
        fwd = run.time_ms(lambda: f())
        fb = run.time_ms(lambda: torch.autograd.grad(f(), ins, dout))
        return fwd, fb

    plan = []
    for causal in _causal_flags(a):
        plan.append(("1 GPU", a.n, causal, None))
        if a.weak_per_rank != a.n:
            plan.append(("1 GPU", a.weak_per_rank, causal, None))
        for mode in ("sparse", "head_parallel", "ring"):
            plan.append((f"{world} GPUs strong", a.n, causal, mode))
            plan.append((f"{world} GPUs weak", a.weak_per_rank * world, causal, mode))
    for kind, n, causal, mode in plan:
        name = f"time {kind} {mode} causal={causal} N={n}"
        if not run.go(name):
            continue
        try:
            f, ins, dout = single(n, causal) if mode is None else sharded(n, causal, mode)
            fwd, fb = both(f, ins, dout)
            run.log(phase="scaling", kind=kind, mode=mode or "single-GPU op", causal=causal, n=n, world=world,
                    fwd_ms=fwd, fwd_bwd_ms=fb)
            del f, ins, dout
        except Exception:   # noqa: BLE001
            run.log(phase="scaling", kind=kind, mode=mode, causal=causal, n=n, error=traceback.format_exc()[-2000:])


def phase_overlap(run):
    """The ring's K/V hops alone (the communication a ring step waits for), to set against the ring mode's time."""
    from dilate_compiler.distributed import comm

    a, world = run.a, run.world
    if world < 2 or not run.go("ring hops alone"):
        return
    try:
        group = dist.group.WORLD
        kv = torch.randn(2, 1, a.heads, a.n // world, a.head_dim, device=run.device, dtype=getattr(torch, a.dtype))

        def hops():
            t = kv
            for _ in range(world - 1):
                t = comm.RingShift(group, run.rank, world, "kv").start(t).wait()

        ms = run.time_ms(hops)
        nbytes = kv.numel() * kv.element_size() * (world - 1)
        run.log(phase="overlap", what="K/V ring hops alone", n=a.n, world=world, ms=ms, bytes_per_rank=nbytes,
                gb_per_s=nbytes / ms / 1e6)
    except Exception:   # noqa: BLE001
        run.log(phase="overlap", error=traceback.format_exc()[-2000:])


def phase_anchor(run):
    """PyTorch's context parallel (ring attention over dense SDPA, flash backend) on the same shapes, causal, and
    dense SDPA on one GPU."""
    a, world = run.a, run.world
    if run.device.type != "cuda":
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if run.go("dense SDPA 1 GPU"):
        try:
            q, k, v, dout = _inputs(run, a.n)
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                ms = run.time_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), reps=3, warmup=1)
            run.log(phase="anchor", what="dense flash SDPA, 1 GPU", causal=True, n=a.n, fwd_ms=ms)
            del q, k, v, dout
        except Exception:   # noqa: BLE001
            run.log(phase="anchor", what="dense SDPA 1 GPU", error=traceback.format_exc()[-2000:])
    if not run.go("context_parallel"):
        return
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.experimental import context_parallel

        mesh = init_device_mesh("cuda", (world,))
        q, k, v, dout = _inputs(run, a.n)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            with context_parallel(mesh, buffers=[q, k, v, dout], buffer_seq_dims=[2, 2, 2, 2]):
                # the buffers are resharded in place and restored on exit: leaves that require grad can't be
                ins = [t.detach().requires_grad_() for t in (q, k, v)]
                f = lambda: F.scaled_dot_product_attention(*ins, is_causal=True)  # noqa: E731
                fwd = run.time_ms(f, reps=3, warmup=1)
                fb = run.time_ms(lambda: torch.autograd.grad(f(), ins, dout), reps=3, warmup=1)
                local_rows = ins[0].shape[2]
        run.log(phase="anchor", what="torch context_parallel, dense flash SDPA", causal=True, n=a.n, world=world,
                fwd_ms=fwd, fwd_bwd_ms=fb, local_rows=local_rows)
    except Exception:   # noqa: BLE001
        run.log(phase="anchor", what="torch context_parallel", error=traceback.format_exc()[-2000:])


def phase_longest(run, strategy):
    """Forward + backward of one causal layer at each length (sparse mode), longest last; stops at the first
    that fails. The first call at a length may include compiling kernels for it: give a length twice to time it
    once compiled."""
    from dilate_compiler.distributed import ring_attention

    a, world = run.a, run.world
    for n in (int(x) for x in a.longest.split(",") if x):
        if not run.go(f"longest N={n}"):
            return
        try:
            if run.device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(run.device)
            q, k, v, dout = _inputs(run, n // world, seed=7 + run.rank)
            ins = [t.requires_grad_() for t in (q, k, v)]
            run.sync()
            t = time.perf_counter()
            out = ring_attention(*ins, strategy, is_causal=True)
            run.sync()
            fwd = (time.perf_counter() - t) * 1e3
            t = time.perf_counter()
            grads = torch.autograd.grad(out, ins, dout)
            run.sync()
            bwd = (time.perf_counter() - t) * 1e3
            finite = all(bool(torch.isfinite(x).all()) for x in (out,) + tuple(grads))
            peak = torch.cuda.max_memory_allocated(run.device) / 2**30 if run.device.type == "cuda" else 0.0
            run.log(phase="longest", n=n, world=world, causal=True, fwd_ms=run.max_over_ranks(fwd),
                    fwd_bwd_ms=run.max_over_ranks(fwd + bwd), finite=bool(run.max_over_ranks(float(not finite)) == 0),
                    peak_gib_per_gpu=run.max_over_ranks(peak),
                    note="one call; the first at a length includes compiling any kernel new to it")
            del q, k, v, dout, ins, out, grads
        except Exception:   # noqa: BLE001
            run.log(phase="longest", n=n, error=traceback.format_exc()[-1500:])
            return


def worker(rank, world, argv, port):
    a = _args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120), device_id=device if cuda else None)
    import dilate_compiler as dc

    strategy = dc.Dilated(tuple(int(x) for x in a.segments.split(",")), tuple(int(x) for x in a.rates.split(",")))
    run = Run(a, rank, world, device)
    run.log(phase="start", world=world, device=torch.cuda.get_device_name(device) if cuda else "cpu",
            torch=torch.__version__, strategy=repr(strategy), heads=a.heads, head_dim=a.head_dim, dtype=a.dtype,
            autotune=os.environ.get("DILATE_COMPILER_AUTOTUNE", "1"), out=a.out)
    phases = {"check": lambda: phase_check(run, strategy), "scaling": lambda: phase_scaling(run, strategy),
              "anchor": lambda: phase_anchor(run), "longest": lambda: phase_longest(run, strategy),
              "overlap": lambda: phase_overlap(run)}
    for name in a.phases.split(","):
        phases[name]()
    run.log(phase="done")
    if rank == 0:
        summarise(run.rows, device)
    dist.destroy_process_group()


def summarise(rows, device) -> None:
    """The run's rows as tables (printed, and written with the header to ``bench_multi_gpu.md``) and a plot of
    the scaling runs."""
    start = next(r for r in rows if r.get("phase") == "start")
    results = harness.Results("bench_multi_gpu", start_out(rows), harness.environment(device))
    results.env.update(world=start["world"], strategy=start["strategy"], autotune=start["autotune"])
    nan = float("nan")
    errors = [r for r in rows if "error" in r]
    checks = [r for r in rows if r.get("phase") == "check" and "rel_err" in r]
    if checks:
        results.add_table("Each mode against the single-GPU op (relative error; bytes sent per rank)",
                          ["mode", "layout", "causal", "N", "out", "dq", "dk", "dv", "within tolerance",
                           "bytes fwd", "bytes bwd"],
                          [[r["mode"], r["layout"], r["causal"], r["n"],
                            *(r["rel_err"][k] for k in ("out", "dq", "dk", "dv")), r["ok"],
                            int(r["sent_bytes_per_rank_fwd"]), int(r["sent_bytes_per_rank_bwd"])] for r in checks])
    scaling = [r for r in rows if r.get("phase") == "scaling" and "fwd_ms" in r]
    other = [r for r in rows if r.get("phase") in ("anchor", "overlap", "longest") and "error" not in r]
    if scaling or other:
        cells = [[r["kind"], r["mode"], r["causal"], r["n"], r["fwd_ms"], r["fwd_bwd_ms"], ""] for r in scaling]
        cells += [[r["phase"], r.get("what", "sparse"), r.get("causal", "-"), r["n"], r.get("fwd_ms", r.get("ms", nan)),
                   r.get("fwd_bwd_ms", nan), _note(r)] for r in other]
        results.add_table("Times, ms (median over ranks' slowest)",
                          ["run", "mode", "causal", "N", "forward", "forward + backward", "note"], cells)
    if errors:
        results.add_table("Phases that failed", ["phase", "what", "error (last line)"],
                          [[r.get("phase"), r.get("mode", r.get("what", "-")),
                            (r["error"].strip().splitlines() or ["-"])[-1][:160]] for r in errors])
    results.write()

    def draw(plt):
        fig, ax = plt.subplots(figsize=(6.5, 3.8))
        labels = [f"{r['kind']}\n{r['mode']}{' causal' if r['causal'] else ''}" for r in scaling]
        ax.bar(range(len(scaling)), [r["fwd_bwd_ms"] for r in scaling])
        ax.set_xticks(range(len(scaling)), labels, fontsize=6, rotation=60, ha="right")
        ax.set(ylabel="forward + backward ms", title="sequence-parallel dilated attention")
        fig.tight_layout()
        return fig

    if scaling:
        results.plot(draw)


def start_out(rows) -> str:
    return next(r for r in rows if r.get("phase") == "start")["out"]


def _note(r) -> str:
    if r["phase"] == "overlap":
        return f"{r['bytes_per_rank']} B per rank, {r['gb_per_s']:.0f} GB/s"
    if r["phase"] == "longest":
        return f"peak {r['peak_gib_per_gpu']:.1f} GiB per GPU; finite: {r['finite']}; {r['note']}"
    return ""


def main():
    a = _args()
    os.makedirs(a.out, exist_ok=True)
    from dilate_compiler.distributed.launch import free_port

    port = free_port()
    mp.start_processes(worker, args=(a.world, sys.argv[1:], port), nprocs=a.world, start_method="spawn")


if __name__ == "__main__":
    main()
