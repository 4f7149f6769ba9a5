"""The float64 reference every strategy's ``reference`` reduces to: one softmax over weighted, masked scores.

``out_p = sum_j m_pj exp(s_pj) v_j / sum_j m_pj exp(s_pj)`` with ``s = scale * q . k`` (plus an additive mask)
and ``m_pj`` the number of times key ``j`` counts for query ``p`` (0: not linked). A row that links no key is 0.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


def weighted_softmax_attention(q: Tensor, k: Tensor, v: Tensor, weights: Optional[Tensor], *,
                               scale: Optional[float] = None, attn_mask: Optional[Tensor] = None,
                               softcap: Optional[float] = None) -> Tensor:
    """float64 ``[B, Hq, Nq, Dv]`` from q ``[B, Hq, Nq, D]``, k/v ``[B, Hkv, Nk, D / Dv]`` (grouped-query heads:
    query head h reads kv head ``h // (Hq // Hkv)``) and ``weights`` broadcastable to ``[B, Hq, Nq, Nk]`` (bool or
    counts; None: every key once). ``attn_mask``: bool (True attends) or additive. ``softcap``: the scaled scores are
    soft-capped, ``c * tanh(s / c)``, before the mask is added (Gemma2). Differentiable; O(N^2)."""
    group = q.shape[1] // k.shape[1]
    q64, k64, v64 = (t.to(torch.float64) for t in (q, k, v))
    k64, v64 = k64.repeat_interleave(group, dim=1), v64.repeat_interleave(group, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q64 @ k64.transpose(-1, -2)) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    m = torch.ones((), dtype=torch.float64, device=q.device) if weights is None else weights.to(torch.float64)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            m = m * attn_mask.to(torch.float64)
        else:
            s = s + attn_mask.to(torch.float64)
    m = m.expand(s.shape)
    s = s.masked_fill(m == 0, float("-inf"))
    top = s.amax(-1, keepdim=True).detach()
    w = m * torch.exp(s - torch.where(torch.isfinite(top), top, 0.0))
    denom = w.sum(-1, keepdim=True)
    probs = torch.where(denom > 0, w / torch.where(denom > 0, denom, 1.0), 0.0)
    return probs @ v64
