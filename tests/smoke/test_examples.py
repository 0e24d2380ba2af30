"""Smoke-run every example in examples/ exactly as its docstring says (torchrun, CPU, gloo).

Each example asserts that the norm is identical on every rank (and, where it has one, that it
matches a one-process reference) and prints "OK: <name>" last; a non-zero exit fails the test.
"""

import importlib.util
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
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


# Examples seen to stall now and then for reasons outside distclip, retried once on a stall (a
# warning says so): transformers_trainer stalled in 2 of about 70 runs on the 2-core CI machine,
# once inside the Trainer's loop after its first logged step and once after printing OK (cause not
# found; every norm it printed was right). A second stall fails the test.
RETRY_ON_STALL = {"transformers_trainer"}
TIMEOUT_S = 300
TEARDOWN_ABORT = "terminate called without an active exception"


def _run(cmd: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    """Run ``cmd``; on a stall kill its whole process group (torchrun and its workers, which
    ``subprocess.run``'s timeout would leave behind) and raise ``TimeoutExpired``."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise subprocess.TimeoutExpired(cmd, TIMEOUT_S, output=stdout, stderr=stderr) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


@pytest.mark.parametrize("name,nproc,package", CASES, ids=[c[0] for c in CASES])
def test_example_runs(name, nproc, package, tmp_path):
    if package is not None and importlib.util.find_spec(package) is None:
        if REQUIRE:
            pytest.fail(f"{package} is not installed but DISTCLIP_REQUIRE_INTEGRATIONS=1")
        pytest.skip(f"{package} is not installed (pip install 'distclip[{package}]')")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(EXAMPLES / f"{name}.py")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        out = _run(cmd, env, tmp_path)  # cwd: logs go there
    except subprocess.TimeoutExpired as stall:
        if name not in RETRY_ON_STALL:
            raise
        warnings.warn(f"{name} stalled for {TIMEOUT_S} s and was run again; its output:\n{(stall.output or '')[-2000:]}", stacklevel=1)
        out = _run(cmd, env, tmp_path)
    if out.returncode != 0 and f"OK: {name}" in out.stdout and TEARDOWN_ABORT in out.stderr:
        # gloo's teardown race: a rank aborts at exit after the example finished and every rank
        # left the group (a barrier before destroy_process_group narrows it, never closes it)
        warnings.warn(f"{name} aborted in gloo's teardown after finishing and was run again", stacklevel=1)
        out = _run(cmd, env, tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    assert f"OK: {name}" in out.stdout, out.stdout[-3000:]
    # a new user's first run prints no warnings: neither distclip's nor torch's about the demo models
    warned = [line for line in out.stderr.splitlines() if any(w in line for w in ("UserWarning", "FutureWarning", "DeprecationWarning"))]
    assert not warned, "\n".join(warned[:10])
    if name == "guarded_training" and importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "guarded_training.png").stat().st_size > 0  # the plot of norm and threshold
