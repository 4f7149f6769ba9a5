"""Read each site's mask as a static predicate AND per-key data terms, and what the model gives a query row that
sees no key.

A site's mask terms (``find_attention``) are read by :func:`mask_pattern.split_mask`::

    keep = (kv_idx <= q_idx) & padding[batch_idx, kv_idx]      # transformers' causal mask with padding
      ->  pattern "auto: (p-j>=0)", key_keep (padding[batch_idx, kv_idx],)

and the site record gets ``pattern`` (the predicate, with ``is_causal`` folded in), ``key_keep`` (the per-key
terms, ANDed) and ``empty_rows``, the model's value for a row whose every key is dropped:

- ``"zero"``: SDPA and ``_safe_softmax`` give 0 (as the ops do);
- ``"nan"``: ``torch.softmax`` of a row of -inf is NaN;
- ``"mean"``: every dropped score equals one finite value (a fill, or an add that swallows the score, as
  ``finfo(float32).min`` does): the softmax is uniform, the row is the mean of v over all keys.

Where the mask is not such a split, or the model's empty rows follow another rule (an add in float16 that does
not swallow the score), ``mask_reason`` says so and the site keeps its mask (the exact path).
"""

from __future__ import annotations

import torch

from ..patterns import INF, Pattern, Term
from ..patterns.algebra import UNBOUNDED
from .mask_pattern import NotStructured, describe, split_mask

# An added drop value swallows any score (s + drop == drop) when it is this large for the dtype of the add.
SWALLOWS = {torch.float32: -1e30, torch.bfloat16: -1e30, torch.float64: -1e300}


def read_masks(sites: list) -> None:
    """Fill ``pattern``, ``key_keep``, ``empty_rows`` and ``mask_reason`` of every found site, in place."""
    for site in sites:
        if site.status == "skipped" or len(site.q_shape) != 4:
            continue
        _read(site)


def _read(site) -> None:
    n = site.k_shape[2]
    n_q = site.q_shape[2] if site.decode else n
    try:
        split = split_mask(site, n, n_q)
    except NotStructured as e:
        site.mask_reason = f"the mask is not a static predicate and key padding: {e}"
        # The mask is carried to the op, which adds it as the model does: a row the op leaves with no key had
        # only -inf scores in the model, where torch.softmax gives NaN (SDPA and _safe_softmax: 0, as the op).
        site.empty_rows = "nan" if site.kind != "sdpa" and site.nodes.get("softmax") == "softmax" else "zero"
        return
    terms = split.pattern.terms
    if site.is_causal:   # SDPA's is_causal: the last query is the last key
        terms = tuple(t & Term(d=(0, 2**30)) for t in terms)
    site.pattern = Pattern(terms, split.pattern.name + (" & causal" if site.is_causal else ""))
    site.key_keep = split.key_keep
    site.predicate, site.predicate_name = _predicate(site.pattern, n)
    if not split.key_keep and _links_the_diagonal(site.pattern, n):
        return   # no row can be empty: how the model treats one doesn't matter
    site.empty_rows, site.mask_reason = _empty_rows(site, split.drops)


def _reach(n) -> int:
    """The largest ``|p - j|`` an ``n``-token sequence holds; for a symbolic ``n`` (a predicate read for every
    length), the unbounded ``INF``."""
    return n - 1 if isinstance(n, int) else INF


def _predicate(pattern: Pattern, n) -> tuple:
    """``(kind, name)``: kind ``"all"`` or ``"causal"`` when the pattern links every pair (every ``j <= p``) of an
    ``n``-token sequence (of every length, when ``n`` is symbolic), else ``""``; the name says what it is
    (``sliding_window(4096)``, ``causal sliding_window(4096)``, or the term intervals)."""
    reach = _reach(n)
    if len(pattern.terms) == 1 and not pattern.terms[0].blocks and not pattern.terms[0].uses_grid:
        t = pattern.terms[0]
        if t.p[0] <= 0 and t.p[1] >= reach and t.j[0] <= 0 and t.j[1] >= reach:
            lo, hi = t.d
            if lo <= -reach and hi >= reach:
                return "all", "all"
            if lo == 0 and hi >= reach:
                return "causal", "causal"
            if lo == 0:
                return "", f"causal sliding_window({hi + 1})"
            if lo == -hi:
                return "", f"sliding_window({hi + 1})"
    return "", describe(pattern)


def _links_the_diagonal(pattern: Pattern, n) -> bool:
    """Every query position links its own key (the predicate part of the mask can't leave a row empty). For a
    symbolic ``n``: a term on ``p - j`` alone that holds ``p == j`` at every length."""
    if not isinstance(n, int):
        return any(not t.blocks and not t.uses_grid and t.p == UNBOUNDED and t.j == UNBOUNDED
                   and t.d[0] <= 0 <= t.d[1] for t in pattern.terms)
    coords = pattern.grid.table(n) if pattern.grid is not None else None
    p = torch.arange(n)
    diag = torch.zeros(n, dtype=torch.bool)
    for t in pattern.terms:
        if not t.blocks:
            diag |= t.token_mask(p, p, coords)
    return bool(diag.all())


def _empty_rows(site, drops: tuple) -> tuple:
    """``(rule, reason)``: what the model gives a row that sees no key (see the module docstring)."""
    if not drops:
        return "zero", ""
    values = {v for v, _ in drops}
    softmax = "sdpa" if site.kind == "sdpa" else site.nodes.get("softmax", "softmax")
    if values == {float("-inf")}:
        return ("nan" if softmax == "softmax" else "zero"), ""
    if float("-inf") in values or len(values) > 1:
        return "", f"the mask drops keys with several values ({sorted(values)}): rows with no key mix them"
    value = values.pop()
    add_dtypes = iter(site.nodes.get("add_dtypes", []))
    for _, how in drops:
        if how != "add":
            continue
        dtype = site.dtype if site.kind == "sdpa" else next(add_dtypes, site.dtype)
        if not value <= SWALLOWS.get(dtype, float("-inf")):
            return "", (f"the mask adds {value:g} in {str(dtype).replace('torch.', '')}, which does not swallow the "
                        f"score: rows with no key follow the model's rounding of score + mask")
    return "mean", ""
