"""What every kernel of the project shares (no op family's files are imported from here):

- ``primitives``: Triton device code: named constants (``LOG2E``, ``LN2``) and the online-softmax step;
- ``launch``: launching: the interpreter switch, autotuning spaces, the launch context, the ``wrap_triton`` runner,
  what the kernels can read in place;
- ``dispatch``: whether a call runs the kernels (and the log line when a CUDA call can't), the LSE dtype;
- ``inductor_caps``: register caps forwarded through Inductor;
- ``hopper_gluon``: the shared pieces of the warp-specialised Hopper forwards.
"""
