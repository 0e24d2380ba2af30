"""distclip leaves no trace on the user's model: a property over every layout of ``distclip.verify``.

On 4 gloo ranks, every layout is built, every public function runs on it (twice or more, so the
layout plans are built and used), and then the model goes through torch's own machinery:

- no weakref on any parameter or grad (``torch.utils.swap_tensors`` refuses a tensor with one);
- ``.to(float64)`` with swap-on-conversion (every parameter swapped), ``load_state_dict(assign=True)``,
  ``to_empty``: each works, and the norm after it (grads put back) equals the norm before, so marks
  survive every way torch replaces or swaps a parameter;
- ``torch.save(model)`` / ``torch.load`` and ``copy.deepcopy(model)`` work;
- the model is freed when the test lets go of it.

Where one of these fails, the same layout is built again and the same step runs on it with no
distclip call at all (what torch's own clip leaves): the step must fail there too. Every rank runs
the same collectives in the same order whatever fails locally; outcomes are gathered per layout,
and each layout is one pytest id.
"""

from __future__ import annotations

import copy
import gc
import io
import math
import weakref

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

import distclip
from distclip import verify
from distclip.comm.objects import all_gather_objects
from distclip.verify.scenarios import select
from harness import run_world

WORLD = 4
STEPS = ("weakrefs", "to float64 (swap)", "load_state_dict(assign=True)", "to_empty", "torch.save/load", "deepcopy", "freed")


def _module_of(built) -> nn.Module:
    if isinstance(built.parameters, nn.Module):
        return built.parameters
    holder = nn.Module()  # a list of parameters: torch's machinery needs a module around them
    holder.params = nn.ParameterList(built.parameters)
    return holder


def _grads(module: nn.Module) -> dict[str, torch.Tensor]:
    """Copies: ``to_empty`` and ``.to()`` rewrite the grad objects themselves."""
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def _put_back(module: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """The grads saved before a step, on whatever parameter objects the module holds now."""
    for name, p in module.named_parameters():
        g = saved.get(name)
        if g is None:
            continue
        if p.grad is None or p.grad.shape != g.shape or type(p.grad) is not type(g) or p.grad.dtype != g.dtype:
            p.grad = g.detach().clone()
        else:
            target = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            source = g.to_local() if isinstance(g, DTensor) else g
            target.copy_(source)


def _norm(built) -> float:
    return float(distclip.get_total_norm(built.parameters, pp_group=built.pp_group, group=built.group))


def _every_public_function(built) -> None:
    kw = {"pp_group": built.pp_group, "group": built.group}
    guard = distclip.GradGuard(1e9, adaptive="zclip", warmup_steps=1)
    for _ in range(3):  # the second call builds the layout plans, the third uses them
        distclip.clip_grad_norm_(built.parameters, 1e9, **kw)
        total = distclip.get_total_norm(built.parameters, **kw)
        distclip.clip_grads_with_norm_(built.parameters, 1e9, total)
        distclip.clip_grad_value_(built.parameters, 1e9)
        distclip.grad_norms(built.parameters, **kw)
        guard.clip_(built.parameters, **kw)
    distclip.audit(built.parameters, **kw)
    distclip.describe(built.parameters, **kw)


def _steps(built, before: float) -> dict[str, str]:
    """Run torch's machinery on the model; {step: problem} (empty: all fine). Every rank makes
    the same collectives whatever fails locally."""
    problems: dict[str, str] = {}
    module = _module_of(built)

    def local(step: str, fn) -> None:
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            problems[step] = f"{type(e).__name__}: {e}"[:300]

    def norm_equal(step: str) -> None:
        try:
            after = _norm(built)
        except Exception as e:  # noqa: BLE001
            problems.setdefault(step, f"norm after: {type(e).__name__}: {e}"[:300])
            return
        if not (abs(after - before) <= 1e-5 * max(abs(before), 1e-12) or (math.isnan(after) and math.isnan(before))):
            problems.setdefault(step, f"norm after {after} != before {before}")

    tensors = [t for p in module.parameters() for t in (p, p.grad) if t is not None]
    held = [type(t).__name__ for t in tensors if weakref.getweakrefcount(t)]
    if held:
        problems["weakrefs"] = f"{len(held)} parameters/grads carry a weakref"
    del tensors

    saved = _grads(module)

    def to_float64() -> None:
        torch.__future__.set_swap_module_params_on_conversion(True)
        try:
            module.to(torch.float64)
            module.to(torch.float32)
        finally:
            torch.__future__.set_swap_module_params_on_conversion(False)
        _put_back(module, saved)

    local("to float64 (swap)", to_float64)
    norm_equal("to float64 (swap)")

    def assign() -> None:
        state = {k: v.detach().clone() if not isinstance(v, DTensor) else v for k, v in module.state_dict().items()}
        module.load_state_dict(state, assign=True)
        _put_back(module, saved)

    local("load_state_dict(assign=True)", assign)
    norm_equal("load_state_dict(assign=True)")

    def empty() -> None:
        module.to_empty(device="cpu")
        _put_back(module, saved)

    local("to_empty", empty)
    norm_equal("to_empty")

    def save_load() -> None:
        buffer = io.BytesIO()
        torch.save(module, buffer)
        buffer.seek(0)
        torch.load(buffer, weights_only=False)

    local("torch.save/load", save_load)
    local("deepcopy", lambda: copy.deepcopy(module))
    return problems


def _freed(built) -> bool:
    module = _module_of(built)
    refs = [weakref.ref(module)] + [weakref.ref(p) for p in module.parameters()]  # the test's own, made last
    del module, built
    gc.collect()
    return all(r() is None for r in refs)


def _baseline(ctx, scenario, steps: set[str]) -> dict[str, str]:
    """The same layout built anew, the same steps with no distclip call: what torch leaves."""
    built = scenario.build(ctx)
    before = _norm(built)  # a collective: every rank; distclip measures but keeps nothing on the model
    problems = _steps(built, before) if steps - {"freed"} else {}
    if "freed" in steps and not _freed(built):
        problems["freed"] = "not freed"
    return {k: v for k, v in problems.items() if k in steps}


def _world(rank: int, world: int) -> dict[str, list[str]]:
    verify.quiet_torch_warnings()
    ctx = verify.Ctx(rank, world, torch.device("cpu"), "distclip")
    out: dict[str, list[str]] = {}
    for scenario in select(world):
        torch.manual_seed(0)
        built = scenario.build(ctx)
        _every_public_function(built)
        before = _norm(built)
        problems = _steps(built, before)
        if not _freed(built):
            problems["freed"] = "the model stays alive after the test lets go of it"
        everyone = all_gather_objects(problems, torch.device("cpu"), None, what="test_no_trace")
        failed = set().union(*everyone)
        if failed:
            torch.manual_seed(0)
            torch_too = _baseline(ctx, scenario, failed)
            problems = {k: v for k, v in problems.items() if k not in torch_too}
        out[scenario.name] = [f"{k}: {v}" for k, v in sorted(problems.items())]
        dist.barrier()
    return out


@pytest.fixture(scope="module")
def outcomes() -> list[dict[str, list[str]]]:
    return run_world(_world, WORLD, timeout=900, pg_timeout_s=120)


@pytest.mark.parametrize("layout", [s.name for s in select(WORLD)])
def test_no_trace_on_the_model(outcomes, layout):
    problems = {f"rank {rank}: {p}" for rank, per_layout in enumerate(outcomes) for p in per_layout[layout]}
    assert not problems, sorted(problems)
