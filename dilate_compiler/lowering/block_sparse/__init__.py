"""Block-sparse attention, read top-down: ``layout_triton`` (the block lists built on the GPU), ``eager`` (the exact
path), ``triton`` (kernels and launchers), ``gluon`` (the warp-specialised Hopper forward), ``op``
(``torch.library``)."""
