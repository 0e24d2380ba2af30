"""What the multi-rank tests check, in one place: the float64 reference norm, "the same on every
rank", and a count of the collectives a call issues.

    reference_norm([full grads...], p)      # float64, over the full (unsharded) gradients
    same_on_every_rank(value)               # one all_gather_object; True iff every repr agrees
    with count_collectives() as calls:      # collectives issued through torch.distributed
        distclip.clip_grad_norm_(...)
    calls.count
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist


def f64(t: torch.Tensor) -> torch.Tensor:
    """Widen for the reference: complex grads keep their imaginary part."""
    return t.to(torch.complex128) if t.is_complex() else t.double()


def reference_norm(tensors: Iterable[torch.Tensor], p: float = 2.0) -> float:
    """The p-norm of all elements of ``tensors`` together, in float64 on one process (complex:
    the norm of the magnitudes). No element at all: 0.0, as torch returns for no gradients."""
    flat = torch.cat([f64(t).abs().reshape(-1).cpu() for t in tensors] + [torch.zeros(0, dtype=torch.float64)])
    return float(torch.linalg.vector_norm(flat, p)) if flat.numel() else 0.0


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
