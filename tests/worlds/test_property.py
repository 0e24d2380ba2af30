"""Randomized layouts (hypothesis) against the float64 single-process reference, in worlds of 1-4.

Hypothesis runs inside every rank with ``derandomize=True``, so all ranks draw the same models in
the same order; each example's verdict is all-gathered so every rank passes or fails together
(no shrinking: it would let ranks drift apart). The number of examples is fixed for CI and can be
raised with DISTCLIP_HYPOTHESIS_EXAMPLES.
"""

import math
import os

import pytest
import torch
import torch.distributed as dist
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard

import distclip
from harness import run_world
from worlds import Layout, check_layout, dparam, full_grad, pparam

EXAMPLES = int(os.environ.get("DISTCLIP_HYPOTHESIS_EXAMPLES", "30"))
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
LAYOUTS = ["plain", "shard_first", "shard_last", "replicate", "mark_sharded", "expert", "mesh_2d"]


def _build(spec, world, meshes):
    rank = dist.get_rank()
    params, fulls = [], []
    for i, (shape, layout, dtype, seed) in enumerate(spec):
        full = full_grad(tuple(shape), seed + 97 * i, DTYPES[dtype])
        fulls.append(full.double())
        if layout == "mesh_2d" and meshes[1] is None:
            layout = "shard_first"
        if layout == "plain":
            params.append(pparam(full))
        elif layout in ("shard_first", "shard_last"):
            params.append(dparam(full, meshes[0], [Shard(0 if layout == "shard_first" else len(shape) - 1)]))
        elif layout == "replicate":
            params.append(dparam(full, meshes[0], [Replicate()]))
        elif layout == "mesh_2d":
            placements = [Shard(0), Replicate()] if seed % 2 else [Replicate(), Shard(len(shape) - 1)]
            params.append(dparam(full, meshes[1], placements))
        elif layout == "mark_sharded":
            piece = full.tensor_split(world, dim=0)[rank].contiguous()
            params.append(distclip.mark_sharded(pparam(piece), dist.group.WORLD))
        elif layout == "expert" and seed % world == rank:  # held by one rank only
            params.append(distclip.mark_sharded(pparam(full), dist.group.WORLD))
    return Layout(params, fulls)


def _property_world(rank, world, examples):
    meshes = (init_device_mesh("cpu", (world,)), init_device_mesh("cpu", (2, world // 2)) if world % 2 == 0 else None)
    param = st.tuples(
        st.lists(st.integers(0, 6), min_size=1, max_size=3),  # shapes with empty and 1-element dims
        st.sampled_from(LAYOUTS),
        st.sampled_from(sorted(DTYPES)),
        st.integers(0, 10_000),
    )
    seen = []

    @settings(
        max_examples=examples, derandomize=True, deadline=None, database=None,
        suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate],
    )
    @given(st.lists(param, min_size=1, max_size=6), st.sampled_from([1.0, 2.0, 3.0, math.inf, -math.inf, 0.0, 0.5]))
    def prop(spec, norm_type):
        records = check_layout("random", _build(spec, world, meshes), norms=(norm_type,))
        failures = [r for r in records if not r[1]]
        everyone = [None] * world
        dist.all_gather_object(everyone, failures)
        seen.append(len(spec))
        assert not any(everyone), f"spec={spec} p={norm_type}: {everyone}"

    prop()
    return len(seen)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_random_layouts_match_reference(world_size):
    counts = run_world(_property_world, world_size, EXAMPLES)
    assert len(set(counts)) == 1 and counts[0] >= EXAMPLES // 2, counts
