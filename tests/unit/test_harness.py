"""The harness's per-case report of a shared world (``CaseWorld``): a failing case fails its own
test only, and a world that reports other cases than its tests read fails every one of them. The
world is simulated in-process (``run_world`` replaced): no ranks are spawned."""

from __future__ import annotations

import pytest

import harness
from harness import CaseWorld

CASES = ("a", "b")


def _in_process(fn, world_size, *args, **kwargs):
    return [fn(rank, world_size, *args) for rank in range(world_size)]


@pytest.fixture(autouse=True)
def no_spawn(monkeypatch):
    monkeypatch.setattr(harness, "run_world", _in_process)


def _dict_world(rank, world, failing_rank):
    return {"a": [], "b": ["b broke"] if rank == failing_rank else []}


def _records_world(rank, world, order):
    return [(name, name != "b" or rank == 0, f"{name} message") for name in order]


def test_a_failing_case_fails_only_its_own_test():
    world = CaseWorld(_dict_world, 3, CASES, 2)
    world.check("a")
    assert world.failures("b") == ["rank 2: b broke"]
    with pytest.raises(AssertionError, match="rank 2: b broke"):
        world.check("b")


def test_records_are_read_per_case():
    world = CaseWorld(_records_world, 2, CASES, CASES)
    world.check("a")
    assert world.failures("b") == ["rank 1: b message"]


@pytest.mark.parametrize("reported", [("a",), ("a", "b", "c"), ("b", "a")], ids=["missing", "extra", "reordered"])
def test_other_records_than_the_tests_read_fail_every_case(reported):
    world = CaseWorld(_records_world, 2, CASES, reported)
    for case in CASES:
        with pytest.raises(pytest.fail.Exception, match="recorded"):
            world.failures(case)


def test_a_world_that_fails_as_a_whole_fails_every_case(monkeypatch):
    def broken(*args, **kwargs):
        raise AssertionError("1 of 2 ranks failed: boom")

    monkeypatch.setattr(harness, "run_world", broken)
    world = CaseWorld(_dict_world, 2, CASES, 0)
    for case in CASES:
        with pytest.raises(pytest.fail.Exception, match="boom"):
            world.check(case)


def test_a_case_no_test_declared_is_refused():
    world = CaseWorld(_dict_world, 2, ("a",), 0)
    with pytest.raises(pytest.fail.Exception, match="reported cases"):
        world.check("a")
    with pytest.raises(AssertionError, match="not a case"):
        world.check("b")
