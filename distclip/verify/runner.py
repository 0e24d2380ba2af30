"""Checking the layouts: build each one, clip it once per norm type, compare with the float64
single-process reference, and agree every step's outcome across ranks before the next.

``run`` goes through the selected scenarios and returns one ``Row`` per (layout, norm type), the
same on every rank. ``check`` is one layout: each step (build, reference, clip, comparison) runs
under try/except on every rank and its outcome is exchanged through the store (``context``), so a
rank that raised never skips a collective that the others make; a step that timed out in a
collective marks the process group for a rebuild.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

import distclip
from distclip.comm.objects import all_gather_objects
from distclip.comm.reduce import reduction_device
from distclip.layout.discovery import call_group
from distclip.verify.context import Ctx, RanksLost, reset_process_group
from distclip.verify.models import single_process_grads
from distclip.verify.reference import reference_norm
from distclip.verify.scenarios import Built, Scenario, select

_T = TypeVar("_T")

NORM_TYPES = (1.0, 2.0, 3.0, math.inf, 0.5, 0.0, -math.inf, -2.0)  # every grad is non-zero, so p <= 0 means something


@dataclass
class Row:
    layout: str
    norm_type: float
    reference: float
    result: float
    rel_err: float
    ok: bool
    detail: str = ""


class RunAborted(RuntimeError):
    def __init__(self, rows: list[Row]) -> None:
        super().__init__("a rank stopped reporting")
        self.rows = rows


# ----------------------------------------------------------------------------- the reference


def world_full(local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every stage's full grads (float64, CPU) merged over the world: the whole model's."""
    # an object exchange without numpy (torch's all_gather_object needs it; distclip declares only torch)
    mine = {k: v.detach().double().cpu() for k, v in local.items()}
    gathered = all_gather_objects(mine, reduction_device(call_group(None)), None, what="distclip.verify's reference")
    merged: dict[str, torch.Tensor] = {}
    for part in gathered:
        for k, v in part.items():
            merged.setdefault(k, v)
    return dict(sorted(merged.items()))


def clip(ctx: Ctx, built: Built, max_norm: float, norm_type: float) -> torch.Tensor:
    if ctx.impl == "torch":
        params = built.parameters.parameters() if isinstance(built.parameters, nn.Module) else built.parameters
        total = torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)
        return total.full_tensor() if hasattr(total, "full_tensor") else total
    return distclip.clip_grad_norm_(built.parameters, max_norm, norm_type, pp_group=built.pp_group, group=built.group)


def _model_ranks(built: Built, world: int) -> list[int]:
    """The ranks holding this rank's model: those of ``built.group``, or the whole world."""
    if built.group is None:
        return list(range(world))
    if isinstance(built.group, DeviceMesh):
        return [int(r) for r in built.group.mesh.flatten().tolist()]
    return dist.get_process_group_ranks(built.group)


# ----------------------------------------------------------------------------- outcomes


def _error(e: BaseException) -> str:
    message = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\] ", "", " ".join(str(e).split()))  # gloo's source location
    return f"{type(e).__name__}: {message[:240]}"


def _is_timeout(message: str) -> bool:
    text = message.lower()
    return any(s in text for s in ("timed out", "timeout", "time out", "distbackenderror", "connection closed", "connection reset"))


def _attempt(fn: Callable[[], _T]) -> tuple[_T | None, str | None]:
    try:
        return fn(), None
    except Exception as e:  # noqa: BLE001 - every failure becomes a row, on every rank
        return None, _error(e)


def _describe(errors: list[str | None]) -> str:
    """'ranks 2,3: RuntimeError: ...; ranks 0,1: DistBackendError: ...timed out...'"""
    by_message: dict[str, list[int]] = {}
    for rank, message in enumerate(errors):
        if message is not None:
            by_message.setdefault(message, []).append(rank)
    parts = [f"rank{'s' if len(r) > 1 else ''} {','.join(map(str, r))}: {m}" for m, r in by_message.items()]
    return "; ".join(parts)


def _failure(errors: list[str | None]) -> tuple[str, bool]:
    """(detail, hung): hung when some rank timed out in a collective or did not raise at all while
    others did (it was left waiting): the process group must be rebuilt."""
    raised = [e for e in errors if e is not None]
    hung = any(_is_timeout(e) for e in raised)
    detail = _describe(errors)
    return (f"hang/timeout: {detail}" if hung else detail), hung


def _other_models(outcomes: list) -> dict[str, tuple[float, float]]:
    """{model: (reference, result)} of every model but rank 0's, from the first rank holding it
    (empty when the world holds one model); outcomes are the agreed (total, error, ref, model)."""
    others: dict[str, tuple[float, float]] = {}
    for total, _, ref, model in outcomes:
        if model != outcomes[0][3] and model not in others:
            others[model] = (ref, math.nan if total is None else total)
    return others


def _with_models(detail: str, others: dict[str, tuple[float, float]]) -> str:
    shown = [f"model {m.rstrip('.')}: reference {r:.8g}, result {t:.8g}" for m, (r, t) in others.items()]
    return "; ".join(x for x in (detail, *shown) if x)


# ----------------------------------------------------------------------------- one layout


def _save_grads(built: Built) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(g, g.detach().clone()) for g in built.local_grads()]


def _restore_grads(built: Built, saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    current = built.local_grads()
    if len(current) != len(saved) or any(c.data_ptr() != s[0].data_ptr() for c, s in zip(current, saved)):
        raise RuntimeError("the gradients were replaced (not scaled in place) by the clip call; cannot restore them")
    for g, (_, copy) in zip(current, saved):
        g.copy_(copy)


def check(ctx: Ctx, scenario: Scenario, norm_types: tuple[float, ...]) -> tuple[list[Row], bool]:
    """One layout, every norm type. Returns (rows, reset): rows are the same on every rank; reset
    says the process group may be out of step (a timeout, or a step that failed part-way).

    Each step (build, reference, clip, comparison) runs under try/except on every rank and its
    outcome is agreed before the next step, so a rank that raised never skips a collective that
    the others make.
    """
    agree = ctx.agreement()
    rows: list[Row] = []

    def not_run(from_index: int, why: str) -> None:
        for p in norm_types[from_index:]:
            rows.append(Row(scenario.name, p, math.nan, math.nan, math.nan, False, why))

    built, err = _attempt(lambda: scenario.build(ctx))
    errors = agree(err)
    if any(errors):
        detail, hung = _failure(errors)
        not_run(0, f"build failed: {detail}")
        return rows, True  # a failed build leaves the process group in an unknown state
    assert built is not None  # no rank raised, so this one built it

    state: dict = {}

    def prepare() -> str:
        if "saved" not in state:
            state["saved"] = _save_grads(built)
        else:
            _restore_grads(built, state["saved"])
        state["before"] = before = world_full(built.local_full())
        if "sanity" not in state:
            expected = built.reference_grads or single_process_grads(ctx.device)
            bad = [n for n in expected if n not in before or not torch.allclose(before[n], expected[n], rtol=1e-4, atol=1e-6)]
            extra = [n for n in before if n not in expected]
            state["sanity"] = f"grads differ from single-process model: {bad + extra}" if bad or extra else ""
        return state["sanity"]

    for i, norm_type in enumerate(norm_types):
        _, err = _attempt(prepare)
        errors = agree(err)
        if any(errors):
            detail, hung = _failure(errors)
            not_run(i, f"reference failed: {detail}")
            return rows, True
        # this rank's model's norm (the world's one model, unless the layout holds several)
        ref = reference_norm({n: g for n, g in state["before"].items() if n.startswith(built.model)}, norm_type)
        max_norm = ref * 0.5

        def clip_once(m: float = max_norm, p: float = norm_type) -> float:
            return float(clip(ctx, built, m, p).detach().double().cpu())

        total, err = _attempt(clip_once)
        outcomes = agree((total, err, ref, built.model))
        errors = [o[1] for o in outcomes]
        results = [o[0] for o in outcomes]
        shown_ref = outcomes[0][2]  # a row shows rank 0's model; the other models' numbers go in its detail
        others = _other_models(outcomes)
        if any(errors):
            detail, hung = _failure(errors)
            rows.append(Row(scenario.name, norm_type, shown_ref, math.nan, math.nan, False, _with_models(detail, others)))
            if hung:
                not_run(i + 1, "not run: the process group was rebuilt after the timeout above")
                return rows, True
            continue

        def compare(results: list = results, ref: float = ref, max_norm: float = max_norm) -> tuple[bool, str]:
            result = results[ctx.rank]
            before = state["before"]
            after = world_full(built.local_full())
            coef = min(1.0, max_norm / (ref + 1e-6))
            rel = abs(result - ref) / ref if ref else abs(result)
            if not rel <= 1e-6:
                return False, "norm differs from reference"
            mine = [n for n in before if n.startswith(built.model)]  # the other models are clipped by their own norms
            if not all(torch.allclose(after[n], before[n] * coef, rtol=1e-5, atol=1e-8) for n in mine):
                return False, "clipped grads differ from reference"
            if len({repr(results[r]) for r in _model_ranks(built, ctx.world)}) != 1:
                return False, f"norm differs across ranks: {results}"
            if state["sanity"]:
                return False, state["sanity"]
            return True, ""

        verdict, err = _attempt(compare)
        verdicts = agree((verdict, err))  # verdict: (ok, detail), or None when compare raised
        errors = [e for _, e in verdicts]
        result = results[0]
        rel = abs(result - shown_ref) / shown_ref if shown_ref else abs(result)
        if any(errors):
            detail, hung = _failure(errors)
            rows.append(Row(scenario.name, norm_type, shown_ref, result, rel, False,
                            _with_models(f"comparison failed: {detail}", others)))
            not_run(i + 1, "not run: comparison failed above")
            return rows, True
        ok = all(v[0] for v, _ in verdicts)
        detail = next((v[1] for v, _ in verdicts if not v[0] and v[1]), "")
        rows.append(Row(scenario.name, norm_type, shown_ref, result, rel, ok, _with_models(detail, others)))
    return rows, False


# ----------------------------------------------------------------------------- every layout


def run(
    ctx: Ctx,
    names: list[str] | None = None,
    norm_types: tuple[float, ...] = NORM_TYPES,
    progress: Callable[[str], None] | None = None,
    *,
    scenarios: Iterable[Scenario] | None = None,
) -> list[Row]:
    """Every selected layout allowed at this world size; rows are identical on every rank. A
    layout that hangs is reported and the process group rebuilt; a rank that stops reporting ends
    the run (its layout and the rest are reported as not run). ``scenarios`` replaces the
    registry (``scenarios.SCENARIOS``)."""
    chosen = select(ctx.world, names, scenarios=scenarios)
    rows: list[Row] = []
    for n, scenario in enumerate(chosen, 1):
        start = time.perf_counter()
        try:
            layout_rows, hung = check(ctx, scenario, norm_types)
        except RanksLost as e:
            for s in chosen[n - 1:]:
                why = f"hang: {e}" if s is scenario else "not run: an earlier layout hung"
                rows.extend(Row(s.name, p, math.nan, math.nan, math.nan, False, why) for p in norm_types)
            if progress:
                progress(f"[{n}/{len(chosen)}] {scenario.name:24s} FAIL (hang): {e}; stopping")
            raise RunAborted(rows) from e
        rows.extend(layout_rows)
        if progress:
            passed = sum(r.ok for r in layout_rows)
            timed_out = any("hang/timeout" in r.detail for r in layout_rows)
            verdict = "PASS" if passed == len(layout_rows) else "FAIL (hang/timeout)" if timed_out else "FAIL"
            progress(f"[{n}/{len(chosen)}] {scenario.name:24s} {verdict} {passed}/{len(layout_rows)}  "
                     f"({time.perf_counter() - start:.1f} s)")
        if hung:  # the process group may be out of step: a fresh one for the next layout
            reset_process_group(ctx)
    return rows
