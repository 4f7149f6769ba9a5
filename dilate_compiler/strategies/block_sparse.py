"""Block-sparse strategies: a fixed pattern (``BlockSparse``), the model's own structured mask
(``BlockSparse("auto")``), and content-adaptive block selection (``Adaptive``).

Semantics (DESIGN.md §2): query block ``I`` may attend key block ``J`` iff the layout allows it, refined token by
token by the pattern's terms; one softmax over the union of allowed keys; causal additionally masks ``j > p``.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import ClassVar, Optional, Union

import torch

from ..lowering.block_sparse.triton import kernel_unsupported_reason
from ..lowering.common.dispatch import value_unsupported_reason
from ..passes.site import static_int
from ..patterns import BlockLayout, Pattern, Term
from .contract import Emitted
from .reference import weighted_softmax_attention


def _static_len(site) -> Optional[int]:
    """The key length (the layout's; a decode step's queries are the last of those positions)."""
    return static_int(site.k_shape[2]) if len(site.k_shape) == 4 else None


def allows_all(pattern: Pattern, n: int) -> bool:
    """True when ``pattern`` links every (query, key) pair of an ``n``-token sequence (e.g. a model's all-True
    padding mask for unpadded input)."""
    return any(not t.blocks and not t.uses_grid and t.d[0] <= -(n - 1) and t.d[1] >= n - 1 and t.p[0] <= 0
               and t.p[1] >= n - 1 and t.j[0] <= 0 and t.j[1] >= n - 1 for t in pattern.terms)


@dataclass(frozen=True, eq=False)
class BlockSparse:
    """Block-sparse attention with a ``dc.patterns`` pattern, or ``"auto"``: derive the pattern from each
    site's own mask when that mask is built in the graph from index comparisons (causal, sliding window,
    global tokens), so the model's semantics are unchanged; sites whose mask isn't structured are skipped.

    Args:
        pattern: a ``dilate_compiler.patterns`` pattern or ``"auto"``.
        block_size: layout block size in tokens (kernels: 16..256, powers of two).
    """

    pattern: Union[Pattern, str]
    block_size: int = 128
    _layouts: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        if not (isinstance(self.pattern, Pattern) or self.pattern == "auto"):
            raise TypeError(f"pattern must be a dilate_compiler.patterns pattern or 'auto', got {self.pattern!r}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size <= 0:
            raise ValueError(f"block_size must be a positive int, got {self.block_size!r}")

    def layout(self, pattern: Pattern, seq_len: int, num_heads: int, is_causal: bool, device) -> BlockLayout:
        """Layouts are cached per (pattern, N, heads, causal, device): every layer of a model shares one."""
        key = (id(pattern), seq_len, num_heads, is_causal, str(device))
        if key not in self._layouts:
            self._layouts[key] = (pattern, pattern.layout(seq_len, self.block_size, num_heads=num_heads,
                                                          is_causal=is_causal, device=device))
        return self._layouts[key][1]

    # --- compiler hooks (``strategies.contract``) ------------------------------------------------------------

    def site_pattern(self, site) -> tuple:
        """``(pattern, reason)`` for a site: the strategy's pattern (AND the model's mask), or, for ``"auto"``, the
        predicate ``read_masks`` read from the site's mask. Key padding rides beside it (``site.key_keep``)."""
        q, k = site.q_shape, site.k_shape
        if len(q) != 4 or (q[2] != k[2] and not site.decode):
            return None, f"block-sparse attention needs self-attention shapes (Nq == Nk), got q {q} and k {k}"
        n = _static_len(site)
        if n is None:
            return None, (f"block-sparse layouts are built at compile time for a static sequence length; the "
                          f"length here is symbolic ({k[2]})")
        if site.dropout_p > 0.0:
            return None, f"dropout_p={site.dropout_p}: the block-sparse op has no attention dropout"
        has_mask = bool(site.nodes.get("terms"))
        if has_mask and (site.pattern is None or site.mask_reason):
            why = site.mask_reason or "not read"
            if self.pattern != "auto":
                return None, (f"the site has a {site.mask_kind} mask, which a fixed pattern would replace ({why}); "
                              f"use BlockSparse('auto') to keep a structured mask")
            return None, f"pattern='auto': {why}"
        if self.pattern != "auto":
            if has_mask and not allows_all(site.pattern, n):   # keep the model's mask: both must allow a key
                both = self.pattern & site.pattern
                return Pattern(both.terms, f"{self.pattern.name} & (model mask)", both.grid), ""
            return self.pattern, ""
        if not has_mask:
            if site.is_causal:
                return Pattern((Term(),), "auto: causal"), ""
            return None, "pattern='auto': the site has no mask (dense attention), nothing to make sparse"
        pattern = site.pattern
        p = torch.arange(n)
        diag = torch.zeros(n, dtype=torch.bool)
        coords = pattern.coordinates(n)
        for t in pattern.terms:
            diag |= t.token_mask(p, p, coords)
        if not bool(diag.all()):
            return None, "pattern='auto': the mask leaves some query without its own key (rows could be empty)"
        return Pattern(pattern.terms, f"auto: {site.predicate_name}", pattern.grid), ""

    def check_site(self, site) -> Optional[str]:
        pattern, reason = self.site_pattern(site)
        if reason:
            return reason
        site.nodes["pattern"] = pattern   # read before the rewrite removes the mask's nodes
        site.detail = f"{pattern.name}, block_size={self.block_size}"
        q = site.nodes["q"].meta["val"]
        why = (kernel_unsupported_reason(q, self.block_size, site.softcap)
               or value_unsupported_reason(q, site.nodes["v"].meta["val"]))
        site.runs = "kernels" if not why else f"exact path: {why}"
        return None

    # emit_call passes the site's soft-capping to the op (see contract.Strategy)
    applies_softcap: ClassVar[bool] = True

    def emit_call(self, emit, site, call) -> Emitted:
        """The op with the layout of ``site.nodes["pattern"]`` (a buffer of the module) and the site's key padding;
        ``site.nodes["order"]``, when set: an index table the kernels read q, k, v and write out through."""
        pattern = site.nodes["pattern"]   # set by check_site
        qv, n = call.q.meta["val"], int(call.k.meta["val"].shape[2])   # a decode step's layout: all n keys
        is_causal = bool(call.is_causal)
        lay = self.layout(pattern, n, int(qv.shape[1]), is_causal, qv.device)
        site.detail += f", density={lay.density:.3g}"
        *tensors, order, checks = lay.args(site.nodes.get("order"))
        tensors = [emit.constant(t) for t in (*tensors, order)]
        fwd = emit(torch.ops.dilate_compiler.block_sparse_attention_forward.default,
                   (call.q, call.k, call.v, *tensors, checks, self.block_size, is_causal, float(call.scale),
                    call.key_keep(), site.softcap))
        return Emitted(emit(operator.getitem, (fwd, 0)), emit(operator.getitem, (fwd, 1)))

    def reference(self, q, k, v, *, is_causal: bool = False, scale: Optional[float] = None, attn_mask=None):
        """float64: one softmax over the keys the pattern links (token by token), AND ``attn_mask``. With
        ``"auto"`` the pattern is the model's own mask: pass it as ``attn_mask``."""
        B, H, N, _ = q.shape
        keep = None
        if self.pattern != "auto":
            keep = self.pattern.token_mask(N, self.block_size, num_heads=H, is_causal=is_causal, device=q.device)
        elif is_causal:
            keep = torch.ones(N, N, dtype=torch.bool, device=q.device).tril()
        return weighted_softmax_attention(q, k, v, keep, scale=scale, attn_mask=attn_mask)


    # --- sharded over ranks (``strategies.contract.DistributedStrategy``) --------------------------------------

    def check_distributed(self, name: str = "strategy") -> None:
        if not isinstance(self.pattern, Pattern):
            raise ValueError(f"{name}=BlockSparse('auto') reads a site's mask over one shard only; distributed "
                             f"attention needs a fixed pattern (dc.BlockSparse(pattern))")

    def sharded(self, seq_len: int, is_causal: bool) -> "BlockSparse":
        return self

    def links(self, seq_len: int, num_heads: int, is_causal: bool, device=None):
        from .links import BlockSparseLinks

        return BlockSparseLinks(self.layout(self.pattern, seq_len, num_heads, is_causal, device), num_heads)

    head_period = 1

    def key_window_span(self, seq_len: int) -> Optional[int]:
        return None

    def attend_heads(self, q, k, v, *, first_head: int, num_heads: int, is_causal: bool, scale):
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        from .. import ops
        from ..patterns.layouts import head_slice

        with unset_fake_temporarily():   # built once from the pattern (real tensors, cached), also while tracing
            layout = self.layout(self.pattern, q.shape[2], num_heads, is_causal, q.device)
        layout = head_slice(layout, first_head, first_head + q.shape[1])
        return ops.block_sparse_attention(q, k, v, layout, block_size=self.block_size, is_causal=is_causal,
                                          scale=scale)


@dataclass(frozen=True)
class Adaptive:
    """Content-adaptive block selection, per (batch, head, query block), at run time.

    Selection rule: pool each block of q and k by the mean over its tokens; score ``s[I, J] = scale *
    mean_q[I] . mean_k[J]``; with ``is_causal`` key blocks ``J > I`` are excluded. Keep the diagonal block and the
    first ``sink_blocks`` key blocks always; then add blocks by descending score until ``top_k`` blocks are
    chosen in all, stopping early once the chosen blocks hold ``threshold`` of the softmax mass of ``s[I, :]``
    (``threshold=None``: top-k only). Attention then runs exactly (one softmax, token-level causal mask) over the
    selected blocks; gradients flow through the attention on the selected blocks (the selection itself is
    discrete).
    """

    top_k: int = 8
    block_size: int = 128
    threshold: Optional[float] = None
    sink_blocks: int = 0

    def __post_init__(self):
        for name in ("top_k", "block_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(self.sink_blocks, bool) or not isinstance(self.sink_blocks, int) or self.sink_blocks < 0:
            raise ValueError(f"sink_blocks must be an int >= 0, got {self.sink_blocks!r}")
        if self.threshold is not None and not (0.0 < self.threshold <= 1.0):
            raise ValueError(f"threshold must be in (0, 1] or None, got {self.threshold!r}")

    def select(self, q: torch.Tensor, k: torch.Tensor, *, is_causal: bool = False,
               scale: Optional[float] = None) -> torch.Tensor:
        """bool ``[B, Hq, nb, nb]``: the key blocks each query block attends."""
        B, H, N, D = q.shape
        bs = self.block_size
        nb = -(-N // bs)
        scale = 1.0 / math.sqrt(D) if scale is None else scale
        g = H // k.shape[1]

        def pool(t):
            pad = nb * bs - N
            t = torch.nn.functional.pad(t.float(), (0, 0, 0, pad))
            counts = torch.full((nb,), float(bs), device=t.device)
            counts[-1] = bs - pad
            return t.view(t.shape[0], t.shape[1], nb, bs, D).sum(3) / counts.view(1, 1, nb, 1)

        s = scale * pool(q) @ pool(k).repeat_interleave(g, 1).transpose(-1, -2)     # [B, H, nb, nb]
        i = torch.arange(nb, device=q.device)
        allowed = (i.view(-1, 1) >= i.view(1, -1)) if is_causal else torch.ones(nb, nb, dtype=torch.bool,
                                                                                   device=q.device)
        forced = (i.view(-1, 1) == i.view(1, -1)) | (i.view(1, -1) < self.sink_blocks)
        forced = forced & allowed
        s = s.masked_fill(~allowed, float("-inf"))
        mass = torch.softmax(s, -1)
        # forced blocks first, then by score; ties broken by block index
        order = torch.argsort(torch.where(forced, float("inf"), s), dim=-1, descending=True, stable=True)
        ranked_mass = mass.gather(-1, order)
        n_forced = forced.sum(-1, keepdim=True)
        rank = torch.arange(nb, device=q.device).expand_as(order)
        keep = (rank < torch.clamp(n_forced, min=self.top_k)) & torch.isfinite(s.gather(-1, order))
        if self.threshold is not None:
            before = ranked_mass.cumsum(-1) - ranked_mass          # mass of the blocks ranked ahead
            keep = keep & ((before < self.threshold) | (rank < n_forced))
        keep = keep | (rank < n_forced)
        chosen = torch.zeros_like(keep)
        chosen.scatter_(-1, order, keep)
        return chosen

    def check_site(self, site) -> Optional[str]:
        return ("dc.Adaptive selects blocks from the activations at run time; use it through "
                "dc.ops.adaptive_block_sparse_attention or dc.nn.create_block_sparse_attention('adaptive', ...), "
                "the graph rewrite does not emit it")

    def emit_call(self, emit, site, call) -> Emitted:
        raise NotImplementedError("dc.Adaptive is not emitted by the graph rewrite (see check_site)")

    def reference(self, q, k, v, *, is_causal: bool = False, scale: Optional[float] = None, attn_mask=None):
        """float64: the blocks ``select`` picks (from q and k themselves), token-level causality, one softmax."""
        B, H, N, _ = q.shape
        chosen = self.select(q.detach(), k.detach(), is_causal=is_causal, scale=scale)    # [B, H, nb, nb]
        bs = self.block_size
        keep = chosen.repeat_interleave(bs, -2)[..., :N, :].repeat_interleave(bs, -1)[..., :N]
        if is_causal:
            keep = keep & torch.ones(N, N, dtype=torch.bool, device=q.device).tril()
        return weighted_softmax_attention(q, k, v, keep, scale=scale, attn_mask=attn_mask)
