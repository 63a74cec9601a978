"""How many CPU threads the CRF's no-grad work (lattice build, mean-field inference) runs with.

PyTorch's CPU operators split every call over ``torch.get_num_threads()`` threads and wait for the slowest at
the end of each parallel region. The CRF runs hundreds of short regions per image, so when another process
keeps a core busy (DataLoader workers, a second job) a thread that loses its core stalls every region, and
two threads on one free core are slower than one. The ``"adaptive"`` policy (the default) therefore uses at
most as many threads as there are cores free right now:

    free = (CPUs this process may run on) - (runnable tasks on the machine that are not this process's threads)

read from Linux's ``/proc/stat`` (``procs_running``) and ``/proc/self/task/*/stat``, capped by
``torch.get_num_threads()`` and at least 1. Where those files are missing (not Linux) it uses
``torch.get_num_threads()``, as the ``"all"`` policy always does. The count is chosen once per call (a lattice
build, one inference) and the previous ``torch.set_num_threads`` value is restored afterwards. Only work whose
results do not depend on the thread count runs under the policy (the tests check it), so the load never
changes a result: a product whose rounding depends on the count (MKL's, e.g. the lattice's elevation) runs
with the caller's count (:func:`caller_threads`). ``torch.set_num_threads`` is process-wide: another Python
thread running PyTorch operators at the same moment sees the temporary count too; choose ``"all"`` or a fixed
count there. The policy is a heuristic: ``procs_running`` is one instant's count and ignores CPU quotas.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator

import torch

__all__ = [
    "caller_threads",
    "free_cores",
    "inference_threads",
    "limited_threads",
    "set_inference_threads",
    "thread_policy",
]

_policy: str | int = "adaptive"
_caller: contextvars.ContextVar[int | None] = contextvars.ContextVar("caller_threads", default=None)


def set_inference_threads(policy: str | int) -> None:
    """Sets the policy: ``"adaptive"`` (default: at most the free cores), ``"all"`` (``torch.get_num_threads()``)
    or an int >= 1 (that many threads, whatever the load)."""
    global _policy
    if isinstance(policy, bool) or not (policy in ("adaptive", "all") or (isinstance(policy, int) and policy >= 1)):
        raise ValueError(f"policy must be 'adaptive', 'all' or an int >= 1, got {policy!r}")
    _policy = policy


def thread_policy() -> str | int:
    """The current policy (see :func:`set_inference_threads`)."""
    return _policy


def free_cores() -> int | None:
    """The CPUs this process may use that no other runnable task holds now, >= 0; None where unknown."""
    try:
        with open("/proc/stat", "rb") as stat:
            running = next(int(line.split()[1]) for line in stat if line.startswith(b"procs_running"))
        own = 0
        for task in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{task}/stat", "rb") as f:
                    own += f.read().rpartition(b")")[2].split(None, 1)[0] == b"R"
            except OSError:  # the thread ended meanwhile
                continue
        cpus = len(os.sched_getaffinity(0))
    except (OSError, StopIteration, ValueError, AttributeError):
        return None
    return max(cpus - max(running - own, 0), 0)


def inference_threads() -> int:
    """The thread count the policy gives now."""
    wanted = torch.get_num_threads()
    if _policy == "all":
        return wanted
    if _policy != "adaptive":
        return int(_policy)
    free = free_cores()
    return wanted if free is None else max(1, min(wanted, free))


@contextlib.contextmanager
def limited_threads() -> Iterator[int]:
    """Runs the block with :func:`inference_threads` threads, then restores ``torch.get_num_threads()``."""
    before = torch.get_num_threads()
    threads = inference_threads()
    token = _caller.set(_caller.get() or before)  # nested: the outermost caller's count
    try:
        if threads == before:
            yield threads
            return
        torch.set_num_threads(threads)
        try:
            yield threads
        finally:
            torch.set_num_threads(before)
    finally:
        _caller.reset(token)


@contextlib.contextmanager
def caller_threads() -> Iterator[None]:
    """Inside :func:`limited_threads`: runs the block with the caller's thread count, for work whose rounding
    depends on the count (MKL's matrix products), so that the load cannot change a result."""
    caller, now = _caller.get(), torch.get_num_threads()
    if caller is None or caller == now:
        yield
        return
    torch.set_num_threads(caller)
    try:
        yield
    finally:
        torch.set_num_threads(now)
