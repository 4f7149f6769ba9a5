"""dilate_compiler: long-context attention (LongNet dilated and more) for unchanged PyTorch models."""

from . import nn, ops, strategies
from .strategies import Dilated

__all__ = ["Dilated", "nn", "ops", "strategies"]
__version__ = "0.1.0"
