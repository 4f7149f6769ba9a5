"""``dc.Hilbert(grid, inner)``: attention on a token grid, run by an inner strategy in curve order.

Semantics. The sequence is ``extra`` tokens outside the grid (a CLS token, registers: they come first) followed
by the ``prod(grid)`` grid cells in row-major order. The tokens are put in curve order (``perm``: the extra
tokens stay where they are, the cells follow ``dc.hilbert.curve_order(grid, curve)``), the inner strategy runs
on that sequence, and the output is put back in row-major order. So query ``p`` attends key ``j`` iff the inner
strategy links ``inv[p]`` to ``inv[j]`` (``inv`` the inverse permutation). Tokens outside the grid:

- ``extra_tokens="global"`` (default): they attend every token and every token attends them;
- ``extra_tokens="inner"``: they are positions ``0..extra-1`` of the inner strategy's sequence like any other.

Grid patterns (``dc.patterns.neighborhood``) inside a ``BlockSparse`` inner strategy keep their meaning on the
grid: in curve order they are the same mask, now with mostly full blocks. Other inner patterns
(``local``, ``sliding_window``, ``dc.Dilated``) are applied in curve order, which is the point: a window along
the curve is a compact patch of the grid.

``reorder="once"`` (default) lets the compiler push the permutation through the model's
permutation-equivariant ops so it runs once after the patch embedding and once at the end
(``dilate_compiler.passes.reorder``); ``"per_site"`` keeps a gather before and after every attention;
``"fused"`` (BlockSparse inner only) moves no data: the kernels read q, k, v and write the output through the
permutation as an index table (``dc.ops.block_sparse_attention(..., order=perm)``). Which is faster depends on
the model: one attention layer alone is fastest fused; docs/results.md has the measured numbers.
``grid=None`` asks the compiler to infer the grid from a conv patch embedding in the graph.
"""

from __future__ import annotations

import math
import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from ..hilbert import CURVES, check_grid, curve_order, inverse
from ..passes.reorder import REORDER_TAG, infer_grid
from ..patterns import MAX_EXTRA_TOKENS, Grid, global_tokens
from .block_sparse import BlockSparse, _static_len, allows_all
from .contract import Emitted
from .reference import weighted_softmax_attention
from .dilated import Dilated

EXTRA_TOKENS = ("global", "inner")
REORDERS = ("once", "per_site", "fused")


@dataclass(frozen=True, eq=False)
class Hilbert:
    """Reorder grid tokens along a curve, run ``inner`` in curve order, restore the order.

    Args:
        grid: ``(H, W)`` or ``(T, H, W)``; None to infer it from the model's patch embedding.
        inner: a ``dc.BlockSparse`` (fixed pattern) or ``dc.Dilated`` strategy.
        curve: ``"hilbert"`` or ``"zorder"``.
        extra_tokens: how tokens before the grid attend, ``"global"`` or ``"inner"`` (module docstring).
        reorder: ``"once"``, ``"per_site"`` or ``"fused"`` (module docstring).
    """

    grid: Optional[tuple]
    inner: object
    curve: str = "hilbert"
    extra_tokens: str = "global"
    reorder: str = "once"
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        if self.grid is not None:
            object.__setattr__(self, "grid", check_grid(self.grid))
        if isinstance(self.inner, BlockSparse):
            if self.inner.pattern == "auto":
                raise ValueError("inner=BlockSparse('auto') reads the model's own mask, which is in row-major "
                                 "order; give a fixed pattern")
        elif not isinstance(self.inner, Dilated):
            raise TypeError(f"inner must be a dc.BlockSparse (fixed pattern) or dc.Dilated strategy, "
                            f"got {self.inner!r}")
        elif self.reorder == "fused":
            raise NotImplementedError("dc.Hilbert(reorder='fused') with a dc.Dilated inner strategy: the dilated "
                                      "kernels take no index table; use reorder='once' or 'per_site'")
        for name, value, accepted in (("curve", self.curve, CURVES), ("extra_tokens", self.extra_tokens, EXTRA_TOKENS),
                                      ("reorder", self.reorder, REORDERS)):
            if value not in accepted:
                raise ValueError(f"{name} must be one of {accepted}, got {value!r}")

    # --- the plan for one (grid, sequence length) ------------------------------------------------------------

    def plan(self, seq_len: int, grid: Optional[tuple] = None):
        """``(perm, inner)`` for ``seq_len`` tokens: the permutation to curve order (``x[..., perm, :]``, a tensor
        of the caller's own) and the inner strategy as it runs on the reordered sequence. Raises ``ValueError``
        when they don't fit."""
        perm, inner = self._plan(seq_len, grid)
        return perm.clone(), inner

    def _plan(self, seq_len: int, grid: Optional[tuple] = None):
        """``plan``, with the cached permutation itself (shared by every site: never hand it out)."""
        grid = check_grid(grid if grid is not None else self.grid, "grid")
        key = (grid, seq_len)
        if key not in self._cache:
            cells = math.prod(grid)
            extra = seq_len - cells
            if extra < 0 or extra > MAX_EXTRA_TOKENS:
                raise ValueError(f"the grid {grid} has {cells} cells; the sequence must be those cells after at "
                                 f"most {MAX_EXTRA_TOKENS} other tokens, got seq_len={seq_len}")
            order = curve_order(grid, self.curve)
            perm = torch.cat([torch.arange(extra), extra + order])
            self._cache[key] = (perm, self._inner_in_curve_order(grid, order, extra))
        return self._cache[key]

    def device_perms(self, seq_len: int, grid: tuple, device) -> tuple:
        """The permutation and its inverse on ``device``; one pair per (grid, N, device), so every layer's sites
        share the same constants."""
        key = (grid, seq_len, str(device))
        if key not in self._cache:
            perm, _ = self._plan(seq_len, grid)
            self._cache[key] = (perm.to(device), inverse(perm).to(device), perm.to(device, torch.int32))
        return self._cache[key][:2]

    def device_order(self, seq_len: int, grid: tuple, device) -> Tensor:
        """The permutation as the kernels' int32 index table (``reorder="fused"``), one per (grid, N, device)."""
        self.device_perms(seq_len, grid, device)
        return self._cache[(grid, seq_len, str(device))][2]

    def _inner_in_curve_order(self, grid: tuple, order: Tensor, extra: int):
        inner = self.inner
        if isinstance(inner, Dilated):
            if extra and self.extra_tokens == "global":
                raise NotImplementedError(
                    f"dc.Hilbert with a dc.Dilated inner strategy and {extra} token(s) outside the grid as global "
                    f"tokens: the dilated op has no global tokens; use extra_tokens='inner' or a BlockSparse inner")
            return inner
        pattern = inner.pattern
        if pattern.grid is not None:
            pattern = pattern.reordered(Grid(grid, order))
        if extra and self.extra_tokens == "global":
            pattern = pattern | global_tokens(extra)
        return BlockSparse(pattern, inner.block_size)

    def token_mask(self, seq_len: int, num_heads: int = 1, grid: Optional[tuple] = None) -> Tensor:
        """The mask in the caller's (row-major) order, ``[Hl, N, N]``: bool for a BlockSparse inner strategy,
        the link multiplicity (int64) for a Dilated one (O(N^2), for tests and references)."""
        perm, inner = self._plan(seq_len, grid)
        inv = inverse(perm)
        if isinstance(inner, Dilated):
            m = inner.multiplicity(seq_len, num_heads)
        else:
            m = inner.pattern.token_mask(seq_len, inner.block_size, num_heads=num_heads)
        return m[:, inv][:, :, inv]

    def attention(self, q: Tensor, k: Tensor, v: Tensor, *, scale: Optional[float] = None,
                  grid: Optional[tuple] = None) -> Tensor:
        """Run the strategy on ``[B, H, N, D]`` tensors in row-major order (reorder, inner op, restore)."""
        from .. import ops

        ops.check_qkv(q, k, v)
        perm, inner = self._plan(q.shape[2], grid)
        if self.reorder == "fused":
            order = self.device_order(q.shape[2], check_grid(grid if grid is not None else self.grid), q.device)
            return ops.block_sparse_attention(q, k, v, inner.pattern, block_size=inner.block_size, scale=scale,
                                              order=order)
        perm = perm.to(q.device)
        qp, kp, vp = (t.index_select(2, perm) for t in (q, k, v))
        if isinstance(inner, Dilated):
            out = ops.dilated_attention(qp, kp, vp, inner.segment_lengths, inner.dilation_rates, scale=scale,
                                        mixing=inner.mixing, head_offsets=inner.head_offsets)
        else:
            out = ops.block_sparse_attention(qp, kp, vp, inner.pattern, block_size=inner.block_size, scale=scale)
        return out.index_select(2, inverse(perm))

    # --- compiler hooks ----------------------------------------------------------------------------------------

    def check_site(self, site) -> Optional[str]:
        q, k = site.q_shape, site.k_shape
        if len(q) != 4 or q[2] != k[2]:
            return f"Hilbert reordering needs self-attention shapes (Nq == Nk), got q {q} and k {k}"
        n = _static_len(site)
        if n is None:
            return f"Hilbert reordering needs a static sequence length; the length here is symbolic ({q[2]})"
        if site.is_causal:
            return ("the site is causal in the model's token order; reordering tokens along a curve would change "
                    "which tokens precede each other")
        if site.nodes.get("terms") and (site.pattern is None or site.key_keep or not allows_all(site.pattern, n)):
            why = site.mask_reason or ("key padding" if site.key_keep else "")
            return (f"the site's mask ({site.mask_desc}) is defined on the model's token order"
                    + (f" ({why})" if why else "") + "; Hilbert reordering keeps only an all-allowing mask")
        grid = self.grid
        if grid is None:
            grid, why = infer_grid(site.nodes["q"].graph, n)
            if grid is None:
                return f"grid=None and the grid could not be inferred: {why}; pass grid="
        try:
            perm, inner = self._plan(n, grid)
        except (ValueError, NotImplementedError) as e:
            return str(e)
        reason = inner.check_site(site)
        if reason:
            return reason
        site.nodes["hilbert"] = (grid, perm, inner)
        extra = n - math.prod(grid)
        site.detail = (f"{self.curve} order on grid {'x'.join(map(str, grid))}"
                       + (f" + {extra} {self.extra_tokens} token(s)" if extra else "")
                       + (f"; inner: {site.detail}" if site.detail else ""))
        return None

    @property
    def applies_softcap(self) -> bool:
        """The inner strategy's call gets the site, so its soft-capping (an elementwise score modifier, which
        commutes with reordering the tokens), when the inner strategy applies it."""
        return bool(getattr(self.inner, "applies_softcap", False))

    def emit_call(self, emit, site, call) -> Emitted:
        """The inner strategy's call in curve order: through the kernels' index table (``reorder="fused"``) or
        between gathers of q, k, v and of the output (tagged for ``passes.reorder``)."""
        grid, perm, inner = site.nodes["hilbert"]
        device = call.q.meta["val"].device
        if self.reorder == "fused":
            site.nodes["order"] = self.device_order(perm.numel(), grid, device)
            return inner.emit_call(emit, site, call)
        perm_node, inv_node = (emit.constant(t) for t in self.device_perms(perm.numel(), grid, device))
        key = f"{self.curve}:{'x'.join(map(str, grid))}:{perm.numel()}"

        def gather(x, index, dim, direction):
            node = emit(torch.ops.aten.index_select.default, (x, dim, index))
            node.meta[REORDER_TAG] = (direction, key, self.reorder)
            return node

        def mask():   # a mask [.., N, N] moves with the tokens on both axes
            m = call.mask()
            if m is not None:
                shape = m.meta["val"].shape
                for dim in (-2, -1):
                    if shape[dim] != 1:
                        m = emit(torch.ops.aten.index_select.default, (m, len(shape) + dim, perm_node))
            return m

        def key_keep():
            keep = call.key_keep()
            return None if keep is None else emit(torch.ops.aten.index_select.default, (keep, 1, perm_node))

        qp, kp, vp = (gather(t, perm_node, 2, "to") for t in (call.q, call.k, call.v))
        inner_call = dataclasses.replace(call, q=qp, k=kp, v=vp, mask=mask, key_keep=key_keep)
        emitted = inner.emit_call(emit, site, inner_call)
        lse = None if emitted.lse is None else emit(torch.ops.aten.index_select.default, (emitted.lse, 2, inv_node))
        return Emitted(gather(emitted.out, inv_node, 2, "from"), lse)

    # --- sharded over ranks (``strategies.contract.DistributedStrategy``) --------------------------------------
    # The ranks hold the sequence in curve order, each a shard of it (``dc.distributed.shard_sequence(x,
    # order=strategy)``): they run the inner strategy as it runs in curve order (``sharded``), and their outputs
    # are the curve-ordered output's shards.

    def check_distributed(self, name: str = "strategy") -> None:
        if self.grid is None:
            raise ValueError(f"{name}=dc.Hilbert(grid=None): sharded attention needs the grid up front (the ranks "
                             f"hold the sequence in its curve order); pass grid=")
        self.inner.check_distributed(f"{name}.inner")

    def sharded(self, seq_len: int, is_causal: bool):
        """The inner strategy in curve order (``plan``) for ``seq_len`` tokens."""
        if is_causal:
            raise ValueError("is_causal=True with dc.Hilbert: causality is an order of the model's tokens, which the "
                             "curve order doesn't keep (the single-process dc.Hilbert op has no causal form); pass "
                             "is_causal=False")
        return self._plan(seq_len)[1]

    def links(self, seq_len: int, num_heads: int, is_causal: bool, device=None):
        return self.sharded(seq_len, is_causal).links(seq_len, num_heads, is_causal, device)

    @property
    def head_period(self) -> int:
        return self.inner.head_period

    def key_window_span(self, seq_len: int) -> Optional[int]:
        return self.sharded(seq_len, False).key_window_span(seq_len)

    def attend_heads(self, q, k, v, *, first_head: int, num_heads: int, is_causal: bool, scale):
        return self.sharded(q.shape[2], is_causal).attend_heads(q, k, v, first_head=first_head, num_heads=num_heads,
                                                                is_causal=is_causal, scale=scale)

    def reference(self, q, k, v, *, is_causal: bool = False, scale: Optional[float] = None, attn_mask=None):
        """float64: the inner strategy's mask in curve order (``token_mask``), in the model's token order."""
        keep = self.token_mask(q.shape[2], q.shape[1])
        out = weighted_softmax_attention(q, k, v, keep.to(q.device), scale=scale, attn_mask=attn_mask)
        inner = self.inner
        return out / inner.num_branches if isinstance(inner, Dilated) and inner.mixing == "head_groups" else out


__all__ = ["Hilbert", "REORDER_TAG"]
