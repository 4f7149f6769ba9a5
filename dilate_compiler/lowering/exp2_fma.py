"""Softmax weights ``exp2(x)`` with a share of them computed on the FMA units instead of the MUFU.

At head dim 64 a flash-attention tile's exp2s (one per score, 16 per clock per SM on the MUFU) take about as long
as its two matrix products, and the forward kernels run the two one after the other. A polynomial on the FMA
units (128 lanes per clock) can take part of the exp2s, as FlashAttention 4 does on Blackwell. Whether that pays
on Hopper is an experiment: ``DILATE_COMPILER_EXP2_ON_FMA`` = k in 1..4 computes k of each ``PACK`` weights of a
thread that way (0, the default: all on the MUFU, ``tl.exp2``). Read when a kernel is launched (the value is
part of the autotuning key), so one process can time several; under ``torch.compile``, when the op is traced.

The polynomial path, per weight, as the PTX below and ``emulate`` (the same steps, in NumPy) run it::

    xc = max.NaN(x, -127)              # -inf -> -127 -> exactly 0; NaN stays NaN
    n  = (xc + 1.5 * 2**23, rounding down) - 1.5 * 2**23        # floor(xc); its integer rides in n's low bits
    f  = xc - floor(xc)                # in [0, 1] (1 only where a tiny negative xc rounds it up)
    e  = 1 + f (c1 + f (c2 + f (c3 + f c4)))                   # 2**f, relative error below 3e-6
    y  = bits(e) + (bits(xc + 1.5 * 2**23) << 23)              # 2**floor(xc) into e's exponent
    y  = fma(xc, 0, y)                 # NaN in, NaN out; otherwise y

Relative error below 3e-6 (the bf16 / fp16 rounding of a weight: 3.9e-3 / 4.9e-4; ``ex2.approx``: about
2e-7). Tiles with fewer than ``PACK * 32 * 8`` scores (fewer than PACK per thread at 8 warps) use the MUFU
for all.
"""

from __future__ import annotations

import os
import struct

import numpy as np
import triton
import triton.language as tl

ENV = "DILATE_COMPILER_EXP2_ON_FMA"
PACK = 8
CHOICES = (0, 1, 2, 3, 4)
# 2**f on [0, 1): 1 + c1 f + ... + c4 f**4, minimax in relative error (3.0e-6 in float32 arithmetic)
POLY = (0.6930448412895203, 0.2412802278995514, 0.05224243924021721, 0.013426707126200199)
MAGIC = 12582912.0   # 1.5 * 2**23: x + MAGIC rounded down has floor(x) in its low mantissa bits, for |x| < 2**22
MIN_X = -127.0       # 2**-127 with an exponent field of 0: exactly 0 after the exponent add


def _f32(v: float) -> str:
    """A float32 constant in PTX hex notation."""
    return "0f" + struct.pack(">f", v).hex().upper()


def _poly_ptx(out: str, inp: str) -> str:
    """PTX computing ``out = exp2(inp)`` by the polynomial (module docstring), in a scope of its own."""
    c1, c2, c3, c4 = (_f32(c) for c in POLY)
    return "\n".join((
        "{",
        ".reg .f32 xc, xr, xn, f, e, y;",
        ".reg .b32 ib, eb, yb;",
        f"max.NaN.f32 xc, {inp}, {_f32(MIN_X)};",
        f"add.rm.f32 xr, xc, {_f32(MAGIC)};",
        f"sub.f32 xn, xr, {_f32(MAGIC)};",
        "sub.f32 f, xc, xn;",
        f"fma.rn.f32 e, f, {c4}, {c3};",
        f"fma.rn.f32 e, e, f, {c2};",
        f"fma.rn.f32 e, e, f, {c1};",
        f"fma.rn.f32 e, e, f, {_f32(1.0)};",
        "mov.b32 ib, xr;",
        "shl.b32 ib, ib, 23;",
        "mov.b32 eb, e;",
        "add.s32 yb, ib, eb;",
        "mov.b32 y, yb;",
        f"fma.rn.f32 {out}, xc, {_f32(0.0)}, y;",
        "}",
    ))


def ptx(on_fma: int) -> str:
    """Inline PTX for ``PACK`` weights (outputs ``$0..``, inputs ``$PACK..``): the first ``on_fma`` by the
    polynomial, the rest by ``ex2.approx.ftz.f32`` (what ``tl.exp2`` runs on float32)."""
    if on_fma not in CHOICES[1:]:
        raise ValueError(f"on_fma must be one of {CHOICES[1:]}, got {on_fma!r}")
    lines = [_poly_ptx(f"${i}", f"${PACK + i}") for i in range(on_fma)]
    lines += [f"ex2.approx.ftz.f32 ${i}, ${PACK + i};" for i in range(on_fma, PACK)]
    return "\n".join(lines)


def emulate(x: np.ndarray) -> np.ndarray:
    """The polynomial path's steps on float32 ``x``, in NumPy (float32 rounding to nearest after each step;
    a fused multiply-add rounds once: its product is exact in float64)."""
    x = np.asarray(x, dtype=np.float32)
    with np.errstate(invalid="ignore"):
        xc = np.where(np.isnan(x), x, np.maximum(x, np.float32(MIN_X))).astype(np.float32)
        n = np.floor(xc.astype(np.float64))                            # add.rm then sub: exact for |xc| < 2**22
        xr = (n + MAGIC).astype(np.float32)
        f = (xc.astype(np.float64) - n).astype(np.float32)
        e = np.float32(POLY[3])
        for c in (POLY[2], POLY[1], POLY[0], 1.0):
            e = (e.astype(np.float64) * f.astype(np.float64) + np.float64(np.float32(c))).astype(np.float32)
        bits = (xr.view(np.uint32) << np.uint32(23)) + e.view(np.uint32)
        y = bits.view(np.float32)
        return (xc.astype(np.float64) * 0.0 + y.astype(np.float64)).astype(np.float32)


def from_env(interpret: bool) -> int:
    """``DILATE_COMPILER_EXP2_ON_FMA`` as the kernels' ``EXP2_ON_FMA`` constexpr (0 when unset)."""
    raw = os.environ.get(ENV, "0")
    if raw.strip() not in tuple(str(c) for c in CHOICES):
        raise ValueError(f"{ENV} must be one of {', '.join(str(c) for c in CHOICES)} (how many of each {PACK} "
                         f"softmax weights take exp2 on the FMA units), got {raw!r}")
    value = int(raw)
    if value and interpret:
        raise ValueError(f"{ENV}={raw} runs inline PTX, which TRITON_INTERPRET=1 cannot; unset it or set it to 0")
    return value


_ASM_1 = tl.constexpr(ptx(1))
_ASM_2 = tl.constexpr(ptx(2))
_ASM_3 = tl.constexpr(ptx(3))
_ASM_4 = tl.constexpr(ptx(4))
_CONSTRAINTS = tl.constexpr(",".join(["=r"] * PACK + ["r"] * PACK))


@triton.jit
def exp2_weights(x, ON_FMA: tl.constexpr):
    """``exp2(x)`` of a float32 score tile, ``ON_FMA`` of each 8 per thread by the polynomial (module
    docstring); all by ``tl.exp2`` when ``ON_FMA`` is 0 or the tile has fewer than 2048 elements."""
    if ON_FMA == 0 or x.shape[0] * x.shape[1] < 2048:
        y = tl.exp2(x)
    elif ON_FMA == 1:
        y = tl.inline_asm_elementwise(_ASM_1, _CONSTRAINTS, [x], tl.float32, True, 8)
    elif ON_FMA == 2:
        y = tl.inline_asm_elementwise(_ASM_2, _CONSTRAINTS, [x], tl.float32, True, 8)
    elif ON_FMA == 3:
        y = tl.inline_asm_elementwise(_ASM_3, _CONSTRAINTS, [x], tl.float32, True, 8)
    else:
        tl.static_assert(ON_FMA == 4)
        y = tl.inline_asm_elementwise(_ASM_4, _CONSTRAINTS, [x], tl.float32, True, 8)
    return y
