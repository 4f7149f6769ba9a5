"""What the pair multiplicity costs the causal walk-0 kernel: a copy of its loop (contiguous rows, causal inside
2,048-token segments; config A: H=16, D=64, rates 1..8, bf16, N=256K) timed per tile with the multiplicity bias
``log2 min(k(p - h), k(j - h))`` added as the kernel does (mode 1), without it (mode 0: plain causal flash attention,
a different function, the bound the bias is measured against), and with the keys' counts recomputed per tile
(mode 2). A GPU measurement, not a product path: the kernel itself is ``_dilated_attn_fwd_walk0_kernel``.

    python benchmarks/walk0_multiplicity_cost.py
"""
import torch
import triton
import triton.language as tl
from triton.testing import do_bench

from dilate_compiler.lowering.common.primitives import softmax_step
from dilate_compiler.lowering.dilated.triton import _walk_log2_mult


@triton.jit
def _tiles(acc, m_i, l_i, q, p, lkp, lkj, k_base, v_base, stride_kn, N, lo, hi, qk_scale, h,
           MASK: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MODE: tl.constexpr,
           NUM_BRANCHES: tl.constexpr, RS: tl.constexpr):
    offs_d = tl.arange(0, HEAD_DIM)
    for start in range(lo, hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        if MASK:
            k = tl.load(k_base + j[:, None] * stride_kn + offs_d[None, :], mask=j[:, None] < N, other=0.0)
            v = tl.load(v_base + j[:, None] * stride_kn + offs_d[None, :], mask=j[:, None] < N, other=0.0)
        else:
            k = tl.load(k_base + j[:, None] * stride_kn + offs_d[None, :])
            v = tl.load(v_base + j[:, None] * stride_kn + offs_d[None, :])
        if MODE == 0:
            s = tl.dot(q, tl.trans(k)).to(tl.float32) * qk_scale
        elif MODE == 1:
            s = tl.dot(q, tl.trans(k)).to(tl.float32) * qk_scale + tl.minimum(lkp[:, None], lkj[None, :])
        else:
            lkt = _walk_log2_mult(j - h, j - h, 0, NUM_BRANCHES, RS)
            s = tl.dot(q, tl.trans(k)).to(tl.float32) * qk_scale + tl.minimum(lkp[:, None], lkt[None, :])
        if MASK:
            s = tl.where(j[None, :] <= p[:, None], s, float("-inf"))
        acc, m_i, l_i = softmax_step(acc, m_i, l_i, s, 1.0, v, False)
    return acc, m_i, l_i


@triton.jit
def _kernel(Q, K, V, Out0, Lse0, sm_scale, stride_qb, stride_qh, stride_qn, H, N,
            HEAD_DIM: tl.constexpr, NUM_BRANCHES: tl.constexpr, W0: tl.constexpr, R1: tl.constexpr,
            R2: tl.constexpr, R3: tl.constexpr, MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    RS: tl.constexpr = (1, R1, R2, R3)
    i_bh = tl.program_id(1)
    h = i_bh % H
    r0 = tl.program_id(0) * BLOCK_M
    p = r0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    base = i_bh.to(tl.int64) * stride_qh
    q = tl.load(Q + base + p[:, None] * stride_qn + offs_d[None, :])
    qk_scale = sm_scale * 1.4426950408889634
    s0 = r0 // W0 * W0
    lkp = _walk_log2_mult(p - h, p - h, 0, NUM_BRANCHES, RS)
    lkj = _walk_log2_mult(s0 + tl.arange(0, BLOCK_N) - h, s0 + tl.arange(0, BLOCK_N) - h, 0, NUM_BRANCHES, RS)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, m_i, l_i = _tiles(acc, m_i, l_i, q, p, lkp, lkj, K + base, V + base, stride_qn, N, s0, r0, qk_scale, h,
                           False, BLOCK_N, HEAD_DIM, MODE, NUM_BRANCHES, RS)
    acc, m_i, l_i = _tiles(acc, m_i, l_i, q, p, lkp, lkj, K + base, V + base, stride_qn, N, r0, r0 + BLOCK_M,
                           qk_scale, h, True, BLOCK_N, HEAD_DIM, MODE, NUM_BRANCHES, RS)
    tl.store(Out0 + base + p[:, None] * stride_qn + offs_d[None, :], (acc / l_i[:, None]).to(Out0.dtype.element_ty))
    tl.store(Lse0 + i_bh.to(tl.int64) * N + p, m_i + tl.log2(l_i))


def main():
    H, N, D = 16, 262144, 64
    q, k, v = (torch.randn(1, H, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    o = torch.empty_like(q)
    lse = torch.empty(1, H, N, device="cuda")
    ref = None                                        # mode 1 of the first tile: the others agree to bf16
    for bm, bn, w, st in ((64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 4, 3), (128, 128, 8, 3)):
        for mode in (0, 1, 2):
            f = lambda: _kernel[(N // bm, H)](q, k, v, o, lse, 0.125, *q.stride()[:3], H, N, HEAD_DIM=D,
                                               NUM_BRANCHES=4, W0=2048, R1=2, R2=4, R3=8, MODE=mode, BLOCK_M=bm,
                                               BLOCK_N=bn, num_warps=w, num_stages=st)
            f()
            if mode == 1:
                ref = o.clone() if ref is None else ref
                err = (o.float() - ref.float()).abs().max().item()
            else:
                err = float("nan")
            ms = do_bench(f, warmup=25, rep=100)
            print(f"tile {bm}x{bn} w{w} s{st} mode {mode}: {ms:.3f} ms  (diff vs first mode-1 {err:.2e})", flush=True)


if __name__ == "__main__":
    main()
