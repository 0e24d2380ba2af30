"""distclip.verify's command line and table, without running a world: layout aliases, the
clipped-gradient column, the float64 label."""

from __future__ import annotations

import math

from distclip.verify.cli import alias, resolve_layouts
from distclip.verify.report import format_table
from distclip.verify.runner import Row
from distclip.verify.scenarios import LAYOUT_NAMES


def test_layouts_accept_any_case_and_aliases():
    assert resolve_layouts(["fsdp2", "ddp", "Tp + Sp", "two-models-group", "FSDP2"]) == (
        ["FSDP2", "DDP", "TP + SP", "two models, group="], [])
    assert resolve_layouts(["fsdp1-full-shard-flat", "2D tp+fsdp", "pp"]) == (["FSDP1 FULL_SHARD flat", "2D TP+FSDP"], ["pp"])
    aliases = [alias(n) for n in LAYOUT_NAMES]
    assert len(set(aliases)) == len(aliases)  # every alias names one layout
    assert resolve_layouts(aliases) == (list(LAYOUT_NAMES), [])


def test_table_shows_the_clipped_grad_check_and_the_float64_reference():
    rows = [
        Row("DDP", 2.0, 1.5, 1.5, 0.0, True),
        Row("FSDP2", 2.0, 1.5, 1.5, 0.0, False, "clipped grads differ from reference"),
        Row("FSDP2", 3.0, 1.5, 1.7, 0.13, False, "norm differs from reference"),
        Row("HSDP", 2.0, 1.5, 1.5, 0.0, False, "norm differs across ranks: [1.5, 1.6]"),
        Row("HSDP", 3.0, math.nan, math.nan, math.nan, False, "build failed: rank 1: ValueError"),
    ]
    lines = format_table(rows, 4, "distclip").splitlines()
    assert "float64 ref" in lines[0] and lines[0].split()[-2:] == ["pass", "grads"], lines[0]
    body = [line[24:].split()[5] for line in lines[2:7]]  # the column after PASS/FAIL
    assert body == ["ok", "DIFF", "-", "ok", "-"], lines
    assert [line[24:].split()[4] for line in lines[2:7]] == ["PASS", "FAIL", "FAIL", "FAIL", "FAIL"]  # where scripts read it
    assert any("in float64" in line for line in lines) and any(line.startswith("grads:") for line in lines)
    assert lines[-1].startswith("FAILED: 1/5 checks passed")
