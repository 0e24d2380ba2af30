"""Cost of the agreement check (issue: ranks that disagree), measured in one run.

    torchrun --standalone --nproc_per_node=2 benchmarks/agreement_overhead.py [--out benchmarks/results]

Times distclip.clip_grad_norm_ with the check as shipped (its hashes ride on the one all-reduce)
against the same call with the check switched off (no riders, no verdict), interleaved, on an
FSDP2-style DTensor model and on plain replicated tensors. Writes agreement_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from unittest import mock

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

import distclip
from distclip import agreement


def models(world: int, n: int) -> dict[str, list[torch.nn.Parameter]]:
    mesh = init_device_mesh("cpu", (world,))
    dtensors, plain = [], []
    for _ in range(n):
        p = torch.nn.Parameter(distribute_tensor(torch.zeros(64, 16), mesh, [Shard(0)]))
        p.grad = distribute_tensor(torch.randn(64, 16), mesh, [Shard(0)])
        dtensors.append(p)
        q = torch.nn.Parameter(torch.zeros(32, 16))
        q.grad = torch.randn(32, 16)
        plain.append(q)
    return {f"dtensor x{n}": dtensors, f"plain x{n}": plain}


def check_disabled():
    """distclip with the agreement check switched off: no riders on the reduction, no verdict."""
    return mock.patch.multiple(agreement, slots=lambda sig, use_max: [], mismatch=lambda *a, **k: torch.tensor(False))


def one_call_ms(fn) -> float:
    dist.barrier()
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--repeats", type=int, default=60)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    world = dist.get_world_size()
    rows = []
    for n in (10, 1000):
        for name, params in models(world, n).items():
            clip = lambda params=params: distclip.clip_grad_norm_(params, 1e9)  # noqa: E731
            on, off = [], []
            for i in range(args.repeats + 3):  # interleaved, so drift hits both alike; 3 warm-up
                t_on = one_call_ms(clip)
                with check_disabled():
                    t_off = one_call_ms(clip)
                if i >= 3:
                    on.append(t_on)
                    off.append(t_off)
            med_on, med_off = statistics.median(on), statistics.median(off)
            rows.append({"workload": name, "check_on_ms": med_on, "check_off_ms": med_off, "overhead_ms": med_on - med_off})
    if dist.get_rank() == 0:
        info = {
            "world_size": world, "backend": "gloo", "torch": torch.__version__,
            "cpu": _cpu_model(), "cores": os.cpu_count(), "threads_per_rank": 1, "rows": rows,
        }
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "agreement_overhead.json"), "w") as f:
            json.dump(info, f, indent=1)
        for r in rows:
            print(f"{r['workload']:16s} check on {r['check_on_ms']:8.3f} ms   off {r['check_off_ms']:8.3f} ms   "
                  f"overhead {r['overhead_ms']:+.3f} ms")
    dist.destroy_process_group()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
