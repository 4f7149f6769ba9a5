"""Drop-in attention modules and their factories."""

from __future__ import annotations

from .dilated import DilatedAttention, MultiheadDilatedAttention

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


__all__ = ["DilatedAttention", "MultiheadDilatedAttention", "create_multihead_dilated_attention"]
