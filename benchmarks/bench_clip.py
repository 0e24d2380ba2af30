"""Side-by-side benchmark of gradient-norm clipping under distributed layouts.

Launch with torchrun, e.g.::

    torchrun --standalone --nproc_per_node=2 benchmarks/bench_clip.py --quick
    torchrun --standalone --nproc_per_node=2 benchmarks/bench_clip.py --out benchmarks/results
    torchrun --standalone --nproc_per_node=4 benchmarks/bench_clip.py --out benchmarks/results

For every workload (layout x size) every method is timed in the same process, interleaved
round-robin after warm-up, and reported as median / p10 / p90 / IQR of the per-call wall time
(the slowest rank of each call). One extra, untimed call per method counts the collectives it
issues, measures its extra peak memory and (on CUDA) its host syncs, and checks the norm it
returns against an independent reference. See benchmarks/README.md for every column.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

import distclip

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
import report  # noqa: E402 - benchmarks/report.py (no torch needed there)

NORM_WRONG = 1e-2  # relative error above which a returned norm is counted as wrong for the layout
NORM_IMPRECISE = 1e-5  # ... and above which it is flagged as imprecise
SCALE_WRONG = 1e-3  # relative error of the clipped grads vs. coefficient * grads above which a method clips wrongly
MAX_NORM = 1e20  # so every clip coefficient is exactly 1.0: grads never shrink between calls
METHOD_ORDER = report.METHOD_ORDER


# --------------------------------------------------------------------------------------------
# environment
# --------------------------------------------------------------------------------------------


def log(*args: object) -> None:
    if dist.get_rank() == 0:
        print(*args, flush=True)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def mem_total_gib() -> Optional[float]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 2)
    except OSError:
        pass
    return None


def git_commit() -> Optional[str]:
    """The checked-out commit, read from .git files (no git command is run)."""
    git = HERE.parent / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if head.startswith("ref:"):
            ref = head.split(None, 1)[1]
            path = git / ref
            if path.exists():
                return path.read_text().strip()
            packed = git / "packed-refs"
            if packed.exists():
                for line in packed.read_text().splitlines():
                    if line.endswith(" " + ref):
                        return line.split()[0]
            return None
        return head
    except OSError:
        return None


def hardware_info(device: torch.device, backend: str, threads: int) -> dict:
    info = {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "mem_total_gib": mem_total_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "distclip": getattr(distclip, "__version__", "?"),
        "git_commit": git_commit(),
        "world_size": dist.get_world_size(),
        "backend": backend,
        "device": str(device.type),
        "torch_threads_per_rank": threads,
        "timestamp_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


# --------------------------------------------------------------------------------------------
# workloads
# --------------------------------------------------------------------------------------------

# Shapes of the "many small parameters" models, cycled: a weight, a bias, a non-square weight, a
# norm scale. Every dimension is divisible by 4 (shards evenly over 2 and 4 ranks, and over a
# (2, 2) mesh). Mean 552 elements (2.2 KB fp32) per tensor.
SMALL_SHAPES = [(32, 32), (32,), (64, 16), (128,)]
PARAMS_PER_BLOCK = 50  # one FSDP unit (fully_shard / FSDP1 wrap) per block
SEP_ROWS, SEP_COLS = 4, 8  # local shape of each dtensor_sep grad
MODEL_LAYOUTS = ["fsdp2", "tp_fsdp", "ddp", "fsdp1"]  # run at --sizes, plus the large model
SEP_LAYOUTS = ["dtensor_sep", "plain_sep"]  # run at --sep-sizes only (no large model)


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


@dataclass
class Workload:
    layout: str  # fsdp2 | tp_fsdp | ddp | fsdp1 | dtensor_sep | plain_sep
    size: str  # "small" | "large"
    n_params: int  # parameter tensors of the (unsharded) model
    params: list[torch.Tensor]  # what is passed as `parameters` (FSDP1: the flat parameters)
    module: Optional[nn.Module] = None  # FSDP1 root
    weights: list[float] = field(default_factory=list)  # per param: 1/(ranks holding each element)
    mesh_desc: str = ""

    @property
    def local_grads(self) -> list[torch.Tensor]:
        return [_local(p.grad) for p in self.params if p.grad is not None]

    @property
    def local_bytes(self) -> int:
        return sum(g.numel() * g.element_size() for g in self.local_grads)


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t._local_tensor if isinstance(t, DTensor) else t


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for s in reversed(shape):
        stride.append(acc)
        acc *= s
    return tuple(reversed(stride))


def _blocks(n_params: int) -> list[list[tuple[int, ...]]]:
    shapes = [SMALL_SHAPES[i % len(SMALL_SHAPES)] for i in range(n_params)]
    return [shapes[i : i + PARAMS_PER_BLOCK] for i in range(0, n_params, PARAMS_PER_BLOCK)]


def _large_blocks(target_local_bytes: int, d: int, local_fraction: float) -> list[list[tuple[int, ...]]]:
    per_layer = sum(math.prod(s) for s in large_shapes(d)) * 4 * local_fraction
    layers = max(1, math.ceil(target_local_bytes / per_layer))
    return [large_shapes(d) for _ in range(layers)]


def _fill(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return t.normal_(generator=gen)


def build_workload(
    layout: str, size: str, n_small: int, large_bytes: int, large_d: int, device: torch.device, fsdp2_grads: str = "backward"
) -> Workload:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    world, rank = dist.get_world_size(), dist.get_rank()
    if size == "small":
        blocks = _blocks(n_small)
    else:
        blocks = _large_blocks(large_bytes, large_d, 1.0 if layout == "ddp" else 1.0 / world)
    n_params = sum(len(b) for b in blocks)
    gen = torch.Generator(device).manual_seed(1234 + rank)

    if layout == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world,))
        with torch.device("meta"):
            model = Model(blocks)
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        model.to_empty(device=device)
        params = list(model.parameters())
        with torch.no_grad():
            for p in params:
                _fill(p.to_local(), gen)
        if fsdp2_grads == "backward":
            # Real FSDP2 gradients: each is a view into its group's reduce-scatter output buffer.
            model().backward()
        else:  # one separate tensor per grad
            for p in params:
                local = _fill(torch.empty(p.to_local().shape, device=device), gen)
                p.grad = DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
        desc = (
            f"fully_shard per block + root, 1-D mesh ({world},), grads from {'a real backward' if fsdp2_grads == 'backward' else 'p.grad = ...'}"
        )
        return Workload(layout, size, n_params, params, None, [1.0] * len(params), desc)

    if layout == "tp_fsdp":
        tp = 2 if world % 2 == 0 else 1
        dp = world // tp
        mesh = init_device_mesh(device.type, (dp, tp), mesh_dim_names=("dp", "tp"))
        dp_rank = mesh.get_local_rank("dp")
        dp_gen = torch.Generator(device).manual_seed(4321 + dp_rank)  # identical on tp peers
        params, weights, matrices = [], [], 0
        for block in blocks:
            for shape in block:
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
                stride = _contiguous_stride(shape)
                p = nn.Parameter(
                    DTensor.from_local(torch.empty(local_shape, device=device), sub, placements, run_check=False, shape=shape, stride=stride)
                )
                local = _fill(torch.empty(local_shape, device=device), g)
                p.grad = DTensor.from_local(local, sub, placements, run_check=False, shape=shape, stride=stride)
                params.append(p)
                weights.append(w)
        return Workload(layout, size, n_params, params, None, weights, f"2-D mesh dp={dp} x tp={tp}, norms on dp submesh")

    if layout in ("ddp", "plain_sep"):
        # plain_sep is the same construction, run at its own sizes (--sep-sizes): DDP-style
        # replicas, each grad its own tensor (nothing to coalesce).
        same = torch.Generator(device).manual_seed(99)  # identical grads on every rank
        params = []
        for block in blocks:
            for shape in block:
                p = nn.Parameter(torch.empty(shape, device=device))
                p.grad = _fill(torch.empty(shape, device=device), same)
                params.append(p)
        desc = f"replicated on {world} ranks, {len(params)} separate grads"
        return Workload(layout, size, n_params, params, None, [1.0 / world] * len(params), desc)

    if layout == "dtensor_sep":
        # n separate DTensor grads, each its own (4, 8) local tensor (never views of one buffer),
        # Shard(0) on a 1-D mesh of all ranks.
        mesh = init_device_mesh(device.type, (world,))
        shape, local_shape = (SEP_ROWS * world, SEP_COLS), (SEP_ROWS, SEP_COLS)
        stride = _contiguous_stride(shape)
        params = []
        for _ in range(n_small):
            p = nn.Parameter(
                DTensor.from_local(torch.empty(local_shape, device=device), mesh, [Shard(0)], run_check=False, shape=shape, stride=stride)
            )
            local = _fill(torch.empty(local_shape, device=device), gen)
            p.grad = DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=shape, stride=stride)
            params.append(p)
        desc = f"{n_small} separate DTensor grads, Shard(0) on 1-D mesh ({world},), local {local_shape}"
        return Workload(layout, size, len(params), params, None, [1.0] * len(params), desc)

    if layout == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        with torch.device("meta"):
            model = Model(blocks)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # FSDP1 deprecation / CPU warnings
            fsdp = FSDP(
                model,
                auto_wrap_policy=ModuleWrapPolicy({Block}),
                param_init_fn=lambda m: m.to_empty(device=device, recurse=False),
                device_id=device,
                use_orig_params=False,
            )
        params = list(fsdp.parameters())  # FlatParameters, one local 1-D shard each
        for p in params:
            grad = _fill(torch.empty(p.shape, device=device), gen)
            pad = int(getattr(p, "_shard_numel_padded", 0))
            if pad:
                grad[grad.numel() - pad :] = 0  # FSDP keeps the padding of a real grad at zero
            p.grad = grad
        return Workload(layout, size, n_params, params, fsdp, [1.0] * len(params), f"FSDP1 FULL_SHARD on {world} ranks, one unit per block")

    raise ValueError(f"unknown layout {layout}")


def reference_norm(w: Workload) -> float:
    """Independent 2-norm from the construction: each local grad weighted by 1/copies, float64."""
    dev = w.local_grads[0].device if w.local_grads else torch.device("cpu")
    acc = torch.zeros((), dtype=torch.float64, device=dev)
    for p, weight in zip(w.params, w.weights):
        if p.grad is not None:
            acc += _local(p.grad).double().pow(2).sum() * weight
    dist.all_reduce(acc)
    return float(acc.sqrt())


# --------------------------------------------------------------------------------------------
# methods
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def hand_rolled_clip(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """What people write by hand: local foreach norm, one all-reduce, foreach scale.

    Only correct when every element lives on exactly one rank (fully sharded); kept as a speed
    baseline on every layout."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in params if p.grad is not None]
    norms = torch._foreach_norm(grads, 2.0)
    total_sq = torch.stack(norms).double().pow(2).sum()
    dist.all_reduce(total_sq)
    total = total_sq.sqrt().float()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, coef)
    return total


# The least code that is right for one layout (the "minimal" column). Each knows its layout
# statically, as a hand-written training script would: local tensors -> one _foreach_norm per
# weight -> stack -> float64 sum of squares, weighted for the layout -> one all_reduce -> sqrt ->
# one _foreach_mul_ by min(1, max_norm / (total + 1e-6)).


def _sum_sq(local: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(torch._foreach_norm(local, 2.0)).double().square().sum()


def _finish(local: list[torch.Tensor], sum_sq: torch.Tensor, max_norm: float) -> torch.Tensor:
    dist.all_reduce(sum_sq)
    total = sum_sq.sqrt()
    torch._foreach_mul_(local, (max_norm / (total + 1e-6)).clamp(max=1.0))
    return total


@torch.no_grad()
def minimal_sharded(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """fsdp2 / dtensor_sep (Shard(0) over all ranks) and fsdp1 (flat shards, zero padding): every
    element lives on exactly one rank, so a plain SUM."""
    local = [p.grad._local_tensor for p in params if p.grad is not None]
    return _finish(local, _sum_sq(local), max_norm)


@torch.no_grad()
def minimal_flat(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """fsdp1: the flat parameters' grads are plain local shards already."""
    local = [p.grad for p in params if p.grad is not None]
    return _finish(local, _sum_sq(local), max_norm)


@torch.no_grad()
def minimal_replicated(params: list[torch.Tensor], max_norm: float, world: int) -> torch.Tensor:
    """ddp / plain_sep: identical replicas on every rank, each counted 1/world times."""
    local = [p.grad for p in params if p.grad is not None]
    return _finish(local, _sum_sq(local) / world, max_norm)


@torch.no_grad()
def minimal_tp_fsdp(params: list[torch.Tensor], max_norm: float, tp: int) -> torch.Tensor:
    """tp_fsdp: matrices sharded over the whole (dp, tp) mesh count once; the 1-D params live on
    the dp submesh and are replicated over tp, so they count 1/tp."""
    full, dp_only = [], []
    for p in params:
        g = p.grad
        if g is not None:
            (full if g.device_mesh.ndim == 2 else dp_only).append(g._local_tensor)
    sum_sq = _sum_sq(full)
    if dp_only:
        sum_sq = sum_sq + _sum_sq(dp_only) / tp
    return _finish(full + dp_only, sum_sq, max_norm)


def minimal_for(w: Workload, max_norm: float) -> Callable[[], object]:
    world = dist.get_world_size()
    if w.layout in ("fsdp2", "dtensor_sep"):
        return lambda: minimal_sharded(w.params, max_norm)
    if w.layout == "fsdp1":
        return lambda: minimal_flat(w.params, max_norm)
    if w.layout in ("ddp", "plain_sep"):
        return lambda: minimal_replicated(w.params, max_norm, world)
    if w.layout == "tp_fsdp":
        tp = 2 if world % 2 == 0 else 1  # as in build_workload
        return lambda: minimal_tp_fsdp(w.params, max_norm, tp)
    raise ValueError(w.layout)


def load_torchtitan() -> tuple[Optional[Callable], str]:
    """torchtitan's clip (an optional benchmark dependency): (function, "") or (None, reason)."""
    try:
        from torchtitan.distributed.utils import clip_grad_norm_ as tt_clip
    except Exception as e:  # noqa: BLE001 - any import failure just drops the column
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    return tt_clip, ""


TORCHTITAN: Optional[Callable] = None  # set in main() when the column is requested and importable


def make_methods(w: Workload, names: list[str], flat: torch.Tensor, max_norm: float) -> dict[str, Callable[[], object]]:
    """The methods to time on ``w``, each clipping to ``max_norm`` (so ``MAX_NORM``: coefficient
    exactly 1.0; or a fraction of the norm: coefficient < 1)."""
    target = w.module if w.module is not None else w.params
    one = torch.ones((), device=flat.device, dtype=flat.dtype)
    available: dict[str, Callable[[], object]] = {
        "distclip": lambda: distclip.clip_grad_norm_(target, max_norm),
        "torch": lambda: torch.nn.utils.clip_grad_norm_(w.params, max_norm),
        "minimal": minimal_for(w, max_norm),
        "hand_rolled": lambda: hand_rolled_clip(w.params, max_norm),
        # read every local grad byte once + read and write it once (same total bytes, one buffer)
        "roofline": lambda: (flat.sum(), flat.mul_(one)),
    }
    if TORCHTITAN is not None:
        tt = TORCHTITAN
        available["torchtitan"] = lambda: tt(w.params, max_norm, norm_type=2.0)
    if w.module is not None:
        available["fsdp1"] = lambda: w.module.clip_grad_norm_(max_norm)

    def nograd() -> object:
        with torch.no_grad():
            return distclip.clip_grad_norm_(target, max_norm)

    available["distclip_nograd"] = nograd
    return {n: available[n] for n in names if n in available}


# --------------------------------------------------------------------------------------------
# measurement
# --------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def all_ok(ok: bool, device: torch.device) -> bool:
    flag = torch.tensor([0.0 if ok else 1.0], device=device)
    dist.all_reduce(flag)
    return flag.item() == 0


def as_float(norm: object) -> Optional[float]:
    if isinstance(norm, tuple):  # roofline
        return None
    if isinstance(norm, torch.Tensor):
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return float(norm)
    return None


def count_collectives(fn: Callable[[], object]) -> tuple[object, Optional[int], dict]:
    """Collectives issued by one call: c10d ops (dist.*) and functional collectives (DTensor)."""
    try:
        from torch.distributed.tensor.debug import CommDebugMode
    except ImportError:  # pragma: no cover - old torch
        CommDebugMode = None
    if CommDebugMode is not None:
        with CommDebugMode() as mode:
            out = fn()
        ops = {str(k): v for k, v in mode.get_comm_counts().items()}
        return out, int(mode.get_total_counts()), ops
    # Fallback: wrap the torch.distributed Python API (misses functional collectives).
    counts: dict = {}
    names = ["all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast", "reduce", "all_to_all_single"]
    saved = {n: getattr(dist, n) for n in names if hasattr(dist, n)}

    def wrap(n: str, f: Callable) -> Callable:
        def inner(*a, **k):
            counts[n] = counts.get(n, 0) + 1
            return f(*a, **k)

        return inner

    for n, f in saved.items():
        setattr(dist, n, wrap(n, f))
    try:
        out = fn()
    finally:
        for n, f in saved.items():
            setattr(dist, n, f)
    return out, sum(counts.values()), counts


@contextlib.contextmanager
def quiet_stderr():
    """Silence file descriptor 2 (the profiler's C++ start/stop lines) unless BENCH_VERBOSE=1."""
    if os.environ.get("BENCH_VERBOSE") == "1":
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def extra_peak_bytes(fn: Callable[[], object], device: torch.device) -> tuple[Optional[int], str]:
    """Peak memory allocated during one call above what was allocated before it."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base, "cuda_allocator"
    # CPU: the profiler records every CPU allocation/free of torch's allocator ([memory] events);
    # the running sum of their sizes in time order peaks at the extra memory the call needed.
    try:
        from torch.profiler import ProfilerActivity, profile

        with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        # Raw allocation records (prof.events() folds the allocations made inside an op into that
        # op, leaving only the stray frees as "[memory]" events, so it cannot give a timeline).
        events = [
            (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and "CPU" in str(e.device_type())
        ]
        events.sort(key=lambda x: x[0])
        running = peak = 0
        for _, delta in events:
            running += delta
            peak = max(peak, running)
        return peak, "torch_profiler_cpu_memory"
    except Exception:  # noqa: BLE001 - profiler unavailable: report N/A
        return None, "n/a"


def count_host_syncs(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Synchronizing CUDA calls in one call (torch.cuda.set_sync_debug_mode); None on CPU."""
    if device.type != "cuda":
        return None
    sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sync(device)
    return sum(1 for c in caught if "synchroniz" in str(c.message).lower())


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0]
    k = (len(xs) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def stats_ms(times_s: list[float]) -> dict:
    ms = [t * 1e3 for t in times_s]
    return {
        "median_ms": statistics.median(ms),
        "p10_ms": percentile(ms, 0.10),
        "p90_ms": percentile(ms, 0.90),
        "p25_ms": percentile(ms, 0.25),
        "p75_ms": percentile(ms, 0.75),
        "min_ms": min(ms),
        "mean_ms": statistics.fmean(ms),
        "reps": len(ms),
    }


def timed_call(fn: Callable[[], object], device: torch.device, before: Optional[Callable[[], None]] = None) -> float:
    if before is not None:  # untimed (restores the grads in clipping-on mode)
        before()
    sync(device)
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def slowest_rank(times: list[float], device: torch.device) -> list[float]:
    """Per call, the time of the slowest rank (the step waits for it)."""
    t = torch.tensor(times, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


# --------------------------------------------------------------------------------------------
# distclip per-phase breakdown
# --------------------------------------------------------------------------------------------

# Phase -> the names in distclip.clip's namespace that clip_grad_norm_ calls for it. Timing wraps
# those names for the duration of a call, so the breakdown runs exactly the code clip.py runs,
# whatever its internals look like. If clip.py is restructured, adapt this table only: a name
# that no longer exists is reported in "missing" and its time falls into "other".
PHASE_HOOKS: dict[str, tuple[str, ...]] = {
    "plan": ("_prepare",),  # argument checks, as_param_list, current_stage, local_layout, coalesce
    "local_norms": ("local_partial",),  # per-piece _foreach_norm, float64 weighted partial
    "reduce": ("reduce_partials", "reduce_partials_on_host", "reduce_partial_grads"),  # the all-reduce (+ Partial grads)
    "scale": ("scale_",),  # the _foreach_mul_ by the coefficient
}
PHASES = list(PHASE_HOOKS) + ["other", "total"]


@contextlib.contextmanager
def phase_timers(device: torch.device):
    """Wrap the phase functions in distclip.clip; yields {phase: seconds} (accumulated) and the
    list of hook names not found. On CUDA each phase ends with a synchronize, so its time
    includes its kernels (and the breakdown itself is a little slower than a plain call)."""
    import distclip.clip as clip_mod

    acc: dict[str, float] = {}
    missing: list[str] = []
    saved: dict[str, Callable] = {}

    def wrap(phase: str, f: Callable) -> Callable:
        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                sync(device)
                acc[phase] = acc.get(phase, 0.0) + time.perf_counter() - t0

        return timed

    for phase, fnames in PHASE_HOOKS.items():
        for fname in fnames:
            f = getattr(clip_mod, fname, None)
            if f is None:
                missing.append(fname)
                continue
            saved[fname] = f
            setattr(clip_mod, fname, wrap(phase, f))
    try:
        yield acc, missing
    finally:
        for fname, f in saved.items():
            setattr(clip_mod, fname, f)


def distclip_phases(target: object, max_norm: float, device: torch.device, calls: int, before: Optional[Callable[[], None]]) -> dict:
    """Per-phase time of ``distclip.clip_grad_norm_(target, max_norm)`` in ms, median over
    ``calls`` calls. Per call the phases are those of the *critical* rank: the one with the most
    time outside the reduction, i.e. the last to reach the all-reduce. Its phases add up to its
    call, and its "reduce" is the collective itself, not time spent waiting for a slower rank
    (that wait is reported separately as ``reduce_max_ms``: the largest "reduce" of any rank).
    "other" is the rest of the call (validation, agreement check, coefficient, return value)."""
    per_call: list[list[float]] = []
    not_found: list[str] = []
    for _ in range(calls):
        if before is not None:
            before()
        sync(device)
        dist.barrier()
        with phase_timers(device) as (acc, hooks_missing):
            t0 = time.perf_counter()
            distclip.clip_grad_norm_(target, max_norm)
            sync(device)
            total = time.perf_counter() - t0
        vals = [acc.get(ph, 0.0) for ph in PHASE_HOOKS]
        per_call.append(vals + [total - sum(vals), total])
        not_found = hooks_missing
    if not calls:
        return {}
    mine = torch.tensor(per_call, dtype=torch.float64, device=device)  # calls x len(PHASES)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    every = torch.stack(gathered)  # ranks x calls x phases
    i_reduce, i_total = PHASES.index("reduce"), PHASES.index("total")
    critical = (every[:, :, i_total] - every[:, :, i_reduce]).argmax(dim=0)  # per call
    chosen = every[critical, torch.arange(calls)]  # calls x phases
    med = chosen.median(dim=0).values.tolist()
    out = {f"{ph}_ms": v * 1e3 for ph, v in zip(PHASES, med)}
    out["reduce_max_ms"] = float(every[:, :, i_reduce].max(dim=0).values.median()) * 1e3
    out["calls"] = calls
    if not_found:
        out["missing_hooks"] = not_found
    return out


# --------------------------------------------------------------------------------------------
# one workload
# --------------------------------------------------------------------------------------------


class GradSnapshot:
    """A copy of this rank's local grads: ``restore()`` puts them back (clipping-on mode, before
    every call, outside the timed region, identically for every method), ``scale_error(coef)``
    says how far the grads are from ``coef * saved`` (relative, over all ranks)."""

    def __init__(self, local: list[torch.Tensor]) -> None:
        self.local = local
        self.saved = [g.detach().clone() for g in local]

    def restore(self) -> None:
        if self.local:
            torch._foreach_copy_(self.local, self.saved)

    @torch.no_grad()
    def scale_error(self, coef: float, device: torch.device) -> float:
        if not self.local:
            num = den = torch.zeros((), dtype=torch.float64, device=device)
        else:
            expected = torch._foreach_mul(self.saved, coef)
            diff = torch._foreach_sub(self.local, expected)
            num = torch.stack(torch._foreach_norm(diff, 2.0, dtype=torch.float64)).square().sum()
            den = torch.stack(torch._foreach_norm(expected, 2.0, dtype=torch.float64)).square().sum()
        t = torch.stack([num, den])
        dist.all_reduce(t)
        return float((t[0] / t[1].clamp_min(1e-300)).sqrt())


def probe(fn: Callable[[], object], device: torch.device, verbose: bool) -> tuple[Optional[str], float]:
    """One call: (error or None, slowest rank's time in s); every rank learns if any failed."""
    err = None
    dist.barrier()
    t0 = time.perf_counter()
    try:
        fn()
        sync(device)
    except Exception as e:  # noqa: BLE001 - recorded as N/A for this layout
        err = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        if verbose:
            traceback.print_exc()
    first = slowest_rank([time.perf_counter() - t0], device)[0]
    if not all_ok(err is None, device):
        return err or "failed on another rank", first
    return None, first


CAPPED = ("torch", "torchtitan")  # skipped on DTensor layouts above --torch-max-params


def bench_workload(w: Workload, method_names: list[str], args: argparse.Namespace, device: torch.device) -> list[dict]:
    local_bytes = w.local_bytes
    flat = torch.randn(max(1, local_bytes // 4), device=device)  # roofline buffer, same bytes
    ref = reference_norm(w)
    modes = [m for m in args.clip.split(",") if m]
    max_norms = {"off": MAX_NORM, "on": args.clip_on_rel * ref}
    snap = GradSnapshot(w.local_grads)
    base = {
        "layout": w.layout,
        "size": w.size,
        "n_params": w.n_params,
        "n_local_grads": len(w.local_grads),
        "local_grad_bytes": local_bytes,
        "layout_desc": w.mesh_desc,
        "reference_norm": ref,
    }
    records: dict[tuple[str, str], dict] = {}
    runnable: dict[tuple[str, str], Callable[[], object]] = {}
    befores: dict[tuple[str, str], Optional[Callable[[], None]]] = {}
    is_dtensor = any(hasattr(p.grad, "device_mesh") for p in w.params if p.grad is not None)
    probed: set[str] = set()
    # 1. per mode, one probe call per method (all ranks agree whether it works), then the
    #    untimed extras. The first probe of a method is its first call on this workload.
    for mode in modes:
        max_norm = max_norms[mode]
        coef = 1.0 if mode == "off" else min(1.0, max_norm / (ref + 1e-6))
        before = snap.restore if mode == "on" else None
        for name, fn in make_methods(w, method_names, flat, max_norm).items():
            rec = dict(base, method=name, clip=mode, max_norm=max_norm, expected_coef=coef)
            key = (name, mode)
            records[key] = rec
            if name in CAPPED and is_dtensor and 0 < args.torch_max_params < w.n_params:
                rec["error"] = (
                    f"skipped above --torch-max-params={args.torch_max_params}: its first call on DTensor grads "
                    "runs sharding propagation quadratic in the number of grads (see first_call_ms at smaller sizes)"
                )
                continue
            snap.restore()
            err, first = probe(fn, device, args.verbose)
            rec["first_call_ms" if name not in probed else "probe_ms"] = first * 1e3
            probed.add(name)
            if err is not None:
                rec["error"] = err
                continue
            snap.restore()
            out, n_coll, ops = count_collectives(fn)
            rec["collectives"] = n_coll
            rec["collective_ops"] = ops
            norm = as_float(out)
            rec["norm"] = norm
            if norm is not None:
                # > 1e-2: the method does not handle the layout (counts a shard twice / misses one);
                # 1e-5..1e-2: float32 accumulation error (torch reduces a big tensor in one fp32 pass).
                rec["norm_rel_err"] = abs(norm - ref) / max(abs(ref), 1e-30)
                rec["norm_ok"] = rec["norm_rel_err"] < NORM_WRONG
                # the grads after the call vs. coef * the grads before it (coef from the reference)
                rec["scale_rel_err"] = snap.scale_error(coef, device)
                rec["scale_ok"] = rec["scale_rel_err"] < SCALE_WRONG
            snap.restore()
            rec["extra_peak_bytes"], rec["memory_method"] = extra_peak_bytes(fn, device)
            if rec["extra_peak_bytes"] is not None:
                rec["extra_peak_frac"] = rec["extra_peak_bytes"] / max(1, local_bytes)
            snap.restore()
            rec["host_syncs"] = count_host_syncs(fn, device)
            runnable[key] = fn
            befores[key] = before
    snap.restore()

    # 2. warm-up, sized so the workload fits its time budget
    keys = list(runnable)
    warm: dict[tuple[str, str], list[float]] = {k: [] for k in keys}
    for _ in range(args.warmup):
        for k in keys:
            warm[k].append(timed_call(runnable[k], device, befores[k]))
    per_round = sum(statistics.median(slowest_rank(warm[k], device)) for k in keys) if keys and args.warmup else 0.0
    if per_round > 0:
        reps = int(min(args.repeats, max(args.min_repeats, args.budget_s / per_round)))
    else:
        reps = args.repeats

    # 3. timed calls, methods (x clipping modes) interleaved round-robin with a rotating start
    times: dict[tuple[str, str], list[float]] = {k: [] for k in keys}
    for r in range(reps):
        j = r % max(1, len(keys))
        for k in keys[j:] + keys[:j]:
            times[k].append(timed_call(runnable[k], device, befores[k]))
    for k in keys:
        records[k].update(stats_ms(slowest_rank(times[k], device)))

    # 4. distclip's per-phase breakdown (after timing, so it does not disturb it)
    for mode in modes:
        rec = records.get(("distclip", mode))
        if rec is not None and "median_ms" in rec and args.phase_repeats > 0:
            target = w.module if w.module is not None else w.params
            rec["phases"] = distclip_phases(target, max_norms[mode], device, args.phase_repeats, snap.restore if mode == "on" else None)
    snap.restore()

    for mode in modes:
        roof = records.get(("roofline", mode), {}).get("median_ms")
        for (_, m), rec in records.items():
            if m == mode and roof and "median_ms" in rec:
                rec["roofline_ratio"] = rec["median_ms"] / roof
    del flat, snap
    return list(records.values())


# --------------------------------------------------------------------------------------------
# summary
# --------------------------------------------------------------------------------------------


def print_summary(results: list[dict], meta: dict) -> None:
    print()
    print(
        f"== per-call median ms (p10-p90), world={meta['world_size']} backend={meta['backend']} threads/rank={meta['torch_threads_per_rank']} =="
    )
    methods = report.methods_in(results)
    header = f"{'layout':11} {'size':5} {'params':>6} {'clip':4} {'MB/rank':>8} " + " ".join(f"{m:>21}" for m in methods) + "  colls  mem%"
    print(header)
    for k in report.workload_keys(results):
        rows = report.rows_for(results, k)
        any_r = next(iter(rows.values()))
        cells = []
        for m in methods:
            r = rows.get(m)
            if r is None:
                cells.append(f"{'-':>21}")
            elif "median_ms" not in r:
                cells.append(f"{'n/a':>21}")
            else:
                err = r.get("norm_rel_err") or 0.0
                bad = "!" if err >= NORM_WRONG or r.get("scale_ok") is False else ("~" if err >= NORM_IMPRECISE else "")
                cells.append(f"{r['median_ms']:8.3f} ({r['p10_ms']:.2f}-{r['p90_ms']:.2f}){bad}".rjust(21))
        d = rows.get("distclip", {})
        frac = d.get("extra_peak_frac")
        mem = f"{100 * frac:5.1f}" if frac is not None else "  n/a"
        print(
            f"{k[0]:11} {k[1]:5} {k[2]:>6} {k[3]:4} {any_r['local_grad_bytes'] / 2**20:8.1f} "
            + " ".join(cells)
            + f"  {d.get('collectives')!s:>5}  {mem}"
        )
    print("('!' = wrong norm for the layout (rel. err > 1e-2) or wrongly scaled grads; '~' = imprecise norm (rel. err > 1e-5);")
    print(" 'n/a' = fails or skipped; colls = distclip's collectives per call; mem% = distclip's extra peak memory / local grad bytes)")
    print()
    print("== distclip per-phase breakdown (ms, median over calls; per call the rank that reaches the all-reduce last) ==")
    print(f"{'layout':11} {'size':5} {'params':>6} {'clip':4} " + " ".join(f"{ph:>11}" for ph in PHASES) + "   timed median")
    for k in report.workload_keys(results):
        d = report.rows_for(results, k).get("distclip")
        ph = (d or {}).get("phases")
        if ph:
            print(
                f"{k[0]:11} {k[1]:5} {k[2]:>6} {k[3]:4} "
                + " ".join(f"{ph.get(p + '_ms', float('nan')):11.3f}" for p in PHASES)
                + f"   {d['median_ms']:12.3f}   (max rank reduce incl. wait {ph.get('reduce_max_ms', float('nan')):.3f})"
            )
            if ph.get("missing_hooks"):
                print(f"    (not found in distclip.clip, counted in 'other': {', '.join(ph['missing_hooks'])})")
    print()
    print(f"== targets (world size {meta['world_size']}) ==")
    for row in report.target_rows(results, meta["world_size"]):
        vs = report.format_value(row["value"])
        verdict = {True: "MET    ", False: "NOT MET", None: "n/a    "}[row["pass"]]
        print(f"  {verdict}  {row['check']:<84} {vs:>10}  (target {row['target']})")


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, few repeats (smoke test, < 60 s at 2 ranks)")
    ap.add_argument("--out", default=str(HERE / "results"), help="directory for the JSON, markdown and PNG results")
    ap.add_argument("--layouts", default=",".join(MODEL_LAYOUTS + SEP_LAYOUTS), help=f"comma list of {','.join(MODEL_LAYOUTS + SEP_LAYOUTS)}")
    ap.add_argument(
        "--sizes", default=None, help="comma list of parameter counts for the many-small models (default 1000,4000,16000; quick 100,1000)"
    )
    ap.add_argument(
        "--sep-sizes",
        default=None,
        help="LAYOUT=N,... sizes of the separate-grads workloads (default dtensor_sep=2000,plain_sep=4000; quick dtensor_sep=100,plain_sep=100)",
    )
    ap.add_argument(
        "--clip", default="off,on", help="clipping modes, comma list: off (max_norm 1e20, coefficient exactly 1) and on (coefficient < 1)"
    )
    ap.add_argument("--clip-on-rel", type=float, default=1e-3, help="max_norm of the 'on' mode, relative to the reference norm (default 1e-3)")
    ap.add_argument(
        "--phase-repeats",
        type=int,
        default=None,
        help="calls for distclip's per-phase breakdown per workload and mode (default 10; quick 3; 0 skips)",
    )
    ap.add_argument(
        "--large-mb", type=float, default=None, help="local fp32 grad MB per rank of the large model (default 256; quick 8); 0 skips it"
    )
    ap.add_argument("--large-d", type=int, default=None, help="hidden size of the large model's layers (default 2048; quick 256)")
    ap.add_argument(
        "--methods", default="distclip,torch,torchtitan,fsdp1,minimal,hand_rolled,roofline", help=f"comma list of {','.join(METHOD_ORDER)}"
    )
    ap.add_argument("--repeats", type=int, default=None, help="max timed calls per method (default 30; quick 5)")
    ap.add_argument("--min-repeats", type=int, default=None, help="min timed calls per method (default 10; quick 3)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed warm-up calls per method (default 3; quick 1)")
    ap.add_argument("--budget-s", type=float, default=None, help="target seconds of timed calls per workload (default 20; quick 2)")
    ap.add_argument(
        "--torch-max-params",
        type=int,
        default=None,
        help="skip torch.nn.utils.clip_grad_norm_ and torchtitan's clip_grad_norm_ on DTensor layouts above this many params: "
        "their first call is quadratic (about 14 s at 2000, 1 min at 4000 on 2 ranks); 0 = never skip (default 4000; quick 1000)",
    )
    ap.add_argument(
        "--fsdp2-grads",
        choices=["backward", "separate"],
        default="backward",
        help="FSDP2 grads from one real forward/backward (views into FSDP2's reduce-scatter buffers, as in "
        "training; default) or assigned as separate tensors",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch threads per rank (default: usable cores // local ranks, at least 1)")
    ap.add_argument("--tag", default="", help="extra suffix for the result file name")
    ap.add_argument("--no-report", action="store_true", help="skip writing the markdown summary and plots")
    ap.add_argument("--verbose", action="store_true", help="print tracebacks of methods that fail on a layout")
    args = ap.parse_args(argv)
    q = args.quick
    defaults = {
        "sizes": "100,1000" if q else "1000,4000,16000",
        "sep_sizes": "dtensor_sep=100,plain_sep=100" if q else "dtensor_sep=2000,plain_sep=4000",
        "phase_repeats": 3 if q else 10,
        "torch_max_params": 1000 if q else 4000,
        "large_mb": 8.0 if q else 256.0,
        "large_d": 256 if q else 2048,
        "repeats": 5 if q else 30,
        "min_repeats": 3 if q else 10,
        "warmup": 1 if q else 3,
        "budget_s": 2.0 if q else 20.0,
    }
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    if args.verbose:
        os.environ["BENCH_VERBOSE"] = "1"
    if "RANK" not in os.environ:
        sys.exit("launch with torchrun, e.g.: torchrun --standalone --nproc_per_node=2 benchmarks/bench_clip.py --quick")
    use_cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = args.threads or max(1, cores // local_world)
    torch.set_num_threads(threads)
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10), **({"device_id": device} if use_cuda else {}))
    world = dist.get_world_size()
    meta = hardware_info(device, backend, threads)
    meta["quick"] = args.quick
    meta["max_norm"] = MAX_NORM
    meta["clip_modes"] = args.clip
    meta["clip_on_rel"] = args.clip_on_rel
    log(
        f"bench_clip: world={world} backend={backend} device={device.type} threads/rank={threads} "
        f"cpu='{meta['cpu_model']}' torch={torch.__version__}"
    )

    layouts = [x for x in args.layouts.split(",") if x]
    unknown = set(layouts) - set(MODEL_LAYOUTS + SEP_LAYOUTS)
    if unknown:
        sys.exit(f"unknown layouts: {sorted(unknown)}")
    bad_modes = set(args.clip.split(",")) - {"off", "on", ""}
    if bad_modes:
        sys.exit(f"unknown --clip modes: {sorted(bad_modes)}")
    sizes = [int(x) for x in args.sizes.split(",") if x]
    sep_sizes: dict[str, list[int]] = {}
    for item in (x for x in args.sep_sizes.split(",") if x):
        name, _, n = item.partition("=")
        sep_sizes.setdefault(name.strip(), []).append(int(n))
    method_names = [m for m in args.methods.split(",") if m]
    global TORCHTITAN
    if "torchtitan" in method_names:
        TORCHTITAN, why = load_torchtitan()
        if TORCHTITAN is None:
            log(f"torchtitan column skipped: torchtitan.distributed.utils.clip_grad_norm_ is not importable ({why})")
            method_names.remove("torchtitan")
            meta["torchtitan_skipped"] = why
        else:
            import torchtitan

            meta["torchtitan"] = getattr(torchtitan, "__version__", "?")
    jobs = [(layout, "small", n) for layout in layouts if layout in MODEL_LAYOUTS for n in sizes]
    jobs += [(layout, "small", n) for layout in layouts if layout in SEP_LAYOUTS for n in sep_sizes.get(layout, [])]
    if args.large_mb > 0:
        jobs += [(layout, "large", 0) for layout in layouts if layout in MODEL_LAYOUTS]

    results: list[dict] = []
    t_start = time.perf_counter()
    for layout, size, n in jobs:
        t0 = time.perf_counter()
        w = build_workload(layout, size, n, int(args.large_mb * 2**20), args.large_d, device, args.fsdp2_grads)
        t_build = time.perf_counter() - t0
        names = [m for m in method_names if m != "fsdp1" or layout == "fsdp1"]
        recs = bench_workload(w, names, args, device)
        for r in recs:
            r["build_s"] = t_build
        results += recs
        log(
            f"  {layout:11} {size:5} params={w.n_params:<6} local={w.local_bytes / 2**20:8.1f} MB  "
            f"build {t_build:5.1f}s  bench {time.perf_counter() - t0 - t_build:5.1f}s"
        )
        for d in recs:
            if d["method"] == "distclip" and "median_ms" in d:
                ph = d.get("phases") or {}
                parts = "  ".join(f"{k} {ph[k + '_ms']:.2f}" for k in PHASES if k + "_ms" in ph)
                log(f"      distclip clip={d['clip']:3} {d['median_ms']:8.3f} ms   phases (ms, last rank to reach the all-reduce): {parts}")
        del w
        dist.barrier()
    meta["total_s"] = time.perf_counter() - t_start

    if dist.get_rank() == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        name = f"bench_w{world}_{backend}{'_quick' if args.quick else ''}{('_' + args.tag) if args.tag else ''}.json"
        path = out / name
        path.write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str))
        print_summary(results, meta)
        print(f"\nwrote {path}  (total {meta['total_s']:.1f} s)")
        if not args.no_report:
            try:
                for p in report.generate(out, quick=args.quick):
                    print(f"wrote {p}")
            except Exception:  # noqa: BLE001 - the JSON is the result; plots are a convenience
                traceback.print_exc()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
