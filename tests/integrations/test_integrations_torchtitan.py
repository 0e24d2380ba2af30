"""distclip.integrations.torchtitan.clip_grad_norm_ against torchtitan 0.3.0's own function.

One 4-rank gloo world builds four real layouts (FSDP2 1-D; pipeline stages x FSDP2 with
``pp_mesh``; 2-D TP + FSDP2 with LayerNorms on the dp mesh only; MoE experts on torchtitan's
sparse ``(efsdp, ep)`` mesh beside dense FSDP2 params), runs a real backward, and clips the same
gradients with both functions. Where torchtitan works: same norm, same clipped grads. Where it
raises (mixed meshes): distclip still matches a float64 reference built from the full gradients.

Every dimension here is divisible by the shard counts on purpose: with an empty FSDP2 shard (a
bias of size 1 on 4 ranks) torchtitan's ``norm_type=inf`` raises "_foreach_norm cannot compute
the infinity norm on an empty tensor" on the ranks holding nothing while the others wait in its
all-reduce (a collective mismatch; gloo aborts). distclip skips empty shards (tests/worlds/test_layouts.py).
"""

from __future__ import annotations

import inspect
import math
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

from checks import reference_norm
from harness import run_world

if os.environ.get("DISTCLIP_REQUIRE_INTEGRATIONS") == "1":
    import torchtitan  # noqa: F401  - in CI a missing package is a failure, not a skip
else:
    pytest.importorskip("torchtitan", reason="torchtitan is not installed (pip install 'distclip[torchtitan]')")

D, H = 8, 12
NORMS = (2.0, math.inf)
MAX_NORM = 0.01  # every case clips


def _grads(params):
    return [p.grad for p in params if p.grad is not None]


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def _snapshot(params):
    return [_local(g).clone() for g in _grads(params)]


def _restore(params, saved):
    for g, s in zip(_grads(params), saved):
        _local(g).copy_(s)


def _reference_norm(params, p, pp_group=None) -> float:
    """float64 norm over the full gradients: the one reference over this stage's ``full_tensor()``
    per grad, then a sum of p-th powers (or a max) across pipeline stages by a plain all-reduce:
    independent of both implementations under test."""
    stage = reference_norm([g.full_tensor() if hasattr(g, "full_tensor") else g for g in _grads(params)], p)
    if pp_group is None:
        return stage
    acc = torch.tensor(stage if math.isinf(p) else stage**p, dtype=torch.float64)
    dist.all_reduce(acc, op=dist.ReduceOp.MAX if math.isinf(p) else dist.ReduceOp.SUM, group=pp_group)
    return float(acc) if math.isinf(p) else float(acc ** (1 / p))


def _compare(name, params, p, out, *, pp_mesh=None, ep_enabled=False, torchtitan_should_work=True):
    """Clip the current grads with torchtitan's function and with distclip's adapter."""
    from torchtitan.distributed.utils import clip_grad_norm_ as titan_clip

    from distclip.integrations.torchtitan import clip_grad_norm_ as ours_clip

    pp_group = pp_mesh.get_group() if pp_mesh is not None else None
    ref = _reference_norm(params, p, pp_group)
    saved = _snapshot(params)
    row = {"ref": ref}
    try:
        norm = titan_clip(params, MAX_NORM, p, pp_mesh=pp_mesh, ep_enabled=ep_enabled)
        row["titan"] = float(norm)
        row["titan_type"] = type(norm).__name__
        titan_grads = _snapshot(params)
    except Exception as e:  # noqa: BLE001
        row["titan_error"] = f"{type(e).__name__}: {e}"
        titan_grads = None
    _restore(params, saved)
    norm = ours_clip(iter(params), MAX_NORM, p, pp_mesh=pp_mesh, ep_enabled=ep_enabled)  # a generator, as allowed
    row["ours"] = float(norm)
    row["ours_type"] = type(norm).__name__
    coef = min(1.0, MAX_NORM / (ref + 1e-6))
    # clipped grads: scaled by the reference coefficient (and equal to torchtitan's where it works)
    row["grads_ok"] = all(
        torch.allclose(_local(g), s * coef, rtol=1e-5, atol=1e-8) for g, s in zip(_grads(params), saved)
    )
    if titan_grads is not None:
        row["same_grads_as_titan"] = all(
            torch.allclose(_local(g), t, rtol=1e-5, atol=1e-8) for g, t in zip(_grads(params), titan_grads)
        )
    row["torchtitan_should_work"] = torchtitan_should_work
    _restore(params, saved)
    out[f"{name} p={p}"] = row


class _Dense(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1, self.w2 = nn.Linear(D, H), nn.Linear(H, D)
        self.norm, self.head = nn.LayerNorm(D), nn.Linear(D, 4)  # every dim divisible by 4: see the module docstring

    def forward(self, x):
        return self.head(self.norm(self.w2(torch.relu(self.w1(x)))))


class _Experts(nn.Module):
    def __init__(self, w) -> None:
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, x):
        # this rank's experts only, as torchtitan computes them (the gradient keeps Shard(0) on ep)
        return torch.einsum("nd,edk->enk", x, self.w.to_local())


def _backward(model, rank, in_dim=D, extra=None):
    g = torch.Generator().manual_seed(100 + rank)
    loss = model(torch.randn(6, in_dim, generator=g)).pow(2).mean()
    if extra is not None:
        loss = loss + extra()
    loss.backward()


def titan_world(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    out: dict = {}

    # A. FSDP2 on a 1-D mesh of 4: torchtitan works.
    torch.manual_seed(0)
    model = _Dense()
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))
    for sub in (model.w1, model.w2, model.head):
        fully_shard(sub, mesh=mesh)
    fully_shard(model, mesh=mesh)
    _backward(model, rank)
    for p in NORMS:
        _compare("FSDP2", list(model.parameters()), p, out)

    # B. Pipeline stages x FSDP2, pp_mesh: torchtitan works.
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "dp"))
    torch.manual_seed(0)
    full = _Dense()
    stage_id = mesh["pp"].get_local_rank()
    stage = nn.Sequential(full.w1, nn.ReLU()) if stage_id == 0 else nn.Sequential(full.w2, full.norm, full.head)
    fully_shard(stage, mesh=mesh["dp"])
    _backward(stage, rank, in_dim=D if stage_id == 0 else H)
    for p in NORMS:
        _compare("PP x FSDP2", list(stage.parameters()), p, out, pp_mesh=mesh["pp"])

    # C. 2-D TP + FSDP2, norm and head on the dp mesh only: torchtitan raises.
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(0)
    model = _Dense()
    parallelize_module(model, mesh["tp"], {"w1": ColwiseParallel(), "w2": RowwiseParallel()})
    for sub in (model.w1, model.w2, model.head):
        fully_shard(sub, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    _backward(model, mesh["dp"].get_local_rank())
    out["2D meshes"] = sorted({p.device_mesh.mesh_dim_names for p in model.parameters()})
    for p in NORMS:
        _compare("2D TP+FSDP2", list(model.parameters()), p, out, torchtitan_should_work=False)

    # D. MoE as torchtitan lays it out: dense params FSDP2 on the dense ("dp",) mesh; experts
    # (num_experts, D, D) Shard(0) on "ep" of the sparse ("efsdp", "ep") mesh, FSDP2 on "efsdp".
    dense_mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))
    sparse_mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("efsdp", "ep"))
    torch.manual_seed(0)
    model = _Dense()
    experts = _Experts(distribute_tensor(torch.randn(4, D, D) * 0.1, sparse_mesh["ep"], [Shard(0)]))
    model.experts = experts
    fully_shard(experts, mesh=sparse_mesh["efsdp"])
    for sub in (model.w1, model.w2, model.head):
        fully_shard(sub, mesh=dense_mesh)
    fully_shard(model, mesh=dense_mesh)

    def expert_loss():
        g = torch.Generator().manual_seed(200 + rank)
        return experts(torch.randn(5, D, generator=g)).pow(2).mean()

    _backward(model, rank, extra=expert_loss)
    out["EP placements"] = [str(experts.w.grad.placements), str(experts.w.grad.device_mesh.mesh_dim_names)]
    params = list(model.parameters())
    for p in NORMS:
        _compare("EP ep_enabled=True", params, p, out, ep_enabled=True)
        _compare("EP ep_enabled=False", params, p, out, torchtitan_should_work=False)
    return out


def test_adapter_has_torchtitans_signature():
    from torchtitan.distributed.utils import clip_grad_norm_ as titan_clip

    from distclip.integrations.torchtitan import clip_grad_norm_ as ours_clip

    ours, titans = inspect.signature(ours_clip).parameters, inspect.signature(titan_clip).parameters
    # torchtitan's parameters, in its order and with its defaults; distclip's own come after them,
    # keyword-only with a default, so every torchtitan call site binds exactly as before
    assert list(ours)[: len(titans)] == list(titans)
    for name, param in titans.items():
        assert ours[name].default == param.default, name
        assert ours[name].kind == param.kind, name
    extra = [ours[name] for name in list(ours)[len(titans):]]
    assert [p.name for p in extra] == ["group", "guard"]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is None for p in extra)


# the rows titan_world makes, one test id each
TITAN_CASES = tuple(f"{name} p={p}" for name in ("FSDP2", "PP x FSDP2", "2D TP+FSDP2", "EP ep_enabled=True", "EP ep_enabled=False")
                    for p in NORMS)


@pytest.fixture(scope="module")
def titan_results():
    return run_world(titan_world, 4, timeout=400, pg_timeout_s=60)


def test_torchtitan_world_builds_the_layouts(titan_results):
    rows0 = titan_results[0]
    assert rows0["2D meshes"] == [("dp",), ("dp", "tp")], rows0["2D meshes"]
    assert "Shard(dim=0)" in rows0["EP placements"][0] and "ep" in rows0["EP placements"][1], rows0["EP placements"]
    for rows in titan_results:  # exactly the cases the tests below read
        assert sorted(k for k, v in rows.items() if isinstance(v, dict)) == sorted(TITAN_CASES)


@pytest.mark.parametrize("case", TITAN_CASES)
def test_against_torchtitan_on_four_ranks(titan_results, case):
    for rank, rows in enumerate(titan_results):
        row = rows[case]
        where = f"rank {rank}, {case}: {row}"
        # the norm: identical on every rank, equal to the float64 reference, a plain tensor
        assert row["ours"] == titan_results[0][case]["ours"], where
        assert row["ours"] == pytest.approx(row["ref"], rel=1e-6), where
        assert row["ours_type"] == "Tensor", where
        assert row["ref"] > MAX_NORM, where  # clipping active
        assert row["grads_ok"], where
        if row["torchtitan_should_work"]:
            # torchtitan agrees: same norm, same clipped grads, same return type
            assert "titan_error" not in row, where
            assert row["titan"] == pytest.approx(row["ours"], rel=1e-5), where
            assert row["same_grads_as_titan"], where
            assert row["titan_type"] == "Tensor", where
        else:
            # torchtitan raises on mixed meshes, where distclip is right
            assert "mesh" in row.get("titan_error", ""), where


# ----------------------------------------------------------------------------- install(): torchtitan's own Trainer


def _install_world(rank, world):
    """torchtitan's call, as its Trainer makes it (``dist_utils.clip_grad_norm_`` looked up on the
    module), on a mixed-mesh model: torchtitan's function raises; after ``install()`` the same
    call is distclip's and matches float64; ``uninstall()`` puts torchtitan's back."""
    import torchtitan.distributed.utils as dist_utils
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from distclip.integrations import torchtitan as distclip_titan

    original = dist_utils.clip_grad_norm_
    mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(0)
    model = nn.Sequential(nn.LayerNorm(D), nn.Linear(D, H), nn.ReLU(), nn.Linear(H, D))
    parallelize_module(model, mesh["tp"], {"1": ColwiseParallel(), "3": RowwiseParallel()})
    fully_shard(model, mesh=mesh["dp"])  # the LayerNorm on the dp mesh, the Linears on (dp, tp)
    model(torch.randn(4, D, generator=torch.Generator().manual_seed(1))).square().sum().backward()
    params = list(model.parameters())
    full = [p.grad.full_tensor().double() for p in params]
    ref = float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in full])))

    def titan_call(max_norm):  # torchtitan/trainer.py's call, verbatim but for the model
        return dist_utils.clip_grad_norm_([p for m in [model] for p in m.parameters()], max_norm, foreach=True,
                                          pp_mesh=None, ep_enabled=False)

    out = {"ref": ref}
    try:
        titan_call(1e9)
        out["titan"] = "no error"
    except Exception as e:  # noqa: BLE001
        out["titan"] = str(e)
    with distclip_titan.installed():
        distclip_titan.install()  # a second install changes nothing
        out["patched"] = dist_utils.clip_grad_norm_ is distclip_titan.clip_grad_norm_
        out["norm"] = float(titan_call(ref * 0.5))
        coef = ref * 0.5 / (out["norm"] + 1e-6)
        out["clipped"] = all(torch.allclose(p.grad.full_tensor().double(), g * coef, rtol=1e-5) for p, g in zip(params, full))
    out["restored"] = dist_utils.clip_grad_norm_ is original
    return out


def test_install_routes_torchtitans_own_call_to_distclip():
    for out in run_world(_install_world, 2, timeout=300):
        assert "mesh" in out["titan"], out  # torchtitan's own function raises on mixed meshes
        assert out["patched"] and out["restored"] and out["clipped"], out
        assert out["norm"] == pytest.approx(out["ref"], rel=1e-6), out


def test_install_reaches_the_trainers_lookup_and_names_imported_directly():
    import importlib.util
    import sys
    import types

    import torchtitan.distributed.utils as dist_utils

    from distclip.integrations import torchtitan as distclip_titan

    # torchtitan 0.3.0's Trainer looks the function up on the module at every step (its module
    # needs triton to import on CPU, so its source is read instead)
    source = open(importlib.util.find_spec("torchtitan.trainer").origin).read()
    assert "utils as dist_utils" in source and "dist_utils.clip_grad_norm_(" in source
    original = dist_utils.clip_grad_norm_
    loop = types.ModuleType("torchtitan._distclip_test_loop")  # a module that did `from ... import clip_grad_norm_`
    loop.clip_grad_norm_ = original
    sys.modules[loop.__name__] = loop
    try:
        distclip_titan.install()
        assert dist_utils.clip_grad_norm_ is distclip_titan.clip_grad_norm_
        assert loop.clip_grad_norm_ is distclip_titan.clip_grad_norm_
        distclip_titan.uninstall()
        distclip_titan.uninstall()  # nothing left to undo
        assert dist_utils.clip_grad_norm_ is original and loop.clip_grad_norm_ is original
    finally:
        distclip_titan.uninstall()
        del sys.modules[loop.__name__]
