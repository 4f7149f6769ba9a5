"""Custom ops (``torch.library``), their kernels and launchers, one folder per op family.

- ``common``: what every kernel shares: named constants and the online-softmax step (``primitives``), launching
  (``launch``), whether a call runs the kernels (``dispatch``), register caps under Inductor (``inductor_caps``)
  and the warp-specialised Hopper pieces (``hopper_gluon``);
- ``dilated``: the compile-time plan, the exact path, the Triton kernels, the Hopper forward and the op;
- ``block_sparse``: the block-layout list builder, the exact path, the Triton kernels, the Hopper forward and
  the op.

The ops register when ``dilate_compiler.ops`` imports ``dilated.op`` and ``block_sparse.op``. No op family
imports another's files.
"""
