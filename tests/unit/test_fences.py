"""torch's private names appear only in the fence modules, so a torch upgrade touches only those:
``_dtensor.py`` (DTensor internals), ``_fsdp1.py`` (FSDP1 handles and flat parameters) and
``_torch.py`` (view bases, the default group and store, dense flattening, wrapper tags, the
profiler switch). A new use elsewhere fails here, naming the file and line."""

from __future__ import annotations

import pathlib
import re

import distclip

FENCES = {"_dtensor.py", "_fsdp1.py", "_torch.py"}
PRIVATE = re.compile(
    r"\._spec\b|\._local_tensor\b|_StridedShard|\._base\b|_get_default_group|_get_default_store|_flatten_dense_tensors|"
    r"_fsdp_orig_uid|_fsdp_flattened|distributed_c10d|_profiler_enabled|\._handle\b|_use_orig_params|_param_extensions|"
    r"_shard_param_infos|_is_flat_param|_all_handles|_shard_numel_padded|\._fqns\b|\._shapes\b|\._numels\b|_step_supports_amp_scaling"
)
ROOT = pathlib.Path(distclip.__file__).parent


def test_private_torch_names_only_in_the_fences():
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        if path.name in FENCES and path.parent == ROOT:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if PRIVATE.search(line.split("#", 1)[0]):
                found.append(f"{path.relative_to(ROOT.parent)}:{number}: {line.strip()}")
    assert not found, "private torch names outside the fence modules:\n" + "\n".join(found)


def test_the_pattern_finds_a_use():
    # the test above cannot pass by matching nothing
    assert PRIVATE.search("x = grad._local_tensor") and PRIVATE.search("g._spec.placements")
    assert any(PRIVATE.search(line) for line in (ROOT / "_dtensor.py").read_text().splitlines())
