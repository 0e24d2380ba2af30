"""The one place distclip touches FSDP1 internals.

``FullyShardedDataParallel`` has no public API that says which process group shards a
FlatParameter or how many padding elements end its local shard, so this module reads the
private ``_handle`` (a ``FlatParamHandle``) of every FSDP1 instance inside a module. If a torch
release renames these attributes, only this file changes.

FSDP1 over DTensor tensor parallelism (``parallelize_module(m, mesh["tp"], ...)`` then
``FSDP(m, device_mesh=mesh["dp"])``): FSDP1 then has a ``DTensorExtensions`` (the handle's
``_fsdp_extension``) which flattens each DTensor parameter's *local* TP shard and keeps its
``DTensorSpec`` in ``flat_param._param_extensions`` (``None`` for a plain parameter). Neither the
FlatParameter nor, with ``use_orig_params=True``, the original parameters (plain 1-D views of the
local shard, grads likewise) are DTensors any more: those specs are the only record that a
segment is one of several TP pieces.
"""

from __future__ import annotations

import gc
import math
import weakref
from itertools import repeat
from typing import TYPE_CHECKING, ClassVar, NamedTuple, Optional, cast

import torch
from torch import nn

if TYPE_CHECKING:
    from torch.distributed.fsdp._flat_param import FlatParameter


Run = tuple[int, int, int]  # (start, stop, pieces) of a flat parameter's local shard


class Fsdp1Piece(NamedTuple):
    # Disjoint pieces of the gradient within one replica group: the FSDP1 shard group's size times,
    # under FSDP1 over TP, the parameter's TP pieces (with ``runs``: the FSDP1 shard count alone).
    pieces: int
    trailing_padding: int  # zero padding at the end of the local shard (flat parameters only)
    # A FlatParameter whose segments are cut into different numbers of TP pieces (TP-sharded
    # weights next to plain ones): the local shard as runs of segments that share their pieces,
    # (start, stop, FSDP1 shards x TP pieces), padding excluded; never empty. None otherwise.
    runs: Optional[tuple[Run, ...]] = None
    segment_pieces: tuple[int, ...] = ()  # with runs: every segment's pieces, alike on every rank
    tp_ranks: tuple[frozenset[int], ...] = ()  # global ranks of each TP mesh involved (for the stage check)
    shard_group: Optional[object] = None  # FSDP1's shard group when it shards (a ProcessGroup: ranks read only for a mark)
    # Only with ``described`` (for ``describe`` and ``audit``), under ``use_orig_params=True``: the
    # original parameter's full shape (of its TP piece under FSDP1 over TP) and, under FSDP1 over
    # TP, the DTensorSpec of that piece (see ``tp_pieces``, ``tp_description``).
    shape: Optional[torch.Size] = None
    tp_spec: object = None

    @property
    def shards(self) -> int:
        """Ranks of FSDP1's shard group (1 when it does not shard)."""
        return self.shard_group.size() if self.shard_group is not None else 1  # type: ignore[attr-defined]  # a ProcessGroup

    @property
    def rank(self) -> int:
        """This rank's index in FSDP1's shard group (0 when it does not shard)."""
        import torch.distributed as dist

        return dist.get_rank(cast(dist.ProcessGroup, self.shard_group)) if self.shard_group is not None else 0


def fsdp1_pieces(module: nn.Module, described: bool = False) -> dict[int, Fsdp1Piece]:
    """Map ``id(param)`` to its FSDP1 sharding, for every parameter FSDP1 manages in ``module``.

    With ``use_orig_params=False`` the parameters are FlatParameters (one 1-D shard each, padded at
    the end); with ``use_orig_params=True`` they are the original parameters, each a view into the
    local shard (possibly empty) without padding. HYBRID_SHARD's ``process_group`` is the
    intra-node sharding group; the copies across the replicate group are counted by the caller.
    Under FSDP1 over DTensor TP each segment's pieces are multiplied by its TP pieces (see the
    module docstring); a handle without a DTensor extension costs nothing more. ``described``:
    also each original parameter's ``shape`` and ``tp_spec`` (a record per parameter, where
    discovery shares one per handle).
    """
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # torch built without distributed
        return {}
    found: dict[int, Fsdp1Piece] = {}
    for handle in _handles(module, FullyShardedDataParallel):
        flat_param = handle.flat_param
        sharded = handle.uses_sharded_strategy
        pieces = handle.process_group.size() if sharded else 1
        group = handle.process_group if sharded else None
        tp = _tp_of(flat_param) if getattr(handle, "_fsdp_extension", None) is not None else None
        if handle._use_orig_params:
            if tp is None and not described:
                piece = Fsdp1Piece(pieces, 0, shard_group=group)
                for param in flat_param._params or ():
                    found[id(param)] = piece
            else:
                specs = getattr(flat_param, "_param_extensions", None) or repeat(None)
                for param, (tp_count, ranks), shape, spec in zip(flat_param._params or (), tp or repeat((1, None)),
                                                                  flat_param._shapes, specs):
                    found[id(param)] = Fsdp1Piece(pieces * tp_count, 0, None, (), () if ranks is None else (ranks,), group,
                                                  shape if described else None, spec if described else None)
        elif tp is None:
            found[id(flat_param)] = Fsdp1Piece(pieces, int(flat_param._shard_numel_padded), shard_group=group)
        else:
            per_segment = tuple(pieces * tp_count for tp_count, _ in tp)
            meshes = tuple(dict.fromkeys(ranks for _, ranks in tp if ranks is not None))
            padding = int(flat_param._shard_numel_padded)
            if len(set(per_segment)) == 1:  # every segment alike: one weight, as without TP
                found[id(flat_param)] = Fsdp1Piece(per_segment[0], padding, None, (), meshes, group)
            else:
                runs = _runs(cast("FlatParameter", flat_param), per_segment)
                found[id(flat_param)] = Fsdp1Piece(pieces, padding, runs, per_segment, meshes, group)
    return found


def tp_pieces(spec: object) -> int:
    """Disjoint TP pieces of a parameter FSDP1 flattened from a DTensor: the product of the mesh
    sizes of its ``Shard`` placements (1 for ``spec`` None, a plain parameter)."""
    if spec is None:
        return 1
    from torch.distributed.tensor.placement_types import Shard, _StridedShard

    mesh, placements = _spec_parts(spec)
    return math.prod(size for size, p in zip(mesh.shape, placements) if isinstance(p, (Shard, _StridedShard)))


def tp_description(spec: object) -> str:
    """How a TP piece inside FSDP1 was cut, for ``describe``: 'DTensor on mesh (2,) ('tp',) (Shard(dim=0),)'."""
    mesh, placements = _spec_parts(spec)
    names = mesh.mesh_dim_names or ""
    return f"DTensor on mesh {tuple(mesh.shape)} {names} ({', '.join(map(str, placements))})"


def tp_coordinate(spec: object) -> tuple[int, ...]:
    """Which TP piece this rank holds: its coordinates on the mesh dims ``spec`` shards (() for
    ``spec`` None, a plain parameter, and for a replicated one)."""
    if spec is None:
        return ()
    from torch.distributed.tensor.placement_types import Shard, _StridedShard

    mesh, placements = _spec_parts(spec)
    coordinate = mesh.get_coordinate() or ()
    return tuple(c for c, p in zip(coordinate, placements) if isinstance(p, (Shard, _StridedShard)))


def _spec_parts(spec: object) -> tuple:
    mesh, placements = getattr(spec, "mesh", None), getattr(spec, "placements", None)
    if mesh is None or placements is None:
        # Another FSDPExtensions than torch's DTensorExtensions: its pieces are unknown, and
        # counting its tensors as whole would give a silently wrong norm.
        raise TypeError(
            f"distclip: an FSDP1 parameter carries a parameter extension of type {type(spec).__name__}, "
            "not a DTensorSpec; distclip cannot tell how many pieces it is split into"
        )
    return mesh, tuple(placements)


def _tp_of(flat_param: torch.Tensor) -> Optional[list[tuple[int, Optional[frozenset[int]]]]]:
    """Per original parameter of ``flat_param``: (TP pieces, global ranks of its TP mesh or None),
    from ``_param_extensions``; None when no parameter was a DTensor."""
    extensions = getattr(flat_param, "_param_extensions", None)
    if not extensions or all(e is None for e in extensions):
        return None
    out: list[tuple[int, Optional[frozenset[int]]]] = []
    ranks_of: dict[int, frozenset[int]] = {}
    for spec in extensions:
        if spec is None:
            out.append((1, None))
            continue
        mesh, _ = _spec_parts(spec)
        ranks = ranks_of.get(id(mesh))
        if ranks is None:
            ranks = ranks_of[id(mesh)] = frozenset(mesh.mesh.flatten().tolist())
        out.append((tp_pieces(spec), ranks))
    return out


def _runs(flat_param: FlatParameter, per_segment: tuple[int, ...]) -> tuple[Run, ...]:
    """The local shard of ``flat_param`` as runs of adjacent segments with equal pieces, from
    ``_shard_param_infos`` (alignment padding between segments and the trailing padding left out)."""
    runs: list[list[int]] = []
    for info, pieces in zip(flat_param._shard_param_infos, per_segment):
        if not info.in_shard or not info.numel_in_shard:
            continue
        assert info.offset_in_shard is not None  # set for a parameter in the shard
        start = int(info.offset_in_shard)
        stop = start + int(info.numel_in_shard)
        if runs and runs[-1][1] == start and runs[-1][2] == pieces:
            runs[-1][1] = stop
        else:
            runs.append([start, stop, pieces])
    if not runs:  # a shard of padding only: one empty run keeps one local tensor per parameter
        runs.append([0, 0, per_segment[0]])
    return tuple((a, b, c) for a, b, c in runs)


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
    # ``isinstance(p, FlatParameter)`` reads the same flag through a Python metaclass hook, a
    # Python call on every parameter of every first call.
    return _FlatParameter is not None and bool(param.__dict__.get("_is_flat_param", False))


def is_fsdp1_managed(param: torch.Tensor) -> bool:
    """A FlatParameter, or an original parameter FSDP1 has flattened into one."""
    flags = param.__dict__
    return _FlatParameter is not None and bool(flags.get("_is_flat_param", False) or flags.get("_fsdp_flattened", False))


def full_flat_grads(module: nn.Module) -> dict[str, torch.Tensor]:
    """Gather the full gradients of every FlatParameter in ``module`` (``use_orig_params=False``)
    as ``{original fqn relative to its FSDP module: full grad}``; a collective over each handle's
    sharding group (and, under FSDP1 over TP, over each TP mesh). Used by ``distclip.verify`` to
    build the single-process reference.
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
        specs = getattr(flat, "_param_extensions", None) or repeat(None)
        for fqn, shape, numel, spec in zip(flat._fqns, flat._shapes, flat._numels, specs):
            grad = shard[offset : offset + numel].view(shape)
            out[f"{prefix}.{fqn}" if prefix else fqn] = grad if spec is None else full_tp_tensor(grad, spec)
            offset += numel
    return out


def full_tp_tensor(local: torch.Tensor, spec: object) -> torch.Tensor:
    """The full tensor of which ``local`` is the TP piece described by ``spec`` (a collective over
    its mesh); for references only."""
    from torch.distributed.tensor import DTensor

    mesh, placements = _spec_parts(spec)
    whole = DTensor.from_local(local, mesh, placements, run_check=False, shape=spec.shape, stride=spec.stride)  # type: ignore[attr-defined]
    return whole.full_tensor()


class FlatSegment(NamedTuple):
    """One original parameter inside a FlatParameter's local shard."""

    fqn: str  # relative to the FSDP module that owns the FlatParameter
    offset: int  # start in the local shard (0 when not in it)
    numel: int  # elements of the original parameter in this rank's shard (0 when none)
    shape: torch.Size  # the original parameter's full shape (of its TP piece under FSDP1 over TP)
    tp_spec: object = None  # FSDP1 over TP: the DTensorSpec of the TP piece (None: a plain parameter)


def flat_segments(flat_param: torch.Tensor) -> list[FlatSegment]:
    """The original parameters of a FlatParameter (``use_orig_params=False``) and the part of each
    that lies in this rank's local shard, from FSDP1's ``_fqns``, ``_shapes`` and
    ``_shard_param_infos`` (offsets into the local shard, which ends in padding)."""
    flat = cast("FlatParameter", flat_param)
    out = []
    specs = getattr(flat, "_param_extensions", None) or repeat(None)
    for fqn, shape, info, spec in zip(flat._fqns, flat._shapes, flat._shard_param_infos, specs):
        if info.in_shard:
            assert info.offset_in_shard is not None and info.numel_in_shard is not None  # set for a parameter in the shard
            out.append(FlatSegment(fqn, int(info.offset_in_shard), int(info.numel_in_shard), shape, spec))
        else:
            out.append(FlatSegment(fqn, 0, 0, shape, spec))
    return out


class LiveFlatParameters:
    """The FSDP1 modules (each holds a ``FlatParamHandle``) alive in this process, held weakly (modules,
    never the parameters: a weakref on a tensor makes ``torch.utils.swap_tensors`` refuse it), so
    that ``get_total_norm`` can refuse a flat gradient passed without its module (its sharding group
    is not on the tensor).

    FSDP1 keeps no registry of its instances, so they are found with one pass over the garbage
    collector's objects, once per distinct list of tensors measured (a new model means a new list).
    """

    holders: ClassVar[weakref.WeakSet] = weakref.WeakSet()
    scanned: ClassVar[set[tuple]] = set()

    @classmethod
    def ranges(cls, tensors: list[torch.Tensor]) -> list[tuple[int, int]]:
        """Address ranges ``[start, end)`` of the gradients of live FlatParameters (CPU/GPU alike)."""
        if _FlatParameter is None:
            return []
        signature = (len(tensors), tuple(tuple(t.shape) for t in tensors[:8]))
        if signature not in cls.scanned:
            if len(cls.scanned) > 64:
                cls.scanned.clear()
            cls.scanned.add(signature)
            # ``type()``, not ``isinstance``: some module-level objects warn when their ``__class__`` is read
            for o in gc.get_objects():
                if issubclass(type(o), nn.Module) and o.__dict__.get("_handle") is not None:
                    cls.holders.add(o)
        out = []
        for holder in list(cls.holders):
            handle = holder.__dict__.get("_handle")
            flat = getattr(handle, "flat_param", None)
            grad = flat.grad if flat is not None else None
            if grad is not None and grad.numel():
                out.append((grad.data_ptr(), grad.data_ptr() + grad.numel() * grad.element_size()))
        return out
