"""``SequenceParallel``: the compiler strategy that rewrites a sequence-sharded model's attention sites into the
distributed ops (ring / sparse exchange / head-parallel) around an inner strategy."""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..strategies.contract import Emitted
from ..strategies.reference import weighted_softmax_attention
from . import comm
from ..passes.site import static_int
from .links import LAYOUTS, check_strategy, sharded_strategy
from .sequence_parallel import Config, MODES, register, resolve_mode

PARALLEL_MODES = MODES + ("head_parallel",)


@dataclass(frozen=True, eq=False)
class SequenceParallel:
    """Attention over activations sharded along the sequence across ``group``.

    Every rank runs the same model on its shard ``[B, N/P, E]`` of each sequence; each attention site becomes
    ``dc.distributed.ring_attention`` (``mode`` ``"auto"``, ``"ring"``, ``"sparse"``) or
    ``dc.distributed.head_parallel_attention`` (``mode="head_parallel"``) with ``inner`` (None: dense,
    ``dc.Dilated``, ``dc.BlockSparse`` with a fixed pattern, ``dc.Hilbert`` around either). Sites with a mask tensor
    or dropout are skipped with the reason (a mask over the local shard says nothing about the other ranks' keys).

    With ``inner=dc.Hilbert(grid, ...)`` the ranks hold the sequence in curve order: shard the model's input with
    ``dc.distributed.shard_sequence(x, dim=1, order=inner)`` (rank r holds the tokens
    ``curve_order[r*S:(r+1)*S]``), and ``gather_sequence(y, dim=1, order=inner)`` restores the output's order.
    Per-token layers don't care about the order; attention runs the inner strategy in curve order, which is what
    the single-process ``dc.Hilbert`` computes.
    """

    inner: Any = None
    group: Any = None
    mode: str = "auto"
    layout: str = "contiguous"

    def __post_init__(self):
        check_strategy(self.inner, "inner")
        if self.mode not in PARALLEL_MODES:
            raise ValueError(f"mode must be one of {PARALLEL_MODES}, got {self.mode!r}")
        if self.mode != "head_parallel":
            resolve_mode(self.inner, self.mode)
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")

    def check_site(self, site) -> Optional[str]:
        q, k = site.q_shape, site.k_shape
        if len(q) != 4 or q[2] != k[2]:
            return f"sequence-parallel attention needs self-attention shapes (Nq == Nk), got q {q} and k {k}"
        if site.v_shape and site.v_shape[-1] != q[-1]:
            return (f"sequence-parallel attention needs one head dim for q, k and v, got {q[-1]} and v's "
                    f"{site.v_shape[-1]}")
        if site.nodes.get("terms"):
            return (f"the site has a {site.mask_kind} mask over the local shard; sequence-parallel attention takes "
                    f"no mask tensor (use is_causal or a block-sparse pattern)")
        if site.dropout_p > 0.0:
            return f"dropout_p={site.dropout_p}: sequence-parallel attention has no attention dropout"
        try:
            _, _, world = comm.resolve_group(self.group)
        except RuntimeError as e:
            return str(e)
        n = static_int(q[2])
        if n is not None:
            try:
                sharded_strategy(self.inner, n * world, bool(site.is_causal))
            except (ValueError, NotImplementedError) as e:
                return str(e)
        site.detail = f"{self.mode if self.mode != 'auto' else resolve_mode(self.inner, 'auto')}, inner={self.inner!r}"
        return None

    def emit_call(self, emit, site, call) -> Emitted:
        group, _, _ = comm.resolve_group(self.group)
        mode = "head_parallel" if self.mode == "head_parallel" else resolve_mode(self.inner, self.mode)
        key = register(Config(self.inner, group, mode, self.layout, bool(call.is_causal), float(call.scale)))
        if mode == "head_parallel":
            from .head_parallel import head_parallel_by_key
            return Emitted(emit(head_parallel_by_key, (call.q, call.k, call.v, key)))
        fwd = emit(torch.ops.dilate_compiler.sequence_parallel_forward.default, (call.q, call.k, call.v, key))
        return Emitted(emit(operator.getitem, (fwd, 0)), emit(operator.getitem, (fwd, 1)))

    def reference(self, q, k, v, *, is_causal: bool = False, scale: Optional[float] = None, attn_mask=None):
        """float64: the single-process attention of the inner strategy (dense when None), on whole sequences."""
        if self.inner is None:
            keep = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device)
            keep = keep.tril() if is_causal else keep
            return weighted_softmax_attention(q, k, v, keep, scale=scale, attn_mask=attn_mask)
        return self.inner.reference(q, k, v, is_causal=is_causal, scale=scale, attn_mask=attn_mask)
