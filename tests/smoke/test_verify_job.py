"""The main job's own machinery (distclip.verify): outcomes agreed through the store even when a
rank stops reporting, the layout registry and its selection, and the package's import order."""

from __future__ import annotations

import ast
import pathlib

import pytest
import torch.distributed as dist

from harness import run_world

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "distclip"
# distclip.verify's modules, each importing only those before it
VERIFY_ORDER = ("models", "reference", "context", "layouts", "scenarios", "runner", "report", "launch", "cli", "__main__")


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

    registry = (verify.Scenario("raises on rank 1", build_raising_on_rank_1, lambda w: True),) + verify.SCENARIOS
    ctx = verify.Ctx(rank, world, torch.device("cpu"), "distclip", timeout_s=5)
    lines = []
    rows = verify.run(ctx, ["raises on rank 1", "DDP"], (2.0, -2.0), progress=lines.append, scenarios=registry)
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
    assert len(verify.select(4)) == len(verify.SCENARIOS) == 20
    with pytest.raises(ValueError, match="valid names: DDP, "):
        verify.select(4, ["PP"])
    assert [s.name for s in verify.select(4, tags=["pipeline", "fsdp2"])] == ["PP x FSDP", "tied embed PP x FSDP2"]
    assert [s.name for s in verify.select(1, tags=["pipeline"])] == []  # pipelines need two stages
    assert [s.name for s in verify.select(4, ["DDP", "TP + SP"], tags=["tp"])] == ["TP + SP"]
    with pytest.raises(ValueError, match="unknown tag"):
        verify.select(4, tags=["fsdp3"])
    mine = (verify.Scenario("mine", verify.build_ddp, lambda w: w == 3),)
    assert verify.select(3, scenarios=mine) == list(mine) and verify.select(4, scenarios=mine) == []
    with pytest.raises(ValueError, match="valid names: mine$"):
        verify.select(3, ["DDP"], scenarios=mine)


def test_registry():
    """One line per layout: unique names, a builder each, tags from the vocabulary; the names the
    tests and the table parser use are the registry's, in its order."""
    from distclip import verify
    from distclip.verify import LAYOUT_NAMES, scenarios

    assert LAYOUT_NAMES == tuple(s.name for s in verify.SCENARIOS) == scenarios.LAYOUT_NAMES
    assert len(set(LAYOUT_NAMES)) == len(LAYOUT_NAMES) and all(0 < len(n) <= 24 for n in LAYOUT_NAMES)  # the table's column
    assert len({s.build for s in verify.SCENARIOS}) == len(verify.SCENARIOS)  # a builder per layout
    for s in verify.SCENARIOS:
        assert s.tags and set(s.tags) <= set(verify.TAGS) and len(set(s.tags)) == len(s.tags), (s.name, s.tags)
    used = {t for s in verify.SCENARIOS for t in s.tags}
    assert used == set(verify.TAGS), set(verify.TAGS) - used  # no tag without a layout
    at = {w: {s.name for s in verify.select(w)} for w in (1, 2, 3, 4)}
    assert at[4] == set(LAYOUT_NAMES) and at[2] == at[4]
    assert at[1] == at[3] | {"TP + SP", "TP + SP, order by rank"} and "HSDP" not in at[1] and "TP + SP" not in at[3]


def _imports(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_verify_package_imports_downward():
    """distclip never imports distclip.verify; inside it, a module imports only modules before it
    in VERIFY_ORDER (so no cycle), and __init__ only re-exports."""
    for path in PACKAGE.rglob("*.py"):
        if "verify" not in path.relative_to(PACKAGE).parts:
            assert not any(n.startswith("distclip.verify") for n in _imports(path)), path
    modules = {p.stem for p in (PACKAGE / "verify").glob("*.py")}
    assert modules == set(VERIFY_ORDER) | {"__init__"}, modules
    for i, name in enumerate(VERIFY_ORDER):
        used = {n.split(".")[2] for n in _imports(PACKAGE / "verify" / f"{name}.py") if n.startswith("distclip.verify.")}
        assert used <= set(VERIFY_ORDER[:i]), f"distclip.verify.{name} imports {sorted(used - set(VERIFY_ORDER[:i]))}"


def test_package_keeps_the_names_tests_import():
    import distclip.verify as verify

    for name in ("Agreement", "Built", "Ctx", "LAYOUT_NAMES", "NORM_TYPES", "RanksLost", "SCENARIOS", "Scenario",
                 "quiet_torch_warnings", "world_full", "batch", "build_2d", "build_ddp", "build_ep", "build_fsdp1",
                 "build_fsdp1_lora", "build_fsdp2", "build_pp_fsdp", "build_tied_pp", "build_tp_sp", "clean_name",
                 "loss_of", "main", "new_model", "plain_full", "reference_norm", "run", "select", "single_process_grads"):
        assert hasattr(verify, name), name
    assert set(verify.__all__) <= set(dir(verify))
