"""Public attention ops. Shapes follow ``F.scaled_dot_product_attention``: ``[B, H, N, D]``."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from .lowering.block_sparse import op as block_sparse_op  # noqa: F401  (registers the ops)
from .lowering.common.key_padding import check_key_keep
from .lowering.dilated import op as dilated_op  # noqa: F401
from .lowering.dilated.plan import MIXINGS
from .patterns import BlockLayout, DilatedBlocks, LocalBlocks, Pattern, RandomBlocks, Term, from_layout
from .strategies.block_sparse import Adaptive
from .strategies.dilated import Dilated

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_qkv(q: Tensor, k: Tensor, v: Tensor, *, last_queries: bool = False) -> None:
    """Validate SDPA-layout q ``[B, Hq, Nq, D]``, k/v ``[B, Hkv, Nk, D]``: ``Nq == Nk`` (self-attention), or with
    ``last_queries`` also ``1 <= Nq < Nk`` (the queries are the last Nq key positions, as a KV cache holds them)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dims [B, H, N, D], got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; accepted: float16, bfloat16, float32, float64")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k and v must have the same [B, Hkv, N] (v's head dim may differ), got {tuple(k.shape)} "
                         f"and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k must have the same batch size, got {q.shape[0]} and {k.shape[0]}")
    nq, nk = q.shape[2], k.shape[2]
    if last_queries and (nq > nk or (nq < nk and nq == 0)):
        raise ValueError(
            f"q has {nq} positions and k has {nk}; accepted: as many queries as keys (self-attention), or "
            f"1 <= Nq < Nk queries that are the last Nq of the Nk key positions (decoding with a KV cache)")
    if not last_queries and nq != nk:
        raise ValueError(
            f"q and k must have the same sequence length (self-attention shaped), got {nq} and {nk}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k must have the same head dim, got {q.shape[3]} and {k.shape[3]}")
    hq, hkv = q.shape[1], k.shape[1]
    if hkv == 0 or hq % hkv:
        raise ValueError(
            f"the number of query heads ({hq}) must be a multiple of the number of key/value heads ({hkv})")
    for what, size in (("batch size B", q.shape[0]), ("query heads Hq", hq), ("head dim D", q.shape[3])):
        if isinstance(size, int) and size == 0:
            raise ValueError(f"q must have {what} >= 1, got q of shape {tuple(q.shape)}")


def check_scale(scale: Optional[float], head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale == 0:
        raise ValueError(f"scale must be a finite non-zero float or None, got {scale!r}")
    return float(scale)


def check_softcap(softcap) -> Optional[float]:
    """``softcap`` as a float ``c > 0`` (scores ``c * tanh(s / c)``), or None (no capping)."""
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"softcap must be a float > 0 or None (no soft-capping), got {softcap!r} of type "
                        f"{type(softcap).__name__}")
    if not math.isfinite(softcap) or softcap <= 0:
        raise ValueError(f"softcap must be a finite float > 0 or None (no soft-capping), got {softcap!r}")
    return float(softcap)


def check_dropout(dropout_p: float) -> float:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    return float(dropout_p)


def check_attn_mask(attn_mask: Optional[Tensor], q: Tensor, num_keys: Optional[int] = None) -> Optional[Tensor]:
    """Return the mask as a 4-D tensor broadcastable to ``[B, Hq, Nq, Nk]`` (bool: True attends; or additive).
    ``num_keys``: Nk (default: q's length, self-attention)."""
    if attn_mask is None:
        return None
    if not isinstance(attn_mask, Tensor):
        raise TypeError(f"attn_mask must be a Tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise TypeError(f"attn_mask must be bool (True attends) or floating (added to scores), got {attn_mask.dtype}")
    if attn_mask.device != q.device:
        raise ValueError(f"attn_mask is on {attn_mask.device} but q is on {q.device}; accepted: a mask on q's device")
    B, H, N, _ = q.shape
    nk = N if num_keys is None else num_keys
    if attn_mask.dim() > 4:
        raise ValueError(f"attn_mask must have at most 4 dims, got shape {tuple(attn_mask.shape)}")
    mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    for dim, (got, want) in zip(("batch B", "heads Hq", "queries Nq", "keys Nk"), zip(mask.shape, (B, H, N, nk))):
        if got not in (1, want):
            raise ValueError(
                f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to [B, Hq, Nq, Nk] = "
                f"{[B, H, N, nk]}: its {dim} dim is {got}; accepted: 1 or {want}")
    if mask.shape[1] not in (1, H):
        raise ValueError(f"attn_mask's head dim must be 1 or {H}, got shape {tuple(attn_mask.shape)}")
    return mask


def dilated_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    is_causal: bool = False,
    scale: Optional[float] = None,
    mixing: str = "lse",
    dropout_p: float = 0.0,
    attn_mask: Optional[Tensor] = None,
    key_keep: Optional[Tensor] = None,
    softcap: Optional[float] = None,
    head_offsets: str = "interleaved",
) -> Tensor:
    """LongNet dilated attention (exact semantics: ``dilate_compiler.strategies.dilated``).

    Args:
        q: ``[B, Hq, Nq, D]``. k, v: ``[B, Hkv, Nk, D]`` with ``Hq % Hkv == 0`` (GQA: head h reads kv head
            ``h // (Hq // Hkv)``) and ``1 <= Nq <= Nk``. float16, bfloat16, float32 or float64. With ``Nq < Nk``
            the queries are the key positions ``Nk - Nq .. Nk - 1`` (the newest entries of a KV cache: decoding),
            and the pattern and causality are evaluated on those positions, so the result is the last Nq rows of
            the op on all Nk queries (gradients: the terms of the given queries only).
        segment_lengths, dilation_rates: one entry per branch, ``w % r == 0``; segments may exceed Nk, and Nk
            need not divide by them.
        is_causal: key j is linked to query p only if ``j <= p``.
        scale: score scale, default ``1 / sqrt(D)``.
        mixing: ``"lse"`` or ``"head_groups"``.
        dropout_p: dropout on each branch's attention probabilities (apply only in training).
        attn_mask: optional mask broadcastable to ``[B, Hq, Nq, Nk]`` applied on top of the pattern: bool
            (True attends) or floating (added to the scores).
        key_keep: optional bool ``[B or 1, Nk]``: the keys that attend (key padding; a model's
            ``attention_mask``). The kernels take it; a row that keeps no key is 0.
        softcap: optional ``c > 0``: the scores are soft-capped, ``s = c * tanh(scale * q.k / c)`` (Gemma2's
            ``attn_logit_softcapping``), before ``attn_mask`` is added.
        head_offsets: ``"interleaved"`` (head h reads the rows ``p % r == h % r`` of a branch of rate r) or
            ``"grouped"`` (``p % r == h // ceil(Hq / r)``, torchscale's LongNet; ``mixing="lse"`` only).

    Returns:
        ``[B, Hq, Nq, D]`` in q's dtype. Rows no branch links are 0.
    """
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {is_causal!r}")
    if mixing not in MIXINGS:
        raise ValueError(f"mixing must be one of {MIXINGS}, got {mixing!r}")
    strategy = Dilated(segment_lengths, dilation_rates, mixing, head_offsets)
    check_qkv(q, k, v, last_queries=True)
    scale = check_scale(scale, q.shape[-1])
    dropout_p = check_dropout(dropout_p)
    mask = check_attn_mask(attn_mask, q, k.shape[2])
    key_keep = check_key_keep(key_keep, q.shape[0], k.shape[2], q.device)
    softcap = check_softcap(softcap)
    seed = None
    if dropout_p > 0.0:
        seed = torch.randint(0, 2**62, (), dtype=torch.int64, device="cpu")
    out, _ = torch.ops.dilate_compiler.dilated_attention_forward(
        q, k, v, mask, list(strategy.segment_lengths), list(strategy.dilation_rates), is_causal, scale,
        strategy.mixing, dropout_p, seed, key_keep, softcap, strategy.head_offsets,
    )
    return out


def _check_block_size(block_size) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    return block_size


def resolve_layout(layout, q: Tensor, block_size: int, is_causal: bool, num_keys: Optional[int] = None):
    """``layout`` (bool tensor, pattern or BlockLayout) as a BlockLayout for ``num_keys`` positions (default: q's
    length) and q's heads, on q's device."""

    B, H, N, _ = q.shape
    N = N if num_keys is None else num_keys
    if q.device.type == "meta":
        raise ValueError("q, k, v are meta tensors: block-sparse attention builds its block lists from the layout's "
                         "data at run time; pass tensors with data (under torch.compile / torch.export tracing, "
                         "fake tensors work)")
    if isinstance(layout, Tensor):
        if layout.device.type == "meta":
            raise ValueError("layout is a meta tensor (no data); accepted: a bool tensor with data, a pattern or a "
                             "BlockLayout")
        layout = from_layout(layout)
    if isinstance(layout, Pattern):
        return layout.layout(N, block_size, num_heads=H, is_causal=is_causal, device=q.device)
    if isinstance(layout, BlockLayout):
        for name, got, want in (("seq_len", layout.seq_len, N), ("block_size", layout.block_size, block_size),
                                ("is_causal", layout.is_causal, is_causal)):
            if got != want:
                raise ValueError(f"layout was built with {name}={got!r} but the call has {name}={want!r}")
        if layout.num_heads not in (1, H):
            raise ValueError(f"layout has {layout.num_heads} heads; expected 1 or the {H} query heads")
        return layout if layout.state.device == q.device else layout.to(q.device)
    raise TypeError(
        f"layout must be a bool tensor [Hq or 1, nb, nb], a dilate_compiler.patterns pattern or a BlockLayout, "
        f"got {type(layout).__name__}")


def block_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout,
    *,
    block_size: int,
    is_causal: bool = False,
    scale: Optional[float] = None,
    order: Optional[Tensor] = None,
    key_keep: Optional[Tensor] = None,
    softcap: Optional[float] = None,
) -> Tensor:
    """Block-sparse attention: one softmax over the union of the keys the layout allows.

    Args:
        q: ``[B, Hq, Nq, D]``. k, v: ``[B, Hkv, Nk, D]`` (GQA when ``Hq % Hkv == 0``), ``1 <= Nq <= Nk``. With
            ``Nq < Nk`` the queries are the key positions ``Nk - Nq .. Nk - 1`` (decoding with a KV cache): they
            read the layout rows of those positions, and the result is the last Nq rows of the op on all Nk
            queries.
        layout: bool ``[Hq or 1, nb, nb]`` with ``nb = ceil(Nk / block_size)`` (query block I may attend key
            block J iff ``layout[h, I, J]``), a ``dilate_compiler.patterns`` pattern (token-exact), or a
            prebuilt ``BlockLayout`` (built for Nk positions).
        block_size: tokens per block; the last block may be partial (any Nk).
        is_causal: additionally mask ``j > p`` token by token.
        scale: score scale, default ``1 / sqrt(D)``.
        order: a permutation of ``range(N)`` (int32/int64, on q's device): the layout's position ``p`` is token
            ``order[p]``. The result equals gathering q, k, v with ``order`` (``x.index_select(2, order)``),
            attending, and putting the rows back; the kernels read and write through the table, with no copy
            (how ``dc.Hilbert(..., reorder="fused")`` runs). Only with ``Nq == Nk``.
        key_keep: optional bool ``[B or 1, Nk]``: the keys (memory rows) that attend (key padding). A row that
            keeps no key is 0.
        softcap: optional ``c > 0``: the scores are soft-capped, ``s = c * tanh(scale * q.k / c)`` (Gemma2's
            ``attn_logit_softcapping``).

    Returns:
        ``[B, Hq, Nq, D]`` in q's dtype; rows with no allowed key are 0.
    """
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {is_causal!r}")
    check_qkv(q, k, v, last_queries=True)
    block_size = _check_block_size(block_size)
    scale = check_scale(scale, q.shape[-1])
    softcap = check_softcap(softcap)
    num_keys = k.shape[2]
    if order is not None:
        if q.shape[2] != num_keys:
            raise NotImplementedError(
                f"order (a reordering of the sequence, e.g. dc.Hilbert's) with queries that are the last "
                f"{q.shape[2]} of {num_keys} key positions: a permuted layout has no 'last positions'; accepted: "
                f"order=None, or as many queries as keys")
        check_order(order, q)
    key_keep = check_key_keep(key_keep, q.shape[0], num_keys, q.device)
    if torch.compiler.is_compiling() and _is_pattern(layout):
        # Building a layout reads data, which a traced graph can't: Dynamo builds it when it traces this call
        # (from the pattern's value) and keeps the tensors as constants of the graph.
        *tensors, checks = _layout_constants(_pattern_spec(layout), num_keys, block_size, q.shape[1], is_causal,
                                             q.device)
        if order is None:
            order = torch.empty(0, dtype=torch.int32, device=q.device)
        args = (*tensors, order, checks)
    else:
        args = resolve_layout(layout, q, block_size, is_causal, num_keys).args(order)
    out, _ = torch.ops.dilate_compiler.block_sparse_attention_forward(q, k, v, *args, block_size, is_causal, scale,
                                                                      key_keep, softcap)
    return out


def _is_pattern(layout) -> bool:

    return isinstance(layout, Pattern)


def _pattern_spec(pattern) -> tuple:
    """A pattern as nested tuples of ints and strings (its value, which Dynamo can hold as a constant whether the
    pattern was made inside or outside the compiled region)."""

    if pattern.grid is not None:
        raise ValueError(f"pattern {pattern.name} is on a grid: under torch.compile pass its layout, built outside "
                         f"the compiled region (pattern.layout(N, block_size, ...)), instead of the pattern")
    terms = []
    for t in pattern.terms:
        blocks = []
        for b in t.blocks:
            if isinstance(b, LocalBlocks):
                blocks.append(("local", b.window_blocks))
            elif isinstance(b, DilatedBlocks):
                blocks.append(("dilated", tuple(b.rates)))
            elif isinstance(b, RandomBlocks):
                blocks.append(("random", b.blocks_per_row, b.seed, b.per_head))
            else:
                raise ValueError(f"pattern {pattern.name} holds a block layout tensor: under torch.compile pass its "
                                 f"layout, built outside the compiled region, instead of the pattern")
        terms.append((tuple(blocks), tuple(t.d), tuple(t.p), tuple(t.j), tuple(tuple(g) for g in t.g)))
    return pattern.name, tuple(terms)


def _pattern_of_spec(spec: tuple):

    kinds = {"local": LocalBlocks, "dilated": DilatedBlocks, "random": RandomBlocks}
    name, terms = spec
    return Pattern(tuple(Term(tuple(kinds[b[0]](*b[1:]) for b in blocks), d, p, j, g) for blocks, d, p, j, g in terms),
                   name)


@torch._dynamo.assume_constant_result
def _layout_constants(spec: tuple, seq_len: int, block_size: int, num_heads: int, is_causal: bool, device) -> tuple:
    """The layout tensors and check bits of the pattern ``spec`` describes; under ``torch.compile`` Dynamo calls
    this eagerly while tracing and keeps the result as constants of the graph."""
    lay = _pattern_of_spec(spec).layout(seq_len, block_size, num_heads=num_heads, is_causal=is_causal, device=device)
    return (*lay.tensors(), lay.checks)


_CHECKED_ORDERS = WeakIdKeyDictionary()   # order tensor -> version it was checked at


def check_order(order, q: Tensor) -> None:
    """``order`` must be a permutation of the sequence positions of ``q``. Its values are checked outside
    tracing, once per tensor and version (a sort and a host sync; the kernels would read out of bounds)."""
    N = q.shape[2]
    if not isinstance(order, Tensor) or order.dtype not in (torch.int32, torch.int64) or order.shape != (N,):
        got = (order.dtype, tuple(order.shape)) if isinstance(order, Tensor) else order
        raise ValueError(f"order must be an int32/int64 tensor of shape ({N},) (a permutation of the {N} "
                         f"positions), got {got!r}")
    if order.device != q.device:
        raise ValueError(f"order is on {order.device} but q is on {q.device}")
    if torch.compiler.is_compiling() or isinstance(order, torch._subclasses.FakeTensor):
        return
    if _CHECKED_ORDERS.get(order) == order._version:
        return
    if not torch.equal(torch.sort(order).values.cpu(), torch.arange(N, dtype=order.dtype)):
        raise ValueError(f"order must be a permutation of range({N}); it repeats or misses positions")
    _CHECKED_ORDERS[order] = order._version


def adaptive_block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, strategy, *, is_causal: bool = False,
                                    scale: Optional[float] = None) -> Tensor:
    """Content-adaptive block-sparse attention: ``strategy`` (a ``dc.Adaptive``) selects the key blocks of each
    (batch, head, query block) from pooled scores at run time, then attention runs exactly over them.

    Shapes as :func:`block_sparse_attention`. Gradients flow through the attention on the selected blocks.
    """

    if not isinstance(strategy, Adaptive):
        raise TypeError(f"strategy must be a dc.Adaptive, got {strategy!r}")
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {is_causal!r}")
    check_qkv(q, k, v, last_queries=True)
    if q.shape[2] != k.shape[2]:
        raise NotImplementedError(
            f"adaptive block selection with queries that are the last {q.shape[2]} of {k.shape[2]} key positions "
            f"(decoding): it pools query blocks of a self-attention call; accepted: as many queries as keys")
    scale = check_scale(scale, q.shape[-1])
    B, H, N, D = q.shape
    if N == 0:
        raise ValueError(f"adaptive block selection needs at least one token; got q of shape {tuple(q.shape)} "
                         f"(sequence length N=0)")
    bs = strategy.block_size
    with torch.no_grad():
        chosen = strategy.select(q, k, is_causal=is_causal, scale=scale)
    nb = chosen.shape[-1]
    lay = from_layout(chosen.reshape(B * H, nb, nb)).layout(N, bs, num_heads=B * H, is_causal=is_causal,
                                                            device=q.device)
    # Batch folds into heads: query head b*H + h reads kv head (b*H + h) // (H // Hkv) = b*Hkv + h // (H // Hkv).
    out, _ = torch.ops.dilate_compiler.block_sparse_attention_forward(
        q.reshape(1, B * H, N, D), k.reshape(1, B * k.shape[1], N, D), v.reshape(1, B * v.shape[1], N, D),
        *lay.args(), bs, is_causal, scale)
    return out.view(B, H, N, D)
