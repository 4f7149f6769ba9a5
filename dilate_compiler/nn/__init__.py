"""Drop-in attention modules and their factories."""

from __future__ import annotations

from .block_sparse import BlockSparseAttention, MultiheadBlockSparseAttention
from .dilated import DilatedAttention, MultiheadDilatedAttention, ProjectedAttention

# kind -> default mixing. "standard" keeps dilated-attention-pytorch's numerics (head groups, output divided
# by the number of branches); "improved" is LongNet's exact log-sum-exp mixing. An explicit mixing= wins.
_MULTIHEAD_DILATED_KINDS = {"standard": "head_groups", "improved": "lse"}
_NOT_YET = {
    "ring": "sequence-parallel ring attention (dilate_compiler.distributed) is not implemented yet",
    "head_parallel": "head-parallel attention (dilate_compiler.distributed) is not implemented yet",
}


def create_multihead_dilated_attention(kind: str = "improved", **kwargs) -> MultiheadDilatedAttention:
    """Build a multi-head dilated attention module by kind.

    Kinds: ``"standard"`` (``mixing="head_groups"``, the numerics of dilated-attention-pytorch) and
    ``"improved"`` (``mixing="lse"``, LongNet eq. 10). ``kwargs`` go to :class:`MultiheadDilatedAttention`.
    """
    if kind in _NOT_YET:
        raise NotImplementedError(f"kind={kind!r}: {_NOT_YET[kind]}")
    if kind not in _MULTIHEAD_DILATED_KINDS:
        raise ValueError(
            f"unknown kind {kind!r}; valid kinds: {sorted(_MULTIHEAD_DILATED_KINDS)} "
            f"(planned, not yet implemented: {sorted(_NOT_YET)})")
    kwargs.setdefault("mixing", _MULTIHEAD_DILATED_KINDS[kind])
    return MultiheadDilatedAttention(**kwargs)


_BLOCK_SPARSE_KINDS = ("base", "adaptive", "multihead")
_BLOCK_SPARSE_NOT_YET = {
    "distributed": "sequence-parallel block-sparse attention (dilate_compiler.distributed, only the K/V blocks a "
                   "rank's query blocks need) is not implemented yet",
}


def create_block_sparse_attention(kind: str = "base", **kwargs):
    """Build a block-sparse attention module by kind.

    - ``"base"``: :class:`BlockSparseAttention` (``pattern``, ``block_size``, ``softmax_scale``), heads already
      projected.
    - ``"adaptive"``: :class:`BlockSparseAttention` with ``dc.Adaptive(top_k, block_size, threshold,
      sink_blocks)`` built from ``kwargs``.
    - ``"multihead"``: :class:`MultiheadBlockSparseAttention` (``embed_dim``, ``num_heads``, ``pattern``, ...).
    """
    from ..strategies.block_sparse import Adaptive

    if kind in _BLOCK_SPARSE_NOT_YET:
        raise NotImplementedError(f"kind={kind!r}: {_BLOCK_SPARSE_NOT_YET[kind]}")
    if kind == "base":
        return BlockSparseAttention(**kwargs)
    if kind == "adaptive":
        scale = kwargs.pop("softmax_scale", None)
        return BlockSparseAttention(Adaptive(**kwargs), softmax_scale=scale)
    if kind == "multihead":
        return MultiheadBlockSparseAttention(**kwargs)
    raise ValueError(f"unknown kind {kind!r}; valid kinds: {list(_BLOCK_SPARSE_KINDS)} "
                     f"(planned, not yet implemented: {sorted(_BLOCK_SPARSE_NOT_YET)})")


__all__ = ["BlockSparseAttention", "DilatedAttention", "MultiheadBlockSparseAttention", "MultiheadDilatedAttention",
           "ProjectedAttention", "create_block_sparse_attention", "create_multihead_dilated_attention"]
