"""Block-sparse attention against FlexAttention on the same mask and dense attention, all in one run.

    python benchmarks/bench_block_sparse.py --out DIR [--ns 16384,65536,262144] [--patterns window,local+global]
        [--methods ours,ours-compiled,flex,dense] [--backward]

Patterns (B=1, H=16, D=64, bf16 on CUDA, block size 128):
- ``window``: causal sliding window of 4096 tokens (Mistral's: p - 4096 < j <= p), token-exact;
- ``local+global``: ``local(8)`` (query block I sees key blocks |I - J| < 8) | ``global_tokens(128)``, not causal.

Methods (``--methods``, comma-separated):
- ``ours``: ``dc.ops.block_sparse_attention`` with a prebuilt layout; the row's ``ours_forward`` says whether the
  warp-specialised Hopper forward ran, or why not;
- ``ours-triton``: the same with the warp-specialised forward turned off (CUDA only);
- ``ours-compiled``: the same call under ``torch.compile(fullgraph=True)``;
- ``flex``: ``flex_attention`` (compiled) with the same ``mask_mod``, on our layout's block lists
  (``--flex-mask from-layout``, the default: the same partial / full blocks) or on ``create_block_mask``'s
  (``--flex-mask create``: its first call compiles, for minutes at large N; first call and steady build timed);
- ``dense``: full attention with the pattern's causality, the rate ceiling: with the cuDNN and the flash backends
  on CUDA (``dense-cudnn``, ``dense-flash``), the faster taken (a backend that refuses the shape is listed as
  failed; on the CPU both are "unavailable" and PyTorch's default, ``dense-cpu``, runs).

Layout build: ``pattern.layout(...)`` on the device (median of 5 after a first call, which compiles the list
kernels on CUDA and is timed apart).
Throughput: 4·D·H FLOPs per allowed (query, key) pair ("useful"), or per pair of every block the kernels visit
("computed blocks": the kernels' own rate, the one comparable to dense attention's); dense attention is credited
with its own pairs (N², N(N+1)/2 causal). "ours / ceiling" (and "ours-compiled / ceiling"): ours' computed-block
rate as a share of the faster dense backend's in the same run (``harness.ceiling_tables``, shared with
``bench_dilated.py``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dilate_compiler as dc  # noqa: E402
import harness  # noqa: E402
from bench_dilated import flex_block_mask  # noqa: E402
from dilate_compiler import patterns as P  # noqa: E402

H, D, BS, WINDOW = 16, 64, 128, 4096
METHODS = ("ours", "ours-triton", "ours-compiled", "flex", "dense")


def cases():
    return {
        "window": (P.sliding_window(WINDOW), True,
                   lambda b, h, q, kv: (q - kv < WINDOW) & (kv <= q)),
        "local+global": (P.local(8) | P.global_tokens(BS), False,
                         lambda b, h, q, kv: ((q // BS - kv // BS).abs() < 8) | (q < BS) | (kv < BS)),
    }


def allowed_pairs(layout) -> tuple[int, int]:
    """(allowed token pairs, token pairs of visited blocks) of one head, from the layout (partial blocks
    evaluated token by token in chunks; O(partial blocks · bs²))."""
    N, bs = layout.seq_len, layout.block_size
    st = layout.state[0]
    full = int((st == P.FULL).sum()) * bs * bs
    visited = int((st != P.EMPTY).sum()) * bs * bs
    I, J = torch.nonzero(st == P.PARTIAL, as_tuple=True)
    bits = torch.zeros_like(I, dtype=torch.int32)
    cnt = layout.kv_count[0].long()
    for e in range(layout.kv_idx.shape[-1]):            # each partial block's term bits, from the kv lists
        sel = (layout.kv_idx[0, I, e].long() == J) & (e < cnt[I, 0])
        bits = torch.where(sel, layout.kv_bits[0, I, e], bits)
    r = torch.arange(bs, device=st.device)
    partial = 0
    for c in range(0, I.numel(), 2048):
        i, j, b = I[c:c + 2048], J[c:c + 2048], bits[c:c + 2048]
        p = (i.view(-1, 1, 1) * bs + r.view(1, -1, 1))
        k = (j.view(-1, 1, 1) * bs + r.view(1, 1, -1))
        m = P.partial_mask(layout.terms, b.view(-1, 1, 1), p, k) & (p < N) & (k < N)
        if layout.is_causal:
            m &= k <= p
        partial += int(m.sum())
    return full + partial, visited


def flex_block_mask_from_layout(layout, mask_mod):
    """FlexAttention's BlockMask with our layout's block lists: partial blocks (mask_mod applied) and full ones."""
    return flex_block_mask(layout.kv_count[0], layout.kv_idx[0], layout.block_size, layout.seq_len, mask_mod)


def _args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/out"))
    ap.add_argument("--ns", default="16384,65536,262144")
    ap.add_argument("--patterns", default="window,local+global")
    ap.add_argument("--methods", default="ours,flex,dense")
    ap.add_argument("--backward", action="store_true", help="also time forward + backward")
    ap.add_argument("--flex-mask", default="from-layout", choices=("from-layout", "create"))
    ap.add_argument("--device", default=harness.default_device())
    a = ap.parse_args(argv)
    a.methods = a.methods.split(",")
    unknown = [m for m in a.methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; accepted: {', '.join(METHODS)} (comma-separated)")
    bad = [p for p in a.patterns.split(",") if p not in cases()]
    if bad:
        raise SystemExit(f"--patterns: unknown {bad}; accepted: {', '.join(cases())}")
    return a


def _timed_build(build, device, repeats):
    times = []
    for _ in range(repeats):
        harness.sync(device)
        t0 = time.perf_counter()
        out = build()
        harness.sync(device)
        times.append(time.perf_counter() - t0)
    return out, times


def run_case(name, N, a, device, dtype, flex_compiled) -> dict:
    pattern, causal, mask_mod = cases()[name]
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, H, N, D, device=device, dtype=dtype, requires_grad=a.backward) for _ in range(3))
    row = {"pattern": name, "N": N, "H": H, "D": D, "block_size": BS, "causal": causal}
    build = lambda: pattern.layout(N, BS, is_causal=causal, device=device)  # noqa: E731
    _, first = _timed_build(build, device, 1)
    lay, times = _timed_build(build, device, 5)
    row["layout_first_call_s"], row["layout_ms"] = first[0], 1e3 * statistics.median(times)
    useful, visited = allowed_pairs(lay)
    row.update(density=lay.density, useful_flop=4 * D * H * useful, computed_flop=4 * D * H * visited,
               dense_flop=4 * D * H * (N * (N + 1) // 2 if causal else N * N))
    ours = lambda: dc.ops.block_sparse_attention(q, k, v, lay, block_size=BS, is_causal=causal)  # noqa: E731
    fns = {"ours": ours}
    if device.type == "cuda":
        row["ours_forward"] = harness.block_sparse_forward_taken(q, k, v, lay, BS, causal)
    if "ours-triton" in a.methods and device.type == "cuda":
        fns["ours-triton"] = harness.triton_forward(ours)
    if "ours-compiled" in a.methods:
        compiled = torch.compile(lambda q, k, v: dc.ops.block_sparse_attention(q, k, v, lay, block_size=BS,
                                                                               is_causal=causal),
                                 fullgraph=True, dynamic=False)
        fns["ours-compiled"] = lambda: compiled(q, k, v)
    if "flex" in a.methods:
        if a.flex_mask == "create":
            from torch.nn.attention.flex_attention import create_block_mask

            make = lambda: create_block_mask(mask_mod, None, None, N, N, device=device, BLOCK_SIZE=BS,  # noqa
                                             _compile=True)
            _, first = _timed_build(make, device, 1)
            bm, times = _timed_build(make, device, 3)
            row["flex_mask_first_call_s"], row["flex_mask_ms"] = first[0], 1e3 * statistics.median(times)
        else:
            bm = flex_block_mask_from_layout(lay, mask_mod)
        fns["flex"] = lambda: flex_compiled(q, k, v, block_mask=bm)
    if "dense" in a.methods:
        harness.add_dense(row, fns, q, k, v, causal)
    with torch.no_grad():          # ours' output stays alive: another method's output can't reuse its memory
        ref = ours()
        for m in ("ours-triton", "ours-compiled", "flex"):
            if m in fns:
                row[f"{m}_vs_ours_max_abs"] = (fns[m]() - ref).abs().max().item()
        del ref
    harness.time_methods(row, fns, device, backward_inputs=(q, k, v) if a.backward else ())
    del q, k, v
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def _over_ours(method):
    """An extra column: ``method``'s time over ours (eager)."""
    def cell(row, phase):
        theirs, ours = row.get(f"{method}_{phase}_ms"), row.get(f"ours_{phase}_ms")
        return float("nan") if theirs is None or ours is None else theirs / ours
    return f"× {method}", cell


def summarise(results, rows, timed, backward):
    harness.ceiling_tables(results, rows, timed, backward=backward, labels=("pattern", "N"),
                           ours_rates=(("ours TF/s useful", "useful_flop"), ("ours TF/s computed", "computed_flop")),
                           share_flop="computed_flop",
                           extras=(_over_ours("ours-compiled"), _over_ours("flex"),
                                   ("layout ms", lambda r, phase: r["layout_ms"])),
                           notes="Ours: useful, per allowed pair; computed, per pair of every block the kernels visit "
                                 "(the kernels' own rate: the share of the ceiling is taken on it). Dense runs with "
                                 "the pattern's causality. × ours-compiled, × flex: their time / ours (eager).")


def plot(results, rows, timed):
    def draw(plt):
        names = sorted({r["pattern"] for r in rows})
        fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4.2), squeeze=False)
        for ax, name in zip(axes[0], names):
            sel = [r for r in rows if r["pattern"] == name]
            for m in timed:
                pts = [(r["N"], r[f"{m}_fwd_ms"]) for r in sel if f"{m}_fwd_ms" in r]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=m)
            ax.set_xscale("log", base=2)
            ax.set(yscale="log", xlabel="N (tokens)", ylabel="forward ms", title=name)
            ax.legend(fontsize=7)
        fig.tight_layout()
        return fig

    results.plot(draw)


def main(argv=None):
    a = _args(argv)
    device = harness.check_device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    results = harness.Results("bench_block_sparse", a.out, harness.environment(device))
    flex_compiled = None
    if "flex" in a.methods:
        from torch.nn.attention.flex_attention import flex_attention

        flex_compiled = torch.compile(flex_attention, dynamic=False)
    for name in a.patterns.split(","):
        for N in (int(n) for n in a.ns.split(",")):
            results.row(run_case(name, N, a, device, dtype, flex_compiled))
    rows = results.rows
    timed = [m for m in ("ours", "ours-triton", "ours-compiled", "dense-cudnn", "dense-flash", "dense-cpu", "flex")
             if any(f"{m}_fwd_ms" in r for r in rows)]
    summarise(results, rows, timed, a.backward)
    results.write()
    plot(results, rows, timed)
    return rows


if __name__ == "__main__":
    main()
