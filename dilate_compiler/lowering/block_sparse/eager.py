"""The exact PyTorch path of block-sparse attention (any device, any dtype).

Query blocks are processed in chunks; each chunk gathers the key blocks its layout lists name, masks them
token by token (terms of partial blocks, causality, sequence end) and runs one softmax over the union, in
float32 (float64 for float64 inputs). Memory is bounded by the chunk, never O(N^2). The backward recomputes
the probabilities from the saved log-sum-exp, as FlashAttention does.

q may hold fewer rows than k: the last ``Nq`` of the ``Nk`` positions (decoding). The layout is built for Nk; only
the query blocks holding those positions are processed (q is padded in front to the first such block's start,
the padded rows are dropped), so a decode step's work is that of its layout rows, not of Nk x Nk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ...patterns.algebra import partial_mask
from ..common.dispatch import lse_dtype as acc_dtype  # accumulation and LSE dtype: float64 for float64, else float32
from ..dilated.eager import soft_cap

# Elements of the per-chunk score tensor (B * H * rows * keys); bounds the exact path's working memory.
CHUNK_ELEMENTS = 1 << 24


def _chunks(B: int, H: int, nb: int, width: int, bs: int, first: int = 0):
    """Query blocks ``[i0, i1)`` of ``[first, nb)``, in chunks whose score tensors are bounded."""
    per_block = max(B * H * bs * width * bs, 1)
    step = max(1, CHUNK_ELEMENTS // per_block)
    for i0 in range(first, nb, step):
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


def _gather(t: Tensor, j: Tensor, dtype) -> Tensor:
    """Rows ``j [H, C, L]`` of k or v ``[B, Hkv, Nk, D]`` for each query head (head h reads kv head
    ``h // (H // Hkv)``), in ``dtype``: ``[B, H, C, L, D]``. Only the rows named are read."""
    H = j.shape[0]
    kv_heads = torch.arange(H, device=j.device) // (H // t.shape[1])
    return t[:, kv_heads.view(-1, 1, 1), j].to(dtype)


def _query_blocks(t: Tensor, pad: tuple[int, int], dtype) -> Tensor:
    """``t [B, H, Nq, (D)]``, the last Nq positions, as whole query blocks ``[B, H, n, bs, (D)]``: ``pad`` =
    ``(front, back)`` zero rows before the first query (inside its block) and past the sequence end."""
    pad = (0, 0) + pad if t.dim() == 4 else pad
    return F.pad(t.to(dtype), pad)


def _query_span(Nq: int, N: int, bs: int) -> tuple[int, int, tuple[int, int]]:
    """``(first, nb, (front, back))``: the first block holding one of the last ``Nq`` of ``N`` positions, the block
    count, and the rows of blocks ``[first, nb)`` before the first query and past the end."""
    nb = -(-N // bs)
    first = (N - Nq) // bs
    return first, nb, (N - Nq - first * bs, nb * bs - N)


def _with_key_keep(mask: Tensor, j: Tensor, key_keep) -> Tensor:
    """The chunk's token mask ``[H, C, bs, K*bs]`` and the keys ``key_keep`` ``[B or 1, N]`` drops, as
    ``[B or 1, H, C, bs, K*bs]``."""
    if key_keep is None:
        return mask
    return mask & key_keep[:, j].unsqueeze(-2)


def block_sparse_forward_eager(q, k, v, terms, kv_count, kv_idx, kv_bits, coords, block_size: int, is_causal: bool,
                               scale: float, key_keep=None, softcap=None):
    """``(out [B, H, Nq, Dv], lse [B, H, Nq])``; q holds the last Nq of k's Nk positions (all of them: Nq == Nk).
    ``softcap``: scores ``c * tanh(scale * q.k / c)``."""
    B, H, Nq, D = q.shape
    N = k.shape[2]
    bs = block_size
    first, nb, pad = _query_span(Nq, N, bs)
    dt = acc_dtype(q.dtype)
    qb = _query_blocks(q, pad, dt).view(B, H, nb - first, bs, D)
    Dv = v.shape[-1]
    out = torch.empty(B, H, nb - first, bs, Dv, dtype=dt, device=q.device)
    lse = torch.empty(B, H, nb - first, bs, dtype=dt, device=q.device)
    for i0, i1 in _chunks(B, H, nb, kv_idx.shape[-1], bs, first):
        j, mask = _chunk_keys(terms, kv_count, kv_idx, kv_bits, coords, i0, i1, H, N, bs, is_causal)
        mask = _with_key_keep(mask, j, key_keep)
        s, _ = soft_cap((qb[:, :, i0 - first:i1 - first] @ _gather(k, j, dt).transpose(-1, -2)) * scale, softcap)
        s = s.masked_fill(~mask, float("-inf"))
        m = torch.logsumexp(s, dim=-1)
        pr = torch.exp(s - torch.where(torch.isfinite(m), m, 0.0).unsqueeze(-1))
        out[:, :, i0 - first:i1 - first] = pr @ _gather(v, j, dt)
        lse[:, :, i0 - first:i1 - first] = m
    rows = slice(pad[0], pad[0] + Nq)
    out = out.view(B, H, -1, Dv)[:, :, rows].to(q.dtype).contiguous()
    return out, lse.view(B, H, -1)[:, :, rows].contiguous()


def block_sparse_backward_eager(dout, q, k, v, out, lse, terms, kv_count, kv_idx, kv_bits, coords,
                                block_size: int, is_causal: bool, scale: float, key_keep=None, softcap=None):
    """``(dq, dk, dv)``; q holds the last Nq of k's Nk positions, dk/dv are the gradients of all Nk keys from them."""
    B, H, Nq, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    bs = block_size
    first, nb, pad = _query_span(Nq, N, bs)
    dt = acc_dtype(q.dtype)
    qb = _query_blocks(q, pad, dt).view(B, H, nb - first, bs, D)
    dob = _query_blocks(dout, pad, dt).view(B, H, nb - first, bs, dout.shape[-1])
    delta = _query_blocks((dout.to(dt) * out.to(dt)).sum(-1), pad, dt).view(B, H, nb - first, bs)
    lse_b = F.pad(lse.to(dt), pad, value=float("-inf")).view(B, H, nb - first, bs)
    dq = torch.zeros(B, H, nb - first, bs, D, dtype=dt, device=q.device)
    dk_h = torch.zeros(B, H, N, D, dtype=dt, device=q.device)
    Dv = v.shape[-1]
    dv_h = torch.zeros(B, H, N, Dv, dtype=dt, device=q.device)
    for i0, i1 in _chunks(B, H, nb, kv_idx.shape[-1], bs, first):
        j, mask = _chunk_keys(terms, kv_count, kv_idx, kv_bits, coords, i0, i1, H, N, bs, is_causal)
        mask = _with_key_keep(mask, j, key_keep)
        kg, vg = _gather(k, j, dt), _gather(v, j, dt)
        c = slice(i0 - first, i1 - first)
        qc, doc = qb[:, :, c], dob[:, :, c]
        s, dcap = soft_cap((qc @ kg.transpose(-1, -2)) * scale, softcap)
        m = lse_b[:, :, c]
        pr = torch.exp(s - torch.where(torch.isfinite(m), m, 0.0).unsqueeze(-1))
        pr = torch.where(mask & torch.isfinite(m).unsqueeze(-1), pr, 0.0)   # rows before the first query: lse -inf
        dp = doc @ vg.transpose(-1, -2)
        ds = pr * (dp - delta[:, :, c].unsqueeze(-1))
        if dcap is not None:
            ds = ds * dcap
        dq[:, :, c] = (ds @ kg) * scale
        C, L = j.shape[1], j.shape[2]
        idx = j.reshape(1, H, C * L, 1)
        dk_h.scatter_add_(2, idx.expand(B, H, C * L, D), ((ds.transpose(-1, -2) @ qc) * scale).reshape(B, H, C * L, D))
        dv_h.scatter_add_(2, idx.expand(B, H, C * L, Dv), (pr.transpose(-1, -2) @ doc).reshape(B, H, C * L, Dv))
    dq = dq.view(B, H, -1, D)[:, :, pad[0]:pad[0] + Nq].to(q.dtype).contiguous()
    dk = dk_h.view(B, Hkv, H // Hkv, N, D).sum(2).to(k.dtype)
    dv = dv_h.view(B, Hkv, H // Hkv, N, Dv).sum(2).to(v.dtype)
    return dq, dk, dv
