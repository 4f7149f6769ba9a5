"""Exact PyTorch path for dilated attention: forward and backward, any device, any N, and queries that are the
last Nq of the Nk key positions (decoding; the last section).

A branch's rows for one head group are a strided view of the (padded) sequence::

    x[B, H, N_pad, D].view(B, H, n_seg, w // r, r, D)[..., offset, :]   # rows seg*w + a*r + offset

so no gather of Q/K/V along the sequence is made. Each branch runs attention on its views chunk by chunk
(bounded memory) and its result is merged into one accumulator with an online log-sum-exp, which is
exactly LongNet's denominator-weighted mixing.

The backward is the FlashAttention-2 backward of each branch fed the *merged* LSE and
``delta = rowsum(dO * O)``: with ``P_pj = m_pj exp(s_pj - LSE_p)`` the softmax over the union of branches
splits into one term per branch, so the gradients through the mixing weights come out exactly.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..common.dispatch import lse_dtype
from .plan import Branch, DilatedPlan, HeadGroup

# Elements of one chunk's score tensor; a few such tensors live at once.
_CHUNK_ELEMENTS = 1 << 24
LOW_PRECISION = (torch.float16, torch.bfloat16)


def soft_cap(s: Tensor, softcap: Optional[float]) -> tuple[Tensor, Optional[Tensor]]:
    """``(c * tanh(s / c), 1 - tanh(s / c)^2)`` of scaled scores ``s`` with ``c = softcap`` (Gemma2's soft-capping,
    applied before any mask term); the second is the derivative, for the backward. ``softcap=None``: ``(s, None)``."""
    if softcap is None:
        return s, None
    t = torch.tanh(s / softcap)
    return t * softcap, 1.0 - t * t


def _padded_len(n: int, w: int) -> int:
    return -(-n // w) * w


def _pad_seq(x: Tensor, n_pad: int) -> Tensor:
    n = x.shape[-2] if x.dim() == 4 else x.shape[-1]
    if n_pad == n:
        return x
    if x.dim() == 4:
        return F.pad(x, (0, 0, 0, n_pad - n))
    return F.pad(x, (0, n_pad - n))


def _rows(x: Tensor, branch: Branch, offset: int) -> Tensor:
    """View ``[B, H, n_seg, w // r, D]`` (or ``[B, H, n_seg, w // r]``) of the rows ``seg*w + a*r + offset``."""
    w, r = branch.segment_length, branch.dilation_rate
    if x.dim() == 4:
        B, H, n, D = x.shape
        return x.view(B, H, n // w, w // r, r, D)[..., offset, :]
    B, H, n = x.shape
    return x.view(B, H, n // w, w // r, r)[..., offset]


class _BranchTiles:
    """The pieces shared by forward and backward for one (branch, head group)."""

    def __init__(self, branch: Branch, group: HeadGroup, seq_len: int, num_q_heads: int, num_kv_heads: int, device):
        self.branch, self.group = branch, group
        self.heads = slice(group.start, group.stop, group.step)
        w, r = branch.segment_length, branch.dilation_rate
        self.n_pad = _padded_len(seq_len, w)
        self.n_seg, self.rows_per_seg = self.n_pad // w, w // r
        self.num_heads = len(group.heads())
        gqa = num_q_heads // num_kv_heads
        self.kv_heads = torch.tensor([h // gqa for h in group.heads()], device=device)
        # Positions of the rows, [n_seg, w // r].
        self.pos = (
            torch.arange(self.n_seg, device=device).view(-1, 1) * w
            + torch.arange(self.rows_per_seg, device=device).view(1, -1) * r
            + group.offset
        )
        self.seq_len = seq_len

    def chunks(self, batch: int) -> Iterator[slice]:
        per_seg = batch * self.num_heads * self.rows_per_seg * self.rows_per_seg
        step = max(1, _CHUNK_ELEMENTS // max(per_seg, 1))
        for s0 in range(0, self.n_seg, step):
            yield slice(s0, min(s0 + step, self.n_seg))

    def scores(self, q_rows: Tensor, k_rows: Tensor, segs: slice, scale: float, is_causal: bool,
               attn_mask: Optional[Tensor], mask_shift: Optional[Tensor] = None,
               q_dtype: Optional[torch.dtype] = None, softcap: Optional[float] = None,
               cap_grad: bool = False):
        """Masked scores ``[B, h, n_chunk, a, a]``; pairs that are not linked hold ``-inf``. ``q_dtype``: the
        inputs' dtype (a float mask in it is added in it). ``softcap``: the scaled scores are soft-capped before
        the mask is added; with ``cap_grad`` the result is ``(scores, d cap / d s)`` (see ``soft_cap``)."""
        s, dcap = soft_cap(torch.matmul(q_rows, k_rows.transpose(-1, -2)) * scale, softcap)
        pos = self.pos[segs]
        linked = (pos < self.seq_len).unsqueeze(-2).expand(-1, self.rows_per_seg, -1)
        if is_causal:
            linked = linked & torch.ones(self.rows_per_seg, self.rows_per_seg, dtype=torch.bool,
                                         device=s.device).tril()
        if attn_mask is not None:
            B = q_rows.shape[0]
            idx = pos.clamp(max=self.seq_len - 1)
            full = attn_mask.expand(B, -1, self.seq_len, self.seq_len)
            if full.shape[1] != 1:
                full = full[:, self.heads]
            m = full[:, :, idx.unsqueeze(-1), idx.unsqueeze(-2)]
            if m.dtype == torch.bool:
                linked = linked & m
            else:
                if m.dtype == q_dtype and m.dtype in LOW_PRECISION:
                    # the model's scores + mask, added in its dtype: a row masked everywhere with finfo.min follows
                    # that dtype's rounding, as in the model (float32 would not round s + (-65504) to -65504)
                    s = (s.to(m.dtype) + m).to(s.dtype)
                else:
                    s = s + m.to(s.dtype)
                if mask_shift is not None:
                    shift = mask_shift.expand(B, -1, self.seq_len, 1)
                    if shift.shape[1] != 1:
                        shift = shift[:, self.heads]
                    s = s - shift[:, :, idx].to(s.dtype)
        s = s.masked_fill(~linked, float("-inf"))
        return (s, dcap) if cap_grad else s

    def dropout_scale(self, seed: int, tile: int, chunk: int, shape, p: float, device) -> Tensor:
        """``keep / (1 - p)`` for one chunk; a function of (seed, tile, chunk) only, so backward regenerates it."""
        gen = torch.Generator(device=device)
        gen.manual_seed((seed * 1_000_003 + tile * 65_537 + chunk) % (2**63 - 1))
        return (torch.rand(shape, generator=gen, device=device) >= p).to(torch.get_default_dtype()) / (1.0 - p)


def _merge_into(o_view: Tensor, l_view: Tensor, o: Tensor, lse: Tensor) -> None:
    """Online log-sum-exp merge of one branch's ``(o, lse)`` into the accumulators' views, in place."""
    l_old = l_view
    l_new = torch.logaddexp(l_old, lse)
    safe = torch.where(torch.isinf(l_new), 0.0, l_new)
    w_old = torch.exp(l_old - safe).unsqueeze(-1)
    w_new = torch.exp(lse - safe).unsqueeze(-1)
    o_view.mul_(w_old).add_(o.mul_(w_new))
    l_view.copy_(l_new)


def _fused_parts(x: Tensor, t: "_BranchTiles", kv: bool = False) -> list[Tensor]:
    """``x [B, H, >=N, (D)]`` at the tile's heads and rows, without padding: the full segments
    ``[B, h, n_full, w // r, (D)]`` and the partial last segment ``[B, h, c, (D)]``. Query-side heads are a
    slice (views, writable); ``kv=True`` picks the GQA heads, copying only the selected rows."""
    w, r, o, n = t.branch.segment_length, t.branch.dilation_rate, t.group.offset, t.seq_len
    full = n // w
    parts = []
    if full:
        head = x[:, :, : full * w]
        parts.append(head.view(*head.shape[:2], full, w // r, r, *head.shape[3:])[:, :, :, :, o])
    if full * w + o < n:
        parts.append(x[:, :, full * w + o : n : r])
    return [p.index_select(1, t.kv_heads) if kv else p[:, t.heads] for p in parts]


def _as_batch(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``[B, h, (n_seg,) L, D]`` -> contiguous ``[B, h * n_seg, L, D]`` in ``dtype`` (one copy)."""
    return x.reshape(x.shape[0], -1, x.shape[-2], x.shape[-1]).to(dtype).contiguous()


def fused_route_applies(q: Tensor, v: Tensor, attn_mask: Optional[Tensor], dropout_p: float, scale: float,
                        softcap: Optional[float] = None) -> bool:
    """The CPU flash-attention kernel (returns the LSE, takes it back in backward) runs each branch. It needs one
    head dim for q, k and v, a positive scale (its causal masking gives NaN rows for a negative one) and no
    soft-capping (it has no score modifier)."""
    return (q.device.type == "cpu" and attn_mask is None and dropout_p == 0.0 and scale > 0
            and v.shape[-1] == q.shape[-1] and softcap is None)


_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_flash_cpu_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default


def with_key_keep(attn_mask: Optional[Tensor], key_keep: Optional[Tensor]) -> Optional[Tensor]:
    """``attn_mask`` with the keys ``key_keep`` ``[B or 1, N]`` drops (False) dropped too: a bool mask for the
    exact path (additive masks get -inf there)."""
    if key_keep is None:
        return attn_mask
    keep = key_keep.view(key_keep.shape[0], 1, 1, key_keep.shape[1])
    if attn_mask is None:
        return keep
    attn_mask = as_4d(attn_mask)
    if attn_mask.dtype == torch.bool:
        return attn_mask & keep
    return torch.where(keep, attn_mask, float("-inf"))


def as_4d(mask: Optional[Tensor]) -> Optional[Tensor]:
    """A mask broadcastable to ``[B, H, N, N]`` with fewer dims gets leading 1s."""
    if mask is None or mask.dim() == 4:
        return mask
    return mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))


def row_shift(mask: Optional[Tensor], wdt: torch.dtype) -> Optional[Tensor]:
    """Per-row max of an additive mask (finite rows only), subtracted from the scores.

    Softmax is invariant to a per-row shift, but a row masked everywhere with ``finfo.min`` (a left-padded
    query in HF models) has scores ``min + s == min``: its log-sum-exp ``min + log(n)`` is not representable
    and ``exp(s - lse)`` would be 1 instead of 1/n. Shifted, that row is 0 everywhere: exact and uniform,
    as eager softmax gives it. Rows of ordinary masks have max 0 and are left alone.
    """
    if mask is None or mask.dtype == torch.bool:
        return None
    shift = mask.to(wdt).amax(-1, keepdim=True)
    return torch.where(torch.isfinite(shift), shift, 0.0)


def _tiles(plan: DilatedPlan, seq_len: int, hq: int, hkv: int, device) -> Iterator[_BranchTiles]:
    for branch in plan.branches:
        for group in branch.head_groups:
            yield _BranchTiles(branch, group, seq_len, hq, hkv, device)


def _forward_tile_fused(t: _BranchTiles, q, k, v, out_acc, lse_acc, scale, is_causal, wdt) -> None:
    for qp, kp, vp, o_view, l_view in zip(_fused_parts(q, t), _fused_parts(k, t, kv=True),
                                          _fused_parts(v, t, kv=True), _fused_parts(out_acc, t),
                                          _fused_parts(lse_acc, t)):
        o, lse = _flash_cpu(_as_batch(qp, wdt), _as_batch(kp, wdt), _as_batch(vp, wdt), 0.0, is_causal, scale=scale)
        _merge_into(o_view, l_view, o.view(o_view.shape), lse.to(wdt).view(l_view.shape))


def _forward_tile_chunked(t: _BranchTiles, tile: int, q, k, v, out_acc, lse_acc, scale, is_causal, attn_mask,
                          shift, dropout_p, seed, wdt, softcap) -> None:
    off = t.group.offset
    q_b = _rows(_pad_seq(q[:, t.heads], t.n_pad), t.branch, off)
    k_b = _rows(_pad_seq(k.index_select(1, t.kv_heads), t.n_pad), t.branch, off)
    v_b = _rows(_pad_seq(v.index_select(1, t.kv_heads), t.n_pad), t.branch, off)
    o_view = _rows(out_acc[:, t.heads, : t.n_pad], t.branch, off)
    l_view = _rows(lse_acc[:, t.heads, : t.n_pad], t.branch, off)
    for chunk, segs in enumerate(t.chunks(q.shape[0])):
        s = t.scores(q_b[:, :, segs].to(wdt), k_b[:, :, segs].to(wdt), segs, scale, is_causal, attn_mask, shift,
                     q.dtype, softcap)
        lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse).unsqueeze(-1))
        if dropout_p > 0.0:
            p = p * t.dropout_scale(seed, tile, chunk, p.shape, dropout_p, q.device).to(wdt)
        _merge_into(o_view[:, :, segs], l_view[:, :, segs], torch.matmul(p, v_b[:, :, segs].to(wdt)), lse)


def dilated_attention_forward_eager(
    q: Tensor, k: Tensor, v: Tensor, plan: DilatedPlan, *, is_causal: bool, scale: float,
    attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0, seed: int = 0, softcap: Optional[float] = None,
) -> tuple[Tensor, Tensor]:
    """Returns ``out [B, Hq, Nq, D]`` (q's dtype) and the merged ``lse [B, Hq, Nq]`` (float32, or float64). With
    ``Nq < Nk`` the queries are the last Nq key positions (see the section on them below). ``softcap``: scores
    ``c * tanh(scale * q.k / c)`` (then the mask and pattern apply)."""
    B, Hq, N, _ = q.shape
    attn_mask = as_4d(attn_mask)
    if k.shape[2] != N:
        _check_no_dropout(dropout_p, N, k.shape[2])
        return _forward_last_queries(q, k, v, plan, is_causal, scale, attn_mask, softcap)
    wdt = lse_dtype(q.dtype)
    n_acc = max([_padded_len(N, b.segment_length) for b in plan.branches] + [N])
    out_acc = torch.zeros(B, Hq, n_acc, v.shape[-1], dtype=wdt, device=q.device)
    lse_acc = torch.full((B, Hq, n_acc), float("-inf"), dtype=wdt, device=q.device)
    fused = fused_route_applies(q, v, attn_mask, dropout_p, scale, softcap)
    shift = None if fused else row_shift(attn_mask, wdt)
    for tile, t in enumerate(_tiles(plan, N, Hq, k.shape[1], q.device)):
        if fused:
            _forward_tile_fused(t, q, k, v, out_acc, lse_acc, scale, is_causal, wdt)
        else:
            _forward_tile_chunked(t, tile, q, k, v, out_acc, lse_acc, scale, is_causal, attn_mask, shift, dropout_p,
                                  seed, wdt, softcap)
    out = out_acc[:, :, :N]
    if plan.output_scale != 1.0:
        out = out * plan.output_scale
    return out.to(q.dtype).contiguous(), lse_acc[:, :, :N].contiguous()


def _backward_tile_fused(t: _BranchTiles, q, k, v, d_att, out_att, lse, grads, scale, is_causal, wdt) -> None:
    parts = [_fused_parts(q, t), _fused_parts(k, t, kv=True), _fused_parts(v, t, kv=True)]
    parts += [_fused_parts(x, t) for x in (d_att, out_att, lse) + tuple(grads)]
    for qp, kp, vp, dop, op, lp, *grad_views in zip(*parts):
        part_grads = _flash_cpu_bwd(
            _as_batch(dop, wdt), _as_batch(qp, wdt), _as_batch(kp, wdt), _as_batch(vp, wdt), _as_batch(op, wdt),
            lp.reshape(lp.shape[0], -1, lp.shape[-1]).contiguous(), 0.0, is_causal, scale=scale)
        for view, g in zip(grad_views, part_grads):
            view += g.view(view.shape)


def _backward_tile_chunked(t: _BranchTiles, tile: int, q, k, v, d_att, lse, delta, grads, scale, is_causal,
                           attn_mask, shift, dropout_p, seed, wdt, softcap) -> None:
    off = t.group.offset
    rows = lambda x: _rows(_pad_seq(x, t.n_pad), t.branch, off)  # noqa: E731
    q_b, k_b, v_b = rows(q[:, t.heads]), rows(k.index_select(1, t.kv_heads)), rows(v.index_select(1, t.kv_heads))
    do_b, lse_b, delta_b = rows(d_att[:, t.heads]), rows(lse[:, t.heads]), rows(delta[:, t.heads])
    dq_b, dk_b, dv_b = (_rows(g[:, t.heads, : t.n_pad], t.branch, off) for g in grads)
    for chunk, segs in enumerate(t.chunks(q.shape[0])):
        qs, ks, vs = (x[:, :, segs].to(wdt) for x in (q_b, k_b, v_b))
        dos = do_b[:, :, segs]
        s, dcap = t.scores(qs, ks, segs, scale, is_causal, attn_mask, shift, q.dtype, softcap, cap_grad=True)
        p = torch.exp(s - lse_b[:, :, segs].unsqueeze(-1))
        dp = torch.matmul(dos, vs.transpose(-1, -2))
        if dropout_p > 0.0:
            keep = t.dropout_scale(seed, tile, chunk, p.shape, dropout_p, q.device).to(wdt)
            dv_b[:, :, segs] += torch.matmul((p * keep).transpose(-1, -2), dos)
            dp = dp * keep
        else:
            dv_b[:, :, segs] += torch.matmul(p.transpose(-1, -2), dos)
        ds = p * (dp - delta_b[:, :, segs].unsqueeze(-1))
        if dcap is not None:
            ds = ds * dcap
        dq_b[:, :, segs] += torch.matmul(ds, ks) * scale
        dk_b[:, :, segs] += torch.matmul(ds.transpose(-1, -2), qs) * scale


def _backward_inputs(dout: Tensor, lse: Tensor, plan: DilatedPlan, wdt: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(d_att, lse_w)`` in the working dtype: the output gradient through the plan's output scale, and the LSE with
    the rows that keep no key (``-inf``) at 0, so their probabilities come out 0."""
    dout_w = dout.to(wdt)
    d_att = dout_w * plan.output_scale if plan.output_scale != 1.0 else dout_w
    lse_w = lse.to(wdt)
    return d_att, torch.where(torch.isinf(lse_w), 0.0, lse_w)


def dilated_attention_backward_eager(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, plan: DilatedPlan, *,
    is_causal: bool, scale: float, attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0, seed: int = 0,
    softcap: Optional[float] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    B, Hq, N, D = q.shape
    attn_mask = as_4d(attn_mask)
    if k.shape[2] != N:
        _check_no_dropout(dropout_p, N, k.shape[2])
        return _backward_last_queries(dout, q, k, v, out, lse, plan, is_causal, scale, attn_mask, softcap=softcap)
    Hkv = k.shape[1]
    wdt = lse_dtype(q.dtype)
    d_att, lse_w = _backward_inputs(dout, lse, plan, wdt)
    n_acc = max([_padded_len(N, b.segment_length) for b in plan.branches] + [N])
    # dq, and dk/dv per *query* head (summed over each GQA group at the end).
    grads = tuple(torch.zeros(B, Hq, n_acc, d, dtype=wdt, device=q.device) for d in (D, D, v.shape[-1]))
    if fused_route_applies(q, v, attn_mask, dropout_p, scale, softcap):
        out_att = out.to(wdt) / plan.output_scale if plan.output_scale != 1.0 else out.to(wdt)
        for t in _tiles(plan, N, Hq, Hkv, q.device):
            _backward_tile_fused(t, q, k, v, d_att, out_att, lse_w, grads, scale, is_causal, wdt)
    else:
        delta = (dout.to(wdt) * out.to(wdt)).sum(-1)
        shift = row_shift(attn_mask, wdt)
        for tile, t in enumerate(_tiles(plan, N, Hq, Hkv, q.device)):
            _backward_tile_chunked(t, tile, q, k, v, d_att, lse_w, delta, grads, scale, is_causal, attn_mask,
                                   shift, dropout_p, seed, wdt, softcap)
    dq, dk_h, dv_h = (g[:, :, :N] for g in grads)
    dk = dk_h.reshape(B, Hkv, Hq // Hkv, N, D).sum(2)
    dv = dv_h.reshape(B, Hkv, Hq // Hkv, N, v.shape[-1]).sum(2)
    return dq.to(q.dtype).contiguous(), dk.to(k.dtype).contiguous(), dv.to(v.dtype).contiguous()


def dilated_attention_mask_grad_eager(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, plan: DilatedPlan, *,
    is_causal: bool, scale: float, attn_mask: Tensor, dropout_p: float = 0.0, seed: int = 0,
    key_keep: Optional[Tensor] = None, softcap: Optional[float] = None,
) -> Tensor:
    """The gradient with respect to a floating ``attn_mask`` (a learned bias), in its shape: the mask is added to
    every linking branch's scores, so its gradient at ``(p, j)`` is the sum of those branches' ``dS`` (0 at the
    keys ``key_keep`` drops). The mask is added after any soft-capping, so the cap's derivative is not in it."""
    mask4 = as_4d(attn_mask)
    scores_mask = with_key_keep(mask4, key_keep)
    wdt = lse_dtype(q.dtype)
    B, Hq, N, _ = q.shape
    dmask = torch.zeros(mask4.shape, dtype=wdt, device=q.device)
    if k.shape[2] != N:
        _check_no_dropout(dropout_p, N, k.shape[2])
        _backward_last_queries(dout, q, k, v, out, lse, plan, is_causal, scale, scores_mask, dmask, softcap)
        return dmask.reshape(attn_mask.shape).to(attn_mask.dtype)
    d_att, lse_w = _backward_inputs(dout, lse, plan, wdt)
    delta = (dout.to(wdt) * out.to(wdt)).sum(-1)
    shift = row_shift(scores_mask, wdt)
    for tile, t in enumerate(_tiles(plan, N, Hq, k.shape[1], q.device)):
        rows = lambda x: _rows(_pad_seq(x, t.n_pad), t.branch, t.group.offset)  # noqa: E731
        q_b, k_b, v_b = rows(q[:, t.heads]), rows(k.index_select(1, t.kv_heads)), rows(v.index_select(1, t.kv_heads))
        do_b, lse_b, delta_b = rows(d_att[:, t.heads]), rows(lse_w[:, t.heads]), rows(delta[:, t.heads])
        target = dmask if dmask.shape[1] == 1 else dmask[:, t.heads]
        for chunk, segs in enumerate(t.chunks(B)):
            qs, ks, vs = (x[:, :, segs].to(wdt) for x in (q_b, k_b, v_b))
            s = t.scores(qs, ks, segs, scale, is_causal, scores_mask, shift, q.dtype, softcap)
            p = torch.exp(s - lse_b[:, :, segs].unsqueeze(-1))
            dp = torch.matmul(do_b[:, :, segs], vs.transpose(-1, -2))
            if dropout_p > 0.0:
                dp = dp * t.dropout_scale(seed, tile, chunk, p.shape, dropout_p, q.device).to(wdt)
            ds = p * (dp - delta_b[:, :, segs].unsqueeze(-1))      # [B, h, n_chunk, a, a]
            ds = ds.sum(0, keepdim=True) if target.shape[0] == 1 else ds
            ds = ds.sum(1, keepdim=True) if target.shape[1] == 1 else ds
            pos = t.pos[segs].clamp(max=N - 1)                      # padded rows: ds is 0 there
            p_idx, j_idx = pos.unsqueeze(-1), pos.unsqueeze(-2)
            b_idx = torch.arange(target.shape[0], device=q.device).view(-1, 1, 1, 1, 1)
            h_idx = torch.arange(target.shape[1], device=q.device).view(1, -1, 1, 1, 1)
            target.index_put_((b_idx, h_idx, p_idx, j_idx), ds, accumulate=True)
    return dmask.reshape(attn_mask.shape).to(attn_mask.dtype)


# --- queries that are the last Nq of the Nk key positions (decoding with a KV cache) ---------------------------
#
# q holds the positions Q0 = Nk - Nq .. Nk - 1 (row p - Q0); the pattern is evaluated on those absolute positions.
# A branch's segments before the one Q0 falls in hold no query and are skipped; the segment Q0 falls in attends
# with its rows >= Q0 as queries (all its rows as keys), the later segments whole. Rows are gathered by position,
# so the work is that of the given queries (one query: one segment's keys per branch), never Nk x Nk. The
# accumulators have one spare row (index Nq, and Nk for keys) that positions past the end write to.


def _last_query_chunks(branch: Branch, group: HeadGroup, n_q: int, n_k: int, width: int, device):
    """``(q_pos [S, a], k_pos [S, c])`` of the group's rows, in chunks of ``S`` segments (``a`` query rows, ``c`` key
    rows each) whose score tensors hold at most ``_CHUNK_ELEMENTS`` elements for ``width`` batch rows x heads.
    Positions may pass ``n_k`` (the last segment's tail): those are masked."""
    w, r, o = branch.segment_length, branch.dilation_rate, group.offset
    q0 = n_k - n_q
    rows = torch.arange(w // r, device=device)
    first, n_seg = q0 // w, -(-n_k // w)
    full_from = first
    if q0 % w:   # the segment Q0 falls in: its rows >= Q0 are queries
        full_from = first + 1
        keys = first * w + o + r * rows
        queries = keys[max(0, -(-(q0 - first * w - o) // r)):]
        step = max(1, _CHUNK_ELEMENTS // max(width * keys.numel(), 1))
        for a0 in range(0, queries.numel(), step):
            yield queries[a0:a0 + step].view(1, -1), keys.view(1, -1)
    step = max(1, _CHUNK_ELEMENTS // max(width * rows.numel() ** 2, 1))
    for s0 in range(full_from, n_seg, step):
        pos = torch.arange(s0, min(s0 + step, n_seg), device=device).view(-1, 1) * w + o + r * rows
        yield pos, pos


class _LastQueryChunk:
    """One chunk of one (branch, head group) on trailing queries: the indices and the masked scores."""

    def __init__(self, t_heads: slice, kv_heads: Tensor, q_pos: Tensor, k_pos: Tensor, n_q: int, n_k: int):
        q0 = n_k - n_q
        self.heads = t_heads
        self.q_ok, self.k_ok = q_pos < n_k, k_pos < n_k
        self.qi = torch.where(self.q_ok, q_pos - q0, n_q)           # rows of q-side accumulators (n_q: spare)
        self.kj = torch.where(self.k_ok, k_pos, n_k)                # rows of k-side accumulators (n_k: spare)
        self.qi_in = self.qi.clamp(max=n_q - 1)                     # rows read from q-side inputs
        self.kj_in = self.kj.clamp(max=n_k - 1)
        self.q_pos, self.k_pos = q_pos, k_pos
        self.kv_heads = kv_heads.view(-1, 1, 1)

    def q_rows(self, x: Tensor, dtype) -> Tensor:
        """``x [B, Hq, Nq, (D)]`` at the chunk's heads and query rows: ``[B, h, S, a, (D)]``."""
        return x[:, self.heads][:, :, self.qi_in].to(dtype)

    def kv_rows(self, x: Tensor, dtype) -> Tensor:
        """``x [B, Hkv, Nk, D]`` at the kv heads of the chunk's query heads and its key rows: ``[B, h, S, c, D]``."""
        return x[:, self.kv_heads, self.kj_in].to(dtype)

    def scores(self, qs: Tensor, ks: Tensor, scale: float, is_causal: bool, attn_mask: Optional[Tensor],
               shift: Optional[Tensor], q_dtype, softcap: Optional[float] = None, cap_grad: bool = False):
        """Masked scores ``[B, h, S, a, c]`` (``-inf`` where not linked), as ``_BranchTiles.scores`` makes them."""
        s, dcap = soft_cap(torch.matmul(qs, ks.transpose(-1, -2)) * scale, softcap)
        linked = self.q_ok.unsqueeze(-1) & self.k_ok.unsqueeze(-2)
        if is_causal:
            linked = linked & (self.k_pos.unsqueeze(-2) <= self.q_pos.unsqueeze(-1))
        if attn_mask is not None:
            m = self.mask_rows(attn_mask)
            if m.dtype == torch.bool:
                linked = linked & m
            else:
                if m.dtype == q_dtype and m.dtype in LOW_PRECISION:   # added in the model's dtype (see above)
                    s = (s.to(m.dtype) + m).to(s.dtype)
                else:
                    s = s + m.to(s.dtype)
                if shift is not None:
                    s = s - self.mask_rows(shift, keys=False).to(s.dtype).unsqueeze(-1)
        s = s.masked_fill(~linked, float("-inf"))
        return (s, dcap) if cap_grad else s

    def mask_rows(self, mask: Tensor, keys: bool = True) -> Tensor:
        """``mask [B', 1 or Hq, 1 or Nq, 1 or Nk]`` at the chunk's heads, query rows (and key rows):
        ``[B', h or 1, S, a(, c)]``."""
        heads = mask if mask.shape[1] == 1 else mask[:, self.heads]
        qi = self.qi_in if mask.shape[2] != 1 else torch.zeros_like(self.qi_in)
        if not keys:
            return heads[:, :, qi, 0]
        kj = self.kj_in if mask.shape[3] != 1 else torch.zeros_like(self.kj_in)
        return heads[:, :, qi.unsqueeze(-1), kj.unsqueeze(-2)]


def _last_query_tiles(plan: DilatedPlan, n_q: int, n_k: int, batch: int, hq: int, hkv: int, device):
    """``(tile index, chunk index, _LastQueryChunk)`` over every (branch, head group) and its chunks."""
    gqa = hq // hkv
    tile = 0
    for branch in plan.branches:
        for group in branch.head_groups:
            heads = slice(group.start, group.stop, group.step)
            kv_heads = torch.tensor([h // gqa for h in group.heads()], device=device)
            width = batch * len(group.heads())
            for chunk, (q_pos, k_pos) in enumerate(_last_query_chunks(branch, group, n_q, n_k, width, device)):
                yield tile, chunk, _LastQueryChunk(heads, kv_heads, q_pos, k_pos, n_q, n_k)
            tile += 1


def _check_no_dropout(dropout_p: float, n_q: int, n_k: int) -> None:
    if dropout_p > 0.0:
        raise NotImplementedError(
            f"dropout (dropout_p={dropout_p}) on the exact path with queries that are the last {n_q} of {n_k} key "
            f"positions: its keep flags are drawn per chunk of a self-attention call; accepted: dropout_p=0.0 (the "
            f"CUDA kernels take dropout with trailing queries)")


def _forward_last_queries(q: Tensor, k: Tensor, v: Tensor, plan: DilatedPlan, is_causal: bool, scale: float,
                          attn_mask: Optional[Tensor], softcap: Optional[float] = None) -> tuple[Tensor, Tensor]:
    B, Hq, n_q, _ = q.shape
    n_k = k.shape[2]
    wdt = lse_dtype(q.dtype)
    out_acc = torch.zeros(B, Hq, n_q + 1, v.shape[-1], dtype=wdt, device=q.device)
    lse_acc = torch.full((B, Hq, n_q + 1), float("-inf"), dtype=wdt, device=q.device)
    shift = row_shift(attn_mask, wdt)
    for _, _, c in _last_query_tiles(plan, n_q, n_k, B, Hq, k.shape[1], q.device):
        s = c.scores(c.q_rows(q, wdt), c.kv_rows(k, wdt), scale, is_causal, attn_mask, shift, q.dtype, softcap)
        lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse).unsqueeze(-1))
        o_view, l_view = out_acc[:, c.heads], lse_acc[:, c.heads]
        o_old, l_old = o_view[:, :, c.qi], l_view[:, :, c.qi]
        _merge_into(o_old, l_old, torch.matmul(p, c.kv_rows(v, wdt)), lse)
        o_view[:, :, c.qi], l_view[:, :, c.qi] = o_old, l_old
    out = out_acc[:, :, :n_q]
    if plan.output_scale != 1.0:
        out = out * plan.output_scale
    return out.to(q.dtype).contiguous(), lse_acc[:, :, :n_q].contiguous()


def _backward_last_queries(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                           plan: DilatedPlan, is_causal: bool, scale: float, attn_mask: Optional[Tensor],
                           dmask: Optional[Tensor] = None, softcap: Optional[float] = None,
                           ) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)``; with ``dmask`` (zeros of the 4-D mask's shape, in the working dtype) also the mask's
    gradient, accumulated into it."""
    B, Hq, n_q, D = q.shape
    Hkv, n_k, Dv = k.shape[1], k.shape[2], v.shape[-1]
    wdt = lse_dtype(q.dtype)
    d_att, lse_w = _backward_inputs(dout, lse, plan, wdt)
    delta = (dout.to(wdt) * out.to(wdt)).sum(-1)
    shift = row_shift(attn_mask, wdt)
    dq = torch.zeros(B, Hq, n_q + 1, D, dtype=wdt, device=q.device)
    # dk/dv per *query* head (summed over each GQA group at the end)
    dk_h = torch.zeros(B, Hq, n_k + 1, D, dtype=wdt, device=q.device)
    dv_h = torch.zeros(B, Hq, n_k + 1, Dv, dtype=wdt, device=q.device)
    for _, _, c in _last_query_tiles(plan, n_q, n_k, B, Hq, Hkv, q.device):
        qs, ks, vs = c.q_rows(q, wdt), c.kv_rows(k, wdt), c.kv_rows(v, wdt)
        dos = c.q_rows(d_att, wdt)
        s, dcap = c.scores(qs, ks, scale, is_causal, attn_mask, shift, q.dtype, softcap, cap_grad=True)
        p = torch.exp(s - c.q_rows(lse_w, wdt).unsqueeze(-1))
        ds = p * (torch.matmul(dos, vs.transpose(-1, -2)) - c.q_rows(delta, wdt).unsqueeze(-1))
        if dmask is not None:
            _add_mask_grad(dmask, ds, c)
        if dcap is not None:
            ds = ds * dcap
        h = ds.shape[1]
        qi, kj = c.qi.flatten(), c.kj.flatten()
        dq[:, c.heads].index_add_(2, qi, (torch.matmul(ds, ks) * scale).reshape(B, h, -1, D))
        dk_h[:, c.heads].index_add_(2, kj, (torch.matmul(ds.transpose(-1, -2), qs) * scale).reshape(B, h, -1, D))
        dv_h[:, c.heads].index_add_(2, kj, torch.matmul(p.transpose(-1, -2), dos).reshape(B, h, -1, Dv))
    dk = dk_h[:, :, :n_k].reshape(B, Hkv, Hq // Hkv, n_k, D).sum(2)
    dv = dv_h[:, :, :n_k].reshape(B, Hkv, Hq // Hkv, n_k, Dv).sum(2)
    return dq[:, :, :n_q].to(q.dtype).contiguous(), dk.to(k.dtype).contiguous(), dv.to(v.dtype).contiguous()


def _add_mask_grad(dmask: Tensor, ds: Tensor, c: _LastQueryChunk) -> None:
    """Accumulate one chunk's ``dS [B, h, S, a, c]`` into ``dmask [B', 1 or Hq, 1 or Nq, 1 or Nk]``."""
    ds = ds.sum(0, keepdim=True) if dmask.shape[0] == 1 else ds
    target = dmask if dmask.shape[1] == 1 else dmask[:, c.heads]
    ds = ds.sum(1, keepdim=True) if target.shape[1] == 1 else ds
    qi = c.qi_in if dmask.shape[2] != 1 else torch.zeros_like(c.qi_in)   # rows past the end: ds is 0 there
    kj = c.kj_in if dmask.shape[3] != 1 else torch.zeros_like(c.kj_in)
    b_idx = torch.arange(target.shape[0], device=ds.device).view(-1, 1, 1, 1, 1)
    h_idx = torch.arange(target.shape[1], device=ds.device).view(1, -1, 1, 1, 1)
    target.index_put_((b_idx, h_idx, qi.unsqueeze(-1), kj.unsqueeze(-2)), ds, accumulate=True)
