"""distclip at two (or more) commits on the same workloads: the before/after of a change.

Each commit is checked out into a git worktree under ``--workdir``; each round launches one
torchrun world per commit, in an order that rotates by one each round, and every world imports
distclip from its own worktree (``PYTHONPATH``) and the workloads from this checkout, so the models
are the same bytes whatever the commit. The machine's load drifts between worlds, so the numbers to
read are the per-round ratios' median, not the absolute times.

Per workload and commit a world records the first call (discovery included), the second (the
layout plan built) and the median of ``--repeats`` warm calls of ``clip_grad_norm_`` with clipping on in every call
(``max_norm`` below the norm the call before returned).

    python benchmarks/compare_commits.py c4fdedc HEAD --layouts plain_sep,dtensor_sep,fsdp2 \\
        --rounds 5 --ranks 2 --out benchmarks/results

The last commit named is compared with each one before it; ``WORKTREE`` means the working tree
as it is (uncommitted edits included).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKTREE = "WORKTREE"


def _checkout(commit: str, workdir: Path, made: list[Path]) -> tuple[str, Path]:
    """(full sha or WORKTREE, source dir) for ``commit``; a worktree it adds is appended to ``made``."""
    if commit == WORKTREE:
        return WORKTREE, ROOT
    sha = subprocess.check_output(["git", "-C", str(ROOT), "rev-parse", commit], text=True).strip()
    path = workdir / sha[:12]
    if not path.exists():
        subprocess.check_call(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), sha], stdout=subprocess.DEVNULL)
        made.append(path)
    return sha, path


def _world(source: Path, args: argparse.Namespace, out: Path) -> dict:
    # distclip from the commit's tree only; the workloads from this checkout (``work`` puts it first
    # once distclip is imported), so every commit clips the same bytes.
    env = {**os.environ, "PYTHONPATH": str(source), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.ranks}", __file__, "--worker"]
    cmd += ["--layouts", args.layouts, "--sizes", args.sizes, "--repeats", str(args.repeats), "--result", str(out)]
    subprocess.run(cmd, env=env, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def drive(args: argparse.Namespace) -> None:
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    made: list[Path] = []
    try:
        trees = [_checkout(c, workdir, made) for c in args.commits]
        rounds = _rounds(trees, args, workdir)
    finally:
        for path in made if not args.keep_worktrees else []:
            subprocess.call(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)])
    _summarize(trees, rounds, args)


def _rounds(trees: list[tuple[str, Path]], args: argparse.Namespace, workdir: Path) -> list[dict[str, dict]]:
    rounds: list[dict[str, dict]] = []
    for r in range(args.rounds):
        runs: dict[str, dict] = {}
        order = list(range(len(trees)))
        order = order[r % len(order) :] + order[: r % len(order)]
        for i in order:
            sha, source = trees[i]
            runs[args.commits[i]] = _world(source, args, workdir / f"result_{i}.json")
        rounds.append(runs)
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    return rounds


def _summarize(trees: list[tuple[str, Path]], rounds: list[dict[str, dict]], args: argparse.Namespace) -> None:
    after = args.commits[-1]
    summary: dict[str, dict] = {}
    print(
        f"\n{'workload':<22} {'commit':<12} {'first ms':>9} {'second ms':>10} {'warm ms':>9} {'warm ratio (after/this)':>24}"
        f" {'first ratio':>12} {'second ratio':>13}"
    )
    for key in rounds[0][after]["workloads"]:
        for before in args.commits:
            warm = statistics.median(run[before]["workloads"][key]["warm_ms"] for run in rounds)
            first = statistics.median(run[before]["workloads"][key]["first_ms"] for run in rounds)
            second = statistics.median(run[before]["workloads"][key]["second_ms"] for run in rounds)
            row = {"warm_ms": warm, "first_ms": first, "second_ms": second}
            if before != after:
                for field in ("warm", "first", "second"):
                    ratios = (run[after]["workloads"][key][f"{field}_ms"] / run[before]["workloads"][key][f"{field}_ms"] for run in rounds)
                    row[f"{field}_ratio"] = statistics.median(ratios)
            summary.setdefault(key, {})[before] = row
            ratio = f"{row['warm_ratio']:.3f}" if "warm_ratio" in row else "-"
            fratio = f"{row['first_ratio']:.3f}" if "first_ratio" in row else "-"
            sratio = f"{row['second_ratio']:.3f}" if "second_ratio" in row else "-"
            print(f"{key:<22} {before[:12]:<12} {first:9.2f} {second:10.2f} {warm:9.3f} {ratio:>24} {fratio:>12} {sratio:>13}")
    record = {
        "commits": {c: sha for c, (sha, _) in zip(args.commits, trees)},
        "ranks": args.ranks,
        "rounds": args.rounds,
        "repeats": args.repeats,
        "hardware": rounds[0][after]["hardware"],
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "summary": summary,
    }
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        name = Path(args.out) / f"compare_{args.commits[0][:8]}_{after[:8]}_w{args.ranks}.json"
        name.write_text(json.dumps(record, indent=1))
        print(f"wrote {name}")


def work(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    import distclip

    sys.path.insert(0, str(ROOT))
    from benchmarks import env, workloads
    from benchmarks.measure import slowest_rank, timed_call

    device, backend, threads = env.launch(threads=1)
    sizes = dict(item.split("=") for item in args.sizes.split(","))
    result: dict = {"distclip": str(Path(distclip.__file__).parent), "workloads": {}}
    for layout in args.layouts.split(","):
        n = int(sizes.get(layout, 4000))
        w = workloads.build_workload(layout, "small", n, 0, 0, device)
        # Clipping on in every call: the first halves the norm, each later one takes it to 0.999 of the
        # norm the call before returned. A fixed max_norm would let the norm settle where the
        # coefficient rounds to exactly 1.0 and the multiply is skipped, in one commit and not another.
        state = {"max_norm": workloads.reference_norm(w) / 2}
        target = w.target

        def call(target: object = target, state: dict = state) -> None:
            state["total"] = distclip.clip_grad_norm_(target, state["max_norm"])

        def lower(state: dict = state) -> None:
            total = state["total"]
            state["max_norm"] = 0.999 * float(total.full_tensor() if hasattr(total, "full_tensor") else total)

        first = slowest_rank([timed_call(call, device)], device)[0]
        second = slowest_rank([timed_call(call, device, lower)], device)[0]
        warm = slowest_rank([timed_call(call, device, lower) for _ in range(args.repeats)], device)
        result["workloads"][f"{layout}:{n}"] = {"first_ms": first * 1e3, "second_ms": second * 1e3, "warm_ms": statistics.median(warm) * 1e3}
        del w, target, call
    result["hardware"] = env.hardware_info(device, backend, threads)
    if dist.get_rank() == 0:
        Path(args.result).write_text(json.dumps(result))
    torch.distributed.barrier()
    env.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("commits", nargs="*", default=["HEAD~1", WORKTREE], help="commits (or WORKTREE); the last is 'after'")
    ap.add_argument("--layouts", default="plain_sep,dtensor_sep,fsdp2")
    ap.add_argument("--sizes", default="plain_sep=4000,dtensor_sep=2000,fsdp2=4000", help="LAYOUT=N,... parameter tensors")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--workdir", default="/tmp/distclip_compare")
    ap.add_argument("--out", default=None, help="directory for the JSON record")
    ap.add_argument("--keep-worktrees", action="store_true", help="keep the worktrees it added (default: removed at the end)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    work(args) if args.worker else drive(args)


if __name__ == "__main__":
    main()
