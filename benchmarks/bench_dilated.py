"""Dilated attention on the GPU, side by side with its anchors, in one run.

    python benchmarks/bench_dilated.py --out DIR [--configs A,B] [--ns 16384,65536,262144] [--causal both]
        [--methods ours,dense,gather,flex] [--backward] [--scale-n 2097152] [--dropout 0.1]

Methods (all bf16, B=1):
- ours:   dc.ops.dilated_attention (the kernels; all branches fused, no gather). On Hopper a nested non-causal
          pattern at D=64 runs the warp-specialised Gluon forward; each row's "ours_forward" says which forward ran.
- ours-triton: the same with the warp-specialised forward turned off (the Triton forward; method named in
          --methods).
- ours-dropout: the same with dropout_p = --dropout (in-kernel Philox masks; method named in --methods).
- ours-compiled: ours under torch.compile (the kernels as Inductor emits them; method named in --methods).
- dense:  F.scaled_dot_product_attention with the flash backend (full attention: a different, larger problem).
- gather: LongNet done the usual way: per branch and head offset, strided gather, flash SDPA
          (aten._scaled_dot_product_flash_attention returns the LSE), scatter, LSE merge. Its backward treats
          the mixing weights as constants (as torchscale does), so it does less than ours.
- flex:   FlexAttention, mask_mod = union of branches, score_mod = score + log(multiplicity) (the same
          function: checked against ours first); its block mask build time is reported separately: by
          create_block_mask (default), or with --flex-mask from-pattern from the pattern's block structure
          (dilated_block_state: no create_block_mask, which runs out of memory or compiles for minutes at 256K).
Useful FLOPs: 4*D per linked (query, key) pair forward (counting a pair once per linking branch), 2.5x that
for backward. The kernels compute a pair linked by several branches once, weighted by its multiplicity, on
nested patterns (config A/B's is one): ``*_tflops_distinct`` counts 4*D per distinct pair, what they execute.
Times are medians of triton.testing.do_bench.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
import triton

import dilate_compiler as dc

SEGS, RATES = (2048, 4096, 8192, 16384), (1, 2, 4, 8)
CONFIGS = {"A": (16, 64), "B": (8, 128)}


def linked_pairs(N, H, segs, rates, causal) -> int:
    """Number of (head, query, key, branch) links, counted from the definition's structure (O(segments))."""
    total = 0
    for w, r in zip(segs, rates):
        w = min(w, N)
        for h in range(H):
            o = h % r
            for s0 in range(0, N, w):
                n = len(range(s0 + o, min(s0 + w, N), r))
                total += n * (n + 1) // 2 if causal else n * n
    return total


def distinct_pairs(N, H, segs, rates, causal) -> int:
    """Number of (head, query, key) pairs linked by at least one branch, for a chain of branches (each segment
    and rate dividing the next): a pair of branch b whose key lies in the query's segment of branch b-1 is also
    a pair of b-1, so distinct = sum_b pairs(w_b, r_b) - sum_{b>0} pairs(w_{b-1}, r_b). What the kernels compute
    on nested patterns (each pair once, weighted by its multiplicity)."""
    from dilate_compiler.lowering.dilated.plan import nested_order

    chain = nested_order(segs, rates, "lse")
    assert chain is not None, "distinct_pairs counts chains only"
    ws, rs = chain
    total = sum(linked_pairs(N, H, (w,), (r,), causal) for w, r in zip(ws, rs))
    return total - sum(linked_pairs(N, H, (ws[b - 1],), (rs[b],), causal) for b in range(1, len(ws)))


def dense_pairs(N, H, causal) -> int:
    return H * (N * (N + 1) // 2 if causal else N * N)


def gather_sdpa(q, k, v, segs, rates, causal):
    B, H, N, D = q.shape
    scale = D ** -0.5
    outs, lses = [], []
    for w, r in zip(segs, rates):
        w = min(w, N)
        nseg = N // w
        out_b = torch.zeros(B, H, N, D, device=q.device, dtype=torch.float32)
        lse_b = torch.full((B, H, N), float("-inf"), device=q.device)
        for o in range(min(r, H)):
            hs = slice(o, H, r)
            nh = len(range(o, H, r))
            sel = lambda x: x[:, hs].reshape(B, nh, nseg, w // r, r, D)[..., o, :].reshape(B, nh * nseg, w // r, D)  # noqa
            ob, lb = torch.ops.aten._scaled_dot_product_flash_attention(sel(q), sel(k), sel(v), 0.0, causal,
                                                                        scale=scale)[:2]
            out_b[:, hs].view(B, nh, nseg, w // r, r, D)[..., o, :] = ob.view(B, nh, nseg, w // r, D).float()
            lse_b[:, hs].view(B, nh, nseg, w // r, r)[..., o] = lb.view(B, nh, nseg, w // r)
        outs.append(out_b)
        lses.append(lse_b.detach())
    lse = torch.logsumexp(torch.stack(lses), 0)
    out = sum(torch.exp(l - lse).nan_to_num(0.0).unsqueeze(-1) * o for o, l in zip(outs, lses))
    return out.to(q.dtype)


def flex_fns(H, segs, rates, causal):
    def mask_mod(b, h, q_idx, kv_idx):
        m = None
        for w, r in zip(segs, rates):
            t = (q_idx // w == kv_idx // w) & (q_idx % r == h % r) & (kv_idx % r == h % r)
            m = t if m is None else (m | t)
        return (m & (kv_idx <= q_idx)) if causal else m

    def score_mod(score, b, h, q_idx, kv_idx):
        mult = None
        for w, r in zip(segs, rates):
            t = ((q_idx // w == kv_idx // w) & (q_idx % r == h % r) & (kv_idx % r == h % r)).to(torch.float32)
            mult = t if mult is None else mult + t
        return score + torch.log(torch.clamp(mult, min=1.0))

    return mask_mod, score_mod


def flex_block_mask(count, idx, block_size, seq_len, mask_mod):
    """FlexAttention's BlockMask from block lists (``count [nb, 2]``: partial, total; ``idx [nb, width]``:
    partial blocks first, then full ones, as ``dilate_compiler.patterns`` builds them); mask_mod runs on the
    partial blocks only."""
    from torch.nn.attention.flex_attention import BlockMask

    cnt, nb = count.long(), count.shape[0]
    idx = torch.nn.functional.pad(idx.long(), (0, nb - idx.shape[-1]))   # Flex wants nb columns
    pos = torch.arange(nb, device=idx.device)
    full_idx = idx.gather(-1, (cnt[:, :1] + pos).clamp(max=nb - 1))
    as4 = lambda t: t.to(torch.int32).contiguous().view(1, 1, *t.shape)  # noqa: E731
    return BlockMask.from_kv_blocks(as4(cnt[:, 0]), as4(idx), as4(cnt[:, 1] - cnt[:, 0]), as4(full_idx),
                                    BLOCK_SIZE=block_size, mask_mod=mask_mod, seq_lengths=(seq_len, seq_len))


def dilated_block_state(N, segs, rates, causal, bs=128, device="cuda"):
    """``[nb, nb]`` int8 block states (``dilate_compiler.patterns`` EMPTY / PARTIAL / FULL) of the dilated
    pattern, from the segment ranges of each block pair in O(nb^2 * branches), with no token-level mask. Every
    block of ``bs >= max(rates)`` positions holds every residue class, so a block pair is linked by a branch iff
    their segments meet (the same for every head); it is full iff a rate-1 branch links every pair (both blocks
    inside one segment) and no causal or sequence-end mask cuts it."""
    from dilate_compiler import patterns as P

    assert bs >= max(rates), "every block must hold every residue class"
    nb = -(-N // bs)
    blk = torch.arange(nb, device=device)
    first, last = blk * bs, torch.clamp(blk * bs + bs, max=N) - 1
    linked = torch.zeros(nb, nb, dtype=torch.bool, device=device)
    full = torch.zeros_like(linked)
    for w, r in zip(segs, rates):
        lo, hi = first // w, last // w
        linked |= (lo[:, None] <= hi[None, :]) & (lo[None, :] <= hi[:, None])
        if r == 1:
            one = lo == hi
            full |= one[:, None] & one[None, :] & (lo[:, None] == lo[None, :])
    below = blk[None, :] < blk[:, None]
    if causal:
        linked &= below | (blk[None, :] == blk[:, None])
        full &= below
    if N % bs:
        full[-1, :] = False
        full[:, -1] = False
    return torch.where(full, P.FULL, torch.where(linked, P.PARTIAL, P.EMPTY)).to(torch.int8)


def dilated_flex_block_mask(N, segs, rates, causal, mask_mod, bs=128, device="cuda"):
    """FlexAttention's BlockMask for the dilated pattern without create_block_mask (whose uncompiled form runs
    out of memory at 256K and whose compiled form takes minutes on its first call)."""
    from dilate_compiler import patterns as P

    state = dilated_block_state(N, segs, rates, causal, bs, device)[None]
    count, idx, _ = P.block_lists(state, torch.zeros(state.shape, dtype=torch.int32, device=device))
    return flex_block_mask(count[0], idx[0], bs, N, mask_mod)


def forward_taken(q, k, v, causal) -> str:
    """Which forward the op runs for this call: "warp-specialised", or why the Triton forward runs."""
    from dilate_compiler.lowering.dilated.op import warp_specialised_reason

    return warp_specialised_reason(q, k, v, None, SEGS, RATES, causal, "lse", 0.0) or "warp-specialised"


def triton_forward(fn):
    """``fn`` run with the op's warp-specialised forward turned off (the Triton forward, as before it)."""
    from dilate_compiler.lowering.common import hopper_gluon

    def run():
        with hopper_gluon.turned_off():
            return fn()
    return run


def bench(fn, backward=False, inputs=()):
    if backward:
        def step():
            out = fn()
            out.backward(torch.ones_like(out))
        return triton.testing.do_bench(step, warmup=50, rep=200, grad_to_none=list(inputs), return_mode="median")
    return triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--configs", default="A,B")
    ap.add_argument("--ns", default="16384,65536,262144")
    ap.add_argument("--causal", default="both")
    ap.add_argument("--methods", default="ours,dense,gather,flex")
    ap.add_argument("--backward", action="store_true")
    ap.add_argument("--flex-max-n", type=int, default=262144)
    ap.add_argument("--flex-compile-mask", action="store_true",
                    help="build the block mask with create_block_mask(_compile=True) (first call compiles)")
    ap.add_argument("--flex-mask", default="create", choices=("create", "from-pattern"),
                    help="from-pattern: Flex's BlockMask from the pattern's block structure (dilated_block_state), "
                         "no create_block_mask; lets Flex run at 256K")
    ap.add_argument("--scale-n", type=int, default=0)
    ap.add_argument("--dropout", type=float, default=0.1, help="dropout_p of the ours-dropout method")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.cuda.get_device_name()
    print(f"device={dev} torch={torch.__version__} triton={triton.__version__}", flush=True)
    methods = a.methods.split(",")
    causals = {"both": (False, True), "true": (True,), "false": (False,)}[a.causal]
    rows = []
    flex_compiled = None
    for cfg in a.configs.split(","):
        H, D = CONFIGS[cfg]
        for causal in causals:
            for N in (int(n) for n in a.ns.split(",")):
                torch.manual_seed(0)
                q, k, v = (torch.randn(1, H, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=a.backward)
                           for _ in range(3))
                useful = 4 * D * linked_pairs(N, H, SEGS, RATES, causal)
                dense_flops = 4 * D * dense_pairs(N, H, causal)
                distinct = 4 * D * distinct_pairs(N, H, SEGS, RATES, causal)
                row = {"config": cfg, "H": H, "D": D, "N": N, "causal": causal, "useful_flop": useful,
                       "distinct_flop": distinct}
                ours = lambda: dc.ops.dilated_attention(q, k, v, SEGS, RATES, is_causal=causal)  # noqa: E731
                fns = {
                    "ours": ours,
                    "ours-dropout": lambda: dc.ops.dilated_attention(q, k, v, SEGS, RATES, is_causal=causal,
                                                                     dropout_p=a.dropout),
                    "ours-triton": triton_forward(ours),
                    "dense": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
                    "gather": lambda: gather_sdpa(q, k, v, SEGS, RATES, causal),
                }
                row["ours_forward"] = forward_taken(q, k, v, causal)
                if "ours-triton" in methods:
                    with torch.no_grad():
                        a_out, b_out = fns["ours"](), fns["ours-triton"]()
                        row["triton_vs_ours_max_abs"] = (a_out - b_out).abs().max().item()
                        del a_out, b_out
                if "ours-compiled" in methods:
                    ours_c = torch.compile(lambda q, k, v: dc.ops.dilated_attention(q, k, v, SEGS, RATES,
                                                                                     is_causal=causal),
                                           fullgraph=True, dynamic=False)
                    fns["ours-compiled"] = lambda: ours_c(q, k, v)
                    with torch.no_grad():          # the eager output stays alive: the compiled one can't reuse it
                        eager_out = fns["ours"]()
                        row["compiled_vs_ours_max_abs"] = (ours_c(q, k, v) - eager_out).abs().max().item()
                        del eager_out
                if "flex" in methods and N <= a.flex_max_n:
                    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
                    if flex_compiled is None:
                        flex_compiled = torch.compile(flex_attention, dynamic=False)
                    mask_mod, score_mod = flex_fns(H, SEGS, RATES, causal)
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    if a.flex_mask == "from-pattern":
                        bm = dilated_flex_block_mask(N, SEGS, RATES, causal, mask_mod)
                    else:
                        bm = create_block_mask(mask_mod, 1, H, N, N, device="cuda", _compile=a.flex_compile_mask)
                    torch.cuda.synchronize()
                    row["flex_mask_build_s"] = time.perf_counter() - t0
                    row["flex_mask"] = a.flex_mask
                    fns["flex"] = lambda: flex_compiled(q, k, v, score_mod=score_mod, block_mask=bm)
                    if N == min(int(n) for n in a.ns.split(",")):
                        with torch.no_grad():
                            ref = fns["ours"]().float()
                            row["flex_vs_ours_rel_err"] = ((fns["flex"]().float() - ref).norm() / ref.norm()).item()
                for m in methods:
                    if m not in fns:
                        continue
                    with torch.no_grad():
                        fns[m]()
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                        base = torch.cuda.memory_allocated()
                        ms = bench(fns[m])
                        row[f"{m}_fwd_ms"] = ms
                        row[f"{m}_fwd_peak_extra_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
                    flops = dense_flops if m == "dense" else useful
                    row[f"{m}_fwd_tflops"] = flops / ms / 1e9
                    if m.startswith("ours"):                    # what the kernels execute: each pair once
                        row[f"{m}_fwd_tflops_distinct"] = distinct / ms / 1e9
                    if a.backward and m != "flex":
                        ms_b = bench(fns[m], backward=True, inputs=(q, k, v))
                        row[f"{m}_fwdbwd_ms"] = ms_b
                        row[f"{m}_fwdbwd_tflops"] = 3.5 * flops / ms_b / 1e9
                rows.append(row)
                _log(a.out, row)
                del q, k, v
                torch.cuda.empty_cache()
    if a.scale_n:
        N, H, D = a.scale_n, 16, 64
        q, k, v = (torch.randn(1, H, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fwd = bench(lambda: dc.ops.dilated_attention(q, k, v, SEGS, RATES, is_causal=True))
        fb = bench(lambda: dc.ops.dilated_attention(q, k, v, SEGS, RATES, is_causal=True), backward=True,
                   inputs=(q, k, v))
        row = {"scale_N": N, "H": H, "D": D, "causal": True, "fwd_ms": fwd, "fwdbwd_ms": fb,
               "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
        rows.append(row)
        _log(a.out, row)
    from dilate_compiler.lowering.dilated import triton as dt

    tuned = tuned_configs({"fwd": dt._dilated_attn_fwd_kernel, "walk0": dt._dilated_attn_fwd_walk0_kernel,
                           "dq": dt._dilated_attn_bwd_dq_kernel,
                           "dkdv": dt._dilated_attn_bwd_dkdv_kernel})
    print("autotuned configs:", json.dumps(tuned, indent=1), flush=True)
    with open(os.path.join(a.out, "bench_dilated.json"), "w") as f:
        json.dump({"device": dev, "torch": torch.__version__, "triton": triton.__version__, "rows": rows,
                   "tuned": tuned}, f, indent=1)
    _summary(rows, methods)
    _plot(rows, methods, os.path.join(a.out, "bench_dilated.png"))


def tuned_configs(kernels: dict) -> dict:
    """The configs each autotuned kernel chose, per autotune key (the kernel's own cache)."""
    return {name: {str(key): str(cfg) for key, cfg in getattr(kernel, "cache", {}).items()}
            for name, kernel in kernels.items()}


def _log(out_dir, row):
    print(json.dumps(row), flush=True)
    with open(os.path.join(out_dir, "bench_dilated.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


def _summary(rows, methods):
    print("\nconfig causal N        " + "".join(f"{m + ' ms':>12}" for m in methods) + "   ours TF/s  dense TF/s"
          "  x gather   x flex")
    for r in rows:
        if "config" not in r:
            print(f"scale: N={r['scale_N']} fwd {r['fwd_ms']:.1f} ms, fwd+bwd {r['fwdbwd_ms']:.1f} ms, "
                  f"peak {r['peak_gib']:.1f} GiB")
            continue
        cells = "".join(f"{r.get(m + '_fwd_ms', float('nan')):>12.2f}" for m in methods)
        sp_g = r.get("gather_fwd_ms", float("nan")) / r.get("ours_fwd_ms", float("nan"))
        sp_f = r.get("flex_fwd_ms", float("nan")) / r.get("ours_fwd_ms", float("nan"))
        print(f"{r['config']:<7}{str(r['causal']):<7}{r['N']:<9}{cells}   {r.get('ours_fwd_tflops', 0):9.0f}"
              f"  {r.get('dense_fwd_tflops', 0):10.0f}  {sp_g:8.2f}  {sp_f:7.1f}")
        if "ours_fwdbwd_ms" in r:
            print(f"{'':<23}fwd+bwd: ours {r['ours_fwdbwd_ms']:.2f} ms, gather {r.get('gather_fwdbwd_ms', 0):.2f} ms,"
                  f" dense {r.get('dense_fwdbwd_ms', 0):.2f} ms")


def _plot(rows, methods, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, cfg in zip(axes, ("A", "B")):
        for causal, style in ((False, "-"), (True, "--")):
            sel = [r for r in rows if r.get("config") == cfg and r["causal"] == causal]
            for m in methods:
                pts = [(r["N"], r[f"{m}_fwd_ms"]) for r in sel if f"{m}_fwd_ms" in r]
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", label=f"{m}{' causal' if causal else ''}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("N (tokens)")
        ax.set_ylabel("forward time (ms)")
        H, D = CONFIGS[cfg]
        ax.set_title(f"config {cfg}: H={H}, D={D}, bf16")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
