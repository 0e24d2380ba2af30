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

import weakref
from collections import OrderedDict
from typing import Optional, cast

import torch
from torch import nn

from distclip.layout import DTensor, LocalLayout, Marks, Stage, local_layout

_PLAIN, _DTENSOR, _PARTIAL, _PADDED = range(4)


class LayoutPlan:
    """One parameter list's layout: per parameter, how to get its local tensor and which group
    it joins, plus the agreement kinds (computed once per plan, not per call)."""

    def __init__(self, params: list[torch.Tensor], module: Optional[nn.Module], stage: Stage, cache: PlanCache) -> None:
        layout = local_layout(params, module, stage, track=True)
        self.kinds = layout.kinds
        self.keys: list[tuple] = list(layout.groups)
        slot = {key: i for i, key in enumerate(self.keys)}
        self.routes: list[Optional[tuple]] = [None] * len(params)
        for entry in layout.entries:
            grad = params[entry.index].grad
            assert grad is not None  # an entry is made only for a parameter with a grad
            if entry.partial:
                partial_grad = cast(DTensor, grad)  # only a DTensor grad is partial
                spec = partial_grad._spec  # DTensor internals, as in ``layout.local_layout``
                self.routes[entry.index] = (_PARTIAL, entry.weight, spec, _structure(spec, partial_grad))
            elif isinstance(grad, DTensor):
                key = (entry.tensor.device, entry.tensor.dtype, entry.weight)
                spec = grad._spec
                self.routes[entry.index] = (_DTENSOR, slot[key], spec, _structure(spec, grad))
            else:
                key = (entry.tensor.device, entry.tensor.dtype, entry.weight)
                kind = _PLAIN if entry.tensor is grad else _PADDED
                self.routes[entry.index] = (kind, slot[key], type(grad), grad.dtype, grad.device, grad.numel() - entry.tensor.numel())
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
        lists: list[list[torch.Tensor]] = [[] for _ in self.keys]
        partial: list[tuple[DTensor, float]] = []
        dtensor, plain, partial_kind = _DTENSOR, _PLAIN, _PARTIAL
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
                else:  # a padded FSDP1 flat shard: the padding is static
                    fgrad: torch.Tensor = grad  # type: ignore[assignment]  # as above
                    if fgrad.__class__ is not route[2] or fgrad.dtype != route[3] or fgrad.device != route[4]:
                        return None
                    lists[route[1]].append(fgrad[: fgrad.numel() - route[5]] if route[5] else fgrad)
        except AttributeError:  # a grad gone (None) or no longer a DTensor
            return None
        return LocalLayout(dict(zip(self.keys, lists)), self.kinds, partial)


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
