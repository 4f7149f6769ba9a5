"""Dilated attention, read top-down: ``plan`` (the compile-time plan of a pattern), ``eager`` (the exact path),
``triton`` (kernels and launchers), ``gluon`` (the warp-specialised Hopper forward), ``op`` (``torch.library``)."""
