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
from itertools import repeat
from typing import Callable, NamedTuple, Optional, cast

import torch
from torch import nn

from distclip.layout import DTensor, LocalLayout, Marks, Stage, local_layout

_PLAIN, _DTENSOR, _PARTIAL, _PADDED, _RUNS = range(5)


class LayoutPlan:
    """One parameter list's layout: per parameter, how to get its local tensor and which group
    it joins, plus the agreement kinds (computed once per plan, not per call)."""

    def __init__(self, params: list[torch.Tensor], module: Optional[nn.Module], stage: Stage, cache: PlanCache) -> None:
        layout = local_layout(params, module, stage, track=True)
        self.kinds = layout.kinds
        self.keys: list[tuple] = list(layout.groups)
        slot = {key: i for i, key in enumerate(self.keys)}
        # One tuple per distinct structure: thousands of retained tuples would bring Python's full
        # garbage collection forward into this call (measured: a 180 ms pause at 4000 TP grads).
        structures: dict[tuple, tuple] = {}
        self.routes: list[Optional[tuple]] = [None] * len(params)
        for entry in layout.entries:
            grad = params[entry.index].grad
            assert grad is not None  # an entry is made only for a parameter with a grad
            if entry.partial:
                partial_grad = cast(DTensor, grad)  # only a DTensor grad is partial
                spec = partial_grad._spec  # DTensor internals, as in ``layout.local_layout``
                structure = _structure(spec, partial_grad)
                self.routes[entry.index] = (_PARTIAL, entry.weight, spec, structures.setdefault(structure, structure))
            elif isinstance(grad, DTensor):
                key = (entry.tensor.device, entry.tensor.dtype, entry.weight)
                spec = grad._spec
                structure = _structure(spec, grad)
                self.routes[entry.index] = (_DTENSOR, slot[key], spec, structures.setdefault(structure, structure))
            elif entry.offset is not None:  # FSDP1 over TP: one run of a flat shard, of several
                key = (entry.tensor.device, entry.tensor.dtype, entry.weight)
                run = (slot[key], entry.offset, entry.offset + entry.tensor.numel())
                found = self.routes[entry.index]
                if found is None:
                    self.routes[entry.index] = (_RUNS, (run,), type(grad), grad.dtype, grad.device)
                else:
                    self.routes[entry.index] = found[:1] + (found[1] + (run,),) + found[2:]
            else:
                key = (entry.tensor.device, entry.tensor.dtype, entry.weight)
                kind = _PLAIN if entry.tensor is grad else _PADDED
                self.routes[entry.index] = (kind, slot[key], type(grad), grad.dtype, grad.device, grad.numel() - entry.tensor.numel())
        self.grad_types = [type(p.grad) for p in params]  # NoneType where there is no grad
        self.batches = _batches(self.routes)
        self.first: Optional[LocalLayout] = layout  # the discovery's own result serves the call that built the plan
        self.marks_version = Marks.version
        self.valid = True
        key = cache.key(params, stage)
        self._forget = lambda _ref, key=key, cache=cache: cache.drop(key)
        self._refs = [weakref.ref(p, self._forget) for p in params]

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
        ``map`` calls instead of Python per parameter (4 000 grads: ~1 ms instead of ~3 ms). None
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
                if not all(map(operator.is_, map(_spec, tensors), batch.specs)):
                    return None
                lists[batch.slot] = list(map(_local_tensor, tensors))
        return LocalLayout(dict(zip(self.keys, lists)), self.kinds, [])

    def _apply_each(self, params: list[torch.Tensor]) -> Optional[LocalLayout]:
        """The plan checked parameter by parameter (any route, and DTensor specs by structure)."""
        lists: list[list[torch.Tensor]] = [[] for _ in self.keys]
        partial: list[tuple[DTensor, float]] = []
        dtensor, plain, partial_kind, padded = _DTENSOR, _PLAIN, _PARTIAL, _PADDED
        try:
            for p, route in zip(params, self.routes):
                grad = p.grad
                if route is None:
                    if grad is not None:
                        return None
                    continue
                kind = route[0]
                if kind == dtensor:
                    # Made for a DTensor grad; a None or plain grad fails ``_spec`` (AttributeError,
                    # below). No isinstance or cast call on this per-parameter hot path.
                    dgrad: DTensor = grad  # type: ignore[assignment]
                    spec = dgrad._spec
                    if spec is not route[2] and _structure(spec, dgrad) != route[3]:
                        return None
                    lists[route[1]].append(dgrad._local_tensor)
                elif kind == plain:
                    tgrad: torch.Tensor = grad  # type: ignore[assignment]  # None fails the class check
                    if tgrad.__class__ is not route[2] or tgrad.dtype != route[3] or tgrad.device != route[4]:
                        return None
                    lists[route[1]].append(tgrad)
                elif kind == partial_kind:
                    pgrad: DTensor = grad  # type: ignore[assignment]  # a DTensor, as above
                    spec = pgrad._spec
                    if spec is not route[2] and _structure(spec, pgrad) != route[3]:
                        return None
                    partial.append((pgrad, route[1]))
                elif kind == padded:  # a padded FSDP1 flat shard: the padding is static
                    fgrad: torch.Tensor = grad  # type: ignore[assignment]  # as above
                    if fgrad.__class__ is not route[2] or fgrad.dtype != route[3] or fgrad.device != route[4]:
                        return None
                    lists[route[1]].append(fgrad[: fgrad.numel() - route[5]] if route[5] else fgrad)
                else:  # FSDP1 over TP: a flat shard in runs of (slot, start, stop), static as the padding
                    rgrad: torch.Tensor = grad  # type: ignore[assignment]  # as above
                    if rgrad.__class__ is not route[2] or rgrad.dtype != route[3] or rgrad.device != route[4]:
                        return None
                    for run_slot, start, stop in route[1]:
                        lists[run_slot].append(rgrad[start:stop])
        except AttributeError:  # a grad gone (None) or no longer a DTensor
            return None
        return LocalLayout(dict(zip(self.keys, lists)), self.kinds, partial)


_grad = operator.attrgetter("grad")
_dtype = operator.attrgetter("dtype")
_get_device = torch.Tensor.get_device
_spec = operator.attrgetter("_spec")  # DTensor internals, as in ``layout.local_layout``
_local_tensor = operator.attrgetter("_local_tensor")


class _Batch(NamedTuple):
    """The grads of one group, all plain or all DTensor, taken from the call's grads at once."""

    slot: int  # index of the group in ``LayoutPlan.keys``
    take: Callable[[list], tuple]  # the group's grads, in parameter order
    dtype: torch.dtype  # plain grads: the dtype and device every one must still have
    device: torch.device
    device_index: int  # ``Tensor.get_device()`` of that device (-1 on CPU)
    specs: Optional[tuple]  # DTensor grads: the spec object each had


def _batches(routes: list[Optional[tuple]]) -> Optional[list[_Batch]]:
    """Batches for ``LayoutPlan._apply_batches``, or None where that path does not apply (Partial
    grads, padded FSDP1 shards or FSDP1-over-TP runs, or plain and DTensor grads in one group)."""
    members: dict[int, list[int]] = {}
    for i, route in enumerate(routes):
        if route is None:
            continue
        if route[0] not in (_PLAIN, _DTENSOR):
            return None
        members.setdefault(route[1], []).append(i)
    out = []
    for slot, idx in members.items():
        kinds = {routes[i][0] for i in idx}  # type: ignore[index]
        if len(kinds) > 1:
            return None
        first = routes[idx[0]]
        assert first is not None
        take = operator.itemgetter(*idx) if len(idx) > 1 else (lambda grads, i=idx[0]: (grads[i],))
        if first[0] == _PLAIN:
            out.append(_Batch(slot, take, first[3], first[4], _index(first[4]), None))
        else:
            specs = tuple(routes[i][2] for i in idx)  # type: ignore[index]
            grad_local = first[3][3]  # the device of the local tensor
            out.append(_Batch(slot, take, first[3][2], grad_local, _index(grad_local), specs))
    return out


def _index(device: torch.device) -> int:
    return -1 if device.index is None or device.type == "cpu" else device.index


def _structure(spec, grad: DTensor) -> tuple:
    # The placements themselves, not only their types: a Partial's reduce op decides how its grad
    # is made whole (and a "max" one must be refused by discovery).
    return (spec.mesh, tuple(spec.placements), grad.dtype, grad._local_tensor.device)


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
                return found
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
        return found
