"""Per-rank compute of sequence-parallel attention against the single-process op, for every inner strategy; and how
much of the ring's communication the compute hides.

    python benchmarks/bench_sequence_parallel_rank.py --out DIR [--n 262144] [--strategies dense,dilated,...]
        [--modes sparse,ring] [--world 1] [--overlap]

Ratio phase (``--world 1``, the default): one process on one GPU joins a one-rank NCCL group and runs
``dc.distributed.ring_attention`` on the whole sequence (its shard is all of it, so nothing moves): forward +
backward against the single-process op on the same tensors, and the ratio (the target is <= 1.15). With
``--world P`` (P GPUs, one process each) every rank times its own shard of an N-token sequence against the
single-process op on its own GPU on the whole N tokens. The row's ``ran`` says which per-rank compute ran (the
kernels on key windows, on held rows, dense ring steps, or the exact path).

Strategies (B=1, H=16, D=64, bf16 by default; each the single-process op it is compared with):

- ``dense``: no strategy (ring mode only; dense steps on the block-sparse kernels) vs
  ``F.scaled_dot_product_attention``;
- ``dilated``: ``dc.Dilated((2048, 4096, 8192, 16384), (1, 2, 4, 8))`` vs ``dc.ops.dilated_attention``;
- ``sliding``: ``dc.BlockSparse(sliding_window(4096))``, ``local-global``: ``local(8) | global_tokens(128)``,
  ``dilated-blocks``: ``local(4) | dilated((64,))`` (block size 128) vs ``dc.ops.block_sparse_attention``;
- ``hilbert``: ``dc.Hilbert(grid, BlockSparse(sliding_window(4096)))``, ``hilbert-dilated``: ``dc.Hilbert(grid,
  Dilated(...))`` (grid: the most square factorisation of N) vs the inner op in curve order on curve-ordered
  tensors (the single-process ``dc.Hilbert`` op without its gathers: ranks hold curve-ordered shards).

``--causal true`` makes the strategies that have a causal form causal (not ``hilbert*``).

Overlap phase (``--overlap``, needs ``--world`` >= 2: a one-rank ring has no hops): dense ring attention,
non-causal (every step computes). Its backward alone (``T``), the backward's hops alone with the same sizes
(``P - 1`` K/V hops, ``P`` dK/dV hops: ``C``) and its compute alone (the ``P`` steps on local tensors: ``X``);
the hidden fraction of the communication is ``(X + C - T) / C`` (1: every hop hidden behind compute; 0: none).
The same for the forward (``P - 1`` K/V hops).

On CPU (``--device cpu``, gloo ranks) it is a dry run of the script at small sizes (``--n 2048``), not a
measurement; ``TRITON_INTERPRET=1`` runs the kernels in the interpreter there.
"""

from __future__ import annotations

import argparse
import datetime
import math
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

STRATEGIES = ("dense", "dilated", "sliding", "local-global", "dilated-blocks", "hilbert", "hilbert-dilated")
SEGMENTS, RATES = (2048, 4096, 8192, 16384), (1, 2, 4, 8)


def _args(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--device", default=harness.default_device())
    ap.add_argument("--world", type=int, default=1)
    ap.add_argument("--n", type=int, default=262144)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--modes", default="sparse,ring")
    ap.add_argument("--causal", default="false", choices=("true", "false"))
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--overlap", action="store_true", help="measure the ring's hidden communication (world >= 2)")
    a = ap.parse_args(argv)
    for name in a.strategies.split(","):
        if name not in STRATEGIES:
            raise SystemExit(f"--strategies: unknown {name!r}; known: {', '.join(STRATEGIES)}")
    for mode in a.modes.split(","):
        if mode not in ("sparse", "ring"):
            raise SystemExit(f"--modes: unknown {mode!r}; known: sparse, ring")
    return a


def square_grid(n: int) -> tuple:
    """The factorisation ``(h, w)`` of ``n`` with ``h <= w`` and ``h`` largest (the most square grid)."""
    h = next(d for d in range(math.isqrt(n), 0, -1) if n % d == 0)
    return h, n // h


def build(name: str, n: int, causal: bool, block_size: int):
    """``(strategy, causal, single)``: the strategy, its causality here, and the single-process op
    ``single(q, k, v)`` it is compared with on the sequence as the ranks hold it."""
    import dilate_compiler as dc
    from dilate_compiler import patterns as P

    dilated = dc.Dilated(SEGMENTS, RATES)
    window = min(4096, n)
    patterns = {"sliding": P.sliding_window(window), "local-global": P.local(8) | P.global_tokens(min(128, n)),
                "dilated-blocks": P.local(4) | P.dilated((64,)), "hilbert": P.sliding_window(window)}
    if name == "dense":
        return None, causal, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                                                               enable_gqa=True)
    if name in ("dilated", "hilbert-dilated"):
        strategy = dilated if name == "dilated" else dc.Hilbert(square_grid(n), dilated)
        causal = causal and name == "dilated"
        return strategy, causal, lambda q, k, v: dc.ops.dilated_attention(q, k, v, SEGMENTS, RATES,
                                                                           is_causal=causal)
    inner = dc.BlockSparse(patterns[name], block_size=block_size)
    strategy = inner if name != "hilbert" else dc.Hilbert(square_grid(n), inner)
    causal = causal and name != "hilbert"
    run = strategy.sharded(n, causal)   # the Hilbert inner strategy in curve order
    return strategy, causal, lambda q, k, v: dc.ops.block_sparse_attention(q, k, v, run.pattern,
                                                                          block_size=block_size, is_causal=causal)


class Rank:
    def __init__(self, a, rank, world, device):
        self.a, self.rank, self.world, self.device = a, rank, world, device
        self.dtype = getattr(torch, a.dtype)
        self.results = None
        if rank == 0:
            self.results = harness.Results("bench_sequence_parallel_rank", a.out, harness.environment(device))
            self.results.env.update(world=world, heads=a.heads, head_dim=a.head_dim, dtype=a.dtype, n=a.n)

    def row(self, **row):
        if self.results is not None:
            self.results.row(row)

    def max_over_ranks(self, x: float) -> float:
        t = torch.tensor([x], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()

    def time_ms(self, fn, warmup: int = 2) -> float:
        """Median wall time of ``fn`` over ``--reps`` calls started together on every rank; the slowest rank's."""
        for _ in range(warmup):
            fn()
        ts = []
        for _ in range(self.a.reps):
            dist.barrier()
            harness.sync(self.device)
            t = time.perf_counter()
            fn()
            harness.sync(self.device)
            ts.append((time.perf_counter() - t) * 1e3)
        return self.max_over_ranks(statistics.median(ts))

    def inputs(self, n: int, seed: int):
        g = torch.Generator(device=self.device).manual_seed(seed)
        return [torch.randn(1, self.a.heads, n, self.a.head_dim, device=self.device, dtype=self.dtype, generator=g)
                for _ in range(4)]


def _calls() -> dict:
    from dilate_compiler.distributed import dense_steps, held_blocks, window

    return {"key windows": window.CALLS["forward"], "held rows": held_blocks.CALLS["forward"],
            "dense steps": dense_steps.CALLS["forward"]}


def _ran(before: dict) -> str:
    after = _calls()
    return ", ".join(k for k in after if after[k] > before[k]) or "exact path"


def phase_ratio(run: Rank, name: str, mode: str) -> None:
    """One strategy in one mode: the rank's forward + backward against the single-process op's."""
    from dilate_compiler.distributed import ring_attention

    a, n, world = run.a, run.a.n, run.world
    strategy, causal, single = build(name, n, a.causal == "true", a.block_size)
    q, k, v, dout = run.inputs(n, seed=0)
    whole = [t.requires_grad_() for t in (q, k, v)]
    S = n // world
    local = [t.detach()[:, :, run.rank * S:(run.rank + 1) * S].contiguous().requires_grad_() for t in (q, k, v)]
    d_local = dout[:, :, run.rank * S:(run.rank + 1) * S].contiguous()

    def single_step():
        torch.autograd.grad(single(*whole), whole, dout)

    def rank_step():
        torch.autograd.grad(ring_attention(*local, strategy, is_causal=causal, mode=mode), local, d_local)

    before = _calls()
    rank_step()
    ran = _ran(before)
    t_single = run.time_ms(single_step)
    t_rank = run.time_ms(rank_step)
    run.row(phase="ratio", strategy=name, mode=mode, causal=causal, n=n, world=world, ran=ran,
            single_fwd_bwd_ms=t_single, rank_fwd_bwd_ms=t_rank, ratio=t_rank / t_single)


def phase_overlap(run: Rank) -> None:
    """Dense ring attention's forward and backward against their hops alone and their compute alone."""
    from dilate_compiler.distributed import comm, dense_steps, ring_attention
    from dilate_compiler.distributed.attend import attend_backward, attend_forward
    from dilate_compiler.distributed.links import Links

    a, world, rank = run.a, run.world, run.rank
    group = dist.group.WORLD
    S = a.n // world
    q, k, v, dout = run.inputs(S, seed=1 + rank)
    ins = [t.requires_grad_() for t in (q, k, v)]
    out = ring_attention(*ins, None, mode="ring")
    t_fwd = run.time_ms(lambda: ring_attention(*ins, None, mode="ring"))
    t_bwd = run.time_ms(lambda: torch.autograd.grad(out, ins, dout, retain_graph=True))
    kv = torch.stack((k.detach(), v.detach()))
    grads = torch.zeros(kv.shape, dtype=torch.float32, device=run.device)

    def hops(tensor, count):
        t = tensor
        for _ in range(count):
            t = comm.RingShift(group, rank, world, "kv").start(t).wait()

    c_fwd = run.time_ms(lambda: hops(kv, world - 1))
    c_bwd = run.time_ms(lambda: (hops(kv, world - 1), hops(grads, world)))
    pos = torch.arange(rank * S, (rank + 1) * S, device=run.device)
    scale = 1.0 / math.sqrt(a.head_dim)
    links, heads = Links(a.n, a.heads, False), torch.arange(a.heads, device=run.device)
    qd, kd, vd = (t.detach() for t in (q, k, v))
    lse = torch.zeros(1, a.heads, S, device=run.device)
    delta = torch.zeros(1, a.heads, S, device=run.device)

    def step_forward():   # the shard's own keys stand in for each visiting shard (the same shapes, every step)
        for _ in range(world):
            if dense_steps.use_kernels(qd) and dense_steps.forward(qd, kd, vd, pos, pos, False, scale) is not None:
                continue
            attend_forward(qd, kd, vd, pos, pos.view(1, -1), links, heads, scale)

    def step_backward():
        for _ in range(world):
            got = dense_steps.backward(dout, qd, kd, vd, lse, delta, pos, pos, False, scale) \
                if dense_steps.use_kernels(qd) else None
            if got is None:
                attend_backward(dout.float(), qd, kd, vd, pos, pos.view(1, -1), links, heads, scale, lse, delta)

    x_fwd, x_bwd = run.time_ms(step_forward), run.time_ms(step_backward)
    for what, t, c, x in (("forward", t_fwd, c_fwd, x_fwd), ("backward", t_bwd, c_bwd, x_bwd)):
        hidden = min(1.0, max(0.0, (x + c - t) / c)) if c > 0 else float("nan")
        run.row(phase="overlap", what=what, n=a.n, world=world, total_ms=t, hops_alone_ms=c, compute_alone_ms=x,
                hidden_fraction=hidden)


def worker(rank, world, argv, port):
    a = _args(argv)
    cuda = a.device == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300), device_id=device if cuda else None)
    run = Rank(a, rank, world, device)
    for name in a.strategies.split(","):
        for mode in a.modes.split(","):
            if name == "dense" and mode == "sparse":
                continue   # dense attention has no sparse exchange (every rank would send every key)
            try:
                phase_ratio(run, name, mode)
            except Exception:   # noqa: BLE001 - recorded, the run goes on
                run.row(phase="ratio", strategy=name, mode=mode, error=traceback.format_exc()[-2000:])
            if cuda:
                torch.cuda.empty_cache()
    if a.overlap:
        if world < 2:
            run.row(phase="overlap", skipped="a one-rank ring has no hops: pass --world 2 or more")
        else:
            try:
                phase_overlap(run)
            except Exception:   # noqa: BLE001
                run.row(phase="overlap", error=traceback.format_exc()[-2000:])
    if run.results is not None:
        summarise(run.results)
    dist.destroy_process_group()


def summarise(results) -> None:
    rows = results.rows
    ratio = [r for r in rows if r["phase"] == "ratio" and "ratio" in r]
    if ratio:
        results.add_table("Per-rank forward + backward against the single-process op, ms (median)",
                          ["strategy", "mode", "causal", "N", "ranks", "ran", "single-process", "per rank",
                           "per rank / single"],
                          [[r["strategy"], r["mode"], r["causal"], r["n"], r["world"], r["ran"],
                            r["single_fwd_bwd_ms"], r["rank_fwd_bwd_ms"], r["ratio"]] for r in ratio],
                          "Target: per rank / single <= 1.15 with one rank.")
    overlap = [r for r in rows if r["phase"] == "overlap" and "hidden_fraction" in r]
    if overlap:
        results.add_table("Dense ring attention: communication hidden behind compute",
                          ["pass", "N", "ranks", "total ms", "hops alone ms", "compute alone ms",
                           "hidden fraction"],
                          [[r["what"], r["n"], r["world"], r["total_ms"], r["hops_alone_ms"], r["compute_alone_ms"],
                            r["hidden_fraction"]] for r in overlap])
    failed = [r for r in rows if "error" in r or "skipped" in r]
    if failed:
        results.add_table("Runs that failed or were skipped", ["phase", "what", "why (last line)"],
                          [[r["phase"], f"{r.get('strategy', '-')} {r.get('mode', '')}",
                            (r.get("error") or r.get("skipped")).strip().splitlines()[-1][:160]] for r in failed])
    results.write()


def main():
    a = _args()
    harness.check_device(a.device)
    os.makedirs(a.out, exist_ok=True)
    from dilate_compiler.distributed.launch import free_port

    mp.start_processes(worker, args=(a.world, sys.argv[1:], free_port()), nprocs=a.world, start_method="spawn")


if __name__ == "__main__":
    main()
