"""One-command GPU check: ``python benchmarks/gpu_check.py``.

Needs only torch and a GPU (no numpy, no pytest; distclip is imported from this checkout). On one
GPU it prints one summary and writes one JSON (``--out``), within a time budget (``--budget-s``,
450 s: under 8 minutes with start-up; a part past it is skipped and reported):

- **verify**: every ``distclip.verify`` layout on CUDA tensors, through that package's own
  scenarios and runner (float64 single-process reference, every norm type): at world size 1 with
  NCCL, and with ``--world`` gloo ranks sharing the GPU (NCCL refuses two ranks on one GPU). A
  layout that fails because gloo cannot run one of its collectives on CUDA tensors is listed as
  such, apart from distclip's failures.
- **host syncs**: every public call (``clip_grad_norm_``, ``get_total_norm``,
  ``clip_grads_with_norm_``, ``grad_norms``, ``GradGuard.clip_`` + ``step`` with
  ``torch.optim.AdamW(fused=True)``, fixed and ZClip past warm-up) under
  ``torch.cuda.set_sync_debug_mode``: synchronizing calls counted ("warn") on the first and on a
  warm call, then the warm call run once more under "error". Pass: no sync in a warm call.
- **timing**: distclip vs ``torch.nn.utils.clip_grad_norm_`` vs the minimal code (``_foreach_norm``,
  float64 sum, one ``all_reduce``, ``_foreach_mul_``), CUDA-event timed, at 20 / 100 / 1 000 /
  10 000 fp32 tensors and at about 1 B bf16 elements, there as a fraction of the GPU's memory
  bandwidth (measured with a copy kernel on the same GPU; a clip must move 3x the grads' bytes:
  one read for the norm, one read and one write for the scale).
- **CUDA graph**: whether a warm call can be captured with ``torch.cuda.graph`` (and replays to
  the eager result): yes/no and the error, for distclip, torch and the minimal code.

Without CUDA (CI) it runs a smoke subset on CPU and says what it skipped: two layouts with two
gloo ranks, the public calls on the accelerator code path (``DISTCLIP_HOST_READS=never``) with host
reads counted by a dispatch mode (``aten._local_scalar_dense`` and ops whose output size depends on
the data), and a small timing table (wall clock).

Every part runs in its own processes (``--part``, started by this script), each with its own
process group, so that a hang, a crash or a failed graph capture cannot spoil the next part.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # distclip from this checkout, installed or not

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from distclip.verify.launch import free_port, stop  # noqa: E402

SIZES = (20, 100, 1000, 10000)  # parameter-tensor counts of the timing table
SHAPES = ((32, 32), (32,), (64, 16), (128,))  # benchmarks/README.md's small shapes, 552 elements on average
LARGE_SHAPE = (4096, 4096)  # bf16 grads of the large workload
LARGE_TENSORS = 60  # 60 x 4096 x 4096 = 1.007e9 elements, 2.0 GB of bf16
SMOKE_LAYOUTS = ("DDP", "FSDP2")
SMOKE_NORM_TYPES = (2.0, math.inf)
MAX_NORM_OFF = 1e20  # coefficient exactly 1.0: the grads never change, nothing to restore between calls
# gloo refusing a CUDA tensor says one of these (a limit of the backend, not of distclip); a timeout
# or hang says one of NOT_GLOO_LIMITS and is counted as a failure whatever else it says
GLOO_LIMITS = ("gloo", "no backend type associated", "unsupported device type")
NOT_GLOO_LIMITS = ("timeout", "timed out", "hang")


# ----------------------------------------------------------------------------- helpers


def _jsonable(x: Any) -> Any:
    """NaN -> None, +-inf -> "inf"/"-inf" (strict JSON), recursively."""
    if isinstance(x, float):
        if math.isnan(x):
            return None
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        return x
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:400]}"


def _write(path: str, record: dict) -> None:
    Path(path).write_text(json.dumps(_jsonable(record), indent=1))


def _device() -> torch.device:
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _init_group(device: torch.device, timeout_s: float) -> None:
    """The part's process group, from the environment this script set (RANK, WORLD_SIZE, ...)."""
    backend = os.environ.get("GPU_CHECK_BACKEND", "nccl" if device.type == "cuda" else "gloo")
    kwargs: dict = {}
    if backend == "nccl":
        kwargs["device_id"] = device  # binds the communicator to the GPU now, not at the first collective
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)


def _small_grads(n: int, device: torch.device, dtype: torch.dtype = torch.float32) -> list[torch.nn.Parameter]:
    """``n`` parameters cycling through ``SHAPES``, each with its own random grad."""
    gen = torch.Generator().manual_seed(n)
    params = []
    for i in range(n):
        shape = SHAPES[i % len(SHAPES)]
        p = torch.nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        p.grad = torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
        params.append(p)
    return params


def _large_grads(device: torch.device, tensors: int) -> list[torch.nn.Parameter]:
    params = []
    for _ in range(tensors):
        p = torch.nn.Parameter(torch.empty(LARGE_SHAPE, device=device, dtype=torch.bfloat16))
        p.grad = torch.randn(LARGE_SHAPE, device=device, dtype=torch.bfloat16)
        params.append(p)
    return params


@torch.no_grad()
def minimal_clip(params: Sequence[torch.Tensor], max_norm: float) -> torch.Tensor:
    """The least code that is right for replicated (world size 1) grads: one ``_foreach_norm`` per
    (device, dtype) group, float64 sum of squares, one all-reduce, one ``_foreach_mul_``."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
    sum_sq = sum(torch.stack(torch._foreach_norm(g, 2.0)).double().square().sum() for g in groups.values())
    assert isinstance(sum_sq, torch.Tensor)
    if dist.is_initialized():
        dist.all_reduce(sum_sq)
        sum_sq = sum_sq / dist.get_world_size()  # replicas: each rank's copy counts 1/world
    total = sum_sq.sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for (_, dtype), grads in groups.items():
        torch._foreach_mul_(grads, coef.to(dtype))
    return total


def _methods(params: list[torch.nn.Parameter], max_norm: float) -> dict[str, Callable[[], object]]:
    import distclip

    return {
        "distclip": lambda: distclip.clip_grad_norm_(params, max_norm),
        "torch": lambda: torch.nn.utils.clip_grad_norm_(params, max_norm),  # foreach where the device has it
        "minimal": lambda: minimal_clip(params, max_norm),
    }


# ----------------------------------------------------------------------------- part: verify


def part_verify(args: argparse.Namespace) -> int:
    """One rank of ``distclip.verify``'s runner, on CUDA (or CPU) tensors."""
    # the package's own names (its modules move; its __init__ keeps these)
    from distclip.verify import NORM_TYPES, SCENARIOS, Ctx, RunAborted, run, select

    warnings.filterwarnings("ignore")  # torch's deprecation notes about the demo wrappers
    device = _device()
    if device.type == "cuda":
        torch.cuda.set_device(device)  # every rank on GPU 0: before any DeviceMesh picks one by LOCAL_RANK
    _init_group(device, args.timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    if device.type == "cpu" and world > 1:
        torch.set_num_threads(1)
    ctx = Ctx(rank, world, device, "distclip", timeout_s=args.timeout)
    names = list(args.layouts) if args.layouts else None
    norm_types = tuple(args.norm_types) if args.norm_types else NORM_TYPES
    chosen = [s.name for s in select(world, names)]
    not_applicable = [s.name for s in SCENARIOS if (names is None or s.name in names) and s.name not in chosen]

    def progress(line: str) -> None:
        if rank == 0:
            print(f"  [{args.label}] {line}", flush=True)

    start = time.perf_counter()
    aborted = False
    try:
        rows = run(ctx, names, norm_types, progress)
    except RunAborted as e:
        rows, aborted = e.rows, True
    if rank == 0:
        _write(args.part_out, {"rows": [dataclasses.asdict(r) for r in rows], "norm_types": list(norm_types),
                               "not_applicable": not_applicable, "aborted": aborted, "seconds": time.perf_counter() - start,
                               "backend": dist.get_backend(), "world": world, "device": str(device)})
    if aborted:  # a rank is stuck in a collective: tearing the group down could block too
        sys.stdout.flush()
        os._exit(1)
    ctx.agreement()("done")
    dist.destroy_process_group()
    return 0


def _gloo_limit(detail: str) -> bool:
    text = detail.lower()
    return any(s in text for s in GLOO_LIMITS) and not any(s in text for s in NOT_GLOO_LIMITS)


def summarize_verify(record: dict, shared_gpu_gloo: bool) -> dict:
    """Per layout: pass, fail, or (gloo ranks sharing a GPU only) a collective gloo cannot run on
    CUDA tensors, which is not counted against distclip."""
    layouts: dict[str, dict] = {}
    for row in record.get("rows", []):
        entry = layouts.setdefault(row["layout"], {"checks": 0, "passed": 0, "details": []})
        entry["checks"] += 1
        entry["passed"] += bool(row["ok"])
        if row["detail"] and row["detail"] not in entry["details"]:
            entry["details"].append(row["detail"])
    passed, failed, gloo_limited = [], [], []
    for name, entry in layouts.items():
        if entry["passed"] == entry["checks"]:
            entry["status"] = "pass"
            passed.append(name)
        elif shared_gpu_gloo and entry["passed"] == 0 and entry["details"] and all(_gloo_limit(d) for d in entry["details"]):
            entry["status"] = "gloo cannot run it on CUDA tensors"
            gloo_limited.append(name)
        else:
            entry["status"] = "FAIL"
            failed.append(name)
    return {"layouts": layouts, "passed": passed, "failed": failed, "gloo_limited": gloo_limited,
            "not_applicable": record.get("not_applicable", []), "aborted": record.get("aborted", False),
            "seconds": record.get("seconds"), "backend": record.get("backend"), "world": record.get("world"),
            "device": record.get("device"), "norm_types": record.get("norm_types"),
            "ok": bool(passed) and not failed and not record.get("aborted", False)}  # gloo limits alone are no pass


# ----------------------------------------------------------------------------- part: host syncs


class _SyncCounter:
    """Counts host syncs in a block. CUDA: ``torch.cuda.set_sync_debug_mode("warn")``, each warning
    one sync, with the innermost frame of distclip (or the caller) that made it. CPU (no such
    mode): a dispatch mode counting the ops that read a value on the host or size their output by
    the data, what the same code would sync on on a GPU."""

    HOST_READ_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "item", "equal", "is_nonzero")

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.events: list[str] = []

    def _where(self) -> str:
        torch_dir = os.path.dirname(torch.__file__)  # torch's own frames (dispatch, warnings glue) say nothing
        frames = [f for f in traceback.extract_stack()[:-2]
                  if Path(f.filename).name not in ("gpu_check.py", "warnings.py") and not f.filename.startswith(torch_dir)]
        mine = [f for f in frames if f"{os.sep}distclip{os.sep}" in f.filename]
        if not (mine or frames):
            return "?"
        f = (mine or frames)[-1]
        return f"{Path(f.filename).name}:{f.lineno} {f.name}"

    def run(self, fn: Callable[[], object]) -> int:
        before = len(self.events)
        if self.device.type == "cuda":
            show = warnings.showwarning

            def record(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
                if "synchroniz" in str(message).lower():
                    self.events.append(self._where())

            _sync(self.device)
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                warnings.showwarning = record
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    fn()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
                    warnings.showwarning = show
            _sync(self.device)
        else:
            from torch.utils._python_dispatch import TorchDispatchMode

            counter = self

            class HostReads(TorchDispatchMode):
                def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
                    if func.__name__.split(".")[0] in _SyncCounter.HOST_READ_OPS:
                        counter.events.append(f"{func.__name__} at {counter._where()}")
                    return func(*args, **(kwargs or {}))

            with HostReads():
                fn()
        return len(self.events) - before


def part_syncs(args: argparse.Namespace) -> int:
    """Every public call on a small real model: syncs in the first and in a warm call, then the warm
    call once more under ``set_sync_debug_mode("error")`` (CUDA)."""
    import distclip

    device = _device()
    if device.type == "cpu":
        os.environ["DISTCLIP_HOST_READS"] = "never"  # the accelerator code path, on CPU
    else:
        torch.cuda.set_device(device)
    _init_group(device, args.timeout)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64), torch.nn.LayerNorm(64)).to(device)
    model(torch.randn(16, 64, device=device)).square().mean().backward()
    params = list(model.parameters())
    saved = [p.grad.detach().clone() for p in params]  # type: ignore[union-attr]

    def restore() -> None:
        for p, g in zip(params, saved):
            p.grad.copy_(g)  # type: ignore[union-attr]

    totals: dict[str, torch.Tensor] = {}

    def get_total_norm() -> None:
        totals["t"] = distclip.get_total_norm([p.grad for p in params if p.grad is not None])

    def clip_with_norm() -> None:
        distclip.clip_grads_with_norm_(params, 1e-3, totals["t"])

    def guarded(guard: Any, optimizer: torch.optim.Optimizer) -> Callable[[], None]:
        def call() -> None:
            guard.clip_(model)
            guard.step(optimizer)
        return call

    fused_error = ""
    try:
        opt_fixed: Optional[torch.optim.Optimizer] = torch.optim.AdamW(params, lr=1e-6, fused=True)
        opt_zclip: Optional[torch.optim.Optimizer] = torch.optim.AdamW(params, lr=1e-6, fused=True)
    except Exception as e:  # noqa: BLE001 - a torch without the fused kernel on this device
        opt_fixed = opt_zclip = None
        fused_error = _error(e)
    calls: dict[str, Optional[Callable[[], object]]] = {
        "clip_grad_norm_": lambda: distclip.clip_grad_norm_(params, 1e-3),
        "get_total_norm": get_total_norm,
        "clip_grads_with_norm_": clip_with_norm,
        "grad_norms": lambda: distclip.grad_norms(model),
        "GradGuard.clip_+step (fixed, fused AdamW)": guarded(distclip.GradGuard(max_norm=1e-3), opt_fixed) if opt_fixed else None,
        "GradGuard.clip_+step (zclip past warm-up, fused AdamW)":
            guarded(distclip.GradGuard(max_norm=1e-3, adaptive="zclip", warmup_steps=2), opt_zclip) if opt_zclip else None,
    }
    counter = _SyncCounter(device)
    results: dict[str, dict] = {}
    for name, fn in calls.items():
        if fn is None:
            results[name] = {"ok": False, "error": f"torch.optim.AdamW(fused=True) on {device.type}: {fused_error}"}
            continue
        entry: dict[str, Any] = {}
        try:
            restore()
            counter.events.clear()
            entry["first_call_syncs"] = counter.run(fn)
            entry["first_sync_sites"] = sorted(set(counter.events))[:8]
            for _ in range(3):  # warm: plans cached, ZClip (warmup_steps=2) past its warm-up
                restore()
                fn()
            restore()
            counter.events.clear()
            entry["warm_call_syncs"] = counter.run(fn)
            entry["warm_sync_sites"] = sorted(set(counter.events))[:8]
            if device.type == "cuda":
                restore()
                _sync(device)
                torch.cuda.set_sync_debug_mode("error")
                try:
                    fn()
                    entry["error_mode"] = "no error"
                except Exception as e:  # noqa: BLE001 - the first sync raises: reported
                    entry["error_mode"] = _error(e)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
                _sync(device)
            entry["ok"] = entry["warm_call_syncs"] == 0 and entry.get("error_mode", "no error") == "no error"
        except Exception as e:  # noqa: BLE001 - a call that raises is a failed check, reported
            entry.update(ok=False, error=_error(e))
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
        results[name] = entry
    method = ("torch.cuda.set_sync_debug_mode ('warn' to count, then 'error'); torch says it does not cover "
              "torch.distributed's own ops" if device.type == "cuda" else
              "DISTCLIP_HOST_READS=never on CPU; host reads counted by a TorchDispatchMode on " + ", ".join(_SyncCounter.HOST_READ_OPS))
    _write(args.part_out, {"calls": results, "method": method, "device": str(device),
                           "ok": all(r.get("ok") for r in results.values())})
    dist.destroy_process_group()
    return 0


# ----------------------------------------------------------------------------- part: timing


def _time_calls(methods: dict[str, Callable[[], object]], device: torch.device, warmup: int, repeats: int) -> dict[str, dict]:
    """Per method: the first call, then ``repeats`` timed calls, interleaved (round r starts at
    method r mod k). CUDA: events around each call (device time from the first launch to the end
    of the last kernel, host dispatch gaps included) and the host's wall clock to the end event;
    CPU: wall clock."""
    names = list(methods)
    out: dict[str, dict] = {n: {"times_ms": [], "wall_ms": []} for n in names}
    for n in names:
        try:
            _sync(device)
            t0 = time.perf_counter()
            methods[n]()
            _sync(device)
            out[n]["first_call_ms"] = (time.perf_counter() - t0) * 1e3
            for _ in range(warmup):
                methods[n]()
        except Exception as e:  # noqa: BLE001 - a method that fails is reported, not timed
            out[n]["error"] = _error(e)
    live = [n for n in names if "error" not in out[n]]
    for r in range(repeats):
        for k in range(len(live)):
            n = live[(r + k) % len(live)]
            _sync(device)
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                t0 = time.perf_counter()
                start.record()
                methods[n]()
                end.record()
                end.synchronize()
                out[n]["wall_ms"].append((time.perf_counter() - t0) * 1e3)
                out[n]["times_ms"].append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                methods[n]()
                out[n]["times_ms"].append((time.perf_counter() - t0) * 1e3)
    for n in live:
        times = out[n].pop("times_ms")
        walls = out[n].pop("wall_ms")
        out[n].update(median_ms=statistics.median(times), min_ms=min(times), repeats=len(times))
        if walls:
            out[n]["wall_median_ms"] = statistics.median(walls)
    return out


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int) -> dict:
    """Memory bandwidth from a device copy: each ``dst.copy_(src)`` reads and writes ``nbytes``."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    _sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
    best = min(times)
    del src, dst
    return {"bytes": nbytes, "best_s": best, "gb_per_s": 2 * nbytes / best / 1e9}


def part_timing(args: argparse.Namespace) -> int:
    device = _device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    _init_group(device, args.timeout)
    sizes = [int(s) for s in args.sizes]
    record: dict[str, Any] = {"device": str(device), "backend": dist.get_backend(), "world": dist.get_world_size(),
                              "max_norm": MAX_NORM_OFF, "dtype_small": "float32", "shapes": [list(s) for s in SHAPES],
                              "note": ("max_norm 1e20: the coefficient is exactly 1.0, so the grads never change between "
                                       "calls; every method still multiplies on the device (none can read the "
                                       "coefficient without a sync). On CPU distclip reads it and skips the multiply."),
                              "sizes": {}}
    for n in sizes:
        params = _small_grads(n, device)
        record["sizes"][str(n)] = _time_calls(_methods(params, MAX_NORM_OFF), device, args.warmup, args.repeats)
        print(f"  [timing] {n} tensors: " + ", ".join(f"{m} {v.get('median_ms', float('nan')):.3f} ms"
                                                    for m, v in record["sizes"][str(n)].items()), flush=True)
        _write(args.part_out, record)  # so far: a part stopped at the time budget still reports these
        del params
    if args.large_tensors > 0:
        bw = copy_bandwidth(device, 1 << 30, 10)
        record["copy_bandwidth"] = bw
        params = _large_grads(device, args.large_tensors)
        elements = sum(p.numel() for p in params)
        grad_bytes = elements * 2
        large = _time_calls(_methods(params, MAX_NORM_OFF), device, 1, args.large_repeats)
        ideal_s = 3 * grad_bytes / (bw["gb_per_s"] * 1e9)
        for v in large.values():
            if "median_ms" in v:
                v["effective_gb_per_s"] = 3 * grad_bytes / (v["median_ms"] / 1e3) / 1e9
                v["fraction_of_bandwidth"] = ideal_s / (v["median_ms"] / 1e3)
        record["large"] = {"elements": elements, "dtype": "bfloat16", "tensors": args.large_tensors,
                           "shape": list(LARGE_SHAPE), "grad_bytes": grad_bytes, "ideal_ms": ideal_s * 1e3,
                           "bytes_model": "3 x grad bytes: one read for the norm, one read and one write for the scale",
                           "methods": large}
        print(f"  [timing] {elements / 1e9:.2f} B bf16 elements: " + ", ".join(f"{m} {v.get('median_ms', float('nan')):.2f} ms "
                                                   f"({v.get('fraction_of_bandwidth', float('nan')):.0%} of copy bandwidth)"
                                                   for m, v in large.items()), flush=True)
        del params
    _write(args.part_out, record)
    dist.destroy_process_group()
    return 0


# ----------------------------------------------------------------------------- part: CUDA graph


def part_graph(args: argparse.Namespace) -> int:
    """Capture one warm call of ``args.target`` in a CUDA graph, replay it, compare with eager."""
    device = _device()
    torch.cuda.set_device(device)
    _init_group(device, args.timeout)
    params = _small_grads(100, device)
    max_norm = 1e-3
    fn = _methods(params, max_norm)[args.target]
    saved = [p.grad.detach().clone() for p in params]  # type: ignore[union-attr]

    def restore() -> None:
        for p, g in zip(params, saved):
            p.grad.copy_(g)  # type: ignore[union-attr]

    record: dict[str, Any] = {"target": args.target, "capture_error_mode": args.graph_mode, "tensors": len(params)}
    try:
        restore()
        eager = torch.as_tensor(fn()).detach().double().cpu()
        eager_grads = [p.grad.detach().clone() for p in params]  # type: ignore[union-attr]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graph's docs ask
            for _ in range(3):
                restore()
                fn()
        torch.cuda.current_stream().wait_stream(side)
        restore()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode=args.graph_mode):
            out = fn()
        restore()
        graph.replay()
        torch.cuda.synchronize()
        replayed = torch.as_tensor(out).detach().double().cpu()
        same = bool(torch.allclose(replayed, eager, rtol=1e-6)) and all(
            torch.allclose(p.grad, g, rtol=1e-5, atol=1e-8) for p, g in zip(params, eager_grads))  # type: ignore[arg-type]
        record.update(captured=True, replay_matches_eager=same, eager=float(eager), replayed=float(replayed))
    except Exception as e:  # noqa: BLE001 - the answer is no, with the error
        record.update(captured=False, error=_error(e))
    _write(args.part_out, record)
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - a failed capture may leave the stream unusable; the process ends anyway
        pass
    return 0


# ----------------------------------------------------------------------------- the driver


def _launch(args: argparse.Namespace, part: str, world: int, extra: list[str], env_extra: dict, timeout_s: float,
            shared_gpu: bool) -> tuple[Optional[dict], str]:
    """Start ``world`` ranks of ``part`` (this file), wait at most ``timeout_s``; (rank 0's record
    or None, why not)."""
    out = tempfile.NamedTemporaryFile(prefix=f"gpu_check_{part}_", suffix=".json", delete=False)
    out.close()
    Path(out.name).unlink()
    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world), "TORCH_CPP_LOG_LEVEL": "ERROR", **env_extra}
    base.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--part", part, "--part-out", out.name, *extra]
    procs = [subprocess.Popen(cmd, env={**base, "RANK": str(r), "LOCAL_RANK": "0" if shared_gpu else str(r)})
             for r in range(world)]
    deadline = time.monotonic() + timeout_s
    why = ""
    while any(p.poll() is None for p in procs):
        if time.monotonic() > deadline:
            why = f"timed out after {timeout_s:.0f} s"
            break
        time.sleep(0.2)
    stop(procs)
    try:
        record = json.loads(Path(out.name).read_text())
        Path(out.name).unlink()
    except (OSError, ValueError):
        codes = [p.returncode for p in procs]
        return None, why or f"no result (rank exit codes {codes})"
    return record, why


def _environment(device: torch.device) -> dict:
    import distclip

    env: dict[str, Any] = {"torch": torch.__version__, "distclip": distclip.__version__, "python": platform.python_version(),
                           "platform": platform.platform(), "cuda_available": device.type == "cuda",
                           "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    try:
        env["git_commit"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                           text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["git_commit"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), gpu_count=torch.cuda.device_count(),
                   cuda=torch.version.cuda, capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count)
        try:
            version = torch.cuda.nccl.version()  # a tuple in recent torch, an int in older ones
            env["nccl"] = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
        except Exception:  # noqa: BLE001 - informational only
            env["nccl"] = None
    else:
        env["cpu_count"] = os.cpu_count()
    return env


def _summary(result: dict) -> str:
    lines = [f"distclip GPU check ({'CUDA: ' + result['environment'].get('gpu', '') if result['cuda'] else 'CPU smoke: no CUDA'}; "
             f"torch {result['environment']['torch']}, distclip {result['environment']['distclip']}, "
             f"{result['elapsed_s']:.0f} s)"]
    for key, v in result["verify"].items():
        if "error" in v:
            lines.append(f"  verify {key}: FAILED to run: {v['error']}")
            continue
        checks = sum(e["checks"] for e in v["layouts"].values())
        passed = sum(e["passed"] for e in v["layouts"].values())
        line = (f"  verify {key}: {'PASS' if v['ok'] else 'FAIL'} {len(v['passed'])}/{len(v['layouts'])} layouts "
                f"({passed}/{checks} checks, {len(v['norm_types'] or [])} norm types)")
        if v["failed"]:
            line += f"; failing: {', '.join(v['failed'])}"
        if v["gloo_limited"]:
            line += f"; gloo cannot run on CUDA tensors: {', '.join(v['gloo_limited'])}"
        if v["not_applicable"]:
            line += f"; not at this world size: {len(v['not_applicable'])}"
        lines.append(line)
    syncs = result.get("host_syncs")
    if syncs is not None:
        if "error" in syncs:
            lines.append(f"  host syncs: FAILED to run: {syncs['error']}")
        else:
            lines.append(f"  host syncs ({'set_sync_debug_mode' if result['cuda'] else 'emulated on CPU, DISTCLIP_HOST_READS=never'}): "
                         f"{'PASS' if syncs['ok'] else 'FAIL'}")
            for name, e in syncs["calls"].items():
                if "error" in e:
                    lines.append(f"    {name:55s} ERROR {e['error']}")
                else:
                    lines.append(f"    {name:55s} warm {e['warm_call_syncs']}, first {e['first_call_syncs']}"
                                 + (f", error mode: {e['error_mode']}" if "error_mode" in e else "")
                                 + (f"  at {'; '.join(e['warm_sync_sites'])}" if e["warm_sync_sites"] else ""))
    timing = result.get("timing")
    if timing is not None:
        if "error" in timing:
            lines.append(f"  timing: FAILED to run: {timing['error']}")
        else:
            unit = "CUDA events" if result["cuda"] else "wall clock"
            lines.append(f"  timing (median ms per call, {unit}, max_norm 1e20):")
            lines.append(f"    {'tensors':>8s} {'distclip':>10s} {'torch':>10s} {'minimal':>10s} {'vs torch':>9s} {'vs minimal':>10s}")
            for n, methods in timing["sizes"].items():
                ms = {m: methods.get(m, {}).get("median_ms") for m in ("distclip", "torch", "minimal")}
                cells = [f"{ms[m]:10.3f}" if ms[m] is not None else f"{'error':>10s}" for m in ms]
                ratio = [f"{ms['distclip'] / ms[m]:.2f}x" if ms["distclip"] and ms[m] else "-" for m in ("torch", "minimal")]
                lines.append(f"    {n:>8s} {' '.join(cells)} {ratio[0]:>9s} {ratio[1]:>10s}")
                lines += [f"      {m} raised: {v['error']}" for m, v in methods.items() if "error" in v]
            large = timing.get("large")
            if large:
                bw = timing["copy_bandwidth"]["gb_per_s"]
                lines.append(f"    {large['elements'] / 1e9:.2f} B bf16 elements "
                             f"(copy bandwidth {bw:.0f} GB/s, ideal {large['ideal_ms']:.2f} ms):")
                for m, v in large["methods"].items():
                    lines.append(f"      {m:9s} " + (f"{v['median_ms']:.2f} ms, {v['fraction_of_bandwidth']:.0%} of bandwidth"
                                                   if "median_ms" in v else f"error: {v.get('error')}"))
    graph = result.get("cuda_graph")
    if graph is not None:
        for target, g in graph.items():
            answer = "yes" if g.get("captured") else "no"
            if g.get("captured") and not g.get("replay_matches_eager"):
                answer += " (but the replay differs from eager)"
            lines.append(f"  CUDA graph capture of a warm {target} call: {answer}"
                         + (f" [{g.get('capture_error_mode')}]" if g.get("capture_error_mode") else "")
                         + (f": {g['error']}" if "error" in g else ""))
    for s in result["skipped"]:
        lines.append(f"  skipped: {s['item']}: {s['why']}")
    where = "on " + result["environment"].get("gpu", "") if result["cuda"] else "CPU smoke"
    lines.append(f"{'ALL PASS' if result['ok'] else 'FAILED'}: gpu_check {where}; JSON: {result['out']}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/gpu_check.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/gpu_check_<gpu|cpu_smoke>.json)")
    parser.add_argument("--quick", action="store_true", help="norm types 2 and inf only, fewer timed repeats")
    parser.add_argument("--world", type=int, default=None, help="gloo ranks sharing the GPU (default 4; CPU smoke: 2)")
    parser.add_argument("--budget-s", type=float, default=450.0, help="total time budget; parts past it are skipped (default 450)")
    parser.add_argument("--timeout", type=float, default=60.0, help="process-group timeout of each part (default 60)")
    # the parts (started by this script)
    parser.add_argument("--part", choices=("verify", "syncs", "timing", "graph"), help=argparse.SUPPRESS)
    parser.add_argument("--part-out", help=argparse.SUPPRESS)
    parser.add_argument("--label", default="", help=argparse.SUPPRESS)
    parser.add_argument("--layouts", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--norm-types", nargs="*", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--sizes", nargs="*", default=[str(s) for s in SIZES], help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=3, help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=50, help=argparse.SUPPRESS)
    parser.add_argument("--large-tensors", type=int, default=LARGE_TENSORS, help=argparse.SUPPRESS)
    parser.add_argument("--large-repeats", type=int, default=10, help=argparse.SUPPRESS)
    parser.add_argument("--target", default="distclip", help=argparse.SUPPRESS)
    parser.add_argument("--graph-mode", default="global", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.part:
        return {"verify": part_verify, "syncs": part_syncs, "timing": part_timing, "graph": part_graph}[args.part](args)

    start = time.monotonic()
    device = _device()
    cuda = device.type == "cuda"
    world = args.world or (4 if cuda else 2)
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"gpu_check_{'gpu' if cuda else 'cpu_smoke'}.json"
    common = ["--timeout", str(args.timeout)]
    skipped: list[dict] = []
    result: dict[str, Any] = {"cuda": cuda, "environment": _environment(device), "quick": args.quick, "world": world,
                              "verify": {}, "out": str(out)}

    def remaining() -> float:
        return args.budget_s - (time.monotonic() - start)

    def launch(name: str, part: str, ranks: int, extra: list[str], limit: float, env: Optional[dict] = None,
               shared_gpu: bool = False) -> Optional[dict]:
        left = remaining()
        if left < 20:
            skipped.append({"item": name, "why": f"time budget (--budget-s {args.budget_s:g}) used up"})
            return None
        print(f"gpu_check: {name} ...", flush=True)
        record, why = _launch(args, part, ranks, [*common, "--label", name, *extra], env or {}, min(limit, left), shared_gpu)
        if record is None:
            return {"error": why}
        if why:
            record["warning"] = why
            skipped.append({"item": f"the rest of {name}", "why": f"stopped: {why}; what it had written is kept"})
        return record

    norm_types = ["2", "inf"] if args.quick or not cuda else []  # [] = every norm type of distclip.verify
    if cuda:
        # (a) every layout: NCCL at world size 1, then gloo ranks sharing the GPU
        rec = launch("NCCL, world size 1", "verify", 1, ["--norm-types", *norm_types] if norm_types else [], 180)
        if rec is not None:
            result["verify"]["nccl_w1"] = rec if "error" in rec else summarize_verify(rec, False)
        # (b) host syncs, (d) CUDA graphs; then the gloo ranks sharing the GPU; (c) timing last
        result["host_syncs"] = launch("host syncs", "syncs", 1, [], 120)
        result["cuda_graph"] = {}
        for target in ("distclip", "torch", "minimal"):
            g = launch(f"CUDA graph: {target}", "graph", 1, ["--target", target], 45)
            if g is not None and g.get("captured") is False:  # refused (not crashed): maybe only in global mode
                again = launch(f"CUDA graph: {target}, thread_local", "graph", 1, ["--target", target, "--graph-mode", "thread_local"], 45)
                if again is not None and again.get("captured"):
                    again["global_mode_error"] = g.get("error")
                    g = again
            if g is not None:
                result["cuda_graph"][target] = g
        rec = launch(f"gloo, {world} ranks sharing the GPU", "verify", world,
                     ["--norm-types", *norm_types] if norm_types else [], 240, {"GPU_CHECK_BACKEND": "gloo"}, shared_gpu=True)
        if rec is not None:
            result["verify"][f"gloo_w{world}_shared_gpu"] = rec if "error" in rec else summarize_verify(rec, True)
        timing_args = ["--repeats", "20" if args.quick else "50"]
        if args.quick:
            timing_args += ["--large-repeats", "5"]
        result["timing"] = launch("timing", "timing", 1, timing_args, 180)
    else:
        why = "no CUDA device (torch.cuda.is_available() is False)"
        skipped += [
            {"item": "verify on CUDA tensors (NCCL world size 1, gloo ranks sharing the GPU)",
             "why": f"{why}; ran {', '.join(SMOKE_LAYOUTS)} on CPU with {world} gloo ranks and norm types 2, inf instead"},
            {"item": "verify: the other layouts", "why": "smoke subset on CPU; the GPU run and torchrun -m distclip.verify run them all"},
            {"item": "torch.cuda.set_sync_debug_mode", "why": f"{why}; host reads counted on CPU with DISTCLIP_HOST_READS=never instead"},
            {"item": "timing with CUDA events at 1 000 / 10 000 tensors and 1 B bf16 elements, copy bandwidth",
             "why": f"{why}; a wall-clock table at 20 / 100 tensors only"},
            {"item": "CUDA graph capture", "why": why},
        ]
        rec = launch(f"gloo CPU, {world} ranks", "verify", world,
                     ["--layouts", *SMOKE_LAYOUTS, "--norm-types", *norm_types], 120)
        if rec is not None:
            result["verify"][f"gloo_w{world}_cpu"] = rec if "error" in rec else summarize_verify(rec, False)
        result["host_syncs"] = launch("host reads (CPU, DISTCLIP_HOST_READS=never)", "syncs", 1, [], 90)
        result["timing"] = launch("timing (CPU)", "timing", 1,
                                  ["--sizes", "20", "100", "--repeats", "5", "--warmup", "1", "--large-tensors", "0"], 90)
    result["skipped"] = skipped
    verify_ok = bool(result["verify"]) and all(v.get("ok") for v in result["verify"].values())
    syncs_ok = bool(result.get("host_syncs")) and bool(result["host_syncs"].get("ok"))
    timing = result.get("timing") or {"error": "not run"}
    timed = [*timing.get("sizes", {}).values(), *([timing["large"]["methods"]] if "large" in timing else [])]
    timing_ok = "error" not in timing and all("error" not in m for methods in timed for m in methods.values())
    graph_ran = not cuda or (bool(result.get("cuda_graph")) and all("error" not in g or "captured" in g for g in result["cuda_graph"].values()))
    cut_short = any("budget" in s["why"] or s["why"].startswith("stopped") for s in skipped)
    result["ok"] = verify_ok and syncs_ok and timing_ok and graph_ran and not cut_short
    result["elapsed_s"] = time.monotonic() - start
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_jsonable(result), indent=1) + "\n")
    print(_summary(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
