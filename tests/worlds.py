"""Hand-built layouts checked inside one multi-rank world (see test_layouts.py).

Every rank builds the same full gradients from a fixed seed, cuts out its local part according to
the layout, calls distclip, and checks: the norm against a float64 reference over the full
gradients, the local clipped grads against ``local * coef_reference``, and that every rank
returned the same bits. Each case returns records instead of raising, so one world reports all.

``CASES`` is the package's registry ``distclip.verify.layouts.HAND_BUILT``
(``LayoutBuilder(name, build, allowed, tags)``, the shape of ``distclip.verify.Scenario``), shared
with the benchmarks; ``WORLD_CHECKS`` the checks of a whole world beside them. The reference norm,
"the same on every rank" and the collective counter live in ``checks.py``.
"""

from __future__ import annotations

import math
import os
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.placement_types import Partial

import distclip
from checks import count_collectives, f64, reference_norm, same_on_every_rank
from distclip.verify.layouts import (  # noqa: F401 - re-exported for the tests that build their own layouts
    HAND_BUILT,
    HAND_BUILT_NAMES,
    Layout,
    LayoutBuilder,
    dparam,
    full_grad,
    local_of,
    pparam,
    sharded_piece,
)

NORMS = (1.0, 2.0, 3.0, math.inf, -math.inf, 0.0, 0.5, -2.0)


# The layouts themselves are the package's registry (distclip.verify.layouts), shared with the
# benchmarks; the names the tests used before stay.
Case = LayoutBuilder
CASES = HAND_BUILT
CASE_NAMES = HAND_BUILT_NAMES


def record_name(case: str, norm_type: float) -> str:
    """The name ``check_layout`` gives the record of one (layout, norm type)."""
    return f"{case} p={norm_type:g}"


# ----------------------------------------------------------------------------- checks


def check_layout(name: str, layout: Layout, norms=NORMS) -> list[tuple[str, bool, str]]:
    records = []
    with_grad = [p for p in layout.params if p.grad is not None]
    saved = [local_of(p.grad).clone() for p in with_grad]
    for p_norm in norms:
        for p, s in zip(with_grad, saved):
            local_of(p.grad).copy_(s)
        ref = reference_norm(layout.full, p_norm)
        max_norm = ref * 0.5 if ref else 1.0
        with count_collectives() as calls:
            total = distclip.clip_grad_norm_(iter(layout.params), max_norm, p_norm, pp_group=layout.pp_group)
        n_calls = calls.count
        value = float(total.double())
        rel = abs(value - ref) / ref if ref else abs(value)
        coef = min(1.0, max_norm / (float(total) + 1e-6))
        errors = []
        if not rel <= layout.rtol:
            errors.append(f"norm {value!r} vs reference {ref!r} (rel {rel:.2e})")
        for p, s in zip(with_grad, saved):
            got = local_of(p.grad)
            if not torch.allclose(f64(got), f64(s) * coef, rtol=1e-3 if s.dtype in (torch.bfloat16, torch.float16) else 1e-5):
                errors.append(f"clipped grad mismatch for shape {tuple(s.shape)}")
        if n_calls != layout.collectives:
            errors.append(f"{n_calls} collectives in one call (expected {layout.collectives})")
        # Without host reads (accelerators) the dtype follows each rank's own grads: float64 on the
        # ranks holding a float64 grad only. The value, rounded to float32, is the same everywhere.
        if os.environ.get("DISTCLIP_HOST_READS", "auto") == "auto":
            agreed: object = (value, total.dtype)
        else:
            agreed = float(torch.tensor(value, dtype=torch.float64).float())
        if not same_on_every_rank(agreed):
            errors.append("norm differs across ranks")
        records.append((record_name(name, p_norm), not errors, "; ".join(errors)))
    for p, s in zip(with_grad, saved):
        local_of(p.grad).copy_(s)  # leave the grads as found
    return records


def nonfinite_everywhere(world: int) -> list[tuple[str, bool, str]]:
    """A NaN (or inf) on the last rank only: the norm is non-finite on every rank, for every norm
    type, and error_if_nonfinite raises on every rank without touching any grad."""
    mesh = init_device_mesh("cpu", (world,))
    records = []
    for bad in (math.nan, math.inf):
        full = full_grad((4 * world, 3), 70)
        full[-1, -1] = bad
        p = dparam(full, mesh, [Shard(0)])
        q = pparam(full_grad((5,), 71))
        before = [local_of(p.grad).clone(), q.grad.clone()]
        for p_norm in NORMS:
            total = distclip.clip.total_grad_norm([p, q], p_norm)
            ok = not bool(torch.isfinite(total)) and same_on_every_rank(repr(float(total)))
            if p_norm in (1.0, 2.0, math.inf) and bad == math.inf:
                ok = ok and float(total) == math.inf  # like torch: an inf grad gives an inf norm
            records.append((f"nonfinite {bad} p={p_norm:g}", ok, f"got {float(total)}"))
        try:
            distclip.clip_grad_norm_([p, q], 1.0, error_if_nonfinite=True)
            records.append((f"error_if_nonfinite {bad}", False, "did not raise"))
        except RuntimeError as e:
            untouched = torch.equal(local_of(p.grad).view(torch.int32), before[0].view(torch.int32))
            untouched = untouched and torch.equal(q.grad, before[1])
            records.append((f"error_if_nonfinite {bad}", "non-finite" in str(e) and untouched and same_on_every_rank(str(e)), str(e)[:80]))
    return records


def bad_input_same_error(world: int) -> list[tuple[str, bool, str]]:
    """Bad input raises the same exception on every rank, grads intact."""
    mesh = init_device_mesh("cpu", (world,))
    ok_param = dparam(full_grad((4, 2), 80), mesh, [Shard(0)])
    partial = nn.Parameter(distribute_tensor(torch.zeros(3), mesh, [Replicate()]))
    partial.grad = DTensor.from_local(torch.ones(3), mesh, [Partial("max")])  # sums/averages are measurable
    cases: dict[str, Callable[[], object]] = {
        "negative max_norm": lambda: distclip.clip_grad_norm_([ok_param], -1.0),
        "nan max_norm": lambda: distclip.clip_grad_norm_([ok_param], math.nan),
        "string max_norm": lambda: distclip.clip_grad_norm_([ok_param], "big"),
        "norm_type not a number": lambda: distclip.clip_grad_norm_([ok_param], 1.0, norm_type=[2]),
        "pp_group wrong type": lambda: distclip.clip_grad_norm_([ok_param], 1.0, pp_group=3),
        "partial max grad": lambda: distclip.clip_grad_norm_([ok_param, partial], 1.0),
        "mark_sharded with a 2-D mesh": lambda: distclip.mark_sharded(pparam(torch.ones(2)), init_device_mesh("cpu", (world, 1))),
        "mark_sharded non-group": lambda: distclip.mark_sharded(pparam(torch.ones(2)), "world"),
    }
    records = []
    before = local_of(ok_param.grad).clone()
    for name, call in cases.items():
        with count_collectives() as calls:
            try:
                call()
                err = "no exception"
            except Exception as e:  # noqa: BLE001
                err = f"{type(e).__name__}: {e}"
        n_calls = calls.count
        # Every rank got the same bad input: each raises its own error after the call's collective
        # (which tells every rank that some rank failed) and, where host reads are free, one gather
        # of the ranks' messages.
        ok = err != "no exception" and n_calls <= 2 and torch.equal(local_of(ok_param.grad), before)
        records.append((f"bad input: {name}", ok and same_on_every_rank(err), err[:100]))
    return records


def empty_rank_one_collective(world: int) -> list[tuple[str, bool, str]]:
    """The last rank passes no parameters at all; it still issues the single collective."""
    mesh = init_device_mesh("cpu", (world,))
    full = full_grad((3, 3), 90)
    params = [] if dist.get_rank() == world - 1 and world > 1 else [distclip.mark_sharded(pparam(full), dist.group.WORLD)]
    with count_collectives() as calls:
        total = distclip.clip_grad_norm_(params, 1e9)
    n = calls.count
    del mesh
    expected = reference_norm([full], 2.0) * (world - 1 if world > 1 else 1) ** 0.5
    ok = n == 1 and abs(float(total) - expected) / expected < 1e-6 and same_on_every_rank(float(total))
    return [("rank without parameters", ok, f"{float(total)} vs {expected}, {n} collectives")]


# Checks of a whole world beside the layouts: (name, check, how many records it returns).
WORLD_CHECKS: tuple[tuple[str, Callable[[int], list[tuple[str, bool, str]]], int], ...] = (
    ("nonfinite_everywhere", nonfinite_everywhere, 2 * (len(NORMS) + 1)),
    ("bad_input_same_error", bad_input_same_error, 8),
    ("empty_rank_one_collective", empty_rank_one_collective, 1),
)


def run_cases(rank: int, world: int, names: Optional[list[str]] = None) -> list[tuple[str, bool, str]]:
    """Every case allowed at ``world`` (or those in ``names``) x NORMS, then, when all cases run,
    the world checks, whose records are named ``"<check>: <record>"``."""
    records: list[tuple[str, bool, str]] = []
    for case in CASES:
        if case.allowed(world) and (names is None or case.name in names):
            records.extend(check_layout(case.name, case.build(world)))
    if names is None:
        for check, run, _ in WORLD_CHECKS:
            records.extend((f"{check}: {name}", ok, msg) for name, ok, msg in run(world))
    return records
