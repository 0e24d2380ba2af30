"""The reduced vector: the one owner of what rides on a call's single all-reduce.

Every function that communicates (``clip_grad_norm_``, ``get_total_norm``, ``grad_norms``) reduces
one float64 vector over the call's group, laid out as

    [ head (the caller's values) | agreement hashes | names changed | has float64 | failed ]

- **head**: for a total norm ``[value, NaN flag, present]`` (:func:`total_head`); ``grad_norms``
  puts its per-entry values and flags there.
- **agreement** (:class:`~distclip.comm.agreement.Signature`): the call signature, which every rank of
  the group must share, then one row per pipeline stage (up to ``STAGE_SLOTS``) for the layout
  kinds every rank of that stage must share. Each row is the four bytes ``h`` of a crc32, taken
  as ``h + 1`` (never 0), in two lanes: all the rows' first lanes, then all their second lanes,
  encoded so that one fused op over the two blocks tells whether all values were equal: for SUM
  ``(h, n * h^2)`` (``n``: the ranks that fill the row), since ``n * sum(h^2) == sum(h)^2`` only
  when all ``h`` are equal (every sum exact in float64 for bytes, up to 2^18 ranks): the check is
  ``addcmul(second, first, first, value=-1)``; for MAX ``(h, -h)``, since ``max(h) == -max(-h)``
  only then: the check is ``first + second``. A rank that failed fills the call row with 0 (SUM)
  or ``+inf`` (MAX), so a failure fails the same check (:meth:`Packet.poisoned`: one verdict in
  two device ops).
- **flags** (:data:`FLAGS`): 0/1 per rank, tested ``> 0`` after the reduction (a count under SUM,
  an OR under MAX).

The same length for every norm type, so ranks that disagree on SUM vs MAX still reduce vectors of
one size. Two forms side by side: the host form (CPU: Python floats, one copy each way) and the
device form (accelerators: tensors, no host sync); they compute the same float64 bits
(``tests/unit/test_packet.py``). Nobody else indexes the vector.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional, Sequence

import torch

from distclip.comm.agreement import Signature, crc_bytes

__all__ = ["AGREEMENT_VALUES", "FLAGS", "STAGE_SLOTS", "Packet", "HostView", "DeviceView", "failed_vector", "total_head", "total_head_host",
           "total_from_head", "total_from_head_host"]

STAGE_SLOTS = 16  # stages compared individually; with more stages only the call signature is checked
_PARTS = 4  # values per agreement row: the four bytes of a crc32
_LANES = _PARTS * (1 + STAGE_SLOTS)  # the call's row, then one row per stage slot, in each of the two blocks
FLAGS = ("names_changed", "has_float64", "failed")
TOTAL_HEAD = 3  # [value, NaN flag, present]
AGREEMENT_VALUES = 2 * _LANES  # the first block, then the second (``agreement_slots``)


def _length(head: int, distributed: bool) -> int:
    """The vector's length: fixed by the head and whether there are ranks to agree with, never by
    what a rank holds, so a rank that failed still sends a vector of the others' length."""
    return head + (AGREEMENT_VALUES if distributed else 0) + len(FLAGS)


def _second(h: float, count: float, use_max: bool) -> float:
    """The second lane of a value ``h`` of a row filled by ``count`` ranks."""
    return -h if use_max else count * h * h


@functools.lru_cache(maxsize=64)
def agreement_slots(sig: Signature, use_max: bool) -> tuple[float, ...]:
    """The agreement numbers this rank adds (same length on every rank): the first block, then the
    second. Cached: a layout plan keeps its kinds from call to call, so they are hashed once, not
    once per call."""
    absent = -math.inf if use_max else 0.0
    first = [absent] * _LANES
    counts = [float(sig.stage.group_size)] * _PARTS + [float(sig.stage.size)] * (_LANES - _PARTS)
    first[:_PARTS] = [h + 1.0 for h in crc_bytes(sig.call)]
    if sig.stage.pp_size <= STAGE_SLOTS:
        at = _PARTS * (1 + sig.stage.index)
        first[at : at + _PARTS] = [h + 1.0 for h in crc_bytes(sorted(map(repr, sig.tensor_kinds)))]
    second = [absent if h == absent else _second(h, c, use_max) for h, c in zip(first, counts)]
    return tuple(first + second)


def _checked(sig: Signature) -> int:
    """Lanes of each block that some rank fills: the call's row and one row per stage."""
    return _PARTS * (1 + (sig.stage.pp_size if sig.stage.pp_size <= STAGE_SLOTS else 0))


class HostView(NamedTuple):
    """A reduced vector read on the host."""

    head: list[float]
    disagreed: bool
    names_changed: bool
    has_float64: bool
    failed: bool


class DeviceView(NamedTuple):
    """A reduced vector left on the device: 0-dim bool tensors, no host sync."""

    head: torch.Tensor
    disagreed: torch.Tensor
    names_changed: torch.Tensor
    has_float64: torch.Tensor
    failed: torch.Tensor


class Packet:
    """The layout of one call's reduced vector: ``head`` caller values, the agreement slots of
    ``sig`` (none without one: a single process), then :data:`FLAGS`.

    Args:
        head (int): number of caller values at the front.
        sig (Signature, optional): what the ranks must agree on; None when not distributed.
        use_max (bool): the vector is reduced with MAX (norm type ±inf), else SUM.
    """

    def __init__(self, head: int, sig: Optional[Signature], use_max: bool) -> None:
        self.head, self.sig, self.use_max = head, sig, use_max
        self.n_agreement = AGREEMENT_VALUES if sig is not None else 0
        self.flags_at = head + self.n_agreement
        self.length = _length(head, sig is not None)

    def _riders(self, flags: dict[str, bool]) -> list[float]:
        unknown = set(flags) - set(FLAGS)
        assert not unknown, unknown
        slots = list(agreement_slots(self.sig, self.use_max)) if self.sig is not None else []
        return slots + [1.0 if flags.get(name) else 0.0 for name in FLAGS]

    # ------------------------------------------------------------------ host form (CPU)
    def encode_host(self, head: Sequence[float], **flags: bool) -> torch.Tensor:
        """The vector as one float64 CPU tensor, built from Python floats with one copy."""
        assert len(head) == self.head
        return torch.tensor(list(head) + self._riders(flags), dtype=torch.float64)

    def decode_host(self, values: Sequence[float]) -> HostView:
        """A reduced vector read back (``tensor.tolist()``), tested in Python floats (float64)."""
        f = self.flags_at
        return HostView(list(values[: self.head]), self._mismatch_host(values[self.head : f]),
                        values[f] > 0, values[f + 1] > 0, values[f + 2] > 0)

    def _mismatch_host(self, reduced: Sequence[float]) -> bool:
        if self.sig is None:
            return False
        k = _checked(self.sig)
        first, second = reduced[:k], reduced[_LANES : _LANES + k]
        if self.use_max:
            return any(a + b != 0 for a, b in zip(first, second))
        return any(b - a * a != 0 for a, b in zip(first, second))

    # ------------------------------------------------------------------ device form (accelerators)
    def encode_device(self, head: torch.Tensor, device: torch.device, *, host_tail: Sequence[float] = (), **flags: bool) -> torch.Tensor:
        """The vector on ``device``: ``head`` (a float64 tensor there) and the riders copied from
        pinned host memory without a sync. ``host_tail``: the head's last values where they are
        host numbers (a total's flags for a finite p): they ride on the same copy, so the vector
        costs two device ops (a copy and a ``cat``)."""
        assert head.numel() + len(host_tail) == self.head
        return torch.cat([head.reshape(-1).to(device), _to_device(list(host_tail) + self._riders(flags), device)])

    def decode_device(self, packed: torch.Tensor) -> DeviceView:
        """A reduced vector tested on the device: the same float64 tests as ``decode_host``."""
        f = self.flags_at
        flags = packed[f:] > 0
        return DeviceView(packed[: self.head], self._mismatch_device(packed[self.head : f]), flags[0], flags[1], flags[2])

    def _mismatch_device(self, reduced: torch.Tensor) -> torch.Tensor:
        if self.sig is None:
            return torch.zeros((), dtype=torch.bool, device=reduced.device)
        k = _checked(self.sig)
        first, second = reduced[:k], reduced[_LANES : _LANES + k]
        # the same float64 arithmetic as ``_mismatch_host`` (exact: integers below 2^53)
        differences = first + second if self.use_max else torch.addcmul(second, first, first, value=-1)
        return differences.any()

    def poisoned(self, packed: torch.Tensor) -> torch.Tensor:
        """0-dim bool on the device: the ranks disagreed or one failed (every grad must stay as it
        is). A failed rank's vector (``failed_vector``) breaks the call row's agreement, so this
        is the agreement check alone: two device ops."""
        if self.sig is None:
            return packed[self.flags_at + 2] > 0
        return self._mismatch_device(packed[self.head : self.flags_at])


def failed_vector(head: int, distributed: bool, use_max: bool, device: torch.device) -> torch.Tensor:
    """The vector of a rank that failed before its own was encoded (bad input, local math, packing):
    the others' length, with the ``failed`` flag set and every other number neutral under the
    reduction (0 for SUM, -inf for MAX; flags 0), so the call's one collective still goes out and
    every rank sees the flag, except the call row's first lanes under MAX: ``+inf``, so that the
    agreement check fails too (under SUM the 0 there already does: ``h + 1`` is never 0). Built
    from nothing the rank holds, so it cannot fail the way the rank did. ``head``: the number of
    caller values (``Packet.head``)."""
    n = _length(head, distributed)
    values = [-math.inf if use_max else 0.0] * (n - len(FLAGS)) + [1.0 if name == "failed" else 0.0 for name in FLAGS]
    if distributed and use_max:
        values[head : head + _PARTS] = [math.inf] * _PARTS
    return _to_device(values, device)


def _to_device(values: list[float], device: torch.device) -> torch.Tensor:
    """Host numbers to ``device`` without a sync (pinned memory, non-blocking copy)."""
    host = torch.tensor(values, dtype=torch.float64)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


# ---------------------------------------------------------------------- the total's head


def total_head_host(value: float, has_elements: bool, norm_type: float) -> list[float]:
    """``[value, NaN flag, present]`` of a partial read on the host. For ±inf the reduction is a
    MAX (-inf negated: MIN(x) == -MAX(-x)), which on some backends drops NaN, so a NaN flag travels
    next to the value; for finite p SUM propagates NaN and the flag slot stays 0."""
    if math.isinf(norm_type):
        value *= 1.0 if norm_type > 0 else -1.0
        is_nan = math.isnan(value)
        return [-math.inf if is_nan else value, float(is_nan), float(has_elements)]
    return [value, 0.0, float(has_elements)]


def total_head(partial: torch.Tensor, has_elements: bool, norm_type: float) -> torch.Tensor:
    """``total_head_host`` on the device (no host sync)."""
    present = torch.full((), float(has_elements), dtype=torch.float64, device=partial.device)
    if math.isinf(norm_type):
        value = partial * (1.0 if norm_type > 0 else -1.0)
        is_nan = torch.isnan(value)
        return torch.stack([torch.where(is_nan, -math.inf, value), is_nan.double(), present])
    return torch.stack([partial, torch.zeros_like(partial), present])


def total_from_head_host(head: Sequence[float], norm_type: float) -> float:
    """The total norm from a reduced head: 0 where no rank holds an element."""
    if head[2] <= 0:
        return 0.0
    if math.isinf(norm_type):
        return math.nan if head[1] > 0 else head[0] * (1.0 if norm_type > 0 else -1.0)
    return _root(head[0], norm_type)


def total_from_head(head: torch.Tensor, norm_type: float) -> torch.Tensor:
    """``total_from_head_host`` on the device: the same float64 operations. For p >= 0 the
    ``present`` test is left out: where no rank holds an element the sum is exactly 0, whose root
    is already 0."""
    if math.isinf(norm_type):
        total = torch.where(head[1] > 0, math.nan, head[0] * (1.0 if norm_type > 0 else -1.0))
    elif norm_type == 0:  # counts elements; the weights make the sum inexact in the last bits
        return head[0].round()
    elif norm_type > 0:
        return head[0].pow(1.0 / norm_type)
    else:
        total = head[0].pow(1.0 / norm_type)
    return torch.where(head[2] > 0, total, 0.0)


def _root(total: float, norm_type: float) -> float:
    """``total ** (1 / p)`` as ``total_from_head`` computes it: p == 0 counts elements (rounded),
    0 ** (negative) is inf."""
    if norm_type == 0:
        return float(round(total)) if math.isfinite(total) else total
    if norm_type == 2:
        return math.sqrt(total) if total >= 0 else math.nan  # correctly rounded, as torch's pow(x, 0.5)
    if total == 0:
        return 0.0 if norm_type > 0 else math.inf
    return total ** (1.0 / norm_type)
