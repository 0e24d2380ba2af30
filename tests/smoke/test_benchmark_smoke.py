"""Every benchmark script, run in smoke mode (tiny sizes, few repeats, 2 ranks), with its output
checked for sanity, not timing: a broken benchmark fails CI instead of the next full run.

Every script starts at once (one ``Popen`` each, the launches overlap) into a temp
dir, never into benchmarks/results; ``report.py`` then reads bench_clip's JSON, and the committed
results (files of every format written so far).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"
TIMEOUT_S = 240
PHASES = ("layout", "local_norms", "reduce", "scale")
Runs = tuple[Path, dict[str, tuple[int, str]]]  # output directory, {script: (exit code, log)}


def torchrun(script: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(BENCH / script), *args]


def smoke_commands(out: Path) -> dict[str, list[str]]:
    o = str(out)
    layouts = "fsdp2,tp_fsdp,ddp,fsdp1,dtensor_sep,plain_sep"  # every layout of the registry
    return {
        "bench_clip": torchrun(
            "bench_clip.py",
            *("--quick", "--layouts", layouts, "--sizes", "50", "--sep-sizes", "dtensor_sep=50,plain_sep=50", "--large-mb", "0.5"),
            *("--methods", "distclip,torch,fsdp1,minimal,hand_rolled,roofline"),
            *("--repeats", "2", "--min-repeats", "1", "--warmup", "1", "--phase-repeats", "2", "--no-report", "--out", o),
        ),
        "bench_grad_norms": torchrun("bench_grad_norms.py", "--params", "50", "--repeats", "2", "--warmup", "1", "--out", o),
        "agreement_overhead": torchrun("agreement_overhead.py", "--sizes", "10", "--repeats", "3", "--warmup", "1", "--out", o),
        "allreduce_size": torchrun("allreduce_size.py", "--lengths", "1,8", "--repeats", "5", "--warmup", "1", "--out", o),
        # launches its own worlds (one per commit); HEAD is checked out into a worktree it removes
        "compare_commits": [
            sys.executable, str(BENCH / "compare_commits.py"), "HEAD", "WORKTREE",
            *("--rounds", "1", "--repeats", "2", "--sizes", "plain_sep=20,dtensor_sep=20,fsdp2=50", "--workdir", f"{o}/trees", "--out", o),
        ],
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    """Run every torchrun script once, concurrently (each in its own process group, so a run
    past the deadline is killed with its workers)."""
    out = tmp_path_factory.mktemp("bench_smoke")
    environ = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.monotonic()
    procs = {}
    for name, cmd in smoke_commands(out).items():
        log = open(out / f"{name}.log", "w")
        proc = subprocess.Popen(cmd, cwd=ROOT, env=environ, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        procs[name] = (proc, log)
    done: dict[str, tuple[int, str]] = {}
    while len(done) < len(procs):
        for name, (proc, log) in procs.items():
            if name in done:
                continue
            late = time.monotonic() - start > TIMEOUT_S
            if proc.poll() is None and not late:
                continue
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            log.close()
            elapsed = time.monotonic() - start
            print(f"{name}: exit {proc.returncode} after {elapsed:.1f} s")
            head = f"(exit {proc.returncode} after {elapsed:.1f} s{', killed at the deadline' if late else ''})\n"
            done[name] = (proc.returncode, head + (out / f"{name}.log").read_text())
        time.sleep(0.1)
    return out, done


def ran(runs: Runs, script: str) -> Path:
    """The output directory, once ``script`` has exited 0 (else its log's tail as the failure)."""
    out, done = runs
    code, log = done[script]
    assert code == 0, f"{script} exited {code}:\n{log[-4000:]}"
    return out


def _json(path: Path) -> dict:
    assert path.exists(), f"{path.name} not written"
    return json.loads(path.read_text())


def test_bench_clip(runs: Runs) -> None:
    data = _json(ran(runs, "bench_clip") / "bench_w2_gloo_quick.json")
    meta, results = data["meta"], data["results"]
    assert meta["world_size"] == 2 and meta["quick"] and meta["backend"] == "gloo"
    rows = [r for r in results if r["method"] == "distclip"]
    # 6 layouts at 50 params + 4 large models, each with clipping off and on
    assert len(rows) == 20 and {r["clip"] for r in rows} == {"off", "on"}
    assert {r["layout"] for r in rows} == {"fsdp2", "tp_fsdp", "ddp", "fsdp1", "dtensor_sep", "plain_sep"}
    for r in rows:
        where = f"{r['layout']} {r['size']} clip {r['clip']}"
        assert r["norm_ok"] and r["scale_ok"] and r["collectives"] == 1, where
        assert r["median_ms"] > 0 and r["reps"] >= 1 and r.get("first_call_ms", 1.0) > 0, where
        assert r["extra_peak_bytes"] is not None, where
        ph = r["phases"]
        # the library's distclip.<phase> profiler ranges were seen (scale: only when grads are scaled)
        expected = set(PHASES) if r["clip"] == "on" else set(PHASES) - {"scale"}
        assert expected <= set(ph["phases_seen"]), (where, ph)
        assert all(ph[p + "_ms"] >= 0 for p in PHASES) and ph["total_ms"] > 0, (where, ph)
        assert ph["other_ms"] > -0.1, (where, ph)  # per call, the phases lie inside the call
    # the least code right for each layout is right everywhere ...
    minimal = [r for r in results if r["method"] == "minimal"]
    assert len(minimal) == 20 and all(r["norm_ok"] and r["scale_ok"] for r in minimal)
    # ... while the hand-rolled baseline counts replicas twice: the reference tells them apart
    hand = {(r["layout"], r["size"], r["clip"]): r for r in results if r["method"] == "hand_rolled"}
    assert not hand[("ddp", "small", "off")]["norm_ok"] and not hand[("plain_sep", "small", "off")]["norm_ok"]
    assert hand[("fsdp2", "small", "off")]["norm_ok"]
    torch_rows = {(r["layout"], r["size"], r["clip"]): r for r in results if r["method"] == "torch"}
    assert "error" in torch_rows[("tp_fsdp", "small", "off")]  # grads on two meshes: torch raises
    assert torch_rows[("ddp", "small", "off")]["norm_ok"]
    assert {r["layout"] for r in results if r["method"] == "fsdp1"} == {"fsdp1"}
    roof = [r for r in results if r["method"] == "roofline"]
    assert roof and all(r["roofline_ratio"] == 1.0 for r in roof)


def test_report(runs: Runs, tmp_path: Path) -> None:
    report = [sys.executable, str(BENCH / "report.py")]
    args = ["--results", str(ran(runs, "bench_clip")), "--quick", "--out", str(tmp_path)]
    out = subprocess.run([*report, *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    md = (tmp_path / "summary_quick.md").read_text()
    assert "## 2 ranks, gloo" in md and "| layout | params | clip | MB/rank | distclip |" in md
    assert "| workload | params | clip | layout | local_norms | reduce | scale | other | total | timed median |" in md
    assert "Targets:" in md and "| distclip norm == reference (all workloads) | 20 | == 20 | met |" in md
    assert "| tp_fsdp | 50 | off |" in md
    # the committed full-run files (older formats: phases named "plan") still make a summary
    args = ["--results", str(BENCH / "results"), "--no-plots", "--out", str(tmp_path / "committed")]
    committed = subprocess.run([*report, *args], capture_output=True, text=True, timeout=60)
    assert committed.returncode == 0, committed.stdout + committed.stderr
    md = (tmp_path / "committed" / "summary.md").read_text()
    assert "## 2 ranks" in md and "distclip per phase" in md


def test_bench_grad_norms(runs: Runs) -> None:
    data = _json(ran(runs, "bench_grad_norms") / "grad_norms_w2_gloo.json")
    assert data["meta"]["world_size"] == 2
    rows = {r["layout"]: r for r in data["results"]}
    assert set(rows) == {"fsdp2", "ddp"}
    for layout, r in rows.items():
        assert r["n_params"] == 50 and r["n_names"] == 50, layout
        assert r["reference_rel_err"] < 1e-5 and r["total_rel_err"] < 1e-6, (layout, r)
        for method in ("get_total_norm", "grad_norms per parameter", "grad_norms 10 groups"):
            assert r[method]["median_ms"] > 0 and r[method]["first_call_ms"] > 0, (layout, method)


def test_agreement_overhead(runs: Runs) -> None:
    data = _json(ran(runs, "agreement_overhead") / "agreement_overhead.json")
    assert data["world_size"] == 2
    rows = {r["workload"]: r for r in data["rows"]}
    assert set(rows) == {"dtensor_sep x10", "plain_sep x10"}
    for name, r in rows.items():
        assert r["check_on_ms"] > 0 and r["allreduce_full_ms"] > 0 and r["allreduce_no_agreement_ms"] > 0, name
        assert r["overhead_ms"] == pytest.approx(r["allreduce_full_ms"] - r["allreduce_no_agreement_ms"]), name
        assert r["check_off_ms"] == pytest.approx(r["check_on_ms"] - r["overhead_ms"]), name
        # distclip's one all-reduce carries the head and flags beside the agreement's values
        assert r["agreement_values"] < r["packet_len"] < r["agreement_values"] + 16, name
        assert r["norm_rel_err"] < 1e-5, name


def test_allreduce_size(runs: Runs) -> None:
    data = _json(ran(runs, "allreduce_size") / "allreduce_size_w2_gloo.json")
    meta, by_length = data["meta"], data["median_us_by_length"]
    assert meta["world_size"] == 2 and meta["distclip_packet_len"] > 8
    assert set(by_length) == {"1", "8", str(meta["distclip_packet_len"])}
    assert all(v > 0 for v in by_length.values())


def test_compare_commits(runs: Runs) -> None:
    out = ran(runs, "compare_commits")
    data = _json(out / "compare_HEAD_WORKTREE_w2.json")
    assert data["ranks"] == 2 and data["rounds"] == 1 and len(data["commits"]["HEAD"]) == 40
    assert set(data["summary"]) == {"plain_sep:20", "dtensor_sep:20", "fsdp2:50"}
    for key, row in data["summary"].items():
        assert row["HEAD"]["warm_ratio"] > 0 and row["HEAD"]["first_ratio"] > 0, key
        assert row["WORKTREE"]["warm_ms"] > 0 and "warm_ratio" not in row["WORKTREE"], key
    assert not (out / "trees" / data["commits"]["HEAD"][:12]).exists()  # the worktree it added is gone
