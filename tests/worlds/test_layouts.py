"""Hand-built layouts (``worlds.CASES``) x norm types in real gloo worlds of 1, 2 and 4 ranks.

Each world runs once (on the first test that needs it) and checks every layout it allows; one test
per (world size, layout, norm type) then reads its record from every rank, and one per world check
(non-finite grads, bad input, a rank without parameters)."""

from __future__ import annotations

import pytest

from harness import run_world
from worlds import CASES, NORMS, WORLD_CHECKS, record_name, run_cases

WORLD_SIZES = (1, 2, 4)


@pytest.fixture(scope="module")
def world():
    """``world(n)``: every rank's records from the one run of the n-rank world. A world that
    fails as a whole (a hang, a rank that raised) fails every test that reads it, with its error."""
    runs: dict[int, tuple[list | None, str]] = {}

    def get(world_size: int) -> list[list[tuple[str, bool, str]]]:
        if world_size not in runs:
            try:
                runs[world_size] = (run_world(run_cases, world_size), "")
            except Exception as e:  # noqa: BLE001 - reported by every test of this world
                runs[world_size] = (None, f"{type(e).__name__}: {e}")
        per_rank, error = runs[world_size]
        if per_rank is None:
            pytest.fail(f"the {world_size}-rank world failed:\n{error}", pytrace=False)
        return per_rank

    return get


def _failures(per_rank: list[list[tuple[str, bool, str]]], wanted) -> tuple[int, list[str]]:
    """(records found on rank 0, failures on any rank) among the records ``wanted(name)`` picks."""
    found, failures = 0, []
    for rank, records in enumerate(per_rank):
        mine = [(name, ok, msg) for name, ok, msg in records if wanted(name)]
        if rank == 0:
            found = len(mine)
        failures += [f"rank {rank}: {name}: {msg}" for name, ok, msg in mine if not ok]
    return found, failures


LAYOUT_IDS = [
    pytest.param(w, case.name, p, id=f"{w}ranks-{case.name}-p{p:g}")
    for w in WORLD_SIZES for case in CASES if case.allowed(w) for p in NORMS
]


@pytest.mark.parametrize(("world_size", "layout", "norm_type"), LAYOUT_IDS)
def test_layout_matches_single_process_reference(world, world_size, layout, norm_type):
    """The norm against the float64 reference, the clipped grads, one collective per call, the
    same result on every rank (worlds.check_layout)."""
    name = record_name(layout, norm_type)
    per_rank = world(world_size)
    counts = [sum(n == name for n, _, _ in records) for records in per_rank]
    assert counts == [1] * world_size, f"{name}: records per rank {counts}"
    _, failures = _failures(per_rank, lambda n: n == name)
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize(("world_size", "check", "expected"),
                         [pytest.param(w, c, n, id=f"{w}ranks-{c}") for w in WORLD_SIZES for c, _, n in WORLD_CHECKS])
def test_world_check(world, world_size, check, expected):
    found, failures = _failures(world(world_size), lambda n: n.startswith(f"{check}: "))
    assert found == expected, f"{check}: {found} records (expected {expected})"
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("world_size", WORLD_SIZES, ids=lambda w: f"{w}ranks")
def test_every_rank_ran_the_same_checks(world, world_size):
    """A rank that skipped a check would have hung the world; the records are exactly the
    registry's layouts allowed at this size x NORMS, then the world checks."""
    per_rank = world(world_size)
    names = [name for name, _, _ in per_rank[0]]
    assert all([name for name, _, _ in records] == names for records in per_rank), "ranks ran different checks"
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    expected = [record_name(c.name, p) for c in CASES if c.allowed(world_size) for p in NORMS]
    assert names[:len(expected)] == expected
    assert [n.split(": ")[0] for n in names[len(expected):]] == [c for c, _, n in WORLD_CHECKS for _ in range(n)]
    assert len(names) > 50
