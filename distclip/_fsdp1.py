"""The one place distclip touches FSDP1 internals.

``FullyShardedDataParallel`` has no public API that says which process group shards a
FlatParameter or how many padding elements end its local shard, so this module reads the
private ``_handle`` (a ``FlatParamHandle``) of every FSDP1 instance inside a module. If a torch
release renames these attributes, only this file changes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, Optional, cast

import torch
from torch import nn

if TYPE_CHECKING:
    from torch.distributed.fsdp._flat_param import FlatParameter


class Fsdp1Piece(NamedTuple):
    pieces: int  # number of disjoint shards of the flat parameter within one replica group
    trailing_padding: int  # zero padding at the end of the local shard (flat parameters only)


def fsdp1_pieces(module: nn.Module) -> dict[int, Fsdp1Piece]:
    """Map ``id(param)`` to its FSDP1 sharding, for every parameter FSDP1 manages in ``module``.

    With ``use_orig_params=False`` the parameters are FlatParameters (one 1-D shard each, padded at
    the end); with ``use_orig_params=True`` they are the original parameters, each a view into the
    local shard (possibly empty) without padding. HYBRID_SHARD's ``process_group`` is the
    intra-node sharding group; the copies across the replicate group are counted by the caller.
    """
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # torch built without distributed
        return {}
    found: dict[int, Fsdp1Piece] = {}
    for handle in _handles(module, FullyShardedDataParallel):
        flat_param = handle.flat_param
        pieces = handle.process_group.size() if handle.uses_sharded_strategy else 1
        if handle._use_orig_params:
            for param in flat_param._params or ():
                found[id(param)] = Fsdp1Piece(pieces, 0)
        else:
            found[id(flat_param)] = Fsdp1Piece(pieces, int(flat_param._shard_numel_padded))
    return found


def _handles(module: nn.Module, fsdp_cls: type) -> list:
    # A lazily initialised FSDP1 root lists every handle below it (``_all_handles``): O(handles)
    # instead of a walk over every submodule of a large model on every call.
    if isinstance(module, fsdp_cls) and getattr(module, "_is_root", False):
        all_handles = getattr(module, "_all_handles", None)
        if all_handles:
            return list(all_handles)
    return [m._handle for m in module.modules() if isinstance(m, fsdp_cls) and getattr(m, "_handle", None) is not None]


_FlatParameter: Optional[type]
try:
    from torch.distributed.fsdp._flat_param import FlatParameter as _FlatParameterCls

    _FlatParameter = _FlatParameterCls
except ImportError:  # torch built without distributed
    _FlatParameter = None


def is_flat_parameter(param: torch.Tensor) -> bool:
    # A FlatParameter is an nn.Parameter flagged in its ``__dict__`` (``FlatParameter.__new__``);
    # ``isinstance(p, FlatParameter)`` reads the same flag through a Python metaclass hook, ~1 us
    # per call, on every parameter of every first call.
    return _FlatParameter is not None and bool(param.__dict__.get("_is_flat_param", False))


def is_fsdp1_managed(param: torch.Tensor) -> bool:
    """A FlatParameter, or an original parameter FSDP1 has flattened into one."""
    flags = param.__dict__
    return _FlatParameter is not None and bool(flags.get("_is_flat_param", False) or flags.get("_fsdp_flattened", False))


def full_flat_grads(module: nn.Module) -> dict[str, torch.Tensor]:
    """Gather the full gradients of every FlatParameter in ``module`` (``use_orig_params=False``)
    as ``{original fqn relative to its FSDP module: full grad}``; a collective over each handle's
    sharding group. Used by ``distclip.verify`` to build the single-process reference.
    """
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel

    out: dict[str, torch.Tensor] = {}
    for prefix, submodule in module.named_modules():
        handle = getattr(submodule, "_handle", None) if isinstance(submodule, FullyShardedDataParallel) else None
        if handle is None or handle._use_orig_params:
            continue
        flat = handle.flat_param
        shard = flat.grad.detach()
        if handle.uses_sharded_strategy:
            pieces = [torch.empty_like(shard) for _ in range(handle.process_group.size())]
            dist.all_gather(pieces, shard.contiguous(), group=handle.process_group)
            shard = torch.cat(pieces)
        offset = 0
        for fqn, shape, numel in zip(flat._fqns, flat._shapes, flat._numels):
            out[f"{prefix}.{fqn}" if prefix else fqn] = shard[offset : offset + numel].view(shape)
            offset += numel
    return out


class Fsdp1Shard(NamedTuple):
    """Where one FSDP1-managed parameter's local shard sits (for ``distclip.norms`` / ``audit``)."""

    rank: int  # this rank's index in the parameter's sharding group (0 when not sharded)
    size: int  # ranks of the sharding group (1 when not sharded)
    flat: bool  # a FlatParameter (``use_orig_params=False``)
    shape: torch.Size | None  # the original parameter's full shape (None for a FlatParameter)


class FlatSegment(NamedTuple):
    """One original parameter inside a FlatParameter's local shard."""

    fqn: str  # relative to the FSDP module that owns the FlatParameter
    offset: int  # start in the local shard (0 when not in it)
    numel: int  # elements of the original parameter in this rank's shard (0 when none)
    shape: torch.Size  # the original parameter's full shape


def shard_info(module: nn.Module) -> dict[int, Fsdp1Shard]:
    """Map ``id(param)`` to its FSDP1 shard position, for every parameter FSDP1 manages in
    ``module`` (FlatParameters with ``use_orig_params=False``, the original parameters otherwise)."""
    try:
        import torch.distributed as dist
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # torch built without distributed
        return {}
    found: dict[int, Fsdp1Shard] = {}
    for handle in _handles(module, FullyShardedDataParallel):
        flat_param = handle.flat_param
        if handle.uses_sharded_strategy:
            rank, size = dist.get_rank(handle.process_group), handle.process_group.size()
        else:
            rank, size = 0, 1
        if handle._use_orig_params:
            for param, shape in zip(flat_param._params or (), flat_param._shapes):
                found[id(param)] = Fsdp1Shard(rank, size, False, shape)
        else:
            found[id(flat_param)] = Fsdp1Shard(rank, size, True, None)
    return found


def flat_segments(flat_param: torch.Tensor) -> list[FlatSegment]:
    """The original parameters of a FlatParameter (``use_orig_params=False``) and the part of each
    that lies in this rank's local shard, from FSDP1's ``_fqns``, ``_shapes`` and
    ``_shard_param_infos`` (offsets into the local shard, which ends in padding)."""
    flat = cast("FlatParameter", flat_param)
    out = []
    for fqn, shape, info in zip(flat._fqns, flat._shapes, flat._shard_param_infos):
        if info.in_shard:
            assert info.offset_in_shard is not None and info.numel_in_shard is not None  # set for a parameter in the shard
            out.append(FlatSegment(fqn, int(info.offset_in_shard), int(info.numel_in_shard), shape))
        else:
            out.append(FlatSegment(fqn, 0, 0, shape))
    return out
