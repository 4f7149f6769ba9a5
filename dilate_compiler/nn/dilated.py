"""Drop-in dilated attention modules (batch-first ``[B, N, E]``, like ``nn.MultiheadAttention``)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..ops import dilated_attention
from ..strategies.dilated import Dilated


def check_projected_heads(query: Tensor, key: Tensor, value: Tensor) -> None:
    """The attention modules over projected heads take ``[B, N, H, D]`` tensors."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dims [B, N, H, D], got shape {tuple(t.shape)}")


def _check_op(op) -> None:
    if op is not None:
        raise ValueError(f"op selects an xformers attention operator in dilated-attention-pytorch; here the kernels "
                         f"are chosen per call from the device, dtype and shapes; pass op=None, got {op!r}")


class DilatedAttention(nn.Module):
    """Dilated attention over already projected heads: q ``[B, N, Hq, D]``, k/v ``[B, N, Hkv, D]``.

    The positional order ``(segment_lengths, dilation_rates, softmax_scale, attention_dropout, op)`` is
    dilated-attention-pytorch's; ``op`` (its xformers operator) takes None only. ``mixing`` and ``head_offsets`` as
    in ``dc.Dilated``. Dropout on the attention probabilities is applied only in training mode.
    """

    def __init__(self, segment_lengths: Sequence[int], dilation_rates: Sequence[int],
                 softmax_scale: Optional[float] = None, attention_dropout: float = 0.0, op=None, *,
                 mixing: str = "lse", head_offsets: str = "interleaved"):
        super().__init__()
        _check_op(op)
        self.strategy = Dilated(segment_lengths, dilation_rates, mixing, head_offsets)
        self.softmax_scale = softmax_scale
        if not 0.0 <= attention_dropout < 1.0:
            raise ValueError(f"attention_dropout must be in [0, 1), got {attention_dropout!r}")
        self.attention_dropout = attention_dropout

    def forward(self, query: Tensor, key: Tensor, value: Tensor, is_causal: bool = False,
                attn_mask: Optional[Tensor] = None) -> Tensor:
        check_projected_heads(query, key, value)
        out = dilated_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
            self.strategy.segment_lengths, self.strategy.dilation_rates, is_causal=is_causal,
            scale=self.softmax_scale, mixing=self.strategy.mixing,
            dropout_p=self.attention_dropout if self.training else 0.0, attn_mask=attn_mask,
            head_offsets=self.strategy.head_offsets,
        )
        return out.transpose(1, 2)

    def extra_repr(self) -> str:
        s = self.strategy
        return (f"segment_lengths={s.segment_lengths}, dilation_rates={s.dilation_rates}, mixing={s.mixing!r}, "
                f"head_offsets={s.head_offsets!r}, attention_dropout={self.attention_dropout}")


def _check_module_mask(name: str, mask, device: torch.device) -> None:
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"{name} must be bool (True: masked out, as in nn.MultiheadAttention) or floating (added to "
                        f"the scores), got dtype {mask.dtype}")
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device} but the query is on {device}; accepted: a mask on the query's "
                         f"device")


def merge_masks(attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor], batch: int, num_heads: int,
                seq_len: int, device: torch.device) -> Optional[Tensor]:
    """``nn.MultiheadAttention``'s masks as one mask for the op (bool: True attends, or additive float).

    ``attn_mask``: ``[N, N]`` or ``[B * H, N, N]``; bool True means *not* allowed (as in nn.MultiheadAttention).
    ``key_padding_mask``: ``[B, N]``; bool True means padding (ignored), or additive float.
    """
    for name, m in (("attn_mask", attn_mask), ("key_padding_mask", key_padding_mask)):
        if m is not None:
            _check_module_mask(name, m, device)
    masks = []
    if attn_mask is not None:
        if attn_mask.dim() == 2 and attn_mask.shape == (seq_len, seq_len):
            m = attn_mask.view(1, 1, seq_len, seq_len)
        elif attn_mask.dim() == 3 and attn_mask.shape == (batch * num_heads, seq_len, seq_len):
            m = attn_mask.view(batch, num_heads, seq_len, seq_len)
        else:
            raise ValueError(
                f"attn_mask must have shape [N, N] = {[seq_len, seq_len]} or [B * num_heads, N, N] = "
                f"{[batch * num_heads, seq_len, seq_len]}, got {tuple(attn_mask.shape)}")
        masks.append(~m if m.dtype == torch.bool else m)
    if key_padding_mask is not None:
        if key_padding_mask.shape != (batch, seq_len):
            raise ValueError(
                f"key_padding_mask must have shape [B, N] = {[batch, seq_len]}, got {tuple(key_padding_mask.shape)}")
        m = key_padding_mask.view(batch, 1, 1, seq_len)
        masks.append(~m if m.dtype == torch.bool else m)
    if not masks:
        return None
    if len(masks) == 1:
        return masks[0]
    a, b = masks
    if a.dtype == torch.bool and b.dtype == torch.bool:
        return a & b
    as_float = [m if m.dtype != torch.bool else torch.zeros(m.shape, dtype=torch.float32, device=m.device)
                .masked_fill(~m, float("-inf")) for m in masks]
    return as_float[0] + as_float[1]


class ProjectedAttention(nn.Module):
    """Projections q/k/v, an attention module over ``[B, N, H, D]`` heads, an optional sub-layer norm
    (MAGNETO, as in LongNet and dilated-attention-pytorch), output projection; returns ``(out, None)`` like
    ``nn.MultiheadAttention``. ``num_kv_heads`` < ``num_heads`` gives GQA."""

    def __init__(self, embed_dim: int, num_heads: int, attention: nn.Module, bias: bool = True,
                 batch_first: bool = True, *, num_kv_heads: Optional[int] = None, layer_norm: bool = True,
                 layer_norm_eps: float = 1e-5, gamma_init: float = 1.0, device=None, dtype=None):
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads:
            raise ValueError(
                f"embed_dim ({embed_dim}) must be a positive multiple of num_heads ({num_heads})")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_kv_heads <= 0 or num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.batch_first = batch_first
        self.gamma_init = gamma_init
        kw = {"device": device, "dtype": dtype}
        kv_dim = self.head_dim * num_kv_heads
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        self.k_proj = nn.Linear(embed_dim, kv_dim, bias=bias, **kw)
        self.v_proj = nn.Linear(embed_dim, kv_dim, bias=bias, **kw)
        self.attention = attention
        self.norm = nn.LayerNorm(embed_dim, eps=layer_norm_eps, **kw) if layer_norm else None
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        self._reset_parameters()

    def _reset_parameters(self):
        nn.init.xavier_normal_(self.q_proj.weight)
        nn.init.xavier_normal_(self.k_proj.weight)
        nn.init.xavier_normal_(self.v_proj.weight, gain=self.gamma_init)
        nn.init.xavier_normal_(self.out_proj.weight, gain=self.gamma_init)
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    def forward(self, query: Tensor, key: Optional[Tensor] = None, value: Optional[Tensor] = None, *,
                key_padding_mask: Optional[Tensor] = None, need_weights: bool = False,
                attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> tuple[Tensor, None]:
        if need_weights:
            raise ValueError(
                "need_weights=True is not supported: this attention never forms the [N, N] attention "
                "weights; pass need_weights=False")
        key = query if key is None else key
        value = key if value is None else value
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        if query.dim() != 3 or query.shape[-1] != self.embed_dim:
            raise ValueError(f"query must be [B, N, {self.embed_dim}] (batch_first={self.batch_first}), "
                             f"got shape {tuple(query.shape)}")
        B, N, _ = query.shape
        q = self.q_proj(query).view(B, N, self.num_heads, self.head_dim)
        k = self.k_proj(key).view(B, key.shape[1], self.num_kv_heads, self.head_dim)
        v = self.v_proj(value).view(B, value.shape[1], self.num_kv_heads, self.head_dim)
        mask = merge_masks(attn_mask, key_padding_mask, B, self.num_heads, N, query.device)
        x = self.attention(q, k, v, is_causal=is_causal, attn_mask=mask).reshape(B, N, self.embed_dim)
        if self.norm is not None:
            x = self.norm(x)
        x = self.out_proj(x)
        if not self.batch_first:
            x = x.transpose(0, 1)
        return x, None


# The positional parameters after (embed_dim, num_heads): here, and in dilated-attention-pytorch.
POSITIONAL_ORDER = ("segment_lengths", "dilation_rates", "dropout", "bias", "batch_first")
DAP_POSITIONAL_ORDER = ("dilation_rates", "segment_lengths", "dropout", "bias", "layer_norm", "layer_norm_eps",
                        "gamma_init", "device", "dtype", "op")


def _reading(order: tuple, args: tuple, kwargs: dict):
    """``(keywords, '', None)`` of ``args`` read in ``order`` merged with ``kwargs``, or ``(None, why not, error
    class)``: too many, given twice or a sequence missing (TypeError), or a pattern ``dc.Dilated`` refuses."""
    if len(args) > len(order):
        return None, f"{len(args)} positional arguments after num_heads, at most {len(order)}", TypeError
    named = dict(zip(order, args))
    twice = sorted(set(named) & set(kwargs))
    if twice:
        return None, f"{', '.join(twice)} given both by position and by keyword", TypeError
    named.update(kwargs)
    missing = [n for n in ("segment_lengths", "dilation_rates") if n not in named]
    if missing:
        return None, f"{' and '.join(missing)} missing", TypeError
    try:
        Dilated(named["segment_lengths"], named["dilation_rates"])
    except (TypeError, ValueError) as e:
        return None, str(e), type(e)
    return named, "", None


def read_multihead_arguments(args: tuple, kwargs: dict) -> dict:
    """The keywords of a ``MultiheadDilatedAttention(embed_dim, num_heads, *args, **kwargs)`` call, its positional
    ``args`` read in this package's order (``POSITIONAL_ORDER``) or in dilated-attention-pytorch's
    (``DAP_POSITIONAL_ORDER``: rates before segments): the one reading that gives a valid pattern (each segment length
    a multiple of its rate; both readings are valid only when the two sequences are equal, and then they agree on
    every argument up to ``bias``). A call both orders would read differently raises a ``TypeError`` naming both
    orders; one neither can read, a ``ValueError`` where both readings give a pattern ``dc.Dilated`` refuses, else a
    ``TypeError``, naming both orders and what each reading found."""
    ours, why_ours, error_ours = _reading(POSITIONAL_ORDER, args, kwargs)
    theirs, why_theirs, error_theirs = _reading(DAP_POSITIONAL_ORDER, args, kwargs)
    if ours is not None and (theirs is None or len(args) <= 4):
        return ours
    if theirs is not None and ours is None:
        return theirs
    orders = (f"here (embed_dim, num_heads, {', '.join(POSITIONAL_ORDER)}); in dilated-attention-pytorch "
              f"(embed_dim, num_heads, {', '.join(DAP_POSITIONAL_ORDER)})")
    if ours is not None:
        raise TypeError(f"MultiheadDilatedAttention: the positional arguments {args!r} after num_heads read "
                        f"differently in the two orders ({args[4]!r} is batch_first here, layer_norm there): "
                        f"{orders}; pass them by keyword")
    error = ValueError if error_ours is ValueError and error_theirs is ValueError else TypeError
    raise error(f"MultiheadDilatedAttention: the arguments after num_heads (positional {args!r}, keywords "
                f"{sorted(kwargs)}) read in neither order: {orders}. Read here: {why_ours}; read as "
                f"dilated-attention-pytorch: {why_theirs}. Pass segment_lengths= and dilation_rates= by keyword")


class MultiheadDilatedAttention(ProjectedAttention):
    """Multi-head dilated attention, a drop-in for ``nn.MultiheadAttention`` (returns ``(out, None)``).

    Projections q/k/v, dilated attention, an optional sub-layer norm (MAGNETO, as in LongNet and
    dilated-attention-pytorch), output projection. ``num_kv_heads`` < ``num_heads`` gives GQA.

    Parameters: ``(embed_dim, num_heads, segment_lengths, dilation_rates, dropout=0.0, bias=True, batch_first=True,
    *, num_kv_heads=None, layer_norm=True, layer_norm_eps=1e-5, gamma_init=1.0, mixing="lse",
    head_offsets="interleaved", device=None, dtype=None, op=None)``. dilated-attention-pytorch's positional order
    ``(embed_dim, num_heads, dilation_rates, segment_lengths, dropout, bias, layer_norm, layer_norm_eps, gamma_init,
    device, dtype, op)`` is accepted where the pattern tells the two apart (``read_multihead_arguments``); its keyword
    names are the same as here; ``op`` (its xformers operator) takes None only. ``mixing`` and ``head_offsets`` as in
    ``dc.Dilated`` (``"head_groups"`` mixing: that library's numerics; ``head_offsets="grouped"``: torchscale's).
    """

    def __init__(self, embed_dim: int, num_heads: int, *args, **kwargs):
        self._build(embed_dim, num_heads, **read_multihead_arguments(args, kwargs))

    def _build(self, embed_dim: int, num_heads: int, segment_lengths: Sequence[int], dilation_rates: Sequence[int],
               dropout: float = 0.0, bias: bool = True, batch_first: bool = True, *,
               num_kv_heads: Optional[int] = None, layer_norm: bool = True, layer_norm_eps: float = 1e-5,
               gamma_init: float = 1.0, mixing: str = "lse", head_offsets: str = "interleaved", device=None,
               dtype=None, op=None):
        _check_op(op)
        attention = DilatedAttention(segment_lengths, dilation_rates, attention_dropout=dropout, mixing=mixing,
                                     head_offsets=head_offsets)
        super().__init__(embed_dim, num_heads, attention, bias=bias, batch_first=batch_first,
                         num_kv_heads=num_kv_heads, layer_norm=layer_norm, layer_norm_eps=layer_norm_eps,
                         gamma_init=gamma_init, device=device, dtype=dtype)
