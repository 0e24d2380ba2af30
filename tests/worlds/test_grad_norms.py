"""grad_norms: per-parameter and per-group global norms on real layouts, against float64 references
built from the full gradients, identical on every rank, one collective per call after the first."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

import distclip
from checks import count_collectives, raised_everywhere, reference_norm, same_on_every_rank
from distclip import verify
from distclip.observe import grad_norms as norms_mod
from distclip.observe import names as names_mod
from harness import CaseWorld

os.environ.setdefault("OMP_NUM_THREADS", "1")

P_MAIN = (1.0, 2.0, math.inf)
P_EXTRA = (0.0, -math.inf, 0.5, -2.0)


def _rel(a: float, b: float) -> float:
    if math.isnan(a) or math.isnan(b) or math.isinf(b):
        return 0.0 if (a == b or (math.isnan(a) and math.isnan(b))) else math.inf
    return abs(a - b) / abs(b) if b else abs(a)


def _group(name: str):
    head = name.split(".")[0]
    return None if head == "norm" else head  # LayerNorm left out of the groups (still in "total")


def check(label: str, parameters, full: dict[str, torch.Tensor], pp_group=None, ps=P_MAIN, fresh=True,
          collectives: int = 1, duplicate: tuple = ()) -> list[str]:
    """Every check for one layout; returns failures (never raises, so one world reports all).
    ``duplicate``: names in ``full`` that repeat another (a tied weight): left out of the total."""
    errors = []
    for p in ps:
        for groups in (None, _group):
            first = count_collectives()
            with first:
                got = distclip.grad_norms(parameters, p, groups=groups, pp_group=pp_group)
            with count_collectives() as again:
                got2 = distclip.grad_norms(parameters, p, groups=groups, pp_group=pp_group)
            plain = parameters if isinstance(parameters, nn.Module) else [t for _, t in parameters]
            total = float(distclip.clip.total_grad_norm(plain, p, pp_group=pp_group))
            if groups is None:
                ref = {n: reference_norm([g], p) for n, g in full.items()}
            else:
                members: dict[str, list] = {}
                for n, g in full.items():
                    if _group(n) is not None:
                        members.setdefault(_group(n), []).append(g)
                ref = {k: reference_norm(v, p) for k, v in members.items()}
            ref_total = reference_norm([g for n, g in full.items() if n not in duplicate], p)
            tag = f"{label} p={p:g} groups={'yes' if groups else 'no'}"
            if set(got) != set(ref) | {"total"}:
                errors.append(f"{tag}: keys {sorted(got)} vs {sorted(ref)}")
            for n, r in ref.items():
                if n in got and not _rel(float(got[n]), r) <= 1e-6:
                    errors.append(f"{tag}: {n} = {float(got[n])!r}, reference {r!r}")
            if not _rel(float(got["total"]), ref_total) <= 1e-6:
                errors.append(f"{tag}: total {float(got['total'])!r} vs reference {ref_total!r}")
            if not _rel(float(got["total"]), total) <= 1e-9 and not (math.isnan(total) and math.isnan(float(got["total"]))):
                errors.append(f"{tag}: total {float(got['total'])!r} vs get_total_norm {total!r}")
            if [(k, v.dtype, float(v)) for k, v in got.items()] != [(k, v.dtype, float(v)) for k, v in got2.items()]:
                errors.append(f"{tag}: second call differs")
            if again.count != collectives:
                errors.append(f"{tag}: {again.count} collectives in a later call (expected {collectives})")
            if fresh and p == ps[0] and groups is None and first.count != collectives + 1:
                errors.append(f"{tag}: {first.count} collectives in the first call (expected {collectives + 1}: + names)")
            if not same_on_every_rank([(k, str(v.dtype), float(v).hex()) for k, v in got.items()]):
                errors.append(f"{tag}: the dict differs across ranks")
    return errors


def _full(built: verify.Built) -> dict[str, torch.Tensor]:
    return verify.world_full(built.local_full()) if not built.reference_grads else dict(built.reference_grads)


def _tied_pp(ctx: verify.Ctx):
    """verify.build_tied_pp, with the tied weight under both of its names in the reference."""
    built = verify.build_tied_pp(ctx)
    ref = dict(built.reference_grads)
    ref["head.weight"] = ref["embed.weight"]  # the tied weight under both names, in full
    return built.parameters, built.pp_group, ref


LAYOUT_CASES = ("DDP", "FSDP1 flat", "FSDP1 orig", "FSDP2", "HSDP", "2D TP+FSDP2", "EP uneven", "TP+SP Partial")
CASES = LAYOUT_CASES + ("tied PP", "tied PP pairs", "re-agreement", "mutant caught", "validation", "one rank's bad input")


def world_layouts(rank: int, world: int) -> dict[str, list[str]]:
    """{case: failures} for every name in CASES, on each rank."""
    torch.manual_seed(0)
    verify.quiet_torch_warnings()
    ctx = verify.Ctx(rank, world, torch.device("cpu"), "distclip")
    out: dict[str, list[str]] = {}
    cases = [
        ("DDP", lambda: verify.build_ddp(ctx)),
        ("FSDP1 flat", lambda: verify.build_fsdp1("FULL_SHARD", False)(ctx)),
        ("FSDP1 orig", lambda: verify.build_fsdp1("FULL_SHARD", True)(ctx)),
        ("FSDP2", lambda: verify.build_fsdp2(ctx)),
        ("HSDP", lambda: verify.build_fsdp2(ctx, hsdp=True)),
        ("2D TP+FSDP2", lambda: verify.build_2d(ctx)),
        ("EP uneven", lambda: verify.build_ep(ctx)),
        ("TP+SP Partial", lambda: verify.build_tp_sp(ctx)),
    ]
    for label, build in cases:
        built = build()
        full = _full(built)
        extra = P_EXTRA if label in ("FSDP2", "FSDP1 flat") else ()
        # Partial grads (LayerNorm under sequence parallelism): a pairing check and their values, then the one reduce
        out[label] = check(label, built.parameters, full, ps=P_MAIN + extra, collectives=3 if "Partial" in label else 1)
    part, pp_group, ref = _tied_pp(ctx)
    out["tied PP"] = check("tied PP", part, ref, pp_group=pp_group, duplicate=("head.weight",))
    out["tied PP pairs"] = check("tied PP pairs", list(part.named_parameters()), ref, pp_group=pp_group, fresh=False,
                                 duplicate=("head.weight",))

    # names that change on one rank only (an expert appears on rank 1): every rank re-agrees in
    # that call (3 collectives, no hang) and the answer is right
    out["re-agreement"] = errors = []
    model = verify.build_fsdp2(ctx).parameters
    full = verify.world_full(verify.plain_full(model)())
    pairs = list(model.named_parameters())
    distclip.grad_norms(pairs)
    extra = nn.Parameter(torch.ones(3))
    extra.grad = torch.full((3,), 2.0)
    distclip.mark_sharded(extra, dist.group.WORLD)
    with count_collectives() as c:
        got = distclip.grad_norms(pairs + [("expert.w", extra)] if rank == 1 else pairs)
    if c.count != 3:
        errors.append(f"re-agreement: {c.count} collectives (expected 3)")
    for n, g in dict(full, **{"expert.w": extra.grad}).items():
        if n not in got or not _rel(float(got[n]), reference_norm([g], 2.0)) <= 1e-6:
            errors.append(f"re-agreement: {n} {got.get(n)} vs {reference_norm([g], 2.0)}")

    # the mutant: a wrong per-name weight (every unit counted with weight 1) must fail the checks
    real = norms_mod.collect

    def mutant(*a, **k):
        local = real(*a, **k)
        for u in local.units:
            u.weight = 1.0
        return local

    norms_mod.collect = mutant
    try:
        built = verify.build_ddp(ctx)
        caught = check("mutant", built.parameters, _full(built), ps=(2.0,))
    finally:
        norms_mod.collect = real
    out["mutant caught"] = [] if any("reference" in e for e in caught) else ["a wrong per-name weight went unnoticed"]

    # validation: the same error on every rank; a failed rank still joins the call's collectives
    # (one all-reduce, then the error messages' all-gather; the name order's agreement on a first call)
    out["validation"] = errors = []
    with count_collectives() as c:
        for bad, exc in (("x", TypeError), (math.nan, ValueError)):
            try:
                distclip.grad_norms(model, bad)
                errors.append(f"norm_type={bad!r} did not raise")
            except exc:
                pass
        try:
            distclip.grad_norms(model, groups="fc")
            errors.append("groups='fc' did not raise")
        except TypeError:
            pass
    if c.count > 3 * 2 + 1:
        errors.append(f"validation issued {c.count} collectives (at most 7: 3 calls x (all-reduce + all-gather), one agreement)")
    # bad input on one rank only: every rank raises at once, naming it, with no grad changed
    before = [p.grad.clone() for p in model.parameters()]
    out["one rank's bad input"] = errors = raised_everywhere(
        lambda: distclip.grad_norms(model, "fro" if rank == 3 else 2.0), TypeError, 3, rank, within_s=5)
    if not all(torch.equal(b, p.grad) for b, p in zip(before, model.parameters())):
        errors.append("a grad changed although the call failed")
    return out


@pytest.fixture(scope="module")
def layouts_world():
    return CaseWorld(world_layouts, 4, CASES, timeout=540)


@pytest.mark.parametrize("case", CASES)
def test_grad_norms_real_layouts_world4(layouts_world, case):
    layouts_world.check(case)


def test_grad_norms_single_process_and_names():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    model(torch.randn(5, 3)).pow(2).sum().backward()
    model[2].bias.grad = None
    got = distclip.grad_norms(model, 2.0)
    assert list(got) == ["0.weight", "0.bias", "2.weight", "total"]
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert float(got[name]) == pytest.approx(float(p.grad.double().norm()), rel=1e-6)
    assert float(got["total"]) == pytest.approx(float(distclip.get_total_norm(model)), rel=1e-9)
    # a small model's "total" is measured in float64 as get_total_norm measures it: on about a
    # quarter of these draws a float32 measurement lands one float32 step away
    for seed in range(40):
        torch.manual_seed(seed)
        for m in (model, nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).to(torch.bfloat16)):
            for q in m.parameters():
                q.grad = torch.randn_like(q)
            assert float(distclip.grad_norms(m)["total"]) == float(distclip.get_total_norm(m)), (seed, q.dtype)
    model[2].bias.grad = None
    grouped = distclip.grad_norms(model.named_parameters(), math.inf, groups=lambda n: "first" if n.startswith("0.") else None)
    assert list(grouped) == ["first", "total"]
    assert names_mod.clean_name("module._orig_mod.a._fsdp_wrapped_module.b._checkpoint_wrapped_module.c", ddp=True) == "a.b.c"
    # bare tensors, as clip_grad_norm_ takes them, are named by position (a list of parameters has
    # no names); anything else is refused
    by_position = distclip.grad_norms(list(model.parameters()))
    assert list(by_position) == ["param[0]", "param[1]", "param[2]", "total"]
    with pytest.raises(TypeError):
        distclip.grad_norms([3.0])
    with pytest.raises(ValueError):
        distclip.grad_norms(model, groups=lambda n: "total")
    text = distclip.describe(model)
    assert "0.weight" in text and "plain tensor" in text
