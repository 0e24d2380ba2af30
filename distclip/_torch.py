"""The one place distclip touches private torch names outside DTensor and FSDP1 (see ``_dtensor``
and ``_fsdp1`` for those): view bases, the default process group object, dense flattening, the
tags torch's wrappers put on parameters, whether the profiler is on, and dispatch below
autograd. If a torch release renames one, only this file changes.
"""

from __future__ import annotations

import contextlib
import operator
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

__all__ = [
    "base_of", "default_group_device", "flatten_dense_tensors", "WRAPPER_TAGS", "profiler_enabled", "phase", "default_store",
    "declares_amp_scaling_step", "below_autograd",
]

# ``Tensor._base``: the tensor a view was made from (None for a tensor that owns its storage)
base_of: Callable[[torch.Tensor], Optional[torch.Tensor]] = operator.attrgetter("_base")

# concatenate tensors into one flat buffer with a single copy kernel (what DDP's buckets use)
flatten_dense_tensors: Callable[[list[torch.Tensor]], torch.Tensor] = torch._utils._flatten_dense_tensors

# Set on a parameter by a wrapper that then replaces or flattens it: FSDP2's ``fully_shard``
# (``_fsdp_orig_uid``) and FSDP1 (``_fsdp_flattened``); a mark on such a parameter may be lost.
WRAPPER_TAGS = ("_fsdp_orig_uid", "_fsdp_flattened")


def default_group_device() -> Optional[Any]:
    """The device the default process group is bound to (``init_process_group(device_id=...)``),
    or None."""
    return getattr(dist.distributed_c10d._get_default_group(), "bound_device_id", None)


def profiler_enabled() -> bool:
    """Whether torch's profiler is recording."""
    return torch.autograd._profiler_enabled()


def phase(name: str) -> contextlib.AbstractContextManager:
    """``record_function("distclip.<name>")`` while the profiler records (the benchmarks' phase
    breakdown: layout, local_norms, reduce, scale), else a no-op that costs nothing measurable."""
    if torch.autograd._profiler_enabled():
        return torch.profiler.record_function(f"distclip.{name}")
    return contextlib.nullcontext()


def below_autograd() -> Any:
    """Dispatch below autograd and view tracking for the block: each op on tensors no graph
    records skips that bookkeeping (a view made there has no ``_base``). Only around reads and
    temporaries: a write there to a tensor the caller holds would not move its version counter."""
    return torch._C._AutoDispatchBelowADInplaceOrView()


def default_store() -> Any:
    """The default process group's key-value store (``distclip.verify`` exchanges outcomes
    through it, so a rank that hangs in a collective cannot block the others' reports)."""
    return dist.distributed_c10d._get_default_store()


def declares_amp_scaling_step(optimizer: Any) -> bool:
    """Whether an optimizer says its ``step`` honours ``found_inf``/``grad_scale`` as ``GradScaler``
    sets them (torch's ``_step_supports_amp_scaling`` flag)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))
