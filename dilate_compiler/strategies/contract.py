"""The contract between the compiler and a strategy: what every strategy implements, and what the rewrite hands it.

A strategy says what attention a rewritten site computes (``Dilated``, ``BlockSparse``, ``Hilbert``,
``SequenceParallel``, ...). It is a frozen dataclass with the three methods of :class:`Strategy`:

- ``check_site(site) -> Optional[str]``: None when it takes the site, else the reason it doesn't. It reads only the
  site record the passes finished (``passes.site.AttentionSite``): shapes, dtype, scale, dropout, and the mask as
  ``read_masks`` left it: ``pattern`` (the static predicate), ``key_keep`` (key padding), ``empty_rows`` (what the
  model gives a row that sees no key), ``mask_reason`` (why the mask is not read so). It may record on the site
  what it decided: ``site.detail`` (what it makes of the site), ``site.runs`` (``"kernels"`` or ``"exact path:
  <why>"``, for the report) and, in ``site.nodes``, what its ``emit_call`` needs.
- ``emit_call(emit, site, call) -> Emitted``: the op call, through ``emit(target, args, kwargs)`` (which adds the
  node and its ``meta["val"]``; ``emit.constant(tensor)`` holds a compile-time tensor as a buffer), from the site's
  inputs ``call`` (:class:`SiteCall`). It returns the output node ``[B, Hq, Nq, Dv]`` and, when its op gives one,
  the log-sum-exp node ``[B, Hq, Nq]``, from which the rewrite gives rows that keep no key the model's value.
- ``reference(q, k, v, *, is_causal=False, scale=None, attn_mask=None)``: what it computes, from the definition, in
  float64 (tests compare every path with it).

A site whose scores are soft-capped (``site.softcap = c``: ``c * tanh(s / c)`` on the scaled scores, before the
mask) is given only to a strategy whose ``applies_softcap`` is true (its ``emit_call`` passes ``site.softcap`` to the
op); any other skips it with a reason naming the soft-capping.

A strategy that also runs sharded over ranks (``dc.SequenceParallel``, ``dc.distributed``) implements
:class:`DistributedStrategy`: the strategy the ranks run on the sequence as they hold it (``sharded``: itself, or
``Hilbert``'s inner strategy in curve order), its link model on global positions (``links``), whether it can run
sharded (``check_distributed``), the period of its head-dependent rules (``head_period``), the key window around a
run of queries that holds every key they link (``key_window_span``, for the window kernels), and its computation on a
subset of the model's heads (``attend_heads``). The distributed code dispatches on these methods only.

Adding a strategy is one file in ``strategies/`` with these methods, plus its tests; the README's "Add a
strategy" section walks through one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Protocol, runtime_checkable

import torch.fx as fx


@dataclass
class SiteCall:
    """A site's inputs as graph nodes, for ``Strategy.emit_call``.

    ``q`` ``[B, Hq, Nq, D]``, ``k`` ``[B, Hkv, Nk, D]``, ``v`` ``[B, Hkv, Nk, Dv]`` (grouped-query heads already
    peeled back to the key/value heads). ``is_causal``: the model's own flag (SDPA's ``is_causal``); a causal mask
    the model built is in ``site.pattern``. ``mask()`` builds the model's mask terms as one mask for an op's
    ``attn_mask`` (bool: True attends, or additive), None without terms; ``key_keep()`` builds the split mask's
    per-key terms as bool ``[B or 1, Nk]`` (True: the key attends), None without them. Each builds its nodes only
    when called: a strategy calls the one it runs with.
    """

    q: fx.Node
    k: fx.Node
    v: fx.Node
    is_causal: bool
    scale: float
    dropout_p: float
    mask: Callable[[], Optional[fx.Node]]
    key_keep: Callable[[], Optional[fx.Node]]


@dataclass
class Emitted:
    """What ``emit_call`` made: the attention's output node, and its log-sum-exp node where the op gives one."""

    out: fx.Node
    lse: Optional[fx.Node] = None


@runtime_checkable
class Strategy(Protocol):
    def check_site(self, site) -> Optional[str]:
        ...

    def emit_call(self, emit, site, call: SiteCall) -> Emitted:
        ...

    def reference(self, q, k, v, *, is_causal: bool = False, scale: Optional[float] = None, attn_mask=None):
        ...


@runtime_checkable
class DistributedStrategy(Protocol):
    def check_distributed(self, name: str = "strategy") -> None:
        """Raises (``ValueError`` naming ``name`` for a value that can't run sharded, ``NotImplementedError`` for what
        isn't done) unless the strategy can run sharded over ranks."""
        ...

    def sharded(self, seq_len: int, is_causal: bool):
        """The strategy the ranks run on the ``seq_len`` positions in the order they hold them (every other method
        is asked of it): itself, or another that computes the same attention in that order. Raises ``ValueError``
        naming what doesn't fit where it can't run on that sequence."""
        ...

    def links(self, seq_len: int, num_heads: int, is_causal: bool, device=None):
        """Its ``strategies.links.Links`` over ``seq_len`` global positions and ``num_heads`` query heads."""
        ...

    @property
    def head_period(self) -> int:
        """Head-dependent rules repeat every ``head_period`` heads: a rank whose first head is a multiple of it
        runs its heads as a model whose heads start at 0 (1: no head-dependent rule)."""
        ...

    def key_window_span(self, seq_len: int) -> Optional[int]:
        """``W`` such that every key a query at position ``p`` links lies in ``[p // W * W, (p // W + 1) * W)`` and
        the pattern is the same after a shift by ``W``; None when there is none to use."""
        ...

    def attend_heads(self, q, k, v, *, first_head: int, num_heads: int, is_causal: bool, scale):
        """The whole-sequence attention of query heads ``first_head ..`` of a ``num_heads``-head model on the kernels,
        or None when the kernels don't run it (the distributed code then runs its exact path)."""
        ...
