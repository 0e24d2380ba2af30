"""Python's cyclic garbage collector held off while a call allocates in bulk.

Discovering the layout of N parameters (and building its plan) allocates O(N) small tracked
objects: routes, plan steps, tuples, lists. Every 700 allocations Python runs a young-generation
collection, and every so often a full one, which rescans every tracked object of the process (a
large model's parameters, grads and their Python wrappers: millions). At tens of thousands of
parameters those collections cost more than the discovery itself (``benchmarks/README.md``,
"Scale"). distclip's own objects hold no reference cycles, so nothing is lost by deferring: the
collector runs at its next threshold after the call, once instead of many times during it.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """Disable the cyclic collector for the block if it is enabled, and re-enable it after (also
    on an exception). A collector the caller disabled stays disabled."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
