"""Shared measurement: timed calls (barrier, slowest rank), interleaved rounds, statistics,
collectives, all-reduce lengths, extra peak memory and host syncs.

Every timing here follows one protocol: a barrier (and a CUDA synchronize) before each call, the
call timed with ``perf_counter`` (plus a CUDA synchronize), and per call the **slowest rank's**
time, because a training step waits for that rank. Methods compared in one run are interleaved
round-robin with a rotating start, so machine noise hits all of them alike.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import sys
import time
import traceback
import warnings
from typing import Callable, Hashable, Iterator, Mapping, Optional, TypeVar

import torch
import torch.distributed as dist

K = TypeVar("K", bound=Hashable)
Fn = Callable[[], object]


# --------------------------------------------------------------------------------------------
# one call
# --------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_call(fn: Fn, device: torch.device, before: Optional[Callable[[], None]] = None) -> float:
    """Seconds of one call on this rank, after ``before()`` (untimed) and a barrier."""
    if before is not None:
        before()
    sync(device)
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def slowest_rank(times: list[float], device: torch.device) -> list[float]:
    """Per call, the time of the slowest rank (the step waits for it). Every rank calls it."""
    t = torch.tensor(times, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def all_ok(ok: bool, device: torch.device) -> bool:
    """True on every rank iff ``ok`` on every rank."""
    flag = torch.tensor([0.0 if ok else 1.0], device=device)
    dist.all_reduce(flag)
    return flag.item() == 0


def probe(fn: Fn, device: torch.device, verbose: bool = False) -> tuple[Optional[str], float]:
    """One call: (error or None, slowest rank's seconds); every rank learns if any failed."""
    err = None
    dist.barrier()
    t0 = time.perf_counter()
    try:
        fn()
        sync(device)
    except Exception as e:  # noqa: BLE001 - recorded as N/A for this method
        err = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        if verbose:
            traceback.print_exc()
    first = slowest_rank([time.perf_counter() - t0], device)[0]
    if not all_ok(err is None, device):
        return err or "failed on another rank", first
    return None, first


# --------------------------------------------------------------------------------------------
# many calls
# --------------------------------------------------------------------------------------------


def interleaved(
    fns: Mapping[K, Fn], rounds: int, device: torch.device, befores: Optional[Mapping[K, Optional[Callable[[], None]]]] = None
) -> dict[K, list[float]]:
    """``rounds`` timed calls of every function, round-robin with a start that rotates by one
    each round; this rank's seconds per call, by key. Warm-up is the same call with its result
    dropped."""
    keys = list(fns)
    befores = befores or {}
    times: dict[K, list[float]] = {k: [] for k in keys}
    for r in range(rounds):
        j = r % max(1, len(keys))
        for k in keys[j:] + keys[:j]:
            times[k].append(timed_call(fns[k], device, befores.get(k)))
    return times


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


def slowest_stats(times: Mapping[K, list[float]], device: torch.device) -> dict[K, dict]:
    """``stats_ms`` of the slowest rank per call, by key (every rank calls it, same keys)."""
    return {k: stats_ms(slowest_rank(v, device)) for k, v in times.items()}


# --------------------------------------------------------------------------------------------
# collectives
# --------------------------------------------------------------------------------------------


def count_collectives(fn: Fn) -> tuple[object, Optional[int], dict]:
    """Collectives issued by one call: c10d ops (dist.*) and functional collectives (DTensor),
    counted with ``CommDebugMode``: (result, count, {op: count})."""
    from torch.distributed.tensor.debug import CommDebugMode

    with CommDebugMode() as mode:
        out = fn()
    ops = {str(k): v for k, v in mode.get_comm_counts().items()}
    return out, int(mode.get_total_counts()), ops


def allreduce_lengths(fn: Fn) -> list[int]:
    """The number of elements of every all-reduce one call issues, in order, read from the
    backend's profiler events (``gloo:all_reduce`` / ``nccl:all_reduce``, with their input
    shapes)."""
    from torch.profiler import ProfilerActivity, profile

    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    lengths = []
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        backend, _, op = e.name.partition(":")
        if op == "all_reduce" and backend in ("gloo", "nccl") and e.input_shapes:
            lengths.append(math.prod(e.input_shapes[0]))
    return lengths


# --------------------------------------------------------------------------------------------
# memory and host syncs
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
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


def extra_peak_bytes(fn: Fn, device: torch.device) -> tuple[Optional[int], str]:
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


def count_host_syncs(fn: Fn, device: torch.device) -> Optional[int]:
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
