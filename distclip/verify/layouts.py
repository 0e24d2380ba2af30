"""Hand-built layouts: synthetic gradients cut into a layout by hand, one named builder each.

The tests (``tests/worlds.py`` checks every one at 1, 2 and 4 ranks) and the benchmarks
(``benchmarks/workloads.py`` builds its separate-grad workloads here, at its own sizes) share this
registry; the main job's real-model layouts are ``scenarios``. A builder runs on every rank of the
default process group and returns a :class:`Layout`: what to pass to distclip and the full
gradients (the same on every rank, built from fixed seeds) the reference norm is taken over.

    layout = dtensor_separate(world, n=2000, device=torch.device("cuda", 0))
    reference_norm(layout.full, 2.0)

``HAND_BUILT`` is the registry (``LayoutBuilder(name, build, allowed, tags)``, the shape of
``scenarios.Scenario``); ``build(world)`` builds at the registry's default sizes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.placement_types import Partial, Placement

import distclip
from distclip.host_reads import host_reads_allowed

__all__ = [
    "HAND_BUILT", "HAND_BUILT_NAMES", "Layout", "LayoutBuilder", "dparam", "dtensor_separate", "full_grad", "local_of",
    "pparam", "replicated", "sharded_piece",
]


CPU = torch.device("cpu")
# a weight, a bias, a non-square weight, a norm scale: every dimension divisible by 4 (shards
# evenly over 2 and 4 ranks, and over a (2, 2) mesh)
SMALL_SHAPES: tuple[tuple[int, ...], ...] = ((32, 32), (32,), (64, 16), (128,))


@dataclass
class Layout:
    """A built layout: what distclip is given and the full gradients of the reference."""

    params: list[Any]  # what is passed to distclip: parameters (a mark returns its argument)
    full: list[torch.Tensor]  # full (unsharded) gradients, identical on every rank
    pp_group: object = None
    rtol: float = 1e-6
    collectives: int = 1  # per call: 2 when Partial grads are made whole first


def full_grad(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A seeded random gradient (the same on every rank), scaled by 1, 2 or 3 with the seed."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * (1 + seed % 3)).to(dtype)


def dparam(full: torch.Tensor, mesh: DeviceMesh, placements: Sequence[Placement]) -> nn.Parameter:
    """A DTensor parameter whose grad is ``full`` laid out by ``placements`` (one collective)."""
    p = nn.Parameter(distribute_tensor(torch.zeros_like(full), mesh, placements))
    p.grad = distribute_tensor(full.clone(), mesh, placements)
    return p


def pparam(local: torch.Tensor) -> nn.Parameter:
    """A plain parameter whose grad is a copy of ``local``."""
    p = nn.Parameter(torch.zeros_like(local))
    p.grad = local.clone()
    return p


def sharded_piece(full: torch.Tensor, group: dist.ProcessGroup, dim: int = 0) -> torch.Tensor:
    """This rank's piece of ``full`` split over ``group`` along ``dim`` (``tensor_split``)."""
    return full.tensor_split(group.size(), dim=dim)[dist.get_rank(group)].contiguous()


def _world_group() -> dist.ProcessGroup:
    world = dist.group.WORLD
    assert world is not None  # every builder runs in an initialised default process group
    return world


def local_of(g: torch.Tensor) -> torch.Tensor:
    """The local tensor of a DTensor, else the tensor."""
    return g.to_local() if isinstance(g, DTensor) else g


# ----------------------------------------------------------------------------- layouts


def dtensor_1d(world: int) -> Layout:
    mesh = init_device_mesh("cpu", (world,))
    shapes: list[tuple[tuple[int, ...], list[Placement]]] = [
        ((5, 3), [Shard(0)]), ((3, 7), [Shard(1)]), ((4,), [Replicate()]), ((1,), [Shard(0)]),
              ((0, 3), [Shard(0)]), ((2, 9), [Shard(0)]), ((40000,), [Shard(0)])]
    fulls = [full_grad(s, i) for i, (s, _) in enumerate(shapes)]
    return Layout([dparam(f, mesh, pl) for f, (_, pl) in zip(fulls, shapes)], fulls)


def dtensor_2d_mixed(world: int) -> Layout:
    """Parameters on a 2-D mesh, on each of its 1-D sub-meshes and plain tensors, in one call."""
    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
    specs: list[tuple[tuple[int, ...], DeviceMesh, list[Placement]]] = [
        ((6, 4), mesh, [Shard(0), Shard(1)]), ((6, 4), mesh, [Replicate(), Shard(0)]),
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
    params = [distclip.mark_sharded(pparam(experts[e]), _world_group()) for e in mine]
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
    params: list[Any]
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
    params: list[Any] = [dparam(c64, mesh, [Shard(0)]), pparam(c128), pparam(real)]
    if dist.get_rank() == 0:
        params.append(distclip.mark_sharded(pparam(expert), _world_group()))
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


def dtensor_separate(world: int, n: int = 64, rows: int = 4, cols: int = 8, *, device: torch.device = CPU,
                     seed: int = 4000) -> Layout:
    """``n`` separate DTensor grads, each its own ``(rows, cols)`` local tensor (never views of one
    buffer), ``Shard(0)`` on a 1-D mesh of all ranks: per-parameter grads as a sharded optimizer
    sees them. Each piece is cut on its rank (``DTensor.from_local``): no collective per grad."""
    mesh = init_device_mesh(device.type, (world,))
    rank = dist.get_rank()
    fulls, params = [], []
    for i in range(n):
        full = full_grad((rows * world, cols), seed + i)
        local = full[rank * rows:(rank + 1) * rows].to(device)  # an even split: DTensor's own chunk
        p = nn.Parameter(DTensor.from_local(torch.zeros_like(local), mesh, [Shard(0)], run_check=False))
        p.grad = DTensor.from_local(local.clone(), mesh, [Shard(0)], run_check=False)
        params.append(p)
        fulls.append(full)
    return Layout(params, fulls)


def replicated(world: int, shapes: Sequence[tuple[int, ...]] = SMALL_SHAPES * 8, *, device: torch.device = CPU,
               seed: int = 5000) -> Layout:
    """Plain tensors holding the same grads on every rank (DDP replicas), each grad its own tensor."""
    fulls = [full_grad(tuple(shape), seed + i) for i, shape in enumerate(shapes)]
    return Layout([pparam(f.to(device)) for f in fulls], fulls)


def any_size(world: int) -> bool:
    return True


def even(world: int) -> bool:
    return world % 2 == 0


@dataclass(frozen=True)
class LayoutBuilder:
    """One hand-built layout: ``build(world)`` on every rank; ``allowed(world)`` says whether it
    can be built at that world size. The same shape as ``scenarios.Scenario``."""

    name: str
    build: Callable[[int], Layout]
    allowed: Callable[[int], bool]
    tags: tuple[str, ...] = ()


HAND_BUILT: tuple[LayoutBuilder, ...] = (
    LayoutBuilder("dtensor_1d", dtensor_1d, any_size, ("dtensor",)),
    LayoutBuilder("dtensor_2d_mixed_meshes_and_plain", dtensor_2d_mixed, even, ("dtensor", "2d")),
    LayoutBuilder("megatron_tp_mark_sharded", megatron_tp, any_size, ("marks",)),
    LayoutBuilder("experts_uneven_rank_without_experts", experts_uneven, any_size, ("marks", "experts")),
    LayoutBuilder("pipeline_mixed_tied", pipeline_mixed, even, ("pipeline", "dtensor", "marks", "tied")),
    LayoutBuilder("mixed_dtypes", mixed_dtypes, any_size, ("dtensor", "dtypes")),
    LayoutBuilder("overflow_fp32", overflow_fp32, any_size, ("dtensor", "numerics")),
    LayoutBuilder("experts_ep_x_tp_composite_marks", experts_ep_x_tp, any_size, ("marks", "experts")),
    LayoutBuilder("megatron_tp_inside_fsdp2_marked_dtensor", megatron_tp_in_fsdp2, any_size, ("marks", "dtensor", "2d")),
    LayoutBuilder("complex_grads", complex_grads, any_size, ("dtensor", "dtypes", "marks")),
    LayoutBuilder("underflow", underflow, any_size, ("dtensor", "numerics")),
    LayoutBuilder("partial_grads", partial_grads, any_size, ("dtensor", "partial")),
    LayoutBuilder("many_small_flattened", many_small, any_size, ("dtensor", "numerics")),
    LayoutBuilder("dtensor_separate", dtensor_separate, any_size, ("dtensor",)),
    LayoutBuilder("replicated_plain", replicated, any_size, ("replicated",)),
)
HAND_BUILT_NAMES = tuple(c.name for c in HAND_BUILT)


