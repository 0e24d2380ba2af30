"""A tiny run of the benchmark script, so a broken benchmark shows up in CI (timings not checked)."""

import json
import os
import subprocess
import sys


def test_benchmark_script_runs_and_distclip_is_correct(tmp_path):
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_clip.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script, "--quick",
           "--layouts", "fsdp2,ddp", "--sizes", "50", "--large-mb", "1", "--methods", "distclip,hand_rolled,roofline",
           "--no-report", "--out", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (result,) = list(tmp_path.glob("bench_w2_*.json"))
    rows = [r for r in json.loads(result.read_text())["results"] if r["method"] == "distclip"]
    assert len(rows) == 4 and all(r["norm_ok"] and r["collectives"] == 1 for r in rows)
