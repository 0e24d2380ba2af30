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


def test_single_node_launcher_takes_one_rank_per_gpu_else_four(tmp_path):
    """launch/single_node.sh: the GPUs nvidia-smi lists, else 4 (here with --list,
    which starts the ranks and prints the layouts once)."""
    import os
    import pathlib
    import subprocess
    import sys

    script = pathlib.Path(__file__).resolve().parents[2] / "launch" / "single_node.sh"
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: fake (UUID: a)'\necho 'GPU 1: fake (UUID: b)'\n")
    (fake / "nvidia-smi").chmod(0o755)
    python_bin = os.path.dirname(sys.executable)  # torchrun of this environment
    base = {k: v for k, v in os.environ.items() if k not in ("NPROC", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    cases = [({"PATH": f"{python_bin}:/usr/bin:/bin"}, "4 ranks"), ({"PATH": f"{fake}:{python_bin}:/usr/bin:/bin"}, "2 ranks")]
    for env, ranks in cases:
        out = subprocess.run(["bash", str(script), "--list"], check=False, capture_output=True, text=True, timeout=120,
                             env={**base, **env})
        assert out.returncode == 0, out.stderr[-2000:]
        assert f"launch/single_node.sh: {ranks}" in out.stderr, out.stderr[-2000:]
        assert out.stdout.count("FSDP1 LoRA ") == 1, out.stdout  # rank 0 prints the list once
