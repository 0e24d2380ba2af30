"""The main job launched exactly as users launch it: with torchrun, and with plain `python -m`."""

import os
import subprocess
import sys
import time

TORCH_NORMS = ("1", "2", "inf")  # p = 0 differs by definition (torch counts non-zero tensors)


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(*args, nproc=4, timeout=600):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, env=_env())


def verify(*args, timeout=300):
    """`python -m distclip.verify ...` without torchrun (it starts its own ranks)."""
    env = {k: v for k, v in _env().items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    cmd = [sys.executable, "-m", "distclip.verify", *args]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, env=env)


def table_rows(stdout):
    """{(layout, norm): (passed, detail)} from the printed table."""
    from distclip.verify import LAYOUT_NAMES

    rows = {}
    for line in stdout.splitlines():
        # the longest name that fits ("tied embed PP x FSDP2" also starts with "tied embed PP ")
        layout = max((n for n in LAYOUT_NAMES if line.startswith(n + " ")), key=len, default=None)
        fields = line[24:].split() if layout else []
        if len(fields) >= 5 and fields[4] in ("PASS", "FAIL"):
            rows[(layout, fields[0])] = (fields[4] == "PASS", " ".join(fields[5:]))
    return rows


def test_main_job_passes_on_four_ranks():
    out = torchrun("-m", "distclip.verify")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    summary = [line for line in out.stdout.splitlines() if "checks passed" in line]
    assert summary and summary[-1].startswith("ALL PASS: 144/144"), out.stdout[-3000:]
    assert "(18 layouts x 8 norm types, world size 4, distclip)" in summary[-1]
    assert "FAIL" not in out.stdout.replace("FAILED", "")
    assert "[18/18] TP + SP" in out.stdout  # progress, per layout
    assert "UserWarning" not in out.stderr and "FutureWarning" not in out.stderr, out.stderr[-3000:]


def test_torch_baseline_on_four_ranks_terminates_with_its_failures():
    """The negative control at 4 ranks: torch's function raises on the empty FSDP2 shards of ranks
    2-3 only, inside its own collectives, so ranks 0-1 wait in torch's all-reduce. The job must
    report that as a hang/timeout (short process-group timeout), rebuild the process group, finish
    every other layout and exit non-zero in bounded time, instead of hanging until CI's timeout."""
    start = time.monotonic()
    out = torchrun("-m", "distclip.verify", "--impl", "torch", "--timeout", "10", "--norm-types", *TORCH_NORMS, timeout=400)
    elapsed = time.monotonic() - start
    assert out.returncode not in (0, None), out.stdout[-4000:] + out.stderr[-4000:]
    assert elapsed < 300, elapsed
    rows = table_rows(out.stdout)
    assert len(rows) == 18 * len(TORCH_NORMS), out.stdout[-4000:]
    layouts = {layout for layout, _ in rows}
    ok = {name: all(rows[(name, p)][0] for p in TORCH_NORMS) for name in layouts}
    assert ok["DDP"], out.stdout[-4000:]
    wrong = ["FSDP1 FULL_SHARD flat", "FSDP1 FULL_SHARD orig", "FSDP1 SHARD_GRAD_OP", "FSDP2", "TP + plain",
             "2D TP+FSDP", "FSDP1 over TP", "PP x FSDP", "EP uneven experts", "EP meta + assign", "tied embed PP",
             "tied embed PP x FSDP2", "FSDP1 LoRA", "TP + SP"]
    assert not any(ok[name] for name in wrong), ok
    assert "hang/timeout" in rows[("FSDP2", "inf")][1], rows[("FSDP2", "inf")]
    assert "empty tensor" in rows[("FSDP2", "inf")][1]
    summary = [line for line in out.stdout.splitlines() if "checks passed" in line]
    assert summary and summary[-1].startswith("FAILED:") and "world size 4, torch" in summary[-1], out.stdout[-2000:]


def test_unknown_layout_is_an_error_that_lists_the_valid_names():
    out = verify("--layouts", "PP", timeout=60)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "unknown layout(s): 'PP'" in out.stderr and "'PP x FSDP'" in out.stderr, out.stderr
    assert "checks passed" not in out.stdout
    listed = verify("--list", timeout=60)
    assert listed.returncode == 0 and "PP x FSDP" in listed.stdout and "FSDP1 LoRA" in listed.stdout, listed.stdout


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
