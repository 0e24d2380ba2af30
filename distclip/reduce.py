"""Communication: one all-reduce of a few float64 numbers per call, the same on every rank.

The partials of all ranks are combined over the call's group (the ranks that hold the model; by
default the default process group): every rank of every pipeline stage takes part, so each rank
issues exactly one collective per call, whatever it holds (no early return for a rank without
gradients: that is a hang, AReaL #1139).
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import torch
import torch.distributed as dist

from distclip.layout import DTensor, Stage


def reduction_device(stage: Stage) -> torch.device:
    """The device the partial is reduced on, chosen from facts every rank shares (the backend and
    the accelerator), never from this rank's grads: a rank without grads, or with CPU-offloaded
    ones, must still use the same backend as the others, or the collective hangs.

    On NCCL: the device the default process group is bound to (``init_process_group(device_id=...)``),
    else the current CUDA device, unless that is still the default ``cuda:0`` while ``LOCAL_RANK``
    names another GPU (a job that moved its model to ``cuda:{local_rank}`` but never called
    ``torch.cuda.set_device``): then ``cuda:{LOCAL_RANK}``, since every rank reducing on cuda:0
    makes NCCL fail or hang.
    """
    if not stage.distributed:
        return torch.device("cpu")
    backend = str(dist.get_backend()).lower()
    if not (torch.cuda.is_available() and ("nccl" in backend or "cuda" in backend or backend == "undefined")):
        return torch.device("cpu")
    bound = getattr(dist.distributed_c10d._get_default_group(), "bound_device_id", None)
    if bound is not None:
        return torch.device(bound)
    current = torch.cuda.current_device()
    local_rank = os.environ.get("LOCAL_RANK", "")
    if current == 0 and local_rank.isdigit() and 0 < int(local_rank) < torch.cuda.device_count():
        return torch.device("cuda", int(local_rank))
    return torch.device("cuda", current)


def reduction_op(norm_type: float) -> dist.ReduceOp.RedOpType:
    """The single collective's op: SUM of partials for finite p, MAX for +-inf (-inf negated)."""
    return dist.ReduceOp.MAX if math.isinf(norm_type) else dist.ReduceOp.SUM


def packed_length(n_extra: int) -> int:
    """Length of the reduced vector, ``[value, nan flag, present, *extra]``, the same for every
    norm type, so ranks that disagree on it still reduce vectors of one size."""
    return 3 + n_extra


def _to_device(values: list[float], device: torch.device) -> torch.Tensor:
    """Host numbers to ``device`` without a sync (pinned memory, non-blocking copy)."""
    host = torch.tensor(values, dtype=torch.float64)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def reduce_partials(
    partial: torch.Tensor, has_elements: bool, norm_type: float, stage: Stage, extra: Sequence[float] = ()
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine every rank's partial into the total norm (float64, identical on every rank).

    Finite ``p`` sums ``[partial, 0, has_elements, *extra]``. For +-inf the reduction is a MAX,
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
            dist.all_reduce(packed, op=reduction_op(norm_type), group=stage.group)
        total = torch.where(packed[1] > 0, math.nan, packed[0] * sign)
    else:  # the NaN flag slot is unused (SUM propagates NaN) but keeps the length fixed
        packed = torch.cat([torch.stack([partial, torch.zeros_like(partial), present]), riders])
        if stage.distributed:
            dist.all_reduce(packed, op=reduction_op(norm_type), group=stage.group)
        # p == 0 counts elements; the weights make the sum inexact in the last bits.
        total = packed[0].round() if norm_type == 0 else packed[0].pow(1.0 / norm_type)
    return torch.where(packed[2] > 0, total, 0.0), packed[packed_length(0) :]


def reduce_partials_on_host(
    partial: torch.Tensor, has_elements: bool, norm_type: float, stage: Stage, extra: Sequence[float] = ()
) -> tuple[float, list[float]]:
    """``reduce_partials`` where reading the partial costs nothing (CPU): the same vector, reduced
    by the same all-reduce, built with one copy from the host and read back with one, instead of a
    dozen tiny tensor ops on each side (~0.1 ms per call on the CI machine). Returns the total and
    the reduced ``extra`` as Python floats (float64, so every rank computes the same bits)."""
    value = partial.item()
    sign = 1.0
    if math.isinf(norm_type):
        sign = 1.0 if norm_type > 0 else -1.0  # MIN(x) == -MAX(-x), as in ``reduce_partials``
        value *= sign
        is_nan = math.isnan(value)
        head = [-math.inf if is_nan else value, float(is_nan), float(has_elements)]
    else:
        head = [value, 0.0, float(has_elements)]
    packed = torch.tensor(head + list(extra), dtype=torch.float64)
    if stage.distributed:
        dist.all_reduce(packed, op=reduction_op(norm_type), group=stage.group)
    values = packed.tolist()
    if values[2] <= 0:  # no rank holds an element
        return 0.0, values[3:]
    if math.isinf(norm_type):
        return (math.nan if values[1] > 0 else values[0] * sign), values[3:]
    return _root(values[0], norm_type), values[3:]


def _root(total: float, norm_type: float) -> float:
    """``total ** (1 / p)`` as ``reduce_partials`` computes it: p == 0 counts elements (rounded),
    0 ** (negative) is inf."""
    if norm_type == 0:
        return float(round(total)) if math.isfinite(total) else total
    if norm_type == 2:
        return math.sqrt(total) if total >= 0 else math.nan  # correctly rounded, as torch's pow(x, 0.5)
    if total == 0:
        return 0.0 if norm_type > 0 else math.inf
    return total ** (1.0 / norm_type)


def reduce_partial_grads(partial: Sequence[tuple[DTensor, float]]) -> list[tuple[torch.Tensor, float]]:
    """Make ``Partial`` DTensor grads whole: their local tensors, concatenated per mesh (in float64,
    complex128 for complex grads), are summed over the mesh dimensions where they are partial.

    One collective per (mesh, partial dims, real/complex): never one per tensor. Only the ranks of
    that mesh hold such grads, and all of them do (``parallelize_module`` applies the same plan on
    every rank of the mesh), so exactly the ranks of each group issue its collective. Returns the
    reduced values as (1-D float64 tensor, weight) for the norm; the grads are left as they are.
    """
    buckets: dict[tuple, list[tuple[DTensor, float]]] = {}
    for grad, weight in partial:
        spec = grad._spec  # DTensor internals, as in ``layout.local_layout``
        dims = tuple(i for i, p in enumerate(spec.placements) if p.is_partial())
        buckets.setdefault((spec.mesh, dims, grad.is_complex()), []).append((grad, weight))
    out: list[tuple[torch.Tensor, float]] = []
    for (mesh, dims, is_complex), members in buckets.items():
        dtype = torch.complex128 if is_complex else torch.float64
        flat = torch.cat([g._local_tensor.reshape(-1).to(dtype) for g, _ in members])
        for dim in dims:
            dist.all_reduce(flat, group=mesh.get_group(dim))
        offset = 0
        for grad, weight in members:
            n = grad._local_tensor.numel()
            value = flat[offset : offset + n]
            offset += n
            for dim in dims:
                if grad._spec.placements[dim].reduce_op == "avg":
                    value = value / mesh.size(dim)
            out.append((value, weight))
    return out
