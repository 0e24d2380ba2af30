"""Cost of ``distclip.grad_norms`` next to ``get_total_norm`` on the same parameters.

    torchrun --standalone --nproc_per_node=2 benchmarks/bench_grad_norms.py --out benchmarks/results

Workloads from ``workloads.LAYOUTS``: the 4 000-parameter FSDP2 model (real backward, grads are
views into the reduce-scatter buffers) and 4 000 separate plain replicated grads (``ddp``).
Methods: ``get_total_norm`` (of the parameters' grads, through a module holding them),
``grad_norms`` per parameter, ``grad_norms`` with 10 groups. Every call is timed after warm-up
(the name agreement happens in the first call), interleaved round-robin, as the median of the
slowest rank per call. Every norm is checked against the workload's independent reference.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):  # run as a file (torchrun benchmarks/bench_grad_norms.py): the package is importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist
from torch import nn

import distclip
from benchmarks import env, measure, workloads
from benchmarks.env import log

LAYOUTS = ("fsdp2", "ddp")


class Holder(nn.Module):
    """A module holding the workload's parameters, so ``get_total_norm`` measures their grads
    (given tensors are measured as they are, as torch does: a module is measured by its grads)."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        super().__init__()
        self.ps = nn.ParameterList(params)


def _ten(name: str) -> str:
    return f"g{int(name[1:]) % 10}"


def rel_err(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma list of {','.join(workloads.LAYOUTS)}")
    parser.add_argument("--out", type=str, default="")
    args = parser.parse_args()
    device, backend, threads = env.launch()
    results = []
    for layout in (x for x in args.layouts.split(",") if x):
        w = workloads.build_workload(layout, "small", args.params, 0, 0, device)
        holder = w.module if w.module is not None else Holder(w.params)
        pairs = [(f"p{i}", p) for i, p in enumerate(w.params)]
        fns: dict[str, Callable[[], object]] = {
            "get_total_norm": lambda holder=holder: distclip.get_total_norm(holder),
            "grad_norms per parameter": lambda pairs=pairs: distclip.grad_norms(pairs),
            "grad_norms 10 groups": lambda pairs=pairs: distclip.grad_norms(pairs, groups=_ten),
        }
        first = {name: measure.timed_call(fn, device) * 1e3 for name, fn in fns.items()}
        measure.interleaved(fns, args.warmup, device)
        stats = measure.slowest_stats(measure.interleaved(fns, args.repeats, device), device)
        row: dict = {"layout": layout, "n_params": w.n_params, "local_MB": round(w.local_bytes / 2**20, 2)}
        base = stats["get_total_norm"]["median_ms"]
        for name, s in stats.items():
            row[name] = {
                "median_ms": s["median_ms"],
                "p10_ms": s["p10_ms"],
                "p90_ms": s["p90_ms"],
                "first_call_ms": first[name],
                "x_get_total_norm": s["median_ms"] / base,
            }
        # correctness: the dict's total is get_total_norm's, and both are the reference norm
        ref = workloads.reference_norm(w)
        got = distclip.grad_norms(pairs)
        total = float(distclip.get_total_norm(holder))
        row["total_rel_err"] = rel_err(float(got["total"]), total)
        row["reference_rel_err"] = rel_err(total, ref)
        row["n_names"] = len(got) - 1  # every parameter, plus "total"
        results.append(row)
        log(f"{layout} ({w.n_params} params, {row['local_MB']} MB local):")
        for name in fns:
            r = row[name]
            log(
                f"  {name:26s} median {r['median_ms']:7.2f} ms  p10 {r['p10_ms']:7.2f}  p90 {r['p90_ms']:7.2f}  "
                f"x{r['x_get_total_norm']:.2f}  first call {r['first_call_ms']:.1f} ms"
            )
        log(f"  norm vs reference: rel. err {row['reference_rel_err']:.1e}; grad_norms total vs get_total_norm {row['total_rel_err']:.1e}")
    if dist.get_rank() == 0 and args.out:
        out = Path(args.out) / f"grad_norms_w{dist.get_world_size()}_{backend}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"meta": env.hardware_info(device, backend, threads), "results": results}, indent=1))
        print(f"wrote {out}")
    env.shutdown()


if __name__ == "__main__":
    main()
