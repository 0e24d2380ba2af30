"""Soak: a 4-rank world makes thousands of calls while the layout keeps changing, and neither the
answers nor the memory drift.

Every 100 calls a new model is built (DTensor shards on 1-D and 2-D meshes, plain replicas,
uneven marked experts, Partial grads, or a plain model re-wrapped with ``fully_shard`` halfway);
within each phase grads are set to None, parameters frozen and unfrozen. Every 7th call is
compared with the float64 reference over the full gradients. RSS at the end must be within 5% of
RSS after the first 1 000 calls (which matters once plans are cached across calls).

``pytest`` runs 2 000 calls; ``DISTCLIP_SOAK_CALLS=10000 pytest tests/smoke/test_soak.py`` runs the
full soak (results recorded in benchmarks/results/soak.json).
"""

import json
import math
import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.placement_types import Partial

import distclip
from harness import run_world
from worlds import dparam, full_grad, pparam, reference_norm

PHASE = 100
NORMS = (2.0, 1.0, math.inf, 0.5)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class Phase:
    """One model: parameters passed to distclip and their full grads (aligned, None = no grad)."""

    def __init__(self, index: int, mesh, mesh2, world: int) -> None:
        rank = dist.get_rank()
        kind = index % 5
        g = torch.Generator().manual_seed(index)
        n = 3 + int(torch.randint(0, 6, (1,), generator=g))
        self.params: list[torch.Tensor] = []
        self.full: list[torch.Tensor] = []  # per entry of self.entries
        self.owned: list[bool] = []  # whether this rank's params list holds the entry
        self.rewrap = None
        self.aligned = kind != 2  # params[i] holds full[i] on every rank
        shapes = [(2 * world * (1 + i % 3), 3 + i % 4) for i in range(n)]
        fulls = [full_grad(s, 1000 * index + i) for i, s in enumerate(shapes)]
        if kind == 0:  # DTensor shards, 1-D mesh, and plain replicas
            for i, f in enumerate(fulls):
                self.params.append(dparam(f, mesh, [Shard(i % 2)]) if i % 3 else pparam(f))
        elif kind == 1:  # 2-D mesh, mixed placements
            for i, f in enumerate(fulls):
                self.params.append(dparam(f, mesh2, [[Shard(0), Shard(1)], [Replicate(), Shard(0)], [Shard(1), Replicate()]][i % 3]))
        elif kind == 2:  # uneven experts (marked) and a dense replica
            for i, f in enumerate(fulls):
                if i % world == rank and i % world != world - 1:
                    self.params.append(distclip.mark_sharded(pparam(f), dist.group.WORLD))
            fulls = [f for i, f in enumerate(fulls) if i % world != world - 1]
            dense = full_grad((5,), 1000 * index + 99)
            self.params.append(pparam(dense))
            fulls.append(dense)
        elif kind == 3:  # Partial grads on the 1-D mesh, plus shards
            for i, f in enumerate(fulls):
                if i % 2:
                    p = nn.Parameter(distribute_tensor(torch.zeros_like(f), mesh, [Replicate()]))
                    p.grad = DTensor.from_local(f * (rank + 1) / (world * (world + 1) / 2), mesh, [Partial()], run_check=False)
                    self.params.append(p)
                else:
                    self.params.append(dparam(f, mesh, [Shard(0)]))
        else:  # a plain model, re-wrapped with fully_shard halfway through the phase
            from distclip import verify

            model = verify.new_model(torch.device("cpu"))
            verify.loss_of(model(verify.batch(torch.device("cpu")))).backward()
            fulls = [p.grad.detach().clone() for p in model.parameters()]
            self.params = list(model.parameters())
            self.rewrap = model
        self.full = fulls

    def rewrap_now(self, mesh) -> None:
        from torch.distributed.fsdp import fully_shard

        from distclip import verify

        model = self.rewrap
        model.zero_grad(set_to_none=True)
        fully_shard(model, mesh=mesh)
        verify.loss_of(model(verify.batch(torch.device("cpu")))).backward()
        self.params = list(model.parameters())
        self.rewrap = None


def _soak(rank, world, calls):
    import warnings

    warnings.filterwarnings("ignore")  # torch's warnings about the demo model, once per re-wrap
    torch.manual_seed(0)
    mesh = init_device_mesh("cpu", (world,))
    mesh2 = init_device_mesh("cpu", (2, world // 2))
    checks, failures = 0, []
    rss_early = None
    start = time.perf_counter()
    phase = None
    hidden: dict[int, torch.Tensor] = {}
    for call in range(calls):
        step = call % PHASE
        if step == 0:
            phase = Phase(call // PHASE, mesh, mesh2, world)  # the previous model is dropped here
            hidden = {}
        if phase.rewrap is not None and step == 50:
            phase.rewrap_now(mesh)  # a fresh backward: every grad is back
            hidden = {}
        if step in (30, 60) and phase.aligned:  # grads set to None (30) / params frozen (60), on every rank
            for i in range(0, len(phase.params), 3):
                p = phase.params[i]
                if p.grad is not None:
                    hidden[i] = p.grad
                    p.grad = None
                if step == 60:
                    p.requires_grad_(False)
        if step == 80:  # unfrozen, grads back
            for i, grad in hidden.items():
                phase.params[i].requires_grad_(True)
                phase.params[i].grad = grad
            hidden = {}
        p_norm = NORMS[call % len(NORMS)]
        total = distclip.clip_grad_norm_(phase.params, 1e30, p_norm) if call % 2 else distclip.clip.total_grad_norm(phase.params, p_norm)
        if call % 7 == 0:
            checks += 1
            ref = reference_norm([f for i, f in enumerate(phase.full) if i not in hidden], p_norm)
            if abs(float(total) - ref) > 1e-6 * max(ref, 1e-30):
                failures.append((call, p_norm, float(total), ref))
        if call + 1 == min(1000, calls // 2):  # the baseline: after the first 1 000 calls (every phase kind seen)
            import gc

            gc.collect()
            rss_early = _rss_mb()
    import gc

    phase = None
    gc.collect()
    return {"calls": calls, "checks": checks, "failures": failures[:5], "n_failures": len(failures),
            "rss_early_mb": rss_early, "rss_end_mb": _rss_mb(), "seconds": time.perf_counter() - start}


def test_soak_layout_changes_every_100_calls():
    calls = int(os.environ.get("DISTCLIP_SOAK_CALLS", "2000"))
    results = run_world(_soak, 4, calls, timeout=3600)
    for r in results:
        assert r["n_failures"] == 0, r["failures"]
        assert r["rss_end_mb"] <= 1.05 * r["rss_early_mb"], r
    if calls >= 10000:
        out = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "results", "soak.json")
        with open(out, "w") as f:
            json.dump({"world_size": 4, "per_rank": results, "machine": "2 CPU cores, gloo", "torch": torch.__version__}, f, indent=1)
