"""The exact PyTorch path of block-sparse attention (any device, any dtype).

Query blocks are processed in chunks; each chunk gathers the key blocks its layout lists name, masks them
token by token (terms of partial blocks, causality, sequence end) and runs one softmax over the union, in
float32 (float64 for float64 inputs). Memory is bounded by the chunk, never O(N^2). The backward recomputes
the probabilities from the saved log-sum-exp, as FlashAttention does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ...patterns.algebra import partial_mask
from ..common.dispatch import lse_dtype as acc_dtype  # accumulation and LSE dtype: float64 for float64, else float32

# Elements of the per-chunk score tensor (B * H * rows * keys); bounds the exact path's working memory.
CHUNK_ELEMENTS = 1 << 24


def _chunks(B: int, H: int, nb: int, width: int, bs: int):
    per_block = max(B * H * bs * width * bs, 1)
    step = max(1, CHUNK_ELEMENTS // per_block)
    for i0 in range(0, nb, step):
        yield i0, min(nb, i0 + step)


def _chunk_keys(terms, kv_count, kv_idx, kv_bits, coords, i0, i1, H, N, bs, is_causal):
    """Key positions ``[H, C, K*bs]`` (clamped into range) and the token mask ``[H, C, bs, K*bs]``."""
    dev = kv_idx.device
    hl, _, width = kv_idx.shape
    r = torch.arange(bs, device=dev)
    idx = kv_idx[:, i0:i1].long()                                         # [hl, C, K]
    j = (idx.unsqueeze(-1) * bs + r).flatten(-2)                          # [hl, C, K*bs]
    e = torch.arange(width, device=dev).repeat_interleave(bs)             # entry of each key column
    cnt = kv_count[:, i0:i1].long()
    valid = e.view(1, 1, -1) < cnt[..., 1:2]
    partial = e.view(1, 1, -1) < cnt[..., 0:1]
    bits = kv_bits[:, i0:i1].repeat_interleave(bs, dim=-1)                # [hl, C, K*bs]
    p = (torch.arange(i0, i1, device=dev).view(-1, 1) * bs + r).view(1, i1 - i0, bs, 1)
    jj = j.unsqueeze(2)                                                   # [hl, C, 1, K*bs]
    ok = partial_mask(terms, bits.unsqueeze(2), p, jj, coords)
    mask = (valid & ~partial).unsqueeze(2) | (partial.unsqueeze(2) & ok)
    mask = mask & (jj < N) & (p < N)
    if is_causal:
        mask = mask & (jj <= p)
    j = j.clamp(max=N - 1)
    if hl != H:
        j, mask = j.expand(H, *j.shape[1:]), mask.expand(H, *mask.shape[1:])
    return j, mask


def _per_head(t: Tensor, H: int, dtype) -> Tensor:
    """k or v ``[B, Hkv, N, D]`` as ``[B, H, N, D]`` (query head h reads kv head h // (H // Hkv))."""
    return t.to(dtype).repeat_interleave(H // t.shape[1], dim=1)


def _gather(t_h: Tensor, j: Tensor) -> Tensor:
    B, H, _, D = t_h.shape
    C, L = j.shape[1], j.shape[2]
    idx = j.reshape(1, H, C * L, 1).expand(B, H, C * L, D)
    return torch.gather(t_h, 2, idx).view(B, H, C, L, D)


def _padded_blocks(t: Tensor, nb: int, bs: int, dtype) -> Tensor:
    B, H, N, D = t.shape
    return F.pad(t.to(dtype), (0, 0, 0, nb * bs - N)).view(B, H, nb, bs, D)


def _with_key_keep(mask: Tensor, j: Tensor, key_keep) -> Tensor:
    """The chunk's token mask ``[H, C, bs, K*bs]`` and the keys ``key_keep`` ``[B or 1, N]`` drops, as
    ``[B or 1, H, C, bs, K*bs]``."""
    if key_keep is None:
        return mask
    return mask & key_keep[:, j].unsqueeze(-2)


def block_sparse_forward_eager(q, k, v, terms, kv_count, kv_idx, kv_bits, coords, block_size: int, is_causal: bool,
                               scale: float, key_keep=None):
    B, H, N, D = q.shape
    bs = block_size
    nb = -(-N // bs)
    dt = acc_dtype(q.dtype)
    k_h, v_h = _per_head(k, H, dt), _per_head(v, H, dt)
    qb = _padded_blocks(q, nb, bs, dt)
    Dv = v.shape[-1]
    out = torch.empty(B, H, nb, bs, Dv, dtype=dt, device=q.device)
    lse = torch.empty(B, H, nb, bs, dtype=dt, device=q.device)
    for i0, i1 in _chunks(B, H, nb, kv_idx.shape[-1], bs):
        j, mask = _chunk_keys(terms, kv_count, kv_idx, kv_bits, coords, i0, i1, H, N, bs, is_causal)
        mask = _with_key_keep(mask, j, key_keep)
        s = (qb[:, :, i0:i1] @ _gather(k_h, j).transpose(-1, -2)) * scale
        s = s.masked_fill(~mask, float("-inf"))
        m = torch.logsumexp(s, dim=-1)
        pr = torch.exp(s - torch.where(torch.isfinite(m), m, 0.0).unsqueeze(-1))
        out[:, :, i0:i1] = pr @ _gather(v_h, j)
        lse[:, :, i0:i1] = m
    out = out.view(B, H, nb * bs, Dv)[:, :, :N].to(q.dtype).contiguous()
    return out, lse.view(B, H, nb * bs)[:, :, :N].contiguous()


def block_sparse_backward_eager(dout, q, k, v, out, lse, terms, kv_count, kv_idx, kv_bits, coords,
                                block_size: int, is_causal: bool, scale: float, key_keep=None):
    B, H, N, D = q.shape
    Hkv = k.shape[1]
    bs = block_size
    nb = -(-N // bs)
    dt = acc_dtype(q.dtype)
    k_h, v_h = _per_head(k, H, dt), _per_head(v, H, dt)
    qb, dob = _padded_blocks(q, nb, bs, dt), _padded_blocks(dout, nb, bs, dt)
    delta = (dout.to(dt) * out.to(dt)).sum(-1)
    delta = F.pad(delta, (0, nb * bs - N)).view(B, H, nb, bs)
    lse_b = F.pad(lse.to(dt), (0, nb * bs - N), value=float("-inf")).view(B, H, nb, bs)
    dq = torch.zeros(B, H, nb, bs, D, dtype=dt, device=q.device)
    dk_h = torch.zeros(B, H, N, D, dtype=dt, device=q.device)
    Dv = v.shape[-1]
    dv_h = torch.zeros(B, H, N, Dv, dtype=dt, device=q.device)
    for i0, i1 in _chunks(B, H, nb, kv_idx.shape[-1], bs):
        j, mask = _chunk_keys(terms, kv_count, kv_idx, kv_bits, coords, i0, i1, H, N, bs, is_causal)
        mask = _with_key_keep(mask, j, key_keep)
        kg, vg = _gather(k_h, j), _gather(v_h, j)
        qc, doc = qb[:, :, i0:i1], dob[:, :, i0:i1]
        s = (qc @ kg.transpose(-1, -2)) * scale
        m = lse_b[:, :, i0:i1]
        pr = torch.exp(s - torch.where(torch.isfinite(m), m, 0.0).unsqueeze(-1))
        pr = torch.where(mask & torch.isfinite(m).unsqueeze(-1), pr, 0.0)
        dp = doc @ vg.transpose(-1, -2)
        ds = pr * (dp - delta[:, :, i0:i1].unsqueeze(-1))
        dq[:, :, i0:i1] = (ds @ kg) * scale
        C, L = j.shape[1], j.shape[2]
        idx = j.reshape(1, H, C * L, 1)
        dk_h.scatter_add_(2, idx.expand(B, H, C * L, D), ((ds.transpose(-1, -2) @ qc) * scale).reshape(B, H, C * L, D))
        dv_h.scatter_add_(2, idx.expand(B, H, C * L, Dv), (pr.transpose(-1, -2) @ doc).reshape(B, H, C * L, Dv))
    dq = dq.view(B, H, nb * bs, D)[:, :, :N].to(q.dtype).contiguous()
    dk = dk_h.view(B, Hkv, H // Hkv, N, D).sum(2).to(k.dtype)
    dv = dv_h.view(B, Hkv, H // Hkv, N, Dv).sum(2).to(v.dtype)
    return dq, dk, dv
