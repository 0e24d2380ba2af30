"""Cost of the agreement check (issue: ranks that disagree), measured in one run.

    torchrun --standalone --nproc_per_node=2 benchmarks/agreement_overhead.py [--out benchmarks/results]

The check adds no collective: its hashes (two blocks of 4 lanes for the call signature and for
each of 16 pipeline-stage slots: ``--agreement-values``, ``packet.AGREEMENT_VALUES`` = 136) ride on
the call's single all-reduce, and the verdict is two operations on the reduced numbers. So its cost is what those extra values cost on the
all-reduce, plus that host arithmetic (microseconds: the hashes are cached with the layout plan).

Measured without touching distclip's internals, interleaved per round, after a barrier, median of
the slowest rank:

- ``check_on_ms``: ``distclip.clip_grad_norm_`` as shipped;
- ``allreduce_full_ms``: one all-reduce as long as distclip's (``packet_len``, read from the
  profiler's record of the call's one all-reduce), and ``allreduce_no_agreement_ms``: one without
  the agreement's values;
- ``overhead_ms`` = their difference, and ``check_off_ms`` = ``check_on_ms - overhead_ms``: the
  same call with the agreement's values off its all-reduce.

Workloads from ``workloads.LAYOUTS`` (default: separate DTensor grads and separate plain replicated
grads, at 10 and 1000 parameters). Writes ``agreement_overhead.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file (torchrun benchmarks/agreement_overhead.py): the package is importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist

import distclip
from benchmarks import env, measure, workloads
from benchmarks.env import log
from distclip.comm.packet import AGREEMENT_VALUES

# What the agreement check puts on the all-reduce (distclip's README and benchmarks/README.md:
# 4 call hashes and 4 per pipeline-stage slot, 16 slots).


def packet_length(clip: measure.Fn) -> int:
    """The length of the one all-reduce a distclip call issues (every rank calls it)."""
    lengths = measure.allreduce_lengths(clip)
    if len(lengths) != 1:
        raise RuntimeError(f"expected one all-reduce per distclip call, the profiler saw {len(lengths)}: {lengths}")
    return lengths[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--sizes", default="10,1000", help="comma list of parameter counts (default 10,1000)")
    parser.add_argument("--layouts", default="dtensor_sep,plain_sep", help=f"comma list of {','.join(workloads.LAYOUTS)}")
    parser.add_argument(
        "--agreement-values",
        type=int,
        default=AGREEMENT_VALUES,
        help=f"values the agreement check adds to the all-reduce (default {AGREEMENT_VALUES})",
    )
    args = parser.parse_args()
    device, backend, threads = env.launch(threads=1)
    world = dist.get_world_size()
    rows = []
    for n in (int(x) for x in args.sizes.split(",") if x):
        for layout in (x for x in args.layouts.split(",") if x):
            w = workloads.build_workload(layout, "small", n, 0, 0, device)
            target = w.target
            clip = lambda target=target: distclip.clip_grad_norm_(target, 1e9)  # noqa: E731 - coefficient 1: grads unchanged
            for _ in range(args.warmup):
                clip()
            length = packet_length(clip)
            if length <= args.agreement_values:
                raise RuntimeError(f"distclip's all-reduce has {length} values, not more than the agreement's {args.agreement_values}")
            full = torch.zeros(length, dtype=torch.float64, device=device)
            short = torch.zeros(length - args.agreement_values, dtype=torch.float64, device=device)
            fns: dict[str, measure.Fn] = {
                "check_on": clip,
                "full": lambda full=full: dist.all_reduce(full),
                "short": lambda short=short: dist.all_reduce(short),
            }
            measure.interleaved(fns, args.warmup, device)
            stats = measure.slowest_stats(measure.interleaved(fns, args.repeats, device), device)
            on, ar_full, ar_short = (stats[k]["median_ms"] for k in ("check_on", "full", "short"))
            norm = float(clip())
            ref = workloads.reference_norm(w)
            rows.append(
                {
                    "workload": f"{layout} x{n}",
                    "check_on_ms": on,
                    "check_off_ms": on - (ar_full - ar_short),
                    "overhead_ms": ar_full - ar_short,
                    "packet_len": length,
                    "agreement_values": args.agreement_values,
                    "allreduce_full_ms": ar_full,
                    "allreduce_no_agreement_ms": ar_short,
                    "norm_rel_err": abs(norm - ref) / max(ref, 1e-30),
                    "repeats": args.repeats,
                }
            )
            del w
    if dist.get_rank() == 0:
        info = {
            "world_size": world,
            "backend": backend,
            "torch": torch.__version__,
            "cpu": env.cpu_model(),
            "cores": os.cpu_count(),
            "threads_per_rank": threads,
            "method": "check_off_ms = check_on_ms - (all-reduce of packet_len values - all-reduce without the agreement's values)",
            "meta": env.hardware_info(device, backend, threads),
            "rows": rows,
        }
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "agreement_overhead.json")
        with open(path, "w") as f:
            json.dump(info, f, indent=1)
        for r in rows:
            log(
                f"{r['workload']:18s} check on {r['check_on_ms']:8.3f} ms   off {r['check_off_ms']:8.3f} ms   "
                f"overhead {r['overhead_ms']:+.3f} ms  (all-reduce of {r['packet_len']} vs {r['packet_len'] - r['agreement_values']} values)"
            )
        log(f"wrote {path}")
    env.shutdown()


if __name__ == "__main__":
    main()
