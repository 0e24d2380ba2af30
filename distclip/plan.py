"""Layout plans: what layout discovery found for one parameter list, reused across calls.

Discovering a layout costs a few microseconds of Python per parameter (which wrapper, which mesh,
which weight, which kinds for the agreement check); with thousands of parameters that is more
than the math. Between two training steps almost nothing changes, so the answer is kept as a
:class:`LayoutPlan` and each call only *checks* it, parameter by parameter, with the cheapest
tests that can tell it is stale:

- the same parameter objects in the same order (their ids; a parameter that dies invalidates
  every plan that names it, through a weakref callback, so a recycled id is never trusted);
- for each parameter, a grad exactly where there was one, of the same class; for plain grads the
  same dtype and device; for DTensor grads the same ``DTensorSpec`` object (FSDP2 reuses one per
  parameter) or, failing that, the same mesh, placement types and dtype;
- no ``mark_sharded``/``mark_replicated`` made since (a version counter in ``layout.Marks``).

Anything else (grads set to None, parameters added, frozen or re-wrapped, another mesh, dtype or
device) fails the check and the layout is discovered anew. The plan holds no strong reference to
a parameter or a gradient, so it never keeps a model alive.
"""

from __future__ import annotations

import operator
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from itertools import repeat
from typing import Any, Callable, NamedTuple, Optional, Union

import torch
from torch import nn

from distclip._dtensor import DTensor, local_of, spec_of
from distclip.layout import (
    DTensorRoute,
    FlatRunsRoute,
    FlatShardRoute,
    LocalLayout,
    Marks,
    PartialRoute,
    Stage,
    local_layout,
)
from distclip.local_norms import Coalescer, may_be_views


class Structure(NamedTuple):
    """What a DTensor grad's layout depends on, compared when its spec is another object. The
    placements themselves, not only their types: a Partial's reduce op decides how its grad is
    made whole (and a "max" one must be refused by discovery)."""

    mesh: Any
    placements: tuple
    dtype: torch.dtype
    device: torch.device  # of the local tensor


# How a plan finds one parameter's local tensor(s) in a later call, and what it checks first. Each
# is made from the route discovery gave the parameter (``layout.Route``); ``slot`` is the index of
# a group in ``LayoutPlan.keys``. Classes with slots, not tuples: ``LayoutPlan._apply_each`` reads
# their fields once per parameter per call, and a slot is the fastest field Python reads.


@dataclass(slots=True)
class PlainStep:
    """The grad itself (``ReplicaRoute``, ``MarkedRoute``, an FSDP1 view without padding): still
    of the same class, dtype and device."""

    slot: int
    cls: type
    dtype: torch.dtype
    device: torch.device


@dataclass(slots=True)
class PaddedStep:
    """A padded FSDP1 flat shard (``FlatShardRoute``): checked as ``PlainStep``, measured without
    its padding (static for the FlatParameter)."""

    slot: int
    cls: type
    dtype: torch.dtype
    device: torch.device
    padding: int


@dataclass(slots=True)
class RunsStep:
    """FSDP1 over TP (``FlatRunsRoute``): a flat shard measured in runs, static as the padding."""

    runs: tuple[tuple[int, int, int], ...]  # (slot, start, stop)
    cls: type
    dtype: torch.dtype
    device: torch.device


@dataclass(slots=True)
class DTensorStep:
    """A DTensor grad's local tensor (``DTensorRoute``): the same spec object (FSDP2 reuses one
    per parameter) or, failing that, the same structure."""

    slot: int
    spec: Any
    structure: Structure


@dataclass(slots=True)
class PartialStep:
    """A ``Partial`` DTensor grad (``PartialRoute``): checked as ``DTensorStep``, made whole
    before it is measured, under ``weight``."""

    weight: float
    spec: Any
    structure: Structure


Step = Union[PlainStep, PaddedStep, RunsStep, DTensorStep, PartialStep]


class LayoutPlan:
    """One parameter list's layout: per parameter, how to get its local tensor and which group
    it joins (``routes``), plus the agreement kinds (computed once per plan, not per call)."""

    def __init__(self, params: list[torch.Tensor], module: Optional[nn.Module], stage: Stage, cache: PlanCache) -> None:
        layout = local_layout(params, module, stage, track=True)
        self.kinds = layout.kinds
        self.keys: list[tuple] = list(layout.groups)
        slot = {key: i for i, key in enumerate(self.keys)}
        # One structure object per distinct structure: a plan holding thousands of tuples per
        # parameter more would bring Python's full garbage collection forward into a later call.
        structures: dict[tuple, Structure] = {}
        of_spec: dict[int, Structure] = {}  # by spec id: FSDP2 shares specs, and a mesh hashes in Python
        self.routes: list[Optional[Step]] = [None] * len(params)
        for index, (route, p) in enumerate(zip(layout.routes, params)):
            if route is not None:
                self.routes[index] = _step(route, p.grad, slot, structures, of_spec)
        self.grad_types = [type(p.grad) for p in params]  # NoneType where there is no grad
        self.batches = _batches(self.routes)
        self.first: Optional[LocalLayout] = layout  # the discovery's own result serves the call that built the plan
        self.marks_version = Marks.version
        self.coalescers: Optional[dict[tuple, Coalescer]] = None  # see ``with_coalescers``
        self.valid = True
        key = cache.key(params, stage)
        self._forget = lambda _ref, key=key, cache=cache: cache.drop(key)
        self._refs = [weakref.ref(p, self._forget) for p in params]

    def with_coalescers(self, layout: LocalLayout) -> LocalLayout:
        """``layout`` given the plan's :class:`~distclip.local_norms.Coalescer` of each group that
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
        if self.batches is not None:
            grads = list(map(_grad, params))
            if list(map(type, grads)) != self.grad_types:  # a grad gone, new, or of another class
                return None
            batched = self._apply_batches(grads)
            if batched is not None:
                return batched
        return self._apply_each(params)

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
        return LocalLayout(dict(zip(self.keys, lists)), self.kinds, [])

    def _apply_each(self, params: list[torch.Tensor]) -> Optional[LocalLayout]:
        """The plan checked parameter by parameter (any step, and DTensor specs by structure)."""
        lists: list[list[torch.Tensor]] = [[] for _ in self.keys]
        partial: list[tuple[DTensor, float]] = []
        plain_step, dtensor_step, partial_step, padded_step = PlainStep, DTensorStep, PartialStep, PaddedStep
        steps: list[Any] = self.routes  # told apart by class below, which mypy does not follow
        try:
            for p, step in zip(params, steps):
                grad: Any = p.grad
                if step is None:
                    if grad is not None:
                        return None
                    continue
                kind = step.__class__
                # A None grad, or a plain one where a DTensor was, fails ``spec_of``
                # (AttributeError, below); a None grad fails the class checks.
                if kind is dtensor_step:
                    spec = spec_of(grad)
                    if spec is not step.spec and _structure(spec, grad) != step.structure:
                        return None
                    lists[step.slot].append(local_of(grad))
                elif kind is plain_step:
                    if grad.__class__ is not step.cls or grad.dtype != step.dtype or grad.device != step.device:
                        return None
                    lists[step.slot].append(grad)
                elif kind is partial_step:
                    spec = spec_of(grad)
                    if spec is not step.spec and _structure(spec, grad) != step.structure:
                        return None
                    partial.append((grad, step.weight))  # a DTensor, as checked
                elif kind is padded_step:
                    if grad.__class__ is not step.cls or grad.dtype != step.dtype or grad.device != step.device:
                        return None
                    lists[step.slot].append(grad[: grad.numel() - step.padding])
                else:  # RunsStep
                    if grad.__class__ is not step.cls or grad.dtype != step.dtype or grad.device != step.device:
                        return None
                    for run_slot, start, stop in step.runs:
                        lists[run_slot].append(grad[start:stop])
        except AttributeError:  # a grad gone (None) or no longer a DTensor
            return None
        return LocalLayout(dict(zip(self.keys, lists)), self.kinds, partial)


def _step(route: Any, grad: Any, slot: dict[tuple, int], structures: dict[tuple, Structure], of_spec: dict[int, Structure]) -> Step:
    """The plan's step for one parameter, from the route (a ``layout.Route``) discovery gave it."""
    kind = route.__class__
    if kind is DTensorRoute or kind is PartialRoute:
        spec = route.spec
        structure = of_spec.get(id(spec))
        if structure is None:
            found = _structure(spec, grad)
            structure = structures.get(found)
            if structure is None:
                structure = structures[found] = Structure(*found)
            of_spec[id(spec)] = structure
        if kind is PartialRoute:
            return PartialStep(route.weight, spec, structure)
        return DTensorStep(slot[(grad.device, grad.dtype, route.weight)], spec, structure)
    if kind is FlatRunsRoute:
        runs = tuple((slot[(grad.device, grad.dtype, weight)], start, stop) for start, stop, weight in route.runs)
        return RunsStep(runs, type(grad), grad.dtype, grad.device)
    where = slot[(grad.device, grad.dtype, route.weight)]
    if kind is FlatShardRoute and route.padding:
        return PaddedStep(where, type(grad), grad.dtype, grad.device, route.padding)
    return PlainStep(where, type(grad), grad.dtype, grad.device)


_grad = operator.attrgetter("grad")
_dtype = operator.attrgetter("dtype")
_get_device = torch.Tensor.get_device


class _Batch(NamedTuple):
    """The grads of one group, all plain or all DTensor, taken from the call's grads at once."""

    slot: int  # index of the group in ``LayoutPlan.keys``
    take: Callable[[list], tuple]  # the group's grads, in parameter order
    dtype: torch.dtype  # plain grads: the dtype and device every one must still have
    device: torch.device
    device_index: int  # ``Tensor.get_device()`` of that device (-1 on CPU)
    specs: Optional[tuple]  # DTensor grads: the spec object each had


def _batches(steps: list[Optional[Step]]) -> Optional[list[_Batch]]:
    """Batches for ``LayoutPlan._apply_batches``, or None where that path does not apply (Partial
    grads, padded FSDP1 shards or FSDP1-over-TP runs, or plain and DTensor grads in one group)."""
    members: dict[int, list[int]] = {}
    for i, step in enumerate(steps):
        if step is None:
            continue
        if not isinstance(step, (PlainStep, DTensorStep)):
            return None
        members.setdefault(step.slot, []).append(i)
    out = []
    for slot, idx in members.items():
        chosen = [steps[i] for i in idx]
        take = operator.itemgetter(*idx) if len(idx) > 1 else (lambda grads, i=idx[0]: (grads[i],))
        if all(isinstance(step, PlainStep) for step in chosen):
            first = chosen[0]
            assert isinstance(first, PlainStep)
            out.append(_Batch(slot, take, first.dtype, first.device, _index(first.device), None))
        elif all(isinstance(step, DTensorStep) for step in chosen):
            dsteps = [step for step in chosen if isinstance(step, DTensorStep)]
            structure = dsteps[0].structure  # the dtype of the grads and the device of their local tensors
            out.append(_Batch(slot, take, structure.dtype, structure.device, _index(structure.device), tuple(s.spec for s in dsteps)))
        else:
            return None
    return out


def _index(device: torch.device) -> int:
    return -1 if device.index is None or device.type == "cpu" else device.index


def _structure(spec: Any, grad: Any) -> tuple:
    """A DTensor grad's ``Structure``, as a plain tuple (equal to one)."""
    return (spec.mesh, tuple(spec.placements), grad.dtype, local_of(grad).device)


class PlanCache:
    """The plans of the parameter lists seen recently (at most ``size``), by (stage, parameter ids).

    One instance lives in ``distclip.clip``; entries leave when any of their parameters dies, or
    when more recent lists push them out.
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
        plan = LayoutPlan(params, module, stage, self)
        self.plans[key] = plan
        while len(self.plans) > self.size:
            self.drop(next(iter(self.plans)))
        found = plan.apply(params)
        assert found is not None
        return plan.with_coalescers(found)
