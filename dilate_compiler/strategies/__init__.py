"""Attention strategies: the meaning of each pattern, its compile-time plan and its float64 reference."""
from .block_sparse import Adaptive, BlockSparse
from .dilated import Dilated
from .hilbert import Hilbert

__all__ = ["Adaptive", "BlockSparse", "Dilated", "Hilbert"]
