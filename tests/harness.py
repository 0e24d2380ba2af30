"""Run a function on N spawned CPU ranks in a gloo world and report every rank's failure.

    results = run_world(fn, world_size, *args)   # fn(rank, world_size, *args) -> picklable

``fn`` must be importable (module level). Every rank's exception is collected with its
traceback; a rank that neither returns nor raises within ``timeout`` is reported as hung.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import tempfile
import traceback
from datetime import timedelta
from typing import Any, Callable


def _child(fn: Callable, rank: int, world_size: int, store_path: str, results: mp.Queue, args: tuple, pg_timeout_s: float) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    ok = False
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size, timeout=timedelta(seconds=pg_timeout_s)
        )
        value = fn(rank, world_size, *args)
        results.put((rank, "ok", value))
        ok = True
    except BaseException:  # noqa: BLE001 - report everything, including SystemExit
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            try:
                if ok:  # the result is sent first: a failed rank's peers may never reach this barrier
                    # No rank tears gloo down while another still uses it (a gloo teardown race
                    # aborts a rank with "terminate called without an active exception").
                    dist.barrier()
                dist.destroy_process_group()
            except Exception:
                pass


def run_world(
    fn: Callable, world_size: int, *args: Any, timeout: float = 300, pg_timeout_s: float = 60, missing_ok: frozenset = frozenset()
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes; return the per-rank results.

    ``pg_timeout_s`` is the process group's timeout; ranks in ``missing_ok`` may die without a
    result (their entry is None).
    """
    ctx = mp.get_context("spawn")
    results: mp.Queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_child, args=(fn, r, world_size, store, results, args, pg_timeout_s)) for r in range(world_size)]
        for p in procs:
            p.start()
        outcomes: dict[int, tuple[str, Any]] = {}
        try:
            while len(outcomes) < world_size - len(missing_ok):
                rank, status, value = results.get(timeout=timeout)
                outcomes[rank] = (status, value)
        except queue.Empty:
            pass
        finally:
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
                    p.join()
    failures = []
    for rank in range(world_size):
        if rank in missing_ok and rank not in outcomes:
            continue
        status, value = outcomes.get(rank, ("hung", f"no result within {timeout}s (hang or crash)"))
        if status != "ok":
            failures.append(f"--- rank {rank} ({status}) ---\n{value}")
    if failures:
        raise AssertionError(f"{len(failures)} of {world_size} ranks failed:\n" + "\n".join(failures))
    return [outcomes[r][1] if r in outcomes else None for r in range(world_size)]
