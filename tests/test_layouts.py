"""Hand-built layouts x norm types in real gloo worlds of 1, 2 and 4 ranks (one world each)."""

import pytest

from harness import run_world
from worlds import run_cases


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_layouts_match_single_process_reference(world_size):
    per_rank = run_world(run_cases, world_size)
    failures = [f"rank {r}: {name}: {msg}" for r, records in enumerate(per_rank) for name, ok, msg in records if not ok]
    assert not failures, "\n".join(failures)
    # Every rank ran the same checks (a rank that skipped one would have hung the world).
    assert len({tuple(name for name, _, _ in records) for records in per_rank}) == 1
    assert len(per_rank[0]) > 50
