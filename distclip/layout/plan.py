"""Layout plans: what layout discovery found for one parameter list, reused across calls.

Discovering a layout costs Python work per parameter (which wrapper, which mesh,
which weight, which kinds for the agreement check); with thousands of parameters that is more
than the math. Between two training steps almost nothing changes, so the answer is kept as a
:class:`LayoutPlan` and each call only *checks* it, parameter by parameter, with the cheapest
tests that can tell it is stale:

- the same parameter objects in the same order: their ids, and for each the address of the
  tensor it holds now and its class. The plan holds no reference to a parameter, not even a weak
  one (``torch.utils.swap_tensors``, which ``.to()`` uses for DTensor parameters, refuses a tensor
  with a weakref), so a recycled id is told apart by the tensor behind it: a swapped or replaced
  parameter holds another one;
- for each parameter, a grad exactly where there was one, of the same class; for plain grads the
  same dtype and device; for DTensor grads the same ``DTensorSpec`` object (FSDP2 reuses one per
  parameter) or, failing that, the same mesh, placements, dtype and device;
- no ``mark_sharded``/``mark_replicated`` made since (a version counter in ``marks.Marks``).

Anything else (grads set to None, parameters added, frozen or re-wrapped, another mesh, dtype or
device) fails the check and the layout is discovered anew. These checks are
``LayoutPlan.fresh_grads`` and :class:`GradBatchCheck`. ``grad_norms`` reads the same plans (:meth:`PlanCache.planned`) and keeps
its own view of a plan in it. A plan holds no strong reference to a parameter or a gradient, so it
never keeps a model alive.
"""

from __future__ import annotations

import operator
from collections import OrderedDict
from itertools import compress, repeat
from typing import Any, Callable, NamedTuple, Optional

import torch
from torch import nn

from distclip._dtensor import DTensor, local_of, spec_of, specs_of
from distclip.layout.discovery import (
    CallGroup,
    DTensorRoute,
    FlatRunsRoute,
    FlatShardRoute,
    LocalLayout,
    MarkedRoute,
    PartialRoute,
    ReplicaRoute,
    Route,
    layout_with_routes,
    local_layout,
    routed_tensor,
)
from distclip.layout.marks import Marks
from distclip.math.partials import Coalescer, may_be_views
from distclip.math.per_tensor import taker


class LayoutPlan:
    """One parameter list's layout, kept from the discovery that built it: per parameter its route
    (``layout.Route``: how its local tensor is found, what it weighs), the group it joins (its
    index in ``keys``, whose (device, dtype) its grad must still have), its grad's class and, for
    a DTensor grad, its spec; plus the agreement kinds (computed once per plan, not per call).

    Building a plan adds only C-level passes to the discovery it comes from (and one short
    comprehension for DTensor grads' specs; a DTensor grad's mesh and placements, which hash and
    compare in Python, are read only where a later grad's spec is another object), so the call
    that builds it costs little more than a first call."""

    def __init__(self, params: list[torch.Tensor], module: Optional[nn.Module], stage: CallGroup, entries: bool = False) -> None:
        layout = layout_with_routes(params, module, stage, entries)
        self.tensor_kinds = layout.tensor_kinds
        self.keys: list[tuple] = list(layout.groups)
        group_index = {id(members): i for i, members in enumerate(layout.groups.values())}
        self.routes: list[Optional[Route]] = layout.routes
        self.group_of: list[Optional[int]] = list(map(group_index.get, map(id, layout.joined)))  # None: no group
        grads = layout.grads
        # What tells the plan is stale before its grads' dtypes, devices and specs are checked
        self.identity = identity_of(params)
        self.marks_version = Marks.version
        self.grad_types = list(map(type, grads))  # NoneType where there is no grad
        classes = set(map(type, self.routes))
        # The spec of each DTensor grad (None elsewhere): FSDP2 keeps one per parameter, so a
        # later grad's spec is compared by identity first.
        self.specs: list = specs_of(grads) if DTensorRoute in classes or PartialRoute in classes else []
        # What a Partial grad's local tensor was (it joins no group) and where FSDP1 runs go, by
        # parameter index (looked for only where the routes' classes say there are some).
        self.route_facts: dict[int, tuple] = {}
        if PartialRoute in classes or FlatRunsRoute in classes:
            group_at = self.keys.index
            names = iter(layout.partial_names or [""] * len(layout.partial))  # in index order, as discovery lists them
            for index, (route, grad) in enumerate(zip(self.routes, grads)):
                if isinstance(route, PartialRoute):
                    assert grad is not None  # it has a route
                    self.route_facts[index] = (local_of(grad).device, grad.dtype, next(names))
                elif isinstance(route, FlatRunsRoute):
                    assert grad is not None
                    runs = route.runs
                    self.route_facts[index] = tuple((group_at((grad.device, grad.dtype, weight)), start, stop) for start, stop, weight in runs)
        self.batches = _batches(self.routes, classes, self.group_of, self.keys, self.specs)
        self.built: Optional[LocalLayout] = layout  # the discovery's own result serves the call that built the plan
        self.result_mesh = layout.result_mesh  # the grads' specs are checked on every call, and so their meshes
        self.coalescers: Optional[dict[tuple, Coalescer]] = None  # see ``with_coalescers``
        self.valid = layout.plannable  # conj or sparse grads stand in their groups as views: found anew each call
        # ``grad_norms``' view of this plan (``observe.grad_norms.NormsPlan``), built on its first use
        self.norms: Optional[object] = None

    def fresh_grads(self, params: list[torch.Tensor]) -> Optional[list]:
        """This call's grads of ``params`` if no mark was made since, the same tensors are behind
        the parameters' ids and every grad is of the class it was (else None: the plan is stale);
        then :class:`GradBatchCheck` tells, per batch of grads, another dtype, device or spec."""
        if Marks.version != self.marks_version or identity_of(params) != self.identity:
            return None
        grads = list(map(_grad, params))
        return grads if list(map(type, grads)) == self.grad_types else None

    def with_coalescers(self, layout: LocalLayout) -> LocalLayout:
        """``layout`` given the plan's :class:`~distclip.math.partials.Coalescer` of each group that
        holds views of one buffer (found on the plan's first use; the other groups hold separate
        tensors and skip coalescing)."""
        if self.coalescers is None:
            self.coalescers = {key: Coalescer() for key, ts in layout.groups.items() if may_be_views(ts)}
        layout.coalescers = self.coalescers
        return layout

    def apply(self, params: list[torch.Tensor]) -> Optional[LocalLayout]:
        """This call's layout if the plan still holds, else None (discover it anew)."""
        if not self.valid:
            return None
        if self.built is not None and Marks.version == self.marks_version:
            layout, self.built = self.built, None
            return layout
        grads = self.fresh_grads(params)
        if grads is None:
            return None
        if self.batches is not None:
            batched = self._apply_batches(grads)
            if batched is not None:
                return batched
        return self._apply_each(grads)

    def _apply_batches(self, grads: list) -> Optional[LocalLayout]:
        """The common case (plain and DTensor grads only), checked a batch at a time with C-level
        ``map`` calls instead of Python per parameter (a fraction of ``_apply_each``'s cost). None
        if a DTensor's spec is another object (``_apply_each`` compares its structure)."""
        assert self.batches is not None
        lists: list[list[torch.Tensor]] = [[] for _ in self.keys]
        for group, check in self.batches:
            tensors = check.take(grads)
            if not check.holds(tensors):
                return None
            lists[group] = list(tensors) if check.specs is None else list(map(local_of, tensors))
        return LocalLayout(dict(zip(self.keys, lists)), self.tensor_kinds, [], result_mesh=self.result_mesh)

    def _apply_each(self, grads: list) -> Optional[LocalLayout]:
        """The plan checked parameter by parameter (any route, and DTensor specs by structure);
        ``grads`` are of the plan's classes (``apply`` checked)."""
        keys, route_facts, specs = self.keys, self.route_facts, self.specs
        lists: list[list[torch.Tensor]] = [[] for _ in keys]
        partial: list[tuple[DTensor, float]] = []
        partial_names: list[str] = []
        routes: list[Any] = self.routes  # told apart by class below, which mypy does not follow
        group_of: list[Any] = self.group_of  # an int wherever the route joins a group
        for index, (grad, route, group) in enumerate(zip(grads, routes, group_of)):
            if route is None:  # no grad, then and now
                continue
            kind = route.__class__
            if kind is DTensorRoute:
                spec, old = spec_of(grad), specs[index]
                device, dtype, _ = keys[group]
                if spec is not old and _structure(spec, grad) != _structure_of(old, dtype, device):
                    return None
                lists[group].append(local_of(grad))
            elif kind is PartialRoute:
                spec, old = spec_of(grad), specs[index]
                device, dtype, name = route_facts[index]
                if spec is not old and _structure(spec, grad) != _structure_of(old, dtype, device):
                    return None
                partial.append((grad, route.weight))  # a DTensor, as checked
                partial_names.append(name)
            elif kind is FlatRunsRoute:
                runs = route_facts[index]
                if grad.dtype != keys[runs[0][0]][1] or grad.device != keys[runs[0][0]][0]:
                    return None
                for run_group, start, stop in runs:
                    lists[run_group].append(grad[start:stop])
            else:  # ReplicaRoute, MarkedRoute, FlatShardRoute
                device, dtype, _ = keys[group]
                if grad.dtype != dtype or grad.device != device:
                    return None
                lists[group].append(routed_tensor(route, grad))
        return LocalLayout(dict(zip(self.keys, lists)), self.tensor_kinds, partial, partial_names=partial_names,
                           result_mesh=self.result_mesh)


_grad = operator.attrgetter("grad")
_cdata = operator.attrgetter("_cdata")
_dtype = operator.attrgetter("dtype")
_get_device = torch.Tensor.get_device


def identity_of(params: list[torch.Tensor]) -> list[int]:
    """What tells the same parameter objects from new ones at recycled ids, without holding them:
    the address of the tensor each holds (another after a swap, a replacement or a free; a recycled
    id behind which the same address comes back is another model built alike, whose grads' classes,
    dtypes, devices and specs the plan checks too)."""
    return list(map(_cdata, params))


class GradBatchCheck(NamedTuple):
    """Grads a plan saw, all plain or all DTensor, picked from the call's grads at once: what a
    later call's grads at the same positions must still be (C-level ``map`` passes, no Python
    step per grad)."""

    take: Callable[[list], tuple]  # the batch's grads, in parameter order, from all grads
    dtype: Optional[torch.dtype]  # plain grads: the dtype and device each must still have
    device: Optional[torch.device]
    device_index: int  # ``Tensor.get_device()`` of that device (-1 on CPU)
    specs: Optional[tuple]  # DTensor grads: the spec object each had (FSDP2 keeps one per parameter)

    @staticmethod
    def plain(idx: list[int], dtype: torch.dtype, device: torch.device) -> GradBatchCheck:
        return GradBatchCheck(taker(idx), dtype, device, _index(device), None)

    @staticmethod
    def dtensor(idx: list[int], specs: tuple) -> GradBatchCheck:
        return GradBatchCheck(taker(idx), None, None, -1, specs)

    def holds(self, tensors: tuple) -> bool:
        """Whether ``tensors`` (``take`` of this call's grads) are still as the plan saw them. A
        DTensor spec that is another object fails it (the caller may compare its structure)."""
        if self.specs is not None:
            return all(map(operator.is_, map(spec_of, tensors), self.specs))
        # The device index as an int, not a torch.device object per grad (half the cost); the
        # device type is compared once per batch.
        return (all(map(operator.is_, map(_dtype, tensors), repeat(self.dtype))) and tensors[0].device == self.device
                and all(map(self.device_index.__eq__, map(_get_device, tensors))))


def grad_checks(grads: list) -> list[GradBatchCheck]:
    """The checks of ``grads`` (None where a parameter has none), one batch per (dtype, device) of
    the plain grads and one of every DTensor grad."""
    plain: dict[tuple, list[int]] = {}
    dtensor: list[int] = []
    for i, g in enumerate(grads):
        if g is None:
            continue
        if isinstance(g, DTensor):
            dtensor.append(i)
        else:
            plain.setdefault((g.dtype, g.device), []).append(i)
    checks = [GradBatchCheck.plain(idx, dtype, device) for (dtype, device), idx in plain.items()]
    if dtensor:
        checks.append(GradBatchCheck.dtensor(dtensor, tuple(spec_of(grads[i]) for i in dtensor)))
    return checks


class _Batch(NamedTuple):
    """The grads of one group, all plain or all DTensor, taken from the call's grads at once."""

    group: int  # index of the group in ``LayoutPlan.keys``
    check: GradBatchCheck


_BATCHED = (ReplicaRoute, MarkedRoute, DTensorRoute, FlatShardRoute, type(None))


def _batches(
    routes: list[Optional[Route]], classes: set[type], group_of: list[Optional[int]], keys: list[tuple], specs: list
) -> Optional[list[_Batch]]:
    """Batches for ``LayoutPlan._apply_batches``, or None where that path does not apply (Partial
    grads, padded FSDP1 shards or FSDP1-over-TP runs, or plain and DTensor grads in one group).
    ``classes``: those of ``routes``; ``specs``: each grad's spec where it is a DTensor."""
    if not classes.issubset(_BATCHED) or (FlatShardRoute in classes and any(
            r.padding for r in routes if isinstance(r, FlatShardRoute))):
        return None
    out = []
    joined: set[Any] = set(group_of)
    joined.discard(None)
    for group in sorted(joined):
        idx = list(compress(range(len(group_of)), map(operator.eq, group_of, repeat(group))))  # C-level, once per group
        chosen = tuple(map(routes.__getitem__, idx))
        dtensors = sum(map(DTensorRoute.__instancecheck__, chosen))
        device, dtype, _ = keys[group]
        if dtensors == 0:
            out.append(_Batch(group, GradBatchCheck.plain(idx, dtype, device)))
        elif dtensors == len(idx):
            out.append(_Batch(group, GradBatchCheck.dtensor(idx, tuple(map(specs.__getitem__, idx)))))
        else:
            return None
    return out


def _index(device: torch.device) -> int:
    return -1 if device.index is None or device.type == "cpu" else device.index


def _structure(spec: Any, grad: Any) -> tuple:
    """What a DTensor grad's layout depends on, compared when its spec is another object: the
    placements themselves, not only their types (a Partial's reduce op decides how its grad is
    made whole, and a "max" one must be refused by discovery)."""
    return (spec.mesh, tuple(spec.placements), grad.dtype, local_of(grad).device)


def _structure_of(spec: Any, dtype: torch.dtype, device: torch.device) -> tuple:
    """``_structure`` of the grad a plan saw, from its spec and its local tensor's dtype and device."""
    return (spec.mesh, tuple(spec.placements), dtype, device)


class Planned(NamedTuple):
    """What :meth:`PlanCache.planned` found: the plan, and either this call's grads (a kept plan
    that still holds) or this call's layout, with entries (a plan built now)."""

    plan: LayoutPlan
    grads: Optional[list]
    layout: Optional[LocalLayout]


class PlanCache:
    """The plans of the parameter lists seen recently (at most ``size``), by (stage, parameter ids).

    One instance lives in ``distclip.clip``. A plan names parameters by id only and is checked
    against the tensors they hold (``identity_of``) before use, so a freed model keeps nothing
    alive and a recycled id never passes; more recent lists push old plans out.
    """

    def __init__(self, size: int = 16) -> None:
        self.size = size
        self.plans: OrderedDict[tuple, LayoutPlan] = OrderedDict()
        # Keys seen once: a plan is built only when a parameter list comes back, so one-off
        # calls (and every first call) cost no more than discovery itself.
        self.seen: OrderedDict[int, None] = OrderedDict()  # hashes of keys: a hint, kept small

    @staticmethod
    def key(params: list[torch.Tensor], stage: CallGroup) -> tuple:
        return (stage, tuple(map(id, params)))

    def drop(self, key: tuple) -> None:
        plan = self.plans.pop(key, None)
        if plan is not None:
            plan.valid = False

    def keep(self, key: tuple, plan: LayoutPlan) -> None:
        self.plans[key] = plan
        while len(self.plans) > self.size:
            self.drop(next(iter(self.plans)))

    def planned(self, params: list[torch.Tensor], module: Optional[nn.Module], stage: CallGroup) -> Planned:
        """The plan of ``params`` for ``grad_norms`` (which keeps its view in ``LayoutPlan.norms``):
        the kept plan and this call's grads where it holds (``fresh_grads``: dtypes, devices and
        specs are the view's to check), else a plan built now, with entries, serving this call."""
        key = self.key(params, stage)
        plan = self.plans.get(key)
        if plan is not None:
            grads = plan.fresh_grads(params) if plan.valid else None
            if grads is not None:
                self.plans.move_to_end(key)
                return Planned(plan, grads, None)
            self.drop(key)
        plan = LayoutPlan(params, module, stage, entries=True)
        layout, plan.built = plan.built, None  # this call's; a later call checks the plan anew
        if plan.valid:
            self.keep(key, plan)
        return Planned(plan, None, layout)

    def layout(self, params: list[torch.Tensor], module: Optional[nn.Module], stage: CallGroup) -> LocalLayout:
        """This call's layout: from the plan of ``params`` when it still holds, else discovered
        (and planned) anew."""
        key = self.key(params, stage)
        plan = self.plans.get(key)
        if plan is not None:
            found = plan.apply(params)
            if found is not None:
                self.plans.move_to_end(key)
                return plan.with_coalescers(found)
            self.drop(key)
        elif hash(key) not in self.seen:
            self.seen[hash(key)] = None
            while len(self.seen) > 4 * self.size:
                self.seen.popitem(last=False)
            return local_layout(params, module, stage)
        plan = LayoutPlan(params, module, stage)
        if not plan.valid:  # a layout no plan can serve again: this call's discovery, kept nowhere
            assert plan.built is not None
            return plan.built
        self.keep(key, plan)
        found = plan.apply(params)
        assert found is not None
        return plan.with_coalescers(found)
