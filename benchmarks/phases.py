"""distclip's per-phase breakdown, read from ``torch.profiler``.

While the profiler records, distclip marks its phases with
``torch.profiler.record_function("distclip.<phase>")``; this module profiles calls and reads
those ranges, so it needs no knowledge of the library's internals. Phases:

- ``layout``: argument checks, parameter list, stage, layout discovery (or the plan check), coalescing
- ``local_norms``: per-piece norms and the float64 weighted partial
- ``reduce``: the all-reduce (and, for ``Partial`` grads, theirs)
- ``scale``: the foreach multiply by the coefficient (absent with clipping off on CPU: skipped)
- ``other``: the rest of the call (the reduced vector built and read, the verdicts, the
  coefficient, the return value)
- ``total``: the whole call, timed around it inside the profiler

A phase entered more than once in a call counts the union of its ranges. The profiler costs a
little per recorded op, so a profiled call is slower than a timed one (most where a phase runs
an op per tensor); the timed median is printed beside the breakdown. On CUDA the ranges are host
time (kernels run asynchronously); ``<phase>_device_ms`` adds the device time of the kernels each
range launched.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from benchmarks.measure import quiet_stderr, sync

PREFIX = "distclip."
PHASES = ("layout", "local_norms", "reduce", "scale")
COLUMNS = (*PHASES, "other", "total")


def _merged_length(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of intervals (a phase entered twice, or nested in itself, counts once)."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


CALL = "bench.call"  # this module's own range around each profiled call


def profiled_calls(
    fn: Callable[[], object], device: torch.device, calls: int, before: Optional[Callable[[], None]] = None
) -> list[tuple[dict[str, float], dict[str, float], float]]:
    """``calls`` calls, each after ``before()`` (not profiled) in a profiling session of its own
    that starts with a barrier (inside the session, so starting the profiler does not skew the
    ranks); per call: (host seconds per phase seen, device seconds per phase seen, seconds of the
    whole call).

    One session per call, read and dropped before the next: the profiler keeps every op it
    records, and with 128 000 parameter tensors one call is hundreds of thousands of ops (and a
    ``before()`` that restores the grads as many copies again); ten calls in one session, with
    their ``FunctionEvent`` objects, grew past the 24 GiB of the benchmark machine."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    out = []
    for _ in range(calls):
        if before is not None:
            before()
        sync(device)
        with quiet_stderr(), profile(activities=activities) as prof:
            dist.barrier()
            with record_function(CALL):
                start = time.perf_counter()
                fn()
                sync(device)
                total = time.perf_counter() - start
        out.append((*_phase_times(prof.events(), device), total))
        del prof
    return out


def _phase_times(events: list, device: torch.device) -> tuple[dict[str, float], dict[str, float]]:
    """Host and device seconds per phase seen in one profiled call's events."""
    windows = [(e.time_range.start, e.time_range.end) for e in events if e.name == CALL]
    assert len(windows) == 1, len(windows)
    lo, hi = windows[0]
    ranges: dict[str, list[tuple[float, float]]] = {}
    device_us: dict[str, float] = {}
    for e in events:
        if not e.name.startswith(PREFIX) or e.name[len(PREFIX) :] not in PHASES or e.device_type != DeviceType.CPU:
            continue  # (on CUDA a range also shows as a device annotation, on the device's clock)
        phase, (a, b) = e.name[len(PREFIX) :], (e.time_range.start, e.time_range.end)  # microseconds
        if not lo <= a <= hi:  # not inside the timed call (cannot happen: distclip runs only there)
            continue
        ranges.setdefault(phase, []).append((a, b))
        if device.type == "cuda":
            device_us[phase] = device_us.get(phase, 0.0) + float(getattr(e, "device_time_total", 0.0))
    return {ph: _merged_length(iv) * 1e-6 for ph, iv in ranges.items()}, {ph: us * 1e-6 for ph, us in device_us.items()}


def distclip_phases(fn: Callable[[], object], device: torch.device, calls: int, before: Optional[Callable[[], None]] = None) -> dict:
    """Per-phase time of ``fn`` (a distclip call) in ms, median over ``calls`` profiled calls.

    Per call the phases are those of the *critical* rank, the last to reach the all-reduce: the
    one whose "reduce" is shortest (the collective ends at about the same moment on every rank,
    so the shortest wait marks the last arrival; no common clock is needed, and ranks that leave
    the barrier at different moments are judged right). Its phases add up to its call, and its
    "reduce" is the collective itself, not time spent waiting for a slower rank (that wait is in
    ``reduce_max_ms``: the largest "reduce" of any rank). ``phases_seen``: the phases the
    profiler saw on this rank in any call; ``missing_phases``: the others (their time falls into
    "other")."""
    if calls <= 0:
        return {}
    per_call: list[list[float]] = []
    device_calls: list[list[float]] = []
    seen: set[str] = set()
    for host, dev, total in profiled_calls(fn, device, calls, before):
        seen |= set(host)
        vals = [host.get(ph, 0.0) for ph in PHASES]
        per_call.append(vals + [total - sum(vals), total])
        device_calls.append([dev.get(ph, 0.0) for ph in PHASES])
    mine = torch.tensor(per_call, dtype=torch.float64, device=device)  # calls x COLUMNS
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    every = torch.stack(gathered)  # ranks x calls x COLUMNS
    i_reduce = COLUMNS.index("reduce")
    critical = every[:, :, i_reduce].argmin(dim=0)  # per call
    chosen = every[critical, torch.arange(calls, device=every.device)]  # calls x COLUMNS
    med = chosen.median(dim=0).values.tolist()
    out: dict = {f"{ph}_ms": v * 1e3 for ph, v in zip(COLUMNS, med)}
    out["reduce_max_ms"] = float(every[:, :, i_reduce].max(dim=0).values.median()) * 1e3
    if device.type == "cuda":
        dev_med = torch.tensor(device_calls, dtype=torch.float64).median(dim=0).values.tolist()
        out.update({f"{ph}_device_ms": v * 1e3 for ph, v in zip(PHASES, dev_med)})
    out["calls"] = calls
    out["phases_seen"] = [ph for ph in PHASES if ph in seen]
    missing = [ph for ph in PHASES if ph not in seen]
    if missing:
        out["missing_phases"] = missing
    return out
