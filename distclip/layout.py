"""Layout discovery: which ranks hold which part of each gradient.

Every gradient element of the model is held by one or more ranks. distclip gives each local
gradient a *weight* such that summing ``weight * sum(|g|^p)`` over every rank of the world counts
each element exactly once:

    weight = pieces / (stage_size * stage_copies)

- ``stage_size``: ranks holding one pipeline stage (the world when there is no ``pp_group``).
- ``pieces``: disjoint pieces the gradient is split into within a stage: the product of the
  mesh sizes of a DTensor's ``Shard`` placements, the FSDP1 sharding group, the ``mark_sharded``
  group, or 1 for a plain tensor. Each piece is then held by ``stage_size / pieces`` ranks.
- ``stage_copies``: pipeline stages holding an identical copy (``mark_replicated`` across stages,
  e.g. a tied embedding and output head), counted once.

Everything here is decided from local information only, so discovering a layout never issues a
collective and can never hang on ranks that hold different things.
"""

from __future__ import annotations

import math
import weakref
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from itertools import repeat
from typing import Iterable, NamedTuple, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from distclip import _fsdp1

if dist.is_available():
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.placement_types import Partial, Shard, _StridedShard

    _SHARD_PLACEMENTS: tuple[type, ...] = (Shard, _StridedShard)
else:  # pragma: no cover - torch built without distributed
    DeviceMesh = DTensor = Partial = type("_Unavailable", (), {})  # type: ignore[misc,assignment]
    _SHARD_PLACEMENTS = ()

GroupLike = Union["dist.ProcessGroup", "DeviceMesh"]
ParamsLike = Union[torch.Tensor, Iterable[torch.Tensor], nn.Module]

_ANNOTATION_ATTR = "_distclip_annotation"
_MASK = (1 << 61) - 1


@dataclass(frozen=True)
class Stage:
    """The calling rank's view of the world: how many ranks hold its pipeline stage."""

    distributed: bool
    size: int = 1  # ranks holding this pipeline stage
    pp_ranks: Optional[frozenset[int]] = None  # this rank's pipeline group: one rank per stage
    index: int = 0  # this rank's stage (its rank in pp_group)
    pp_size: int = 1


def shard_pieces(mesh_shape: tuple[int, ...], placements: tuple) -> int:
    """Disjoint pieces a DTensor is cut into: the product of the sizes of its sharded mesh dims."""
    return math.prod(size for size, p in zip(mesh_shape, placements) if isinstance(p, _SHARD_PLACEMENTS))


def element_weight(pieces: int, stage_size: int, stage_copies: int = 1) -> float:
    """Weight of a local gradient: each of its elements is held by ``stage_size / pieces`` ranks
    of each of ``stage_copies`` stages, so summed over those ranks the weights give exactly 1."""
    return pieces / (stage_size * stage_copies)


@dataclass(frozen=True)
class GroupInfo:
    """A process group as the layout needs it: its member ranks (global), fixed when it is named."""

    group: dist.ProcessGroup = field(compare=False, hash=False, repr=False)
    ranks: frozenset[int] = frozenset()

    @property
    def size(self) -> int:
        return len(self.ranks)


@dataclass(frozen=True)
class Annotation:
    """What ``mark_sharded`` / ``mark_replicated`` recorded on a parameter.

    ``sharded_over`` holds every group the tensor is split over (an expert split over an
    expert-parallel *and* a tensor-parallel group is in ``ep * tp`` pieces); marking with the same
    group twice changes nothing.
    """

    sharded_over: tuple[GroupInfo, ...] = ()
    replicated_over: Optional[GroupInfo] = None

    @property
    def pieces(self) -> int:
        return math.prod(g.size for g in self.sharded_over)


def as_process_group(group: object, what: str) -> dist.ProcessGroup:
    """Accept a ProcessGroup or a 1-D DeviceMesh; raise TypeError for anything else."""
    if dist.is_available():
        if isinstance(group, DeviceMesh):
            if group.ndim != 1:
                raise TypeError(f"{what} must be a ProcessGroup or a 1-D DeviceMesh, got a {group.ndim}-D DeviceMesh")
            return group.get_group()
        if isinstance(group, dist.ProcessGroup):
            return group
    raise TypeError(f"{what} must be a torch.distributed ProcessGroup or a 1-D DeviceMesh, got {type(group).__name__}")


def group_info(group: object, what: str) -> GroupInfo:
    pg = as_process_group(group, what)
    return GroupInfo(pg, frozenset(dist.get_process_group_ranks(pg)))


class Marks:
    """How many marks have been made in this process: a cached layout plan (``plan``) made before
    a new ``mark_sharded``/``mark_replicated`` is not trusted after it."""

    version = 0


class LostMarks:
    """Marks dropped by re-wrapping, reported at the next clip call.

    FSDP2's ``fully_shard`` (and FSDP1 without ``use_orig_params``) replaces every parameter by a
    new one, so a ``mark_sharded`` made *before* wrapping would vanish and the norm would be silently
    wrong (4.0 instead of sqrt(32) for a Megatron-TP weight under FSDP2). Marked plain parameters get
    a finalizer that holds only their ``__dict__``: when such a parameter dies after torch's wrappers
    tagged it (FSDP2 sets ``_fsdp_orig_uid``, FSDP1 ``_fsdp_flattened``), its mark was lost. This is
    the only state distclip keeps across calls outside the annotations themselves.
    """

    _TAGS = ("_fsdp_orig_uid", "_fsdp_flattened")
    found: list[str] = []

    @classmethod
    def watch(cls, param: torch.Tensor) -> None:
        if not param.__dict__.get("_distclip_watched"):
            param.__dict__["_distclip_watched"] = True
            finalizer = weakref.finalize(param, cls._on_death, param.__dict__, tuple(param.shape))
            finalizer.atexit = False

    @classmethod
    def _on_death(cls, attrs: dict, shape: tuple) -> None:
        annotation = attrs.get(_ANNOTATION_ATTR)
        if annotation is not None and any(tag in attrs for tag in cls._TAGS):
            what = "mark_sharded" if annotation.sharded_over else "mark_replicated"
            cls.found.append(f"a parameter of shape {list(shape)} marked with {what}")

    @classmethod
    def raise_if_any(cls) -> None:
        if cls.found:
            lost, cls.found = cls.found, []
            raise ValueError(
                "distclip: parameters were marked and then re-wrapped (fully_shard, or FSDP1 without "
                f"use_orig_params), which replaces them and drops the mark: {'; '.join(lost[:5])}"
                f"{' ...' if len(lost) > 5 else ''}. Mark the parameters after wrapping (mark_sharded "
                "accepts DTensor parameters) so their extra sharding is counted"
            )


def _annotate(param: object, fn: str, group: object, field_name: str) -> None:
    if not isinstance(param, torch.Tensor):
        raise TypeError(f"distclip.{fn}: expected a torch.Tensor parameter, got {type(param).__name__}")
    info = group_info(group, f"distclip.{fn}: group")
    if dist.get_rank(info.group) < 0:
        raise ValueError(f"distclip.{fn}: this rank ({dist.get_rank()}) is not a member of the given group")
    current: Annotation = getattr(param, _ANNOTATION_ATTR, Annotation())
    if field_name == "sharded_over":
        if info in current.sharded_over:  # the same group twice: idempotent
            return
        new = Annotation(current.sharded_over + (info,), current.replicated_over)
    else:
        new = Annotation(current.sharded_over, info)
    setattr(param, _ANNOTATION_ATTR, new)
    Marks.version += 1
    if not isinstance(param, DTensor):
        LostMarks.watch(param)


def mark_sharded(param: torch.Tensor, group: GroupLike) -> torch.Tensor:
    """Declare that ``param``'s local gradient is one disjoint piece of a tensor split over ``group``.

    Use it for Megatron-style tensor-parallel weights, MoE experts spread over an expert-parallel
    group (a rank may hold any number of experts, including none), or ZeRO-style flat partitions.
    Copies of the same piece on other ranks of the pipeline stage (data-parallel replicas) are
    counted once. Marks compose: a tensor marked over an expert-parallel group and a
    tensor-parallel group is in ``ep * tp`` pieces; the same group twice counts once. On a DTensor
    parameter the mark adds to what its placements show (a Megatron-TP weight later wrapped by
    FSDP2: mark the DTensor parameter *after* ``fully_shard``, which replaces parameters; a mark
    made before wrapping is reported as lost at the next call).

    Args:
        param (Tensor): a parameter (plain tensor or DTensor).
        group (ProcessGroup or DeviceMesh): the ranks that together hold the whole tensor; this
            rank must be a member.

    Returns:
        ``param``, annotated in place.
    """
    _annotate(param, "mark_sharded", group, "sharded_over")
    return param


def mark_replicated(param: torch.Tensor, group: GroupLike) -> torch.Tensor:
    """Declare that ``param``'s gradient is identical on every rank of ``group``; count it once.

    Use it for a weight tied across pipeline stages (an input embedding on the first stage and
    the output head on the last): ``group`` holds the ranks with the copies, e.g. Megatron's
    embedding group. Within a stage, plain tensors are already counted once. Works on DTensor
    parameters too (FSDP2 on each stage: mark after ``fully_shard``).

    Args:
        param (Tensor): a parameter (plain tensor or DTensor).
        group (ProcessGroup or DeviceMesh): ranks holding identical copies; this rank must be a member.

    Returns:
        ``param``, annotated in place.
    """
    _annotate(param, "mark_replicated", group, "replicated_over")
    return param


def current_stage(pp_group: object) -> Stage:
    """Describe the calling rank's pipeline stage; validates ``pp_group`` before any collective."""
    if pp_group is not None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("distclip: pp_group was given but torch.distributed is not initialized")
        pp = as_process_group(pp_group, "pp_group")
    if not (dist.is_available() and dist.is_initialized()):
        return Stage(distributed=False)
    world = dist.get_world_size()
    if pp_group is None:
        return Stage(distributed=True, size=world)
    if dist.get_rank(pp) < 0:
        raise ValueError(f"distclip: this rank ({dist.get_rank()}) is not a member of pp_group")
    if world % pp.size() != 0:
        raise ValueError(f"distclip: world size {world} is not a multiple of the pp_group size {pp.size()}")
    return Stage(True, world // pp.size(), frozenset(dist.get_process_group_ranks(pp)), dist.get_rank(pp), pp.size())


GroupKey = tuple  # (device, dtype, weight)


class Entry(NamedTuple):
    """One local tensor of ``local_layout(..., track=True)``: which parameter it belongs to."""

    index: int  # type: ignore[assignment]  # shadows tuple.index(); position of its parameter in the list passed to ``local_layout``
    tensor: torch.Tensor  # the local tensor measured (FSDP1 padding removed); the DTensor if partial
    weight: float
    partial: bool = False  # a Partial DTensor grad: made whole before it is measured


@dataclass
class LocalLayout:
    """What this rank holds.

    - ``groups``: local grads grouped by (device, dtype, weight); their norms are measured and
      they are scaled.
    - ``partial``: ``Partial`` DTensor grads (unreduced sums, e.g. LayerNorm grads under
      SequenceParallel) with the weight their *reduced* values get; measured after one
      all-reduce over their partial mesh dimensions, scaled in place as they are (scaling each
      summand scales the sum).
    - ``kinds``: what every rank of the stage must agree on (see ``agreement``), taken from the
      *parameters* (with or without a grad), so frozen parameters and empty FSDP1 shards are not a
      disagreement. Tensors marked with ``mark_sharded`` are left out: ranks may hold any number
      of experts.
    """

    groups: dict[GroupKey, list[torch.Tensor]]
    kinds: frozenset = frozenset()
    partial: list[tuple[DTensor, float]] = field(default_factory=list)
    entries: list[Entry] = field(default_factory=list)  # only with ``track=True``


def as_param_list(parameters: ParamsLike) -> tuple[list[torch.Tensor], Optional[nn.Module]]:
    """Materialise ``parameters`` once (a generator is consumed here and nowhere else)."""
    if isinstance(parameters, nn.Module):
        return module_parameters(parameters), parameters
    if isinstance(parameters, torch.Tensor):
        return [parameters], None
    params = list(parameters)
    if not all(map(isinstance, params, repeat(torch.Tensor))):  # C-level: no Python per parameter
        bad = next(p for p in params if not isinstance(p, torch.Tensor))
        raise TypeError(f"distclip: parameters must be Tensors or an nn.Module, got an element of type {type(bad).__name__}")
    return params, None


def module_parameters(module: nn.Module) -> list[torch.Tensor]:
    """``list(module.parameters())``, in the same order, without building names.

    ``nn.Module.parameters`` builds a dotted name for every submodule and parameter, and FSDP1
    rewrites each name again: 1.3 ms per call for an FSDP1 model of 80 units (1 449 modules),
    more than its whole norm. This walk reads the same ``_parameters`` dicts in the same order
    (pre-order, each module and each parameter once) and costs a fraction of that. A root whose
    class overrides ``parameters``/``named_parameters`` (other than FSDP1's renaming) keeps its own.
    """
    cls = type(module)
    if cls.parameters is not nn.Module.parameters or cls.named_parameters not in _PLAIN_NAMED_PARAMETERS:
        return list(module.parameters())
    out: dict[int, torch.Tensor] = {}  # by id, in first-seen order
    seen: set[int] = set()
    stack: list[Optional[nn.Module]] = [module]
    while stack:
        m = stack.pop()
        if m is None or id(m) in seen:
            continue
        seen.add(id(m))
        if m._parameters:
            for p in m._parameters.values():
                if p is not None and id(p) not in out:
                    out[id(p)] = p
        if m._modules:
            stack.extend(reversed(m._modules.values()))
    return list(out.values())


def _plain_named_parameters() -> tuple:
    found: list = [nn.Module.named_parameters]
    try:  # FSDP1 only strips its wrapper prefixes from the names
        from torch.distributed.fsdp import FullyShardedDataParallel

        found.append(FullyShardedDataParallel.named_parameters)
    except ImportError:  # torch built without distributed
        pass
    return tuple(found)


_PLAIN_NAMED_PARAMETERS = _plain_named_parameters()


def _check_inside_stage(ranks: frozenset[int], stage: Stage, what: str) -> None:
    """A shard group must lie inside this rank's pipeline stage: besides this rank it may hold no
    other member of this rank's pipeline group (one rank per stage)."""
    if stage.pp_ranks is not None and len(ranks & stage.pp_ranks) > 1:
        raise ValueError(
            f"distclip: {what} spans ranks {sorted(ranks)}, which include ranks of other pipeline stages "
            f"(this rank's pipeline group is {sorted(stage.pp_ranks)}); each shard group must lie inside one stage"
        )


def _dtensor_weight(grad: DTensor, stage: Stage, annotation: Optional[Annotation], ranks_of: dict) -> float:
    """Weight of a DTensor grad's local tensor (of its reduced value, if it is ``Partial``)."""
    mesh, placements = grad.device_mesh, grad.placements
    if stage.size % mesh.size() != 0:
        raise ValueError(
            f"distclip: a DTensor gradient lives on a mesh of {mesh.size()} ranks, which does not divide "
            f"the {stage.size} ranks of a pipeline stage; pass pp_group so each stage's mesh is inside one stage"
        )
    if stage.pp_ranks is not None:
        if mesh not in ranks_of:
            ranks_of[mesh] = frozenset(mesh.mesh.flatten().tolist())
        _check_inside_stage(ranks_of[mesh], stage, f"a DTensor mesh {tuple(mesh.shape)}")
    pieces = shard_pieces(tuple(mesh.shape), placements)  # Partial dims hold the whole (reduced) tensor
    copies = 1
    if annotation is not None:
        for info in annotation.sharded_over:
            _check_inside_stage(info.ranks, stage, "a mark_sharded group")
        pieces *= annotation.pieces
        if annotation.replicated_over is not None:
            copies = stage_copies(annotation.replicated_over.ranks, stage.pp_ranks)
    if stage.size % pieces != 0:
        raise ValueError(
            f"distclip: a gradient is split into {pieces} pieces, which does not divide the "
            f"{stage.size} ranks of a pipeline stage"
        )
    return element_weight(pieces, stage.size, copies)


def stage_copies(group_ranks: frozenset[int], pp_ranks: Optional[frozenset[int]]) -> int:
    """Pipeline stages holding a ``mark_replicated`` tensor: the members of its group that are in
    this rank's pipeline group (one rank per stage). Within a stage a plain tensor is replicated
    anyway, so a group inside the stage counts 1."""
    if pp_ranks is None:
        return 1
    return max(1, len(group_ranks & pp_ranks))


def _dtensor_kind(param: DTensor) -> tuple:
    spec = param._spec  # DTensor internals, see the DTensor branch of ``local_layout``
    mesh = spec.mesh
    return ("DTensor", tuple(mesh.shape), mesh.mesh_dim_names, tuple(type(p).__name__ for p in spec.placements), str(param.dtype))


def local_grad_tensors(parameters: ParamsLike) -> dict[tuple, list[torch.Tensor]]:
    """This rank's local grad tensors grouped by (device, dtype), for element-wise work
    (scaling, clamping) that needs no layout: DTensor grads as their local shards, everything else
    (FSDP1 flat shards with their zero padding included) as is."""
    params, _ = as_param_list(parameters)
    groups: dict[tuple, list[torch.Tensor]] = defaultdict(list)
    for p in params:
        grad = p.grad
        if grad is not None:
            local = grad.to_local() if isinstance(grad, DTensor) else grad
            groups[(local.device, local.dtype)].append(local)
    return groups


def _reject_bare_flat_parameter(param: torch.Tensor) -> None:
    # FSDP1 marks the original parameters it flattens; without the module their shard group is
    # unknown and counting them as replicated would silently give a wrong norm.
    if _fsdp1.is_fsdp1_managed(param):
        raise TypeError(
            "distclip: got an FSDP1-managed parameter without its module; pass the FSDP-wrapped module "
            "itself as `parameters` so its sharding group can be found"
        )


def local_layout(params: list[torch.Tensor], module: Optional[nn.Module], stage: Stage, track: bool = False) -> LocalLayout:
    """Every gradient this rank holds, as local tensors grouped by (device, dtype, weight).

    Raises (before any collective and before any gradient is touched) on layouts that cannot be
    counted: a FlatParameter passed without its FSDP module, a shard group that does not fit inside
    a pipeline stage, a mark lost by re-wrapping. This loop runs once per parameter per call, so it
    stays lean: a DTensor layout is worked out once per DTensorSpec seen in the call.

    With ``track``, ``LocalLayout.entries`` also says which parameter (its index in ``params``)
    each local tensor comes from, for per-parameter norms.
    """
    LostMarks.raise_if_any()
    groups: dict[GroupKey, list[torch.Tensor]] = defaultdict(list)
    entries: list[Entry] = []
    if not stage.distributed:
        for i, p in enumerate(params):
            if p.grad is not None:
                groups[(p.grad.device, p.grad.dtype, 1.0)].append(p.grad)
                if track:
                    entries.append(Entry(i, p.grad, 1.0))
        return LocalLayout(groups, entries=entries)
    fsdp1 = _fsdp1.fsdp1_pieces(module) if module is not None else {}
    # Per-call caches, so the work per parameter is a few dict lookups and an append: anything
    # costlier is done once per distinct DTensorSpec, (mesh, placement types, dtype) or plain
    # (dtype, device). The caches hold the group lists themselves (None: a Partial grad).
    by_spec: dict[int, tuple[Optional[list[torch.Tensor]], float]] = {}
    by_structure: dict[tuple, tuple[Optional[list[torch.Tensor]], float]] = {}
    plain: dict[tuple, list[torch.Tensor]] = {}
    kind_of_spec: dict[int, tuple] = {}
    kind_of_structure: dict[tuple, tuple] = {}
    # Equal meshes are often distinct objects (``mesh["dp"]`` makes a new one each time), and a
    # DeviceMesh hashes and compares in Python: each mesh object is compared by value once, and
    # the keys above hold the id of the first equal mesh seen (meshes live as long as the call).
    mesh_ids: dict[int, int] = {}
    meshes: dict = {}

    def mesh_id(mesh) -> int:
        found = mesh_ids.get(id(mesh))
        if found is None:
            found = mesh_ids[id(mesh)] = id(meshes.setdefault(mesh, mesh))
        return found

    kinds: set[tuple] = set()
    partial: list[tuple[DTensor, float]] = []
    ranks_of: dict = {}
    plain_weight = element_weight(1, stage.size)
    # A census of the parameters every rank of the stage must hold alike: their number and a
    # digest of (dtype, DTensor or not, global shape). A forgotten pp_group (stages hold different
    # parameters) or forgotten mark_sharded on experts (ranks hold different numbers of
    # "replicated" tensors) shows here. Left out: marked-sharded tensors (any number per rank) and
    # FSDP1's (their local views differ per rank). ``hash`` of ints and tuples of ints does not
    # depend on the process, unlike ``hash`` of strings, hence the crc32 codes for dtypes.
    census_count = census_digest = 0
    dtype_code: dict[torch.dtype, int] = {}
    for index, param in enumerate(params):
        grad = param.grad
        annotation: Optional[Annotation] = param.__dict__.get(_ANNOTATION_ATTR)
        sharded = annotation is not None and bool(annotation.sharded_over)
        if not sharded and id(param) not in fsdp1:
            code = dtype_code.get(param.dtype)
            if code is None:
                code = dtype_code[param.dtype] = zlib.crc32(str(param.dtype).encode())
            census_count += 1
            census_digest = (census_digest + hash((code, isinstance(param, DTensor), *param.shape))) & _MASK
        if isinstance(param, DTensor):
            # The agreement compares what ranks hold as *parameters*: a frozen parameter, or one
            # whose grad is None on this rank only, is no disagreement.
            if not sharded:
                pspec = param._spec
                spec_kind = kind_of_spec.get(id(pspec))
                if spec_kind is None:
                    # Parameters made with DTensor.from_local have a spec each: the kind is built
                    # once per (mesh, placement types, dtype), not once per parameter.
                    pkey = (mesh_id(pspec.mesh), tuple(map(type, pspec.placements)), param.dtype, annotation is not None)
                    spec_kind = kind_of_structure.get(pkey)
                    if spec_kind is None:
                        spec_kind = _dtensor_kind(param) + (("mark_replicated",) if annotation is not None else ())
                        kind_of_structure[pkey] = spec_kind
                    kind_of_spec[id(pspec)] = spec_kind
                kinds.add(spec_kind)
        if grad is None:
            if not isinstance(param, DTensor) and not sharded:
                if id(param) in fsdp1:
                    kinds.add(("FSDP1", element_weight(fsdp1[id(param)].pieces, stage.size), str(param.dtype)))
                else:
                    _reject_bare_flat_parameter(param)
                    kinds.add(("mark_replicated" if annotation else "plain", str(param.dtype)))
            continue
        if isinstance(grad, DTensor):
            # DTensor's private ``_spec`` and ``_local_tensor``: this runs once per parameter per
            # call, and the public ``to_local()`` (an autograd Function) plus the ``device_mesh``
            # and ``placements`` properties cost several times the rest of the loop (4000 TP
            # grads: 13 ms -> 5 ms). FSDP2 reuses one spec per parameter, so the spec's identity
            # keys the layout; the grads keep their specs alive during the call, so ids are stable.
            spec = getattr(grad, "_spec", None)
            local = grad._local_tensor if spec is not None else grad.to_local()
            if annotation is not None:  # marks are per parameter: no caching
                weight = _dtensor_weight(grad, stage, annotation, ranks_of)
                if _is_partial(grad):
                    partial.append((grad, weight))
                else:
                    groups[(grad.device, grad.dtype, weight)].append(local)
                if track:
                    entries.append(Entry(index, grad if _is_partial(grad) else local, weight, _is_partial(grad)))
                continue
            key = id(spec if spec is not None else grad)
            entry = by_spec.get(key)
            if entry is None:
                if spec is not None:  # the private spec again: the public properties cost more
                    mesh, placements = spec.mesh, spec.placements
                else:
                    mesh, placements = grad.device_mesh, grad.placements
                # The weight depends only on which mesh dims shard: placement types suffice.
                structure = (mesh_id(mesh), tuple(map(type, placements)), grad.dtype)
                entry = by_structure.get(structure)
                if entry is None:
                    weight = _dtensor_weight(grad, stage, None, ranks_of)
                    bucket = None if _is_partial(grad) else groups[(grad.device, grad.dtype, weight)]
                    entry = by_structure[structure] = (bucket, weight)
                by_spec[key] = entry
            if entry[0] is None:
                partial.append((grad, entry[1]))
            else:
                entry[0].append(local)
            if track:
                entries.append(Entry(index, local if entry[0] is not None else grad, entry[1], entry[0] is None))
            continue
        if annotation is None and not fsdp1:
            _reject_bare_flat_parameter(param)
            # The common case (DDP, no wrapper): a plain tensor replicated across the stage.
            where = (grad.dtype, grad.device)
            bucket = plain.get(where)
            if bucket is None:
                bucket = plain[where] = groups[(grad.device, grad.dtype, plain_weight)]
                kinds.add(("plain", str(param.dtype)))
            bucket.append(grad)
            if track:
                entries.append(Entry(index, grad, plain_weight))
            continue
        pieces, copies, tensor, kind = 1, 1, grad, "plain"
        if id(param) in fsdp1:
            (pieces, padding), kind = fsdp1[id(param)], "FSDP1"
            if padding:
                tensor = grad[: grad.numel() - padding]
        else:
            _reject_bare_flat_parameter(param)
        if annotation is not None:
            if sharded:  # e.g. a Megatron-TP weight inside FSDP1, an expert split over ep and tp
                for info in annotation.sharded_over:
                    _check_inside_stage(info.ranks, stage, "a mark_sharded group")
                pieces, kind = pieces * annotation.pieces, ""
            if annotation.replicated_over is not None:
                copies = stage_copies(annotation.replicated_over.ranks, stage.pp_ranks)
                kind = kind and "mark_replicated"
        if stage.size % pieces != 0:
            raise ValueError(
                f"distclip: a gradient is split into {pieces} pieces, which does not divide the "
                f"{stage.size} ranks of a pipeline stage"
            )
        weight = element_weight(pieces, stage.size, copies)
        if kind == "FSDP1":
            kinds.add(("FSDP1", weight, str(param.dtype)))
        elif kind:
            kinds.add((kind, str(param.dtype)))
        groups[(tensor.device, tensor.dtype, weight)].append(tensor)
        if track:
            entries.append(Entry(index, tensor, weight))
    kinds.add(("parameters held (count, digest of dtypes and shapes)", census_count, census_digest))
    return LocalLayout(groups, frozenset(kinds), partial, entries)


def _is_partial(grad: DTensor) -> bool:
    partial = [p for p in grad._spec.placements if isinstance(p, Partial)]
    for p in partial:
        if p.reduce_op not in ("sum", "avg"):
            raise ValueError(
                f"distclip: a gradient is a DTensor with placement {p}; only Partial sums and averages "
                "can be measured (redistribute it to Shard/Replicate first)"
            )
    return bool(partial)


def is_partial_sum(grad: DTensor) -> bool:
    """Whether ``grad`` is a ``Partial`` sum/average DTensor (never raises)."""
    return any(isinstance(p, Partial) and p.reduce_op in ("sum", "avg") for p in grad._spec.placements)
