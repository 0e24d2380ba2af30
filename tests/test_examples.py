"""Smoke-run every example in examples/ exactly as its docstring says (torchrun, CPU, gloo).

Each example asserts that the norm is identical on every rank (and, where it has one, that it
matches a one-process reference) and prints "OK: <name>" last; a non-zero exit fails the test.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
REQUIRE = os.environ.get("DISTCLIP_REQUIRE_INTEGRATIONS") == "1"

CASES = [  # (script, ranks, package it needs)
    ("tp_fsdp2_amp", 4, None),
    ("pipeline_fsdp2", 4, None),
    ("moe_expert_parallel", 3, None),
    ("fsdp1", 2, None),
    ("lightning_model_parallel", 4, "lightning"),
    ("torchtitan_swap", 4, "torchtitan"),
    ("guarded_training", 2, None),
    ("transformers_trainer", 2, "transformers"),
]


@pytest.mark.parametrize("name,nproc,package", CASES, ids=[c[0] for c in CASES])
def test_example_runs(name, nproc, package, tmp_path):
    if package is not None and importlib.util.find_spec(package) is None:
        if REQUIRE:
            pytest.fail(f"{package} is not installed but DISTCLIP_REQUIRE_INTEGRATIONS=1")
        pytest.skip(f"{package} is not installed (pip install 'distclip[{package}]')")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(EXAMPLES / f"{name}.py")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)  # cwd: logs go there
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    assert f"OK: {name}" in out.stdout, out.stdout[-3000:]
    # a new user's first run prints no warnings: neither distclip's nor torch's about the demo models
    warned = [line for line in out.stderr.splitlines() if any(w in line for w in ("UserWarning", "FutureWarning", "DeprecationWarning"))]
    assert not warned, "\n".join(warned[:10])
    if name == "guarded_training" and importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "guarded_training.png").stat().st_size > 0  # the plot of norm and threshold
