"""The main job launched exactly as users launch it: with torchrun, and with plain `python -m`.

Each job runs once per module (a fixture); one test per (layout, norm type) reads its row from the
printed table, beside the tests of the job as a whole (exit code, summary, progress, warnings)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from distclip.verify import LAYOUT_NAMES, NORM_TYPES, select

TORCH_NORMS = ("1", "2", "inf")  # p = 0 differs by definition (torch counts non-zero tensors)
WORLD = 4
# the layouts where torch's own function is right, and those where it is wrong, at 4 ranks
TORCH_RIGHT = ["DDP"]
TORCH_WRONG = ["FSDP1 FULL_SHARD flat", "FSDP1 FULL_SHARD orig", "FSDP1 SHARD_GRAD_OP", "FSDP2", "TP + plain",
               "2D TP+FSDP", "FSDP1 over TP", "PP x FSDP", "EP uneven experts", "EP meta + assign", "tied embed PP",
               "tied embed PP x FSDP2", "FSDP1 LoRA", "TP + SP", "TP + SP, order by rank",
               "sparse embedding"]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(*args, nproc=WORLD, timeout=600):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, env=_env())


def verify(*args, timeout=300):
    """`python -m distclip.verify ...` without torchrun (it starts its own ranks)."""
    env = {k: v for k, v in _env().items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    cmd = [sys.executable, "-m", "distclip.verify", *args]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, env=env)


def table_rows(stdout):
    """{(layout, norm): (passed, detail)} from the printed table."""
    rows = {}
    for line in stdout.splitlines():
        # the longest name that fits ("tied embed PP x FSDP2" also starts with "tied embed PP ")
        layout = max((n for n in LAYOUT_NAMES if line.startswith(n + " ")), key=len, default=None)
        fields = line[24:].split() if layout else []
        if len(fields) >= 5 and fields[4] in ("PASS", "FAIL"):
            rows[(layout, fields[0])] = (fields[4] == "PASS", " ".join(fields[5:]))
    return rows


def _tail(out):
    return out.stdout[-4000:] + out.stderr[-4000:]


def _summary(out):
    return [line for line in out.stdout.splitlines() if "checks passed" in line]


def _id(name: str) -> str:
    """A test id without spaces or commas: 'two models, group=' -> 'two_models_group'."""
    return re.sub(r"[^\w.+-]+", "_", name).strip("_")


# ----------------------------------------------------------------------------- the main job


@pytest.fixture(scope="module")
def main_job():
    """`torchrun -m distclip.verify` on 4 ranks, once: (the finished process, its table's rows)."""
    out = torchrun("-m", "distclip.verify")
    return out, table_rows(out.stdout)


def test_main_job_passes_on_four_ranks(main_job):
    out, rows = main_job
    assert out.returncode == 0, _tail(out)
    summary = _summary(out)
    assert summary and summary[-1].startswith("ALL PASS: 160/160"), out.stdout[-3000:]
    assert "(20 layouts x 8 norm types, world size 4, distclip)" in summary[-1]
    assert "FAIL" not in out.stdout.replace("FAILED", "")
    assert "[18/20] TP + SP" in out.stdout  # progress, per layout
    assert "UserWarning" not in out.stderr and "FutureWarning" not in out.stderr, out.stderr[-3000:]
    assert len(rows) == len(select(WORLD)) * len(NORM_TYPES), sorted(rows)


MAIN_IDS = [pytest.param(s.name, f"{p:g}", id=f"{_id(s.name)}-p{p:g}") for s in select(WORLD) for p in NORM_TYPES]


@pytest.mark.parametrize(("layout", "norm"), MAIN_IDS)
def test_main_job_row(main_job, layout, norm):
    """One row of the table: distclip's norm and clipped grads match the float64 reference."""
    out, rows = main_job
    assert (layout, norm) in rows, f"no row for {layout} p={norm}:\n" + _tail(out)
    passed, detail = rows[(layout, norm)]
    assert passed, f"{layout} p={norm}: {detail}"
    progress = [line for line in out.stdout.splitlines() if line.startswith("[") and f"] {layout:24s} " in line]
    assert len(progress) == 1 and f" PASS {len(NORM_TYPES)}/{len(NORM_TYPES)} " in progress[0], progress


# ----------------------------------------------------------------------------- torch's function, the negative control


@pytest.fixture(scope="module")
def torch_job():
    """The negative control at 4 ranks, once: (the finished process, its rows, seconds taken)."""
    start = time.monotonic()
    out = torchrun("-m", "distclip.verify", "--impl", "torch", "--timeout", "10", "--norm-types", *TORCH_NORMS, timeout=400)
    return out, table_rows(out.stdout), time.monotonic() - start


def test_torch_baseline_on_four_ranks_terminates_with_its_failures(torch_job):
    """torch's function raises on the empty FSDP2 shards of ranks 2-3 only, inside its own
    collectives, so ranks 0-1 wait in torch's all-reduce. The job must report that as a
    hang/timeout (short process-group timeout), rebuild the process group, finish every other
    layout and exit non-zero in bounded time, instead of hanging until CI's timeout."""
    out, rows, elapsed = torch_job
    assert out.returncode not in (0, None), _tail(out)
    assert elapsed < 300, elapsed
    assert len(rows) == 20 * len(TORCH_NORMS), out.stdout[-4000:]
    assert "hang/timeout" in rows[("FSDP2", "inf")][1], rows[("FSDP2", "inf")]
    assert "empty tensor" in rows[("FSDP2", "inf")][1]
    summary = _summary(out)
    assert summary and summary[-1].startswith("FAILED:") and "world size 4, torch" in summary[-1], out.stdout[-2000:]


@pytest.mark.parametrize("layout", TORCH_RIGHT + TORCH_WRONG, ids=_id)
def test_torch_baseline_layout(torch_job, layout):
    """torch's function passes every norm type on DDP, and fails at least one on every other
    layout listed (its rows are all there either way)."""
    out, rows, _ = torch_job
    missing = [p for p in TORCH_NORMS if (layout, p) not in rows]
    assert not missing, f"{layout}: no rows for p={missing}\n" + out.stdout[-4000:]
    ok = all(rows[(layout, p)][0] for p in TORCH_NORMS)
    if layout in TORCH_RIGHT:
        assert ok, {p: rows[(layout, p)] for p in TORCH_NORMS}
    else:
        assert not ok, f"torch's function passed every norm type on {layout}"


# ----------------------------------------------------------------------------- plain python


def test_unknown_layout_is_an_error_that_lists_the_valid_names():
    out = verify("--layouts", "PP", timeout=60)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "unknown layout(s): 'PP'" in out.stderr and "'PP x FSDP'" in out.stderr, out.stderr
    assert "checks passed" not in out.stdout
    listed = verify("--list", timeout=60)
    assert listed.returncode == 0 and "PP x FSDP" in listed.stdout and "FSDP1 LoRA" in listed.stdout, listed.stdout
    assert [line[:24].rstrip() for line in listed.stdout.splitlines()] == list(LAYOUT_NAMES), listed.stdout  # registry order


def test_plain_python_starts_its_own_ranks_and_fails_cleanly():
    """No torchrun: `python -m distclip.verify` starts the ranks itself and says so; torch's own
    warnings stay hidden; a failure ends with the table, a summary and exit code 1, no traceback."""
    out = verify("--nproc", "2", "--layouts", "DDP", "FSDP1 LoRA", "TP + SP")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "starting 2 local ranks" in out.stdout
    assert "ALL PASS: 24/24" in out.stdout, out.stdout[-2000:]
    assert "Warning" not in out.stderr, out.stderr[-3000:]
    bad = verify("--nproc", "2", "--impl", "torch", "--layouts", "PP x FSDP", "DDP", "--norm-types", *TORCH_NORMS)
    assert bad.returncode == 1, bad.stdout[-3000:] + bad.stderr[-3000:]
    assert "FAILED:" in bad.stdout and "failing layouts: PP x FSDP" in bad.stdout, bad.stdout[-2000:]
    assert "Traceback" not in bad.stderr and "ChildFailedError" not in bad.stderr, bad.stderr[-3000:]
