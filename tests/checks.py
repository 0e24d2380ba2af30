"""What the multi-rank tests check, in one place: the float64 reference norm, "the same on every
rank", and a count of the collectives a call issues.

    reference_norm([full grads...], p)      # float64, over the full (unsharded) gradients
    same_on_every_rank(value)               # one all_gather_object; True iff every repr agrees
    with count_collectives() as calls:      # collectives issued through torch.distributed
        distclip.clip_grad_norm_(...)
    calls.count
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Callable

import torch.distributed as dist

from distclip.verify.reference import as_float64, reference_norm  # noqa: F401 - the tests' reference

# the one float64 reference, shared with distclip.verify and the benchmarks
f64 = as_float64


def same_on_every_rank(value: object, group: dist.ProcessGroup | None = None) -> bool:
    """True iff ``repr(value)`` is the same on every rank of ``group`` (default: the world): one
    ``all_gather_object``, so every rank of the group must call it. repr, not ==: float bits and
    dtypes count, and NaN equals NaN."""
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, repr(value), group=group)
    return len(set(everyone)) == 1


class count_collectives:
    """Collectives issued through ``torch.distributed`` (``dist.all_reduce(...)`` and the like)
    while active; a collective torch issues inside another (the all_gather of an
    ``all_gather_object``) is not counted again.

        with count_collectives() as calls:
            ...
        calls.count
    """

    NAMES = ("all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "reduce_scatter_tensor",
             "broadcast", "all_to_all", "barrier")

    def __init__(self) -> None:
        self.count = 0
        self._saved: dict = {}

    def __enter__(self) -> count_collectives:
        from distclip.comm import objects as exchange

        assert not self._saved, "count_collectives is already active"
        self._saved = {(dist, n): getattr(dist, n) for n in self.NAMES}
        # distclip's object exchange (sizes, then bytes) counts once, as all_gather_object does
        self._saved[(exchange, "all_gather_bytes")] = exchange.all_gather_bytes
        self._depth = 0
        for (owner, n), original in self._saved.items():

            def wrapper(*a, _original=original, **k):
                self.count += self._depth == 0
                self._depth += 1
                try:
                    return _original(*a, **k)
                finally:
                    self._depth -= 1

            setattr(owner, n, wrapper)
        return self

    def __exit__(self, *exc: object) -> None:
        for (owner, n), original in self._saved.items():
            setattr(owner, n, original)
        self._saved = {}


@contextlib.contextmanager
def host_reads(mode: str):
    """``DISTCLIP_HOST_READS`` set for the block: ``auto`` (CPU path) or ``never`` (accelerator path)."""
    old = os.environ.get("DISTCLIP_HOST_READS")
    os.environ["DISTCLIP_HOST_READS"] = mode
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("DISTCLIP_HOST_READS", None)
        else:
            os.environ["DISTCLIP_HOST_READS"] = old


# The start of a script a test runs as its own process (``python -c``) to prove that a path makes
# no host read: a fake 4-rank group (this is rank 1), meta tensors, on which every host read
# (``bool``, ``item``, ``float``, ``tolist``) raises, and the reduction on meta, as on GPUs.
# ``plain(shape, dtype)`` and ``dt(shape, placements)`` make parameters with such grads.
META_PREAMBLE = r"""
import math, sys, torch, torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore
import distclip
from distclip import clip
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.placement_types import Partial

dist.init_process_group("fake", store=FakeStore(), rank=1, world_size=4)
meta = torch.device("meta")
clip.reduction_device = lambda stage: meta
mesh = init_device_mesh("cpu", (4,))

def plain(shape, dtype=torch.float32):
    p = torch.nn.Parameter(torch.empty(shape, device=meta, dtype=dtype))
    p.grad = torch.empty(shape, device=meta, dtype=dtype)
    return p

def dt(shape, placements):
    p = torch.nn.Parameter(DTensor.from_local(torch.empty(shape, device=meta), mesh, placements, run_check=False))
    p.grad = DTensor.from_local(torch.empty(shape, device=meta), mesh, placements, run_check=False)
    return p
"""


def raised_everywhere(call: Callable[[], Any], error: type[BaseException], bad_rank: int, rank: int, within_s: float) -> list[str]:
    """Run ``call``, which is given bad input on ``bad_rank`` only: the problems found (empty: fine).
    Every rank must raise ``error`` within ``within_s`` seconds, the others naming
    ``rank <bad_rank>``; any other exception (a gloo timeout: a rank left waiting) is a problem."""
    problems = []
    start = time.perf_counter()
    try:
        call()
        problems.append("did not raise")
    except error as e:
        if rank != bad_rank and f"rank {bad_rank}" not in str(e):
            problems.append(f"the error does not name rank {bad_rank}: {e}")
    except Exception as e:  # noqa: BLE001 - a gloo timeout is the failure this checks for
        problems.append(f"{type(e).__name__}: {str(e)[:200]}")
    if time.perf_counter() - start > within_s:
        problems.append(f"took {time.perf_counter() - start:.1f} s to raise everywhere")
    return problems
