"""Drop-in for the code torch users write, on 4 gloo ranks against float64 references.

- the result's kind: a ``Replicate`` DTensor where torch returns a DTensor (every grad a DTensor
  on one mesh), already reduced, so ``.full_tensor()``, ``.to_local()``, ``.item()``, ``float()``
  and ``.mean().item()`` give the global norm on every rank; a plain tensor for DDP grads and where
  torch raises (several meshes); ``clip_grads_with_norm_`` takes either;
- ``get_total_norm`` given parameters warns whenever they look like parameters, also with frozen
  ones (LoRA);
- complex grads with the conjugate bit and sparse grads (replicated, and a table per rank marked
  sharded): their norms for every p and their scaling;
- names that two pipeline stages share (stages built as separate ``nn.Sequential``s) are made
  unique by stage in ``grad_norms`` and ``GradGuard``'s ``nonfinite``.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

import distclip
from harness import run_world


def _ref(tensors) -> float:
    return float(torch.linalg.vector_norm(torch.cat([t.detach().double().reshape(-1) for t in tensors])))


def _close(a: float, b: float, rtol: float = 1e-6) -> bool:
    return abs(a - b) <= rtol * max(abs(b), 1e-12)


def _world(rank: int, world: int) -> dict[str, str]:
    from torch.distributed.fsdp import fully_shard

    out: dict[str, str] = {}
    torch.manual_seed(0)
    mesh = init_device_mesh("cpu", (world,))
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 3))
    fully_shard(model, mesh=mesh)
    model(torch.randn(4, 6, generator=torch.Generator().manual_seed(rank))).pow(2).sum().backward()
    ref = _ref([p.grad.full_tensor() for p in model.parameters()])

    def readings(total) -> list[float]:
        return [float(total.full_tensor()), float(total.to_local()), total.item(), float(total), total.mean().item()]

    total = distclip.get_total_norm(model)
    ok = isinstance(total, DTensor) and all(_close(v, ref) for v in readings(total))
    out["FSDP2 get_total_norm: Replicate DTensor"] = "ok" if ok else f"{type(total).__name__} {total}"
    before = [p.grad.full_tensor().clone() for p in model.parameters()]
    total = distclip.clip_grad_norm_(model, ref / 2)
    ok = isinstance(total, DTensor) and all(_close(v, ref) for v in readings(total))
    ok = ok and all(torch.allclose(p.grad.full_tensor(), b * (ref / 2) / (ref + 1e-6), rtol=1e-5)
                    for p, b in zip(model.parameters(), before))
    out["FSDP2 clip_grad_norm_: Replicate DTensor"] = "ok" if ok else f"{type(total).__name__} {total}"
    total = distclip.get_total_norm(model)
    distclip.clip_grads_with_norm_(model, 1.0, total)  # takes the DTensor
    out["clip_grads_with_norm_ takes it"] = "ok" if _close(float(distclip.get_total_norm(model)), min(float(total), 1.0), 1e-5) \
        else "wrong"

    plain = nn.Linear(4, 2)
    plain(torch.ones(2, 4)).sum().backward()
    total = distclip.clip_grad_norm_(plain, 1e9)
    out["plain grads: plain tensor"] = "ok" if type(total) is torch.Tensor else type(total).__name__

    # torch raises on two meshes: a plain tensor
    mesh2 = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("a", "b"))
    two = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    fully_shard(two[0], mesh=mesh)
    fully_shard(two[1], mesh=mesh2["a"])
    fully_shard(two, mesh=mesh)
    two(torch.ones(2, 4)).sum().backward()
    total = distclip.clip_grad_norm_(two, 1e9)
    out["two meshes: plain tensor"] = "ok" if type(total) is torch.Tensor else type(total).__name__

    # get_total_norm(parameters) with frozen ones (LoRA): warned, as when every one has a grad
    lora = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    lora[0].weight.requires_grad_(False)
    lora(torch.ones(2, 4)).sum().backward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        distclip.get_total_norm(list(lora.parameters()))
    out["frozen parameters given: warned"] = "ok" if any("measures the tensors" in str(w.message) for w in caught) else "no warning"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        distclip.get_total_norm([p.grad for p in lora.parameters() if p.grad is not None])
    out["grads given: no warning"] = "ok" if not any("measures the tensors" in str(w.message) for w in caught) else "warned"
    # complex grads with the conjugate bit (``w.conj()`` in the forward), replicated (DDP-like)
    torch.manual_seed(3)
    w = nn.Parameter(torch.randn(5, 4, dtype=torch.complex64))
    (torch.randn(3, 5, dtype=torch.complex64) @ w.conj()).abs().pow(2).sum().backward()
    ref_c = float(torch.linalg.vector_norm(w.grad.resolve_conj().to(torch.complex128)))
    got_c = float(distclip.get_total_norm([w.grad]))
    before_c = w.grad.resolve_conj().clone()
    clipped_c = float(distclip.clip_grad_norm_([w], ref_c / 2))
    scaled = torch.allclose(w.grad.resolve_conj(), before_c * (ref_c / 2) / (ref_c + 1e-6), rtol=1e-5)
    ok = w.grad.is_conj() and _close(got_c, ref_c) and _close(clipped_c, ref_c) and scaled
    out["conj grads: norm and scaling"] = "ok" if ok else f"{got_c} {clipped_c} vs {ref_c}, scaled {scaled}"

    # sparse grads: an nn.Embedding(sparse=True) replicated (DDP-like), and a table per rank marked sharded
    torch.manual_seed(4)
    emb = nn.Embedding(12, 3, sparse=True)
    emb(torch.tensor([1, 2, 1, 7])).pow(2).sum().backward()  # repeated index: uncoalesced
    values = emb.weight.grad.coalesce().values().double()
    ok = True
    for p in (1.0, 2.0, math.inf, 0.0, -math.inf):
        ok = ok and _close(float(distclip.get_total_norm(emb, p)), float(torch.linalg.vector_norm(values, p)))
    total = float(distclip.clip_grad_norm_(emb, 0.5))
    ok = ok and _close(total, float(values.norm())) and _close(float(emb.weight.grad.to_dense().norm()), 0.5, 1e-5)
    out["sparse replicated: every p, clipped"] = "ok" if ok else "wrong"
    torch.manual_seed(20 + rank)
    table = nn.Embedding(8, 2, sparse=True)
    table(torch.tensor([rank % 8, (rank + 3) % 8, rank % 8])).pow(2).sum().backward()
    distclip.mark_sharded(table, dist.group.WORLD)
    local = table.weight.grad.coalesce().values().double()
    parts = [torch.zeros(1, dtype=torch.float64) for _ in range(world)]
    dist.all_gather(parts, local.pow(2).sum().reshape(1))
    ref_t = float(torch.cat(parts).sum().sqrt())
    out["sparse table per rank, marked"] = "ok" if _close(float(distclip.get_total_norm(table)), ref_t) else "wrong"

    # stages built as separate nn.Sequentials: the same names on both, made unique by stage
    pp_mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("pp", "dp"))
    stage = pp_mesh.get_coordinate()[0]
    pp_group = pp_mesh["pp"].get_group()
    torch.manual_seed(10 + stage)
    stage_model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    stage_model(torch.ones(2, 4)).pow(2).sum().backward()  # the same on both dp replicas of a stage
    mine = {f"stage{stage}.{n}": float(p.grad.double().norm()) for n, p in stage_model.named_parameters()}
    gathered: list = [None] * world
    dist.all_gather_object(gathered, mine)
    expected = {k: v for part in gathered for k, v in part.items()}
    norms = distclip.grad_norms(stage_model, pp_group=pp_group)
    got = {k: float(v) for k, v in norms.items() if k != "total"}
    ok = set(got) == set(expected) and all(_close(got[k], expected[k], 1e-6) for k in expected)
    out["names unique across stages"] = "ok" if ok else f"{sorted(got)} vs {sorted(expected)}"
    if stage == 1:
        stage_model[0].weight.grad[0, 0] = float("nan")
    guard = distclip.GradGuard(1.0)
    found = guard.clip_(stage_model, pp_group=pp_group).nonfinite
    out["GradGuard nonfinite names unique across stages"] = "ok" if found == ["stage1.0.weight"] else str(found)
    dist.barrier()
    return out


CASES = (
    "FSDP2 get_total_norm: Replicate DTensor",
    "FSDP2 clip_grad_norm_: Replicate DTensor",
    "clip_grads_with_norm_ takes it",
    "plain grads: plain tensor",
    "two meshes: plain tensor",
    "frozen parameters given: warned",
    "grads given: no warning",
    "conj grads: norm and scaling",
    "sparse replicated: every p, clipped",
    "sparse table per rank, marked",
    "names unique across stages",
    "GradGuard nonfinite names unique across stages",
)


@pytest.fixture(scope="module")
def outcomes():
    return run_world(_world, 4, timeout=300, pg_timeout_s=60)


@pytest.mark.parametrize("case", CASES)
def test_drop_in(outcomes, case):
    bad = [f"rank {r}: {o.get(case, 'not run')}" for r, o in enumerate(outcomes) if o.get(case) != "ok"]
    assert not bad, bad


def test_single_process_result_stays_plain():
    p = nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    total = distclip.clip_grad_norm_([p], 1.0)
    assert type(total) is torch.Tensor and math.isclose(float(total), math.sqrt(3), rel_tol=1e-6)
