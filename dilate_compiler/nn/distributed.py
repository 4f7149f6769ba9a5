"""Drop-in modules whose attention runs sequence-parallel or head-parallel across a process group.

Each rank passes its shard ``[B, N/P, E]`` of the sequence (``dc.distributed.shard_sequence(x, dim=1)``) and gets
its output shard; projections and norms are per token, so only the attention communicates.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from ..distributed import head_parallel_attention, ring_attention
from ..distributed.agreement import raise_on_every_rank
from ..distributed.comm import resolve_group
from ..distributed.sequence_parallel import resolve_mode
from ..distributed.strategy import SequenceParallel
from .dilated import ProjectedAttention, check_projected_heads


class SequenceParallelAttention(nn.Module):
    """Attention over already projected heads of a sequence shard: q ``[B, S, Hq, D]``, k/v ``[B, S, Hkv, D]``.

    ``strategy``: None (dense), ``dc.Dilated`` or ``dc.BlockSparse`` with a fixed pattern. ``mode``: ``"auto"``,
    ``"ring"``, ``"sparse"`` (``ring_attention``) or ``"head_parallel"`` (``head_parallel_attention``).
    """

    def __init__(self, strategy=None, *, mode: str = "auto", group=None, layout: str = "contiguous",
                 softmax_scale: Optional[float] = None):
        super().__init__()
        self.config = SequenceParallel(strategy, group=group, mode=mode, layout=layout)   # validates
        self.softmax_scale = softmax_scale

    def forward(self, query: Tensor, key: Tensor, value: Tensor, is_causal: bool = False,
                attn_mask: Optional[Tensor] = None) -> Tensor:
        c = self.config
        try:
            if attn_mask is not None:
                raise ValueError("sequence-parallel attention takes no attn_mask (a mask over one shard says nothing "
                                 "about the other ranks' keys): use is_causal or a block-sparse pattern")
            check_projected_heads(query, key, value)
        except ValueError as e:   # the other ranks are about to run the call: they raise too
            mode = c.mode if c.mode == "head_parallel" else resolve_mode(c.inner, c.mode)
            heads_first = (t.transpose(1, 2) if isinstance(t, Tensor) and t.dim() == 4 else t
                           for t in (query, key, value))
            raise_on_every_rank(e, resolve_group(c.group)[0], *heads_first, c.inner, mode, c.layout, is_causal,
                                self.softmax_scale)
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        kw = {"is_causal": is_causal, "group": c.group, "scale": self.softmax_scale, "layout": c.layout}
        if c.mode == "head_parallel":
            out = head_parallel_attention(q, k, v, c.inner, **kw)
        else:
            out = ring_attention(q, k, v, c.inner, mode=c.mode, **kw)
        return out.transpose(1, 2)

    def extra_repr(self) -> str:
        c = self.config
        return f"strategy={c.inner!r}, mode={c.mode!r}, layout={c.layout!r}"


class MultiheadSequenceParallelAttention(ProjectedAttention):
    """Multi-head attention (projections, :class:`SequenceParallelAttention`, optional sub-layer norm, output
    projection) over a sequence shard; returns ``(out, None)`` like ``nn.MultiheadAttention``."""

    def __init__(self, embed_dim: int, num_heads: int, strategy=None, *, mode: str = "auto", group=None,
                 layout: str = "contiguous", bias: bool = True, batch_first: bool = True,
                 num_kv_heads: Optional[int] = None, layer_norm: bool = True, layer_norm_eps: float = 1e-5,
                 gamma_init: float = 1.0, device=None, dtype=None):
        attention = SequenceParallelAttention(strategy, mode=mode, group=group, layout=layout)
        super().__init__(embed_dim, num_heads, attention, bias=bias, batch_first=batch_first,
                         num_kv_heads=num_kv_heads, layer_norm=layer_norm, layer_norm_eps=layer_norm_eps,
                         gamma_init=gamma_init, device=device, dtype=dtype)
