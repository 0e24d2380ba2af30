"""``python -m distclip.verify`` without torchrun: start the ranks on this machine."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time


def free_port() -> int:
    """A TCP port free on this machine now, for a job's ``MASTER_PORT``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(procs: list[subprocess.Popen]) -> None:
    """Terminate the processes still running, and kill those that do not exit within 10 s."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def launch_local(nproc: int, argv: list[str], timeout_s: float) -> int:
    """``python -m distclip.verify`` without torchrun: start ``nproc`` local ranks (this package,
    with RANK etc. set), wait for them, and return the job's exit code (no launcher traceback)."""
    if nproc < 1:
        print("distclip.verify: --nproc must be at least 1", file=sys.stderr)
        return 2
    shown = [a for i, a in enumerate(argv) if not (a == "--nproc" or a.startswith("--nproc=") or (i and argv[i - 1] == "--nproc"))]
    shown = [f"'{a}'" if " " in a else a for a in shown]
    print(f"distclip.verify: not launched by torchrun (RANK unset), starting {nproc} local ranks myself (--nproc); "
          f"same as: torchrun --standalone --nproc_per_node={nproc} -m distclip.verify {' '.join(shown)}".rstrip(), flush=True)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc)}
    env.setdefault("OMP_NUM_THREADS", "1")
    procs = [
        subprocess.Popen([sys.executable, "-m", "distclip.verify", *argv], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
        for r in range(nproc)
    ]
    grace = 2 * timeout_s + 60  # after one rank fails, how long the others may take to finish
    failed_at: float | None = None
    try:
        while any(p.poll() is None for p in procs):
            if failed_at is None and any(p.poll() not in (None, 0) for p in procs):
                failed_at = time.monotonic()
            if failed_at is not None and time.monotonic() - failed_at > grace:
                break
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        stop(procs)
    codes = [p.returncode for p in procs]
    if all(c == 0 for c in codes):
        return 0
    if codes[0] not in (0, 1):  # rank 0 did not get to print the summary
        print(f"distclip.verify: FAILED: rank exit codes {codes}", file=sys.stderr, flush=True)
    return codes[0] if codes[0] not in (0, None) else 1
