"""dilate_compiler: long-context attention (LongNet dilated and more) for unchanged PyTorch models."""

from . import nn, ops, strategies
from .api import DEFAULT_STRATEGY, RewriteResult, explain, rewrite
from .passes.site import AttentionSite, AttentionSkipped, Report
from .strategies import Dilated

__all__ = [
    "DEFAULT_STRATEGY", "AttentionSite", "AttentionSkipped", "Dilated", "Report", "RewriteResult", "explain", "nn",
    "ops", "rewrite", "strategies",
]
__version__ = "0.1.0"
