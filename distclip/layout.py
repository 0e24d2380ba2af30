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
from typing import ClassVar, Iterable, NamedTuple, Optional, Union

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
    """The calling rank's view of the ranks that hold its model (the call's ``group``, by default
    the whole default process group): how many of them hold its pipeline stage."""

    distributed: bool
    size: int = 1  # ranks holding this pipeline stage, within the group
    pp_ranks: Optional[frozenset[int]] = None  # this rank's pipeline group: one rank per stage
    index: int = 0  # this rank's stage (its rank in pp_group)
    pp_size: int = 1
    ranks: Optional[frozenset[int]] = None  # global ranks of the group; None: the default group
    # the group every collective of the call runs over (None: the default group)
    group: Optional[dist.ProcessGroup] = field(default=None, compare=False, hash=False, repr=False)

    @property
    def group_size(self) -> int:
        """Ranks that take part in the call: every rank of the group."""
        return self.size * self.pp_size

    def global_ranks(self) -> list[int]:
        """The group's global ranks in group-rank order (the order of gathered lists)."""
        if self.group is None:
            return list(range(self.group_size))
        return dist.get_process_group_ranks(self.group)


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
    """The marks made in this process.

    ``version`` counts marks: a cached layout plan (``plan``) made before a new
    ``mark_sharded``/``mark_replicated`` (or before a module mark reached a new parameter) is not
    trusted after it. ``params`` holds (weakly) every parameter that carries a mark, so that
    ``get_total_norm`` can refuse a gradient of one passed without its parameter, whose layout
    the tensor alone does not show.
    """

    version = 0
    # by id: a WeakSet would compare tensors with ``==`` (element-wise)
    params: ClassVar[weakref.WeakValueDictionary] = weakref.WeakValueDictionary()


def _merged(current: Annotation, mark: Annotation) -> Annotation:
    """``current`` with the groups of ``mark`` added (the same group twice counts once)."""
    sharded = current.sharded_over + tuple(g for g in mark.sharded_over if g not in current.sharded_over)
    return Annotation(sharded, mark.replicated_over if mark.replicated_over is not None else current.replicated_over)


@dataclass
class SlotMark:
    """A ``mark_sharded(module, ...)``/``mark_replicated(module, ...)``: applies to every parameter
    under ``module``, found by name at every layout discovery, so it follows the parameter *slot*
    through whatever replaces the parameter objects (``fully_shard``, ``load_state_dict(assign=True)``,
    ``to_empty``, re-wrapping)."""

    annotation: Annotation
    names: frozenset[str]  # the parameter names under the module when it was marked


class SlotMarks:
    """Module marks, held weakly by module (a freed model takes its marks with it)."""

    modules: ClassVar[weakref.WeakKeyDictionary] = weakref.WeakKeyDictionary()

    @classmethod
    def add(cls, module: nn.Module, mark: Annotation) -> None:
        # a module may hold no parameter on this rank (an expert container on a rank with no experts)
        names = frozenset(_unwrapped(name) for name, _ in module.named_parameters())
        found = cls.modules.get(module)
        annotation = _merged(found.annotation, mark) if found is not None else mark
        cls.modules[module] = SlotMark(annotation, names | (found.names if found is not None else frozenset()))
        Marks.version += 1
        cls.apply()

    @classmethod
    def apply(cls) -> None:
        """Put every module mark on the parameters now under its module (cheap when nothing changed:
        one pass over the parameters of the marked modules). A marked parameter name that is no
        longer a parameter but a plain tensor attribute was flattened into an FSDP1 FlatParameter
        (``use_orig_params=False``): that mark is lost and reported at the call."""
        if not cls.modules:
            return
        for module, mark in list(cls.modules.items()):
            present: set[str] = set()
            for name, p in module.named_parameters():
                present.add(name)
                current: Annotation = p.__dict__.get(_ANNOTATION_ATTR) or Annotation()
                merged = _merged(current, mark.annotation)
                if merged != current:
                    setattr(p, _ANNOTATION_ATTR, merged)
                    Marks.params[id(p)] = p
                    Marks.version += 1
            missing = mark.names - {_unwrapped(name) for name in present}
            if missing:
                LostMarks.found.extend(
                    f"parameter {name!r} of a marked {type(module).__name__} is no longer a parameter (flattened by FSDP1 "
                    "without use_orig_params?)" for name in sorted(missing)
                )
                mark.names = mark.names - missing


def _unwrapped(name: str) -> str:
    """A parameter name without the prefixes wrappers insert between modules (FSDP1, activation
    checkpointing, ``torch.compile``), so a module mark matches its parameters after wrapping."""
    if "_" in name:
        for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod."):
            name = name.replace(wrapper, "")
    return name


class LostMarks:
    """Marks on parameter *objects* that were lost when the object was replaced, reported at the
    next call.

    ``fully_shard`` (and FSDP1 without ``use_orig_params``) replaces every parameter by a new one,
    and so do ``load_state_dict(assign=True)`` and ``to_empty`` for parameters on the meta device:
    a ``mark_sharded`` made on the old object would vanish and the norm would be silently wrong
    (4.0 instead of sqrt(32) for a Megatron-TP weight under FSDP2). A marked plain parameter gets a
    finalizer that holds only its ``__dict__``; its death is a lost mark when a wrapper tagged it
    after the mark (FSDP2 sets ``_fsdp_orig_uid``, FSDP1 ``_fsdp_flattened``) and it was never
    seen kept by FSDP1 (``use_orig_params=True`` keeps it), or when it was a meta-device parameter.
    A model that is simply freed (marked after wrapping, or kept by its wrapper) reports nothing.
    Module marks (``mark_sharded(module, group)``) follow the slot and are never lost this way.
    """

    _TAGS = ("_fsdp_orig_uid", "_fsdp_flattened")
    found: ClassVar[list[str]] = []

    @classmethod
    def watch(cls, param: torch.Tensor) -> None:
        attrs = param.__dict__
        if not attrs.get("_distclip_watched"):
            attrs["_distclip_watched"] = True
            attrs["_distclip_tags_at_mark"] = frozenset(tag for tag in cls._TAGS if tag in attrs)
            finalizer = weakref.finalize(param, cls._on_death, attrs, tuple(param.shape), param.device.type == "meta")
            finalizer.atexit = False

    @staticmethod
    def kept(param: torch.Tensor) -> None:
        """``param`` was seen alive inside its wrapper (FSDP1 ``use_orig_params=True``): its death
        later is the model being freed, not a mark lost."""
        param.__dict__["_distclip_kept"] = True

    @classmethod
    def _on_death(cls, attrs: dict, shape: tuple, was_meta: bool) -> None:
        annotation = attrs.get(_ANNOTATION_ATTR)
        if annotation is None:
            return
        tagged_after = any(tag in attrs for tag in cls._TAGS if tag not in attrs.get("_distclip_tags_at_mark", ()))
        if (tagged_after and not attrs.get("_distclip_kept")) or was_meta:
            what = "mark_sharded" if annotation.sharded_over else "mark_replicated"
            how = "on the meta device, then replaced (load_state_dict(assign=True) or to_empty)" if was_meta else "then re-wrapped"
            cls.found.append(f"a parameter of shape {list(shape)} marked with {what} {how}")

    @classmethod
    def raise_if_any(cls) -> None:
        if cls.found:
            lost, cls.found[:] = list(cls.found), []
            raise ValueError(
                "distclip: marked parameters were replaced, which drops their marks (re-wrapped by fully_shard or "
                "FSDP1 without use_orig_params, or loaded with load_state_dict(assign=True)/to_empty from the meta "
                f"device): {'; '.join(lost[:5])}{' ...' if len(lost) > 5 else ''}. Mark the module that holds them "
                "(mark_sharded(module, group) follows its parameters by name through any replacement), or mark the "
                "parameters after wrapping or loading, so their extra sharding is counted"
            )


def _annotate(target: object, fn: str, group: object, field_name: str) -> None:
    if not isinstance(target, (torch.Tensor, nn.Module)):
        raise TypeError(f"distclip.{fn}: expected a torch.Tensor parameter or an nn.Module, got {type(target).__name__}")
    info = group_info(group, f"distclip.{fn}: group")
    if dist.get_rank(info.group) < 0:
        raise ValueError(f"distclip.{fn}: this rank ({dist.get_rank()}) is not a member of the given group")
    mark = Annotation((info,), None) if field_name == "sharded_over" else Annotation((), info)
    if isinstance(target, nn.Module):
        SlotMarks.add(target, mark)
        return
    current: Annotation = getattr(target, _ANNOTATION_ATTR, Annotation())
    new = _merged(current, mark)
    if new == current:  # the same group twice: idempotent
        return
    setattr(target, _ANNOTATION_ATTR, new)
    Marks.params[id(target)] = target
    Marks.version += 1
    if not isinstance(target, DTensor):
        LostMarks.watch(target)


def mark_sharded(param: Union[torch.Tensor, nn.Module], group: GroupLike) -> Union[torch.Tensor, nn.Module]:
    """Declare that ``param``'s local gradient is one disjoint piece of a tensor split over ``group``.

    Use it for Megatron-style tensor-parallel weights, MoE experts spread over an expert-parallel
    group (a rank may hold any number of experts, including none), or ZeRO-style flat partitions.
    Copies of the same piece on other ranks of the pipeline stage (data-parallel replicas) are
    counted once. Marks compose: a tensor marked over an expert-parallel group and a
    tensor-parallel group is in ``ep * tp`` pieces; the same group twice counts once. On a DTensor
    parameter the mark adds to what its placements show.

    Given a module, the mark applies to every parameter under it and is remembered by module and
    parameter name: it holds for whatever parameter objects the module holds at each call, so it
    survives ``fully_shard``, ``load_state_dict(assign=True)``, ``to_empty`` and re-wrapping (mark
    the experts of a meta-initialised model before loading it). A mark on a parameter object is
    lost when the object is replaced; that is reported (``ValueError``) at the next call.

    Args:
        param (Tensor or nn.Module): a parameter (plain tensor or DTensor), or a module whose
            parameters are all marked.
        group (ProcessGroup or DeviceMesh): the ranks that together hold the whole tensor; this
            rank must be a member.

    Returns:
        ``param``, annotated in place.
    """
    _annotate(param, "mark_sharded", group, "sharded_over")
    return param


def mark_replicated(param: Union[torch.Tensor, nn.Module], group: GroupLike) -> Union[torch.Tensor, nn.Module]:
    """Declare that ``param``'s gradient is identical on every rank of ``group``; count it once.

    Use it for a weight tied across pipeline stages (an input embedding on the first stage and
    the output head on the last): ``group`` holds the ranks with the copies, e.g. Megatron's
    embedding group. Within a stage, plain tensors are already counted once. Works on DTensor
    parameters too (FSDP2 on each stage: mark after ``fully_shard``, or mark the module), and on
    modules (every parameter under it, by name, as :func:`mark_sharded`).

    Args:
        param (Tensor or nn.Module): a parameter (plain tensor or DTensor), or a module.
        group (ProcessGroup or DeviceMesh): ranks holding identical copies; this rank must be a member.

    Returns:
        ``param``, annotated in place.
    """
    _annotate(param, "mark_replicated", group, "replicated_over")
    return param


def reject_unknown_layouts(tensors: list[torch.Tensor]) -> None:
    """``get_total_norm`` measures the tensors it is given, with the layout the tensors themselves
    show (DTensor placements; a plain tensor is replicated across the stage). Some plain tensors
    are pieces whose layout only their parameter knows: the gradient (or a view of it) of a
    parameter marked with ``mark_sharded``/``mark_replicated``, or of an FSDP1 FlatParameter.
    Counting those as replicas would be silently wrong, so they are refused (before any
    collective; every rank raises together through ``rank_errors``). A tensor that carries a mark
    itself is counted by its mark."""
    marked = [p for p in list(Marks.params.values()) if p.grad is not None]
    flat = _fsdp1.flat_grad_ranges(tensors)
    if not marked and not flat:
        return
    ids: set[int] = set()
    views: set[tuple[int, int]] = set()
    for p in marked:
        g = p.grad
        local = g._local_tensor if isinstance(g, DTensor) else g  # DTensor internals, as in ``local_layout``
        ids.update((id(g), id(local)))
        if local.numel():
            views.add((local.data_ptr(), local.numel()))
    for t in tensors:
        if _ANNOTATION_ATTR in t.__dict__:
            continue
        local = t._local_tensor if isinstance(t, DTensor) else t
        if id(t) in ids or id(local) in ids or (local.numel() and (local.data_ptr(), local.numel()) in views):
            raise ValueError(
                "distclip.get_total_norm: a tensor given is the gradient of a parameter marked with "
                "mark_sharded/mark_replicated; the tensor alone does not say how it is split. Pass the module "
                "(get_total_norm(model) measures its parameters' gradients with their marks) or use clip_grad_norm_"
            )
        if flat and local.numel() and not isinstance(t, DTensor):
            ptr = local.data_ptr()
            if any(lo <= ptr < hi for lo, hi in flat):
                raise ValueError(
                    "distclip.get_total_norm: a tensor given is (part of) the gradient of an FSDP1 FlatParameter, a "
                    "shard whose sharding group the tensor alone does not show. Pass the FSDP1-wrapped module "
                    "(get_total_norm(model) measures its parameters' gradients) or use clip_grad_norm_(model, ...)"
                )


def current_stage(pp_group: object, group: object = None) -> Stage:
    """Describe the calling rank's pipeline stage within ``group`` (the ranks that hold this model;
    default: the default process group); validates both before any collective."""
    initialized = dist.is_available() and dist.is_initialized()
    if (pp_group is not None or group is not None) and not initialized:
        what = "pp_group" if pp_group is not None else "group"
        raise RuntimeError(f"distclip: {what} was given but torch.distributed is not initialized")
    if not initialized:
        return Stage(distributed=False)
    pg: Optional[dist.ProcessGroup] = None
    ranks: Optional[frozenset[int]] = None
    size = dist.get_world_size()
    if group is not None:
        pg = as_process_group(group, "group")
        if dist.get_rank(pg) < 0:
            raise ValueError(f"distclip: this rank ({dist.get_rank()}) is not a member of group")
        size = pg.size()
        if size != dist.get_world_size():  # a group of every rank counts like the default group
            ranks = frozenset(dist.get_process_group_ranks(pg))
    if pp_group is None:
        return Stage(True, size, ranks=ranks, group=pg)
    pp = as_process_group(pp_group, "pp_group")
    if dist.get_rank(pp) < 0:
        raise ValueError(f"distclip: this rank ({dist.get_rank()}) is not a member of pp_group")
    pp_ranks = frozenset(dist.get_process_group_ranks(pp))
    if ranks is not None and not pp_ranks <= ranks:
        raise ValueError(
            f"distclip: pp_group spans ranks {sorted(pp_ranks)}, outside group (ranks {sorted(ranks)}); the pipeline "
            "stages of this model must lie inside the group that holds it"
        )
    if size % pp.size() != 0:
        raise ValueError(f"distclip: group size {size} is not a multiple of the pp_group size {pp.size()}")
    return Stage(True, size // pp.size(), pp_ranks, dist.get_rank(pp), pp.size(), ranks, pg)


def check_inside_group(ranks: frozenset[int], stage: Stage, what: str) -> None:
    """A mesh or group a parameter names must lie inside the call's group: the ranks outside it do
    not take part in the call, so their pieces could not be counted."""
    if stage.ranks is not None and not ranks <= stage.ranks:
        raise ValueError(
            f"distclip: {what} spans ranks {sorted(ranks)}, which reach outside group (ranks {sorted(stage.ranks)}): "
            "pass as group the ranks that hold the whole model, or a mesh/group inside it"
        )


GroupKey = tuple  # (device, dtype, weight)


class Entry(NamedTuple):
    """One local tensor of ``local_layout(..., track=True)``: which parameter it belongs to."""

    index: int  # type: ignore[assignment]  # shadows tuple.index(); position of its parameter in the list passed to ``local_layout``
    tensor: torch.Tensor  # the local tensor measured (FSDP1 padding removed); the DTensor if partial
    weight: float
    partial: bool = False  # a Partial DTensor grad: made whole before it is measured
    # FSDP1 over TP: the tensor is the run of a flat shard starting here (see ``Fsdp1Piece.runs``);
    # a parameter then has one entry per run. None: the parameter's whole local tensor.
    offset: Optional[int] = None


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
    """A shard group must lie inside the call's group and inside this rank's pipeline stage:
    besides this rank it may hold no other member of this rank's pipeline group (one rank per stage)."""
    check_inside_group(ranks, stage, what)
    if stage.pp_ranks is not None and len(ranks & stage.pp_ranks) > 1:
        raise ValueError(
            f"distclip: {what} spans ranks {sorted(ranks)}, which include ranks of other pipeline stages "
            f"(this rank's pipeline group is {sorted(stage.pp_ranks)}); each shard group must lie inside one stage"
        )


def _dtensor_weight(grad: DTensor, stage: Stage, annotation: Optional[Annotation], ranks_of: dict) -> float:
    """Weight of a DTensor grad's local tensor (of its reduced value, if it is ``Partial``)."""
    mesh, placements = grad.device_mesh, grad.placements
    if stage.ranks is not None:  # before the size test: a mesh outside the group says more
        if mesh not in ranks_of:
            ranks_of[mesh] = frozenset(mesh.mesh.flatten().tolist())
        check_inside_group(ranks_of[mesh], stage, f"a DTensor mesh {tuple(mesh.shape)}")
    if stage.size % mesh.size() != 0:
        raise ValueError(
            f"distclip: a DTensor gradient lives on a mesh of {mesh.size()} ranks, which does not divide "
            f"the {stage.size} ranks of a pipeline stage; pass pp_group so each stage's mesh is inside one stage"
        )
    if stage.pp_ranks is not None or stage.ranks is not None:
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
            check_inside_group(annotation.replicated_over.ranks, stage, "a mark_replicated group")
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


def _fsdp1_kind(piece: _fsdp1.Fsdp1Piece, extra: int, copies: int, stage: Stage, dtype: torch.dtype) -> tuple:
    """The agreement kind of an FSDP1 parameter: its weight, or under FSDP1 over TP with runs the
    weight of every segment of the flat parameter (alike on every rank, whatever its shard holds)."""
    if piece.runs is None:
        return ("FSDP1", element_weight(piece.pieces * extra, stage.size, copies), str(dtype))
    return ("FSDP1", tuple(element_weight(p * extra, stage.size, copies) for p in piece.segment_pieces), str(dtype))


def _add_fsdp1_runs(index: int, grad: torch.Tensor, piece: _fsdp1.Fsdp1Piece, extra: int, copies: int, kind: str,
                    stage: Stage, dtype: torch.dtype, groups: dict, kinds: set, entries: Optional[list]) -> None:
    """FSDP1 over TP, a FlatParameter whose segments are cut into different numbers of TP pieces
    (TP-sharded weights next to plain ones): one local tensor per run of segments that share their
    pieces, a slice of the flat shard, each under its own weight (``extra``: ``mark_sharded`` pieces)."""
    assert piece.runs is not None
    for start, stop, run_pieces in piece.runs:
        pieces = run_pieces * extra
        if stage.size % pieces != 0:
            raise ValueError(
                f"distclip: a gradient is split into {pieces} pieces (FSDP1 shards x tensor-parallel pieces), which "
                f"does not divide the {stage.size} ranks of a pipeline stage"
            )
        weight = element_weight(pieces, stage.size, copies)
        tensor = grad[start:stop]
        groups[(tensor.device, tensor.dtype, weight)].append(tensor)
        if entries is not None:
            entries.append(Entry(index, tensor, weight, False, start))
    if kind == "FSDP1":
        kinds.add(_fsdp1_kind(piece, extra, copies, stage, dtype))
    elif kind:
        kinds.add((kind, str(dtype)))


def local_layout(
    params: list[torch.Tensor], module: Optional[nn.Module], stage: Stage, track: bool = False, grads: Optional[list[torch.Tensor]] = None
) -> LocalLayout:
    """Every gradient this rank holds, as local tensors grouped by (device, dtype, weight).

    Raises (before any collective and before any gradient is touched) on layouts that cannot be
    counted: a FlatParameter passed without its FSDP module, a shard group that does not fit inside
    a pipeline stage, a mark lost by re-wrapping. This loop runs once per parameter per call, so it
    stays lean: a DTensor layout is worked out once per DTensorSpec seen in the call.

    With ``track``, ``LocalLayout.entries`` also says which parameter (its index in ``params``)
    each local tensor comes from, for per-parameter norms. With ``grads`` (one tensor per entry of
    ``params``: ``get_total_norm`` measuring the tensors it is given), those are measured instead
    of ``params[i].grad``.
    """
    SlotMarks.apply()
    LostMarks.raise_if_any()
    groups: dict[GroupKey, list[torch.Tensor]] = defaultdict(list)
    entries: list[Entry] = []
    if not stage.distributed:
        for i, p in enumerate(params):
            g = p.grad if grads is None else grads[i]
            if g is not None:
                groups[(g.device, g.dtype, 1.0)].append(g)
                if track:
                    entries.append(Entry(i, g, 1.0))
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
        grad = param.grad if grads is None else grads[index]
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
                    kinds.add(_fsdp1_kind(fsdp1[id(param)], 1, 1, stage, param.dtype))
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
        fsdp1_piece = fsdp1.get(id(param))
        if fsdp1_piece is not None:
            pieces, padding, kind = fsdp1_piece.pieces, fsdp1_piece.trailing_padding, "FSDP1"
            for tp_ranks in fsdp1_piece.tp_ranks:  # FSDP1 over TP: the TP mesh too lies inside the stage
                _check_inside_stage(tp_ranks, stage, "a DTensor (tensor-parallel) mesh inside FSDP1")
            if padding:
                tensor = grad[: grad.numel() - padding]
        else:
            _reject_bare_flat_parameter(param)
        if annotation is not None:
            if kind == "FSDP1":  # kept inside its wrapper (use_orig_params=True): its death is a free
                LostMarks.kept(param)
            if sharded:  # e.g. a Megatron-TP weight inside FSDP1, an expert split over ep and tp
                for info in annotation.sharded_over:
                    _check_inside_stage(info.ranks, stage, "a mark_sharded group")
                pieces, kind = pieces * annotation.pieces, ""
            if annotation.replicated_over is not None:
                check_inside_group(annotation.replicated_over.ranks, stage, "a mark_replicated group")
                copies = stage_copies(annotation.replicated_over.ranks, stage.pp_ranks)
                kind = kind and "mark_replicated"
        if stage.size % pieces != 0:
            raise ValueError(
                f"distclip: a gradient is split into {pieces} pieces, which does not divide the "
                f"{stage.size} ranks of a pipeline stage"
            )
        if fsdp1_piece is not None and fsdp1_piece.runs is not None:
            _add_fsdp1_runs(index, grad, fsdp1_piece, pieces // fsdp1_piece.pieces, copies, kind, stage, param.dtype,
                            groups, kinds, entries if track else None)
            continue
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
