"""Which implementation a step of the CRF takes: the CPU's own route or the generic one.

Several steps have a route written for the CPU's speed: numpy's sorts and sorted merges in the lattice build,
the blocked splat, the blocked Gram products, the banded spatial passes and the classes-first softmax. Everywhere else — on CUDA, the only route there — the generic route runs: plain
PyTorch operations (``torch.sort``, ``torch.unique``, ``torch.searchsorted``, one matrix product, one
convolution per axis). Every branch asks :func:`cpu_route`, so that :func:`generic_routes` can make the CPU take
the generic route too: the tests run the whole CRF both ways on the CPU and check that they agree, so the code a
GPU runs is tested on machines without one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["cpu_route", "generic_routes"]

_generic_only = False


def cpu_route(device: torch.device | str) -> bool:
    """Whether work on ``device`` takes the CPU's own route (a CPU device, unless :func:`generic_routes` is on)."""
    return torch.device(device).type == "cpu" and not _generic_only


@contextmanager
def generic_routes() -> Iterator[None]:
    """Within the block, CPU tensors take the generic route that other devices take (for tests; not
    thread-safe: it changes a module-wide switch)."""
    global _generic_only
    before, _generic_only = _generic_only, True
    try:
        yield
    finally:
        _generic_only = before
