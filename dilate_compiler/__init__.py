"""dilate_compiler: long-context attention (LongNet dilated and more) for unchanged PyTorch models."""

from . import nn, ops, strategies
from .api import DEFAULT_STRATEGY, RewriteResult, explain, rewrite
from .export import aot_compile, export
from .passes.site import AttentionSite, AttentionSkipped, Report
from .strategies import Dilated

__all__ = [
    "DEFAULT_STRATEGY", "AttentionSite", "AttentionSkipped", "Dilated", "Report", "RewriteResult", "aot_compile",
    "explain", "export", "nn",
    "ops", "rewrite", "strategies",
]
__version__ = "0.1.0"
