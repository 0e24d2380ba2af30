"""What a guarded step costs: distclip.GradGuard next to plain distclip.clip_grad_norm_.

    python benchmarks/bench_guard.py --out benchmarks/results                                  # 1 process
    torchrun --standalone --nproc_per_node=2 benchmarks/bench_guard.py --out benchmarks/results  # 2 ranks, gloo

Standalone (it uses no other benchmark module). Compared: the guard with a fixed threshold, ZClip
(``skip_above`` set) and AutoClip (a bounded history), each against ``clip_grad_norm_`` with the
same ``max_norm``, on the same grads. The methods run in interleaved rounds (the start rotates each
round; per call the slowest rank counts, after a barrier); each method's median in a round is
divided by plain clipping's median in the same round, and the median of these paired ratios is
reported with its quartiles (robust to the load of a shared machine drifting during the run).

Two modes: clipping **on** (``max_norm`` half the norm: every call scales every grad) and **off**
(``max_norm`` far above: nothing is scaled; AutoClip, whose threshold follows the norm, runs on
only). Before each call the grads are restored to the same values (untimed), so every call of every
method sees the same norm. Both paths: the CPU one (host reads allowed) and the accelerator one
forced on CPU (``DISTCLIP_HOST_READS=never``: decisions on the device, float64 accumulation). The
target is a guard cost of at most 1.1x plain clipping. Writes ``guard_w{world}[_{backend}].json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
import torch.distributed as dist
from torch import nn

import distclip

METHODS = ("plain", "guard_fixed", "guard_zclip", "guard_autoclip")


def _workloads(world: int, quick: bool) -> dict:
    """name -> builder() -> (what to clip, local grad tensors)."""
    scale = 0.1 if quick else 1.0

    def plain(n: int, shape: tuple):
        def build():
            torch.manual_seed(0)
            params = [nn.Parameter(torch.zeros(shape)) for _ in range(max(2, int(n * scale)))]
            for p in params:
                p.grad = torch.randn(shape)
            return params, [p.grad for p in params]
        return build

    def large(numel: int):
        def build():
            torch.manual_seed(0)
            p = nn.Parameter(torch.zeros(max(1024, int(numel * scale))))
            p.grad = torch.randn_like(p)
            return [p], [p.grad]
        return build

    def fsdp2(layers: int):
        def build():
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            torch.manual_seed(0)
            model = nn.Sequential(*[nn.Linear(32, 32) for _ in range(max(2, int(layers * scale)))])
            mesh = init_device_mesh("cpu", (world,))
            for layer in model:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            model(torch.randn(4, 32)).pow(2).sum().backward()
            return model, [p.grad.to_local() for p in model.parameters()]
        return build

    def dtensor_sep(n: int):
        def build():
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.tensor import DTensor, Shard

            mesh = init_device_mesh("cpu", (world,))
            torch.manual_seed(0)
            params = []
            for _ in range(max(2, int(n * scale))):
                p = nn.Parameter(DTensor.from_local(torch.zeros(16, 8), mesh, [Shard(0)], run_check=False))
                p.grad = DTensor.from_local(torch.randn(16, 8), mesh, [Shard(0)], run_check=False)
                params.append(p)
            return params, [p.grad.to_local() for p in params]
        return build

    out = {"200 grads of 64x64": plain(200, (64, 64)), "4000 grads of 256": plain(4000, (256,)), "one 16M grad": large(1 << 24)}
    if world > 1:
        out.update({"FSDP2, 2000 params": fsdp2(1000), "2000 separate DTensor grads": dtensor_sep(2000)})
    return out


def _sync() -> None:
    if dist.is_initialized():
        dist.barrier()


def _slowest(seconds: float) -> float:
    if not dist.is_initialized():
        return seconds
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _method(name: str, target, max_norm: float, clip_on: bool):
    if name == "plain":
        return lambda: distclip.clip_grad_norm_(target, max_norm)
    if name == "guard_fixed":
        guard = distclip.GradGuard(max_norm)
    elif name == "guard_zclip":
        guard = distclip.GradGuard(max_norm, adaptive="zclip", skip_above=6.0, warmup_steps=5)
    else:
        guard = distclip.GradGuard(None if not clip_on else max_norm, adaptive="autoclip", history_size=1000)
    return lambda: guard.clip_(target)


def run(world: int, rounds: int, calls: int, quick: bool) -> list[dict]:
    rows = []
    for mode in ("auto", "never"):
        os.environ["DISTCLIP_HOST_READS"] = mode
        for wname, build in _workloads(world, quick).items():
            target, grads = build()
            original = [g.clone() for g in grads]
            norm = float(distclip.clip.total_grad_norm(target))
            for clip_on in (True, False):
                max_norm = 0.5 * norm if clip_on else 1e6 * norm
                methods = [m for m in METHODS if clip_on or m != "guard_autoclip"]
                fns = {m: _method(m, target, max_norm, clip_on) for m in methods}
                for fn in fns.values():  # warm-up: plans, first calls, the policies past warm-up
                    for _ in range(8):
                        torch._foreach_copy_(grads, original)
                        fn()
                times: dict[str, list[float]] = {m: [] for m in methods}
                paired: dict[str, list[float]] = {m: [] for m in methods if m != "plain"}
                for r in range(rounds):
                    order = methods[r % len(methods):] + methods[: r % len(methods)]
                    this_round: dict[str, list[float]] = {m: [] for m in methods}
                    for m in order:
                        for _ in range(calls):
                            torch._foreach_copy_(grads, original)  # every call sees the same grads (untimed)
                            _sync()
                            t = time.perf_counter()
                            fns[m]()
                            this_round[m].append(_slowest(time.perf_counter() - t))
                    for m, v in this_round.items():
                        times[m].extend(v)
                        if m != "plain":  # paired with plain in the same round: robust to the machine's load drifting
                            paired[m].append(statistics.median(v) / statistics.median(this_round["plain"]))
                med = {m: statistics.median(v) * 1e3 for m, v in times.items()}
                ratio = {m: statistics.median(v) for m, v in paired.items()}
                quartiles = {m: [round(q, 4) for q in statistics.quantiles(v, n=4)] if len(v) > 1 else v for m, v in paired.items()}
                row = {"workload": wname, "path": "cpu" if mode == "auto" else "accelerator path on cpu", "clipping": "on" if clip_on else "off",
                       "median_ms": med, "ratio_to_plain": ratio, "ratio_quartiles": quartiles, "ratio_of_medians": {
                           m: med[m] / med["plain"] for m in paired}, "samples": {m: len(v) for m, v in times.items()}}
                rows.append(row)
                if (dist.get_rank() if dist.is_initialized() else 0) == 0:
                    ratios = "  ".join(f"{m.removeprefix('guard_')} {row['ratio_to_plain'][m]:.3f}x" for m in methods if m != "plain")
                    print(f"[{row['path']:>23}] {wname:>28} clip {row['clipping']:>3}: plain {med['plain']:7.3f} ms  {ratios}", flush=True)
    os.environ.pop("DISTCLIP_HOST_READS", None)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="directory for guard_w{world}*.json (default: print only)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--calls", type=int, default=5, help="calls per method per round")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few rounds (a smoke run)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    world, backend = 1, None
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        dist.init_process_group("gloo")
        world, backend = dist.get_world_size(), "gloo"
    rounds, calls = (2, 2) if args.quick else (args.rounds, args.calls)
    started = time.time()
    rows = run(world, rounds, calls, args.quick)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        worst = max(r for row in rows for r in row["ratio_to_plain"].values())
        result = {
            "what": "distclip.GradGuard.clip_ vs distclip.clip_grad_norm_ on the same grads: per-call times (slowest rank), "
                    "interleaved rounds; ratio_to_plain = median over rounds of (method's median / plain's median in that round)",
            "world_size": world, "backend": backend, "rounds": rounds, "calls_per_round": calls, "quick": args.quick,
            "hardware": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads_per_rank": 1,
                         "platform": platform.platform()},
            "software": {"torch": torch.__version__, "distclip": distclip.__version__, "python": platform.python_version()},
            "seconds": round(time.time() - started, 1), "worst_ratio": worst, "target": 1.1, "rows": rows,
        }
        print(f"worst guard/plain ratio: {worst:.3f} (target 1.1)")
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            name = f"guard_w{world}{'_' + backend if backend else ''}{'_quick' if args.quick else ''}.json"
            with open(os.path.join(args.out, name), "w") as f:
                json.dump(result, f, indent=1)
            print(f"wrote {os.path.join(args.out, name)}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
