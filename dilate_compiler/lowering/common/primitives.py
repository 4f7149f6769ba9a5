"""Triton device code every attention kernel of the project shares: named constants and the online-softmax step.

The kernels keep scores and log-sum-exps in base 2 (``exp2``): a score ``s`` scaled by ``sm_scale * LOG2E``
gives ``exp2(s * sm_scale * LOG2E) == exp(s * sm_scale)``, and a base-2 log-sum-exp times ``LN2`` is the natural
one the ops return. Kernels import these names unqualified, so that Inductor, which re-emits a user-defined
kernel from its source and its helpers' (global ``tl.constexpr`` values included), builds the same kernel.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)   # log2(e) = 1 / ln(2)
LN2 = tl.constexpr(0.6931471805599453)     # ln(2)


@triton.jit
def softmax_weights(m_i, s, qk_scale, ROWS_MAY_BE_EMPTY: tl.constexpr):
    """The online softmax's new row max, the rescale of what came before and the tile's weights (base 2), from
    products ``s`` (``-inf`` where masked) and their scale ``qk_scale > 0`` (1.0: ``s`` is scaled already). The
    row max is taken before scaling, which commutes with it, so a score costs one fused multiply-add for exp2's
    argument; scaled first, it cost a multiply for the max beside that (ptxas kept both), or a multiply and a
    subtraction. ``ROWS_MAY_BE_EMPTY``: a row may have every score of the tile masked (its max is kept
    finite)."""
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    if ROWS_MAY_BE_EMPTY:
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_safe = m_new
    return m_new, tl.exp2(m_i - m_safe), tl.exp2(s * qk_scale - m_safe[:, None])


@triton.jit
def softmax_step(acc, m_i, l_i, s, qk_scale, v, ROWS_MAY_BE_EMPTY: tl.constexpr):
    """One online-softmax step (``softmax_weights``) against values ``v``."""
    m_new, alpha, pr = softmax_weights(m_i, s, qk_scale, ROWS_MAY_BE_EMPTY)
    l_i = l_i * alpha + tl.sum(pr, 1)
    acc = tl.dot(pr.to(v.dtype), v, acc * alpha[:, None])
    return acc, m_new, l_i


@triton.jit
def score_scale(sm_scale):
    """``(sm_scale, qk_scale)``: the softmax scale as float32 (float arguments may arrive as fp64: Inductor types
    Python floats so) and the scale of scores in base 2, ``sm_scale * LOG2E``."""
    sm_scale = tl.cast(sm_scale, tl.float32)
    return sm_scale, sm_scale * LOG2E


@triton.jit
def tanh(x):
    """``tanh(x)`` as ``2 * sigmoid(2x) - 1``: one form for Triton's interpreter and the GPU, exact in the limits
    (``+-1`` for ``|x|`` large, ``-1`` at ``-inf``)."""
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def soft_cap(s2, softcap):
    """Gemma2's soft-capping of base-2 scores ``s2 = s * LOG2E``: ``c * tanh(s / c)`` on the natural scale
    (``c = softcap``), returned in base 2, and its derivative ``1 - tanh(s / c)**2``, the factor a score's
    gradient takes through the cap. Apply it before the masks (``-inf`` would cap to ``-c``)."""
    c2 = tl.cast(softcap, tl.float32) * LOG2E
    t = tanh(s2 / c2)
    return c2 * t, 1.0 - t * t
