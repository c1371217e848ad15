"""`@triton.jit` bodies only; launchers live in :mod:`tq_kernels.ops`."""
