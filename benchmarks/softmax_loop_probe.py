"""Which form of flash attention's inner loop is fastest in Triton on this GPU? A probe on plain (dense,
non-causal) attention, outside the project's kernels.

    python benchmarks/softmax_loop_probe.py [--n 65536] [--heads 16] [--forms "in order,pipelined,lazy rescale"]
        [--tiles 128x128/4w/3s,128x128/8w/2s,128x64/4w/3s,128x64/8w/3s,64x64/4w/3s]

Three forms of the same loop (``FORMS``), each over tiles of the block-sparse forward's space (``--tiles``):
- ``in order``: load K/V, S = Q K^T, softmax weights, acc += P V (what the project's kernels do, by their
  ``softmax_step``). Triton waits for each matrix product before the next step, so at head dim 64 the MMAs and
  the exp2s (MUFU) run one after the other.
- ``pipelined``: S of the next tile is issued before the softmax of this one (a prologue computes the first S,
  an epilogue finishes the last tile). In the SASS (Triton 3.6, sm_90a) the next tile's HGMMAs and the previous
  tile's P @ V interleave with this tile's MUFUs, at the price of the registers of a second S tile
  (128 x 128 with 8 warps: 156 -> 255 registers, no spill; 128 x 128 with 4 warps spills ~1 KB).
- ``lazy rescale``: in order, but the running max (and with it acc and l) moves only when some row of the tile
  has risen by more than 2^8 (FlashAttention 4's rule): most tiles skip acc's rescale, at the price of a
  reduction across the tile's rows per tile. Exact: the weights are then at most 2^8, and acc / l is the same.
Prints TFLOP/s per (tile, form) beside flash SDPA's, and each output's max difference from SDPA's;
``tests/lowering/test_softmax_loop_probe.py`` checks every form against float64 under the interpreter.
Measured results: RESULTS.md.
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl

from dilate_compiler.lowering.dilated_triton import softmax_step


FORMS = ("in order", "pipelined", "lazy rescale")
LAZY_RESCALE_LOG2 = 8.0   # the lazy form rescales once some row's max has risen by more than this (2^8), as FA4


@triton.jit
def _rows_at(base, rows, HEAD_DIM: tl.constexpr):
    """Rows ``rows`` of a contiguous ``[N, HEAD_DIM]`` matrix at ``base``."""
    return tl.load(base + rows[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :])


@triton.jit
def _probe_kernel(Q, K, V, Out, N, sm_scale, FORM: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, TAU: tl.constexpr):
    """Dense attention of ``BLOCK_M`` rows of head ``program_id(1)`` over all ``N`` keys (``N`` a multiple of both
    blocks), contiguous ``[H, N, HEAD_DIM]`` tensors, in the loop form ``FORMS[FORM]``."""
    base = tl.program_id(1).to(tl.int64) * N * HEAD_DIM
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    q = _rows_at(Q + base, rows, HEAD_DIM)
    k_base, v_base = K + base, V + base
    qk_scale = sm_scale * 1.4426950408889634
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if FORM == 1:
        s = tl.dot(q, tl.trans(_rows_at(k_base, offs_n, HEAD_DIM))).to(tl.float32)
        for start in range(0, N - BLOCK_N, BLOCK_N):
            j = start + offs_n
            k_next = _rows_at(k_base, j + BLOCK_N, HEAD_DIM)
            v = _rows_at(v_base, j, HEAD_DIM)
            s_next = tl.dot(q, tl.trans(k_next)).to(tl.float32)       # issued before this tile's softmax
            acc, m_i, l_i = softmax_step(acc, m_i, l_i, s, qk_scale, v, False)
            s = s_next
        acc, m_i, l_i = softmax_step(acc, m_i, l_i, s, qk_scale, _rows_at(v_base, N - BLOCK_N + offs_n, HEAD_DIM),
                                     False)
    else:
        for start in range(0, N, BLOCK_N):
            j = start + offs_n
            k = _rows_at(k_base, j, HEAD_DIM)
            v = _rows_at(v_base, j, HEAD_DIM)
            s = tl.dot(q, tl.trans(k)).to(tl.float32)
            if FORM == 2:
                # the running max, and with it acc and l, move only when some row's max rose by more than TAU
                # (the first tile: from -inf); the weights are then at most 2^TAU
                m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
                if tl.max(m_new - m_i, 0) > TAU:
                    alpha = tl.exp2(m_i - m_new)
                    acc = acc * alpha[:, None]
                    l_i = l_i * alpha
                    m_i = m_new
                p = tl.exp2(s * qk_scale - m_i[:, None])
                l_i = l_i + tl.sum(p, 1)
                acc = tl.dot(p.to(v.dtype), v, acc)
            else:
                acc, m_i, l_i = softmax_step(acc, m_i, l_i, s, qk_scale, v, False)
    offs_d = tl.arange(0, HEAD_DIM)
    tl.store(Out + base + rows[:, None] * HEAD_DIM + offs_d[None, :], (acc / l_i[:, None]).to(Out.dtype.element_ty))


def probe_attention(q, k, v, form: str, block_m: int, block_n: int, num_warps: int = 4, num_stages: int = 1,
                    tau: float = LAZY_RESCALE_LOG2, maxnreg=None):
    """``[H, N, D]`` contiguous q, k, v -> dense softmax(q k^T / sqrt(D)) v by ``_probe_kernel`` in loop form
    ``form`` (one of ``FORMS``)."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    H, N, D = q.shape
    if N % block_m or N % block_n:
        raise ValueError(f"N ({N}) must be a multiple of block_m ({block_m}) and block_n ({block_n})")
    out = torch.empty_like(q)
    _probe_kernel[(N // block_m, H)](q, k, v, out, N, D ** -0.5, FORM=FORMS.index(form), HEAD_DIM=D,
                                    BLOCK_M=block_m, BLOCK_N=block_n, TAU=tau, num_warps=num_warps,
                                    num_stages=num_stages, maxnreg=maxnreg)
    return out


def main():
    from autotune_timings import tile_name   # benchmarks/, beside this script
    from dilate_compiler.lowering.block_sparse_triton import tile_space

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=65536)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--forms", default=",".join(FORMS))
    ap.add_argument("--tiles", default="128x128/4w/3s,128x128/8w/2s,128x64/4w/3s,128x64/8w/3s,64x64/4w/3s")
    a = ap.parse_args()
    tiles = {tile_name(c): c for c in tile_space("fwd", 128)}
    unknown = [t for t in a.tiles.split(",") if t not in tiles]
    if unknown:
        raise ValueError(f"--tiles: {unknown} not in the block-sparse forward space {sorted(tiles)}")
    D = 64
    q, k, v = (torch.randn(a.heads, a.n, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    flop = 4 * D * a.heads * a.n * a.n
    ref = torch.nn.functional.scaled_dot_product_attention(q[None], k[None], v[None])[0]
    sdpa = triton.testing.do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(q[None], k[None],
                                                                                          v[None]),
                                   warmup=50, rep=200, return_mode="median")
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}; H={a.heads} "
          f"N={a.n} D={D} bf16, dense non-causal; flash SDPA {sdpa:.3f} ms ({flop / sdpa / 1e9:.0f} TFLOP/s)")
    forms = a.forms.split(",")
    for cfg in (tiles[t] for t in a.tiles.split(",")):
        bm, bn, w, st = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_warps, cfg.num_stages
        cells = []
        for form in forms:
            fn = lambda: probe_attention(q, k, v, form, bm, bn, w, st, maxnreg=cfg.maxnreg)
            diff = (fn().float() - ref.float()).abs().max().item()
            ms = triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median")
            cells.append(f"{form} {ms:8.3f} ms {flop / ms / 1e9:5.0f} TF/s (max diff {diff:.1e})")
        print(f"{tile_name(cfg)}: " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
