"""``torch.library`` registration of dilated attention: schema, fake kernel, autograd.

Two ops, so graphs (Dynamo, export, AOTInductor) hold them as single nodes:

- ``dilate_compiler::dilated_attention_forward(q, k, v, attn_mask, segment_lengths, dilation_rates,
  is_causal, scale, mixing, dropout_p, seed) -> (out, lse)``
- ``dilate_compiler::dilated_attention_backward(dout, q, k, v, attn_mask, out, lse, ...) -> (dq, dk, dv)``

The pattern (segments, rates, mixing) is an op argument, so it is a compile-time constant of any graph.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..strategies.dilated import Dilated
from .dilated_eager import dilated_attention_backward_eager, dilated_attention_forward_eager


def _plan(segment_lengths, dilation_rates, mixing, seq_len, num_heads):
    return Dilated(tuple(segment_lengths), tuple(dilation_rates), mixing).plan(seq_len, num_heads)


def _seed(seed: Optional[Tensor]) -> int:
    return 0 if seed is None else int(seed.item())


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.custom_op("dilate_compiler::dilated_attention_forward", mutates_args=())
def dilated_attention_forward(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], segment_lengths: list[int],
    dilation_rates: list[int], is_causal: bool, scale: float, mixing: str, dropout_p: float,
    seed: Optional[Tensor],
) -> tuple[Tensor, Tensor]:
    plan = _plan(segment_lengths, dilation_rates, mixing, q.shape[2], q.shape[1])
    return dilated_attention_forward_eager(
        q, k, v, plan, is_causal=is_causal, scale=scale, attn_mask=attn_mask, dropout_p=dropout_p,
        seed=_seed(seed),
    )


@dilated_attention_forward.register_fake
def _(q, k, v, attn_mask, segment_lengths, dilation_rates, is_causal, scale, mixing, dropout_p, seed):
    B, H, N, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(
        (B, H, N), dtype=lse_dtype(q.dtype))


@torch.library.custom_op("dilate_compiler::dilated_attention_backward", mutates_args=())
def dilated_attention_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], out: Tensor, lse: Tensor,
    segment_lengths: list[int], dilation_rates: list[int], is_causal: bool, scale: float, mixing: str,
    dropout_p: float, seed: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor]:
    plan = _plan(segment_lengths, dilation_rates, mixing, q.shape[2], q.shape[1])
    return dilated_attention_backward_eager(
        dout, q, k, v, out, lse, plan, is_causal=is_causal, scale=scale, attn_mask=attn_mask,
        dropout_p=dropout_p, seed=_seed(seed),
    )


@dilated_attention_backward.register_fake
def _(dout, q, k, v, attn_mask, out, lse, segment_lengths, dilation_rates, is_causal, scale, mixing,
      dropout_p, seed):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    q, k, v, attn_mask, segment_lengths, dilation_rates, is_causal, scale, mixing, dropout_p, seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, attn_mask, out, lse, seed)
    ctx.params = (list(segment_lengths), list(dilation_rates), is_causal, scale, mixing, dropout_p)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    if ctx.needs_input_grad[3]:
        raise NotImplementedError(
            "dilated attention: gradients with respect to attn_mask (a learned attention bias) are not implemented")
    q, k, v, attn_mask, out, lse, seed = ctx.saved_tensors
    segment_lengths, dilation_rates, is_causal, scale, mixing, dropout_p = ctx.params
    dq, dk, dv = torch.ops.dilate_compiler.dilated_attention_backward(
        dout, q, k, v, attn_mask, out, lse, segment_lengths, dilation_rates, is_causal, scale, mixing,
        dropout_p, seed,
    )
    return dq, dk, dv, None, None, None, None, None, None, None, None


dilated_attention_forward.register_autograd(_backward, setup_context=_setup_context)
