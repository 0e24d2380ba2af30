"""``Partial`` grads paired by name, not by position, on 4 gloo ranks.

Two LayerNorm-like parameters of the same shape hold ``Partial(sum)`` grads (TP + SequenceParallel).
Each rank passes them in its own order (what a ``set(...)`` of parameters gives): the norm, the
clipped grads and ``clip_grad_value_``'s full grads must equal one process's; ranks that hold
different ``Partial`` grads raise ``LayoutMismatchError`` on every rank. Before the fix, rank 0's
weight was summed with rank 1's bias.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, distribute_tensor

import distclip
from harness import run_world


def _full(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _model(mesh, rank, world):
    model = nn.LayerNorm(8)
    fulls = {}
    for i, (name, p) in enumerate(list(model.named_parameters())):
        dp = nn.Parameter(distribute_tensor(p.detach().clone(), mesh, [Replicate()]))
        setattr(model, name, dp)
        fulls[name] = _full((8,), 10 + i) * (3.0 if name == "weight" else 1.0)
        share = (rank + 1) / sum(range(1, world + 1))  # unequal summands: a wrong pairing shows
        dp.grad = DTensor.from_local(fulls[name] * share, mesh, [Partial()], run_check=False)
    return model, fulls


def _world(rank: int, world: int) -> dict[str, object]:
    mesh = init_device_mesh("cpu", (world,))
    out: dict[str, object] = {}
    model, fulls = _model(mesh, rank, world)
    params = list(model.parameters())
    ordered = params if rank % 2 == 0 else params[::-1]
    ref = float(torch.linalg.vector_norm(torch.cat([f.double() for f in fulls.values()])))
    out["ref"] = ref
    out["get_total_norm"] = float(distclip.get_total_norm([p.grad for p in ordered]))  # torch's two-step API
    max_norm = ref / 4
    out["clip_grad_norm_"] = float(distclip.clip_grad_norm_(ordered, max_norm))
    coef = max_norm / (ref + 1e-6)
    out["clipped"] = all(torch.allclose(p.grad.full_tensor(), fulls[n] * coef, rtol=1e-5, atol=1e-7)
                         for n, p in model.named_parameters())
    model, fulls = _model(mesh, rank, world)
    params = list(model.parameters())
    distclip.clip_grad_value_(params if rank % 2 == 0 else params[::-1], 0.3)
    out["clip_grad_value_"] = all(torch.allclose(p.grad.full_tensor(), fulls[n].clamp(-0.3, 0.3), atol=1e-6)
                                  for n, p in model.named_parameters())
    out["grad_norms"] = {k: float(v) for k, v in distclip.grad_norms(model).items()}
    out["grad_norms_ref"] = {n: float(f.clamp(-0.3, 0.3).double().norm()) for n, f in fulls.items()}
    # ranks holding different Partial grads: refused on every rank
    model, _ = _model(mesh, rank, world)
    held = list(model.parameters()) if rank else [model.weight, nn.Parameter(torch.zeros(3))]
    bias_like = DTensor.from_local(torch.ones(3), mesh, [Partial()], run_check=False)
    if rank == 0:
        held[1].grad = None
        held[1] = nn.Parameter(DTensor.from_local(torch.zeros(3), mesh, [Replicate()], run_check=False))  # no collective
        held[1].grad = bias_like
    try:
        distclip.get_total_norm([p.grad for p in held])
        out["mismatch"] = "no error"
    except distclip.LayoutMismatchError as e:
        out["mismatch"] = "LayoutMismatchError" + (" (names the grads)" if "Partial" in str(e) else str(e))
    except Exception as e:  # noqa: BLE001
        out["mismatch"] = f"{type(e).__name__}: {e}"
    return out


@pytest.fixture(scope="module")
def outcomes():
    return run_world(_world, 4, timeout=300, pg_timeout_s=30)


@pytest.mark.parametrize("fn", ["get_total_norm", "clip_grad_norm_"])
def test_norm_whatever_the_order(outcomes, fn):
    for r in outcomes:
        assert abs(r[fn] - r["ref"]) <= 1e-6 * r["ref"], (fn, r[fn], r["ref"])


def test_clipped_grads_whatever_the_order(outcomes):
    assert all(r["clipped"] for r in outcomes)


def test_clip_grad_value_whatever_the_order(outcomes):
    assert all(r["clip_grad_value_"] for r in outcomes)


def test_grad_norms_by_name(outcomes):
    for r in outcomes:
        for name, value in r["grad_norms_ref"].items():
            assert abs(r["grad_norms"][name] - value) <= 1e-5 * value, (name, r["grad_norms"][name], value)


def test_different_partial_grads_refused_on_every_rank(outcomes):
    assert all(r["mismatch"] == "LayoutMismatchError (names the grads)" for r in outcomes), [r["mismatch"] for r in outcomes]
