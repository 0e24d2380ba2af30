"""The two-step API, models on part of the world and marks that survive replacement, in real
4-rank gloo worlds, against float64 single-process references:

- torch's two-step API: ``get_total_norm([p.grad ...])`` measures the tensors given (plain
  replicas, DTensor shards, ``Partial`` grads), then ``clip_grads_with_norm_``; gradients whose
  layout only their parameter knows (marked, FSDP1 flat) are refused on every rank;
- models on part of the world: ``group=`` (two models on disjoint halves; only the holders call;
  meshes outside the group refused; one rank's bad input raises in its group only);
- marks that survive replacement: ``mark_sharded(module, group)`` through
  ``load_state_dict(assign=True)`` on a meta-initialised MoE and through ``fully_shard``; a
  per-parameter mark, kept by its slot, survives the same way; a freed FSDP1 model reports nothing;
- ``clip_grad_value_`` on ``Partial`` grads clamps the full gradient.

Every check is recorded, not raised, so one world reports them all; each has a before/after or a
mutant showing it can fail.
"""

from __future__ import annotations

import gc
import math
import time
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.placement_types import Partial

from checks import reference_norm
from harness import CaseWorld

NORMS = (1.0, 2.0, math.inf, 0.5)


def _full(shape, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * scale


def _close(a, b, rtol=1e-6):
    return abs(a - b) <= rtol * abs(b)


def _raises(fn, cls, text=""):
    try:
        fn()
    except cls as e:
        return text in str(e), f"{type(e).__name__}: {str(e)[:160]}"
    except Exception as e:  # noqa: BLE001
        return False, f"wrong exception {type(e).__name__}: {e}"
    return False, "did not raise"


class Experts(nn.Module):
    def __init__(self, owned, dim=6):
        super().__init__()
        self.experts = nn.ModuleDict({str(e): nn.Linear(dim, dim, bias=False) for e in owned})
        self.dense = nn.Linear(dim, dim)

    def forward(self, x):
        """The loss: a dense term every rank holds plus one term per expert (the terms of the
        experts held elsewhere are computed there), so each grad is the full model's."""
        loss = self.dense(x).pow(2).sum()
        for e, layer in self.experts.items():
            loss = loss + ((int(e) + 1) * layer(x)).pow(2).sum()
        return loss


def _expert_state(owned, dim=6):
    torch.manual_seed(0)
    full = Experts(range(4), dim)
    sd = {k: v for k, v in full.state_dict().items() if not k.startswith("experts.") or int(k.split(".")[1]) in owned}
    return full, sd


def _moe_reference(x):
    full, _ = _expert_state(range(4))
    full(x).backward()
    return [p.grad for p in full.parameters()]


def _world(rank, world):
    import distclip

    out: list[tuple[str, bool, str]] = []

    def rec(name, ok, msg=""):
        out.append((name, bool(ok), msg))

    mesh = init_device_mesh("cpu", (world,))
    halves = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("model", "dp"))
    half = halves["dp"]  # this rank's half: ranks {0, 1} or {2, 3}
    model_id = halves.get_local_rank("model")

    # ---------------------------------------------------------------- 1. torch's two-step API
    fulls = [_full((5, 3), 1), _full((7,), 2), _full((4, 4), 3)]
    plain = [nn.Parameter(torch.zeros_like(f)) for f in fulls]
    for p, f in zip(plain, fulls):
        p.grad = f.clone()  # DDP: every rank holds the same full grads
    shards = []
    for p_full in fulls:
        q = nn.Parameter(distribute_tensor(torch.zeros_like(p_full), mesh, [Shard(0)]))
        q.grad = distribute_tensor(p_full.clone(), mesh, [Shard(0)])
        shards.append(q)
    for p in NORMS:
        ref = reference_norm(fulls, p)
        got = float(distclip.get_total_norm([q.grad for q in plain], p))
        rec(f"two-step plain grads p={p}", _close(got, ref), f"{got} vs {ref} (0.0 before the fix)")
        got = float(distclip.get_total_norm([q.grad for q in shards], p))
        rec(f"two-step DTensor grads p={p}", _close(got, ref), f"{got} vs {ref}")
    ref = reference_norm(fulls, 2.0)
    total = distclip.get_total_norm([q.grad for q in shards])
    distclip.clip_grads_with_norm_(shards, 1.0, total)
    coef = 1.0 / (ref + 1e-6)
    ok = all(torch.allclose(q.grad.full_tensor(), f * coef, rtol=1e-5) for q, f in zip(shards, fulls))
    rec("two-step then clip_grads_with_norm_", ok)
    # a Partial grad given as a tensor is made whole first
    weights = [float(r + 1) for r in range(world)]
    ln = _full((8,), 9)
    partial = DTensor.from_local(ln * weights[rank] / sum(weights), mesh, [Partial()], run_check=False)
    got = float(distclip.get_total_norm([partial, plain[0].grad]))
    rec("two-step Partial grad", _close(got, reference_norm([ln, fulls[0]], 2.0)), f"{got}")
    # parameters given are measured as torch measures them (their values), with a warning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = float(distclip.get_total_norm(plain))
    rec("parameters given: values measured, warned", got == 0.0 and any("measures the tensors" in str(w.message) for w in caught))
    # an empty generator warns, as torch does
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        distclip.clip_grad_norm_((p for p in []), 1.0)
    rec("empty generator warns", any("empty generator" in str(w.message) for w in caught))
    # the grad of a marked parameter: its layout is on the parameter, not the tensor -> refused
    expert = nn.Parameter(torch.zeros(3))
    expert.grad = _full((3,), 20 + rank)
    distclip.mark_sharded(expert, dist.group.WORLD)
    ok, msg = _raises(lambda e=expert: distclip.get_total_norm([e.grad, plain[0].grad]), ValueError, "mark_sharded")
    rec("marked grad given: ValueError on every rank", ok, msg)
    expected = math.sqrt(sum(float(_full((3,), 20 + r).double().pow(2).sum()) for r in range(world)) + float(fulls[0].double().pow(2).sum()))
    holder = nn.Module()
    holder.expert, holder.plain = expert, plain[0]
    got = float(distclip.get_total_norm(holder))
    rec("marked params via the module", _close(got, expected), f"{got} vs {expected}")
    del expert, holder
    gc.collect()

    # FSDP1 flat grads given without the module -> refused; the module -> right
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    for orig in (False, True):
        torch.manual_seed(0)
        fsdp = FSDP(nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 3)), use_orig_params=orig, device_id=torch.device("cpu"))
        fsdp(torch.ones(2, 6)).pow(2).sum().backward()
        grads = [p.grad for p in fsdp.parameters() if p.grad is not None]
        ok, msg = _raises(lambda grads=grads: distclip.get_total_norm(grads), ValueError, "FSDP1")
        rec(f"FSDP1 flat grads given (use_orig_params={orig}): ValueError", ok, msg)
        torch.manual_seed(0)
        single = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 3))
        single(torch.ones(2, 6)).pow(2).sum().backward()
        ref1 = reference_norm([p.grad for p in single.parameters()], 2.0)
        got = float(distclip.get_total_norm(fsdp))
        rec(f"FSDP1 module given (use_orig_params={orig})", _close(got, ref1), f"{got} vs {ref1}")
        del fsdp, grads
    gc.collect()

    # ---------------------------------------------------------------- 2. group=
    # Two models of the same architecture on the two halves, each sharded over its half.
    model_fulls = [_full((6, 4), 40 + model_id, 1 + model_id), _full((8,), 50 + model_id)]
    own = []
    for f in model_fulls:
        q = nn.Parameter(distribute_tensor(torch.zeros_like(f), half, [Shard(0)]))
        q.grad = distribute_tensor(f.clone(), half, [Shard(0)])
        own.append(q)
    saved = [q.grad.to_local().clone() for q in own]
    for p in NORMS:
        for q, s in zip(own, saved):
            q.grad.to_local().copy_(s)
        ref = reference_norm(model_fulls, p)
        got = float(distclip.clip_grad_norm_(own, ref / 2, p, group=half))
        coef = min(1.0, (ref / 2) / (ref + 1e-6))
        clipped = all(torch.allclose(q.grad.full_tensor(), f * coef, rtol=1e-5) for q, f in zip(own, model_fulls))
        rec(f"two models, group= p={p}", _close(got, ref) and clipped, f"{got} vs {ref}")
    for q, s in zip(own, saved):
        q.grad.to_local().copy_(s)
    mixed = float(distclip.get_total_norm([q.grad for q in own]))  # mutant: every rank in one call
    rec("two models without group= mix the norms (the bug)", not _close(mixed, reference_norm(model_fulls, 2.0), 1e-3), f"{mixed}")
    by_name = distclip.grad_norms([("w", own[0]), ("b", own[1])], group=half)
    ok = _close(float(by_name["total"]), reference_norm(model_fulls, 2.0)) and _close(float(by_name["w"]), reference_norm(model_fulls[:1], 2.0))
    rec("grad_norms with group=", ok)
    rec("describe with group=", "2 ranks per stage" in distclip.describe([("w", own[0])], group=half))
    report = distclip.audit([("w", own[0]), ("b", own[1])], group=half)
    rec("audit with group=", report.ok and _close(report.norm, reference_norm(model_fulls, 2.0)), str(report.problems))

    from distclip.integrations.torchtitan import clip_grad_norm_ as titan_clip

    got = float(titan_clip(own, 1e9, group=half))  # the integrations pass group= through
    rec("torchtitan adapter with group=", _close(got, reference_norm(model_fulls, 2.0)), f"{got}")
    # Only the ranks holding the model call: rank 2 and 3 do not take part at all.
    if model_id == 0:
        got = float(distclip.get_total_norm([q.grad for q in own], group=half))
        rec("only the holders call", _close(got, reference_norm(model_fulls, 2.0)))
    else:
        rec("only the holders call", True)
    dist.barrier()

    # A mesh reaching outside the group: refused on every rank of the group.
    ok, msg = _raises(lambda: distclip.get_total_norm([shards[0].grad], group=half), ValueError, "outside group")
    rec("mesh outside group: ValueError", ok, msg)
    # Bad input on one rank of a group: both ranks of that group raise at once; the other group is untouched.
    start = time.perf_counter()
    bad = rank == 1
    # Without host reads (the accelerator path, DISTCLIP_HOST_READS=never) the peers of the bad rank
    # cannot read its flag: their norm is NaN and their grads stay as they are, as documented.
    host_reads = distclip.host_reads.host_reads_allowed(torch.device("cpu"))
    if model_id == 0 and (bad or host_reads):
        ok, msg = _raises(lambda: distclip.clip_grad_norm_(own, math.nan if bad else 1.0, group=half), ValueError)
        rec("bad input in one group raises in that group", ok and time.perf_counter() - start < 5, msg)
    elif model_id == 0:
        before = [q.grad.to_local().clone() for q in own]
        got = float(distclip.clip_grad_norm_(own, 1.0, group=half))
        unchanged = all(torch.equal(b, q.grad.to_local()) for b, q in zip(before, own))
        rec("bad input in one group raises in that group", math.isnan(got) and unchanged, f"{got}")
    else:
        got = float(distclip.clip_grad_norm_(own, 1e9, group=half))
        rec("bad input in one group raises in that group", _close(got, reference_norm(model_fulls, 2.0)))
    dist.barrier()
    # A rank with no model at all in the default group: a clear error naming the way out.
    params = [] if model_id == 1 else [q.grad for q in own]
    if host_reads:
        ok, msg = _raises(lambda: distclip.get_total_norm(params), distclip.LayoutMismatchError, "group=")
    else:  # the verdict stays on the device: NaN everywhere, and the error with error_if_nonfinite
        ok, msg = math.isnan(float(distclip.get_total_norm(params))), "not NaN"
        ok = ok and _raises(lambda: distclip.get_total_norm(params, error_if_nonfinite=True), distclip.LayoutMismatchError, "group=")[0]
    rec("[] on ranks without the model: LayoutMismatchError pointing to group=", ok, msg)

    # ---------------------------------------------------------------- 3. marks that survive
    owned = [e for e in range(4) if e % world == rank]
    x = _full((3, 6), 60)
    ref_moe = reference_norm(_moe_reference(x), 2.0)
    for how in ("module mark", "param mark"):
        with torch.device("meta"):
            moe = Experts(owned)
        if how == "module mark":
            distclip.mark_sharded(moe.experts, dist.group.WORLD)
        else:
            for p in moe.experts.parameters():
                distclip.mark_sharded(p, dist.group.WORLD)
            del p  # the loop variable would keep the last meta parameter alive
        _, sd = _expert_state(owned)
        moe.load_state_dict(sd, assign=True)
        gc.collect()
        moe(x).backward()
        # both kinds of mark are kept by slot: they follow the parameters load_state_dict(assign=True) puts there
        got = float(distclip.clip_grad_norm_(moe, 1e9))
        rec(f"meta init + {how} + load(assign=True)", _close(got, ref_moe), f"{got} vs {ref_moe}")
        del moe
        gc.collect()

    # A Megatron-style TP weight marked as a module before fully_shard keeps its mark.
    from torch.distributed.fsdp import fully_shard

    tp = halves["dp"]  # 2 ranks: the TP group; the other mesh dim is data-parallel
    w_full = _full((4, 6), 70)
    layer = nn.Linear(6, 4 // tp.size(), bias=False)
    distclip.mark_sharded(layer, tp)
    fully_shard(layer, mesh=halves["model"])
    piece = w_full.tensor_split(tp.size(), 0)[tp.get_local_rank()]
    layer.weight.grad = distribute_tensor(piece.clone(), halves["model"], [Shard(0)])
    got = float(distclip.get_total_norm(layer))
    rec("module mark survives fully_shard", _close(got, reference_norm([w_full], 2.0)), f"{got} vs {reference_norm([w_full], 2.0)}")
    del layer
    gc.collect()

    # A marked FSDP1 model (use_orig_params, marked after wrapping) freed and rebuilt: no false report.
    for attempt in range(2):
        torch.manual_seed(0)
        fsdp = FSDP(nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 3)), use_orig_params=True, device_id=torch.device("cpu"))
        for p in fsdp.parameters():
            distclip.mark_replicated(p, dist.group.WORLD)
        fsdp(torch.ones(2, 6)).pow(2).sum().backward()
        ok, msg = True, ""
        try:
            distclip.clip_grad_norm_(fsdp, 1e9)
        except Exception as e:  # noqa: BLE001
            ok, msg = False, f"{type(e).__name__}: {e}"
        rec(f"FSDP1 marked after wrapping, freed and rebuilt (build {attempt})", ok, msg)
        del fsdp
        gc.collect()

    # ---------------------------------------------------------------- 5. clip_grad_value_ on Partial grads
    c = 0.5
    full_ln = _full((16,), 80, 2.0)
    summand = full_ln * weights[rank] / sum(weights)
    p_ln = nn.Parameter(distribute_tensor(torch.zeros(16), mesh, [Replicate()]))
    p_ln.grad = DTensor.from_local(summand.clone(), mesh, [Partial()], run_check=False)
    distclip.clip_grad_value_([p_ln], c)
    whole = p_ln.grad.full_tensor()
    expected = full_ln.clamp(-c, c)
    naive = sum(  # mutant: clamping each summand
        (full_ln * w / sum(weights)).clamp(-c, c) for w in weights)
    ok = torch.allclose(whole, expected, atol=1e-6) and not torch.allclose(naive, expected)
    rec("clip_grad_value_ Partial(sum): full gradient clamped", ok, f"max |diff| {float((whole - expected).abs().max())}")
    p_avg = nn.Parameter(distribute_tensor(torch.zeros(16), mesh, [Replicate()]))
    p_avg.grad = DTensor.from_local((full_ln * weights[rank] * world / sum(weights)).clone(), mesh, [Partial("avg")], run_check=False)
    distclip.clip_grad_value_([p_avg], c)
    rec("clip_grad_value_ Partial(avg)", torch.allclose(p_avg.grad.full_tensor(), expected, atol=1e-6))
    return out


# The world's records, in the order every rank makes them: one test id each.
CASES = (
    *(f"two-step {kind} grads p={p}" for p in NORMS for kind in ("plain", "DTensor")),
    "two-step then clip_grads_with_norm_",
    "two-step Partial grad",
    "parameters given: values measured, warned",
    "empty generator warns",
    "marked grad given: ValueError on every rank",
    "marked params via the module",
    *(name for orig in (False, True) for name in (f"FSDP1 flat grads given (use_orig_params={orig}): ValueError",
                                                  f"FSDP1 module given (use_orig_params={orig})")),
    *(f"two models, group= p={p}" for p in NORMS),
    "two models without group= mix the norms (the bug)",
    "grad_norms with group=",
    "describe with group=",
    "audit with group=",
    "torchtitan adapter with group=",
    "only the holders call",
    "mesh outside group: ValueError",
    "bad input in one group raises in that group",
    "[] on ranks without the model: LayoutMismatchError pointing to group=",
    *(f"meta init + {how} + load(assign=True)" for how in ("module mark", "param mark")),
    "module mark survives fully_shard",
    *(f"FSDP1 marked after wrapping, freed and rebuilt (build {attempt})" for attempt in range(2)),
    "clip_grad_value_ Partial(sum): full gradient clamped",
    "clip_grad_value_ Partial(avg)",
)


@pytest.fixture(scope="module")
def two_step_world():
    """Every rank makes exactly CASES' records, in order (else every case fails)."""
    return CaseWorld(_world, 4, CASES, timeout=400)


@pytest.mark.parametrize("case", CASES)
def test_two_step_groups_marks_partial_value(two_step_world, case):
    two_step_world.check(case)
