"""Exact attention of queries at known global positions over keys at known global positions.

This is the per-rank compute of the sequence-parallel ops: a rank's queries against whatever keys it holds
(its own shard, a visiting ring shard, or the rows other ranks sent it). Queries run in chunks of consecutive
rows; each chunk asks the strategy's ``Links`` which of the held keys it needs and reads only those, so the
work follows the pattern (a dilated chunk reads its segments, not the whole sequence) and memory is bounded by
the chunk. One softmax over the union: ``log(count)`` is added to the scores, so a key counts once per
linking branch; key padding (``key_keep``) adds -inf to the scores of dropped keys. Returns the log-sum-exp
too, so partial results over disjoint key sets merge exactly (``merge``), and the backward recomputes the
probabilities from it, as FlashAttention does.

Accumulation is float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..lowering.common.dispatch import lse_dtype as acc_dtype
from .links import Links, runs

# Elements of a chunk's score tensor (B * H * rows * keys read) the chunking aims under.
CHUNK_ELEMENTS = 1 << 22
FIRST_CHUNK_ROWS = 256


def _per_head(t: Tensor, num_heads: int, dim: int) -> Tensor:
    """k/v ``[B, Hkv, K, D]`` (dim 1) or key positions ``[Hkv or 1, K]`` (dim 0) per query head."""
    return t.expand(num_heads, -1) if dim == 0 and t.shape[0] == 1 else t.repeat_interleave(
        num_heads // t.shape[dim], dim=dim)


class _Chunk:
    """The keys one chunk of query rows reads: column indices, their positions per head, log-counts."""

    def __init__(self, links: Links, heads: Tensor, q_pos: Tensor, k_pos_h: Tensor, r0: int, r1: int):
        p = q_pos[r0:r1]
        need = links.needed(heads, runs(p), k_pos_h)            # [H, K]
        self.cols = torch.nonzero(need.any(0)).flatten()
        j = k_pos_h[:, self.cols]                                # [H, Kc]
        count = links.count(heads.view(-1, 1, 1), p.view(1, -1, 1), j.unsqueeze(1))
        self.log_count = torch.log(count.to(torch.float64))      # -inf where not linked

    def empty(self) -> bool:
        return self.cols.numel() == 0


def _chunks(links: Links, heads: Tensor, q_pos: Tensor, k_pos_h: Tensor, batch: int):
    """``(r0, r1, chunk)`` over consecutive query rows; a chunk is halved until its scores fit the budget."""
    S, H = q_pos.numel(), heads.numel()
    r0 = 0
    while r0 < S:
        r1 = min(S, r0 + FIRST_CHUNK_ROWS)
        c = _Chunk(links, heads, q_pos, k_pos_h, r0, r1)
        while r1 - r0 > 16 and batch * H * (r1 - r0) * c.cols.numel() > CHUNK_ELEMENTS:
            r1 = r0 + (r1 - r0) // 2
            c = _Chunk(links, heads, q_pos, k_pos_h, r0, r1)
        yield r0, r1, c
        r0 = r1


def _select(t_h: Tensor, cols: Tensor, dtype) -> Tensor:
    return t_h.index_select(2, cols).to(dtype)


def _padding_bias(keep_h, cols: Tensor, dtype):
    """``[B' or 1, H, 1, Kc]``: 0 for the chunk's keys that attend, -inf for padding (``keep_h [B', H, K]``);
    0 without key padding."""
    if keep_h is None:
        return 0.0
    kept = keep_h.index_select(2, cols).unsqueeze(2)
    return torch.zeros((), dtype=dtype, device=cols.device).masked_fill(~kept, float("-inf"))


def _keep_per_head(key_keep, num_heads: int):
    """Key padding of the held keys, ``[B', Hkv or 1, K]`` bool, per query head ``[B', H, K]`` (None: none)."""
    return None if key_keep is None else _per_head(key_keep, num_heads, 1)


def attend_forward(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, links: Links, heads: Tensor,
                   scale: float, key_keep=None) -> tuple[Tensor, Tensor]:
    """q ``[B, H, S, D]``, k/v ``[B, Hkv, K, D]``, ``q_pos [S]``, ``k_pos [Hkv or 1, K]``, ``heads [H]`` global
    query head indices, ``key_keep`` optional bool ``[B or 1, Hkv or 1, K]``: which held keys attend (key padding).
    Returns ``out [B, H, S, D]`` and ``lse [B, H, S]`` in the accumulation dtype (``lse = -inf`` and ``out = 0``
    where a query links to none of these keys, or keeps none of them)."""
    B, H, S, D = q.shape
    dt = acc_dtype(q.dtype)
    k_h, v_h, k_pos_h = _per_head(k, H, 1), _per_head(v, H, 1), _per_head(k_pos, H, 0)
    keep_h = _keep_per_head(key_keep, H)
    out = torch.zeros(B, H, S, D, dtype=dt, device=q.device)
    lse = torch.full((B, H, S), float("-inf"), dtype=dt, device=q.device)
    for r0, r1, c in _chunks(links, heads, q_pos, k_pos_h, B):
        if c.empty():
            continue
        s = (q[:, :, r0:r1].to(dt) @ _select(k_h, c.cols, dt).transpose(-1, -2)) * scale + c.log_count.to(dt)
        s = s + _padding_bias(keep_h, c.cols, dt)
        m = torch.logsumexp(s, dim=-1)
        pr = torch.exp(s - torch.where(torch.isfinite(m), m, 0.0).unsqueeze(-1))
        out[:, :, r0:r1] = pr @ _select(v_h, c.cols, dt)
        lse[:, :, r0:r1] = m
    return out, lse


def attend_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, links: Links,
                    heads: Tensor, scale: float, lse: Tensor, delta: Tensor,
                    key_keep=None) -> tuple[Tensor, Tensor, Tensor]:
    """Gradient contributions of this key set, given the *final* ``lse`` and ``delta = rowsum(dout * out)`` of
    the whole softmax (``key_keep`` as for ``attend_forward``). Returns ``dq [B, H, S, D]``, ``dk``/``dv
    [B, Hkv, K, D]``, in the accumulation dtype."""
    B, H, S, D = q.shape
    Hkv, K = k.shape[1], k.shape[2]
    dt = acc_dtype(q.dtype)
    k_h, v_h, k_pos_h = _per_head(k, H, 1), _per_head(v, H, 1), _per_head(k_pos, H, 0)
    keep_h = _keep_per_head(key_keep, H)
    dq = torch.zeros(B, H, S, D, dtype=dt, device=q.device)
    dk_h = torch.zeros(B, H, K, D, dtype=dt, device=q.device)
    dv_h = torch.zeros(B, H, K, D, dtype=dt, device=q.device)
    for r0, r1, c in _chunks(links, heads, q_pos, k_pos_h, B):
        if c.empty():
            continue
        kc, vc = _select(k_h, c.cols, dt), _select(v_h, c.cols, dt)
        qc, doc = q[:, :, r0:r1].to(dt), dout[:, :, r0:r1].to(dt)
        m = lse[:, :, r0:r1].to(dt)
        s = (qc @ kc.transpose(-1, -2)) * scale + c.log_count.to(dt) + _padding_bias(keep_h, c.cols, dt)
        pr = torch.exp(s - torch.where(torch.isfinite(m), m, 0.0).unsqueeze(-1))
        pr = torch.where(torch.isfinite(m).unsqueeze(-1), pr, 0.0)
        ds = pr * (doc @ vc.transpose(-1, -2) - delta[:, :, r0:r1].to(dt).unsqueeze(-1))
        dq[:, :, r0:r1] = (ds @ kc) * scale
        dk_h.index_add_(2, c.cols, (ds.transpose(-1, -2) @ qc) * scale)
        dv_h.index_add_(2, c.cols, pr.transpose(-1, -2) @ doc)
    g = H // Hkv
    return dq, dk_h.view(B, Hkv, g, K, D).sum(2), dv_h.view(B, Hkv, g, K, D).sum(2)


def merge(out: Tensor, lse: Tensor, out_i: Tensor, lse_i: Tensor) -> tuple[Tensor, Tensor]:
    """Two softmaxes over disjoint key sets as one (``-inf`` LSE: no keys)."""
    new = torch.logaddexp(lse, lse_i)
    safe = torch.where(torch.isfinite(new), new, 0.0)
    w0 = torch.where(torch.isfinite(lse), torch.exp(lse - safe), 0.0).unsqueeze(-1)
    w1 = torch.where(torch.isfinite(lse_i), torch.exp(lse_i - safe), 0.0).unsqueeze(-1)
    return out * w0 + out_i * w1, new
