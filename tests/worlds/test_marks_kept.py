"""Marks kept by slot, in one 4-rank gloo world, against float64 references.

- a ``mark_replicated`` made on a parameter before ``fully_shard`` replaces it (a weight tied
  across two pipeline stages): counted once, not twice;
- ``load_state_dict(assign=True)`` (not from the meta device) and ``to_empty`` after a mark on
  plain and DTensor parameters: the mark holds;
- one model's lost mark (a module mark FSDP1 flattened away) is reported in that model's call
  only, on every rank, never in a call on another model, however the collector runs;
- ``mark_sharded`` on what FSDP1 already shards over its own group: refused with a message that
  says so (FULL_SHARD with a mark over the world, HYBRID_SHARD with one over the shard group).
"""

from __future__ import annotations

import gc

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

import distclip
from harness import run_world


def _ref(tensors) -> float:
    return float(torch.linalg.vector_norm(torch.cat([t.detach().double().reshape(-1) for t in tensors])))


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(abs(b), 1e-12)


def _full(t) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class _TwoBranches(nn.Module):
    """A weight tied across two pipeline stages (the same values and grad on both) and one of the
    stage's own: two branches, so the tied weight's grad is a true copy."""

    def __init__(self, stage: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tied = nn.Linear(4, 4, bias=False)
        torch.manual_seed(1 + stage)
        self.own = nn.Linear(4, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tied(x).pow(2).sum() + self.own(x).pow(2).sum()


def _world(rank: int, world: int) -> dict[str, str]:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy, fully_shard

    torch.set_num_threads(1)
    out: dict[str, str] = {}

    def record(name: str, fn) -> None:
        try:
            out[name] = fn()
        except Exception as e:  # noqa: BLE001
            out[name] = f"{type(e).__name__}: {e}"

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "dp"))  # stage = pp coordinate
    stage = mesh.get_coordinate()[0]
    pp_group = mesh["pp"].get_group()  # this rank and its peer on the other stage

    def tied_before_fully_shard() -> str:
        model = _TwoBranches(stage)
        distclip.mark_replicated(model.tied.weight, pp_group)  # before fully_shard replaces the parameter
        fully_shard(model, mesh=mesh["dp"])
        model(torch.ones(2, 4)).backward()
        fulls = {n: _full(p.grad) for n, p in model.named_parameters()}
        others = [torch.empty_like(fulls["own.weight"]) for _ in range(2)]
        dist.all_gather(others, fulls["own.weight"].contiguous(), group=pp_group)
        ref = _ref([fulls["tied.weight"], *others])  # the tied copy once, each stage's own weight
        got = float(distclip.get_total_norm(model, pp_group=pp_group))
        return "ok" if _close(got, ref) else f"{got} vs {ref}"

    record("mark_replicated before fully_shard", tied_before_fully_shard)

    def assign_and_to_empty(dtensor: bool) -> str:
        # an expert per rank (plain, marked over the world) or per stage (FSDP2 over dp, marked over pp)
        torch.manual_seed(stage if dtensor else rank)
        experts = nn.Linear(3, 2)
        group = pp_group if dtensor else dist.group.WORLD
        if dtensor:
            fully_shard(experts, mesh=mesh["dp"])
        model = nn.Sequential(experts)
        distclip.mark_sharded(experts.weight, group)
        distclip.mark_sharded(experts.bias, group)
        model(torch.ones(2, 3)).pow(2).sum().backward()
        saved = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        gathered = []
        for g in saved.values():
            f = _full(g).contiguous()
            parts = [torch.empty_like(f) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, f, group=group)
            gathered += parts
        ref = _ref(gathered)
        results = []
        state = {k: v.detach().clone() if not hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
        model.load_state_dict(state, assign=True)
        for n, p in model.named_parameters():
            p.grad = saved[n].clone()
        results.append(float(distclip.get_total_norm(model)))
        model.to_empty(device="cpu")
        for n, p in model.named_parameters():
            p.grad = saved[n].clone()
        results.append(float(distclip.get_total_norm(model)))
        bad = [r for r in results if not _close(r, ref)]
        return "ok" if not bad else f"{results} vs {ref}"

    record("assign=True and to_empty, plain", lambda: assign_and_to_empty(False))
    record("assign=True and to_empty, DTensor", lambda: assign_and_to_empty(True))

    def lost_mark_reported_on_its_model_only() -> str:
        inner = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
        distclip.mark_sharded(inner[0], dist.group.WORLD)
        lost = FSDP(inner, use_orig_params=False, device_id=torch.device("cpu"))  # flattens the marked slots
        lost(torch.ones(2, 4)).sum().backward()
        ddp_like = nn.Linear(4, 4)
        ddp_like(torch.ones(2, 4)).sum().backward()
        for _ in range(3):  # another model's calls never see this model's lost mark
            gc.collect()
            distclip.clip_grad_norm_(ddp_like, 1e9)
        try:
            distclip.clip_grad_norm_(lost, 1e9)
            return "the lost mark was not reported"
        except ValueError as e:
            if "marks were lost" not in str(e):
                return f"wrong message: {e}"
        del lost, inner
        gc.collect()
        for _ in range(3):
            distclip.clip_grad_norm_(ddp_like, 1e9)  # a freed model's marks report nothing anywhere
        return "ok"

    record("lost mark reported on its model only", lost_mark_reported_on_its_model_only)

    def fsdp1_own_group(strategy: str) -> str:
        torch.manual_seed(0)
        if strategy == "HYBRID_SHARD":
            hsdp = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
            model = FSDP(nn.Linear(4, 4), device_mesh=hsdp, sharding_strategy=ShardingStrategy.HYBRID_SHARD,
                         use_orig_params=False, device_id=torch.device("cpu"))
            group = hsdp["shard"].get_group()
        else:
            model = FSDP(nn.Linear(4, 4), use_orig_params=False, device_id=torch.device("cpu"))
            group = dist.group.WORLD
        model(torch.ones(2, 4)).sum().backward()
        flat = next(iter(model.parameters()))
        distclip.mark_sharded(flat, group)
        try:
            distclip.clip_grad_norm_(model, 1e9)
            return "not refused"
        except ValueError as e:
            return "ok" if "already shards" in str(e) else f"wrong message: {e}"

    record("FSDP1 FULL_SHARD, mark over the world", lambda: fsdp1_own_group("FULL_SHARD"))
    record("FSDP1 HYBRID_SHARD, mark over the shard group", lambda: fsdp1_own_group("HYBRID_SHARD"))
    dist.barrier()
    return out


CASES = (
    "mark_replicated before fully_shard",
    "assign=True and to_empty, plain",
    "assign=True and to_empty, DTensor",
    "lost mark reported on its model only",
    "FSDP1 FULL_SHARD, mark over the world",
    "FSDP1 HYBRID_SHARD, mark over the shard group",
)


@pytest.fixture(scope="module")
def outcomes() -> list[dict[str, str]]:
    return run_world(_world, 4, timeout=600, pg_timeout_s=60)


@pytest.mark.parametrize("case", CASES)
def test_marks_kept_by_slot(outcomes, case):
    bad = {f"rank {rank}: {per_rank.get(case, 'not run')}" for rank, per_rank in enumerate(outcomes) if per_rank.get(case) != "ok"}
    assert not bad, sorted(bad)
