"""The clipping methods timed side by side (the columns of bench_clip's table).

``distclip`` and ``torch`` are the libraries' public functions; ``minimal`` is the least code that
is right for one layout (each workload names its own, see ``workloads.LAYOUTS``); ``hand_rolled``
is what people write by hand (right only when fully sharded); ``roofline`` touches the same bytes
with no per-tensor work and no collective.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist

import distclip
from benchmarks import report
from benchmarks.workload_records import Workload

METHOD_ORDER = report.METHOD_ORDER
DEFAULT_METHODS = ["distclip", "torch", "torchtitan", "fsdp1", "minimal", "hand_rolled", "roofline"]
CAPPED = ("torch", "torchtitan")  # skipped on DTensor layouts above --torch-max-params


@torch.no_grad()
def hand_rolled_clip(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """What people write by hand: local foreach norm, one all-reduce, foreach scale.

    Only correct when every element lives on exactly one rank (fully sharded); kept as a speed
    baseline on every layout."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in params if p.grad is not None]
    norms = torch._foreach_norm(grads, 2.0)
    total_sq = torch.stack(norms).double().pow(2).sum()
    dist.all_reduce(total_sq)
    total = total_sq.sqrt().float()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, coef)
    return total


# The least code that is right for one layout (the "minimal" column). Each knows its layout
# statically, as a hand-written training script would: local tensors -> one _foreach_norm per
# weight -> stack -> float64 sum of squares, weighted for the layout -> one all_reduce -> sqrt ->
# one _foreach_mul_ by min(1, max_norm / (total + 1e-6)).


def _sum_sq(local: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(torch._foreach_norm(local, 2.0)).double().square().sum()


def _finish(local: list[torch.Tensor], sum_sq: torch.Tensor, max_norm: float) -> torch.Tensor:
    dist.all_reduce(sum_sq)
    total = sum_sq.sqrt()
    torch._foreach_mul_(local, (max_norm / (total + 1e-6)).clamp(max=1.0))
    return total


@torch.no_grad()
def minimal_sharded(w: Workload, max_norm: float) -> torch.Tensor:
    """fsdp2 / dtensor_sep (Shard(0) over all ranks): every element lives on exactly one rank,
    so a plain SUM."""
    local = [p.grad._local_tensor for p in w.params if p.grad is not None]
    return _finish(local, _sum_sq(local), max_norm)


@torch.no_grad()
def minimal_flat(w: Workload, max_norm: float) -> torch.Tensor:
    """fsdp1: the flat parameters' grads are plain local shards already (zero padding)."""
    local = [p.grad for p in w.params if p.grad is not None]
    return _finish(local, _sum_sq(local), max_norm)


@torch.no_grad()
def minimal_replicated(w: Workload, max_norm: float) -> torch.Tensor:
    """ddp / plain_sep: identical replicas on every rank, each counted 1/world times."""
    local = [p.grad for p in w.params if p.grad is not None]
    return _finish(local, _sum_sq(local) / dist.get_world_size(), max_norm)


@torch.no_grad()
def minimal_tp_fsdp(w: Workload, max_norm: float) -> torch.Tensor:
    """tp_fsdp: matrices sharded over the whole (dp, tp) mesh count once; the 1-D params live on
    the dp submesh and are replicated over tp, so they count 1/tp."""
    full, dp_only = [], []
    for p in w.params:
        g = p.grad
        if g is not None:
            (full if g.device_mesh.ndim == 2 else dp_only).append(g._local_tensor)
    sum_sq = _sum_sq(full)
    if dp_only:
        sum_sq = sum_sq + _sum_sq(dp_only) / w.info["tp"]
    return _finish(full + dp_only, sum_sq, max_norm)


def load_torchtitan() -> tuple[Optional[Callable], str]:
    """torchtitan's clip (an optional benchmark dependency): (function, "") or (None, reason)."""
    try:
        from torchtitan.distributed.utils import clip_grad_norm_ as tt_clip
    except Exception as e:  # noqa: BLE001 - any import failure just drops the column
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    return tt_clip, ""


def make_methods(
    w: Workload, names: list[str], flat: torch.Tensor, max_norm: float, torchtitan: Optional[Callable] = None
) -> dict[str, Callable[[], object]]:
    """The methods to time on ``w``, each clipping to ``max_norm`` (1e20: coefficient exactly 1.0;
    or a fraction of the norm: coefficient < 1). ``flat``: the roofline's buffer."""
    target = w.target
    one = torch.ones((), device=flat.device, dtype=flat.dtype)
    minimal = w.minimal
    available: dict[str, Callable[[], object]] = {
        "distclip": lambda: distclip.clip_grad_norm_(target, max_norm),
        "torch": lambda: torch.nn.utils.clip_grad_norm_(w.params, max_norm),
        "hand_rolled": lambda: hand_rolled_clip(w.params, max_norm),
        # read every local grad byte once + read and write it once (same total bytes, one buffer)
        "roofline": lambda: (flat.sum(), flat.mul_(one)),
    }
    if minimal is not None:
        available["minimal"] = lambda: minimal(w, max_norm)
    if torchtitan is not None:
        available["torchtitan"] = lambda: torchtitan(w.params, max_norm, norm_type=2.0)
    if w.module is not None:
        module = w.module
        available["fsdp1"] = lambda: module.clip_grad_norm_(max_norm)

    def nograd() -> object:
        with torch.no_grad():
            return distclip.clip_grad_norm_(target, max_norm)

    available["distclip_nograd"] = nograd
    return {n: available[n] for n in names if n in available}
