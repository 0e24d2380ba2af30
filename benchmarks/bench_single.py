"""One process, no process group: distclip next to torch's own clip_grad_norm_.

    python benchmarks/bench_single.py --out benchmarks/results

What a single-GPU (or CPU) user pays for swapping ``torch.nn.utils.clip_grad_norm_`` for
``distclip.clip_grad_norm_``: plain grads of the "many small parameters" shapes (``workloads``'
``SMALL_SHAPES``: mean 552 elements) at several counts, clipping on (``max_norm`` half the norm:
every call scales every grad; the grads are restored, untimed, before each call so every call
sees the same norm). Methods: ``distclip``, ``torch`` (``foreach=None``, its default) and
``minimal`` (``_foreach_norm`` → stack → norm → ``_foreach_mul_``: the least code). Interleaved
rounds with a rotating start; per round each method's median call, and the reported ratio is
the median of the per-round ratios torch / distclip (above 1: distclip is faster). Also each
method's first call. Writes ``single_process.json`` with the hardware record.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import distclip

SMALL_SHAPES = [(32, 32), (32,), (64, 16), (128,)]  # as benchmarks/workloads.py


def _params(n: int) -> tuple[list[nn.Parameter], list[torch.Tensor]]:
    torch.manual_seed(0)
    params = [nn.Parameter(torch.zeros(SMALL_SHAPES[i % len(SMALL_SHAPES)])) for i in range(n)]
    for p in params:
        p.grad = torch.randn_like(p)
    return params, [p.grad.clone() for p in params]


@torch.no_grad()
def _minimal(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    grads = [p.grad for p in params]
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)
    torch._foreach_mul_(grads, (max_norm / (total + 1e-6)).clamp(max=1.0))
    return total


def run(n: int, rounds: int, calls: int) -> dict:
    params, saved = _params(n)
    grads = [p.grad for p in params]
    max_norm = float(torch.linalg.vector_norm(torch.stack([g.double().norm() for g in saved]))) / 2
    methods = {
        "distclip": lambda: distclip.clip_grad_norm_(params, max_norm),
        "torch": lambda: torch.nn.utils.clip_grad_norm_(params, max_norm),
        "minimal": lambda: _minimal(params, max_norm),
    }

    def restore() -> None:
        torch._foreach_copy_(grads, saved)

    row: dict = {"n_params": n, "elements": sum(g.numel() for g in saved), "first_call_ms": {}}
    norms = {}
    for name, fn in methods.items():
        restore()
        t0 = time.perf_counter()
        norms[name] = float(fn())
        row["first_call_ms"][name] = (time.perf_counter() - t0) * 1e3
    ref = 2 * max_norm
    row["norm_rel_err"] = {k: abs(v - ref) / ref for k, v in norms.items()}
    per_round: dict[str, list[float]] = {k: [] for k in methods}
    names = list(methods)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            times = []
            for _ in range(calls):
                restore()
                t0 = time.perf_counter()
                methods[name]()
                times.append(time.perf_counter() - t0)
            per_round[name].append(statistics.median(times))
    row["median_ms"] = {k: statistics.median(v) * 1e3 for k, v in per_round.items()}
    row["torch_over_distclip"] = statistics.median(t / d for t, d in zip(per_round["torch"], per_round["distclip"]))
    row["minimal_over_distclip"] = statistics.median(m / d for m, d in zip(per_round["minimal"], per_round["distclip"]))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="20,100,1000,10000")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--calls", type=int, default=5, help="calls per method per round")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        row = run(n, args.rounds, args.calls)
        rows.append(row)
        m = row["median_ms"]
        print(f"{n:>6} params: distclip {m['distclip']:.3f} ms  torch {m['torch']:.3f} ms  minimal {m['minimal']:.3f} ms  "
              f"torch/distclip {row['torch_over_distclip']:.2f}  minimal/distclip {row['minimal_over_distclip']:.2f}", flush=True)
    meta = {"torch": torch.__version__, "distclip": distclip.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cpus": len(__import__("os").sched_getaffinity(0)), "threads": args.threads,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rounds": args.rounds, "calls": args.calls}
    try:
        from benchmarks.env import cpu_model, git_commit

        meta.update(cpu_model=cpu_model(), git_commit=git_commit())
    except Exception:  # noqa: BLE001 - run as a file outside the repository: no extra record
        pass
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        path = Path(args.out) / "single_process.json"
        path.write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
