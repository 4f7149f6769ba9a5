"""Custom ops (torch.library), their kernels and launchers."""
from . import dilated_op  # noqa: F401  (registers dilate_compiler::dilated_attention_*)
