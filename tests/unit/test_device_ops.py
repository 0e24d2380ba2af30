"""Device operations per call on the accelerator path stay at or below their pins.

``benchmarks/device_ops.py`` counts the non-view aten ops (a kernel launch each on a GPU) of one
warm call over meta-tensor grads (no host read possible), one process and a fake 4-rank process
group. It runs in a child process: the fake group must not leak into other tests. A count that
grows past its pin fails here; so does the accelerator path's extra memory growing past 1 % of the
grads' bytes plus 1 MiB (bf16 grads: no full-size copy).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# The most device ops each workload may take: the counts reached (targets: 12 for one
# process, 20 for 4 ranks, +12 for ZClip on top of the clip). A ceiling: it may only go down.
PINS = {"single_20": 12, "single_1000": 12, "fsdp2_1000": 18, "mesh_2d_1d_1000": 19, "ddp_1000": 19, "guard_fixed_extra": 1,
        "zclip_extra": 12}

_CHILD = """
import json, sys
sys.path.insert(0, {root!r})
from benchmarks import device_ops, bench_memory
import torch
out = device_ops.measure()
grads = bench_memory.make_grads("dense", torch.bfloat16, 64, device="meta")
peak, _ = bench_memory.counted_bytes("distclip", grads)
out["memory"] = {{"peak": peak, "grad_bytes": sum(g.numel() * g.element_size() for g in grads)}}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def counts() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DISTCLIP_HOST_READS": "never"}
    proc = subprocess.run([sys.executable, "-c", _CHILD.format(root=str(ROOT))], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("workload", sorted(PINS))
def test_device_ops_at_most_pinned(counts: dict, workload: str) -> None:
    found = counts[workload]["device_ops"]
    assert found <= PINS[workload], f"{workload}: {found} device ops, pinned at {PINS[workload]}: {counts[workload].get('ops')}"


def test_one_collective_per_call(counts: dict) -> None:
    for workload in ("fsdp2_1000", "mesh_2d_1d_1000", "ddp_1000"):
        assert counts[workload]["collectives"] == 1, (workload, counts[workload])


def test_device_memory_bounded(counts: dict) -> None:
    memory = counts["memory"]
    assert memory["peak"] <= memory["grad_bytes"] // 100 + (1 << 20), memory
