"""Drop-in attention modules and their factories."""

from __future__ import annotations

from .block_sparse import BlockSparseAttention, MultiheadBlockSparseAttention
from .dilated import DilatedAttention, MultiheadDilatedAttention, ProjectedAttention
from .distributed import MultiheadSequenceParallelAttention, SequenceParallelAttention

# kind -> default mixing. "standard" keeps dilated-attention-pytorch's numerics (head groups, output divided
# by the number of branches); "improved" is LongNet's exact log-sum-exp mixing. An explicit mixing= wins.
_MULTIHEAD_DILATED_KINDS = {"standard": "head_groups", "improved": "lse"}
# kind -> mode of dilate_compiler.distributed: "ring" is LongNet's sequence parallelism (each rank sends only the
# K/V rows other ranks' segments link to; pass mode="ring" for K/V passed around the ring), "head_parallel" the
# all-to-all to head shards.
_DISTRIBUTED_KINDS = {"ring": "auto", "head_parallel": "head_parallel"}


def _distributed(strategy, mode: str, kwargs: dict) -> MultiheadSequenceParallelAttention:
    if kwargs.pop("dropout", 0.0):
        raise ValueError("sequence-parallel attention has no attention dropout; pass dropout=0.0")
    kwargs.setdefault("mode", mode)
    return MultiheadSequenceParallelAttention(strategy=strategy, **kwargs)


def create_multihead_dilated_attention(kind: str = "improved", **kwargs):
    """Build a multi-head dilated attention module by kind.

    Kinds: ``"standard"`` (``mixing="head_groups"``, the numerics of dilated-attention-pytorch) and
    ``"improved"`` (``mixing="lse"``, LongNet eq. 10): ``kwargs`` go to :class:`MultiheadDilatedAttention`
    (``head_offsets="grouped"`` with ``"improved"``: torchscale's LongNet).
    ``"ring"`` (sequence-parallel, LongNet's sparse exchange; ``mode="ring"`` passes K/V around the ring) and
    ``"head_parallel"`` (all-to-all to head shards): a :class:`MultiheadSequenceParallelAttention` over this rank's
    sequence shard; ``segment_lengths``, ``dilation_rates`` and ``mixing`` (default ``"lse"``) make the strategy,
    ``group``, ``layout`` and ``mode`` choose the distribution, the rest go to the module.
    """
    if kind in _DISTRIBUTED_KINDS:
        from ..strategies.dilated import Dilated

        for name in ("segment_lengths", "dilation_rates"):
            if name not in kwargs:
                raise TypeError(f"create_multihead_dilated_attention(kind={kind!r}) needs {name}= (a sequence of "
                                f"positive ints, one per branch, each segment length a multiple of its dilation "
                                f"rate); {name} was not given")
        strategy = Dilated(kwargs.pop("segment_lengths"), kwargs.pop("dilation_rates"), kwargs.pop("mixing", "lse"),
                           kwargs.pop("head_offsets", "interleaved"))
        return _distributed(strategy, _DISTRIBUTED_KINDS[kind], kwargs)
    if kind not in _MULTIHEAD_DILATED_KINDS:
        raise ValueError(f"unknown kind {kind!r}; valid kinds: {sorted(_MULTIHEAD_DILATED_KINDS) + sorted(_DISTRIBUTED_KINDS)}")
    kwargs.setdefault("mixing", _MULTIHEAD_DILATED_KINDS[kind])
    return MultiheadDilatedAttention(**kwargs)


_BLOCK_SPARSE_KINDS = ("base", "adaptive", "multihead", "distributed")


def create_block_sparse_attention(kind: str = "base", **kwargs):
    """Build a block-sparse attention module by kind.

    - ``"base"``: :class:`BlockSparseAttention` (``pattern``, ``block_size``, ``softmax_scale``), heads already
      projected.
    - ``"adaptive"``: :class:`BlockSparseAttention` with ``dc.Adaptive(top_k, block_size, threshold,
      sink_blocks)`` built from ``kwargs``.
    - ``"multihead"``: :class:`MultiheadBlockSparseAttention` (``embed_dim``, ``num_heads``, ``pattern``, ...).
    - ``"distributed"``: :class:`MultiheadSequenceParallelAttention` with ``dc.BlockSparse(pattern, block_size)``
      over this rank's sequence shard (each rank receives only the K/V blocks its query blocks list;
      ``mode="head_parallel"`` for all-to-all to head shards; ``group``, ``layout`` as in ``dc.distributed``).
    """
    from ..strategies.block_sparse import Adaptive, BlockSparse

    if kind == "distributed":
        if "pattern" not in kwargs:
            raise ValueError(f"create_block_sparse_attention('distributed') needs pattern= (a dc.patterns pattern), "
                             f"got the arguments {sorted(kwargs)}")
        strategy = BlockSparse(kwargs.pop("pattern"), kwargs.pop("block_size", 128))
        kwargs.setdefault("layer_norm", False)
        return _distributed(strategy, "auto", kwargs)
    if kind == "base":
        return BlockSparseAttention(**kwargs)
    if kind == "adaptive":
        scale = kwargs.pop("softmax_scale", None)
        return BlockSparseAttention(Adaptive(**kwargs), softmax_scale=scale)
    if kind == "multihead":
        return MultiheadBlockSparseAttention(**kwargs)
    raise ValueError(f"unknown kind {kind!r}; valid kinds: {list(_BLOCK_SPARSE_KINDS)}")


__all__ = ["BlockSparseAttention", "DilatedAttention", "MultiheadBlockSparseAttention", "MultiheadDilatedAttention",
           "MultiheadSequenceParallelAttention", "ProjectedAttention", "SequenceParallelAttention", "create_block_sparse_attention", "create_multihead_dilated_attention"]
