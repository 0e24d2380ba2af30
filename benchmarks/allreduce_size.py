"""What one gloo all-reduce costs as its length grows: the bound on distclip's reduction on CPU.

    torchrun --standalone --nproc_per_node=4 benchmarks/allreduce_size.py --out benchmarks/results

distclip's single all-reduce carries the partial, its flags and the agreement check's hashes
(call signature plus 16 pipeline-stage slots), the same length on every rank; the run measures
that length from a distclip call (``distclip_packet_len``, from the profiler) and times it too.
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
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file (torchrun benchmarks/allreduce_size.py): the package is importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist

import distclip
from benchmarks import env, measure

LENGTHS = [1, 2, 3, 4, 8, 16, 73]


def distclip_packet_len() -> int:
    """The length of the all-reduce of one distclip call on a tiny replicated model."""
    ps = []
    for _ in range(4):
        p = torch.nn.Parameter(torch.zeros(8))
        p.grad = torch.ones(8)
        ps.append(p)
    distclip.clip_grad_norm_(ps, 1e9)  # the first call builds the plan
    lengths = measure.allreduce_lengths(lambda: distclip.clip_grad_norm_(ps, 1e9))
    if len(lengths) != 1:
        raise RuntimeError(f"expected one all-reduce per distclip call, the profiler saw {lengths}")
    return lengths[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)), help="comma list of float64 lengths (distclip's is added)")
    parser.add_argument("--out", type=str, default="")
    args = parser.parse_args()
    device, backend, threads = env.launch(threads=1)
    world, rank = dist.get_world_size(), dist.get_rank()
    packet = distclip_packet_len()
    lengths = sorted({int(x) for x in args.lengths.split(",") if x} | {packet})
    buffers = {n: torch.zeros(n, dtype=torch.float64, device=device) for n in lengths}
    fns: dict[int, measure.Fn] = {n: (lambda b=buffers[n]: dist.all_reduce(b)) for n in lengths}
    measure.interleaved(fns, args.warmup, device)
    times = measure.interleaved(fns, args.repeats, device)  # interleaved: machine noise hits every length alike
    slowest = {n: statistics.median(measure.slowest_rank(times[n], device)) * 1e6 for n in lengths}
    if rank == 0:
        print(f"{backend} all_reduce, {world} ranks on {os.cpu_count()} cores (median of the slowest rank, us):")
        for n in lengths:
            mark = "  <- distclip's all-reduce" if n == packet else ""
            print(f"  {n:3d} float64: {slowest[n]:8.1f}  (x{slowest[n] / slowest[lengths[0]]:.1f} the {lengths[0]}-value one){mark}")
        if args.out:
            out = Path(args.out) / f"allreduce_size_w{world}_{backend}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            meta = {
                "world_size": world,
                "cpu_count": os.cpu_count(),
                "torch": torch.__version__,
                "repeats": args.repeats,
                "distclip_packet_len": packet,
                "timestamp_utc": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
            }
            out.write_text(json.dumps({"meta": meta, "median_us_by_length": slowest}, indent=1) + "\n")
            print(f"wrote {out}")
    env.shutdown()


if __name__ == "__main__":
    main()
