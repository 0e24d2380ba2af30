"""Observe tools take what clip takes, grad_norms as one tensor, argument checks as torch's, error
texts that say what to do, and no numpy needed (issues 18-20).

- single process: every ``parameters`` form of ``clip_grad_norm_`` in grad_norms / describe /
  audit, ``trainable_only``, ``strip_prefixes``, ``GradNorms``, the plan kept across calls (grads
  changed, dropped, re-typed), the per-size CPU measurement against float64 at every norm type,
  ``max_norm`` / ``norm_type`` strings as torch 2.13 takes them;
- a 4-rank world: mismatch texts in words, a data-parallel group passed as ``pp_group``, audit's
  hint for a forgotten ``pp_group`` over identical stages, the list form on several ranks;
- a 2-rank world: a call made on one rank only says that every rank must call;
- a 2-rank world of subprocesses with numpy unimportable (``no_numpy_world.py``).
"""

from __future__ import annotations

import math
import os
import pickle
import re
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import distclip
from checks import reference_norm
from distclip.comm import objects as exchange
from distclip.observe import grad_norms as norms_mod
from distclip.observe import names as names_mod
from harness import CaseWorld, run_world

os.environ.setdefault("OMP_NUM_THREADS", "1")

ALL_P = (2.0, 1.0, 3.0, math.inf, -math.inf, 0.0, 0.5, -2.0)


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    model(torch.randn(5, 3)).pow(2).sum().backward()
    return model


def _close(a: float, b: float, rtol: float = 1e-6) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= rtol * abs(b) if b else abs(a) <= rtol


# ----------------------------------------------------------------------------- single process


def test_every_parameters_form_of_clip_grad_norm():
    model = _model()
    params = list(model.parameters())
    named = [n for n, _ in model.named_parameters()]
    want = {n: float(p.grad.double().norm()) for n, p in model.named_parameters()}
    total = float(torch.nn.utils.get_total_norm([p.grad for p in params]))
    by_position = [f"param[{i}]" for i in range(len(params))]
    forms = {
        "module": (model, named),
        "named_parameters()": (model.named_parameters(), named),
        "list of tensors": (params, by_position),
        "generator of tensors": ((p for p in params), by_position),
        "model.parameters()": (model.parameters(), by_position),
        "one tensor": (params[0], ["param[0]"]),
        "mixed": ([params[0], ("b", params[1])], ["param[0]", "b"]),
    }
    for label, (parameters, names) in forms.items():
        got = distclip.grad_norms(parameters)
        assert list(got) == [*names, "total"], label
        for name, (real, _) in zip(names, model.named_parameters()):
            assert float(got[name]) == pytest.approx(want[real], rel=1e-6), (label, name)
        if label != "one tensor" and label != "mixed":
            assert float(got["total"]) == pytest.approx(total, rel=1e-6), label
    rows = distclip.describe_rows(params)
    assert [r["name"] for r in rows] == by_position and all(r["grad"] for r in rows)
    assert "param[2]" in distclip.describe(iter(params))
    report = distclip.audit([params[0]])  # a list has no names: audit names them by position
    assert report.ok, report
    assert distclip.audit(iter(params)).ok
    with pytest.raises(TypeError) as info:
        distclip.audit([params[0], 3])
    assert "grad_norms" not in str(info.value) and "element 1" in str(info.value), info.value
    with pytest.raises(TypeError):
        distclip.grad_norms("weights")


def test_trainable_only_and_prefixes():
    model = _model()
    model[0].weight.requires_grad_(False)
    model[0].weight.grad = None  # a frozen base: no grad
    got = distclip.grad_norms(model, trainable_only=True)
    assert list(got) == ["0.bias", "2.weight", "2.bias", "total"]
    assert [r["name"] for r in distclip.describe_rows(model, trainable_only=True)] == ["0.bias", "2.weight", "2.bias"]
    assert [r["name"] for r in distclip.describe_rows(model)][0] == "0.weight"

    class Peft(nn.Module):  # PEFT's naming: base_model.model.<the model>
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.base_model = nn.Module()
            self.base_model.model = inner

    wrapped = Peft(model)
    pairs = [("module." + n, p) for n, p in wrapped.named_parameters()]  # as DDP(peft_model).named_parameters()
    stripped = distclip.grad_norms(pairs, strip_prefixes=True)
    assert list(stripped) == ["0.bias", "2.weight", "2.bias", "total"]
    assert list(distclip.grad_norms(pairs, strip_prefixes=["module."]))[0] == "base_model.model.0.bias"
    assert list(distclip.grad_norms(pairs))[0] == "module.base_model.model.0.bias"
    rows = distclip.describe_rows(wrapped, strip_prefixes=True)
    assert rows[0]["name"] == "0.weight"
    assert names_mod.clean_name("module.base_model.model._orig_mod.x", prefixes=names_mod.LEADING_PREFIXES) == "x"
    with pytest.raises(TypeError):
        distclip.grad_norms(model, strip_prefixes="module.")


def test_grad_norms_as_one_tensor():
    model = _model()
    got = distclip.grad_norms(model)
    assert isinstance(got, dict) and isinstance(got, norms_mod.GradNorms)
    assert got.names == tuple(got) and got.norms.shape == (len(got),) and got.norms.dtype == torch.float32
    assert [float(v) for v in got.values()] == got.norms.tolist()
    again = pickle.loads(pickle.dumps(got))
    assert again.names == got.names and torch.equal(again.norms, got.norms) and list(again) == list(got)
    model[2].bias.grad = None
    fewer = distclip.grad_norms(model)  # an entry without a grad anywhere is left out of both
    assert "2.bias" not in fewer.names and fewer.names == tuple(fewer) and fewer.norms.shape == (len(fewer),)
    assert float(fewer["total"]) == pytest.approx(float(distclip.get_total_norm(model)), rel=1e-9)


def test_the_plan_follows_the_grads():
    """A kept plan must never serve stale grads: values, grads dropped and re-made, another dtype."""
    ps = [nn.Parameter(torch.zeros(s)) for s in [(8, 8), (8,), (600,), (3, 5)] * 10]
    for i, p in enumerate(ps):
        p.grad = torch.full(p.shape, float(i + 1))
    pairs = [(f"p{i}", p) for i, p in enumerate(ps)]
    for step in range(4):
        if step == 1:
            for p in ps:
                p.grad.mul_(2.0)
        if step == 2:
            ps[3].grad = None
        if step == 3:
            ps[3].grad_dtype = None  # torch 2.13 checks a grad's dtype unless told not to
            ps[3].grad = torch.ones(ps[3].shape, dtype=torch.float64)
            ps[0].grad = ps[0].grad.clone()
        got = distclip.grad_norms(pairs)
        for name, p in pairs:
            if p.grad is None:
                assert name not in got, (step, name)
            else:
                assert float(got[name]) == pytest.approx(float(p.grad.double().norm()), rel=1e-6), (step, name)
        assert got["total"].dtype == (torch.float64 if step == 3 else torch.float32)


@pytest.mark.parametrize("p", ALL_P)
def test_per_size_measurement_against_float64(p):
    """Many tensors (the per-size CPU path): sizes below, at and above a row, not multiples of it,
    above the flat limit, empty; bf16 and fp32; a zero tensor and huge/tiny values (repair)."""
    gen = torch.Generator().manual_seed(3)
    shapes = [(7,), (512,), (1000,), (1024,), (33, 17), (9000,), (0,), (64,)] * 6
    grads = [torch.randn(s, generator=gen) * (1 + i % 5) for i, s in enumerate(shapes)]
    grads[5] = grads[5] * 1e20  # g^2 overflows float32
    grads[9] = grads[9] * 1e-25  # g^2 underflows
    grads[13] = torch.zeros_like(grads[13])
    grads[20] = grads[20].bfloat16()
    ps = []
    for g in grads:
        param = nn.Parameter(torch.zeros(g.shape, dtype=g.dtype))
        param.grad = g
        ps.append(param)
    got = distclip.grad_norms(ps, p)
    for i, g in enumerate(grads):
        assert _close(float(got[f"param[{i}]"]), reference_norm([g], p), 1e-5), (i, tuple(g.shape))
    assert _close(float(got["total"]), reference_norm(grads, p), 1e-5)
    if p <= 0:  # non-finite values still show at p <= 0
        ps[1].grad[3] = math.inf
        assert math.isnan(float(distclip.grad_norms(ps, p)["param[1]"]))


def test_numbers_as_torch_takes_them():
    def grads():
        p = nn.Parameter(torch.ones(3))
        p.grad = torch.ones(3)
        return [p]

    for max_norm in ("1.0", "inf", 0.5):  # torch 2.13 converts max_norm with float(): "1.0" is 1.0
        a, b = grads(), grads()
        t = torch.nn.utils.clip_grad_norm_(a, max_norm)
        d = distclip.clip_grad_norm_(b, max_norm)
        assert float(t) == pytest.approx(float(d)) and torch.allclose(a[0].grad, b[0].grad), max_norm
    for bad in ("1.0x", "abc"):
        with pytest.raises(ValueError):  # torch's class ...
            torch.nn.utils.clip_grad_norm_(grads(), bad)
        with pytest.raises(ValueError):
            distclip.clip_grad_norm_(grads(), bad)
        with pytest.raises(TypeError):  # ... and distclip's, as before
            distclip.clip_grad_norm_(grads(), bad)
    with pytest.raises(ValueError, match=r"norm_type=2\.0"):
        distclip.clip_grad_norm_(grads(), 1.0, "fro")
    with pytest.raises(ValueError, match=r"norm_type=2\.0"):
        distclip.grad_norms(grads(), "fro")
    assert float(distclip.get_total_norm([p.grad for p in grads()], "2")) == pytest.approx(math.sqrt(3))


def test_tensor_bytes_without_numpy():
    t = torch.arange(10, dtype=torch.float32).reshape(2, 5)[:, ::2]  # not contiguous
    values = t.contiguous().reshape(-1).tolist()
    assert exchange.tensor_bytes(t) == struct.pack(f"={len(values)}f", *values)
    assert exchange.tensor_bytes(torch.zeros(0)) == b""


# ----------------------------------------------------------------------------- 4 ranks


def _stage_params(stage: int, identical: bool) -> list[tuple[str, nn.Parameter]]:
    shapes = [(4, 3), (3,)] if identical or stage == 0 else [(5, 2), (5,), (2,)]
    out = []
    for i, s in enumerate(shapes):
        p = nn.Parameter(torch.zeros(s))
        p.grad = torch.randn(s, generator=torch.Generator().manual_seed(10 * stage + i))
        out.append((f"s{stage if not identical else 0}.w{i}", p))
    return out


TEXT_CASES = ("mismatch text in words", "dp group as pp_group", "forgotten pp_group in audit", "list form")


def world_texts(rank: int, world: int) -> dict[str, list[str]]:
    """{case: failures} for every name in TEXT_CASES, on each rank."""
    out: dict[str, list[str]] = {}
    stage = rank // 2  # ranks 0, 1: stage 0; ranks 2, 3: stage 1
    pp_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    dp_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    pp, dp = pp_groups[rank % 2], dp_groups[stage]

    # the census in words: no raw tuples, digests or hashes
    out["mismatch text in words"] = errors = []
    params = [p for _, p in _stage_params(0, True)]
    extra = nn.Parameter(torch.zeros(2))
    extra.grad = torch.ones(2)
    try:
        distclip.clip_grad_norm_(params + [extra] if rank == 3 else params, 1.0)
        errors.append("an extra parameter on rank 3 did not raise")
    except distclip.LayoutMismatchError as e:
        text = str(e)
        if re.search(r"\d{7,}", text) or "('" in text or "digest" in text:
            errors.append(f"raw tuples or hashes in the mismatch text: {text}")
        if "rank 3" not in text or "3 parameter(s) where most ranks of its stage hold 2" not in text:
            errors.append(f"the mismatch text does not say who holds what: {text}")

    # the data-parallel group passed as pp_group: the text names the likely mistake
    out["dp group as pp_group"] = errors = []
    own = _stage_params(stage, False)
    try:
        distclip.get_total_norm([p.grad for _, p in own], pp_group=dp)
        errors.append("dp group as pp_group did not raise")
    except distclip.LayoutMismatchError as e:
        if "mesh['pp']" not in str(e) or "data-parallel" not in str(e):
            errors.append(f"dp group as pp_group: no hint at the likely mistake: {e}")
    right = float(distclip.get_total_norm([p.grad for _, p in own], pp_group=pp))
    full = [p.grad for s in (0, 1) for _, p in _stage_params(s, False)]
    if not _close(right, reference_norm(full)):
        errors.append(f"the right pp_group gives {right}, reference {reference_norm(full)}")

    # a forgotten pp_group over stages of identical shapes: only audit can see it, and it says so
    out["forgotten pp_group in audit"] = errors = []
    same = _stage_params(stage, True)
    report = distclip.audit(same)
    if report.ok or "pass pp_group" not in str(report) or "sqrt(2)" not in str(report):
        errors.append(f"audit does not point at pp_group:\n{report}")
    if "tensor-parallel shard without mark_sharded" in str(report):
        errors.append(f"audit blames TP shards for a forgotten pp_group:\n{report}")
    if not distclip.audit(same, pp_group=pp).ok:
        errors.append(f"audit with pp_group is not OK:\n{distclip.audit(same, pp_group=pp)}")

    # the list form on several ranks, as clip_grad_norm_ takes it (a DDP-like replica)
    out["list form"] = errors = []
    replica = [p for _, p in _stage_params(0, True)]
    names = distclip.grad_norms(replica)
    if list(names) != ["param[0]", "param[1]", "total"]:
        errors.append(f"list form names: {list(names)}")
    if not distclip.audit(replica).ok:
        errors.append("audit of a list of replicated tensors is not OK")
    return out


@pytest.fixture(scope="module")
def texts_world():
    return CaseWorld(world_texts, 4, TEXT_CASES, timeout=400)


@pytest.mark.parametrize("case", TEXT_CASES)
def test_texts_and_list_forms_world4(texts_world, case):
    texts_world.check(case, shown=20)


# ----------------------------------------------------------------------------- one rank calls


def world_one_rank_calls(rank: int, world: int, wait_s: float) -> list[str]:
    errors: list[str] = []
    model = _model()
    if rank == 1:  # never calls: waits until rank 0 has given up, twice
        time.sleep(2 * wait_s + 4)
        return errors
    for label, call in (("grad_norms", lambda: distclip.grad_norms(model)),
                        ("clip_grad_norm_", lambda: distclip.clip_grad_norm_(model, 1.0))):
        try:
            call()
            errors.append(f"{label} on one rank returned")
        except RuntimeError as e:
            if "every rank of the group must call" not in str(e) or "group=" not in str(e):
                errors.append(f"{label} on one rank: no hint: {type(e).__name__}: {e}")
    return errors


def test_a_call_on_one_rank_says_every_rank_must_call():
    wait_s = 4
    results = run_world(world_one_rank_calls, 2, wait_s, timeout=120, pg_timeout_s=wait_s)
    errors = [f"rank {r}: {e}" for r, errs in enumerate(results) for e in errs]
    assert not errors, "\n".join(errors)


# ----------------------------------------------------------------------------- no numpy


def test_no_numpy_needed():
    """Every object exchange works where numpy cannot be imported (the script first checks that
    torch's own all_gather_object fails there, so this test can fail)."""
    script = Path(__file__).parents[1] / "no_numpy_world.py"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [subprocess.Popen([sys.executable, str(script), str(r), "2", store], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, env=env) for r in range(2)]
        outs = []
        for proc in procs:
            try:
                out, _ = proc.communicate(timeout=300)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
            outs.append((proc.returncode, out))
    for rank, (code, out) in enumerate(outs):
        assert code == 0 and out.strip().endswith("OK"), f"rank {rank} (exit {code}):\n{out[-4000:]}"
