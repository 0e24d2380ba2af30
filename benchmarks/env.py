"""The run's environment: process group start-up, threads per rank and the hardware record."""

from __future__ import annotations

import datetime
import os
import platform
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

import distclip

ROOT = Path(__file__).resolve().parents[1]


def log(*args: object) -> None:
    """Print on rank 0 only (everywhere before the process group exists)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, flush=True)


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def launch(threads: Optional[int] = None, timeout_min: float = 10.0) -> tuple[torch.device, str, int]:
    """Start the process group of a torchrun launch: (device, backend, torch threads per rank).

    CUDA with NCCL (one GPU per local rank) when available, else the CPU with gloo. Threads per
    rank default to usable cores // local ranks (at least 1), so the ranks' intra-op pools do not
    oversubscribe the cores."""
    if "RANK" not in os.environ:
        script = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "<script>.py"
        sys.exit(f"launch with torchrun, e.g.: torchrun --standalone --nproc_per_node=2 benchmarks/{script}")
    use_cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    threads = threads or max(1, usable_cores() // local_world)
    torch.set_num_threads(threads)
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_min), **({"device_id": device} if use_cuda else {}))
    return device, backend, threads


def shutdown() -> None:
    """End a benchmark process: barrier, destroy the process group, then leave without
    interpreter finalization.

    Leaving through ``os._exit`` is on purpose. With gloo, tearing down the interpreter after
    ``destroy_process_group`` occasionally aborts a rank (``terminate called without an active
    exception``, SIGABRT) once its results are written; it failed CI's benchmark smoke test
    (pytorch/pytorch#179291 describes the cause: gloo's worker threads still holding work while the
    interpreter finalizes). A benchmark has nothing left to do here: output is flushed first, and
    the exit code is 0 only after the barrier and the destroy both returned."""
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


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
    git = ROOT / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head
        ref = head.split(None, 1)[1]
        if (git / ref).exists():
            return (git / ref).read_text().strip()
        packed = git / "packed-refs"
        if packed.exists():
            for line in packed.read_text().splitlines():
                if line.endswith(" " + ref):
                    return line.split()[0]
        return None
    except OSError:
        return None


def hardware_info(device: torch.device, backend: str, threads: int) -> dict:
    info = {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable_cores(),
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
