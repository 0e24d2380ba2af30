"""Cost of ``distclip.grad_norms`` next to ``get_total_norm`` on the same parameters.

    torchrun --standalone --nproc_per_node=2 benchmarks/bench_grad_norms.py --out benchmarks/results

Workloads from ``bench_clip.build_workload``: the 4 000-parameter FSDP2 model (real backward, grads
are views into the reduce-scatter buffers) and 4 000 separate plain replicated grads (``ddp``).
Methods: ``get_total_norm``, ``grad_norms`` per parameter, ``grad_norms`` with 10 groups. Every
call is timed after warm-up (the name agreement happens in the first call), interleaved
round-robin, as the median of the slowest rank per call.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import distclip

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_clip  # noqa: E402 - importable only after the sys.path entry above


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=str, default="")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    threads = max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size())))
    torch.set_num_threads(threads)
    device = torch.device("cpu")
    results = []
    for layout in ("fsdp2", "ddp"):
        w = bench_clip.build_workload(layout, "small", args.params, 0, 0, device)
        pairs = [(f"p{i}", p) for i, p in enumerate(w.params)]
        methods = {
            "get_total_norm": lambda w=w: distclip.clip.total_grad_norm(w.params),
            "grad_norms per parameter": lambda pairs=pairs: distclip.grad_norms(pairs),
            "grad_norms 10 groups": lambda pairs=pairs: distclip.grad_norms(pairs, groups=_ten),
        }
        first = {}
        for name, fn in methods.items():
            first[name] = bench_clip.timed_call(fn, device) * 1e3
        for _ in range(args.warmup):
            for fn in methods.values():
                fn()
        times = {name: [] for name in methods}
        for _ in range(args.repeats):
            for name, fn in methods.items():
                times[name].append(bench_clip.timed_call(fn, device))
        row = {"layout": layout, "n_params": w.n_params, "local_MB": round(w.local_bytes / 2**20, 2)}
        for name in methods:
            slow = bench_clip.slowest_rank(times[name], device)
            row[name] = {"median_ms": statistics.median(slow) * 1e3, "p10_ms": bench_clip.percentile([t * 1e3 for t in slow], 0.1),
                         "p90_ms": bench_clip.percentile([t * 1e3 for t in slow], 0.9), "first_call_ms": first[name]}
        base = row["get_total_norm"]["median_ms"]
        for name in methods:
            row[name]["x_get_total_norm"] = row[name]["median_ms"] / base
        # correctness: the dict's total is get_total_norm's
        got = distclip.grad_norms(pairs)
        row["total_rel_err"] = abs(float(got["total"]) - float(distclip.clip.total_grad_norm(w.params))) / float(got["total"])
        results.append(row)
        if dist.get_rank() == 0:
            print(f"{layout} ({w.n_params} params, {row['local_MB']} MB local):", flush=True)
            for name in methods:
                r = row[name]
                print(f"  {name:26s} median {r['median_ms']:7.2f} ms  p10 {r['p10_ms']:7.2f}  p90 {r['p90_ms']:7.2f}  "
                      f"x{r['x_get_total_norm']:.2f}  first call {r['first_call_ms']:.1f} ms", flush=True)
    if dist.get_rank() == 0 and args.out:
        out = Path(args.out) / f"grad_norms_w{dist.get_world_size()}_gloo.json"
        meta = bench_clip.hardware_info(device, "gloo", threads)
        out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
        print(f"wrote {out}")
    dist.destroy_process_group()


def _ten(name: str) -> str:
    return f"g{int(name[1:]) % 10}"


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
