"""The main job's own machinery (distclip.verify): outcomes agreed through the store even when a
rank stops reporting, and the layout selection."""

import pytest
import torch.distributed as dist

from harness import run_world


def _agreement_world(rank, world):
    from distclip import verify

    agree = verify.Agreement(dist.distributed_c10d._get_default_store(), rank, world, wait_s=3)
    first = agree(("ok", rank))
    if rank == world - 1:
        return first, "silent"  # this rank never reports the second round
    try:
        agree(("ok", rank))
    except verify.RanksLost as e:
        return first, str(e)
    return first, "no error"


def test_agreement_reports_a_rank_that_stops_reporting():
    results = run_world(_agreement_world, 3)
    assert all(first == [("ok", 0), ("ok", 1), ("ok", 2)] for first, _ in results), results
    assert all("rank(s) [2] did not report within 3 s" in message for _, message in results[:2]), results


def _one_rank_raises_world(rank, world):
    """A layout whose build raises on rank 1 before a collective the other ranks enter: they wait
    in it until the process group's timeout. The job reports the layout as a hang on every rank,
    rebuilds the process group and the next (real) layout passes on it."""
    import torch

    from distclip import verify

    def build_raising_on_rank_1(ctx):
        if ctx.rank == 1:
            raise ValueError("rank 1 gives up before the collective")
        dist.all_reduce(torch.ones(1))
        raise AssertionError("unreachable: rank 1 never joins")

    verify.SCENARIOS = (verify.Scenario("raises on rank 1", build_raising_on_rank_1, lambda w: True),) + verify.SCENARIOS
    verify.LAYOUT_NAMES = tuple(s.name for s in verify.SCENARIOS)
    ctx = verify.Ctx(rank, world, torch.device("cpu"), "distclip", timeout_s=5)
    lines = []
    rows = verify.run(ctx, ["raises on rank 1", "DDP"], (2.0, -2.0), progress=lines.append)
    return [(r.layout, r.norm_type, r.ok, r.detail) for r in rows], lines


def test_a_rank_that_raises_before_a_collective_fails_its_layout_not_the_job():
    results = run_world(_one_rank_raises_world, 3, pg_timeout_s=5, timeout=120)
    rows, lines = results[0]
    assert all(r == rows for r, _ in results), results  # the same outcome on every rank
    assert [(layout, ok) for layout, _, ok, _ in rows] == [("raises on rank 1", False)] * 2 + [("DDP", True)] * 2, rows
    detail = rows[0][3]
    assert "build failed: hang/timeout" in detail and "rank 1: ValueError: rank 1 gives up" in detail, detail
    assert "FAIL (hang/timeout)" in lines[0] and "DDP" in lines[1] and "PASS 2/2" in lines[1], lines


def test_layout_selection():
    from distclip import verify

    assert [s.name for s in verify.select(1, ["HSDP", "DDP"])] == ["DDP"]  # HSDP needs an even world
    assert len(verify.select(4)) == len(verify.SCENARIOS) == 18
    with pytest.raises(ValueError, match="valid names: DDP, "):
        verify.select(4, ["PP"])
