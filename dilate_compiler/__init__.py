"""dilate_compiler: long-context attention (LongNet dilated and more) for unchanged PyTorch models."""

from . import distributed, hilbert, nn, ops, patterns, strategies
from .distributed import SequenceParallel
from .api import DEFAULT_STRATEGY, RewriteResult, explain, rewrite
from .export import aot_compile, export
from .passes.site import AttentionSite, AttentionSkipped, Report
from .strategies import Adaptive, BlockSparse, Dilated, Hilbert
from .backend import register as _register_backend

_register_backend()      # backend="dilated" without the entry point (the package on PYTHONPATH, not installed)

__all__ = [
    "DEFAULT_STRATEGY", "Adaptive", "AttentionSite", "AttentionSkipped", "BlockSparse", "Dilated", "Hilbert",
    "Report", "RewriteResult",
    "SequenceParallel", "aot_compile", "distributed", "explain", "export", "hilbert", "nn",
    "ops", "patterns", "rewrite", "strategies",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # ``dc.hf`` imports transformers, so it loads on first use, not with the package.
    if name == "hf":
        import importlib
        return importlib.import_module(".hf", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
