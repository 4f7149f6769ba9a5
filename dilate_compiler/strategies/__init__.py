"""Attention strategies: the meaning of each pattern, its compile-time plan and its float64 reference."""
from .dilated import Dilated

__all__ = ["Dilated"]
