"""The one place distclip touches DTensor internals.

``DTensor``'s public surface (``to_local()``, ``device_mesh``, ``placements``) goes through an
autograd Function and Python properties: several times the cost of the rest of layout discovery
for thousands of grads (``benchmarks/README.md``). Discovery and scaling therefore read the
private ``_spec`` (a ``DTensorSpec``: mesh and placements) and ``_local_tensor`` through the
getters below; ``_StridedShard`` (FSDP2 over TP) is a ``Shard`` for counting. If a torch release
renames these, only this file changes.

Which grads are ``Partial``, and which of those can be made whole, is decided here once
(:func:`partial_dims`, :func:`check_partial_ops`): it decides which collectives a rank joins, so
every caller (discovery, the failed-rank path, the reduction, ``clip_grad_value_``) must agree.
"""

from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.distributed as dist

if dist.is_available():
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor.placement_types import Partial, _StridedShard

    SHARD_PLACEMENTS: tuple[type, ...] = (Shard, _StridedShard)
else:  # pragma: no cover - torch built without distributed
    DeviceMesh = DTensor = Partial = Replicate = Shard = type("_Unavailable", (), {})  # type: ignore[misc,assignment]
    SHARD_PLACEMENTS = ()

__all__ = [
    "DTensor", "DeviceMesh", "Partial", "Replicate", "Shard", "SHARD_PLACEMENTS", "spec_of", "specs_of", "local_of", "mesh_ranks",
    "partial_dims", "check_partial_ops", "reducible_partial", "is_sum_dim",
]

# ``grad._spec`` and ``grad._local_tensor`` as C-level getters (as fast as the attribute access)
spec_of: Callable[[Any], Any] = operator.attrgetter("_spec")
local_of: Callable[[Any], torch.Tensor] = operator.attrgetter("_local_tensor")


def specs_of(tensors: list) -> list:
    """The spec of each DTensor in ``tensors``, None for anything else."""
    return [spec_of(t) if isinstance(t, DTensor) else None for t in tensors]

MEASURABLE_PARTIAL_OPS = ("sum", "avg")


def mesh_ranks(mesh: Any) -> frozenset[int]:
    """The global ranks of a DeviceMesh."""
    return frozenset(mesh.mesh.flatten().tolist())


def partial_dims(spec: Any) -> tuple[int, ...]:
    """The mesh dims where a DTensor spec is ``Partial`` (of any reduce op)."""
    return tuple(i for i, p in enumerate(spec.placements) if isinstance(p, Partial))


def check_partial_ops(spec: Any) -> tuple[int, ...]:
    """``partial_dims``, raising ``ValueError`` if a ``Partial`` is not a sum or an average (those
    cannot be made whole by an all-reduce sum)."""
    dims = partial_dims(spec)
    for dim in dims:
        op = spec.placements[dim].reduce_op
        if op not in MEASURABLE_PARTIAL_OPS:
            raise ValueError(
                f"distclip: a gradient is a DTensor with placement {spec.placements[dim]}; only Partial sums and "
                "averages can be measured (redistribute it to Shard/Replicate first)"
            )
    return dims


def reducible_partial(tensor: object) -> bool:
    """Whether ``tensor`` is a DTensor whose ``Partial`` dims can all be made whole (never raises):
    exactly the grads for which ``check_partial_ops`` returns dims, i.e. those whose collectives
    every rank of the mesh issues."""
    if not isinstance(tensor, DTensor):
        return False
    spec = spec_of(tensor)
    dims = partial_dims(spec)
    return bool(dims) and all(spec.placements[d].reduce_op in MEASURABLE_PARTIAL_OPS for d in dims)


def is_sum_dim(spec: Any, dim: int) -> bool:
    """Whether mesh dim ``dim`` of a spec is a ``Partial`` sum (not an average)."""
    return spec.placements[dim].reduce_op == "sum"
