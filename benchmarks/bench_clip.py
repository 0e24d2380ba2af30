"""Side-by-side benchmark of gradient-norm clipping under distributed layouts.

Launch with torchrun, e.g.::

    torchrun --standalone --nproc_per_node=2 benchmarks/bench_clip.py --quick
    torchrun --standalone --nproc_per_node=2 benchmarks/bench_clip.py --out benchmarks/results
    torchrun --standalone --nproc_per_node=4 benchmarks/bench_clip.py --out benchmarks/results

For every workload (layout x size, ``workloads.LAYOUTS``) every method (``methods``) is timed in
the same process, interleaved round-robin after warm-up, and reported as median / p10 / p90 / IQR
of the per-call wall time (the slowest rank of each call). One extra, untimed call per method
counts the collectives it issues, measures its extra peak memory and (on CUDA) its host syncs,
and checks the norm it returns against an independent reference; distclip's calls are then
profiled phase by phase (``phases``). See benchmarks/README.md for every column.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

if __package__ in (None, ""):  # run as a file (torchrun benchmarks/bench_clip.py): the package is importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist

import distclip
from benchmarks import env, measure, methods, phases, report, workloads
from benchmarks.env import log
from benchmarks.workloads import MODEL_LAYOUTS, SEP_LAYOUTS, Workload

HERE = Path(__file__).resolve().parent
NORM_WRONG = 1e-2  # relative error above which a returned norm is counted as wrong for the layout
NORM_IMPRECISE = 1e-5  # ... and above which it is flagged as imprecise
SCALE_WRONG = 1e-3  # relative error of the clipped grads vs. coefficient * grads above which a method clips wrongly
MAX_NORM = 1e20  # so every clip coefficient is exactly 1.0: grads never shrink between calls
PHASES = list(phases.COLUMNS)


class GradSnapshot:
    """A copy of this rank's local grads: ``restore()`` puts them back (clipping-on mode, before
    every call, outside the timed region, identically for every method), ``scale_error(coef)``
    says how far the grads are from ``coef * saved`` (relative, over all ranks)."""

    def __init__(self, local: list[torch.Tensor]) -> None:
        self.local = local
        self.saved = [g.detach().clone() for g in local]

    def restore(self) -> None:
        if self.local:
            torch._foreach_copy_(self.local, self.saved)

    @torch.no_grad()
    def scale_error(self, coef: float, device: torch.device) -> float:
        if not self.local:
            num = den = torch.zeros((), dtype=torch.float64, device=device)
        else:
            expected = torch._foreach_mul(self.saved, coef)
            diff = torch._foreach_sub(self.local, expected)
            num = torch.stack(torch._foreach_norm(diff, 2.0, dtype=torch.float64)).square().sum()
            den = torch.stack(torch._foreach_norm(expected, 2.0, dtype=torch.float64)).square().sum()
        t = torch.stack([num, den])
        dist.all_reduce(t)
        return float((t[0] / t[1].clamp_min(1e-300)).sqrt())


def as_float(norm: object) -> Optional[float]:
    if isinstance(norm, tuple):  # roofline
        return None
    if isinstance(norm, torch.Tensor):
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return float(norm)
    return None


def bench_workload(
    w: Workload, method_names: list[str], args: argparse.Namespace, device: torch.device, torchtitan: Optional[Callable] = None
) -> list[dict]:
    local_bytes = w.local_bytes
    flat = torch.randn(max(1, local_bytes // 4), device=device)  # roofline buffer, same bytes
    ref = workloads.reference_norm(w)
    modes = [m for m in args.clip.split(",") if m]
    max_norms = {"off": MAX_NORM, "on": args.clip_on_rel * ref}
    snap = GradSnapshot(w.local_grads)
    base = {
        "layout": w.layout,
        "size": w.size,
        "n_params": w.n_params,
        "n_local_grads": len(w.local_grads),
        "local_grad_bytes": local_bytes,
        "layout_desc": w.mesh_desc,
        "reference_norm": ref,
    }
    records: dict[tuple[str, str], dict] = {}
    runnable: dict[tuple[str, str], Callable[[], object]] = {}
    befores: dict[tuple[str, str], Optional[Callable[[], None]]] = {}
    probed: set[str] = set()
    # 1. per mode, one probe call per method (all ranks agree whether it works), then the
    #    untimed extras. The first probe of a method is its first call on this workload.
    for mode in modes:
        max_norm = max_norms[mode]
        coef = 1.0 if mode == "off" else min(1.0, max_norm / (ref + 1e-6))
        before = snap.restore if mode == "on" else None
        for name, fn in methods.make_methods(w, method_names, flat, max_norm, torchtitan).items():
            rec = dict(base, method=name, clip=mode, max_norm=max_norm, expected_coef=coef)
            key = (name, mode)
            records[key] = rec
            if name in methods.CAPPED and w.is_dtensor and 0 < args.torch_max_params < w.n_params:
                rec["error"] = (
                    f"skipped above --torch-max-params={args.torch_max_params}: its first call on DTensor grads "
                    "runs sharding propagation quadratic in the number of grads (see first_call_ms at smaller sizes)"
                )
                continue
            snap.restore()
            err, first = measure.probe(fn, device, args.verbose)
            rec["first_call_ms" if name not in probed else "probe_ms"] = first * 1e3
            if err is not None:
                probed.add(name)
                rec["error"] = err
                continue
            if name not in probed:  # distclip's second call on a parameter list builds its layout plan
                snap.restore()
                rec["second_call_ms"] = measure.probe(fn, device, args.verbose)[1] * 1e3
            probed.add(name)
            snap.restore()
            out, n_coll, ops = measure.count_collectives(fn)
            rec["collectives"] = n_coll
            rec["collective_ops"] = ops
            norm = as_float(out)
            rec["norm"] = norm
            if norm is not None:
                # > 1e-2: the method does not handle the layout (counts a shard twice / misses one);
                # 1e-5..1e-2: float32 accumulation error (torch reduces a big tensor in one fp32 pass).
                rec["norm_rel_err"] = abs(norm - ref) / max(abs(ref), 1e-30)
                rec["norm_ok"] = rec["norm_rel_err"] < NORM_WRONG
                # the grads after the call vs. coef * the grads before it (coef from the reference)
                rec["scale_rel_err"] = snap.scale_error(coef, device)
                rec["scale_ok"] = rec["scale_rel_err"] < SCALE_WRONG
            snap.restore()
            rec["extra_peak_bytes"], rec["memory_method"] = measure.extra_peak_bytes(fn, device)
            if rec["extra_peak_bytes"] is not None:
                rec["extra_peak_frac"] = rec["extra_peak_bytes"] / max(1, local_bytes)
            snap.restore()
            rec["host_syncs"] = measure.count_host_syncs(fn, device)
            runnable[key] = fn
            befores[key] = before
    snap.restore()

    # 2. warm-up, sized so the workload fits its time budget
    warm = measure.interleaved(runnable, args.warmup, device, befores)
    per_round = sum(statistics.median(measure.slowest_rank(t, device)) for t in warm.values()) if runnable and args.warmup else 0.0
    reps = int(min(args.repeats, max(args.min_repeats, args.budget_s / per_round))) if per_round > 0 else args.repeats

    # 3. timed calls, methods (x clipping modes) interleaved round-robin with a rotating start
    for key, stats in measure.slowest_stats(measure.interleaved(runnable, reps, device, befores), device).items():
        records[key].update(stats)

    # 4. distclip's per-phase breakdown (after timing, so it does not disturb it)
    for mode in modes:
        rec = records.get(("distclip", mode))
        if rec is not None and "median_ms" in rec and args.phase_repeats > 0:
            call = lambda target=w.target, max_norm=max_norms[mode]: distclip.clip_grad_norm_(target, max_norm)  # noqa: E731
            rec["phases"] = phases.distclip_phases(call, device, args.phase_repeats, snap.restore if mode == "on" else None)
    snap.restore()

    for mode in modes:
        roof = records.get(("roofline", mode), {}).get("median_ms")
        for (_, m), rec in records.items():
            if m == mode and roof and "median_ms" in rec:
                rec["roofline_ratio"] = rec["median_ms"] / roof
    del flat, snap
    return list(records.values())


# --------------------------------------------------------------------------------------------
# summary
# --------------------------------------------------------------------------------------------


def print_summary(results: list[dict], meta: dict) -> None:
    print()
    print(
        f"== per-call median ms (p10-p90), world={meta['world_size']} backend={meta['backend']} threads/rank={meta['torch_threads_per_rank']} =="
    )
    names = report.methods_in(results)
    header = f"{'layout':11} {'size':5} {'params':>6} {'clip':4} {'MB/rank':>8} " + " ".join(f"{m:>21}" for m in names) + "  colls  mem%"
    print(header)
    for k in report.workload_keys(results):
        rows = report.rows_for(results, k)
        any_r = next(iter(rows.values()))
        cells = []
        for m in names:
            r = rows.get(m)
            if r is None:
                cells.append(f"{'-':>21}")
            elif "median_ms" not in r:
                cells.append(f"{'n/a':>21}")
            else:
                err = r.get("norm_rel_err") or 0.0
                bad = "!" if err >= NORM_WRONG or r.get("scale_ok") is False else ("~" if err >= NORM_IMPRECISE else "")
                cells.append(f"{r['median_ms']:8.3f} ({r['p10_ms']:.2f}-{r['p90_ms']:.2f}){bad}".rjust(21))
        d = rows.get("distclip", {})
        frac = d.get("extra_peak_frac")
        mem = f"{100 * frac:5.1f}" if frac is not None else "  n/a"
        print(
            f"{k[0]:11} {k[1]:5} {k[2]:>6} {k[3]:4} {any_r['local_grad_bytes'] / 2**20:8.1f} "
            + " ".join(cells)
            + f"  {d.get('collectives')!s:>5}  {mem}"
        )
    print("('!' = wrong norm for the layout (rel. err > 1e-2) or wrongly scaled grads; '~' = imprecise norm (rel. err > 1e-5);")
    print(" 'n/a' = fails or skipped; colls = distclip's collectives per call; mem% = distclip's extra peak memory / local grad bytes)")
    print()
    print("== distclip per-phase breakdown (ms, profiled calls, median; per call the rank that reaches the all-reduce last) ==")
    print(f"{'layout':11} {'size':5} {'params':>6} {'clip':4} " + " ".join(f"{ph:>11}" for ph in PHASES) + "   timed median")
    for k in report.workload_keys(results):
        d = report.rows_for(results, k).get("distclip")
        ph = (d or {}).get("phases")
        if ph:
            print(
                f"{k[0]:11} {k[1]:5} {k[2]:>6} {k[3]:4} "
                + " ".join(f"{ph.get(p + '_ms', float('nan')):11.3f}" for p in PHASES)
                + f"   {d['median_ms']:12.3f}   (max rank reduce incl. wait {ph.get('reduce_max_ms', float('nan')):.3f})"
            )
            # with clipping off on CPU the coefficient is exactly 1 and distclip skips the scale
            missing = [p for p in ph.get("missing_phases", []) if not (p == "scale" and k[3] == "off")]
            if missing:
                print(f"    (no 'distclip.<phase>' profiler range seen, counted in 'other': {', '.join(missing)})")
    print()
    print(f"== targets (world size {meta['world_size']}) ==")
    for row in report.target_rows(results, meta["world_size"]):
        vs = report.format_value(row["value"])
        verdict = {True: "MET    ", False: "NOT MET", None: "n/a    "}[row["pass"]]
        print(f"  {verdict}  {row['check']:<84} {vs:>10}  (target {row['target']})")


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, few repeats (smoke test, < 60 s at 2 ranks)")
    ap.add_argument("--out", default=str(HERE / "results"), help="directory for the JSON, markdown and PNG results")
    ap.add_argument("--layouts", default=",".join(workloads.LAYOUTS), help=f"comma list of {','.join(workloads.LAYOUTS)}")
    ap.add_argument(
        "--sizes", default=None, help="comma list of parameter counts for the many-small models (default 1000,4000,16000; quick 100,1000)"
    )
    ap.add_argument(
        "--sep-sizes",
        default=None,
        help="LAYOUT=N,... sizes of the separate-grads workloads (default dtensor_sep=2000,plain_sep=4000; quick dtensor_sep=100,plain_sep=100)",
    )
    ap.add_argument(
        "--clip", default="off,on", help="clipping modes, comma list: off (max_norm 1e20, coefficient exactly 1) and on (coefficient < 1)"
    )
    ap.add_argument("--clip-on-rel", type=float, default=1e-3, help="max_norm of the 'on' mode, relative to the reference norm (default 1e-3)")
    ap.add_argument(
        "--phase-repeats",
        type=int,
        default=None,
        help="profiled calls for distclip's per-phase breakdown per workload and mode (default 10; quick 3; 0 skips)",
    )
    ap.add_argument(
        "--large-mb", type=float, default=None, help="local fp32 grad MB per rank of the large model (default 256; quick 8); 0 skips it"
    )
    ap.add_argument("--large-d", type=int, default=None, help="hidden size of the large model's layers (default 2048; quick 256)")
    ap.add_argument("--methods", default=",".join(methods.DEFAULT_METHODS), help=f"comma list of {','.join(methods.METHOD_ORDER)}")
    ap.add_argument("--repeats", type=int, default=None, help="max timed calls per method (default 30; quick 5)")
    ap.add_argument("--min-repeats", type=int, default=None, help="min timed calls per method (default 10; quick 3)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed warm-up calls per method (default 3; quick 1)")
    ap.add_argument("--budget-s", type=float, default=None, help="target seconds of timed calls per workload (default 20; quick 2)")
    ap.add_argument(
        "--torch-max-params",
        type=int,
        default=None,
        help="skip torch.nn.utils.clip_grad_norm_ and torchtitan's clip_grad_norm_ on DTensor layouts above this many params: "
        "their first call is quadratic (about 14 s at 2000, 1 min at 4000 on 2 ranks); 0 = never skip (default 4000; quick 1000)",
    )
    ap.add_argument(
        "--fsdp2-grads",
        choices=["backward", "separate"],
        default="backward",
        help="FSDP2 grads from one real forward/backward (views into FSDP2's reduce-scatter buffers, as in "
        "training; default) or assigned as separate tensors",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch threads per rank (default: usable cores // local ranks, at least 1)")
    ap.add_argument("--tag", default="", help="extra suffix for the result file name")
    ap.add_argument("--no-report", action="store_true", help="skip writing the markdown summary and plots")
    ap.add_argument("--verbose", action="store_true", help="print tracebacks of methods that fail on a layout")
    args = ap.parse_args(argv)
    q = args.quick
    defaults = {
        "sizes": "100,1000" if q else "1000,4000,16000",
        "sep_sizes": "dtensor_sep=100,plain_sep=100" if q else "dtensor_sep=2000,plain_sep=4000",
        "phase_repeats": 3 if q else 10,
        "torch_max_params": 1000 if q else 4000,
        "large_mb": 8.0 if q else 256.0,
        "large_d": 256 if q else 2048,
        "repeats": 5 if q else 30,
        "min_repeats": 3 if q else 10,
        "warmup": 1 if q else 3,
        "budget_s": 2.0 if q else 20.0,
    }
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def jobs_of(args: argparse.Namespace) -> list[tuple[str, str, int]]:
    """(layout, size, n) of every workload the arguments ask for, in run order; exits on bad input."""
    layouts = [x for x in args.layouts.split(",") if x]
    unknown = set(layouts) - set(workloads.LAYOUTS)
    if unknown:
        sys.exit(f"unknown layouts: {sorted(unknown)}")
    bad_modes = set(args.clip.split(",")) - {"off", "on", ""}
    if bad_modes:
        sys.exit(f"unknown --clip modes: {sorted(bad_modes)}")
    sizes = [int(x) for x in args.sizes.split(",") if x]
    sep_sizes: dict[str, list[int]] = {}
    for item in (x for x in args.sep_sizes.split(",") if x):
        name, _, n = item.partition("=")
        sep_sizes.setdefault(name.strip(), []).append(int(n))
    jobs = [(layout, "small", n) for layout in layouts if layout in MODEL_LAYOUTS for n in sizes]
    jobs += [(layout, "small", n) for layout in layouts if layout in SEP_LAYOUTS for n in sep_sizes.get(layout, [])]
    if args.large_mb > 0:
        jobs += [(layout, "large", 0) for layout in layouts if layout in MODEL_LAYOUTS]
    return jobs


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    if args.verbose:
        os.environ["BENCH_VERBOSE"] = "1"
    jobs = jobs_of(args)
    device, backend, threads = env.launch(args.threads)
    world = dist.get_world_size()
    meta = env.hardware_info(device, backend, threads)
    meta.update(quick=args.quick, max_norm=MAX_NORM, clip_modes=args.clip, clip_on_rel=args.clip_on_rel)
    log(
        f"bench_clip: world={world} backend={backend} device={device.type} threads/rank={threads} "
        f"cpu='{meta['cpu_model']}' torch={torch.__version__}"
    )
    method_names = [m for m in args.methods.split(",") if m]
    torchtitan = None
    if "torchtitan" in method_names:
        torchtitan, why = methods.load_torchtitan()
        if torchtitan is None:
            log(f"torchtitan column skipped: torchtitan.distributed.utils.clip_grad_norm_ is not importable ({why})")
            method_names.remove("torchtitan")
            meta["torchtitan_skipped"] = why
        else:
            import torchtitan as tt_pkg

            meta["torchtitan"] = getattr(tt_pkg, "__version__", "?")

    results: list[dict] = []
    t_start = time.perf_counter()
    for layout, size, n in jobs:
        t0 = time.perf_counter()
        w = workloads.build_workload(layout, size, n, int(args.large_mb * 2**20), args.large_d, device, args.fsdp2_grads)
        t_build = time.perf_counter() - t0
        recs = bench_workload(w, method_names, args, device, torchtitan)
        for r in recs:
            r["build_s"] = t_build
        results += recs
        log(
            f"  {layout:11} {size:5} params={w.n_params:<6} local={w.local_bytes / 2**20:8.1f} MB  "
            f"build {t_build:5.1f}s  bench {time.perf_counter() - t0 - t_build:5.1f}s"
        )
        for d in recs:
            if d["method"] == "distclip" and "median_ms" in d:
                ph = d.get("phases") or {}
                parts = "  ".join(f"{k} {ph[k + '_ms']:.2f}" for k in PHASES if k + "_ms" in ph)
                log(f"      distclip clip={d['clip']:3} {d['median_ms']:8.3f} ms   phases (ms, last rank to reach the all-reduce): {parts}")
        del w
        dist.barrier()
    meta["total_s"] = time.perf_counter() - t_start

    if dist.get_rank() == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        name = f"bench_w{world}_{backend}{'_quick' if args.quick else ''}{('_' + args.tag) if args.tag else ''}.json"
        path = out / name
        path.write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str))
        print_summary(results, meta)
        print(f"\nwrote {path}  (total {meta['total_s']:.1f} s)")
        if not args.no_report:
            try:
                for p in report.generate(out, quick=args.quick):
                    print(f"wrote {p}")
            except Exception:  # noqa: BLE001 - the JSON is the result; plots are a convenience
                traceback.print_exc()
    env.shutdown()


if __name__ == "__main__":
    main()
