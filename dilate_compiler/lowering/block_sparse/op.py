"""``torch.library`` registration of block-sparse attention: schema, fake kernel, autograd, device dispatch.

- ``dilate_compiler::block_sparse_attention_forward(q, k, v, terms, kv_count, kv_idx, kv_bits, q_count, q_idx,
  q_bits, coords, order, checks, block_size, is_causal, scale, key_keep=None, softcap=None) -> (out, lse)``: a
  ``triton_op`` that launches
  the generated Triton kernels on CUDA (fp16/bf16, head dim 32/64/128, layout block size 16..128) and the exact
  PyTorch path elsewhere (the first CUDA call that can't use the kernels logs why). ``checks`` (the bounded
  columns of ``terms``) is a compile-time constant of the kernels. ``order`` (int, ``[N]`` or empty): position
  ``p`` of the layout is row ``order[p]`` of q, k, v, out and lse, i.e. the op equals gathering q, k, v with
  ``order``, attending, and scattering out and lse back; the kernels read through the table with no copy.
  q may hold the last ``Nq`` of k's ``Nk`` positions (decoding; ``order`` empty): the layout is built for Nk,
  the queries read the layout rows of their positions, and the offset ``Nk - Nq`` is read from the shapes.
  In eager mode on compute capability 9.0, a layout of full blocks only (no token mask; block size 128, head dim
  64, not causal) runs the warp-specialised Gluon forward of ``gluon`` instead; a traced call (``torch.compile``,
  export, AOTInductor) becomes ``block_sparse_attention_forward_hopper``, an opaque op that makes the same
  choice when the graph runs (``DILATE_COMPILER_WARP_SPECIALISED=0`` turns it off). The backward is the Triton
  kernels' in both cases.
- ``dilate_compiler::block_sparse_attention_backward(dout, q, k, v, out, lse, <layout>, ...) -> (dq, dk, dv)``.
- ``..._exact`` variants: the exact path as opaque custom ops.

The layout tensors (see ``dilate_compiler.patterns.BlockLayout``) are op inputs, so a compiled graph holds
them as constants and one compiled kernel serves any layout of the same ``checks``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..common import hopper_gluon
from ..common.dispatch import kernels_apply, lse_dtype, value_unsupported_reason
from .eager import block_sparse_backward_eager, block_sparse_forward_eager
from .triton import block_sparse_attn_bwd, block_sparse_attn_fwd, kernel_unsupported_reason, query_offset, tile_order

try:
    from . import gluon
except ImportError as e:   # a Triton without Gluon's Hopper API: the Triton forward runs everywhere
    gluon = None
    _GLUON_MISSING = f"Gluon unavailable ({e})"


def use_kernels(q: Tensor, v: Tensor, block_size: int, softcap: Optional[float] = None) -> bool:
    """True when the Triton kernels run this call."""
    reason = kernel_unsupported_reason(q, block_size, softcap) or value_unsupported_reason(q, v)
    return kernels_apply("block-sparse attention", q, reason)


def warp_specialised_reason(q, k, v, kv_count, block_size: int, is_causal: bool, order,
                            softcap: Optional[float] = None) -> str:
    """Why the warp-specialised Hopper forward (``gluon``) doesn't run this call, or ''."""
    if gluon is None:
        return _GLUON_MISSING
    return gluon.unsupported_reason(q, k, v, kv_count, block_size, is_causal, order, softcap)


@torch.library.custom_op("dilate_compiler::block_sparse_attention_forward_exact", mutates_args=())
def block_sparse_attention_forward_exact(
    q: Tensor, k: Tensor, v: Tensor, terms: Tensor, kv_count: Tensor, kv_idx: Tensor, kv_bits: Tensor,
    q_count: Tensor, q_idx: Tensor, q_bits: Tensor, coords: Tensor, order: Tensor, checks: int, block_size: int,
    is_causal: bool, scale: float, key_keep: Optional[Tensor] = None, softcap: Optional[float] = None,
) -> tuple[Tensor, Tensor]:
    if order.numel() == 0:
        return block_sparse_forward_eager(q, k, v, terms, kv_count, kv_idx, kv_bits, coords, block_size, is_causal,
                                          scale, key_keep, softcap)
    query_offset(q, k, order)   # a permuted layout only with as many queries as keys
    keep = None if key_keep is None else key_keep.index_select(1, order)
    out, lse = block_sparse_forward_eager(*(t.index_select(2, order) for t in (q, k, v)), terms, kv_count, kv_idx,
                                          kv_bits, coords, block_size, is_causal, scale, keep, softcap)
    return _scatter(out, order), _scatter(lse, order)


def _scatter(x: Tensor, order: Tensor) -> Tensor:
    """``y`` with ``y[:, :, order] = x`` (back from layout positions to memory rows)."""
    return torch.empty_like(x).index_copy_(2, order.long(), x)


def _fake_forward(q, k, v, *args):
    B, H, N, _ = q.shape
    return q.new_empty((B, H, N, v.shape[-1])), q.new_empty((B, H, N), dtype=lse_dtype(q.dtype))


block_sparse_attention_forward_exact.register_fake(_fake_forward)


@torch.library.custom_op("dilate_compiler::block_sparse_attention_backward_exact", mutates_args=())
def block_sparse_attention_backward_exact(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, terms: Tensor, kv_count: Tensor,
    kv_idx: Tensor, kv_bits: Tensor, q_count: Tensor, q_idx: Tensor, q_bits: Tensor, coords: Tensor, order: Tensor,
    checks: int, block_size: int, is_causal: bool, scale: float, key_keep: Optional[Tensor] = None,
    softcap: Optional[float] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    if order.numel() == 0:
        return block_sparse_backward_eager(dout, q, k, v, out, lse, terms, kv_count, kv_idx, kv_bits, coords,
                                           block_size, is_causal, scale, key_keep, softcap)
    query_offset(q, k, order)
    keep = None if key_keep is None else key_keep.index_select(1, order)
    grads = block_sparse_backward_eager(*(t.index_select(2, order) for t in (dout, q, k, v, out, lse)), terms,
                                        kv_count, kv_idx, kv_bits, coords, block_size, is_causal, scale, keep,
                                        softcap)
    return tuple(_scatter(g, order) for g in grads)


def _fake_backward(dout, q, k, v, *args):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


block_sparse_attention_backward_exact.register_fake(_fake_backward)


def _warp_specialised(q, k, v, kv_count, kv_idx, scale):
    return gluon.block_sparse_attn_fwd_ws(q, k, v, kv_count, kv_idx,
                                          tile_order(kv_count, kv_count.shape[0], q.shape[0] * q.shape[1]), scale)


@torch.library.custom_op("dilate_compiler::block_sparse_attention_forward_hopper", mutates_args=())
def block_sparse_attention_forward_hopper(
    q: Tensor, k: Tensor, v: Tensor, terms: Tensor, kv_count: Tensor, kv_idx: Tensor, kv_bits: Tensor,
    coords: Tensor, checks: int, block_size: int, scale: float,
) -> tuple[Tensor, Tensor]:
    """What a traced call of ``block_sparse_attention_forward`` becomes where eager mode could run the
    warp-specialised forward (``hopper_gluon.traced``), as an opaque op: when the graph runs, the warp-specialised
    forward for a layout of full blocks only (``gluon.all_blocks_full``), else the Triton forward, as eager mode
    chooses (non-causal, no order, no key padding, no soft-capping: the traced call's checks)."""
    if gluon.all_blocks_full(kv_count):
        return _warp_specialised(q, k, v, kv_count, kv_idx, scale)
    return block_sparse_attn_fwd(q, k, v, terms, kv_count, kv_idx, kv_bits, block_size, False, scale, coords, checks)


@block_sparse_attention_forward_hopper.register_fake
def _(q, k, v, *args):
    B, H, N, _ = q.shape
    return torch.empty_like(q), q.new_empty((B, H, N), dtype=torch.float32)


@torch.library.triton_op("dilate_compiler::block_sparse_attention_forward", mutates_args=())
def block_sparse_attention_forward(
    q: Tensor, k: Tensor, v: Tensor, terms: Tensor, kv_count: Tensor, kv_idx: Tensor, kv_bits: Tensor,
    q_count: Tensor, q_idx: Tensor, q_bits: Tensor, coords: Tensor, order: Tensor, checks: int, block_size: int,
    is_causal: bool, scale: float, key_keep: Optional[Tensor] = None, softcap: Optional[float] = None,
) -> tuple[Tensor, Tensor]:
    if use_kernels(q, v, block_size, softcap):
        # the warp-specialised forward is non-causal: a causal call (every decode step) skips its checks
        if key_keep is None and not is_causal and not warp_specialised_reason(q, k, v, kv_count, block_size,
                                                                              is_causal, order, softcap):
            if hopper_gluon.traced((q, k, v, kv_count)):
                return torch.ops.dilate_compiler.block_sparse_attention_forward_hopper(
                    q, k, v, terms, kv_count, kv_idx, kv_bits, coords, checks, block_size, scale)
            return _warp_specialised(q, k, v, kv_count, kv_idx, scale)
        return block_sparse_attn_fwd(q, k, v, terms, kv_count, kv_idx, kv_bits, block_size, is_causal, scale,
                                     coords, checks, order, key_keep=key_keep, softcap=softcap)
    return torch.ops.dilate_compiler.block_sparse_attention_forward_exact(
        q, k, v, terms, kv_count, kv_idx, kv_bits, q_count, q_idx, q_bits, coords, order, checks, block_size,
        is_causal, scale, key_keep, softcap)


@torch.library.triton_op("dilate_compiler::block_sparse_attention_backward", mutates_args=())
def block_sparse_attention_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, terms: Tensor, kv_count: Tensor,
    kv_idx: Tensor, kv_bits: Tensor, q_count: Tensor, q_idx: Tensor, q_bits: Tensor, coords: Tensor, order: Tensor,
    checks: int, block_size: int, is_causal: bool, scale: float, key_keep: Optional[Tensor] = None,
    softcap: Optional[float] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    if use_kernels(q, v, block_size, softcap):
        return block_sparse_attn_bwd(dout, q, k, v, out, lse, terms, kv_count, kv_idx, kv_bits, q_count, q_idx,
                                     q_bits, coords, order, checks, block_size, is_causal, scale, key_keep=key_keep,
                                     softcap=softcap)
    return torch.ops.dilate_compiler.block_sparse_attention_backward_exact(
        dout, q, k, v, out, lse, terms, kv_count, kv_idx, kv_bits, q_count, q_idx, q_bits, coords, order, checks,
        block_size, is_causal, scale, key_keep, softcap)


def _setup_context(ctx, inputs, output):
    q, k, v, *layout, checks, block_size, is_causal, scale, key_keep, softcap = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_keep, *layout)
    ctx.params = (checks, block_size, is_causal, scale)
    ctx.softcap = softcap
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, key_keep, *layout = ctx.saved_tensors
    dq, dk, dv = torch.ops.dilate_compiler.block_sparse_attention_backward(dout, q, k, v, out, lse, *layout,
                                                                           *ctx.params, key_keep, ctx.softcap)
    return (dq, dk, dv) + (None,) * 15


block_sparse_attention_forward.register_autograd(_backward, setup_context=_setup_context)
