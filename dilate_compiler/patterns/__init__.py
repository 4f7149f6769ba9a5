"""Block-sparse attention patterns and the block layouts built from them: the public namespace
(``dc.patterns.local(...)``, ``Pattern.layout(...)``, ``BlockLayout`` ...).

- ``algebra``: terms, block sets, grids, the term table and the token predicate (pure: no kernels);
- ``layouts``: ``BlockLayout`` and the compilation of terms into its index lists (on a GPU, with the Triton list
  builder of ``lowering.block_sparse``);
- ``pattern``: ``Pattern``, the named patterns, ``union`` / ``intersection`` and ``build_layout``.

Kernels import ``algebra`` (and ``layouts``), never the reverse.
"""

from .algebra import (EMPTY, FAR, FULL, GRID_AXES, INF, MAX_EXTRA_TOKENS, MAX_TERMS, PARTIAL, TERM_COLUMNS,
                      UNBOUNDED, BlockSet, DilatedBlocks, Grid, LayoutBlocks, LocalBlocks, RandomBlocks, Term,
                      partial_mask, term_checks, term_table)
from .layouts import LAYOUT_TENSORS, SCHEDULES, BlockLayout, block_lists, expand_lists
from .pattern import (Pattern, build_layout, dilated, from_layout, global_tokens, intersection, local, neighborhood,
                      random, sliding_window, union)

__all__ = [
    "BlockLayout", "Grid", "Pattern", "Term", "block_lists", "build_layout", "dilated", "from_layout", "global_tokens",
    "intersection", "local", "neighborhood", "random", "sliding_window", "union",
]
