"""Rows that keep no key, where the model's softmax is uniform: their value over the whole sharded sequence.

A model that drops keys by adding one large finite value (transformers' eager attention adds ``finfo.min``) gives a
query row that keeps no key (a left-padding row under a causal mask) the uniform softmax over *every* key: the row
is the mean of v over the whole sequence, and autograd carries the uniform softmax's gradient to q and k
(``passes.rewrite_attention._uniform_row_gradient`` says how). On a sequence shard those sums run over every
rank's keys: each rank sums its shard, and one all-reduce (``all_reduce_sum``, differentiable: its backward
all-reduces the gradient) gives the whole sequence's::

    v̄ = Σ_ranks Σ_j v_j / N          M = Σ_ranks Kᵀ (V - v̄) / N          M' = Σ_ranks (K - sg K)ᵀ (V - v̄) / N
    fill = v̄ + scale · ((q - sg q) M + sg(q) M')          (sg: stop-gradient; M' and the q terms are 0 in value)
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from . import comm

A = torch.ops.aten


@torch.library.custom_op("dilate_compiler::sequence_parallel_all_reduce", mutates_args=())
def all_reduce_sum(x: Tensor, config: str) -> Tensor:
    """The sum of ``x`` over the ranks of the process group registered under ``config`` (a new tensor)."""
    from .sequence_parallel import _CONFIGS

    group, _, world = comm.resolve_group(_CONFIGS[config].group)
    out = x.clone(memory_format=torch.contiguous_format)
    if world > 1:
        dist.all_reduce(out, group=group)
        moved = 2 * (world - 1) * out.numel() * out.element_size() // world   # what a ring all-reduce moves
        comm._record("reduce", moved, moved, 2 * (world - 1))
    return out


@all_reduce_sum.register_fake
def _(x, config):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _all_reduce_backward(ctx, grad):
    return torch.ops.dilate_compiler.sequence_parallel_all_reduce(grad.contiguous(), ctx.config), None


def _all_reduce_setup(ctx, inputs, output):
    ctx.config = inputs[1]


all_reduce_sum.register_autograd(_all_reduce_backward, setup_context=_all_reduce_setup)


def emit_uniform_rows(emit, q, k, v, scale: float, gqa: int, seq_len: int, config: str):
    """Graph nodes of ``fill [B, Hq, S, Dv]`` (module docstring) for shards q ``[B, Hq, S, D]``, k/v
    ``[B, Hkv, S, D]`` of a ``seq_len``-token sequence, summed over the group registered under ``config``."""
    reduce = torch.ops.dilate_compiler.sequence_parallel_all_reduce.default
    v_bar = emit(A.div.Scalar, (emit(reduce, (emit(A.sum.dim_IntList, (v, [-2], True)), config)), seq_len))
    centred = emit(A.sub.Tensor, (v, v_bar))
    k_moving = emit(A.sub.Tensor, (k, emit(A.detach.default, (k,))))
    both = emit(A.stack.default, ([emit(A.matmul.default, (emit(A.transpose.int, (t, -1, -2)), centred))
                                   for t in (k, k_moving)],))
    both = emit(A.div.Scalar, (emit(reduce, (both, config)), seq_len))
    m, m2 = emit(A.select.int, (both, 0, 0)), emit(A.select.int, (both, 0, 1))
    if gqa > 1:
        v_bar, m, m2 = (emit(A.repeat_interleave.self_int, (t, gqa, 1)) for t in (v_bar, m, m2))
    q_still = emit(A.detach.default, (q,))
    q_moving = emit(A.sub.Tensor, (q, q_still))
    moves = emit(A.add.Tensor, (emit(A.matmul.default, (q_moving, m)), emit(A.matmul.default, (q_still, m2))))
    return emit(A.add.Tensor, (v_bar, emit(A.mul.Scalar, (moves, scale))))
