"""Where does a short block row's fixed cost go, and does a persistent forward hide it? A probe on shared,
unmasked block lists, outside the project's kernels.

    python benchmarks/persistent_rows_probe.py [--n 65536] [--ks 4,8,16] [--local-global 16384,65536,262144]
        [--out DIR [--raw-timelines]]
    python benchmarks/persistent_rows_probe.py --analyse DIR/timeline_local_global_16384.pt    # no GPU needed

The block-sparse forward pays about 2.5 block iterations per (block row, head) program beyond its key blocks
(``row_length_sweep.py``). Two kernels walk the same lists as the project's forward (its loop: one 128 x 128 tile
per iteration, the next block read one iteration ahead, 8 warps, 3 stages, 128 registers):
- ``rows``: one program per (block row, head), in the op's launch order (longest rows first). It is the probe's
  baseline. Each variant also runs once with a timeline: each tile's SM and its start, loop-end and end times
  (``%globaltimer``), summarised per case (``timeline_summary``).
- ``persistent``: two programs per SM, each walking a list of (block row, head) tiles that the host assigns
  longest first to the least-loaded program (``lpt_schedule``). A program reads the next tiles' rows, heads and
  lengths ahead (no chain of dependent loads between rows, no CTA launch per row); ``prefetch`` also loads the
  next tile's Q during this tile's loop. The programs run ``--programs-per-sm`` to an SM.
Prints each variant's time (``triton.testing.do_bench``, and replayed from a CUDA graph), its computed TFLOP/s
against dense flash SDPA's in the same run, and its max difference from the op's output.
``tests/lowering/test_persistent_rows_probe.py`` checks both kernels against float64 under the interpreter.
``--raw-timelines`` saves each case's timelines; ``--analyse`` reads one back (``analyse``). Measured results:
RESULTS.md.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import sys

import torch
import triton
import triton.language as tl

from fused_heads_probe import _row_blocks, check_shared_lists, launch_options   # benchmarks/, beside this script

COMPILED = {}   # kernel name -> the handle of its last launch (registers, spills)


@triton.jit
def _globaltimer():
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def _smid():
    return tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _q_offs(row, h, stride_h, stride_n, BS: tl.constexpr, HEAD_DIM: tl.constexpr):
    return (h.to(tl.int64) * stride_h + (row * BS + tl.arange(0, BS))[:, None] * stride_n
            + tl.arange(0, HEAD_DIM)[None, :])


@triton.jit
def _stamp(Times, slot, t0, t1, TIMELINE: tl.constexpr):
    """Timeline entry ``slot``: (SM, start, loop end, end) in ns of ``%globaltimer``."""
    if TIMELINE:
        t2 = _globaltimer()
        tl.store(Times + slot * 4, _smid().to(tl.int64))
        tl.store(Times + slot * 4 + 1, t0)
        tl.store(Times + slot * 4 + 2, t1)
        tl.store(Times + slot * 4 + 3, t2)


@triton.jit
def _rows_kernel(Q, K, V, Out, KvCount, KvIdx, Order, Times, sm_scale, stride_h, stride_n, KW, NB,
                 TIMELINE: tl.constexpr, BS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """(block row, head) pair ``Order[program_id(0)]`` (packed ``head * NB + row``)."""
    t0 = 0
    if TIMELINE:
        t0 = _globaltimer()
    pair = tl.load(Order + tl.program_id(0))
    row, h = pair % NB, pair // NB
    offs = _q_offs(row, h, stride_h, stride_n, BS, HEAD_DIM)
    q = tl.load(Q + offs)
    acc, l_i = _row_blocks(q, KvIdx + row * KW, tl.load(KvCount + row * 2 + 1), K + h.to(tl.int64) * stride_h,
                           V + h.to(tl.int64) * stride_h, stride_n, sm_scale * 1.4426950408889634, BS, BS,
                           HEAD_DIM)
    t1 = 0
    if TIMELINE:
        t1 = _globaltimer()
    tl.store(Out + offs, (acc / l_i[:, None]).to(Out.dtype.element_ty))
    _stamp(Times, tl.program_id(0), t0, t1, TIMELINE)


@triton.jit
def _persistent_kernel(Q, K, V, Out, TRow, THead, TLen, Count, KvIdx, Times, sm_scale, stride_h, stride_n, KW, W,
                       PREFETCH_Q: tl.constexpr, TIMELINE: tl.constexpr, BS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Tiles ``[0, Count[p])`` of program ``p``'s row of the schedule (``TRow``/``THead``/``TLen``, ``W`` wide,
    two zero entries past each program's last): tile ``i + 2``'s scalars are read during tile ``i``, and with
    ``PREFETCH_Q`` tile ``i + 1``'s Q too."""
    base = tl.program_id(0) * W
    qk_scale = sm_scale * 1.4426950408889634
    r0, h0, n0 = tl.load(TRow + base), tl.load(THead + base), tl.load(TLen + base)
    r1, h1, n1 = tl.load(TRow + base + 1), tl.load(THead + base + 1), tl.load(TLen + base + 1)
    q = tl.load(Q + _q_offs(r0, h0, stride_h, stride_n, BS, HEAD_DIM))
    for i in range(0, tl.load(Count + tl.program_id(0))):
        t0 = 0
        if TIMELINE:
            t0 = _globaltimer()
        e = base + i + 2
        r2, h2, n2 = tl.load(TRow + e), tl.load(THead + e), tl.load(TLen + e)
        if PREFETCH_Q:
            q_next = tl.load(Q + _q_offs(r1, h1, stride_h, stride_n, BS, HEAD_DIM))
        hh = h0.to(tl.int64) * stride_h
        acc, l_i = _row_blocks(q, KvIdx + r0 * KW, n0, K + hh, V + hh, stride_n, qk_scale, BS, BS, HEAD_DIM)
        t1 = 0
        if TIMELINE:
            t1 = _globaltimer()
        out = (acc / l_i[:, None]).to(Out.dtype.element_ty)
        tl.store(Out + _q_offs(r0, h0, stride_h, stride_n, BS, HEAD_DIM), out)
        _stamp(Times, base + i, t0, t1, TIMELINE)
        if PREFETCH_Q:
            q = q_next
        else:
            q = tl.load(Q + _q_offs(r1, h1, stride_h, stride_n, BS, HEAD_DIM))
        r0, h0, n0, r1, h1, n1 = r1, h1, n1, r2, h2, n2


def lpt_schedule(lengths: torch.Tensor, order: torch.Tensor, programs: int, nb: int):
    """Tiles (packed ``head * nb + row``, in ``order``: longest first) to ``programs`` programs, each to the least
    loaded so far (one iteration of fixed cost per tile counted with its blocks). Returns int32 ``(rows, heads,
    lens)`` ``[programs, W]`` (two zero entries past each program's last tile) and the per-program counts."""
    pairs = order.tolist()
    lens = lengths.tolist()
    heap = [(0, p) for p in range(programs)]
    tiles = [[] for _ in range(programs)]
    for pair in pairs:
        load, p = heapq.heappop(heap)
        n = lens[pair % nb]
        tiles[p].append((pair % nb, pair // nb, n))
        heapq.heappush(heap, (load + n + 1, p))
    width = max(len(t) for t in tiles) + 2
    table = torch.zeros(3, programs, width, dtype=torch.int32)
    for p, ts in enumerate(tiles):
        if ts:
            table[:, p, :len(ts)] = torch.tensor(ts, dtype=torch.int32).T
    count = torch.tensor([len(t) for t in tiles], dtype=torch.int32)
    return table[0], table[1], table[2], count


def rows_attention(q, k, v, layout, *, timeline=None, num_warps=8, num_stages=3, maxnreg=128):
    """One program per (block row, head), longest rows first. ``timeline``: an int64 ``[rows * H, 4]`` tensor
    to fill (GPU only)."""
    from dilate_compiler.lowering.block_sparse_triton import tile_order

    check_shared_lists(q, k, v, layout)
    _, H, N, D = q.shape
    bs, nb = layout.block_size, N // layout.block_size
    count, idx = layout.kv_count.to(torch.int32), layout.kv_idx.to(torch.int32)
    order = tile_order(count, 1, H)
    out = torch.empty_like(q)
    times = timeline if timeline is not None else torch.zeros(4, dtype=torch.int64, device=q.device)
    COMPILED["rows"] = _rows_kernel[(nb * H,)](
        q, k, v, out, count, idx, order, times, D ** -0.5, q.stride(1), q.stride(2), idx.shape[2], nb,
        TIMELINE=timeline is not None, BS=bs, HEAD_DIM=D, **launch_options(num_warps, num_stages, maxnreg))
    return out


def persistent_schedule(layout, heads: int, programs: int):
    from dilate_compiler.lowering.block_sparse_triton import tile_order

    count = layout.kv_count.to(torch.int32)
    order = tile_order(count, 1, heads).cpu()
    rows, hs, lens, cnt = lpt_schedule(count[0, :, 1].cpu(), order, programs, count.shape[1])
    dev = layout.kv_idx.device
    return tuple(t.to(dev) for t in (rows, hs, lens, cnt))


def persistent_attention(q, k, v, layout, programs: int, *, prefetch_q=False, schedule=None, timeline=None,
                         num_warps=8, num_stages=3, maxnreg=128):
    """``programs`` persistent programs over the (block row, head) tiles (``persistent_schedule``)."""
    check_shared_lists(q, k, v, layout)
    _, H, N, D = q.shape
    rows, hs, lens, cnt = schedule if schedule is not None else persistent_schedule(layout, H, programs)
    idx = layout.kv_idx.to(torch.int32)
    out = torch.empty_like(q)
    times = timeline if timeline is not None else torch.zeros(4, dtype=torch.int64, device=q.device)
    COMPILED["persistent" + ("-prefetch" if prefetch_q else "")] = _persistent_kernel[(programs,)](
        q, k, v, out, rows, hs, lens, cnt, idx, times, D ** -0.5, q.stride(1), q.stride(2), idx.shape[2],
        rows.shape[1], PREFETCH_Q=prefetch_q, TIMELINE=timeline is not None, BS=layout.block_size, HEAD_DIM=D,
        **launch_options(num_warps, num_stages, maxnreg))
    return out


def timeline_summary(times: torch.Tensor) -> dict:
    """From ``[tiles, 4]`` (SM, start, loop end, end) rows (rows never written dropped): the kernel's span, the
    medians of a tile's time from start to loop end, from loop end to end (its store) and in all, and the median
    gap on an SM between a tile's start and the latest end of another tile there before it (a CTA's launch, for
    one program per tile)."""
    t = times[times[:, 1] > 0].cpu().double()
    sm, t0, t1, t2 = t[:, 0], t[:, 1], t[:, 2], t[:, 3]
    origin = t0.min()
    gaps = []
    for s in sm.unique():
        sel = sm == s
        starts, ends = (t0[sel] - origin).sort().values, (t2[sel] - origin).sort().values
        # tiles on an SM: each start after the first pairs with the latest end not after it
        j = torch.searchsorted(ends, starts[1:], right=True) - 1
        ok = j >= 0
        gaps.append((starts[1:][ok] - ends[j[ok]]))
    gaps = torch.cat(gaps) if gaps else torch.zeros(1)
    return {"tiles": int(t.shape[0]), "span_us": float((t2.max() - origin) / 1e3),
            "start_to_loop_end_us_median": float((t1 - t0).median() / 1e3),
            "epilogue_us_median": float((t2 - t1).median() / 1e3),
            "tile_us_median": float((t2 - t0).median() / 1e3),
            "sm_gap_us_median": float(gaps.median() / 1e3) if gaps.numel() else 0.0,
            "sms": int(sm.unique().numel())}


def analyse(saved: dict, programs_per_sm: int = 2) -> dict:
    """What a ``--raw-timelines`` file says, per variant: the span; the longest tiles (as many as there are heads
    with a row that visits every block: a global token's) with their time and when they end; the other tiles'
    median time and median time per block; and for a persistent variant (``programs_per_sm`` programs on each SM,
    the timeline ``[programs * W, 4]``) when the programs launched first on each SM end against the others, which
    ran the same work (``lpt_schedule``)."""
    lengths = saved["lengths"].double()
    out = {}
    for name, times in saved.items():
        if name == "lengths":
            continue
        written = times[:, 1] > 0
        slot = torch.arange(times.shape[0])[written]
        t = times[written].double()
        sm, t0, t2 = t[:, 0], (t[:, 1] - t[:, 1].min()) / 1e3, (t[:, 3] - t[:, 1].min()) / 1e3
        dur = t2 - t0
        sms = int(sm.unique().numel())
        heavy = int((lengths == lengths.max()).sum()) * (dur.numel() // lengths.numel())   # rows x heads
        top = dur.topk(heavy)
        light = torch.ones_like(dur, dtype=torch.bool)
        light[top.indices] = False
        row = {"span_us": float(t2.max()), "longest_tiles": heavy, "longest_us": float(top.values.min()),
               "longest_end_us": float(t2[top.indices].max()), "other_tiles_us_median": float(dur[light].median()),
               "other_us_per_block": float(dur[light].median() / lengths[lengths < lengths.max()].median())}
        if name != "rows":
            programs = programs_per_sm * sms
            prog = slot // (times.shape[0] // programs)
            ends = torch.zeros(programs, dtype=torch.float64).scatter_reduce_(0, prog, t2, "amax", include_self=False)
            row["first_on_sm_end_us_median"] = float(ends[:sms].median())
            row["second_on_sm_end_us_median"] = float(ends[sms:].median())
        out[name] = row
    return out


def _times(fn) -> tuple[float, float]:
    """``fn``'s median ms under ``triton.testing.do_bench`` and replayed from a CUDA graph (no host work)."""
    return triton.testing.do_bench(fn), triton.testing.do_bench_cudagraph(fn)


def main():
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # tests.lowering.pinning
    import torch.nn.functional as F

    import dilate_compiler as dc
    from dilate_compiler import patterns as P
    from dilate_compiler.lowering import block_sparse_triton as bt
    from pinned_tiles import parse_tile
    from tests.lowering.pinning import pinned

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=65536, help="N of the local(k) layouts")
    ap.add_argument("--ks", default="4,8,16")
    ap.add_argument("--local-global", default="16384,65536,262144", help="N of the local(8) | global(128) runs")
    ap.add_argument("--programs-per-sm", default="2")
    ap.add_argument("--out", default="")
    ap.add_argument("--raw-timelines", action="store_true", help="also save each case's timelines (.pt) in --out")
    ap.add_argument("--analyse", default="", help="print what a saved timeline file says (no GPU needed) and exit")
    a = ap.parse_args()
    if a.analyse:
        print(json.dumps(analyse(torch.load(a.analyse)), indent=1))
        return
    H, D, BS = 16, 64, 128
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__} SMs {sms}",
          flush=True)
    cases = [(f"local({kk})", P.local(kk), a.n) for kk in (int(x) for x in a.ks.split(",") if x)]
    cases += [("local+global", P.local(8) | P.global_tokens(BS), int(n)) for n in a.local_global.split(",") if n]
    rows, dense = [], {}
    for name, pattern, n in cases:
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, H, n, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        if n not in dense:
            ms = triton.testing.do_bench(lambda: F.scaled_dot_product_attention(q, k, v))
            dense[n] = (ms, 4 * D * H * n * n / ms / 1e9)
            print(f"N={n} dense flash SDPA {ms:.3f} ms, {dense[n][1]:.0f} TFLOP/s", flush=True)
        lay = pattern.layout(n, BS, device="cuda")
        flops = 4 * D * H * int(lay.kv_count[0, :, 1].sum()) * BS * BS
        with torch.no_grad(), pinned([bt._autotuned("fwd", BS)], parse_tile("128x128/8w/3s@128")):
            ref = dc.ops.block_sparse_attention(q, k, v, lay, block_size=BS)
            results = [("op", *_times(lambda: dc.ops.block_sparse_attention(q, k, v, lay, block_size=BS)), 0.0,
                        None)]
        tl_rows = torch.zeros(n // BS * H, 4, dtype=torch.int64, device="cuda")
        rows_attention(q, k, v, lay, timeline=tl_rows)
        out = rows_attention(q, k, v, lay)
        results.append(("rows", *_times(lambda: rows_attention(q, k, v, lay)),
                        (out.float() - ref.float()).abs().max().item(), timeline_summary(tl_rows)))
        raw = {"rows": tl_rows.cpu()}
        for pps in (int(x) for x in a.programs_per_sm.split(",")):
            programs = pps * sms
            sched = persistent_schedule(lay, H, programs)
            for prefetch in (False, True):
                tline = torch.zeros(programs * sched[0].shape[1], 4, dtype=torch.int64, device="cuda")
                persistent_attention(q, k, v, lay, programs, prefetch_q=prefetch, schedule=sched, timeline=tline)
                out = persistent_attention(q, k, v, lay, programs, prefetch_q=prefetch, schedule=sched)
                label = f"persistent{'-prefetch' if prefetch else ''} {pps}/SM"
                results.append((label, *_times(lambda: persistent_attention(
                    q, k, v, lay, programs, prefetch_q=prefetch, schedule=sched)),
                    (out.float() - ref.float()).abs().max().item(), timeline_summary(tline)))
                raw[label] = tline.cpu()
        if a.out and a.raw_timelines:
            torch.save({"lengths": lay.kv_count[0, :, 1].cpu(), **raw},
                       os.path.join(a.out, f"timeline_{name.replace('+', '_').replace('(', '').replace(')', '')}"
                                           f"_{n}.pt"))
        for label, ms, graph_ms, err, summ in results:
            ratio, graph_ratio = (flops / t / 1e9 / dense[n][1] for t in (ms, graph_ms))
            print(f"{name} N={n} {label:<26} {ms:8.4f} ms ({ratio:.3f}x dense), graph {graph_ms:8.4f} ms "
                  f"({graph_ratio:.3f}x)  max diff {err:.3g}" + (f"  {summ}" if summ else ""), flush=True)
            rows.append({"case": name, "N": n, "variant": label, "ms": ms, "computed_vs_dense": ratio,
                         "graph_ms": graph_ms, "graph_computed_vs_dense": graph_ratio, "max_diff_vs_op": err,
                         "dense_ms": dense[n][0], "timeline": summ})
    resources = {name: {"registers": ck.n_regs, "spills": ck.n_spills} for name, ck in COMPILED.items()}
    print(f"registers and spill bytes (last launch of each kernel, timeline off): {resources}", flush=True)
    if a.out:
        with open(os.path.join(a.out, "persistent_rows_probe.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "triton": triton.__version__, "sms": sms, "resources": resources, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
