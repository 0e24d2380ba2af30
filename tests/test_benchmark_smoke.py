"""A tiny run of the benchmark script, so a broken benchmark shows up in CI (timings not checked)."""

import json
import os
import subprocess
import sys


def test_benchmark_script_runs_and_distclip_is_correct(tmp_path):
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_clip.py")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        script,
        "--quick",
        "--layouts",
        "fsdp2,ddp,dtensor_sep,plain_sep",
        "--sizes",
        "50",
        "--sep-sizes",
        "dtensor_sep=50,plain_sep=50",
        "--large-mb",
        "1",
        "--methods",
        "distclip,minimal,hand_rolled,roofline",
        "--repeats",
        "3",
        "--min-repeats",
        "2",
        "--phase-repeats",
        "2",
        "--no-report",
        "--out",
        str(tmp_path),
    ]
    out = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (result,) = list(tmp_path.glob("bench_w2_*.json"))
    results = json.loads(result.read_text())["results"]
    rows = [r for r in results if r["method"] == "distclip"]
    # (fsdp2, ddp) x (50 params, large) + dtensor_sep + plain_sep, each with clipping off and on
    assert len(rows) == 12 and {r["clip"] for r in rows} == {"off", "on"}
    assert all(r["norm_ok"] and r["scale_ok"] and r["collectives"] == 1 for r in rows)
    assert all(r["phases"]["total_ms"] > 0 and "missing_hooks" not in r["phases"] for r in rows)
    assert all(r["extra_peak_bytes"] is not None for r in rows)
    minimal = [r for r in results if r["method"] == "minimal"]
    assert len(minimal) == 12 and all(r["norm_ok"] and r["scale_ok"] for r in minimal)
