"""Communication: one all-reduce of a few float64 numbers per call, the same on every rank.

The partials of all ranks are combined over the default process group: every rank of every
pipeline stage takes part, so each rank issues exactly one collective per call, whatever it
holds (no early return for a rank without gradients: that is a hang, AReaL #1139).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from distclip.layout import Stage


def reduction_device(grad_device: Optional[torch.device], stage: Stage) -> torch.device:
    """The device the partial is reduced on: the grads' device if the backend can reduce there."""
    if not stage.distributed:
        return grad_device or torch.device("cpu")
    backend = str(dist.get_backend()).lower()
    cpu_ok = "gloo" in backend or "cpu:" in backend or "mpi" in backend
    if grad_device is not None and (grad_device.type != "cpu" or cpu_ok):
        return grad_device
    if not cpu_ok and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def reduction_op(norm_type: float) -> "dist.ReduceOp":
    """The single collective's op: SUM of partials for finite p, MAX for +-inf (-inf negated)."""
    return dist.ReduceOp.MAX if math.isinf(norm_type) else dist.ReduceOp.SUM


def packed_length(norm_type: float, n_extra: int) -> int:
    """Length of the reduced vector: [value, nan flag, present] or [value, present], then extras."""
    return (3 if math.isinf(norm_type) else 2) + n_extra


def _to_device(values: list[float], device: torch.device) -> torch.Tensor:
    """Host numbers to ``device`` without a sync (pinned memory, non-blocking copy)."""
    host = torch.tensor(values, dtype=torch.float64)
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def reduce_partials(
    partial: torch.Tensor, has_elements: bool, norm_type: float, stage: Stage, extra: Sequence[float] = ()
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine every rank's partial into the total norm (float64, identical on every rank).

    Finite ``p`` sums ``[partial, has_elements, *extra]``. For +-inf the reduction is a MAX,
    which on some backends drops NaN (the comparison is false), so a NaN flag travels next to the
    value. ``extra`` (the agreement check's numbers) rides along; it is returned reduced. No host
    sync: every decision after the reduction is a ``torch.where``.
    """
    device = partial.device
    present = torch.full((), float(has_elements), dtype=torch.float64, device=device)
    riders = _to_device(list(extra), device)
    if math.isinf(norm_type):
        sign = 1.0 if norm_type > 0 else -1.0  # MIN(x) == -MAX(-x): one op for both
        value = partial * sign
        is_nan = torch.isnan(value)
        packed = torch.cat([torch.stack([torch.where(is_nan, -math.inf, value), is_nan.double(), present]), riders])
        if stage.distributed:
            dist.all_reduce(packed, op=reduction_op(norm_type))
        total = torch.where(packed[1] > 0, math.nan, packed[0] * sign)
    else:
        packed = torch.cat([torch.stack([partial, present]), riders])
        if stage.distributed:
            dist.all_reduce(packed, op=reduction_op(norm_type))
        # p == 0 counts elements; the weights make the sum inexact in the last bits.
        total = packed[0].round() if norm_type == 0 else packed[0].pow(1.0 / norm_type)
    head = packed_length(norm_type, 0)
    return torch.where(packed[head - 1] > 0, total, 0.0), packed[head:]
