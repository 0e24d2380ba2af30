"""What one gloo all-reduce costs as its length grows: the bound on distclip's reduction on CPU.

    torchrun --standalone --nproc_per_node=4 benchmarks/allreduce_size.py --out benchmarks/results

distclip's single all-reduce carries the partial, two flags and the agreement check's hashes
(call signature plus 16 pipeline-stage slots): 73 float64 values, the same on every rank.
torch's and FSDP1's own methods all-reduce one number. On NCCL the two cost the same (latency
bound); gloo's ring all-reduce works in ``world`` chunks, and with fewer elements than ranks most
chunks are empty, so on this oversubscribed CPU machine a short vector is much cheaper. This
script measures that, interleaved, median of the slowest rank, after a barrier per call.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

LENGTHS = [1, 2, 3, 4, 8, 16, 73]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--out", type=str, default="")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    world, rank = dist.get_world_size(), dist.get_rank()
    buffers = {n: torch.zeros(n, dtype=torch.float64) for n in LENGTHS}
    times: dict[int, list[float]] = {n: [] for n in LENGTHS}
    for _ in range(10):
        for n in LENGTHS:
            dist.all_reduce(buffers[n])
    for _ in range(args.repeats):
        for n in LENGTHS:  # interleaved: machine noise hits every length alike
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(buffers[n])
            times[n].append(time.perf_counter() - t0)
    slowest = {}
    for n in LENGTHS:
        mine = torch.tensor(times[n], dtype=torch.float64)
        dist.all_reduce(mine, op=dist.ReduceOp.MAX)
        slowest[n] = statistics.median(mine.tolist()) * 1e6
    if rank == 0:
        print(f"gloo all_reduce, {world} ranks on {os.cpu_count()} cores (median of the slowest rank, us):")
        for n in LENGTHS:
            print(f"  {n:3d} float64: {slowest[n]:8.1f}  (x{slowest[n] / slowest[1]:.1f} one value)")
        if args.out:
            out = Path(args.out) / f"allreduce_size_w{world}_gloo.json"
            meta = {"world_size": world, "cpu_count": os.cpu_count(), "torch": torch.__version__, "repeats": args.repeats,
                    "timestamp_utc": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())}
            out.write_text(json.dumps({"meta": meta, "median_us_by_length": slowest}, indent=1) + "\n")
            print(f"wrote {out}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
