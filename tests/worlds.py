"""Hand-built layouts checked inside one multi-rank world (see test_layouts.py).

Every rank builds the same full gradients from a fixed seed, cuts out its local part according to
the layout, calls distclip, and checks: the norm against a float64 reference over the full
gradients, the local clipped grads against ``local * coef_reference``, and that every rank
returned the same bits. Each case returns records instead of raising, so one world reports all.

``CASES`` is the registry (``Case(name, build, allowed, tags)``, the shape of
``distclip.verify.Scenario``); ``WORLD_CHECKS`` the checks of a whole world beside them. The
reference norm, "the same on every rank" and the collective counter live in ``checks.py``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.placement_types import Partial

import distclip
from checks import count_collectives, f64, reference_norm, same_on_every_rank
from distclip.host_reads import host_reads_allowed

NORMS = (1.0, 2.0, 3.0, math.inf, -math.inf, 0.0, 0.5, -2.0)


@dataclass
class Layout:
    params: list[torch.Tensor]  # what is passed to distclip
    full: list[torch.Tensor]  # full gradients, float64, identical on every rank
    pp_group: object = None
    rtol: float = 1e-6
    collectives: int = 1  # per call: 2 when Partial grads are made whole first


def full_grad(shape: tuple[int, ...], seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * (1 + seed % 3)).to(dtype)


def dparam(full: torch.Tensor, mesh, placements) -> nn.Parameter:
    p = nn.Parameter(distribute_tensor(torch.zeros_like(full), mesh, placements))
    p.grad = distribute_tensor(full.clone(), mesh, placements)
    return p


def pparam(local: torch.Tensor) -> nn.Parameter:
    p = nn.Parameter(torch.zeros_like(local))
    p.grad = local.clone()
    return p


def sharded_piece(full: torch.Tensor, group, dim: int = 0) -> torch.Tensor:
    return full.tensor_split(group.size(), dim=dim)[dist.get_rank(group)].contiguous()


def local_of(g: torch.Tensor) -> torch.Tensor:
    return g.to_local() if isinstance(g, DTensor) else g


# ----------------------------------------------------------------------------- layouts


def dtensor_1d(world: int) -> Layout:
    mesh = init_device_mesh("cpu", (world,))
    shapes = [((5, 3), [Shard(0)]), ((3, 7), [Shard(1)]), ((4,), [Replicate()]), ((1,), [Shard(0)]),
              ((0, 3), [Shard(0)]), ((2, 9), [Shard(0)]), ((40000,), [Shard(0)])]
    fulls = [full_grad(s, i) for i, (s, _) in enumerate(shapes)]
    return Layout([dparam(f, mesh, pl) for f, (_, pl) in zip(fulls, shapes)], fulls)


def dtensor_2d_mixed(world: int) -> Layout:
    """Parameters on a 2-D mesh, on each of its 1-D sub-meshes and plain tensors, in one call."""
    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
    specs = [((6, 4), mesh, [Shard(0), Shard(1)]), ((6, 4), mesh, [Replicate(), Shard(0)]),
             ((6, 4), mesh, [Shard(0), Replicate()]), ((8, 2), mesh, [Shard(0), Shard(0)]),
             ((5,), mesh["dp"], [Shard(0)]), ((7,), mesh["tp"], [Shard(0)]), ((3,), mesh["dp"], [Replicate()])]
    fulls = [full_grad(s, 10 + i) for i, (s, _, _) in enumerate(specs)]
    params = [dparam(f, m, pl) for f, (_, m, pl) in zip(fulls, specs)]
    plain = full_grad((4, 4), 99)
    return Layout(params + [pparam(plain)], fulls + [plain])


def megatron_tp(world: int) -> Layout:
    """mark_sharded over tp groups of 2 (replicated across the dp ranks), plus replicated params."""
    tp = 2 if world % 2 == 0 else 1
    groups = [dist.new_group(list(range(s, s + tp))) for s in range(0, world, tp)]
    tp_group = groups[dist.get_rank() // tp]
    col, row, bias = full_grad((8, 6), 21), full_grad((6, 8), 22), full_grad((6,), 23)
    params = [distclip.mark_sharded(pparam(sharded_piece(col, tp_group, 0)), tp_group),
              distclip.mark_sharded(pparam(sharded_piece(row, tp_group, 1)), tp_group), pparam(bias)]
    return Layout(params, [col, row, bias])


def experts_uneven(world: int) -> Layout:
    """5 experts over the world: rank r holds experts e with e % world == r, except the last rank
    holds none (a rank without experts still takes part in the one collective)."""
    holders = max(world - 1, 1)
    experts = [full_grad((3, 4), 30 + e) for e in range(5)]
    mine = [e for e in range(5) if e % holders == dist.get_rank() and (world == 1 or dist.get_rank() < holders)]
    params = [distclip.mark_sharded(pparam(experts[e]), dist.group.WORLD) for e in mine]
    dense = full_grad((4, 4), 39)
    return Layout(params + [pparam(dense)], experts + [dense])


def pipeline_mixed(world: int) -> Layout:
    """pp=2: stage 0 is FSDP2-like DTensors on its own mesh, stage 1 plain replicated and
    mark_sharded tensors; a weight tied across the stages is counted once."""
    half = world // 2
    pp_mesh = init_device_mesh("cpu", (2, half), mesh_dim_names=("pp", "dp"))
    stage, pp_group, stage_mesh = pp_mesh.get_local_rank("pp"), pp_mesh["pp"].get_group(), pp_mesh["dp"]
    stage_group = stage_mesh.get_group()
    s0 = [full_grad((6, 3), 40), full_grad((5,), 41)]
    s1_plain, s1_shard, tied = full_grad((3, 3), 42), full_grad((4, 6), 43), full_grad((4, 2), 44)
    if stage == 0:
        params = [dparam(s0[0], stage_mesh, [Shard(0)]), dparam(s0[1], stage_mesh, [Replicate()])]
    else:
        params = [pparam(s1_plain), distclip.mark_sharded(pparam(sharded_piece(s1_shard, stage_group)), stage_group)]
    params.append(distclip.mark_replicated(pparam(tied), pp_group))
    return Layout(params, s0 + [s1_plain, s1_shard, tied], pp_group=pp_group)


def mixed_dtypes(world: int) -> Layout:
    mesh = init_device_mesh("cpu", (world,))
    fulls = [full_grad((9, 4), 50 + i, dt) for i, dt in enumerate((torch.float32, torch.bfloat16, torch.float16, torch.float64))]
    params = [dparam(f, mesh, [Shard(0)]) for f in fulls[:3]]
    params.append(pparam(fulls[3]))  # plain fp64, replicated
    return Layout(params, [f.double() for f in fulls])


def overflow_fp32(world: int) -> Layout:
    """sum(g^2) overflows float32 although the norm (~1e21) is representable (torch: inf, grads zeroed)."""
    mesh = init_device_mesh("cpu", (world,))
    big = full_grad((64, 8), 60).sign() * 1e20
    return Layout([dparam(big, mesh, [Shard(0)]), pparam(full_grad((3,), 61))], [big, full_grad((3,), 61)])


def experts_ep_x_tp(world: int) -> Layout:
    """Experts spread over an expert-parallel group *and* each split over a tensor-parallel group:
    ``mark_sharded(p, ep); mark_sharded(p, tp)`` compose to ep*tp pieces (marking with the same
    group again changes nothing). 4 ranks: ep2 x tp2; 3 experts, so the ep ranks hold 2 and 1."""
    tp = 2 if world % 2 == 0 else 1
    ep = world // tp
    rank = dist.get_rank()
    tp_groups = [dist.new_group(list(range(s, s + tp))) for s in range(0, world, tp)]
    ep_groups = [dist.new_group(list(range(t, world, tp))) for t in range(tp)]
    tp_group, ep_group = tp_groups[rank // tp], ep_groups[rank % tp]
    experts = [full_grad((4, 6), 130 + e) for e in range(3)]
    params = []
    for e in range(3):
        if e % ep == dist.get_rank(ep_group):
            p = pparam(sharded_piece(experts[e], tp_group, 1))
            distclip.mark_sharded(p, ep_group)
            distclip.mark_sharded(p, tp_group)
            distclip.mark_sharded(p, ep_group)  # idempotent
            params.append(p)
    dense = full_grad((5,), 139)
    return Layout(params + [pparam(dense)], experts + [dense])


def megatron_tp_in_fsdp2(world: int) -> Layout:
    """A Megatron-style TP weight (rows split over tp as plain tensors) then sharded by FSDP2 over
    dp: the DTensor shows only the dp sharding; ``mark_sharded`` on the DTensor adds the tp split."""
    tp = 2 if world % 2 == 0 else 1
    mesh = init_device_mesh("cpu", (world // tp, tp), mesh_dim_names=("dp", "tp"))
    tp_group = mesh["tp"].get_group()
    weight, norm = full_grad((8, 4), 140), full_grad((4,), 141)
    piece = sharded_piece(weight, tp_group, 0)
    p = distclip.mark_sharded(dparam(piece, mesh["dp"], [Shard(0)]), mesh["tp"])
    q = dparam(norm, mesh["dp"], [Shard(0)])
    return Layout([p, q], [weight, norm])


def complex_grads(world: int) -> Layout:
    """complex64 DTensor shards, a complex128 replica, real grads, and complex experts held by
    some ranks only (the norm of the magnitudes, a real result, one collective everywhere)."""
    mesh = init_device_mesh("cpu", (world,))
    c64 = torch.complex(full_grad((6, 4), 150), full_grad((6, 4), 151))
    c128 = torch.complex(full_grad((5,), 152).double(), full_grad((5,), 153).double())
    real = full_grad((3, 3), 154)
    expert = torch.complex(full_grad((2, 3), 155), full_grad((2, 3), 156))
    params = [dparam(c64, mesh, [Shard(0)]), pparam(c128), pparam(real)]
    if dist.get_rank() == 0:
        params.append(distclip.mark_sharded(pparam(expert), dist.group.WORLD))
    return Layout(params, [c64, c128, real, expert])


def underflow(world: int) -> Layout:
    """Grads so small that g^2 underflows float32: fp32 ~1e-22 (many), ~1e-30, bf16 ~1e-25."""
    mesh = init_device_mesh("cpu", (world,))
    tiny = [full_grad((50, 8), 160 + i) * 1e-22 for i in range(20)]
    tinier = full_grad((20000,), 180) * 1e-30
    bf16 = (full_grad((16, 8), 181) * 1e-25).to(torch.bfloat16)
    params = [dparam(t, mesh, [Shard(0)]) for t in tiny] + [pparam(tinier), dparam(bf16, mesh, [Shard(1)])]
    return Layout(params, tiny + [tinier, bf16.double()])


def partial_grads(world: int) -> Layout:
    """Partial(sum) grads (TP + SequenceParallel leaves LayerNorm grads so), Partial(avg), and
    Shard x Partial on a 2-D mesh: made whole by one collective per partial mesh group."""
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (world,))
    weights = [float(r + 1) for r in range(world)]

    def summand(full: torch.Tensor, r: int, n: int, avg: bool = False) -> torch.Tensor:
        share = weights[r] / sum(weights[:n])
        return full * share * (n if avg else 1)

    def partial_param(full, m, placements, local):
        p = nn.Parameter(distribute_tensor(torch.zeros_like(full), m, [Replicate()] * m.ndim))
        p.grad = DTensor.from_local(local, m, placements, run_check=False)
        return p

    ln_w, ln_b, avg = full_grad((8,), 190), full_grad((8,), 191), full_grad((3, 2), 192)
    params = [partial_param(ln_w, mesh, [Partial()], summand(ln_w, rank, world)),
              partial_param(ln_b, mesh, [Partial()], summand(ln_b, rank, world)),
              partial_param(avg, mesh, [Partial("avg")], summand(avg, rank, world, avg=True))]
    fulls = [ln_w, ln_b, avg]
    if world % 2 == 0:
        mesh2 = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
        full2 = full_grad((6, 5), 193)
        i, j = mesh2.get_local_rank("dp"), mesh2.get_local_rank("tp")
        row = full2.tensor_split(2, dim=0)[i]
        p = nn.Parameter(distribute_tensor(torch.zeros_like(full2), mesh2, [Shard(0), Replicate()]))
        p.grad = DTensor.from_local(summand(row, j, world // 2).contiguous(), mesh2, [Shard(0), Partial()], run_check=False)
        params.append(p)
        fulls.append(full2)
    plain = full_grad((4,), 194)
    buckets = 2 if world > 1 and world % 2 == 0 else 1  # Partial grads' (mesh, partial dims) groups
    # where values can be read on the host, each group's values are preceded by a two-number check
    # that every rank holds the same Partial grads (``reduce.reduce_partial_grads``)
    per_bucket = 2 if host_reads_allowed(torch.device("cpu")) else 1
    return Layout(params + [pparam(plain)], fulls + [plain], collectives=1 + buckets * per_bucket)


def many_small(world: int) -> Layout:
    """Hundreds of separate small grads (the CPU path copies them into flat chunks, a bounded
    chunk at a time): DTensor shards and plain replicas of mixed shapes, some tiny (underflow),
    one huge (overflow), one all zero, bf16 among them."""
    mesh = init_device_mesh("cpu", (world,))
    fulls, params = [], []
    for i in range(300):
        f = full_grad((world * (1 + i % 3), 2 + i % 5), 2000 + i)
        if i % 50 == 7:
            f = f * 1e-25
        if i == 11:
            f = f * 0
        if i == 13:
            f = f.sign() * 1e19
        fulls.append(f)
        params.append(dparam(f, mesh, [Shard(0)]))
    for i in range(200):
        f = full_grad((3 + i % 7,), 3000 + i, torch.bfloat16 if i % 4 == 0 else torch.float32)
        fulls.append(f.double())
        params.append(pparam(f))
    return Layout(params, fulls)


def any_size(world: int) -> bool:
    return True


def even(world: int) -> bool:
    return world % 2 == 0


@dataclass(frozen=True)
class Case:
    """One hand-built layout: ``build(world)`` on every rank; ``allowed(world)`` says whether it
    can be built at that world size. The same shape as ``distclip.verify.Scenario``."""

    name: str
    build: Callable[[int], Layout]
    allowed: Callable[[int], bool]
    tags: tuple[str, ...] = ()


CASES: tuple[Case, ...] = (
    Case("dtensor_1d", dtensor_1d, any_size, ("dtensor",)),
    Case("dtensor_2d_mixed_meshes_and_plain", dtensor_2d_mixed, even, ("dtensor", "2d")),
    Case("megatron_tp_mark_sharded", megatron_tp, any_size, ("marks",)),
    Case("experts_uneven_rank_without_experts", experts_uneven, any_size, ("marks", "experts")),
    Case("pipeline_mixed_tied", pipeline_mixed, even, ("pipeline", "dtensor", "marks", "tied")),
    Case("mixed_dtypes", mixed_dtypes, any_size, ("dtensor", "dtypes")),
    Case("overflow_fp32", overflow_fp32, any_size, ("dtensor", "numerics")),
    Case("experts_ep_x_tp_composite_marks", experts_ep_x_tp, any_size, ("marks", "experts")),
    Case("megatron_tp_inside_fsdp2_marked_dtensor", megatron_tp_in_fsdp2, any_size, ("marks", "dtensor", "2d")),
    Case("complex_grads", complex_grads, any_size, ("dtensor", "dtypes", "marks")),
    Case("underflow", underflow, any_size, ("dtensor", "numerics")),
    Case("partial_grads", partial_grads, any_size, ("dtensor", "partial")),
    Case("many_small_flattened", many_small, any_size, ("dtensor", "numerics")),
)
CASE_NAMES = tuple(c.name for c in CASES)


def record_name(case: str, norm_type: float) -> str:
    """The name ``check_layout`` gives the record of one (layout, norm type)."""
    return f"{case} p={norm_type:g}"


# ----------------------------------------------------------------------------- checks


def check_layout(name: str, layout: Layout, norms=NORMS) -> list[tuple[str, bool, str]]:
    records = []
    with_grad = [p for p in layout.params if p.grad is not None]
    saved = [local_of(p.grad).clone() for p in with_grad]
    for p_norm in norms:
        for p, s in zip(with_grad, saved):
            local_of(p.grad).copy_(s)
        ref = reference_norm(layout.full, p_norm)
        max_norm = ref * 0.5 if ref else 1.0
        with count_collectives() as calls:
            total = distclip.clip_grad_norm_(iter(layout.params), max_norm, p_norm, pp_group=layout.pp_group)
        n_calls = calls.count
        value = float(total.double())
        rel = abs(value - ref) / ref if ref else abs(value)
        coef = min(1.0, max_norm / (float(total) + 1e-6))
        errors = []
        if not rel <= layout.rtol:
            errors.append(f"norm {value!r} vs reference {ref!r} (rel {rel:.2e})")
        for p, s in zip(with_grad, saved):
            got = local_of(p.grad)
            if not torch.allclose(f64(got), f64(s) * coef, rtol=1e-3 if s.dtype in (torch.bfloat16, torch.float16) else 1e-5):
                errors.append(f"clipped grad mismatch for shape {tuple(s.shape)}")
        if n_calls != layout.collectives:
            errors.append(f"{n_calls} collectives in one call (expected {layout.collectives})")
        # Without host reads (accelerators) the dtype follows each rank's own grads: float64 on the
        # ranks holding a float64 grad only. The value, rounded to float32, is the same everywhere.
        if os.environ.get("DISTCLIP_HOST_READS", "auto") == "auto":
            agreed: object = (value, total.dtype)
        else:
            agreed = float(torch.tensor(value, dtype=torch.float64).float())
        if not same_on_every_rank(agreed):
            errors.append("norm differs across ranks")
        records.append((record_name(name, p_norm), not errors, "; ".join(errors)))
    for p, s in zip(with_grad, saved):
        local_of(p.grad).copy_(s)  # leave the grads as found
    return records


def nonfinite_everywhere(world: int) -> list[tuple[str, bool, str]]:
    """A NaN (or inf) on the last rank only: the norm is non-finite on every rank, for every norm
    type, and error_if_nonfinite raises on every rank without touching any grad."""
    mesh = init_device_mesh("cpu", (world,))
    records = []
    for bad in (math.nan, math.inf):
        full = full_grad((4 * world, 3), 70)
        full[-1, -1] = bad
        p = dparam(full, mesh, [Shard(0)])
        q = pparam(full_grad((5,), 71))
        before = [local_of(p.grad).clone(), q.grad.clone()]
        for p_norm in NORMS:
            total = distclip.clip.total_grad_norm([p, q], p_norm)
            ok = not bool(torch.isfinite(total)) and same_on_every_rank(repr(float(total)))
            if p_norm in (1.0, 2.0, math.inf) and bad == math.inf:
                ok = ok and float(total) == math.inf  # like torch: an inf grad gives an inf norm
            records.append((f"nonfinite {bad} p={p_norm:g}", ok, f"got {float(total)}"))
        try:
            distclip.clip_grad_norm_([p, q], 1.0, error_if_nonfinite=True)
            records.append((f"error_if_nonfinite {bad}", False, "did not raise"))
        except RuntimeError as e:
            untouched = torch.equal(local_of(p.grad).view(torch.int32), before[0].view(torch.int32))
            untouched = untouched and torch.equal(q.grad, before[1])
            records.append((f"error_if_nonfinite {bad}", "non-finite" in str(e) and untouched and same_on_every_rank(str(e)), str(e)[:80]))
    return records


def bad_input_same_error(world: int) -> list[tuple[str, bool, str]]:
    """Bad input raises the same exception on every rank, grads intact."""
    mesh = init_device_mesh("cpu", (world,))
    ok_param = dparam(full_grad((4, 2), 80), mesh, [Shard(0)])
    partial = nn.Parameter(distribute_tensor(torch.zeros(3), mesh, [Replicate()]))
    partial.grad = DTensor.from_local(torch.ones(3), mesh, [Partial("max")])  # sums/averages are measurable
    cases: dict[str, Callable[[], object]] = {
        "negative max_norm": lambda: distclip.clip_grad_norm_([ok_param], -1.0),
        "nan max_norm": lambda: distclip.clip_grad_norm_([ok_param], math.nan),
        "string max_norm": lambda: distclip.clip_grad_norm_([ok_param], "big"),
        "norm_type not a number": lambda: distclip.clip_grad_norm_([ok_param], 1.0, norm_type=[2]),
        "pp_group wrong type": lambda: distclip.clip_grad_norm_([ok_param], 1.0, pp_group=3),
        "partial max grad": lambda: distclip.clip_grad_norm_([ok_param, partial], 1.0),
        "mark_sharded with a 2-D mesh": lambda: distclip.mark_sharded(pparam(torch.ones(2)), init_device_mesh("cpu", (world, 1))),
        "mark_sharded non-group": lambda: distclip.mark_sharded(pparam(torch.ones(2)), "world"),
    }
    records = []
    before = local_of(ok_param.grad).clone()
    for name, call in cases.items():
        with count_collectives() as calls:
            try:
                call()
                err = "no exception"
            except Exception as e:  # noqa: BLE001
                err = f"{type(e).__name__}: {e}"
        n_calls = calls.count
        # Every rank got the same bad input: each raises its own error after the call's collective
        # (which tells every rank that some rank failed) and, where host reads are free, one gather
        # of the ranks' messages.
        ok = err != "no exception" and n_calls <= 2 and torch.equal(local_of(ok_param.grad), before)
        records.append((f"bad input: {name}", ok and same_on_every_rank(err), err[:100]))
    return records


def empty_rank_one_collective(world: int) -> list[tuple[str, bool, str]]:
    """The last rank passes no parameters at all; it still issues the single collective."""
    mesh = init_device_mesh("cpu", (world,))
    full = full_grad((3, 3), 90)
    params = [] if dist.get_rank() == world - 1 and world > 1 else [distclip.mark_sharded(pparam(full), dist.group.WORLD)]
    with count_collectives() as calls:
        total = distclip.clip_grad_norm_(params, 1e9)
    n = calls.count
    del mesh
    expected = reference_norm([full], 2.0) * (world - 1 if world > 1 else 1) ** 0.5
    ok = n == 1 and abs(float(total) - expected) / expected < 1e-6 and same_on_every_rank(float(total))
    return [("rank without parameters", ok, f"{float(total)} vs {expected}, {n} collectives")]


# Checks of a whole world beside the layouts: (name, check, how many records it returns).
WORLD_CHECKS: tuple[tuple[str, Callable[[int], list[tuple[str, bool, str]]], int], ...] = (
    ("nonfinite_everywhere", nonfinite_everywhere, 2 * (len(NORMS) + 1)),
    ("bad_input_same_error", bad_input_same_error, 8),
    ("empty_rank_one_collective", empty_rank_one_collective, 1),
)


def run_cases(rank: int, world: int, names: Optional[list[str]] = None) -> list[tuple[str, bool, str]]:
    """Every case allowed at ``world`` (or those in ``names``) x NORMS, then, when all cases run,
    the world checks, whose records are named ``"<check>: <record>"``."""
    records: list[tuple[str, bool, str]] = []
    for case in CASES:
        if case.allowed(world) and (names is None or case.name in names):
            records.extend(check_layout(case.name, case.build(world)))
    if names is None:
        for check, run, _ in WORLD_CHECKS:
            records.extend((f"{check}: {name}", ok, msg) for name, ok, msg in run(world))
    return records
