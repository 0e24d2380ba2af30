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
import operator
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from itertools import compress, repeat
from typing import Any, Iterable, NamedTuple, Optional, Sequence, Union, cast

import torch
import torch.distributed as dist
from torch import nn

from distclip import _fsdp1
from distclip._dtensor import (  # DTensor, DeviceMesh: re-exported
    SHARD_PLACEMENTS,
    DeviceMesh,
    DTensor,
    check_partial_ops,
    local_of,
    mesh_ranks,
    spec_of,
)
from distclip.layout import marks
from distclip.layout.marks import Annotation, GroupLike, as_process_group, group_info, table  # noqa: F401  # re-exported
from distclip.math.partials import GroupKey

ParamsLike = Union[torch.Tensor, Iterable[torch.Tensor], nn.Module]

_MASK = (1 << 61) - 1


@dataclass(frozen=True)
class CallGroup:
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


SINGLE_PROCESS = CallGroup(distributed=False)  # the stage of every call without a process group (immutable)


def shard_pieces(mesh_shape: tuple[int, ...], placements: tuple) -> int:
    """Disjoint pieces a DTensor is cut into: the product of the sizes of its sharded mesh dims."""
    return math.prod(size for size, p in zip(mesh_shape, placements) if isinstance(p, SHARD_PLACEMENTS))


def element_weight(pieces: int, stage_size: int, stage_copies: int = 1) -> float:
    """Weight of a local gradient: each of its elements is held by ``stage_size / pieces`` ranks
    of each of ``stage_copies`` stages, so summed over those ranks the weights give exactly 1."""
    return pieces / (stage_size * stage_copies)


def reject_unknown_layouts(tensors: list[torch.Tensor], marked_here: dict[int, Annotation]) -> None:
    """``get_total_norm`` measures the tensors it is given, with the layout the tensors themselves
    show (DTensor placements; a plain tensor is replicated across the stage). Some plain tensors
    are pieces whose layout only their parameter knows: the gradient (or a view of it) of a
    parameter marked with ``mark_sharded``/``mark_replicated``, or of an FSDP1 FlatParameter.
    Counting those as replicas would be silently wrong, so they are refused (before any
    collective; every rank raises together through ``comm.failure``). A tensor that carries a mark
    itself is counted by its mark (``marked_here``: the marks of ``tensors``)."""
    marked = [p for p in marks.marked_parameters() if p.grad is not None]
    flat = _fsdp1.LiveFlatParameters.ranges(tensors)
    if not marked and not flat:
        return
    ids: set[int] = set()
    views: set[tuple[int, int]] = set()
    for p in marked:
        g = p.grad
        assert g is not None  # ``marked`` holds parameters with a grad
        local = local_of(g) if isinstance(g, DTensor) else g
        ids.update((id(g), id(local)))
        if local.numel():
            views.add((local.data_ptr(), local.numel()))
    for t in tensors:
        if id(t) in marked_here:
            continue
        local = local_of(t) if isinstance(t, DTensor) else t
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


def call_group(pp_group: object, group: object = None) -> CallGroup:
    """Describe the calling rank's pipeline stage within ``group`` (the ranks that hold this model;
    default: the default process group); validates both before any collective."""
    initialized = dist.is_available() and dist.is_initialized()
    if (pp_group is not None or group is not None) and not initialized:
        what = "pp_group" if pp_group is not None else "group"
        raise RuntimeError(f"distclip: {what} was given but torch.distributed is not initialized")
    if not initialized:
        return SINGLE_PROCESS
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
        return CallGroup(True, size, ranks=ranks, group=pg)
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
    return CallGroup(True, size // pp.size(), pp_ranks, dist.get_rank(pp), pp.size(), ranks, pg)


def check_inside_group(ranks: frozenset[int], stage: CallGroup, what: str) -> None:
    """A mesh or group a parameter names must lie inside the call's group: the ranks outside it do
    not take part in the call, so their pieces could not be counted."""
    if stage.ranks is not None and not ranks <= stage.ranks:
        raise ValueError(
            f"distclip: {what} spans ranks {sorted(ranks)}, which reach outside group (ranks {sorted(stage.ranks)}): "
            "pass as group the ranks that hold the whole model, or a mesh/group inside it"
        )




class Entry(NamedTuple):
    """One local tensor of ``layout_with_entries``: which parameter it belongs to."""

    index: int  # type: ignore[assignment]  # shadows tuple.index(); position of its parameter in the list passed to ``local_layout``
    tensor: torch.Tensor  # the local tensor measured (FSDP1 padding removed); the DTensor if partial
    weight: float
    partial: bool = False  # a Partial DTensor grad: made whole before it is measured
    # FSDP1 over TP: the tensor is the run of a flat shard starting here (see ``Fsdp1Piece.runs``);
    # a parameter then has one entry per run. None: the parameter's whole local tensor.
    offset: Optional[int] = None
    copies: int = 1  # pipeline stages holding a copy (``mark_replicated``), which ``weight`` counts once
    # FSDP1 over TP with runs: the weight of every segment of the flat parameter, in or out of this shard
    segment_weights: tuple[float, ...] = ()


@dataclass
class LocalLayout:
    """What this rank holds.

    - ``groups``: local grads grouped by (device, dtype, weight); their norms are measured and
      they are scaled.
    - ``partial``: ``Partial`` DTensor grads (unreduced sums, e.g. LayerNorm grads under
      SequenceParallel) with the weight their *reduced* values get; measured after one
      all-reduce over their partial mesh dimensions, scaled in place as they are (scaling each
      summand scales the sum).
    - ``tensor_kinds``: what every rank of the stage must agree on (see ``agreement``), taken from the
      *parameters* (with or without a grad), so frozen parameters and empty FSDP1 shards are not a
      disagreement. Tensors marked with ``mark_sharded`` are left out: ranks may hold any number
      of experts.
    """

    groups: dict[GroupKey, list[torch.Tensor]]
    tensor_kinds: frozenset = frozenset()
    partial: list[tuple[DTensor, float]] = field(default_factory=list)
    entries: list[Entry] = field(default_factory=list)  # only from ``layout_with_entries``
    # only from ``layout_with_routes``, for ``plan.LayoutPlan``: each parameter's route (None: no grad)
    # and the list of ``groups`` its local tensor joined (None: no grad, Partial, FSDP1 runs)
    routes: list[Optional[Route]] = field(default_factory=list)
    joined: list[Optional[list[torch.Tensor]]] = field(default_factory=list)
    grads: list[Optional[torch.Tensor]] = field(default_factory=list)  # and the grads it read
    # from a plan: its remembered coalescing (``math.partials.Coalescer``) of each group that holds
    # views of one buffer; a group it leaves out holds separate tensors. None: not from a plan.
    coalescers: Optional[dict] = None
    marks: dict[int, Annotation] = field(default_factory=dict)  # the parameters' marks, by id (``marks.table``)
    # Sparse grads: the coalesced values are measured (``measure_only``, by group key), the grad's
    # own values are scaled in place (``scale_only``, by (device, dtype, None)); see ``resolve``.
    measure_only: dict[GroupKey, list[torch.Tensor]] = field(default_factory=dict)
    scale_only: dict[GroupKey, list[torch.Tensor]] = field(default_factory=dict)
    resolved: bool = False  # some grad stands in a group as a view of itself (``resolve``)
    # the rank-agreed name of each ``partial`` grad's parameter, in ``partial``'s order (``marks.names_of``):
    # what pairs it with its summands on the other ranks
    partial_names: list[str] = field(default_factory=list)

    # The mesh of this rank's grads when every one is a DTensor on that one mesh (what makes
    # torch's clip return a DTensor; ``clip.as_torch_returns``), else None.
    result_mesh: Optional[DeviceMesh] = None

    def resolve(self, local: torch.Tensor, key: GroupKey) -> Optional[torch.Tensor]:
        """What stands for a grad the kernels cannot take as it is, in its group (``key``):

        - a complex grad with the conjugate bit (``w.mH`` in the forward): its ``conj()``, a view
          without the bit (no copy), whose magnitudes are the same and which scales the same
          by a real factor (torch's foreach kernels refuse the bit);
        - a sparse COO grad (``nn.Embedding(sparse=True)``): measured by its coalesced values
          (duplicate indices summed first, as the dense gradient would hold them: one copy of the
          values, never of the dense tensor) and scaled through its own values in place.
        Returns the tensor for the group, None for a sparse grad (kept in the two dicts)."""
        self.resolved = True
        if local.is_sparse:
            values = local.coalesce().values() if not local.is_coalesced() else local.values()
            own = local._values()
            if values.is_conj():
                values, own = values.conj(), own.conj()
            self.scale_only.setdefault((own.device, own.dtype, None), []).append(own)
            self.measure_only.setdefault(key, []).append(values)
            return None
        return local.conj()

    @property
    def plannable(self) -> bool:
        """Whether a plan can serve later calls from this layout (it keeps grads' tensors as they are)."""
        return not (self.measure_only or self.scale_only or self.resolved)

    def named_partial(self) -> list:
        """``partial`` as ``reduce.PartialGrad``-shaped (grad, weight, name) triples."""
        names = self.partial_names or [""] * len(self.partial)
        return [(grad, weight, name) for (grad, weight), name in zip(self.partial, names)]


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
    rewrites each name again: for an FSDP1 model of many small units that costs more than its
    whole norm (``benchmarks/README.md``). This walk reads the same ``_parameters`` dicts in the same order
    (pre-order, each module and each parameter once) and costs a fraction of that. A root whose
    class overrides ``parameters``/``named_parameters`` (other than FSDP1's renaming) keeps its own.
    """
    cls = type(module)
    if cls.parameters is not nn.Module.parameters or cls.named_parameters not in _PLAIN_NAMED_PARAMETERS:
        return list(module.parameters())
    out: dict[int, torch.Tensor] = {}  # by id, in first-seen order
    seen: set[int] = set()
    stack: list[Optional[nn.Module]] = [module]
    pop, push, visit = stack.pop, stack.extend, seen.add  # bound once: this loop runs per module per call
    while stack:
        m = pop()
        if m is None:
            continue
        key = id(m)
        if key in seen:
            continue
        visit(key)
        state = m.__dict__  # where nn.Module keeps both dicts: no attribute lookup through the class
        params = state["_parameters"]
        if params:
            for p in params.values():
                if p is not None and id(p) not in out:
                    out[id(p)] = p
        children = state["_modules"]
        if children:
            push(reversed(children.values()))
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


def _check_inside_stage(ranks: frozenset[int], stage: CallGroup, what: str) -> None:
    """A shard group must lie inside the call's group and inside this rank's pipeline stage:
    besides this rank it may hold no other member of this rank's pipeline group (one rank per stage)."""
    check_inside_group(ranks, stage, what)
    if stage.pp_ranks is not None and len(ranks & stage.pp_ranks) > 1:
        raise ValueError(
            f"distclip: {what} spans ranks {sorted(ranks)}, which include ranks of other pipeline stages "
            f"(this rank's pipeline group is {sorted(stage.pp_ranks)}); each shard group must lie inside one stage"
        )


def stage_copies(group_ranks: frozenset[int], pp_ranks: Optional[frozenset[int]]) -> int:
    """Pipeline stages holding a ``mark_replicated`` tensor: the members of its group that are in
    this rank's pipeline group (one rank per stage). Within a stage a plain tensor is replicated
    anyway, so a group inside the stage counts 1."""
    if pp_ranks is None:
        return 1
    return max(1, len(group_ranks & pp_ranks))


def local_grad_tensors(parameters: ParamsLike) -> dict[tuple, list[torch.Tensor]]:
    """This rank's local grad tensors grouped by (device, dtype), for element-wise work
    (scaling, clamping) that needs no layout: DTensor grads as their local shards, a sparse grad as
    its values, a conjugate-bit grad as its ``conj()`` view (a real factor and a clamp of the
    magnitudes' parts act on it alike), everything else (FSDP1 flat shards with their zero padding
    included) as is."""
    params, _ = as_param_list(parameters)
    groups: dict[tuple, list[torch.Tensor]] = defaultdict(list)
    for p in params:
        grad = p.grad
        if grad is not None:
            local = grad.to_local() if isinstance(grad, DTensor) else grad
            if local.is_sparse:
                local = local._values()
            if local.is_conj():
                local = local.conj()
            groups[(local.device, local.dtype)].append(local)
    return groups


# ----------------------------------------------------------------------------- discovery
#
# Discovery (``_discover``) is three parts: ``fingerprint`` reads every parameter (the agreement kinds and
# the census), ``classify`` gives every gradient a typed route (which kind of local gradient it
# is, with its weight), and its loop puts each local tensor in its group. Every
# weight comes from ``weigh``; what is worked out once per call lives in a ``CallMemo``.


class ReplicaRoute(NamedTuple):
    """A plain tensor without marks, replicated across the stage (DDP, no wrapper): measured as is."""

    weight: float


class MarkedRoute(NamedTuple):
    """A plain tensor marked with ``mark_sharded``/``mark_replicated``: measured as is, its weight
    set by its marks."""

    weight: float


class DTensorRoute(NamedTuple):
    """A DTensor grad that is not ``Partial``: its local tensor is measured, weighted by the mesh
    dims its placements shard (and by its parameter's marks). Grads of one weight share a route
    (a plan keeps each grad's spec itself)."""

    weight: float


class PartialRoute(NamedTuple):
    """A ``Partial`` (sum or average) DTensor grad: made whole by one all-reduce over its partial
    mesh dims before it is measured; ``weight`` is that of the reduced value."""

    weight: float


class FlatShardRoute(NamedTuple):
    """An FSDP1 parameter: a FlatParameter's local shard, measured without the zero padding that
    ends it, or (``use_orig_params=True``) a view of that shard."""

    weight: float
    padding: int  # trailing padding elements left out (0 for a view)


class FlatRunsRoute(NamedTuple):
    """FSDP1 over TP, a FlatParameter whose segments are cut into different numbers of TP pieces
    (TP-sharded weights next to plain ones): its local shard measured as runs of segments that
    share a weight, each a slice (see ``Fsdp1Piece.runs``)."""

    runs: tuple[tuple[int, int, float], ...]  # (start, stop, weight); padding excluded, never empty


Route = Union[ReplicaRoute, MarkedRoute, DTensorRoute, PartialRoute, FlatShardRoute, FlatRunsRoute]


def routed_tensor(route: Route, grad: torch.Tensor) -> torch.Tensor:
    """The one local tensor ``route`` measures of ``grad`` (every route but ``FlatRunsRoute``):
    a DTensor grad's local tensor, an FSDP1 shard less its padding, else the grad itself (a
    ``Partial`` grad stays a DTensor: it is made whole first)."""
    cls = route.__class__
    if cls is DTensorRoute:
        return local_of(grad)
    if cls is FlatShardRoute and route.padding:  # type: ignore[union-attr]
        return grad[: grad.numel() - route.padding]  # type: ignore[union-attr]
    return grad


_UNDISTRIBUTED = ReplicaRoute(1.0)  # every gradient without torch.distributed: whole on this rank


def weigh(
    stage: CallGroup,
    pieces: int = 1,
    annotation: Optional[Annotation] = None,
    meshes: tuple[tuple[frozenset[int], str], ...] = (),
    dtensor: bool = False,
    how: str = "",
) -> float:
    """The weight of a local gradient: the one rule behind every route.

    ``pieces``: how many disjoint pieces the gradient is cut into within a stage before its marks
    (the product of the mesh sizes its DTensor placements shard, or its FSDP1 shards, 1 for a
    plain tensor); ``meshes``: the global ranks it is cut over, with what they are (for the
    messages). Each must lie inside the call's group and inside one pipeline stage; a DTensor
    mesh (``dtensor``) must also tile the stage. ``mark_sharded`` groups multiply the pieces,
    a ``mark_replicated`` group counts the stages holding a copy, and the pieces must divide the
    stage (``how`` says what was counted).
    """
    for ranks, what in meshes:
        if dtensor:
            check_inside_group(ranks, stage, what)  # before the size test: a mesh outside the group says more
            if stage.size % len(ranks) != 0:
                raise ValueError(
                    f"distclip: a DTensor gradient lives on a mesh of {len(ranks)} ranks, which does not divide "
                    f"the {stage.size} ranks of a pipeline stage; pass pp_group so each stage's mesh is inside one stage"
                )
        _check_inside_stage(ranks, stage, what)
    copies = 1
    if annotation is not None:
        for info in annotation.sharded_over:  # e.g. a Megatron-TP weight, an expert split over ep and tp
            _check_inside_stage(info.ranks, stage, "a mark_sharded group")
        pieces *= annotation.pieces
        if annotation.replicated_over is not None:
            check_inside_group(annotation.replicated_over.ranks, stage, "a mark_replicated group")
            copies = stage_copies(annotation.replicated_over.ranks, stage.pp_ranks)
    if stage.size % pieces != 0:
        raise ValueError(
            f"distclip: a gradient is split into {pieces} pieces{how}, which does not divide the "
            f"{stage.size} ranks of a pipeline stage"
        )
    return element_weight(pieces, stage.size, copies)


class _DtypeCodes(dict):
    """crc32 of each dtype's name, made on first use: ``hash`` of a string depends on the process,
    ``hash`` of ints and tuples of ints does not."""

    def __missing__(self, dtype: torch.dtype) -> int:
        code = self[dtype] = zlib.crc32(str(dtype).encode())
        return code


class CallMemo:
    """What one discovery has worked out so far, shared by all its parameters (a memo of one call,
    dropped when it ends).

    Discovery runs once per parameter per call, so the work per parameter stays a few dict lookups
    and an append: anything costlier is done once per distinct layout and kept here until the call
    ends (never longer: the ids below are only stable while the call holds the tensors).

    - ``replicas``: (dtype, device) -> the group list of unmarked plain grads.
    - ``dtensor_routes``: ``id(DTensorSpec)`` of an unmarked DTensor grad -> its route and the
      group list its local tensor joined (None: ``Partial``). FSDP2 shares a spec between a
      parameter, its grad and the parameters of the same shape.
    - ``dtensor_weights``: (mesh, placement types, dtype) -> route and group list, for grads made
      with ``DTensor.from_local`` (a spec each): the weight depends only on which mesh dims shard,
      and those grads share that route.
    - ``flat_routes``: ``id(param)`` -> route of an FSDP1 parameter (``fsdp1``: its ``Fsdp1Piece``).
    - ``marked_routes``: weight -> the route of marked plain grads of that weight (routes are
      values: grads of one weight share one).
    - ``param_kinds``, ``kinds_by_structure``: the agreement kind of a DTensor *parameter*, by the
      id of its spec, and by (mesh, placement types, dtype, marked).
    - ``mesh_ids``, ``meshes``: equal meshes are often distinct objects (``mesh["dp"]`` makes a new
      one each time) and a DeviceMesh hashes and compares in Python, so each mesh object is
      compared by value once; the keys above hold the id of the first equal mesh seen.
    - ``mesh_ranks``: the global ranks of each of those meshes.
    - ``dtype_codes``: the census's code of each dtype.
    """

    def __init__(self, stage: CallGroup, fsdp1: dict[int, _fsdp1.Fsdp1Piece]) -> None:
        self.stage = stage
        self.fsdp1 = fsdp1
        self.groups: dict[GroupKey, list[torch.Tensor]] = defaultdict(list)
        self.replica = ReplicaRoute(element_weight(1, stage.size))  # what ``weigh(stage)`` gives
        self.replicas: dict[tuple, list[torch.Tensor]] = {}
        self.dtensor_routes: dict[int, tuple[Route, Optional[list[torch.Tensor]]]] = {}
        self.dtensor_weights: dict[tuple, tuple[Union[DTensorRoute, PartialRoute], Optional[list[torch.Tensor]]]] = {}
        self.flat_routes: dict[int, Route] = {}
        self.marked_routes: dict[float, MarkedRoute] = {}
        self.param_kinds: dict[int, tuple] = {}
        self.kinds_by_structure: dict[tuple, tuple] = {}
        self.mesh_ids: dict[int, int] = {}
        self.meshes: dict = {}
        self.mesh_ranks: dict[int, frozenset[int]] = {}
        self.dtype_codes = _DtypeCodes()

    def mesh_id(self, mesh: DeviceMesh) -> int:
        found = self.mesh_ids.get(id(mesh))
        if found is None:
            found = self.mesh_ids[id(mesh)] = id(self.meshes.setdefault(mesh, mesh))
        return found

    def ranks(self, mesh: DeviceMesh) -> frozenset[int]:
        key = self.mesh_id(mesh)
        found = self.mesh_ranks.get(key)
        if found is None:
            found = self.mesh_ranks[key] = mesh_ranks(mesh)
        return found

    def dtensor_route(self, spec: Any, grad: torch.Tensor) -> tuple[Route, Optional[list[torch.Tensor]]]:
        """The route of an unmarked DTensor grad whose spec is new to this call (and the group list
        its local tensor joined, None if it is ``Partial``)."""
        mesh = spec.mesh
        structure = (self.mesh_ids.get(id(mesh)) or self.mesh_id(mesh), tuple(map(type, spec.placements)), grad.dtype)
        found = self.dtensor_weights.get(structure)
        if found is None:
            weight = _dtensor_weight(spec, self, None)
            if check_partial_ops(spec):
                found = (PartialRoute(weight), None)
            else:
                found = (DTensorRoute(weight), self.groups[(grad.device, grad.dtype, weight)])
            self.dtensor_weights[structure] = found
        if found[1] is None:
            check_partial_ops(spec)  # the structure holds placement types only, not a Partial's reduce op
        self.dtensor_routes[id(spec)] = found
        return found

    def flat_route(self, param: torch.Tensor, piece: _fsdp1.Fsdp1Piece, annotation: Optional[Annotation]) -> Route:
        """The route of an FSDP1 parameter (worked out once per call: ``fingerprint`` and
        ``classify`` both ask)."""
        found = self.flat_routes.get(id(param))
        if found is None:
            found = self.flat_routes[id(param)] = _flat_route(param, piece, annotation, self.stage)
        return found

    def dtensor_kind(self, spec: Any, dtype: torch.dtype, marked: bool) -> tuple:
        """The agreement kind of a DTensor parameter whose spec is new to this call: its mesh,
        placement types and dtype (``marked``: and its ``mark_replicated``)."""
        # Parameters made with DTensor.from_local have a spec each: the kind is built once per
        # (mesh, placement types, dtype, marked), not once per parameter.
        key = (self.mesh_id(spec.mesh), tuple(map(type, spec.placements)), dtype, marked)
        kind = self.kinds_by_structure.get(key)
        if kind is None:
            mesh = spec.mesh
            kind = ("DTensor", tuple(mesh.shape), mesh.mesh_dim_names, tuple(type(p).__name__ for p in spec.placements),
                    str(dtype)) + (("mark_replicated",) if marked else ())
            self.kinds_by_structure[key] = kind
        if not marked:  # marks are per parameter, a spec may be shared
            self.param_kinds[id(spec)] = kind
        return kind


def _dtensor_weight(spec: Any, cache: CallMemo, annotation: Optional[Annotation]) -> float:
    """Weight of a DTensor grad's local tensor (of its reduced value, if it is ``Partial``:
    ``Partial`` dims hold the whole tensor)."""
    mesh = spec.mesh
    shape = tuple(mesh.shape)
    return weigh(cache.stage, shard_pieces(shape, spec.placements), annotation,
                 ((cache.ranks(mesh), f"a DTensor mesh {shape}"),), dtensor=True)


def _flat_route(param: torch.Tensor, piece: _fsdp1.Fsdp1Piece, annotation: Optional[Annotation], stage: CallGroup) -> Route:
    """An FSDP1 parameter's route: its shard, or under FSDP1 over TP with runs one weight per run."""
    if annotation is not None and annotation.sharded_over:
        _check_not_fsdp1_group(annotation, piece)
    # FSDP1 over TP: the TP meshes too lie inside the stage
    meshes = tuple((ranks, "a DTensor (tensor-parallel) mesh inside FSDP1") for ranks in piece.tp_ranks) if piece.tp_ranks else ()
    if piece.runs is None:
        return FlatShardRoute(weigh(stage, piece.pieces, annotation, meshes), piece.trailing_padding)
    how = " (FSDP1 shards x tensor-parallel pieces)"
    return FlatRunsRoute(tuple((start, stop, weigh(stage, pieces, annotation, meshes, how=how)) for start, stop, pieces in piece.runs))


def _check_not_fsdp1_group(annotation: Annotation, piece: _fsdp1.Fsdp1Piece) -> None:
    """A ``mark_sharded`` on a parameter FSDP1 shards may only add a sharding FSDP1 does not do
    (e.g. Megatron-TP pieces flattened by FSDP1): a mark group that shares ranks other than this
    one with FSDP1's own shard group would count FSDP1's sharding twice."""
    if piece.shard_group is None:
        return
    fsdp_ranks = frozenset(dist.get_process_group_ranks(cast(dist.ProcessGroup, piece.shard_group)))
    me = dist.get_rank()
    for info in annotation.sharded_over:
        if (info.ranks & fsdp_ranks) - {me}:
            raise ValueError(
                f"distclip: mark_sharded over ranks {sorted(info.ranks)} on a parameter that FSDP1 already shards over "
                f"ranks {sorted(fsdp_ranks)}: FSDP1's own sharding is counted from FSDP1 itself, so this mark would "
                "count it twice. Mark only a sharding FSDP1 does not do (e.g. the tensor-parallel group of a "
                "Megatron-TP weight), or remove the mark")


def _reject_bare_flat_parameter() -> None:
    # FSDP1 marks the original parameters it flattens; without the module their shard group is
    # unknown and counting them as replicated would silently give a wrong norm.
    raise TypeError(
        "distclip: got an FSDP1-managed parameter without its module; pass the FSDP-wrapped module "
        "itself as `parameters` so its sharding group can be found"
    )


def fingerprint(params: list[torch.Tensor], annotations: list[Optional[Annotation]], cache: CallMemo) -> frozenset:
    """What every rank of the stage must hold alike (``LocalLayout.tensor_kinds``, see ``agreement``),
    read from the *parameters* (``annotations``: their marks), with or without a grad: a frozen
    parameter, or one whose grad is None on this rank only, is no disagreement.

    - One kind per layout held: ("plain", dtype), ("mark_replicated", dtype), a DTensor
      parameter's mesh, placement types and dtype, an FSDP1 parameter's weight (under FSDP1 over
      TP with runs, the weight of every segment: alike on every rank, whatever its shard holds).
      ``mark_sharded`` tensors have none: ranks may hold any number of experts.
    - A census: how many parameters, and a digest of their (dtype, DTensor or not, global
      shape). A forgotten pp_group (stages hold different parameters) or a forgotten
      ``mark_sharded`` on experts (ranks hold different numbers of "replicated" tensors) shows
      here. Left out: ``mark_sharded`` tensors (any number per rank) and FSDP1's (their local
      views differ per rank). The digest is a sum: the order of the parameters does not count.

    Every parameter passes here, so this is also where an FSDP1-managed parameter passed without
    its module is refused.
    """
    kinds: set[tuple] = set()
    plain: set[torch.dtype] = set()
    replicated: set[torch.dtype] = set()  # plain tensors and FSDP1 parameters marked with mark_replicated
    census: list[int] = []
    count = census.append
    fsdp1, codes, param_kinds, managed = cache.fsdp1, cache.dtype_codes, cache.param_kinds, _fsdp1.is_fsdp1_managed
    for param, annotation in zip(params, annotations):
        if annotation is not None and annotation.sharded_over:
            if not isinstance(param, DTensor) and id(param) not in fsdp1 and managed(param):
                _reject_bare_flat_parameter()
            continue
        dtype = param.dtype
        if isinstance(param, DTensor):
            spec = spec_of(param)
            if annotation is not None or id(spec) not in param_kinds:  # else its kind is in already
                kinds.add(cache.dtensor_kind(spec, dtype, annotation is not None))
            count(hash((codes[dtype], True, param.shape)))
        elif fsdp1 and id(param) in fsdp1:
            if annotation is None:
                kinds.add(_flat_kind(param, fsdp1[id(param)], cache))
            else:
                replicated.add(dtype)
        else:
            if managed(param):
                _reject_bare_flat_parameter()
            (plain if annotation is None else replicated).add(dtype)
            count(hash((codes[dtype], False, param.shape)))
    kinds.update(("plain", str(dtype)) for dtype in plain)
    kinds.update(("mark_replicated", str(dtype)) for dtype in replicated)
    kinds.add(("parameters held (count, digest of dtypes and shapes)", len(census), sum(census) & _MASK))
    return frozenset(kinds)


def _flat_kind(param: torch.Tensor, piece: _fsdp1.Fsdp1Piece, cache: CallMemo) -> tuple:
    """The agreement kind of an unmarked FSDP1 parameter: its weight, or under FSDP1 over TP with
    runs the weight of every segment of the flat parameter."""
    route = cache.flat_route(param, piece, None)
    if isinstance(route, FlatShardRoute):
        return ("FSDP1", route.weight, str(param.dtype))
    return ("FSDP1", tuple(weigh(cache.stage, pieces) for pieces in piece.segment_pieces), str(param.dtype))


def classify(
    param: torch.Tensor, grad: torch.Tensor, annotation: Optional[Annotation], cache: CallMemo
) -> tuple[Route, Optional[list[torch.Tensor]]]:
    """Which kind of local gradient ``grad`` (of ``param``, marked with ``annotation``) is: its
    typed route, and the group list its local tensor joined (None where the route places it: a
    ``Partial`` grad, FSDP1 runs).

    Unmarked plain and DTensor grads, the common case, are a lookup in ``cache``; marks are per
    parameter, so a marked grad is weighed every time."""
    if isinstance(grad, DTensor):
        spec = spec_of(grad)
        if annotation is None:
            found = cache.dtensor_routes.get(id(spec))
            return found if found is not None else cache.dtensor_route(spec, grad)
        weight = _dtensor_weight(spec, cache, annotation)
        if check_partial_ops(spec):
            return PartialRoute(weight), None
        return DTensorRoute(weight), cache.groups[(grad.device, grad.dtype, weight)]
    piece = cache.fsdp1.get(id(param)) if cache.fsdp1 else None
    if piece is not None:
        route = cache.flat_route(param, piece, annotation)
        if isinstance(route, FlatShardRoute):
            return route, cache.groups[(grad.device, grad.dtype, route.weight)]
        return route, None
    if annotation is None:  # DDP, no wrapper: a plain tensor replicated across the stage
        where = (grad.dtype, grad.device)
        bucket = cache.replicas.get(where)
        if bucket is None:
            bucket = cache.replicas[where] = cache.groups[(grad.device, grad.dtype, cache.replica.weight)]
        return cache.replica, bucket
    weight = weigh(cache.stage, 1, annotation)
    marked = cache.marked_routes.get(weight)
    if marked is None:
        marked = cache.marked_routes[weight] = MarkedRoute(weight)
    return marked, cache.groups[(grad.device, grad.dtype, weight)]


def local_layout(
    params: list[torch.Tensor],
    module: Optional[nn.Module],
    stage: CallGroup,
    grads: Optional[list[torch.Tensor]] = None,
) -> LocalLayout:
    """Every gradient this rank holds, as local tensors grouped by (device, dtype, weight).

    Raises (before any collective and before any gradient is touched) on layouts that cannot be
    counted: a FlatParameter passed without its FSDP module, a shard group that does not fit inside
    a pipeline stage, a mark lost by re-wrapping.

    With ``grads`` (one tensor per entry of ``params``: ``get_total_norm`` measuring the tensors
    it is given), those are measured instead of ``params[i].grad``.
    """
    return _discover(params, module, stage, False, False, grads)


def layout_with_entries(params: list[torch.Tensor], module: Optional[nn.Module], stage: CallGroup) -> LocalLayout:
    """:func:`local_layout`, whose ``LocalLayout.entries`` also say which parameter (its index in
    ``params``) each local tensor comes from and what it weighs: for per-parameter norms."""
    return _discover(params, module, stage, True, False, None)


def layout_with_routes(params: list[torch.Tensor], module: Optional[nn.Module], stage: CallGroup, entries: bool = False) -> LocalLayout:
    """:func:`local_layout`, whose ``LocalLayout.routes`` also hold each parameter's route,
    ``LocalLayout.joined`` the group list it joined and ``LocalLayout.grads`` the grads read: what
    a layout plan (``plan.LayoutPlan``) keeps; with ``entries``, also :func:`layout_with_entries`'
    (a plan that ``grad_norms`` builds)."""
    return _discover(params, module, stage, entries, True, None)


def _discover(
    params: list[torch.Tensor],
    module: Optional[nn.Module],
    stage: CallGroup,
    entries: bool,
    routes: bool,
    grads: Optional[list[torch.Tensor]],
) -> LocalLayout:
    if grads is None:
        grads = list(map(_grad_of, params))
    if not stage.distributed:  # no process group, so no mark
        return _undistributed_layout(grads, entries, routes)
    marked = table(params, module)
    cache = CallMemo(stage, _fsdp1.fsdp1_pieces(module) if module is not None else {})
    annotations: list[Optional[Annotation]] = list(map(marked.get, map(id, params))) if marked else [None] * len(params)
    layout = LocalLayout(cache.groups, fingerprint(params, annotations, cache), marks=marked)
    partial, entry_list = layout.partial, layout.entries
    route_list: list[Optional[Route]] = [None] * len(params) if routes else []
    joined: list[Optional[list[torch.Tensor]]] = [None] * len(params) if routes else []
    for index, (param, grad, annotation) in enumerate(zip(params, grads, annotations)):
        if grad is None:
            continue
        route, bucket = classify(param, grad, annotation, cache)
        copies = _copies(annotation, stage) if entries else 1
        if route.__class__ is FlatRunsRoute:  # FSDP1 runs: one slice of the flat shard per run, each in its own group
            segment_weights = _segment_weights(param, annotation, cache) if entries else ()
            for start, stop, weight in route.runs:  # type: ignore[union-attr]
                piece = grad[start:stop]
                cache.groups[(piece.device, piece.dtype, weight)].append(piece)
                if entries:
                    entry_list.append(Entry(index, piece, weight, False, start, copies, segment_weights))
            if routes:
                route_list[index] = route
            continue
        local = routed_tensor(route, grad)
        if local.is_conj() or local.is_sparse:  # what the kernels cannot take as it is (``LocalLayout.resolve``)
            resolved = layout.resolve(local, (local.device, local.dtype, route.weight))  # type: ignore[union-attr]
            if resolved is None:  # sparse: measured and scaled apart from the groups
                if entries:
                    measured = layout.measure_only[(local.device, local.dtype, route.weight)][-1]  # type: ignore[union-attr]
                    entry_list.append(Entry(index, measured, route.weight, copies=copies))  # type: ignore[union-attr]
                if routes:
                    route_list[index] = route
                continue
            local = resolved
        if bucket is not None:
            bucket.append(local)
        else:  # only a Partial grad has no group: it is made whole first
            partial.append((grad, route.weight))  # type: ignore[arg-type,union-attr]  # a DTensor grad's route
        if entries:
            entry_list.append(Entry(index, local, route.weight, bucket is None, copies=copies))  # type: ignore[union-attr]
        if routes:
            route_list[index] = route
            joined[index] = bucket
    layout.routes, layout.joined = route_list, joined
    layout.result_mesh = _one_mesh(grads, cache)
    if partial:
        partial_ids = {id(g) for g, _ in partial}
        holders = [param for param, grad in zip(params, grads) if grad is not None and id(grad) in partial_ids]
        if len(holders) == len(partial):
            layout.partial_names = pairing_names([g for g, _ in partial], holders)
    if routes:
        layout.grads = list(grads)
    return layout


def _copies(annotation: Optional[Annotation], stage: CallGroup) -> int:
    """The pipeline stages holding a copy of a parameter marked so (``weigh`` counts them once)."""
    if annotation is None or annotation.replicated_over is None:
        return 1
    return stage_copies(annotation.replicated_over.ranks, stage.pp_ranks)


def _segment_weights(param: torch.Tensor, annotation: Optional[Annotation], cache: CallMemo) -> tuple[float, ...]:
    """The weight of every segment of an FSDP1-over-TP flat parameter with runs (``weigh``, as
    for its runs): segments outside this rank's shard have one too (``describe`` shows it)."""
    piece = cache.fsdp1[id(param)]
    meshes = tuple((ranks, "a DTensor (tensor-parallel) mesh inside FSDP1") for ranks in piece.tp_ranks)
    how = " (FSDP1 shards x tensor-parallel pieces)"
    return tuple(weigh(cache.stage, pieces, annotation, meshes, how=how) for pieces in piece.segment_pieces)


def _one_mesh(grads: Sequence[Optional[torch.Tensor]], cache: CallMemo) -> Optional[DeviceMesh]:
    """The one mesh of ``grads`` when every grad there is is a DTensor on it (equal meshes may be
    distinct objects), else None. C-level passes: no Python step per grad."""
    held = list(compress(grads, map(operator.is_not, grads, repeat(None))))
    if not held or set(map(type, held)) - {DTensor} and not all(map(DTensor.__instancecheck__, held)):
        return None
    meshes = {id(m): m for m in map(_mesh_of, map(spec_of, held))}
    if len({cache.mesh_id(m) for m in meshes.values()}) != 1:
        return None
    return next(iter(meshes.values()))


_mesh_of = operator.attrgetter("mesh")


def pairing_names(grads: Sequence[torch.Tensor], holders: Sequence[torch.Tensor]) -> list[str]:
    """The names that pair ``Partial`` grads with their summands on the other ranks
    (``reduce.reduce_partial_grads``), one per grad; ``holders``: the parameter of each (or the
    grad itself, given without its parameter). Only grads that look alike to every rank (shape,
    dtype, mesh, placements) need one, and only then are names looked up (``marks.names_of``: the
    parameter's name under the topmost module holding it, the same whichever module the call got,
    so a rank that failed and only joined the collectives pairs its grads the same way)."""
    keys = [(tuple(g.shape), g.dtype, spec_of(g).mesh, tuple(spec_of(g).placements)) for g in grads]
    if len(set(keys)) == len(keys):
        return [""] * len(grads)
    return marks.names_of(list(holders), None)


def _undistributed_layout(grads: Sequence[Optional[torch.Tensor]], entries: bool, routes: bool) -> LocalLayout:
    """Without torch.distributed every gradient is whole on this rank: weight 1, no agreement."""
    groups: dict[GroupKey, list[torch.Tensor]] = defaultdict(list)
    layout = LocalLayout(groups)
    entry_list: list[Entry] = []
    route_list: list[Optional[Route]] = [None] * len(grads) if routes else []
    joined: list[Optional[list[torch.Tensor]]] = [None] * len(grads) if routes else []
    for i, g in enumerate(grads):
        if g is not None:
            key = (g.device, g.dtype, 1.0)
            if g.is_conj() or g.is_sparse:  # what the kernels cannot take as it is (``LocalLayout.resolve``)
                resolved = layout.resolve(g, key)
                if resolved is None:
                    if entries:
                        entry_list.append(Entry(i, layout.measure_only[key][-1], 1.0))
                    if routes:
                        route_list[i] = _UNDISTRIBUTED
                    continue
                g = resolved
            bucket = groups[key]
            bucket.append(g)
            if entries:
                entry_list.append(Entry(i, g, 1.0))
            if routes:
                route_list[i] = _UNDISTRIBUTED
                joined[i] = bucket
    layout.entries, layout.routes, layout.joined = entry_list, route_list, joined
    layout.grads = list(grads) if routes else []
    return layout


_grad_of = operator.attrgetter("grad")
