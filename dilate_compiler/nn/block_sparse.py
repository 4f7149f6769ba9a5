"""Drop-in block-sparse attention modules (batch-first ``[B, N, E]``)."""

from __future__ import annotations

from typing import Optional, Union

from torch import Tensor, nn

from ..ops import adaptive_block_sparse_attention, block_sparse_attention
from ..patterns import BlockLayout, Pattern
from ..strategies.block_sparse import Adaptive
from .dilated import ProjectedAttention, check_projected_heads


class BlockSparseAttention(nn.Module):
    """Block-sparse attention over already projected heads: q ``[B, N, Hq, D]``, k/v ``[B, N, Hkv, D]``.

    ``pattern``: a ``dc.patterns`` pattern (layouts are built once per sequence length and cached) or a
    ``dc.Adaptive`` (blocks selected from the activations on every call).
    """

    def __init__(self, pattern: Union[Pattern, Adaptive], block_size: int = 128, *,
                 softmax_scale: Optional[float] = None):
        super().__init__()
        if not isinstance(pattern, (Pattern, Adaptive)):
            raise TypeError(f"pattern must be a dilate_compiler.patterns pattern or a dc.Adaptive, got {pattern!r}")
        if isinstance(pattern, Adaptive) and pattern.block_size != block_size:
            block_size = pattern.block_size
        self.pattern, self.block_size, self.softmax_scale = pattern, block_size, softmax_scale
        self._layouts: dict = {}

    def _layout(self, q: Tensor, is_causal: bool) -> BlockLayout:
        key = (q.shape[1], q.shape[2], is_causal, str(q.device))
        if key not in self._layouts:
            self._layouts[key] = self.pattern.layout(q.shape[1], self.block_size, num_heads=q.shape[2],
                                                     is_causal=is_causal, device=q.device)
        return self._layouts[key]

    def forward(self, query: Tensor, key: Tensor, value: Tensor, is_causal: bool = False,
                attn_mask: Optional[Tensor] = None) -> Tensor:
        if attn_mask is not None:
            raise ValueError("block-sparse attention takes no attn_mask: express the mask as a dc.patterns pattern "
                             "(or compile the model with dc.BlockSparse('auto') to keep a structured mask)")
        check_projected_heads(query, key, value)
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        if isinstance(self.pattern, Adaptive):
            out = adaptive_block_sparse_attention(q, k, v, self.pattern, is_causal=is_causal,
                                                  scale=self.softmax_scale)
        else:
            out = block_sparse_attention(q, k, v, self._layout(query, is_causal), block_size=self.block_size,
                                         is_causal=is_causal, scale=self.softmax_scale)
        return out.transpose(1, 2)

    def extra_repr(self) -> str:
        return f"pattern={self.pattern!r}, block_size={self.block_size}"


class MultiheadBlockSparseAttention(ProjectedAttention):
    """Multi-head block-sparse attention, a drop-in for ``nn.MultiheadAttention`` (returns ``(out, None)``):
    projections, block-sparse attention (a pattern or ``dc.Adaptive``), optional sub-layer norm, output
    projection. ``attn_mask`` and ``key_padding_mask`` are refused (express them as a pattern)."""

    def __init__(self, embed_dim: int, num_heads: int, pattern: Union[Pattern, Adaptive], block_size: int = 128,
                 bias: bool = True, batch_first: bool = True, *, num_kv_heads: Optional[int] = None,
                 layer_norm: bool = False, layer_norm_eps: float = 1e-5, device=None, dtype=None):
        super().__init__(embed_dim, num_heads, BlockSparseAttention(pattern, block_size), bias=bias,
                         batch_first=batch_first, num_kv_heads=num_kv_heads, layer_norm=layer_norm,
                         layer_norm_eps=layer_norm_eps, device=device, dtype=dtype)
