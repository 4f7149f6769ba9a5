"""LongNet dilated attention: the strategy and its float64 reference (the compile-time plan: ``lowering.dilated.plan``).

Semantics (the one definition every path agrees on): branch ``i`` has segment length ``w_i`` and dilation
rate ``r_i`` (``w_i % r_i == 0``). With ``mixing="lse"``, query position ``p`` of query head ``h`` and key
position ``j`` are linked by branch ``i`` iff ``p // w_i == j // w_i`` and ``p % r_i == j % r_i == o_i(h)``
(and ``j <= p`` when causal). The output is one softmax in which each key counts once per linking branch::

    out_p = sum_j m_pj exp(s_pj) v_j / sum_j m_pj exp(s_pj),      s = scale * q . k

The head offset ``o_i(h)`` of ``H`` query heads is ``h % r_i`` (``head_offsets="interleaved"``, the default) or
``h // ceil(H / r_i)`` (``"grouped"``: contiguous head groups, torchscale's LongNet).

A row no branch links is 0. With ``mixing="head_groups"`` (the numerics of dilated-attention-pytorch), heads
split into ``len(segment_lengths)`` contiguous groups (the first ``H % n`` get one extra head), group ``i``
uses only branch ``i`` with residue ``i % r_i``, and the output is divided by ``n``.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from ..lowering.common.dispatch import kernels_apply, value_unsupported_reason
from ..lowering.dilated.plan import (DilatedPlan, check_head_offsets, check_pattern, clip_segment, dilated_plan,
                                     head_group_bounds, head_offset)
from ..lowering.dilated.triton import kernel_unsupported_reason
from .contract import Emitted
from .reference import weighted_softmax_attention


@dataclass(frozen=True)
class Dilated:
    """LongNet dilated attention strategy.

    Args:
        segment_lengths: segment length ``w_i`` of each branch.
        dilation_rates: dilation rate ``r_i`` of each branch; ``w_i % r_i == 0``.
        mixing: ``"lse"`` (LongNet eq. 10, exact softmax-denominator mixing; default) or ``"head_groups"``.
        head_offsets: which rows each query head reads in a branch of rate ``r`` under ``mixing="lse"``:
            ``"interleaved"`` (``p % r == h % r``; default) or ``"grouped"`` (``p % r == h // ceil(H / r)``, the
            rule of torchscale's LongNet, so a model trained there keeps its meaning). ``mixing="head_groups"``
            takes ``"interleaved"`` only.
    """

    segment_lengths: tuple[int, ...]
    dilation_rates: tuple[int, ...]
    mixing: str = "lse"
    head_offsets: str = "interleaved"

    def __post_init__(self):
        segs, rates = check_pattern(self.segment_lengths, self.dilation_rates, self.mixing)
        check_head_offsets(self.head_offsets, self.mixing)
        object.__setattr__(self, "segment_lengths", segs)
        object.__setattr__(self, "dilation_rates", rates)

    @property
    def num_branches(self) -> int:
        return len(self.segment_lengths)

    def head_group_bounds(self, num_heads: int) -> list[tuple[int, int]]:
        """``[start, stop)`` of each branch's heads under ``mixing="head_groups"``."""
        return head_group_bounds(self.num_branches, num_heads)

    def plan(self, seq_len: int, num_heads: int) -> DilatedPlan:
        """The compile-time plan for ``num_heads`` query heads over ``seq_len`` tokens."""
        return dilated_plan(self.segment_lengths, self.dilation_rates, self.mixing, seq_len, num_heads,
                            self.head_offsets)

    def link_count(self, h: torch.Tensor, p: torch.Tensor, j: torch.Tensor, num_heads: int) -> torch.Tensor:
        """How many branches link query position ``p`` of query head ``h`` to key position ``j`` (int64,
        broadcast over the three; positions are global, so shards and subsets of heads use the same rule).
        ``num_heads`` is the model's query head count (it places the head groups of ``mixing="head_groups"`` and
        the grouped head offsets)."""
        m = torch.zeros(torch.broadcast_shapes(h.shape, p.shape, j.shape), dtype=torch.int64, device=p.device)
        if self.mixing == "lse":
            for w, r in zip(self.segment_lengths, self.dilation_rates):
                o = head_offset(h, r, num_heads, self.head_offsets)
                m += ((p // w == j // w) & (p % r == o) & (j % r == o)).long()
        else:
            for i, ((w, r), (start, stop)) in enumerate(
                zip(zip(self.segment_lengths, self.dilation_rates), self.head_group_bounds(num_heads))
            ):
                in_group = (h >= start) & (h < stop)
                m += (in_group & (p // w == j // w) & (p % r == i % r) & (j % r == i % r)).long()
        return m

    def multiplicity(self, seq_len: int, num_heads: int, *, is_causal: bool = False, device=None) -> torch.Tensor:
        """``m[h, p, j]``: how many branches link query ``p`` of head ``h`` to key ``j`` (O(N^2), for references)."""
        p = torch.arange(seq_len, device=device).view(1, -1, 1)
        j = torch.arange(seq_len, device=device).view(1, 1, -1)
        h = torch.arange(num_heads, device=device).view(-1, 1, 1)
        m = self.link_count(h, p, j, num_heads)
        if is_causal:
            m = m * (j <= p).long()
        return m

    # --- compiler hooks (``strategies.contract``) ---------------------------------------------------------

    def check_site(self, site) -> Optional[str]:
        """Why this strategy can't take ``site``, or None. A mask read as causal (or all-allowing) AND key padding
        runs on the kernels; any other mask is carried to the op (its exact path)."""
        q, k = site.q_shape, site.k_shape
        if len(q) != 4 or (q[2] != k[2] and not site.decode):
            return f"dilated attention needs self-attention shapes (Nq == Nk), got q {q} and k {k}"
        if not site.nodes.get("terms"):
            route, why = "plain", ""
        elif site.pattern is not None and not site.mask_reason and site.predicate in ("all", "causal"):
            route, why = "split", ""
        else:
            route = "mask"
            why = site.mask_reason or (f"the dilated kernels run causal or unmasked attention, with key padding; the "
                                       f"model's mask is {site.mask_desc}")
        site.nodes["route"] = route
        reason = kernel_unsupported_reason(site.nodes["q"].meta["val"], None if route != "mask" else True,
                                           site.dropout_p, self.num_branches, site.softcap)
        reason = reason or value_unsupported_reason(site.nodes["q"].meta["val"], site.nodes["v"].meta["val"])
        site.runs = "kernels" if not reason else f"exact path: {reason}" + (f" ({why})" if why else "")
        return None

    # emit_call passes the site's soft-capping to the op (see contract.Strategy)
    applies_softcap: ClassVar[bool] = True

    def emit_call(self, emit, site, call) -> Emitted:
        """The op on the site's inputs: its mask as causality and key padding where ``check_site`` read it so,
        else the mask itself."""
        route = site.nodes["route"]
        mask = call.mask() if route == "mask" else None
        key_keep = call.key_keep() if route == "split" else None
        is_causal = call.is_causal or (route == "split" and site.predicate == "causal")
        seed = None
        if call.dropout_p > 0.0:
            seed = emit(torch.ops.aten.randint.low, (0, 2**62, []),
                        {"dtype": torch.int64, "device": torch.device("cpu")})
        fwd = emit(torch.ops.dilate_compiler.dilated_attention_forward.default,
                   (call.q, call.k, call.v, mask, list(self.segment_lengths), list(self.dilation_rates),
                    bool(is_causal), float(call.scale), self.mixing, float(call.dropout_p), seed, key_keep,
                    site.softcap, self.head_offsets))
        return Emitted(emit(operator.getitem, (fwd, 0)), emit(operator.getitem, (fwd, 1)))

    def reference(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        is_causal: bool = False,
        scale: Optional[float] = None,
        attn_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Dense float64 reference straight from the definition: a multiplicity-weighted masked softmax.

        q ``[B, Hq, N, D]``, k/v ``[B, Hkv, N, D or Dv]``; ``attn_mask`` (bool: True attends, or additive float)
        broadcastable to ``[B, Hq, N, N]``. Differentiable; O(N^2) memory.
        """
        m = self.multiplicity(q.shape[2], q.shape[1], is_causal=is_causal, device=q.device)
        out = weighted_softmax_attention(q, k, v, m, scale=scale, attn_mask=attn_mask)
        if self.mixing == "head_groups":
            out = out / self.num_branches
        return out

    # --- sharded over ranks (``strategies.contract.DistributedStrategy``) --------------------------------------

    def check_distributed(self, name: str = "strategy") -> None:
        if self.head_offsets != "interleaved":
            raise NotImplementedError(f"distributed dilated attention with head_offsets={self.head_offsets!r}: the "
                                      f"links, windows and head shards read a head's rows as h % r; pass "
                                      f"head_offsets='interleaved' or run the single-process op")

    def sharded(self, seq_len: int, is_causal: bool) -> "Dilated":
        return self

    def links(self, seq_len: int, num_heads: int, is_causal: bool, device=None):
        from .links import DilatedLinks

        return DilatedLinks(self, seq_len, num_heads, is_causal)

    @property
    def head_period(self) -> int:
        return math.lcm(*self.dilation_rates)

    def key_window_span(self, seq_len: int) -> Optional[int]:
        """The lcm of the branches' segment lengths (clipped to ``seq_len``): a multiple of every segment and rate."""
        return math.lcm(*(clip_segment(w, r, seq_len) for w, r in zip(self.segment_lengths, self.dilation_rates)))

    def attend_heads(self, q, k, v, *, first_head: int, num_heads: int, is_causal: bool, scale):
        from .. import ops

        reason = ""
        if self.mixing == "head_groups":
            reason = "mixing='head_groups' assigns branches by global head index"
        elif first_head % self.head_period:
            reason = (f"this rank's first head {first_head} is not a multiple of the rates' lcm {self.head_period}, "
                      f"so residues by local head index would differ")
        if not kernels_apply("head-parallel dilated attention", q, reason):
            return None
        return ops.dilated_attention(q, k, v, self.segment_lengths, self.dilation_rates, is_causal=is_causal,
                                     scale=scale, mixing=self.mixing)
