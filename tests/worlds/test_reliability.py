"""Reliability: ranks that disagree, layouts that change, ranks that die or stall, no partial
updates on error."""

import math
import os
import time

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard

import distclip
from harness import run_world
from worlds import check_layout, dparam, full_grad, local_of, pparam, same_on_every_rank

# ----------------------------------------------------------------------------- disagreement


def _disagreement(world, case):
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (world,))
    params = [dparam(full_grad((8, 3), 1), mesh, [Shard(0)]), pparam(full_grad((5,), 2))]
    kwargs = dict(max_norm=1.0, norm_type=2.0)
    odd = world - 1
    if case == "norm_type":
        kwargs["norm_type"] = 1.0 if rank == odd else 2.0
    elif case == "finite_vs_inf_norm_type":  # different reduction ops (SUM vs MAX), same vector size
        kwargs["norm_type"] = math.inf if rank == odd else 2.0
    elif case == "max_norm":
        kwargs["max_norm"] = 0.5 if rank == odd else 1.0
    elif case == "pp_group":  # the odd rank claims every rank is its own stage
        pp = dist.new_group(list(range(world)))  # every rank joins, only some use it
        kwargs["pp_group"] = pp if rank == odd else None
        params = params[1:]  # plain only: a world-sized mesh would fail local validation first
    elif case == "extra_mesh":
        mesh2 = init_device_mesh("cpu", (2, world // 2))
        extra = dparam(full_grad((4, 4), 3), mesh2, [Shard(0), Replicate()])  # collective: everyone builds it
        if rank == odd:
            params.append(extra)
    elif case == "sharded_vs_replicated":
        extra = pparam(full_grad((6,), 4))
        (distclip.mark_replicated if rank == odd else distclip.mark_sharded)(extra, dist.group.WORLD)
        params.append(extra)
    elif case == "none":
        pass
    before = [local_of(p.grad).clone() for p in params]
    try:
        distclip.clip_grad_norm_(params, **kwargs)
        message = "no error"
    except distclip.LayoutMismatchError as e:
        message = str(e)
    untouched = all(torch.equal(local_of(p.grad), b) for p, b in zip(params, before))
    return message, untouched, same_on_every_rank(message)


CASES = ["norm_type", "finite_vs_inf_norm_type", "max_norm", "pp_group", "extra_mesh", "sharded_vs_replicated", "none"]


def _disagreements(rank, world):
    return {case: _disagreement(world, case) for case in CASES}  # one world, every case in turn


@pytest.fixture(scope="module")
def disagreement_results():
    return run_world(_disagreements, 4)


@pytest.mark.parametrize("case", CASES[:-1])
def test_disagreeing_ranks_raise_the_same_error_everywhere(case, disagreement_results):
    world = 4
    results = [per_rank[case] for per_rank in disagreement_results]
    messages = {m for m, _, _ in results}
    assert len(messages) == 1, messages
    message = messages.pop()
    assert message.startswith("distclip: ranks disagree"), message
    assert f"rank {world - 1}" in message, message
    assert all(untouched for _, untouched, _ in results)
    assert all(same for _, _, same in results)


def test_no_false_alarm_when_ranks_agree(disagreement_results):
    """(MoE ranks holding different experts, and a rank without any, are covered by the layout
    battery, which runs with the check on.)"""
    for per_rank in disagreement_results:
        message, untouched, same = per_rank["none"]
        assert message == "no error" and not untouched and same


# ----------------------------------------------------------------------------- layout changes


def _layout_changes(rank, world):
    """The same parameters across calls while their layout changes under them: grads set to None,
    parameters frozen and added, the model re-wrapped from plain to FSDP2. Each call must match the
    float64 reference (no stale state)."""
    from torch.distributed.fsdp import fully_shard

    from distclip import verify
    from worlds import Layout

    records = []
    mesh = init_device_mesh("cpu", (world,))
    fulls = [full_grad((6, 4), 10 + i) for i in range(4)]
    params = [dparam(f, mesh, [Shard(0)]) for f in fulls[:2]] + [pparam(fulls[2])]
    records += check_layout("initial", Layout(list(params), fulls[:3]), norms=(2.0, math.inf))
    params[1].grad = None  # grad dropped on every rank
    records += check_layout("grad None", Layout(list(params), [fulls[0], fulls[2]]), norms=(2.0, math.inf))
    params[1].grad = distclip_grad = dparam(fulls[1], mesh, [Shard(0)]).grad
    del distclip_grad
    extra = distclip.mark_sharded(pparam(fulls[3].tensor_split(world)[rank].contiguous()), dist.group.WORLD)
    records += check_layout("param added", Layout(params + [extra], fulls), norms=(2.0, 1.0))
    # re-wrap: the same model clipped plain (DDP-like), then after fully_shard
    model = verify.new_model(torch.device("cpu"))
    verify.loss_of(model(verify.batch(torch.device("cpu")))).backward()
    ref = [p.grad.detach().double().clone() for p in model.parameters()]
    records += check_layout("plain model", Layout(list(model.parameters()), ref), norms=(2.0,))
    model.zero_grad()
    fully_shard(model, mesh=mesh)
    verify.loss_of(model(verify.batch(torch.device("cpu")))).backward()
    records += check_layout("re-wrapped FSDP2", Layout(list(model.parameters()), ref), norms=(2.0, 3.0))
    for p in model.fc1.parameters():
        p.requires_grad_(False)
        p.grad = None
    records += check_layout("frozen", Layout(list(model.parameters()), ref[:1] + ref[3:]), norms=(2.0,))
    return records


def test_layout_changes_between_calls_are_never_stale():
    for rank_records in run_world(_layout_changes, 2):
        failures = [r for r in rank_records if not r[1]]
        assert not failures, failures
        assert len(rank_records) == 10


# ----------------------------------------------------------------------------- dead and stalled ranks


def _dies_or_stalls(rank, world, mode):
    params = [pparam(full_grad((4,), 5))]
    distclip.clip_grad_norm_(params, 1.0)  # a healthy first step
    if rank == 1:
        if mode == "dies":
            os._exit(0)  # the process is gone mid-run
        time.sleep(30)  # stalls far longer than the group's timeout
        return "stalled"
    start = time.monotonic()
    try:
        distclip.clip_grad_norm_(params, 1.0)
        outcome = "returned"
    except Exception as e:  # noqa: BLE001 - the backend decides the exact type
        outcome = type(e).__name__
    return outcome, time.monotonic() - start


@pytest.mark.parametrize("mode", ["dies", "stalls"])
def test_dead_or_stalled_rank_makes_survivors_raise_within_the_timeout(mode):
    timeout_s = 5
    results = run_world(_dies_or_stalls, 3, mode, pg_timeout_s=timeout_s, missing_ok={1}, timeout=60)
    for rank in (0, 2):
        outcome, elapsed = results[rank]
        assert outcome != "returned", results
        assert elapsed < timeout_s + 15, results
