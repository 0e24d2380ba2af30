"""Layout plans: what layout discovery found for one parameter list, reused across calls.

Discovering a layout costs a few microseconds of Python per parameter (which wrapper, which mesh,
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
device) fails the check and the layout is discovered anew. The plan holds no strong reference to
a parameter or a gradient, so it never keeps a model alive.
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
    DTensorRoute,
    FlatRunsRoute,
    FlatShardRoute,
    LocalLayout,
    MarkedRoute,
    PartialRoute,
    ReplicaRoute,
    Route,
    Stage,
    local_layout,
)
from distclip.layout.marks import Marks
from distclip.math.partials import Coalescer, may_be_views


class LayoutPlan:
    """One parameter list's layout, kept from the discovery that built it: per parameter its route
    (``layout.Route``: how its local tensor is found, what it weighs), the group it joins (its
    index in ``keys``, whose (device, dtype) its grad must still have), its grad's class and, for
    a DTensor grad, its spec; plus the agreement kinds (computed once per plan, not per call).

    Building a plan adds only C-level passes to the discovery it comes from (and one short
    comprehension for DTensor grads' specs; a DTensor grad's mesh and placements, which hash and
    compare in Python, are read only where a later grad's spec is another object), so the call
    that builds it costs little more than a first call."""

    def __init__(self, params: list[torch.Tensor], module: Optional[nn.Module], stage: Stage) -> None:
        layout = local_layout(params, module, stage, routes=True)
        self.kinds = layout.kinds
        self.keys: list[tuple] = list(layout.groups)
        slot_of = {id(members): slot for slot, members in enumerate(layout.groups.values())}
        self.routes: list[Optional[Route]] = layout.routes
        self.slots: list[Optional[int]] = list(map(slot_of.get, map(id, layout.joins)))  # None: no group
        grads = layout.grads
        self.grad_types = list(map(type, grads))  # NoneType where there is no grad
        classes = set(map(type, self.routes))
        # The spec of each DTensor grad (None elsewhere): FSDP2 keeps one per parameter, so a
        # later grad's spec is compared by identity first.
        self.specs: list = specs_of(grads) if DTensorRoute in classes or PartialRoute in classes else []
        # What a Partial grad's local tensor was (it joins no group) and where FSDP1 runs go, by
        # parameter index (looked for only where the routes' classes say there are some).
        self.extra: dict[int, tuple] = {}
        if PartialRoute in classes or FlatRunsRoute in classes:
            slot = self.keys.index
            names = iter(layout.partial_names or [""] * len(layout.partial))  # in index order, as discovery lists them
            for index, (route, grad) in enumerate(zip(self.routes, grads)):
                if isinstance(route, PartialRoute):
                    assert grad is not None  # it has a route
                    self.extra[index] = (local_of(grad).device, grad.dtype, next(names))
                elif isinstance(route, FlatRunsRoute):
                    assert grad is not None
                    self.extra[index] = tuple((slot((grad.device, grad.dtype, weight)), start, stop) for start, stop, weight in route.runs)
        self.batches = _batches(self.routes, classes, self.slots, self.keys, self.specs)
        self.first: Optional[LocalLayout] = layout  # the discovery's own result serves the call that built the plan
        self.result_mesh = layout.result_mesh  # the grads' specs are checked on every call, and so their meshes
        self.marks_version = Marks.version
        self.coalescers: Optional[dict[tuple, Coalescer]] = None  # see ``with_coalescers``
        self.valid = layout.plannable  # conj or sparse grads stand in their groups as views: found anew each call
        self.identity = identity_of(params)

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
        if not self.valid or Marks.version != self.marks_version:
            return None
        if self.first is not None:
            layout, self.first = self.first, None
            return layout
        if identity_of(params) != self.identity:
            return None
        grads = list(map(_grad, params))
        if list(map(type, grads)) != self.grad_types:  # a grad gone, new, or of another class
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
        for batch in self.batches:
            tensors = batch.take(grads)
            if batch.specs is None:
                if not all(map(operator.is_, map(_dtype, tensors), repeat(batch.dtype))):
                    return None
                # The device index (-1 on CPU) as an int, not a torch.device object per grad:
                # half the cost; the device type is compared once per batch.
                if tensors[0].device != batch.device or not all(map(batch.device_index.__eq__, map(_get_device, tensors))):
                    return None
                lists[batch.slot] = list(tensors)
            else:
                if not all(map(operator.is_, map(spec_of, tensors), batch.specs)):
                    return None
                lists[batch.slot] = list(map(local_of, tensors))
        return LocalLayout(dict(zip(self.keys, lists)), self.kinds, [], result_mesh=self.result_mesh)

    def _apply_each(self, grads: list) -> Optional[LocalLayout]:
        """The plan checked parameter by parameter (any route, and DTensor specs by structure);
        ``grads`` are of the plan's classes (``apply`` checked)."""
        keys, extra, specs = self.keys, self.extra, self.specs
        lists: list[list[torch.Tensor]] = [[] for _ in keys]
        partial: list[tuple[DTensor, float]] = []
        partial_names: list[str] = []
        routes: list[Any] = self.routes  # told apart by class below, which mypy does not follow
        slots: list[Any] = self.slots  # an int wherever the route joins a group
        for index, (grad, route, slot) in enumerate(zip(grads, routes, slots)):
            if route is None:  # no grad, then and now
                continue
            kind = route.__class__
            if kind is DTensorRoute:
                spec, old = spec_of(grad), specs[index]
                device, dtype, _ = keys[slot]
                if spec is not old and _structure(spec, grad) != _structure_of(old, dtype, device):
                    return None
                lists[slot].append(local_of(grad))
            elif kind is PartialRoute:
                spec, old = spec_of(grad), specs[index]
                device, dtype, name = extra[index]
                if spec is not old and _structure(spec, grad) != _structure_of(old, dtype, device):
                    return None
                partial.append((grad, route.weight))  # a DTensor, as checked
                partial_names.append(name)
            elif kind is FlatRunsRoute:
                runs = extra[index]
                if grad.dtype != keys[runs[0][0]][1] or grad.device != keys[runs[0][0]][0]:
                    return None
                for run_slot, start, stop in runs:
                    lists[run_slot].append(grad[start:stop])
            else:  # the grad itself: ReplicaRoute, MarkedRoute, FlatShardRoute (less its padding)
                device, dtype, _ = keys[slot]
                if grad.dtype != dtype or grad.device != device:
                    return None
                padding = route.padding if kind is FlatShardRoute else 0
                lists[slot].append(grad[: grad.numel() - padding] if padding else grad)
        return LocalLayout(dict(zip(self.keys, lists)), self.kinds, partial, partial_names=partial_names,
                           result_mesh=self.result_mesh)


_grad = operator.attrgetter("grad")
_cdata = operator.attrgetter("_cdata")


def identity_of(params: list[torch.Tensor]) -> list[int]:
    """What tells the same parameter objects from new ones at recycled ids, without holding them:
    the address of the tensor each holds (another after a swap, a replacement or a free; a recycled
    id behind which the same address comes back is another model built alike, whose grads' classes,
    dtypes, devices and specs the plan checks too)."""
    return list(map(_cdata, params))
_dtype = operator.attrgetter("dtype")
_get_device = torch.Tensor.get_device


class _Batch(NamedTuple):
    """The grads of one group, all plain or all DTensor, taken from the call's grads at once."""

    slot: int  # index of the group in ``LayoutPlan.keys``
    take: Callable[[list], tuple]  # the group's grads, in parameter order
    dtype: torch.dtype  # the dtype and device every grad (DTensor: every local tensor) must still have
    device: torch.device
    device_index: int  # ``Tensor.get_device()`` of that device (-1 on CPU)
    specs: Optional[tuple]  # DTensor grads: the spec object each had


_BATCHED = (ReplicaRoute, MarkedRoute, DTensorRoute, FlatShardRoute, type(None))


def _batches(
    routes: list[Optional[Route]], classes: set[type], slots: list[Optional[int]], keys: list[tuple], specs: list
) -> Optional[list[_Batch]]:
    """Batches for ``LayoutPlan._apply_batches``, or None where that path does not apply (Partial
    grads, padded FSDP1 shards or FSDP1-over-TP runs, or plain and DTensor grads in one group).
    ``classes``: those of ``routes``; ``specs``: each grad's spec where it is a DTensor."""
    if not classes.issubset(_BATCHED) or (FlatShardRoute in classes and any(
            r.padding for r in routes if isinstance(r, FlatShardRoute))):
        return None
    out = []
    joined: set[Any] = set(slots)
    joined.discard(None)
    for slot in sorted(joined):
        idx = list(compress(range(len(slots)), map(operator.eq, slots, repeat(slot))))  # C-level, once per group
        take = operator.itemgetter(*idx) if len(idx) > 1 else (lambda grads, i=idx[0]: (grads[i],))
        chosen = tuple(map(routes.__getitem__, idx))
        dtensors = sum(map(DTensorRoute.__instancecheck__, chosen))
        device, dtype, _ = keys[slot]
        if dtensors == 0:
            out.append(_Batch(slot, take, dtype, device, _index(device), None))
        elif dtensors == len(idx):
            out.append(_Batch(slot, take, dtype, device, _index(device), tuple(take(specs))))
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
    def key(params: list[torch.Tensor], stage: Stage) -> tuple:
        return (stage, tuple(map(id, params)))

    def drop(self, key: tuple) -> None:
        plan = self.plans.pop(key, None)
        if plan is not None:
            plan.valid = False

    def layout(self, params: list[torch.Tensor], module: Optional[nn.Module], stage: Stage) -> LocalLayout:
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
            assert plan.first is not None
            return plan.first
        self.plans[key] = plan
        while len(self.plans) > self.size:
            self.drop(next(iter(self.plans)))
        found = plan.apply(params)
        assert found is not None
        return plan.with_coalescers(found)
