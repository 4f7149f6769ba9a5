"""``SequenceParallel``: the compiler strategy that rewrites a sequence-sharded model's attention sites into the
distributed ops (ring / sparse exchange / head-parallel) around an inner strategy.

A site's mask, as ``passes.read_masks`` split it (a static index predicate AND key padding), is taken so:

- the predicate is evaluated on global positions. A causal or all-allowing predicate becomes the op's causality;
  another predicate on ``p - j`` only (a sliding window) joins a ``dc.BlockSparse`` inner strategy's pattern
  (``pattern & predicate``); a predicate on absolute positions or blocks (built over the shard, it does not say
  which global positions it means) is skipped with the reason, as is a window with any other inner strategy;
- the key padding ``[B or 1, S]`` of the shard goes to the op, which moves it with the keys it belongs to;
- rows that keep no key get the model's value: 0 from the op, NaN from the rewrite (the op's log-sum-exp), and
  where the model's softmax is uniform over every key, the mean over the whole sequence (``empty_rows.py``).

``mode="head_parallel"`` runs a masked site as the hybrid without a sequence stage (``hybrid.py``), which takes key
padding and gives the log-sum-exp.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..patterns import INF, UNBOUNDED, Pattern
from ..strategies.block_sparse import BlockSparse
from ..strategies.contract import Emitted
from ..strategies.reference import weighted_softmax_attention
from . import comm
from ..passes.site import static_int
from .links import LAYOUTS, check_strategy, sharded_strategy
from .sequence_parallel import Config, MODES, register, resolve_mode

PARALLEL_MODES = MODES + ("head_parallel", "hybrid")


@dataclass(frozen=True, eq=False)
class SequenceParallel:
    """Attention over activations sharded along the sequence across ``group``.

    Every rank runs the same model on its shard ``[B, N/P, E]`` of each sequence; each attention site becomes
    ``dc.distributed.ring_attention`` (``mode`` ``"auto"``, ``"ring"``, ``"sparse"``),
    ``dc.distributed.head_parallel_attention`` (``mode="head_parallel"``) or ``dc.distributed.hybrid_attention``
    (``mode="hybrid"``: head-parallel inside ``head_group``, ``sequence_mode`` across ``sequence_group``, over the
    whole world; ``dc.distributed.hybrid_groups`` builds the groups) with ``inner`` (None: dense,
    ``dc.Dilated``, ``dc.BlockSparse`` with a fixed pattern, ``dc.Hilbert`` around either). A site's mask is taken
    where the compiler reads it as an index predicate and key padding (the module docstring says how); other
    masks, and dropout, are skipped with the reason.

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
    head_group: Any = None
    sequence_group: Any = None
    sequence_mode: str = "auto"

    def __post_init__(self):
        check_strategy(self.inner, "inner")
        if self.mode not in PARALLEL_MODES:
            raise ValueError(f"mode must be one of {PARALLEL_MODES}, got {self.mode!r}")
        if self.mode not in ("head_parallel", "hybrid"):
            resolve_mode(self.inner, self.mode)
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        hybrid = self.mode == "hybrid"
        if hybrid != (self.head_group is not None) or hybrid != (self.sequence_group is not None):
            raise ValueError(f"head_group and sequence_group go with mode='hybrid' (both), got mode={self.mode!r}, "
                             f"head_group={self.head_group!r}, sequence_group={self.sequence_group!r}")
        if hybrid:
            resolve_mode(self.inner, self.sequence_mode)
            if self.group is not None or self.layout != "contiguous":
                raise ValueError(f"mode='hybrid' spans the default process group with contiguous shards: pass "
                                 f"group=None and layout='contiguous', got group={self.group!r}, "
                                 f"layout={self.layout!r}")

    def check_site(self, site) -> Optional[str]:
        q, k = site.q_shape, site.k_shape
        if len(q) != 4 or q[2] != k[2]:
            return f"sequence-parallel attention needs self-attention shapes (Nq == Nk), got q {q} and k {k}"
        if site.v_shape and site.v_shape[-1] != q[-1]:
            return (f"sequence-parallel attention needs one head dim for q, k and v, got {q[-1]} and v's "
                    f"{site.v_shape[-1]}")
        reason = self._read_mask(site)
        if reason:
            return reason
        if site.dropout_p > 0.0:
            return f"dropout_p={site.dropout_p}: sequence-parallel attention has no attention dropout"
        try:
            world = comm.resolve_group(self.group)[2]
            if self.mode == "head_parallel" and site.nodes.get("terms") and k[1] % world:
                return (f"the site has a mask ({site.mask_desc}): mode='head_parallel' takes one with the kv heads "
                        f"split evenly, got {k[1]} kv head(s) on {world} ranks")
            if self.mode == "hybrid":
                ph = comm.resolve_group(self.head_group)[2]
                comm.resolve_group(self.sequence_group)
                if k[1] % ph:
                    return (f"hybrid attention splits the kv heads evenly over the head group: {k[1]} kv head(s) on "
                            f"a head group of {ph} ranks")
        except (RuntimeError, ValueError) as e:
            return str(e)
        inner, causal = site.nodes["sequence_parallel"]
        n = static_int(q[2])
        if n is not None:   # the strategy the ranks run on the whole sequence (dc.Hilbert: its grid's length)
            try:
                sharded_strategy(inner, n * world, causal)
            except (ValueError, NotImplementedError) as e:
                return str(e)
        if self.mode == "hybrid":
            site.detail = f"hybrid, {resolve_mode(inner, self.sequence_mode)} across sequence groups, inner={inner!r}"
        else:
            site.detail = f"{self.mode if self.mode != 'auto' else resolve_mode(inner, 'auto')}, inner={inner!r}"
        return None

    def _read_mask(self, site) -> Optional[str]:
        """Records in ``site.nodes["sequence_parallel"]`` the inner strategy and causality the site runs with
        (the module docstring says how its mask is taken), or returns why the site is skipped."""
        inner, causal = self.inner, site.is_causal
        if site.nodes.get("terms"):
            if site.pattern is None or site.mask_reason:
                return (f"the site's {site.mask_kind} mask is not read as an index predicate and key padding "
                        f"({site.mask_reason or 'not read'}); a mask tensor over the local shard says nothing about "
                        f"the other ranks' keys")
            if self.mode == "head_parallel" and self.layout != "contiguous":
                return (f"the site has a mask ({site.mask_desc}); mode='head_parallel' takes one with contiguous "
                        f"shards only, got layout={self.layout!r}")
            kind, name = global_predicate(site.pattern)
            if kind == "absolute":
                return (f"the mask's predicate ({name}) bounds absolute positions or blocks: built over the local "
                        f"shard, it does not say which global positions it means")
            if kind == "window":
                if not isinstance(inner, BlockSparse):
                    return (f"the mask's predicate is {site.predicate_name or name}; sequence-parallel attention with "
                            f"inner={inner!r} runs causal or unmasked attention with key padding (a dc.BlockSparse "
                            f"inner strategy takes the predicate into its pattern)")
                both = inner.pattern & site.pattern
                inner = BlockSparse(Pattern(both.terms, f"{inner.pattern.name} & (model mask)", both.grid),
                                    inner.block_size)
            causal = causal or kind == "causal"
        site.nodes["sequence_parallel"] = (inner, bool(causal))
        return None

    def emit_call(self, emit, site, call) -> Emitted:
        group, _, _ = comm.resolve_group(self.group)
        inner, causal = site.nodes["sequence_parallel"]
        causal = bool(causal or call.is_causal)
        key_keep = call.key_keep() if site.key_keep else None
        if self.mode == "hybrid" or (self.mode == "head_parallel" and site.nodes.get("terms")):
            from .hybrid import HybridConfig, hybrid_by_key, register_hybrid, world_key

            if self.mode == "hybrid":
                mode = resolve_mode(inner, self.sequence_mode)
                cfg = HybridConfig(Config(inner, group, f"hybrid/{mode}", "contiguous", causal, float(call.scale)),
                                   self.head_group, self.sequence_group, mode)
            else:   # head-parallel with key padding and the LSE: a hybrid without a sequence stage
                cfg = HybridConfig(Config(inner, group, "head_parallel", "contiguous", causal, float(call.scale)),
                                   group, None, "local")
            key = register_hybrid(cfg)
            both = emit(hybrid_by_key, (call.q, call.k, call.v, key, key_keep, True))
            out, lse = emit(operator.getitem, (both, 0)), emit(operator.getitem, (both, 1))
            return self._empty_rows(emit, site, call, out, lse, world_key(key))
        mode = "head_parallel" if self.mode == "head_parallel" else resolve_mode(inner, self.mode)
        key = register(Config(inner, group, mode, self.layout, causal, float(call.scale)))
        if mode == "head_parallel":
            from .head_parallel import head_parallel_by_key
            return Emitted(emit(head_parallel_by_key, (call.q, call.k, call.v, key)))
        fwd = emit(torch.ops.dilate_compiler.sequence_parallel_forward.default,
                   (call.q, call.k, call.v, key, key_keep))
        out, lse = emit(operator.getitem, (fwd, 0)), emit(operator.getitem, (fwd, 1))
        return self._empty_rows(emit, site, call, out, lse, key)

    def _empty_rows(self, emit, site, call, out, lse, key: str) -> Emitted:
        """The op's output and LSE, for the rewrite to give rows that keep no key the model's value; rows where the
        model's softmax is uniform over every key get the whole sequence's mean here (``empty_rows.py``)."""
        if site.empty_rows != "mean":
            return Emitted(out, lse)
        from .empty_rows import emit_uniform_rows

        _, _, world = comm.resolve_group(self.group)
        fill = emit_uniform_rows(emit, call.q, call.k, call.v, float(call.scale), site.gqa_ratio,
                                 int(site.k_shape[2]) * world, key)
        empty = emit(torch.ops.aten.unsqueeze.default, (emit(torch.ops.aten.eq.Scalar, (lse, float("-inf"))), -1))
        fill = emit(torch.ops.aten.to.dtype, (fill, call.q.meta["val"].dtype))
        return Emitted(emit(torch.ops.aten.where.self, (empty, fill, out)))

    def reference(self, q, k, v, *, is_causal: bool = False, scale: Optional[float] = None, attn_mask=None):
        """float64: the single-process attention of the inner strategy (dense when None), on whole sequences."""
        if self.inner is None:
            keep = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device)
            keep = keep.tril() if is_causal else keep
            return weighted_softmax_attention(q, k, v, keep, scale=scale, attn_mask=attn_mask)
        return self.inner.reference(q, k, v, is_causal=is_causal, scale=scale, attn_mask=attn_mask)


def global_predicate(pattern: Pattern) -> tuple:
    """``(kind, name)`` of a site's predicate read on global positions: kind ``"all"``, ``"causal"``, ``"window"``
    (a predicate on ``p - j`` only: the same on any shard of the sequence) or ``"absolute"`` (it bounds ``p`` or
    ``j`` themselves, or uses blocks or a grid)."""
    terms = pattern.terms
    if any(t.blocks or t.uses_grid or t.p != UNBOUNDED or t.j != UNBOUNDED for t in terms):
        return "absolute", pattern.name
    if len(terms) == 1 and terms[0].d[0] <= -INF and terms[0].d[1] >= INF:
        return "all", "all"
    if len(terms) == 1 and terms[0].d[0] == 0 and terms[0].d[1] >= INF:
        return "causal", "causal"
    return "window", pattern.name
