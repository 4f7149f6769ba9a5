"""``torch.library`` registration of dilated attention: schema, fake kernel, autograd, device dispatch.

Ops (graphs from Dynamo, export and AOTInductor hold them as single nodes):

- ``dilate_compiler::dilated_attention_forward(q, k, v, attn_mask, segment_lengths, dilation_rates,
  is_causal, scale, mixing, dropout_p, seed, key_keep=None, softcap=None, head_offsets="interleaved")
  -> (out, lse)`` — a ``triton_op``: on
  CUDA it launches the generated Triton kernels through ``wrap_triton`` (so Inductor inlines them into its output
  code); where the kernels don't apply (CPU, other head dims or dtypes, masks, soft-capping) it calls the exact
  path. On compute capability 9.0 a call the warp-specialised forward takes (``gluon``) runs it: directly in
  eager mode, through ``dilated_attention_forward_hopper`` in a traced graph, so compiled and eager calls run the
  same forward. q may hold fewer
  rows than k (``Nq < Nk``): the last Nq key positions (decoding); the offset ``Nk - Nq`` is read from the
  shapes, so the schema has no argument for it.
- ``dilate_compiler::dilated_attention_backward(dout, q, k, v, attn_mask, out, lse, ...) -> (dq, dk, dv)``,
  dispatched the same way.
- ``dilate_compiler::dilated_attention_{forward,backward}_exact``: the exact PyTorch path, opaque custom ops.
- ``dilate_compiler::dilated_attention_forward_hopper(q, k, v, segment_lengths, dilation_rates, scale)``: the
  warp-specialised forward, an opaque custom op.

The pattern (segments, rates, mixing, head offsets) is an op argument, so it is a compile-time constant of any graph.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..common import hopper_gluon
from ..common.dispatch import kernels_apply, lse_dtype, value_unsupported_reason
from .eager import (dilated_attention_backward_eager, dilated_attention_forward_eager,
                    dilated_attention_mask_grad_eager, with_key_keep)
from .plan import dilated_plan, offsets_coincide
from .triton import dilated_attn_bwd, dilated_attn_fwd, kernel_unsupported_reason

try:
    from . import gluon
except ImportError as e:   # a Triton without Gluon's Hopper API: the Triton forward runs everywhere
    gluon = None
    _GLUON_MISSING = f"Gluon unavailable ({e})"


def _seed(seed: Optional[Tensor]) -> int:
    return 0 if seed is None else int(seed.item())


def use_kernels(q: Tensor, v: Tensor, attn_mask, dropout_p: float, num_branches: int,
                softcap: Optional[float] = None) -> bool:
    """True when the Triton kernels run this call."""
    reason = (kernel_unsupported_reason(q, attn_mask, dropout_p, num_branches, softcap)
              or value_unsupported_reason(q, v))
    return kernels_apply("dilated attention", q, reason)


def warp_specialised_reason(q, k, v, attn_mask, segment_lengths, dilation_rates, is_causal: bool, mixing: str,
                            dropout_p: float, softcap: Optional[float] = None,
                            head_offsets: str = "interleaved") -> str:
    """Why the warp-specialised Hopper forward (``gluon``) doesn't run this call, or ''."""
    if gluon is None:
        return _GLUON_MISSING
    if head_offsets != "interleaved" and not offsets_coincide(dilation_rates, q.shape[1]):
        return (f"head_offsets={head_offsets!r} with rates {tuple(dilation_rates)} over {q.shape[1]} heads (the "
                f"warp-specialised forward walks nested branches, which need offsets h % r)")
    return gluon.unsupported_reason(q, k, v, attn_mask, segment_lengths, dilation_rates, is_causal=is_causal,
                                    mixing=mixing, dropout_p=dropout_p, softcap=softcap)


# --- the exact path ----------------------------------------------------------------------------------------


@torch.library.custom_op("dilate_compiler::dilated_attention_forward_exact", mutates_args=())
def dilated_attention_forward_exact(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], segment_lengths: list[int],
    dilation_rates: list[int], is_causal: bool, scale: float, mixing: str, dropout_p: float,
    seed: Optional[Tensor], key_keep: Optional[Tensor] = None, softcap: Optional[float] = None,
    head_offsets: str = "interleaved",
) -> tuple[Tensor, Tensor]:
    plan = dilated_plan(segment_lengths, dilation_rates, mixing, k.shape[2], q.shape[1], head_offsets)
    return dilated_attention_forward_eager(
        q, k, v, plan, is_causal=is_causal, scale=scale, attn_mask=with_key_keep(attn_mask, key_keep),
        dropout_p=dropout_p, seed=_seed(seed), softcap=softcap,
    )


@dilated_attention_forward_exact.register_fake
def _(q, k, v, attn_mask, segment_lengths, dilation_rates, is_causal, scale, mixing, dropout_p, seed, key_keep=None,
      softcap=None, head_offsets="interleaved"):
    B, H, N, _ = q.shape
    return q.new_empty((B, H, N, v.shape[-1])), q.new_empty((B, H, N), dtype=lse_dtype(q.dtype))


@torch.library.custom_op("dilate_compiler::dilated_attention_backward_exact", mutates_args=())
def dilated_attention_backward_exact(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], out: Tensor, lse: Tensor,
    segment_lengths: list[int], dilation_rates: list[int], is_causal: bool, scale: float, mixing: str,
    dropout_p: float, seed: Optional[Tensor], key_keep: Optional[Tensor] = None, softcap: Optional[float] = None,
    head_offsets: str = "interleaved",
) -> tuple[Tensor, Tensor, Tensor]:
    plan = dilated_plan(segment_lengths, dilation_rates, mixing, k.shape[2], q.shape[1], head_offsets)
    return dilated_attention_backward_eager(
        dout, q, k, v, out, lse, plan, is_causal=is_causal, scale=scale, attn_mask=with_key_keep(attn_mask, key_keep),
        dropout_p=dropout_p, seed=_seed(seed), softcap=softcap,
    )


@dilated_attention_backward_exact.register_fake
def _(dout, q, k, v, attn_mask, out, lse, segment_lengths, dilation_rates, is_causal, scale, mixing,
      dropout_p, seed, key_keep=None, softcap=None, head_offsets="interleaved"):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


# --- the warp-specialised forward in a traced graph -----------------------------------------------------


@torch.library.custom_op("dilate_compiler::dilated_attention_forward_hopper", mutates_args=())
def dilated_attention_forward_hopper(q: Tensor, k: Tensor, v: Tensor, segment_lengths: list[int],
                                     dilation_rates: list[int], scale: float) -> tuple[Tensor, Tensor]:
    """The warp-specialised forward (``gluon.dilated_attn_fwd_ws``) as an opaque op: what a traced call of
    ``dilated_attention_forward`` becomes where eager mode would run that forward (``hopper_gluon.traced``), so
    compiled graphs and AOTInductor packages launch it when they run."""
    return gluon.dilated_attn_fwd_ws(q, k, v, segment_lengths, dilation_rates, scale=scale)


@dilated_attention_forward_hopper.register_fake
def _(q, k, v, segment_lengths, dilation_rates, scale):
    B, H, N, _ = q.shape
    return torch.empty_like(q), q.new_empty((B, H, N), dtype=torch.float32)


# --- the dispatching ops -----------------------------------------------------------------------------------


@torch.library.custom_op("dilate_compiler::dilated_attention_mask_grad_exact", mutates_args=())
def dilated_attention_mask_grad_exact(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor, out: Tensor, lse: Tensor,
    segment_lengths: list[int], dilation_rates: list[int], is_causal: bool, scale: float, mixing: str,
    dropout_p: float, seed: Optional[Tensor], key_keep: Optional[Tensor] = None, softcap: Optional[float] = None,
    head_offsets: str = "interleaved",
) -> Tensor:
    plan = dilated_plan(segment_lengths, dilation_rates, mixing, k.shape[2], q.shape[1], head_offsets)
    return dilated_attention_mask_grad_eager(
        dout, q, k, v, out, lse, plan, is_causal=is_causal, scale=scale, attn_mask=attn_mask,
        dropout_p=dropout_p, seed=_seed(seed), key_keep=key_keep, softcap=softcap,
    )


@dilated_attention_mask_grad_exact.register_fake
def _(dout, q, k, v, attn_mask, out, lse, segment_lengths, dilation_rates, is_causal, scale, mixing, dropout_p,
      seed, key_keep=None, softcap=None, head_offsets="interleaved"):
    return torch.empty_like(attn_mask, memory_format=torch.contiguous_format)


@torch.library.triton_op("dilate_compiler::dilated_attention_forward", mutates_args=())
def dilated_attention_forward(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], segment_lengths: list[int],
    dilation_rates: list[int], is_causal: bool, scale: float, mixing: str, dropout_p: float,
    seed: Optional[Tensor], key_keep: Optional[Tensor] = None, softcap: Optional[float] = None,
    head_offsets: str = "interleaved",
) -> tuple[Tensor, Tensor]:
    if use_kernels(q, v, attn_mask, dropout_p, len(segment_lengths), softcap):
        # the warp-specialised forward is non-causal: a causal call (every decode step) skips its checks
        if key_keep is None and not is_causal and not warp_specialised_reason(
                q, k, v, attn_mask, segment_lengths, dilation_rates, is_causal, mixing, dropout_p, softcap,
                head_offsets):
            if hopper_gluon.traced((q, k, v)):
                return torch.ops.dilate_compiler.dilated_attention_forward_hopper(q, k, v, segment_lengths,
                                                                                  dilation_rates, scale)
            return gluon.dilated_attn_fwd_ws(q, k, v, segment_lengths, dilation_rates, scale=scale)
        return dilated_attn_fwd(q, k, v, segment_lengths, dilation_rates, is_causal=is_causal, scale=scale,
                                mixing=mixing, dropout_p=dropout_p, seed=seed, q_offset=k.shape[2] - q.shape[2],
                                key_keep=key_keep, softcap=softcap,
                                head_offsets=head_offsets)
    return torch.ops.dilate_compiler.dilated_attention_forward_exact(
        q, k, v, attn_mask, segment_lengths, dilation_rates, is_causal, scale, mixing, dropout_p, seed, key_keep,
        softcap, head_offsets)


@torch.library.triton_op("dilate_compiler::dilated_attention_backward", mutates_args=())
def dilated_attention_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], out: Tensor, lse: Tensor,
    segment_lengths: list[int], dilation_rates: list[int], is_causal: bool, scale: float, mixing: str,
    dropout_p: float, seed: Optional[Tensor], key_keep: Optional[Tensor] = None, softcap: Optional[float] = None,
    head_offsets: str = "interleaved",
) -> tuple[Tensor, Tensor, Tensor]:
    if use_kernels(q, v, attn_mask, dropout_p, len(segment_lengths), softcap):
        return dilated_attn_bwd(dout, q, k, v, out, lse, segment_lengths, dilation_rates, is_causal=is_causal,
                                scale=scale, mixing=mixing, dropout_p=dropout_p, seed=seed,
                                q_offset=k.shape[2] - q.shape[2], key_keep=key_keep, softcap=softcap,
                                head_offsets=head_offsets)
    return torch.ops.dilate_compiler.dilated_attention_backward_exact(
        dout, q, k, v, attn_mask, out, lse, segment_lengths, dilation_rates, is_causal, scale, mixing, dropout_p,
        seed, key_keep, softcap, head_offsets)


def _setup_context(ctx, inputs, output):
    (q, k, v, attn_mask, segment_lengths, dilation_rates, is_causal, scale, mixing, dropout_p, seed, key_keep,
     softcap, head_offsets) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, attn_mask, out, lse, seed, key_keep)
    ctx.params = (list(segment_lengths), list(dilation_rates), is_causal, scale, mixing, dropout_p, head_offsets)
    ctx.softcap = softcap
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, attn_mask, out, lse, seed, key_keep = ctx.saved_tensors
    segment_lengths, dilation_rates, is_causal, scale, mixing, dropout_p, head_offsets = ctx.params
    args = (dout, q, k, v, attn_mask, out, lse, segment_lengths, dilation_rates, is_causal, scale, mixing, dropout_p,
            seed, key_keep, ctx.softcap, head_offsets)
    dq, dk, dv = torch.ops.dilate_compiler.dilated_attention_backward(*args)
    dmask = None
    if ctx.needs_input_grad[3]:   # a learned bias: masks run the exact path, which gives its gradient too
        dmask = torch.ops.dilate_compiler.dilated_attention_mask_grad_exact(*args)
    return dq, dk, dv, dmask, None, None, None, None, None, None, None, None, None, None


dilated_attention_forward.register_autograd(_backward, setup_context=_setup_context)
