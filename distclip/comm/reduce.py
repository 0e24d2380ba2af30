"""Communication: one all-reduce of a few float64 numbers per call, the same on every rank.

The partials of all ranks are combined over the call's group (the ranks that hold the model; by
default the default process group): every rank of every pipeline stage takes part, so each rank
issues exactly one collective per call, whatever it holds (no early return for a rank without
gradients: that is a hang, AReaL #1139).
"""

from __future__ import annotations

import math
import os
import zlib
from typing import NamedTuple, Sequence

import torch
import torch.distributed as dist

from distclip._dtensor import DTensor, check_partial_ops, is_sum_dim, local_of, spec_of
from distclip._torch import default_group_device
from distclip.comm.failure import LayoutMismatchError
from distclip.comm.objects import every_rank_must_call
from distclip.host_reads import host_reads_allowed
from distclip.layout.discovery import CallGroup


def reduction_device(stage: CallGroup) -> torch.device:
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
    bound = default_group_device()
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


def all_reduce(packed: torch.Tensor, norm_type: float, stage: CallGroup) -> None:
    """The call's one collective: ``packed`` (see ``packet``) reduced in place over the call's group,
    SUM for finite p, MAX for ±inf. Nothing to do in a single process."""
    if stage.distributed:
        # a call made on some ranks only waits here until the backend's timeout: say what to do
        with every_rank_must_call("this distclip call", stage.group_size):
            dist.all_reduce(packed, op=reduction_op(norm_type), group=stage.group)


class PartialGrad(NamedTuple):
    """A ``Partial`` DTensor grad to make whole: ``tag`` travels through unchanged (a weight, or
    the caller's index), ``name`` is what every rank calls it (its parameter's name; "" where the
    caller has none)."""

    grad: DTensor
    tag: float
    name: str = ""


def _pairing_key(entry: PartialGrad) -> tuple:
    """What pairs a grad with its summands on the other ranks: its name, then what the tensor
    itself shows alike on every rank (global shape, dtype, placements). Never the position in the
    caller's list: ranks may list the same grads in different orders (a ``set(...)`` of
    parameters), and summing rank 0's LayerNorm weight with rank 1's bias is silently wrong."""
    spec = spec_of(entry.grad)
    return (entry.name, tuple(entry.grad.shape), str(entry.grad.dtype), repr(tuple(spec.placements)))


def reduce_partial_grads(partial: Sequence[tuple]) -> list[tuple[torch.Tensor, float]]:
    """Make ``Partial`` DTensor grads whole: their local tensors, concatenated per mesh (in float64,
    complex128 for complex grads), are summed over the mesh dimensions where they are partial.

    ``partial``: ``PartialGrad`` records, or (grad, tag) pairs. One collective per (mesh, partial
    dims, real/complex): never one per tensor. Only the ranks of that mesh hold such grads, and all
    of them do (``parallelize_module`` applies the same plan on every rank of the mesh), so exactly
    the ranks of each group issue its collective. Within a collective the grads are paired across
    ranks by ``_pairing_key`` (stable for ties: grads alike in name, shape, dtype and placements
    keep the caller's order). Where reading a value costs no host sync, a first, two-number
    all-reduce checks that every rank of the group holds the same keys, and a mismatch raises
    ``LayoutMismatchError`` on every rank of the group before any value is summed. Returns the
    reduced values as (1-D float64 tensor, tag) for the norm; the grads are left as they are.
    """
    buckets: dict[tuple, list[PartialGrad]] = {}
    for item in partial:
        entry = item if isinstance(item, PartialGrad) else PartialGrad(*item)
        spec = spec_of(entry.grad)
        dims = check_partial_ops(spec)
        buckets.setdefault((spec.mesh, dims, entry.grad.is_complex()), []).append(entry)
    out: list[tuple[torch.Tensor, float]] = []
    for (mesh, dims, is_complex), members in buckets.items():
        members.sort(key=_pairing_key)
        dtype = torch.complex128 if is_complex else torch.float64
        flat = torch.cat([local_of(e.grad).reshape(-1).to(dtype) for e in members])
        if host_reads_allowed(flat.device):
            _check_pairing(members, mesh, dims, flat.device)
        for dim in dims:
            dist.all_reduce(flat, group=mesh.get_group(dim))
        offset = 0
        for entry in members:
            n = local_of(entry.grad).numel()
            value = flat[offset : offset + n]
            offset += n
            for dim in dims:
                if not is_sum_dim(spec_of(entry.grad), dim):  # an average
                    value = value / mesh.size(dim)
            out.append((value, entry.tag))
    return out


def _check_pairing(members: list[PartialGrad], mesh: object, dims: tuple[int, ...], device: torch.device) -> None:
    """Every rank of each partial mesh group holds the same keys, in the same order: the sum and the
    sum of squares of one small integer per rank tell (equal iff sum^2 == n * sum of squares,
    exact in float64 for these sizes)."""
    digest = zlib.crc32(repr([_pairing_key(e) + (local_of(e.grad).numel(),) for e in members]).encode()) % (1 << 20) + 1
    for dim in dims:
        group = mesh.get_group(dim)  # type: ignore[attr-defined]
        check = torch.tensor([float(digest), float(digest) ** 2], dtype=torch.float64, device=device)
        dist.all_reduce(check, group=group)
        total, squares = check.tolist()
        if total * total != squares * dist.get_world_size(group):
            raise LayoutMismatchError(
                "distclip: the ranks of a tensor-parallel group hold different Partial grads (names, shapes, dtypes or "
                f"placements: this rank's are {[k[:2] for k in map(_pairing_key, members)][:6]}); they cannot be "
                "summed into whole gradients. Pass every rank the same parameters (any order)")
