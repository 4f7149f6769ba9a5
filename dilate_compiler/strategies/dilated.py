"""LongNet dilated attention: the strategy and its float64 reference (the compile-time plan: ``lowering.dilated.plan``).

Semantics (the one definition every path agrees on): branch ``i`` has segment length ``w_i`` and dilation
rate ``r_i`` (``w_i % r_i == 0``). With ``mixing="lse"``, query position ``p`` of query head ``h`` and key
position ``j`` are linked by branch ``i`` iff ``p // w_i == j // w_i`` and ``p % r_i == j % r_i == h % r_i``
(and ``j <= p`` when causal). The output is one softmax in which each key counts once per linking branch::

    out_p = sum_j m_pj exp(s_pj) v_j / sum_j m_pj exp(s_pj),      s = scale * q . k

A row no branch links is 0. With ``mixing="head_groups"`` (the numerics of dilated-attention-pytorch), heads
split into ``len(segment_lengths)`` contiguous groups (the first ``H % n`` get one extra head), group ``i``
uses only branch ``i`` with residue ``i % r_i``, and the output is divided by ``n``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..lowering.dilated.plan import DilatedPlan, check_pattern, dilated_plan, head_group_bounds


@dataclass(frozen=True)
class Dilated:
    """LongNet dilated attention strategy.

    Args:
        segment_lengths: segment length ``w_i`` of each branch.
        dilation_rates: dilation rate ``r_i`` of each branch; ``w_i % r_i == 0``.
        mixing: ``"lse"`` (LongNet eq. 10, exact softmax-denominator mixing; default) or ``"head_groups"``.
    """

    segment_lengths: tuple[int, ...]
    dilation_rates: tuple[int, ...]
    mixing: str = "lse"

    def __post_init__(self):
        segs, rates = check_pattern(self.segment_lengths, self.dilation_rates, self.mixing)
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
        return dilated_plan(self.segment_lengths, self.dilation_rates, self.mixing, seq_len, num_heads)

    def link_count(self, h: torch.Tensor, p: torch.Tensor, j: torch.Tensor, num_heads: int) -> torch.Tensor:
        """How many branches link query position ``p`` of query head ``h`` to key position ``j`` (int64,
        broadcast over the three; positions are global, so shards and subsets of heads use the same rule).
        ``num_heads`` is the model's query head count (it places the head groups of ``mixing="head_groups"``)."""
        m = torch.zeros(torch.broadcast_shapes(h.shape, p.shape, j.shape), dtype=torch.int64, device=p.device)
        if self.mixing == "lse":
            for w, r in zip(self.segment_lengths, self.dilation_rates):
                m += ((p // w == j // w) & (p % r == h % r) & (j % r == h % r)).long()
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

    # --- compiler hooks: how a rewritten site calls this strategy's op ---------------------------------

    def check_site(self, site) -> Optional[str]:
        """Why this strategy can't take ``site``, or None."""
        q, k = site.q_shape, site.k_shape
        if len(q) != 4 or q[2] != k[2]:
            return f"dilated attention needs self-attention shapes (Nq == Nk), got q {q} and k {k}"
        return None

    def emit_call(self, emit, q, k, v, attn_mask, *, is_causal: bool, scale: float, dropout_p: float, site=None):
        """Emit the op call through ``emit(target, args, kwargs)``; returns the output node."""
        import operator

        seed = None
        if dropout_p > 0.0:
            seed = emit(torch.ops.aten.randint.low, (0, 2**62, []),
                        {"dtype": torch.int64, "device": torch.device("cpu")})
        fwd = emit(torch.ops.dilate_compiler.dilated_attention_forward.default,
                   (q, k, v, attn_mask, list(self.segment_lengths), list(self.dilation_rates), bool(is_causal),
                    float(scale), self.mixing, float(dropout_p), seed))
        return emit(operator.getitem, (fwd, 0))

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

        q ``[B, Hq, N, D]``, k/v ``[B, Hkv, N, D]``; ``attn_mask`` (bool: True attends, or additive float)
        broadcastable to ``[B, Hq, N, N]``. Differentiable; O(N^2) memory.
        """
        B, Hq, N, D = q.shape
        group = Hq // k.shape[1]
        q64, k64, v64 = (t.to(torch.float64) for t in (q, k, v))
        k64 = k64.repeat_interleave(group, dim=1)
        v64 = v64.repeat_interleave(group, dim=1)
        scale = 1.0 / math.sqrt(D) if scale is None else scale
        s = (q64 @ k64.transpose(-1, -2)) * scale
        m = self.multiplicity(N, Hq, is_causal=is_causal, device=q.device).to(torch.float64)
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                m = m * attn_mask.to(torch.float64)
            else:
                s = s + attn_mask.to(torch.float64)
        weights = m * torch.exp(s - s.amax(-1, keepdim=True).detach())
        denom = weights.sum(-1, keepdim=True)
        probs = torch.where(denom > 0, weights / torch.where(denom > 0, denom, 1.0), 0.0)
        out = probs @ v64
        if self.mixing == "head_groups":
            out = out / self.num_branches
        return out

