"""Per-parameter and per-group global gradient norms: :func:`grad_norms`.

    norms = distclip.grad_norms(model)                          # {name: norm, ..., "total": norm}
    norms = distclip.grad_norms(model, groups=lambda n: n.split(".")[0])
    logger.log(dict(zip(norms.names, norms.norms.tolist())))    # every norm in one transfer
    distclip.clip_grads_with_norm_(model, max_norm, norms["total"])   # one collective in total

``grad_norms`` measures every local gradient once per parameter (``math.per_tensor``; FSDP1 flat
parameters are cut back into their original parameters' segments), weights it with the weight
discovery gives it (``layout.discovery``'s entries: weight and stage copies), and adds the weighted
partials into a vector indexed by the global order of names every rank shares
(``observe.name_order``). One all-reduce of that vector (SUM for finite p, MAX for +-inf, with
NaN flags) gives every rank the same dict.

What a call works out locally (names, units, weights, where each unit's partial goes) is kept as
a ``NormsPlan``, a view of the clip's plan of the same parameter list (``layout.plan``: one plan,
one cache, one staleness check): a later call whose plan still holds, and whose grads are as the
view saw them, only reads the grads, measures them and reduces. A call whose check fails, or whose
parameters need more than the view can find again (FSDP1 flat parameters), works everything out again.

Names: ``observe.names`` (any form ``clip_grad_norm_`` takes, named).
"""

from __future__ import annotations

import functools
import math
import operator
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Optional, Union, cast

import torch
from torch import nn

from distclip import _fsdp1
from distclip._dtensor import local_of
from distclip.clip import PLANS, check_norm_type, fallback_norm_type, join_partial_grads
from distclip.comm import agreement, failure
from distclip.comm.packet import HostView, Packet, failed_vector
from distclip.comm.reduce import all_reduce, reduce_partial_grads, reduction_device
from distclip.layout.discovery import (
    Annotation,
    CallGroup,
    DTensor,
    GroupLike,
    LocalLayout,
    call_group,
    layout_with_entries,
    pairing_names,
)
from distclip.layout.plan import GradBatchCheck, grad_checks
from distclip.math.partials import FLOAT64_DTYPES
from distclip.math.per_tensor import Buckets, taker, tensor_partials
from distclip.observe.name_order import TOTAL, NameOrder
from distclip.observe.names import CallParameters, NamedParams, Prefixes, clean_name, parameters_of

__all__ = ["GradNorms", "Measured", "collect", "grad_norms", "measure"]

# Per-entry flag slot: held + has_elements * _B + nan * _B**2 (exact in float64 for < 2**20 ranks;
# the NaN term is only used under MAX, where SUM's propagation of NaN is not available).
_B = float(2**20)


# ----------------------------------------------------------------------------- the result


class GradNorms(dict[str, torch.Tensor]):
    """What :func:`grad_norms` returns: the dict ``{entry: norm, ..., "total": norm}`` (0-dim
    tensors) and the same norms as one tensor, so a logger reads every norm with one
    device-to-host copy (``norms.norms.tolist()``) instead of one ``.item()`` per entry.

    Attributes:
        names (tuple[str, ...]): the keys, in order (``"total"`` last).
        norms (Tensor): 1-D, ``norms[i]`` is ``self[names[i]]`` (the dict's values are views of it).
    """

    names: tuple[str, ...]
    norms: torch.Tensor

    def __init__(self, names: Sequence[str], norms: torch.Tensor) -> None:
        super().__init__(zip(names, norms.unbind()))
        self.names = tuple(names)
        self.norms = norms


# ----------------------------------------------------------------------------- local units


@dataclass
class NamedGrad:
    """One local gradient tensor of one named parameter (an FSDP1 flat parameter gives several)."""

    name: str
    param: torch.Tensor
    tensor: torch.Tensor  # what is measured (a ``Partial`` DTensor grad when ``partial``)
    weight: float  # distclip's weight (``layout.discovery``'s ``Entry.weight``)
    partial: bool = False
    segment: _fsdp1.FlatSegment | None = None
    copies: int = 1  # pipeline stages holding a copy (``Entry.copies``)


@dataclass
class LocalGrads:
    """What this rank passes: parameters, their names and its local gradient units."""

    params: list[torch.Tensor]
    module: nn.Module | None
    names: list[str]  # every local name (segments for flat parameters), with or without grad
    units: list[NamedGrad]
    tensor_kinds: frozenset
    flat: dict[int, list[_fsdp1.FlatSegment]]  # id(flat param) -> its segments
    param_names: list[list[str]]  # per parameter, the names it stands for
    marks: dict[int, Annotation] = field(default_factory=dict)  # the parameters' marks, by id

    def annotation(self, param: torch.Tensor) -> Optional[Annotation]:
        return self.marks.get(id(param))


def collect(parameters: Union[NamedParams, CallParameters], stage: CallGroup, layout: Optional[LocalLayout] = None) -> LocalGrads:
    """Names and local gradient units, from ``layout.local_layout`` (the weights distclip uses;
    ``layout``: this call's, with entries, where a plan was just built from it). Purely local;
    raises (before any collective) where ``local_layout`` does."""
    named = parameters if isinstance(parameters, CallParameters) else parameters_of(parameters)
    names, params, module = named.names, named.params, named.module
    if layout is None:
        layout = layout_with_entries(params, module, stage)
    flat: dict[int, list[_fsdp1.FlatSegment]] = {}
    if module is not None:
        for p in params:
            if _fsdp1.is_flat_parameter(p):
                flat[id(p)] = _fsdp1.flat_segments(p)
    param_names: list[list[str]] = []
    all_names: list[str] = []
    for name, p in zip(names, params):
        segments = flat.get(id(p))
        if segments is None:
            param_names.append([name])
        else:
            prefix = name[: -len("_flat_param")] if name.endswith("_flat_param") else name + "."
            param_names.append([clean_name(prefix + s.fqn) for s in segments])
        all_names.extend(param_names[-1])
    units: list[NamedGrad] = []
    runs_seen: set[int] = set()
    for entry in layout.entries:
        p = params[entry.index]
        segments = flat.get(id(p))
        if segments is None:
            units.append(NamedGrad(names[entry.index], p, entry.tensor, entry.weight, entry.partial, None, entry.copies))
            continue
        seg_names = param_names[entry.index]
        if entry.offset is not None:  # FSDP1 over TP: one run of segments that share a weight
            start, stop = entry.offset, entry.offset + entry.tensor.numel()
            for seg_name, seg in zip(seg_names, segments):
                if seg.numel and start <= seg.offset and seg.offset + seg.numel <= stop:
                    piece = entry.tensor[seg.offset - start : seg.offset - start + seg.numel]
                    units.append(NamedGrad(seg_name, p, piece, entry.weight, False, seg, entry.copies))
            if entry.index not in runs_seen:  # segments outside the shard go with the first run
                runs_seen.add(entry.index)
                # they hold no element; their weight is discovery's (for describe)
                for seg_name, seg, weight in zip(seg_names, segments, entry.segment_weights):
                    if not seg.numel:
                        units.append(NamedGrad(seg_name, p, entry.tensor[:0], weight, False, seg, entry.copies))
            continue
        flat_grad = entry.tensor.reshape(-1)  # the local shard, padding removed
        for seg_name, seg in zip(seg_names, segments):
            units.append(NamedGrad(seg_name, p, flat_grad[seg.offset : seg.offset + seg.numel], entry.weight, False, seg, entry.copies))
    return LocalGrads(params, module, all_names, units, layout.tensor_kinds, flat, param_names, layout.marks)


def _local_sig(local: LocalGrads) -> tuple:
    tied: list[tuple[str, tuple[int, ...]]] = []
    for p, pnames in zip(local.params, local.param_names):
        annotation = local.annotation(p)
        if annotation is not None and annotation.replicated_over is not None:
            ranks = tuple(sorted(annotation.replicated_over.ranks))
            tied.extend((n, ranks) for n in pnames)
    return (tuple(local.names), tuple(tied))


# ----------------------------------------------------------------------------- the plan


_GRAD, _LOCAL = 0, 1  # how a unit's tensor is found again: the grad itself, or a DTensor grad's local tensor
_grad_of = operator.attrgetter("grad")


class _Reuse(NamedTuple):
    """What a later call reads: the checks that tell its grads are still as the view saw them
    (``layout.plan``'s, after the plan's own ``fresh_grads``) and where
    each unit's tensor is, from the call's grads."""

    checks: list[GradBatchCheck]
    take: Optional[Callable[[list], tuple]]  # each unit's parameter's grad, in unit order
    ways: list[int]  # per unit: _GRAD or _LOCAL


@dataclass
class Packing:
    """The static part of one call's vector, for one name order and ``groups``: where each unit's
    partial goes and with which weights, and the per-entry flags (which entries are held and hold
    elements), as tensors on the reduction device."""

    order: NameOrder
    groups: Optional[Callable]
    entry_names: list[str]
    ent: torch.Tensor  # per unit, its entry (kept units only)
    keep: torch.Tensor  # per unit, whether its name has an entry
    all_kept: bool
    w_total: torch.Tensor
    w_entry: torch.Tensor  # kept units only
    flags: torch.Tensor  # per entry and the total: held (1) + has elements (_B)


class NormsPlan:
    """``grad_norms``' view of the clip's plan of one parameter list (``layout.plan.LayoutPlan``,
    kept in its ``norms``): names, units (which parameter, weight, whether ``Partial``), agreement
    kinds, buckets, and the checks that tell a later call, once the plan holds, that the view
    does too: the same names and module, the grads' dtypes, devices and specs. Holds no tensor and
    no reference to a parameter."""

    def __init__(self, named: CallParameters, local: LocalGrads, stage: CallGroup) -> None:
        self._module = weakref.ref(local.module) if local.module is not None else None  # never keeps a model alive
        self.names = named.names
        self.tensor_kinds = local.tensor_kinds
        self.sig = _local_sig(local)
        self.all_names = local.names
        self.unit_names = [u.name for u in local.units]
        self.weights = [u.weight for u in local.units]
        self.copies = [u.copies for u in local.units]
        self.partial = [i for i, u in enumerate(local.units) if u.partial]
        self.partial_names = pairing_names([local.units[i].tensor for i in self.partial], [local.units[i].param for i in self.partial])
        self.has_elements = [bool(u.tensor.numel()) for u in local.units]
        self.has_float64 = any(u.tensor.dtype in FLOAT64_DTYPES for u in local.units)
        self.grad_device = local.units[0].tensor.device if local.units else None
        self.buckets = Buckets.build([u.tensor for u in local.units])
        self.packing: Optional[Packing] = None
        self.reuse = self._reuse(named.params, local)  # None: not reusable (FSDP1 segments, slices)

    @property
    def module(self) -> nn.Module | None:
        return self._module() if self._module is not None else None

    @staticmethod
    def _reuse(params: list[torch.Tensor], local: LocalGrads) -> Optional[_Reuse]:
        """How a later call finds its unit tensors again, or None where it cannot. FSDP1 modules
        are worked out anew each call: their views and shard facts come from FSDP1's handles,
        which these checks do not read."""
        if any(map(_fsdp1.is_fsdp1_managed, params)):
            return None
        where = {id(p): i for i, p in enumerate(params)}
        positions, ways = [], []
        for u in local.units:
            if u.segment is not None or id(u.param) not in where:
                return None
            grad = u.param.grad
            if u.tensor is grad:
                ways.append(_GRAD)
            elif isinstance(grad, DTensor) and u.tensor is local_of(grad):
                ways.append(_LOCAL)
            else:  # a slice (padding removed): worked out anew each call
                return None
            positions.append(where[id(u.param)])
        return _Reuse(grad_checks(list(map(_grad_of, params))), taker(positions) if positions else None, ways)

    def tensors(self, named: CallParameters, grads: list) -> Optional[list[torch.Tensor]]:
        """This call's unit tensors if the view holds for ``named`` and ``grads`` (the grads of a
        plan that holds), else None."""
        reuse = self.reuse
        if reuse is None or self.names != named.names or self.module is not named.module:
            return None
        for check in reuse.checks:
            if not check.holds(check.take(grads)):
                return None
        if reuse.take is None:
            return []
        unit_grads = list(reuse.take(grads))
        if _LOCAL in reuse.ways:
            return [local_of(g) if w else g for g, w in zip(unit_grads, reuse.ways)]
        return unit_grads

    def packing_for(self, order: NameOrder, groups: Optional[Callable], stage: CallGroup, device: torch.device) -> Packing:
        found = self.packing
        if found is not None and found.order is order and found.groups is groups and found.ent.device == device:
            return found
        entry_names, entry_of = order.entries(groups)
        n_entries = len(entry_names)
        index = order.index
        ent, entry_weights, idx_all, idx_has = [], [], [], []
        for name, w, copies, has in zip(self.unit_names, self.weights, self.copies, self.has_elements):
            i = index.get(name)
            e = entry_of[i] if i is not None else -1  # unknown name: this rank raised "names changed"
            ent.append(e)
            peers = order.tied_peers.get(name) if copies > 1 else None
            if peers is not None and e >= 0:  # a tied copy counts once in the total, in full in each entry
                same = 1 + sum(1 for q in peers if q in index and entry_of[index[q]] == e)
                w = w * copies / same
            entry_weights.append(w)
            if e >= 0:
                idx_all.append(e)
                if has:
                    idx_has.append(e)
        n = n_entries + 1  # entries, then the total
        flags = torch.zeros(n, dtype=torch.float64)
        flags.index_fill_(0, torch.tensor(idx_all + ([n_entries] if self.unit_names else []), dtype=torch.long), 1.0)
        held = idx_has + ([n_entries] if any(self.has_elements) else [])
        flags.index_fill_(0, torch.tensor(held, dtype=torch.long), 1.0 + _B)
        ent_t = torch.tensor(ent, dtype=torch.long)
        keep = ent_t >= 0
        all_kept = bool(keep.all())
        w_entry = torch.tensor(entry_weights, dtype=torch.float64)
        packing = Packing(order, groups, entry_names, (ent_t if all_kept else ent_t[keep]).to(device), keep.to(device), all_kept,
                          torch.tensor(self.weights, dtype=torch.float64, device=device),
                          (w_entry if all_kept else w_entry[keep]).to(device), flags.to(device))
        self.packing = packing
        return packing


# ----------------------------------------------------------------------------- grad_norms


@torch.no_grad()
def grad_norms(
    parameters: NamedParams,
    norm_type: float = 2.0,
    *,
    groups: Callable[[str], str | None] | None = None,
    pp_group: Optional[GroupLike] = None,
    group: Optional[GroupLike] = None,
    trainable_only: bool = False,
    strip_prefixes: Prefixes = False,
) -> GradNorms:
    r"""Global norms of the full gradients, per parameter (or per group), plus ``"total"``.

    Each value is the norm one process would compute over that parameter's (group's) full,
    unsharded gradient, whatever the layout: DTensors on any mesh, plain replicas, FSDP1 (flat
    parameters are cut back into their original parameters), ``mark_sharded`` /
    ``mark_replicated``, ``Partial`` grads, pipeline stages. The dict (keys, order, values, dtype)
    is the same on every rank; every rank must call it.

    Collectives: one all-reduce per call (plus ``Partial`` grads' one, as in ``clip_grad_norm_``).
    The first call with a module (or whenever some rank's parameter names or ``mark_replicated``
    groups changed) also agrees on the order of names with one object exchange (and then
    all-reduces again). Every rank must see a module for the first time in the same call. Reading
    which names are present is a host sync on accelerators.

    Args:
        parameters (nn.Module, Tensor or Iterable[Tensor or (str, Tensor)]): whatever
            ``clip_grad_norm_`` takes, or ``(name, parameter)`` pairs (``named_parameters()``). A
            module gives names from ``named_parameters()`` without FSDP1, activation-checkpoint
            and ``torch.compile`` wrapper prefixes, nor DDP's leading ``module.``; pairs get the
            same clean-up, except ``module.``; bare tensors are named by position,
            ``"param[3]"``. Pass the module for FSDP1. Names are global across pipeline stages:
            one name on two stages is one entry (right for a tied weight marked with
            ``mark_replicated``; stages that number their layers locally should pass pairs with
            a stage prefix).
        norm_type (float): as in ``clip_grad_norm_``: any p > 0, ``inf``, ``-inf``, ``0``, p < 0.
        groups (callable, optional): ``name -> group name`` (a str, or ``None`` to leave the
            parameter out of the groups; it still counts in ``"total"``). Default: one entry per
            parameter.
        pp_group (ProcessGroup or DeviceMesh, optional): the pipeline-parallel group; the dict
            then holds the names of every stage.
        group (ProcessGroup or DeviceMesh, optional): the ranks that hold this model (default:
            the default process group); exactly those ranks call.
        trainable_only (bool): leave out parameters with ``requires_grad=False`` (a frozen base
            under LoRA) from the names and the total. Default: False.
        strip_prefixes (bool or Sequence[str]): also drop these leading prefixes from the names;
            ``True``: DDP's ``module.`` and PEFT's ``base_model.model.``. Default: False.

    Returns:
        :class:`GradNorms`, a dict ``{entry: norm, ..., "total": norm}``: entries in the agreed
        order (the union of every rank's names in rank order, or groups in order of first
        member). An entry is present iff some rank holds a grad (``.grad is not None``) for one
        of its parameters; one whose grads hold no element has norm 0. ``"total"`` is always
        present and equals :func:`get_total_norm` on the same parameters (to float64 rounding).
        Values are 0-dim float32 tensors (float64 if any rank holds a float64 grad), on the
        gradients' device, views of ``.norms``, the same norms as one 1-D tensor in the order
        of ``.names`` (for a logger: one transfer). A tied weight counts once in ``"total"`` and
        in full in each entry that holds a copy.
    """
    m = measure(parameters, norm_type, groups=groups, pp_group=pp_group, group=group, trainable_only=trainable_only,
                strip_prefixes=strip_prefixes, units=False)
    return GradNorms(m.names, m.norms.to(m.dtype))


class Measured(NamedTuple):
    """What :func:`measure` found: the entry names (``"total"`` last) and their norms in float64,
    the dtype ``grad_norms`` returns them in, this rank's unit tensors (as measured, ``Partial``
    grads as they are) and each one's entry (None: left out of the groups), and the stage."""

    names: tuple[str, ...]
    norms: torch.Tensor
    dtype: torch.dtype
    tensors: list[torch.Tensor]
    unit_entries: list[Optional[str]]
    stage: CallGroup


def measure(
    parameters: NamedParams,
    norm_type: object = 2.0,
    *,
    groups: Callable[[str], str | None] | None = None,
    pp_group: Optional[GroupLike] = None,
    group: Optional[GroupLike] = None,
    trainable_only: bool = False,
    strip_prefixes: Prefixes = False,
    units: bool = True,
) -> Measured:
    """:func:`grad_norms` keeping the float64 values and this rank's units (``GradGuard`` clips
    each group with them; ``units=False``: no unit entries). Same arguments, same collectives."""
    seen: list[list[torch.Tensor]] = []  # the parameters, once read: a failed rank's ``Partial`` collectives

    def local_part() -> tuple[float, CallGroup, NormsPlan, list[torch.Tensor]]:
        p = check_norm_type(norm_type)
        if groups is not None and not callable(groups):
            raise TypeError(f"distclip: groups must be a callable name -> group name (or None), got {type(groups).__name__}")
        stage = call_group(pp_group, group)
        named = parameters_of(parameters, trainable_only, strip_prefixes)
        seen.append(named.params)
        planned = PLANS.planned(named.params, named.module, stage)  # the clip's plan, kept for both
        view = planned.plan.norms
        if planned.grads is not None and isinstance(view, NormsPlan):
            tensors = view.tensors(named, planned.grads)
            if tensors is not None:
                return p, stage, view, tensors
        local = collect(named, stage, planned.layout)
        view = NormsPlan(named, local, stage)
        if view.reuse is not None:
            planned.plan.norms = view
        return p, stage, view, [u.tensor for u in local.units]

    found, error = failure.attempt(local_part)
    if found is not None:
        p, stage, plan, tensors = found
    else:  # bad input here: join the call's collectives holding nothing, then raise on every rank
        assert error is not None
        try:
            stage = call_group(None, group)
        except Exception:
            raise error from None
        p = fallback_norm_type(norm_type)
        module = parameters if isinstance(parameters, nn.Module) else None
        empty = LocalGrads([], module, [], [], frozenset({("failed",)}), {}, [])
        plan, tensors = NormsPlan(CallParameters([], [], module), empty, stage), []
    entry_groups = groups if callable(groups) else None
    order = NameOrder.cached(plan.module, stage)
    if order is None:
        order = NameOrder.agree(plan.sig, stage)
        order.store(plan.module)
    stale = order.local_sig != plan.sig
    device = reduction_device(stage) if stage.distributed else None
    device = device or plan.grad_device or torch.device("cpu")
    # From here to the all-reduce every failure takes the one failure path: the rank still sends
    # a vector (``failed_vector``) and every rank raises together.
    partials: Optional[torch.Tensor] = None
    if error is None:
        partials, error = failure.attempt(lambda: _unit_partials(plan, tensors, p, device))
    else:  # the ``Partial`` collectives its peers issue here
        if not seen:  # failed before reading them (a generator is still unread)
            try:
                seen.append(parameters_of(parameters, trainable_only, strip_prefixes).params)
            except Exception:  # noqa: BLE001 - nothing to join with; this rank raises its own error below
                pass
        join_partial_grads([q.grad for q in seen[0]] if seen else [], seen[0] if seen else [])
    for _attempt in range(2):
        built = None
        if error is None:
            assert partials is not None
            built, error = failure.attempt(functools.partial(_pack, plan, order, entry_groups, partials, p, stage, device, stale))
        packed = built[1] if built is not None else _failed(order, entry_groups, p, stage, device, error)
        all_reduce(packed, p, stage)
        if built is None:  # this rank failed: every rank raises together, this one its own error
            failure.settle(True, error, packed.device, stage.group)
        assert built is not None
        packing, _, packet = built
        # read on the host (a sync on accelerators, as reading which names are present is anyway)
        view = packet.decode_host(packed.tolist())
        failure.settle(view.failed, None, packed.device, stage.group)
        if not view.names_changed:
            break
        order = NameOrder.agree(plan.sig, stage)
        order.store(plan.module)
        stale = False
    names, norms64 = _unpack(packed, view._replace(has_float64=True), packing.entry_names, p, packet, plan)
    unit_entries: list[Optional[str]] = []
    if units:
        entry_names, entry_of = order.entries(entry_groups)
        for name in plan.unit_names:
            at = order.index.get(name)
            e = entry_of[at] if at is not None else -1
            unit_entries.append(entry_names[e] if e >= 0 else None)
    return Measured(names, norms64, torch.float64 if view.has_float64 else torch.float32, tensors, unit_entries, stage)


def _unit_partials(plan: NormsPlan, tensors: list[torch.Tensor], p: float, device: torch.device) -> torch.Tensor:
    """The per-unit partials: ``Partial`` grads made whole first (their collectives go out before
    anything here can fail; a failure inside them is not followed by a join), then measured."""
    if plan.partial:
        tensors = list(tensors)
        for i, value in _reduce_partial_units(tensors, plan.partial, plan.partial_names).items():
            tensors[i] = value
    return tensor_partials(tensors, p, device, plan.buckets if not plan.partial else None)


def _failed(order: NameOrder, entry_groups: Optional[Callable], p: float, stage: CallGroup, device: torch.device,
            error: Optional[Exception]) -> torch.Tensor:
    """A failed rank's vector: as long as the others' (their entries follow the agreed order)."""
    assert error is not None
    try:
        n = len(order.entries(entry_groups)[0]) + 1
    except Exception:  # the length is what failed: no vector of the others' length to send
        raise error from None
    return failed_vector(2 * n, stage.distributed, math.isinf(p), device)


def _reduce_partial_units(tensors: list[torch.Tensor], partial: list[int], names: list[str]) -> dict[int, torch.Tensor]:
    """``Partial`` grads made whole (one all-reduce per partial mesh group, as in clip.py), paired
    across ranks by ``names`` (``layout.pairing_names``)."""
    wanted = [(cast(DTensor, tensors[i]), float(i), name) for i, name in zip(partial, names)]  # a partial unit holds its DTensor grad
    # ``reduce_partial_grads`` returns (value, weight) pairs with the weight passed through
    # unchanged, in its own bucket order: the unit's index travels in the weight's place.
    return {int(i): value for value, i in reduce_partial_grads(wanted)}


def _pack(plan: NormsPlan, order: NameOrder, groups: Optional[Callable], s: torch.Tensor, p: float, stage: CallGroup,
          device: torch.device, stale: bool) -> tuple[Packing, torch.Tensor, Packet]:
    """This rank's vector (see ``packet``): its head is the per-entry weighted partials and the
    total's partial, then per-entry flags; the packet adds the agreement slots and the flags
    (names changed, has float64, failed). ``s``: the per-unit partials. Returns the packing (where
    each unit went, for ``groups`` in ``order``) with it."""
    packing = plan.packing_for(order, groups, stage, device)
    n_entries = len(packing.entry_names)
    n = n_entries + 1  # entries, then the total
    flags = packing.flags
    ent_t = packing.ent
    has_units = bool(plan.unit_names)
    if math.isinf(p):
        sign = 1.0 if p > 0 else -1.0
        v = s * sign
        nan = torch.isnan(v)
        v = torch.where(nan, -math.inf, v)
        kept_v, kept_nan = (v, nan) if packing.all_kept else (v[packing.keep], nan[packing.keep])
        values = torch.full((n,), -math.inf, dtype=torch.float64, device=device)
        values[:n_entries].scatter_reduce_(0, ent_t, kept_v, "amax")
        nan_e = torch.zeros(n, dtype=torch.float64, device=device)
        nan_e[:n_entries].scatter_reduce_(0, ent_t, kept_nan.double(), "amax")
        if has_units:
            values[n_entries] = v.max()
            nan_e[n_entries] = nan.any().double()
        flags = flags + nan_e * (_B * _B)
    else:
        kept = s if packing.all_kept else s[packing.keep]
        values = torch.zeros(n, dtype=torch.float64, device=device)
        values[:n_entries].index_add_(0, ent_t, kept * packing.w_entry)
        values[n_entries] = s.dot(packing.w_total)
    order = packing.order
    call = agreement.call_signature(f"grad_norms[{len(order.names)} names {order.crc:08x}, {n_entries} entries]", p, None, False, stage)
    packet = Packet(2 * n, agreement.Signature(call, plan.tensor_kinds, stage) if stage.distributed else None, math.isinf(p))
    packed = packet.encode_device(torch.cat([values, flags]), device, names_changed=stale, has_float64=plan.has_float64)
    return packing, packed, packet


def _unpack(packed: torch.Tensor, view: HostView, entry_names: list[str], p: float, packet: Packet, plan: NormsPlan) -> tuple[
        tuple[str, ...], torch.Tensor]:
    """The entries present (``"total"`` last) and their norms, on the grads' device."""
    n = len(entry_names) + 1
    values, flags = packed[:n], packed[n : 2 * n]
    if view.disagreed:
        assert packet.sig is not None  # one process always agrees with itself
        agreement.raise_mismatch(packet.sig)
    has = flags >= _B
    if math.isinf(p):
        sign = 1.0 if p > 0 else -1.0
        total = torch.where(flags >= _B * _B, math.nan, values * sign)
    elif p == 0:
        total = values.round()
    else:
        total = values.pow(1.0 / p)
    total = torch.where(has, total, 0.0)
    out_dtype = torch.float64 if view.has_float64 else torch.float32
    grad_device = plan.grad_device or packed.device
    held = [f >= 1 for f in view.head[n : 2 * n - 1]]  # which names are present (read on the host above)
    norms = total.to(device=grad_device, dtype=out_dtype)
    if all(held):
        return (*entry_names, TOTAL), norms
    kept = [i for i, h in enumerate(held) if h]
    return (*(entry_names[i] for i in kept), TOTAL), norms[torch.tensor([*kept, n - 1], device=norms.device)]
