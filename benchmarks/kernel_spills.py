"""Registers, spills and pipelining of the kernels' tile spaces, compiled for a GPU target without a GPU (Triton's
compiler and its bundled ptxas; the numbers are for the installed Triton version).

    python benchmarks/kernel_spills.py [--family block-sparse|dilated] [--arch 90] [--kinds fwd,dq,dkdv]
                                       [--n 262144] [--causal]    (dilated kinds: fwd,walk0,dq,dkdv)

Per tile configuration: ptxas registers and spill bytes, shared memory, and the ``async_wait`` counts of the
Triton GPU IR: how many copies may still be in flight at each wait. ``num = 0`` at a loop's top: every copy
issued so far lands before the iteration computes, so tiles are fetched at most one iteration ahead (the block-sparse
loops before their flat form issued those copies at the end of the body, after the compute); ``num = 2`` (3 stages)
keeps copies in flight two iterations ahead.
A tile whose wgmma ptxas serialises (a wait after each HGMMA) is marked with ptxas's reason: C7511, too few
registers for the wgmma pipeline; C7515, a non-wgmma instruction defining accumulator registers.
Specialisation: block-sparse as for the causal sliding window at N (block size 128, D=64, bf16, one head
layout); dilated as config A (H=16, D=64, segments 2048..16384, rates 1..8, ``mixing="lse"``) at N, causal with
``--causal``.
"""

import argparse
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from dilate_compiler.lowering.block_sparse import triton as bt
from dilate_compiler.lowering.dilated import triton as dt



def _jit_fn(kernel):
    """The ``triton.jit`` function under autotuning / heuristics wrappers."""
    while not isinstance(kernel, triton.runtime.JITFunction):
        kernel = kernel.fn
    return kernel


def _runtime_int(v) -> bool:
    """Whether ``v`` is a runtime integer argument ``(type, value)``, not a constexpr (tuples of ints are)."""
    return isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str)


def compile_for(kernel, values: dict, num_warps: int, num_stages: int, arch: int, maxnreg=None):
    """``values``: argument name -> type string ('*bf16', 'fp32'), ('i32', value) or a constexpr value (a tuple of
    ints for the dilated kernels' pattern). Returns (compiled kernel, ptxas report)."""
    fn = _jit_fn(kernel)
    sig, consts, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        v = values[name]
        if isinstance(v, str):
            sig[name] = v
            if v.startswith("*"):
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif _runtime_int(v) and v[1] != 1:               # Triton specialises integers equal to 1 as constants
            sig[name] = v[0]
            if v[1] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name], consts[name] = "constexpr", v[1] if _runtime_int(v) else v
    ck = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", arch, 32),
                        options={"num_warps": num_warps, "num_stages": num_stages, "maxnreg": maxnreg})
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ck.asm["ptx"])
    sm = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    from triton.backends.nvidia.compiler import get_ptxas   # the ptxas this Triton uses for the target

    report = subprocess.run([get_ptxas(arch).path, f"-arch={sm}", "-v", f.name, "-o", os.devnull],
                            capture_output=True, text=True)
    os.unlink(f.name)
    return ck, report.stdout + report.stderr


CONFIG_A = ((2048, 4096, 8192, 16384), (1, 2, 4, 8), "lse")
KERNELS = {"block-sparse": {"fwd": bt._block_sparse_fwd_kernel, "dq": bt._block_sparse_bwd_dq_kernel,
                            "dkdv": bt._block_sparse_bwd_dkdv_kernel},
           "dilated": {"fwd": dt._dilated_attn_fwd_kernel, "walk0": dt._dilated_attn_fwd_walk0_kernel,
                       "dq": dt._dilated_attn_bwd_dq_kernel, "dkdv": dt._dilated_attn_bwd_dkdv_kernel}}


def _strides(n: int, h: int, d: int, tensors: str) -> dict:
    """``stride_{t}{b,h,n}`` of contiguous ``[B, h, n, d]`` tensors, for each letter ``t`` of ``tensors``."""
    return {f"stride_{t}{a}": ("i32", s) for t in tensors for a, s in (("b", h * n * d), ("h", n * d), ("n", d))}


def key_padding_values(key_mask: bool, n: int) -> dict:
    """The key-padding arguments (``common.key_padding``): flags, per-row ranges, their batch stride."""
    return dict(Keep="*i8", KeyRange="*i32", stride_keep=("i32", n if key_mask else 0), KEY_MASK=key_mask)


def softcap_values(softcap: bool) -> dict:
    """The soft-capping arguments: off, ``softcap`` None (specialised away, as the launchers pass it), or on."""
    return dict(softcap="fp32" if softcap else None, SOFTCAP=softcap)


def window_values(n: int, *, key_mask: bool = False, q_lo=None, softcap: bool = False) -> dict:
    """The block-sparse kernels' arguments for the causal sliding window at N = ``n``; ``q_lo``: the first query
    position of a decoding call (q holds the positions from it on), None for self-attention; ``softcap``: the
    scores soft-capped."""
    h, d = 16, 64
    return dict(Q="*bf16", K="*bf16", V="*bf16", Out="*bf16", DO="*bf16", DQ="*bf16", DK="*bf16", DV="*bf16",
                Lse="*fp32", Delta="*fp32", Terms="*i32", Coords="*i32", Rows="*i32", KvCount="*i32", KvIdx="*i32",
                KvBits="*i32", QCount="*i32", QIdx="*i32", QBits="*i32", TileOrder="*i32", sm_scale="fp32",
                H=("i32", h), N=("i32", n), NB=("i32", n // 128), KW=("i32", 34), QW=("i32", 34),
                HEAD_DIM=d, BS=128, IS_CAUSAL=True, GQA=1, PER_HEAD=False, NUM_TERMS=2, CHECKS=3, RAGGED=False,
                PERMUTED=False, Q_LO=None if q_lo is None else ("i32", q_lo), **key_padding_values(key_mask, n),
                **softcap_values(softcap), **_strides(n, h, d, "qkob"))


def dilated_values(n: int, pattern: tuple, causal: bool, kind: str, bm: int, bn: int, *, dropout: int = 0,
                   gqa: int = 1, q_lo: int = 0, drop_thr: int = 0, h: int = 16, d: int = 64,
                   key_mask: bool = False, softcap: bool = False) -> dict:
    """The dilated kernel ``kind``'s arguments for ``pattern`` = (segments, rates, mixing) at N = ``n``, with the
    ``WALKS`` and ``SEEDED`` its launcher would pass for the tile ``bm`` x ``bn`` (``dropout``: the ``DROPOUT``
    constexpr; "walk0": the causal walk-0 kernel; ``softcap``: the scores soft-capped; the forward unsplit,
    ``SPLITS=1``)."""
    segs, rates, mixing = pattern
    meta, _, nested = dt._launch_pattern(segs, rates, mixing, h, 0.1 if dropout else 0.0)
    owner, offset = ("keys", 0) if kind == "dkdv" else ("rows", q_lo)
    walks = dt._walks_over_space(((bm, bn),), owner, nested, meta["WS"][0], meta["L"], offset)
    seeded = kind == "fwd" and dt.walk0_applies(meta, nested, causal, walks)
    return dict(Q="*bf16", K="*bf16", V="*bf16", Out="*bf16", DO="*bf16", DQ="*bf16", DK="*bf16", DV="*bf16",
                Out0="*bf16", Lse0="*fp32", SEEDED=int(seeded), Lse="*fp32", Delta="*fp32", sm_scale="fp32",
                H=("i32", h), N=("i32", n), Q_LO=("i32", q_lo),
                N_Q=("i32", n), out_scale="fp32", Seed="*i64", drop_thr=("i32", drop_thr), HEAD_DIM=d,
                IS_CAUSAL=causal, GQA=gqa, DROPOUT=dropout, WALKS=walks, SPLITS=1, BLOCK_M=bm, BLOCK_N=bn, **meta,
                **key_padding_values(key_mask, n), **softcap_values(softcap), **_strides(n, h, d, "qko"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="block-sparse", choices=("block-sparse", "dilated"))
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--kinds", default="fwd,dq,dkdv")
    ap.add_argument("--n", type=int, default=262144)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--softcap", action="store_true", help="the scores soft-capped (SOFTCAP)")
    a = ap.parse_args()
    kernels = KERNELS[a.family]
    if a.family == "block-sparse":
        space = lambda kind: bt.tile_space("fwd" if kind == "fwd" else "bwd", 128)
    else:
        space = lambda kind: dt.tile_space(kind if kind in ("fwd", "walk0") else "bwd")
    causal = a.causal or a.family == "block-sparse"
    print(f"triton {triton.__version__}, sm_{a.arch}, {a.family}, causal={causal}")
    print("kernel  tile (M, N, warps, stages[, cap])  registers  spill bytes (st/ld)  shared bytes  async_wait nums  "
          "[wgmma serialized: ptxas C7511 registers / C7515 accumulator]")
    for kind in a.kinds.split(","):
        for cfg in space(kind):
            bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
            if a.family == "block-sparse":
                values = window_values(a.n, softcap=a.softcap)
            else:
                values = dilated_values(a.n, CONFIG_A, a.causal, kind, bm, bn, softcap=a.softcap)
            fn = _jit_fn(kernels[kind])
            values = {name: val for name, val in dict(values, BLOCK_M=bm, BLOCK_N=bn).items() if name in fn.arg_names}
            ck, report = compile_for(fn, values, cfg.num_warps, cfg.num_stages, a.arch, cfg.maxnreg)
            regs = re.search(r"Used (\d+) registers", report)
            spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
            waits = re.findall(r"async_wait[^\n]*num = (\d+)", ck.asm["ttgir"])
            tile = (bm, bn, cfg.num_warps, cfg.num_stages) + ((cfg.maxnreg,) if cfg.maxnreg else ())
            print(f"{kind:<7} {str(tile):<27} {regs.group(1) if regs else '?':>9}"
                  f"  {spill.group(1) + '/' + spill.group(2) if spill else '?':>19}  {ck.metadata.shared:>12}"
                  f"  {','.join(waits)}" + "".join(f"  wgmma serialized ({code})" for code in ("C7511", "C7515")
                                                if code in report))


if __name__ == "__main__":
    main()
