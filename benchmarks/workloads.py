"""The registry of named workloads: one builder and one registry line per layout.

A builder gets a :class:`Build` (sizes, device, seeded generators) and returns a
:class:`Workload`: the parameters with their grads set, what distclip is passed, the weight of
each grad (1 / number of ranks holding each of its elements, for the independent reference norm)
and the least code that is right for that one layout (the ``minimal`` column).

The separate-grad layouts (``dtensor_sep``, ``plain_sep``, ``ddp``) come from the package's
registry of hand-built layouts (``distclip.verify.layouts``), which the tests check at small sizes;
the reference norm is the package's one float64 reference.

Adding a layout: write ``build_<name>(b: Build) -> Workload`` and add one line to ``LAYOUTS``.
"""

from __future__ import annotations

import importlib.util
import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from benchmarks import methods
from benchmarks.workload_records import Build, Workload, local


def _from_this_checkout(name: str) -> ModuleType:
    """``distclip/verify/<name>.py`` of this checkout, loaded by path: ``compare_commits`` runs
    these workloads against older distclip commits (first on ``PYTHONPATH``), which may lack it."""
    path = Path(__file__).resolve().parents[1] / "distclip" / "verify" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_distclip_bench_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it runs
    spec.loader.exec_module(module)
    return module


# the layout registry and the float64 reference shared with distclip.verify and the tests
layouts = _from_this_checkout("layouts")
reference = _from_this_checkout("reference")

# Shapes of the "many small parameters" models, cycled (the registry's: a weight, a bias, a
# non-square weight, a norm scale, every dimension divisible by 4). Mean 552 elements (2.2 KB fp32).
SMALL_SHAPES = list(layouts.SMALL_SHAPES)
PARAMS_PER_BLOCK = 50  # one FSDP unit (fully_shard / FSDP1 wrap) per block
SEP_ROWS, SEP_COLS = 4, 8  # local shape of each dtensor_sep grad


def large_shapes(d: int) -> list[tuple[int, ...]]:
    """One transformer-like layer: qkv, out-proj, mlp up, mlp down, two norm scales (~12 d^2)."""
    return [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d), (d,), (d,)]


class Block(nn.Module):
    def __init__(self, shapes: list[tuple[int, ...]]) -> None:
        super().__init__()
        self.ps = nn.ParameterList([nn.Parameter(torch.empty(s)) for s in shapes])

    def forward(self) -> torch.Tensor:  # d/dp sum(p*p) = 2p: random, finite grads
        return sum((p * p).sum() for p in self.ps)


class Model(nn.Module):
    def __init__(self, blocks: list[list[tuple[int, ...]]]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(b) for b in blocks])

    def forward(self) -> torch.Tensor:
        return sum(block() for block in self.blocks)


def contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for s in reversed(shape):
        stride.append(acc)
        acc *= s
    return tuple(reversed(stride))


def _fill(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return t.normal_(generator=gen)


def _dtensor_param(
    local_shape: list[int] | tuple[int, ...], mesh: object, placements: list, shape: tuple[int, ...], gen: torch.Generator, device: torch.device
) -> nn.Parameter:
    """A DTensor parameter whose grad is its own random local tensor (``DTensor.from_local``)."""
    from torch.distributed.tensor import DTensor

    stride = contiguous_stride(tuple(shape))
    p = nn.Parameter(DTensor.from_local(torch.empty(local_shape, device=device), mesh, placements, run_check=False, shape=shape, stride=stride))
    grad = _fill(torch.empty(local_shape, device=device), gen)
    p.grad = DTensor.from_local(grad, mesh, placements, run_check=False, shape=shape, stride=stride)
    return p


# --------------------------------------------------------------------------------------------
# builders
# --------------------------------------------------------------------------------------------


def build_fsdp2(b: Build) -> Workload:
    """Real ``fully_shard`` per block and on the root, 1-D mesh of all ranks, meta init."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh(b.device.type, (b.world,))
    with torch.device("meta"):
        model = Model(b.blocks)
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device=b.device)
    params = list(model.parameters())
    gen = b.gen()
    with torch.no_grad():
        for p in params:
            _fill(p.to_local(), gen)
    if b.fsdp2_grads == "backward":  # real FSDP2 grads: views into each group's reduce-scatter output
        model().backward()
    else:  # one separate tensor per grad
        for p in params:
            grad = _fill(torch.empty(p.to_local().shape, device=b.device), gen)
            p.grad = DTensor.from_local(grad, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
    how = "a real backward" if b.fsdp2_grads == "backward" else "p.grad = ..."
    return b.workload(params, [1.0] * len(params), f"fully_shard per block + root, 1-D mesh ({b.world},), grads from {how}")


def build_tp_fsdp(b: Build) -> Workload:
    """2-D mesh (dp, tp = 2): matrices alternate column/row-parallel over the whole mesh, 1-D
    params on the dp submesh, replicated over tp."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard

    tp = 2 if b.world % 2 == 0 else 1
    dp = b.world // tp
    mesh = init_device_mesh(b.device.type, (dp, tp), mesh_dim_names=("dp", "tp"))
    gen, dp_gen = b.gen(), torch.Generator(b.device).manual_seed(4321 + mesh.get_local_rank("dp"))  # identical on tp peers
    params, weights, matrices = [], [], 0
    for shape in b.shapes:
        if len(shape) == 1:  # norm scale / bias: FSDP-sharded only, replicated over tp
            sub, placements, g, w = mesh["dp"], [Shard(0)], dp_gen, 1.0 / tp
        elif matrices % 2 == 0:  # column-parallel (qkv, up): rows over dp, then over tp
            sub, placements, g, w = mesh, [Shard(0), Shard(0)], gen, 1.0
        else:  # row-parallel (out-proj, down): rows over dp, columns over tp
            sub, placements, g, w = mesh, [Shard(0), Shard(1)], gen, 1.0
        matrices += len(shape) == 2
        local_shape = list(shape)
        for dim, pl in enumerate(placements):
            local_shape[pl.dim] //= sub.size(dim)
        params.append(_dtensor_param(local_shape, sub, placements, shape, g, b.device))
        weights.append(w)
    return b.workload(params, weights, f"2-D mesh dp={dp} x tp={tp}, norms on dp submesh", info={"tp": tp})


def build_replicated(b: Build) -> Workload:
    """DDP-style replicas: plain tensors, identical on every rank, each grad its own tensor
    (``layouts.replicated`` at the workload's shapes)."""
    params = layouts.replicated(b.world, b.shapes, device=b.device).params
    return b.workload(params, [1.0 / b.world] * len(params), f"replicated on {b.world} ranks, {len(params)} separate grads")


def build_dtensor_sep(b: Build) -> Workload:
    """``n`` separate DTensor grads, each its own (4, 8) local tensor (never views of one
    buffer), Shard(0) on a 1-D mesh of all ranks (``layouts.dtensor_separate``)."""
    params = layouts.dtensor_separate(b.world, b.n, SEP_ROWS, SEP_COLS, device=b.device).params
    desc = f"{b.n} separate DTensor grads, Shard(0) on 1-D mesh ({b.world},), local {(SEP_ROWS, SEP_COLS)}"
    return b.workload(params, [1.0] * len(params), desc, n_params=len(params))


def build_fsdp1(b: Build) -> Workload:
    """``FullyShardedDataParallel(FULL_SHARD, use_orig_params=False)``, one unit per block."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    with torch.device("meta"):
        model = Model(b.blocks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FSDP1 deprecation / CPU warnings
        fsdp = FSDP(
            model,
            auto_wrap_policy=ModuleWrapPolicy({Block}),
            param_init_fn=lambda m: m.to_empty(device=b.device, recurse=False),
            device_id=b.device,
            use_orig_params=False,
        )
    params = list(fsdp.parameters())  # FlatParameters, one local 1-D shard each
    gen = b.gen()
    for p in params:
        grad = _fill(torch.empty(p.shape, device=b.device), gen)
        pad = int(getattr(p, "_shard_numel_padded", 0))
        if pad:
            grad[grad.numel() - pad :] = 0  # FSDP keeps the padding of a real grad at zero
        p.grad = grad
    return b.workload(params, [1.0] * len(params), f"FSDP1 FULL_SHARD on {b.world} ranks, one unit per block", module=fsdp)


# --------------------------------------------------------------------------------------------
# the registry
# --------------------------------------------------------------------------------------------

MODEL, SEP = "model", "sep"  # MODEL: run at --sizes and as the large model; SEP: at --sep-sizes only


@dataclass(frozen=True)
class Layout:
    build: Callable[[Build], Workload]
    minimal: Callable[[Workload, float], torch.Tensor]  # the least code right for this layout
    kind: str  # MODEL or SEP
    replicated: bool = False  # every rank holds the whole model (sizes the large model per rank)


LAYOUTS: dict[str, Layout] = {
    "fsdp2": Layout(build_fsdp2, methods.minimal_sharded, MODEL),
    "tp_fsdp": Layout(build_tp_fsdp, methods.minimal_tp_fsdp, MODEL),
    "ddp": Layout(build_replicated, methods.minimal_replicated, MODEL, replicated=True),
    "fsdp1": Layout(build_fsdp1, methods.minimal_flat, MODEL),
    "dtensor_sep": Layout(build_dtensor_sep, methods.minimal_sharded, SEP),
    "plain_sep": Layout(build_replicated, methods.minimal_replicated, SEP, replicated=True),
}
MODEL_LAYOUTS = [name for name, lay in LAYOUTS.items() if lay.kind == MODEL]
SEP_LAYOUTS = [name for name, lay in LAYOUTS.items() if lay.kind == SEP]


def small_blocks(n_params: int) -> list[list[tuple[int, ...]]]:
    shapes = [SMALL_SHAPES[i % len(SMALL_SHAPES)] for i in range(n_params)]
    return [shapes[i : i + PARAMS_PER_BLOCK] for i in range(0, n_params, PARAMS_PER_BLOCK)]


def large_blocks(target_local_bytes: int, d: int, local_fraction: float) -> list[list[tuple[int, ...]]]:
    per_layer = sum(math.prod(s) for s in large_shapes(d)) * 4 * local_fraction
    layers = max(1, math.ceil(target_local_bytes / per_layer))
    return [large_shapes(d) for _ in range(layers)]


def build_workload(
    layout: str, size: str, n_small: int, large_bytes: int, large_d: int, device: torch.device, fsdp2_grads: str = "backward"
) -> Workload:
    """The workload ``layout`` at ``n_small`` parameters (``size="small"``) or as the large
    model of about ``large_bytes`` local grad bytes per rank in layers of hidden size ``large_d``."""
    try:
        spec = LAYOUTS[layout]
    except KeyError:
        raise ValueError(f"unknown layout {layout!r} (known: {', '.join(LAYOUTS)})") from None
    if size == "small":
        blocks = small_blocks(n_small)
    else:  # every rank holds all of a replicated model, 1/world of a sharded one
        blocks = large_blocks(large_bytes, large_d, 1.0 if spec.replicated else 1.0 / dist.get_world_size())
    w = spec.build(Build(layout, size, n_small, blocks, device, fsdp2_grads))
    w.minimal = spec.minimal
    return w


def reference_norm(w: Workload) -> float:
    """Independent 2-norm from the construction: each rank's grads weighted by 1/copies (the one
    float64 reference, ``distclip.verify.reference``), the squares summed over the ranks."""
    grads = [(local(p.grad), weight) for p, weight in zip(w.params, w.weights) if p.grad is not None]
    mine = reference.reference_norm([g for g, _ in grads], 2.0, weights=[weight for _, weight in grads])
    dev = w.local_grads[0].device if w.local_grads else torch.device("cpu")
    acc = torch.tensor(mine * mine, dtype=torch.float64, device=dev)
    dist.all_reduce(acc)
    return float(acc.sqrt())
