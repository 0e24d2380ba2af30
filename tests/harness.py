"""Run a function on N spawned CPU ranks in a gloo world and report every rank's failure.

    results = run_world(fn, world_size, *args)   # fn(rank, world_size, *args) -> picklable
    world = CaseWorld(fn, world_size, CASES)      # fn returns {case: [failure, ...]}: one test id per case

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
from typing import Any, Callable, Iterable


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


class CaseWorld:
    """One world run shared by the tests of its cases, each case reported under its own test id.

    ``fn(rank, world_size, *args)`` returns, on every rank, ``{case: [failure, ...]}`` (an empty
    list: the case passed on that rank) for exactly the names in ``cases``, or a list of records
    ``(case, ok, message)`` naming exactly ``cases``, in that order. The names are known at
    collection time, so a test parametrized over them reads its own case:

        @pytest.fixture(scope="module")
        def layouts_world():
            return CaseWorld(world_layouts, 4, CASES, timeout=540)

        @pytest.mark.parametrize("case", CASES)
        def test_case(layouts_world, case):
            layouts_world.check(case)

    The world runs once, on the first ``check``. A world that fails as a whole (a hang, a rank that
    raised), or a rank that reports other cases than ``cases`` (a case no test would read, or
    records in another order: the ranks ran different checks), fails every case, with the reason.
    """

    def __init__(self, fn: Callable, world_size: int, cases: Iterable[str], *args: Any, **run_kw: Any) -> None:
        self.fn, self.world_size, self.cases, self.args, self.run_kw = fn, world_size, tuple(cases), args, run_kw
        self._per_rank: list[dict[str, list[str]]] | None = None
        self._error = ""

    def _run(self) -> None:
        if self._per_rank is not None or self._error:
            return
        try:
            self._per_rank = run_world(self.fn, self.world_size, *self.args, **self.run_kw)
        except Exception as e:  # noqa: BLE001 - reported by every case of this world
            self._error = f"the {self.world_size}-rank world failed:\n{type(e).__name__}: {e}"
            return
        for rank, reported in enumerate(self._per_rank):
            if isinstance(reported, list):  # records: exactly the cases, in order
                names = tuple(name for name, _, _ in reported)
                if names != self.cases:
                    self._error = f"rank {rank} recorded {list(names)}, expected {list(self.cases)}"
                    return
                self._per_rank[rank] = {name: [] if ok else [message] for name, ok, message in reported}
            elif not isinstance(reported, dict) or set(reported) != set(self.cases):
                got = sorted(reported) if isinstance(reported, dict) else type(reported).__name__
                self._error = f"rank {rank} reported cases {got}, expected {sorted(self.cases)}"
                return

    def failures(self, case: str) -> list[str]:
        """``case``'s failures on every rank, each prefixed by its rank (runs the world first)."""
        assert case in self.cases, f"{case!r} is not a case of this world"
        self._run()
        if self._error:
            import pytest

            pytest.fail(self._error, pytrace=False)
        assert self._per_rank is not None
        return [f"rank {rank}: {message}" for rank, reported in enumerate(self._per_rank) for message in reported[case]]

    def check(self, case: str, shown: int = 40) -> None:
        """Fail with ``case``'s failures on any rank (the first ``shown``)."""
        failures = self.failures(case)
        assert not failures, f"{case}: {len(failures)} failure(s):\n" + "\n".join(failures[:shown])
