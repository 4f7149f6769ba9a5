"""Dilated attention (LongNet) against its anchors, all in one run.

    python benchmarks/bench_dilated.py --out DIR [--configs A,B] [--ns 16384,65536,262144] [--causal both]
        [--methods ours,ours-compiled,dense,gather,flex] [--backward]

Pattern: segments (2048, 4096, 8192, 16384), rates (1, 2, 4, 8), ``mixing="lse"``. Config A: H=16, D=64;
config B: H=8, D=128; B=1, bf16 on CUDA (float32 with ``--device cpu``, a dry run at small sizes).

Methods (``--methods``, comma-separated):
- ``ours``: ``dc.ops.dilated_attention``. On Hopper a non-causal chain at D=64 runs the warp-specialised
  forward; the row's ``ours_forward`` says which forward ran.
- ``ours-triton``: the same with the warp-specialised forward turned off (CUDA only).
- ``ours-compiled``: the same under ``torch.compile(fullgraph=True)``: the forward eager mode runs (on Hopper the
  warp-specialised one, through an opaque op), the Triton kernels as Inductor emits them.
- ``dense``: full attention with ``F.scaled_dot_product_attention``, a different and larger problem: the rate
  ceiling. On CUDA twice, with the cuDNN backend (``dense-cudnn``) and the flash backend (``dense-flash``); the
  faster is the ceiling. A backend that refuses a shape is listed as failed; on the CPU (a dry run) both are
  "unavailable" and PyTorch's default (``dense-cpu``) runs.
- ``gather``: LongNet done the usual way: per branch and head offset a strided gather, flash attention (which
  returns the log-sum-exp), a scatter and a log-sum-exp merge. Its backward treats the mixing weights as
  constants, as torchscale does, so it does less work than ours.
- ``flex``: FlexAttention with ``mask_mod`` = the union of branches and ``score_mod`` = score + log(multiplicity),
  the same function (checked against ours at the smallest N). Its block mask comes from the pattern's block
  structure (``--flex-mask from-pattern``, the default) or from ``create_block_mask`` (``--flex-mask create``,
  which needs N² memory or minutes of compilation at 256K); its build time is recorded.

Throughput: 4·D FLOPs per distinct linked (query, key) pair and head (a pair linked by several branches counts
once: what the kernels compute), 3.5× that forward + backward; dense attention is credited with its own pairs
(N², N(N+1)/2 causal). "ours / ceiling" (and "ours-compiled / ceiling") is ours' rate as a share of the faster
dense backend's in the same run. The tables come from ``harness.ceiling_tables``, shared with
``bench_block_sparse.py``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dilate_compiler as dc  # noqa: E402
import harness  # noqa: E402

SEGS, RATES = (2048, 4096, 8192, 16384), (1, 2, 4, 8)
CONFIGS = {"A": (16, 64), "B": (8, 128)}
METHODS = ("ours", "ours-triton", "ours-compiled", "dense", "gather", "flex")


# --- work counts ----------------------------------------------------------------------------------------------


def linked_pairs(N, H, segs, rates, causal) -> int:
    """(head, query, key, branch) links: a pair counts once per branch linking it (O(segments))."""
    total = 0
    for w, r in zip(segs, rates):
        w = min(w, N)
        for h in range(H):
            o = h % r
            for s0 in range(0, N, w):
                n = len(range(s0 + o, min(s0 + w, N), r))
                total += n * (n + 1) // 2 if causal else n * n
    return total


def chain(segs, rates):
    """The branches sorted by segment length when each segment length and each rate divides the next's (a
    chain, as LongNet's schedules are), else None."""
    order = sorted(range(len(segs)), key=lambda i: segs[i])
    ws, rs = [segs[i] for i in order], [rates[i] for i in order]
    if all(ws[b + 1] % ws[b] == 0 and rs[b + 1] % rs[b] == 0 for b in range(len(ws) - 1)):
        return ws, rs
    return None


def distinct_pairs(N, H, segs, rates, causal) -> int:
    """(head, query, key) pairs linked by at least one branch, for a chain: a pair of branch b whose key lies in
    the query's segment of branch b-1 is also a pair of b-1, so distinct = sum_b pairs(w_b, r_b)
    - sum_{b>0} pairs(w_{b-1}, r_b)."""
    ch = chain(segs, rates)
    if ch is None:
        raise ValueError(f"distinct_pairs counts chains of branches only, got segments {segs}, rates {rates}")
    ws, rs = ch
    total = sum(linked_pairs(N, H, (w,), (r,), causal) for w, r in zip(ws, rs))
    return total - sum(linked_pairs(N, H, (ws[b - 1],), (rs[b],), causal) for b in range(1, len(ws)))


def dense_pairs(N, H, causal) -> int:
    return H * (N * (N + 1) // 2 if causal else N * N)


# --- anchors --------------------------------------------------------------------------------------------------


def _flash_with_lse(q, k, v, causal, scale):
    if q.device.type == "cuda":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, scale=scale)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    return out, lse


def gather_sdpa(q, k, v, segs, rates, causal):
    """Per branch and head offset: strided gather, flash attention, scatter; branches merged by log-sum-exp."""
    B, H, N, D = q.shape
    scale = D ** -0.5
    outs, lses = [], []
    for w, r in zip(segs, rates):
        w = min(w, N)
        if N % w:
            raise ValueError(f"the gather anchor needs N divisible by each segment length, got N={N}, segment {w}")
        nseg = N // w
        out_b = torch.zeros(B, H, N, D, device=q.device, dtype=torch.float32)
        lse_b = torch.full((B, H, N), float("-inf"), device=q.device)
        for o in range(min(r, H)):
            hs = slice(o, H, r)
            nh = len(range(o, H, r))
            sel = lambda x: x[:, hs].reshape(B, nh, nseg, w // r, r, D)[..., o, :].reshape(B, nh * nseg, w // r, D)  # noqa
            ob, lb = _flash_with_lse(sel(q), sel(k), sel(v), causal, scale)
            out_b[:, hs].view(B, nh, nseg, w // r, r, D)[..., o, :] = ob.view(B, nh, nseg, w // r, D).float()
            lse_b[:, hs].view(B, nh, nseg, w // r, r)[..., o] = lb.view(B, nh, nseg, w // r)
        outs.append(out_b)
        lses.append(lse_b.detach())
    lse = torch.logsumexp(torch.stack(lses), 0)
    out = sum(torch.exp(l - lse).nan_to_num(0.0).unsqueeze(-1) * o for o, l in zip(outs, lses))
    return out.to(q.dtype)


def flex_fns(segs, rates, causal):
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
    pattern, from the segment ranges of each block pair in O(nb² · branches), with no token-level mask. Every
    block of ``bs >= max(rates)`` positions holds every residue class, so a block pair is linked by a branch iff
    their segments meet (the same for every head); it is full iff a rate-1 branch links every pair (both blocks
    inside one segment) and no causal or sequence-end mask cuts it."""
    from dilate_compiler import patterns as P

    if bs < max(rates):
        raise ValueError(f"block size {bs} must be at least the largest rate {max(rates)}")
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
    """FlexAttention's BlockMask for the dilated pattern without ``create_block_mask``."""
    from dilate_compiler import patterns as P

    state = dilated_block_state(N, segs, rates, causal, bs, device)[None]
    count, idx, _ = P.block_lists(state, torch.zeros(state.shape, dtype=torch.int32, device=device))
    return flex_block_mask(count[0], idx[0], bs, N, mask_mod)


# --- the run --------------------------------------------------------------------------------------------------


def _args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/out"))
    ap.add_argument("--configs", default="A,B")
    ap.add_argument("--ns", default="16384,65536,262144")
    ap.add_argument("--causal", default="both", choices=("both", "true", "false"))
    ap.add_argument("--methods", default="ours,dense,gather,flex")
    ap.add_argument("--backward", action="store_true", help="also time forward + backward")
    ap.add_argument("--flex-mask", default="from-pattern", choices=("from-pattern", "create"))
    ap.add_argument("--device", default=harness.default_device())
    a = ap.parse_args(argv)
    a.methods = a.methods.split(",")
    unknown = [m for m in a.methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; accepted: {', '.join(METHODS)} (comma-separated)")
    bad = [c for c in a.configs.split(",") if c not in CONFIGS]
    if bad:
        raise SystemExit(f"--configs: unknown {bad}; accepted: {', '.join(CONFIGS)}")
    return a


def _flex(q, k, v, N, causal, a, row, compiled):
    from torch.nn.attention.flex_attention import create_block_mask

    mask_mod, score_mod = flex_fns(SEGS, RATES, causal)
    harness.sync(q.device)
    t0 = time.perf_counter()
    if a.flex_mask == "from-pattern":
        bm = dilated_flex_block_mask(N, SEGS, RATES, causal, mask_mod, device=q.device)
    else:
        bm = create_block_mask(mask_mod, 1, q.shape[1], N, N, device=q.device)
    harness.sync(q.device)
    row["flex_mask_build_s"] = time.perf_counter() - t0
    return lambda: compiled(q, k, v, score_mod=score_mod, block_mask=bm)


def run_case(cfg, causal, N, a, device, dtype, flex_compiled, check_flex) -> dict:
    H, D = CONFIGS[cfg]
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, H, N, D, device=device, dtype=dtype, requires_grad=a.backward) for _ in range(3))
    row = {"config": cfg, "H": H, "D": D, "N": N, "causal": causal,
           "distinct_flop": 4 * D * distinct_pairs(N, H, SEGS, RATES, causal),
           "dense_flop": 4 * D * dense_pairs(N, H, causal)}
    ours = lambda: dc.ops.dilated_attention(q, k, v, SEGS, RATES, is_causal=causal)  # noqa: E731
    fns = {"ours": ours}
    if device.type == "cuda":
        row["ours_forward"] = harness.dilated_forward_taken(q, k, v, SEGS, RATES, causal)
    if "ours-triton" in a.methods and device.type == "cuda":
        fns["ours-triton"] = harness.triton_forward(ours)
    if "ours-compiled" in a.methods:
        compiled = torch.compile(lambda q, k, v: dc.ops.dilated_attention(q, k, v, SEGS, RATES, is_causal=causal),
                                 fullgraph=True, dynamic=False)
        fns["ours-compiled"] = lambda: compiled(q, k, v)
    if "dense" in a.methods:
        harness.add_dense(row, fns, q, k, v, causal)
    if "gather" in a.methods:
        fns["gather"] = lambda: gather_sdpa(q, k, v, SEGS, RATES, causal)
    if "flex" in a.methods:
        fns["flex"] = _flex(q, k, v, N, causal, a, row, flex_compiled)
    with torch.no_grad():          # ours' output stays alive: another method's output can't reuse its memory
        ref = ours()
        for m in ("ours-triton", "ours-compiled"):
            if m in fns:
                row[f"{m}_vs_ours_max_abs"] = (fns[m]() - ref).abs().max().item()
        if "flex" in fns and check_flex:
            ref32 = ref.float()
            row["flex_vs_ours_rel_l2"] = ((fns["flex"]().float() - ref32).norm() / ref32.norm()).item()
        del ref
    harness.time_methods(row, fns, device, backward_inputs=(q, k, v) if a.backward else (), forward_only=("flex",))
    del q, k, v
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def _times_ours(method):
    """An extra column: ``method``'s time over ours (how many times faster ours is)."""
    def cell(row, phase):
        theirs, ours = row.get(f"{method}_{phase}_ms"), row.get(f"ours_{phase}_ms")
        return float("nan") if theirs is None or ours is None else theirs / ours
    return f"× {method}", cell


def summarise(results, rows, methods_timed, backward):
    harness.ceiling_tables(results, rows, methods_timed, backward=backward, labels=("config", "causal", "N"),
                           ours_rates=(("ours TF/s", "distinct_flop"),), share_flop="distinct_flop",
                           extras=(_times_ours("ours-compiled"), _times_ours("gather"), _times_ours("flex")),
                           notes="Ours is credited with the distinct linked pairs (a pair several branches link "
                                 "counts once). × ours-compiled, × gather, × flex: their time / ours (eager).")


def plot(results, rows, methods_timed):
    def draw(plt):
        cfgs = sorted({r["config"] for r in rows})
        fig, axes = plt.subplots(1, len(cfgs), figsize=(5.5 * len(cfgs), 4.2), squeeze=False)
        for ax, cfg in zip(axes[0], cfgs):
            for causal, style in ((False, "-"), (True, "--")):
                sel = [r for r in rows if r["config"] == cfg and r["causal"] == causal]
                for m in methods_timed:
                    pts = [(r["N"], r[f"{m}_fwd_ms"]) for r in sel if f"{m}_fwd_ms" in r]
                    if pts:
                        ax.plot(*zip(*pts), style, marker="o", label=f"{m}{' causal' if causal else ''}")
            H, D = CONFIGS[cfg]
            ax.set_xscale("log", base=2)
            ax.set(yscale="log", xlabel="N (tokens)", ylabel="forward ms",
                   title=f"config {cfg}: H={H}, D={D}")
            ax.legend(fontsize=7)
        fig.tight_layout()
        return fig

    results.plot(draw)


def main(argv=None):
    a = _args(argv)
    device = harness.check_device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.backends.cuda.matmul.allow_tf32 = False
    results = harness.Results("bench_dilated", a.out, harness.environment(device))
    flex_compiled = None
    if "flex" in a.methods:
        from torch.nn.attention.flex_attention import flex_attention

        flex_compiled = torch.compile(flex_attention, dynamic=False)
    causals = {"both": (False, True), "true": (True,), "false": (False,)}[a.causal]
    ns = [int(n) for n in a.ns.split(",")]
    for cfg in a.configs.split(","):
        for causal in causals:
            for N in ns:
                results.row(run_case(cfg, causal, N, a, device, dtype, flex_compiled, check_flex=N == min(ns)))
    rows = results.rows
    timed = [m for m in ("ours", "ours-triton", "ours-compiled", "dense-cudnn", "dense-flash", "dense-cpu",
                         "gather", "flex") if any(f"{m}_fwd_ms" in r for r in rows)]
    summarise(results, rows, timed, a.backward)
    results.write()
    plot(results, rows, timed)
    return rows


if __name__ == "__main__":
    main()
