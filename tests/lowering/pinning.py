"""Pinning an autotuned kernel's configs for a test."""

import contextlib


@contextlib.contextmanager
def pinned(kernels, *configs):
    """Each autotuned kernel of ``kernels`` tunes over ``configs`` alone (one: runs it; its choice cache emptied),
    then is restored."""
    saved = [(kernel.configs, kernel.cache) for kernel in kernels]
    for kernel in kernels:
        kernel.configs, kernel.cache = list(configs), {}
    try:
        yield
    finally:
        for kernel, (configs, cache) in zip(kernels, saved):
            kernel.configs, kernel.cache = configs, cache
