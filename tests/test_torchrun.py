"""The main job launched exactly as users launch it."""

import os
import subprocess
import sys

import pytest


def torchrun(*args, nproc=4, timeout=600):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def test_main_job_passes_on_four_ranks():
    out = torchrun("-m", "distclip.verify")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    summary = [line for line in out.stdout.splitlines() if "checks passed" in line]
    assert summary and summary[-1].startswith("ALL PASS: 48/48"), out.stdout[-3000:]
    assert "FAIL" not in out.stdout.replace("FAILED", "")


@pytest.mark.parametrize("nproc", [2])
def test_main_job_exits_nonzero_when_a_check_fails(nproc):
    out = torchrun("-m", "distclip.verify", "--impl", "torch", "--layouts", "PP x FSDP", "DDP", nproc=nproc)
    assert out.returncode != 0
    assert "FAILED:" in out.stdout and "PP x FSDP" in out.stdout
