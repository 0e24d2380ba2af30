"""audit: OK on correct real layouts; catches a replica that differs on one rank, an unmarked TP
shard and a mark_sharded over the wrong group; the same verdict on every rank; grads untouched."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from test_grad_norms import _tied_pp
from torch import nn

import distclip
from checks import raised_everywhere
from distclip import verify
from harness import CaseWorld

os.environ.setdefault("OMP_NUM_THREADS", "1")


def _grads(params) -> list[torch.Tensor]:
    out = []
    for p in params:
        if p.grad is not None:
            g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
            out.append(g.detach().clone())
    return out


def _megatron(rank: int, group_for_mark) -> list[tuple[str, nn.Parameter]]:
    """A (8, 6) weight split by rows over tp groups {0,1}, {2,3} (replicated across dp), plus a
    replicated bias; the weight is marked over ``group_for_mark`` (None: not marked)."""
    tp_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    dp_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    tp = tp_groups[rank // 2]
    full = torch.randn(8, 6, generator=torch.Generator().manual_seed(5))
    w = nn.Parameter(torch.zeros(4, 6))
    w.grad = full.tensor_split(2)[dist.get_rank(tp)].clone()
    b = nn.Parameter(torch.zeros(6))
    b.grad = torch.arange(6.0) + 1
    mark = {"tp": tp, "dp": dp_groups[rank % 2]}.get(group_for_mark)
    if mark is not None:
        distclip.mark_sharded(w, mark)
    return [("w", w), ("b", b)]


LAYOUTS = ("DDP", "FSDP1 flat", "FSDP1 HYBRID orig", "HSDP", "2D TP+FSDP2", "EP uneven", "TP+SP Partial", "tied PP")
CASES = LAYOUTS + ("replica differs", "Megatron TP marked right", "unmarked TP shard", "mark_sharded over the dp group",
                   "one rank's bad input", "one rank's bad input with Partial grads")


def world_audit(rank: int, world: int) -> dict[str, list[str]]:
    """{case: failures} for every name in CASES, on each rank."""
    verify.quiet_torch_warnings()
    ctx = verify.Ctx(rank, world, torch.device("cpu"), "distclip")
    out: dict[str, list[str]] = {}

    def run(label, parameters, expect_ok, must_mention=(), pp_group=None):
        out[label] = errors = []
        params = [p for _, p in parameters] if isinstance(parameters, list) else list(parameters.parameters())
        before = _grads(params)
        report = distclip.audit(parameters, pp_group=pp_group)
        after = _grads(params)
        if any(not torch.equal(a, b) for a, b in zip(before, after)) or len(before) != len(after):
            errors.append(f"{label}: audit changed a gradient")
        everyone = [None] * world
        dist.all_gather_object(everyone, str(report))
        if len(set(everyone)) != 1:
            errors.append(f"{label}: reports differ across ranks")
        if report.ok != expect_ok:
            errors.append(f"{label}: ok={report.ok}, expected {expect_ok}:\n{report}")
        for word in must_mention:
            if word not in str(report):
                errors.append(f"{label}: report does not mention {word!r}:\n{report}")
        if expect_ok and not abs(report.norm - report.reference_norm) <= 1e-5 * report.reference_norm:
            errors.append(f"{label}: norm {report.norm} vs reference {report.reference_norm}")
        return report

    for label, build in (
        ("DDP", lambda: verify.build_ddp(ctx)),
        ("FSDP1 flat", lambda: verify.build_fsdp1("FULL_SHARD", False)(ctx)),
        ("FSDP1 HYBRID orig", lambda: verify.build_fsdp1("HYBRID_SHARD", True)(ctx)),
        ("HSDP", lambda: verify.build_fsdp2(ctx, hsdp=True)),
        ("2D TP+FSDP2", lambda: verify.build_2d(ctx)),
        ("EP uneven", lambda: verify.build_ep(ctx)),
        ("TP+SP Partial", lambda: verify.build_tp_sp(ctx)),
    ):
        run(label, build().parameters, True)
    part, pp_group, _ = _tied_pp(ctx)
    run("tied PP", part, True, pp_group=pp_group)

    # a replica out of sync on rank 2 only: named, with the odd rank
    ddp = verify.build_ddp(ctx).parameters
    if rank == 2:
        ddp.module.fc1.weight.grad[0, 0] += 1.0
    run("replica differs", ddp, False, must_mention=("fc1.weight", "ranks [2]"))

    run("Megatron TP marked right", _megatron(rank, "tp"), True)
    run("unmarked TP shard", _megatron(rank, None), False, must_mention=("w:", "without mark_sharded"))
    run("mark_sharded over the dp group", _megatron(rank, "dp"), False, must_mention=("w:", "wrong group"))

    # bad input on one rank only (an element that is no tensor; a bare tensor is now named by its
    # position, as clip_grad_norm_ takes it): every rank raises at once, naming it
    good = list(verify.build_ddp(ctx).parameters.named_parameters())
    out["one rank's bad input"] = raised_everywhere(
        lambda: distclip.audit(good + [2.0] if rank == 1 else good), TypeError, 1, rank, within_s=10)  # type: ignore[operator]

    # the same with Partial grads, which the good ranks make whole by a collective the bad rank
    # cannot join: every rank must know of the failure first (the good ranks used to wait there
    # until the process-group timeout)
    sp = list(verify.build_tp_sp(ctx).parameters.named_parameters())
    out["one rank's bad input with Partial grads"] = raised_everywhere(
        lambda: distclip.audit(sp + [("bad", "not a tensor")] if rank == 3 else sp), TypeError, 3, rank, within_s=10)  # type: ignore[operator]
    return out


@pytest.fixture(scope="module")
def audit_world():
    return CaseWorld(world_audit, 4, CASES, timeout=540)


@pytest.mark.parametrize("case", CASES)
def test_audit_world4(audit_world, case):
    audit_world.check(case, shown=30)
