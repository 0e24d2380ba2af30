"""Nothing one rank does makes another rank wait; silent misconfigurations that ranks can detect;
the accelerator (no-host-read) path proven where any host read raises; DTensors tied across
pipeline stages; meshes spanning stages."""

import math
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.placement_types import Partial

import distclip
from checks import META_PREAMBLE
from harness import run_world
from worlds import dparam, full_grad, local_of, pparam

# ----------------------------------------------------------------------------- bad input on one rank


BAD_CASES = ("nan max_norm", "norm_type fro", "pp_group not a group", "partial max grad", "bad element", "partial sum peers")


def _bad_on_one_rank(rank, world, host_reads):
    if host_reads == "never":
        os.environ["DISTCLIP_HOST_READS"] = "never"
    mesh = init_device_mesh("cpu", (world,))
    results = {}
    for case in BAD_CASES:
        params = [dparam(full_grad((8, 3), 1), mesh, [Shard(0)]), pparam(full_grad((5,), 2))]
        if case == "partial sum peers":  # the peers issue a Partial collective first; the bad rank must too
            p = nn.Parameter(distribute_tensor(torch.zeros(4), mesh, [Replicate()]))
            p.grad = DTensor.from_local(torch.ones(4), mesh, [Partial()], run_check=False)
            params.append(p)
        kwargs = dict(max_norm=1.0, norm_type=2.0)
        bad_rank = {"nan max_norm": 2, "norm_type fro": 3, "pp_group not a group": 0}.get(case, 1)
        q = nn.Parameter(distribute_tensor(torch.zeros(3), mesh, [Replicate()]))  # a collective: every rank
        q.grad = DTensor.from_local(torch.ones(3), mesh, [Partial("max")], run_check=False)
        if rank == bad_rank:
            if case in ("nan max_norm", "partial sum peers"):
                kwargs["max_norm"] = math.nan
            elif case == "norm_type fro":
                kwargs["norm_type"] = "fro"
            elif case == "pp_group not a group":
                kwargs["pp_group"] = "pp"
            elif case == "partial max grad":
                params.append(q)
            elif case == "bad element":
                params = params + ["not a tensor"]
        before = [local_of(p.grad).clone() for p in params if isinstance(p, torch.Tensor)]
        start = time.perf_counter()
        try:
            total = distclip.clip_grad_norm_(params, **kwargs)
            outcome = ("returned", repr(float(total)))
        except Exception as e:  # noqa: BLE001
            outcome = (type(e).__name__, str(e))
        elapsed = time.perf_counter() - start
        after = [local_of(p.grad) for p in params if isinstance(p, torch.Tensor)]
        untouched = all(torch.equal(a, b) for a, b in zip(after, before))
        results[case] = (bad_rank, outcome, elapsed, untouched)
        dist.barrier()  # the bad rank stays alive and in step: nothing but the call tells the others
    return results


@pytest.fixture(scope="module")
def one_rank_bad():
    return run_world(_bad_on_one_rank, 4, "auto", pg_timeout_s=30)


@pytest.mark.parametrize(
    "case,cls",
    [("nan max_norm", "ValueError"), ("norm_type fro", "NotANumberError"), ("pp_group not a group", "TypeError"),
     ("partial max grad", "ValueError"), ("bad element", "TypeError"), ("partial sum peers", "ValueError")],
)
def test_bad_input_on_one_rank_raises_on_every_rank_at_once(one_rank_bad, case, cls):
    for rank, per_rank in enumerate(one_rank_bad):
        bad_rank, (name, message), elapsed, untouched = per_rank[case]
        assert elapsed < 10, (rank, elapsed)  # seconds, not the 30 s process-group timeout
        assert untouched, rank
        assert name == cls, (rank, name, message)
        if rank == bad_rank:
            assert message.startswith("distclip:") or "ProcessGroup" in message, message  # its own error
            assert "could not take part" not in message
        else:
            assert f"rank {bad_rank} could not take part" in message and cls in message, message


@pytest.fixture(scope="module")
def one_rank_bad_without_host_reads():
    return run_world(_bad_on_one_rank, 4, "never", pg_timeout_s=30)


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_on_one_rank_without_host_reads(one_rank_bad_without_host_reads, case):
    """The accelerator path: the bad rank raises its own error after the collective; the others
    return NaN with every grad untouched (no host read to learn more)."""
    for rank, per_rank in enumerate(one_rank_bad_without_host_reads):
        assert set(per_rank) == set(BAD_CASES), (rank, sorted(per_rank))
        bad_rank, (name, message), elapsed, untouched = per_rank[case]
        assert elapsed < 10 and untouched, (rank, case)
        if rank == bad_rank:
            assert name != "returned" and "could not take part" not in message, (case, name, message)
        else:
            assert (name, message) == ("returned", "nan"), (rank, case, name, message)


# ----------------------------------------------------------------------------- silent misconfigurations


def _misconfigured(rank, world):
    from distclip import verify

    ctx = verify.Ctx(rank, world, torch.device("cpu"), "distclip")
    out = {}
    built = verify.build_pp_fsdp(ctx)
    try:
        distclip.clip.total_grad_norm(built.parameters)  # pp_group forgotten on every rank
        out["pp forgotten"] = "no error"
    except distclip.LayoutMismatchError as e:
        out["pp forgotten"] = str(e)
    out["pp given"] = float(distclip.clip.total_grad_norm(built.parameters, pp_group=built.pp_group))
    built = verify.build_ep(ctx)
    from distclip.layout.marks import Marks

    for module in built.parameters.experts.modules():  # mark_sharded forgotten: distclip keeps marks by module slot
        Marks.by_module.pop(module, None)
    Marks.version += 1
    try:
        distclip.clip.total_grad_norm(built.parameters)
        out["marks forgotten"] = "no error"
    except distclip.LayoutMismatchError as e:
        out["marks forgotten"] = str(e)
    params = [pparam(full_grad((4,), 3))]
    try:
        distclip.clip_grad_norm_(params, max_norm=1.0 + rank)  # every rank differs
        out["all differ"] = "no error"
    except distclip.LayoutMismatchError as e:
        out["all differ"] = str(e)
    return out


def test_misconfigurations_the_ranks_can_see_are_reported():
    results = run_world(_misconfigured, 4)
    for key in ("pp forgotten", "marks forgotten", "all differ"):
        assert len({r[key] for r in results}) == 1, key
    assert "pass pp_group" in results[0]["pp forgotten"], results[0]["pp forgotten"]
    assert "mark_sharded" in results[0]["marks forgotten"], results[0]["marks forgotten"]
    message = results[0]["all differ"]
    assert "most ranks" not in message.replace("no call is shared by most ranks", ""), message
    assert all(f"rank {r} called" in message for r in range(4)), message
    assert len({r["pp given"] for r in results}) == 1


# ----------------------------------------------------------------------------- pipeline stages


def _dtensor_tied_across_stages(rank, world):
    """pp=2, FSDP2 on each stage: the embedding (stage 0) and the output head (stage 1) are one
    tied weight with a DTensor copy per stage; mark_replicated counts it once."""
    from torch.distributed.fsdp import fully_shard

    pp_mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("pp", "dp"))
    stage, dp = pp_mesh.get_local_rank("pp"), pp_mesh["dp"]
    tied, other = full_grad((6, 4), 50), full_grad((5, 4), 51 + stage)
    torch.manual_seed(0)
    module = nn.ParameterDict({"tied": nn.Parameter(torch.zeros(6, 4)), "other": nn.Parameter(torch.zeros(5, 4))})
    fully_shard(module, mesh=dp)
    for name, full in (("tied", tied), ("other", other)):
        module[name].grad = distribute_tensor(full.clone(), dp, [Shard(0)])
    emb_groups = [dist.new_group([r, r + world // 2]) for r in range(world // 2)]
    distclip.mark_replicated(module["tied"], emb_groups[rank % (world // 2)])  # after wrapping
    ref = float(torch.linalg.vector_norm(torch.cat([t.double().reshape(-1) for t in (tied, full_grad((5, 4), 51), full_grad((5, 4), 52))])))
    total = float(distclip.get_total_norm(module, pp_group=pp_mesh["pp"]))
    # A mesh that spans the two stages (ranks r and r + world/2): every rank raises the same error.
    span = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("a", "b"))["a"]  # {r, r + w/2}
    bad = dparam(full_grad((4,), 9), span, [Shard(0)])
    try:
        distclip.clip.total_grad_norm([bad], pp_group=pp_mesh["pp"])
        spans = "no error"
    except ValueError as e:
        spans = str(e)
    return total, ref, spans


def test_dtensor_tied_across_stages_counted_once_and_meshes_spanning_stages_refused():
    results = run_world(_dtensor_tied_across_stages, 4)
    for total, ref, spans in results:
        assert abs(total - ref) <= 1e-6 * ref, (total, ref)
        assert "other pipeline stages" in spans, spans


# ----------------------------------------------------------------------------- no host reads, proven

META_SCRIPT = META_PREAMBLE + r"""
params = [plain((3, 4)), plain((100000,)), plain((5,), torch.bfloat16), plain((6,), torch.float16),
          plain((4,), torch.complex64), plain((2,), torch.float64),
          distclip.mark_sharded(plain((2, 2)), dist.group.WORLD),
          distclip.mark_replicated(plain((3,)), dist.group.WORLD), dt((2, 3), [Shard(0)]), dt((3,), [Partial()])]
ran = 0
for p in (1.0, 2.0, 3.0, math.inf, -math.inf, 0.0, 0.5, -2.0):
    for fn in ("clip", "total"):
        t = distclip.clip_grad_norm_(params, 1.0, p) if fn == "clip" else distclip.clip.total_grad_norm(params, p)
        assert t.device == meta and not t.is_complex()
        ran += 1
# bad input on this rank: its own error, raised without any host read
try:
    distclip.clip_grad_norm_(params, float("nan"))
    raise SystemExit("no error")
except ValueError as e:
    assert "max_norm" in str(e), e
print("RAN", ran)
"""


def test_no_host_read_path_never_reads_a_device_value():
    """Every norm type and layout kind (plain, marked sharded/replicated, DTensor Shard and Partial,
    bf16/fp16/fp64/complex), the disagreement and failure flags and the non-finite poisoning all
    run on meta tensors, where any host read raises."""
    proc = subprocess.run([sys.executable, "-c", META_SCRIPT], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "DISTCLIP_HOST_READS": "auto"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RAN 16" in proc.stdout


def test_meta_run_would_catch_a_host_read():
    """The proof above can fail: the same run with host reads forced on (the CPU path) reads."""
    script = META_SCRIPT.replace(
        'clip.reduction_device = lambda stage: meta',
        'clip.reduction_device = lambda stage: meta\nimport distclip.clip as c; c.host_reads_allowed = lambda device: True',
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "meta" in proc.stderr, proc.stdout[-2000:]
