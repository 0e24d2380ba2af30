"""distclip's algorithm, top-down.

1. Validate every argument and discover the layout (``layout``, reused through a ``plan``), all
   locally. A rank that cannot (bad input) keeps its error and still takes part in the call's
   collectives, so every rank raises together and no gradient changes (``rank_errors``).
2. Layout discovery gives each local gradient the weight that makes each element of the full
   model count exactly once across the world.
3. Local math (``local_norms``): this rank's weighted partial, in float64.
4. Communication (``reduce``): one all-reduce of the partial with the agreement and failure flags,
   identical result on every rank (plus one per mesh group of ``Partial`` grads).
5. Scale every local gradient by ``min(1, max_norm / (total + 1e-6))`` with foreach kernels.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from distclip import agreement, rank_errors
from distclip.host_reads import host_reads_allowed
from distclip.layout import (
    DTensor,
    GroupLike,
    LocalLayout,
    LostMarks,
    ParamsLike,
    Stage,
    as_param_list,
    current_stage,
    is_partial_sum,
    local_grad_tensors,
)
from distclip.local_norms import coalesce, local_partial, scale_
from distclip.plan import PlanCache
from distclip.reduce import reduce_partial_grads, reduce_partials, reduce_partials_on_host, reduction_device

__all__ = ["clip_grad_norm_", "get_total_norm", "clip_grads_with_norm_", "clip_grad_value_"]

# Grads whose norm is returned as float64, as torch does (complex128's magnitudes are float64).
_FLOAT64 = (torch.float64, torch.complex128)

# Layout plans of the parameter lists seen recently (see ``plan``): the only state kept across
# calls, checked on every call and dropped with the parameters it names.
PLANS = PlanCache()


def _as_float(value: object, name: str) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        return float(value)
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, str)):
        raise TypeError(f"distclip: {name} must be a real number, got {type(value).__name__}")
    try:
        return float(value)
    except ValueError:
        raise TypeError(f"distclip: {name} must be a real number, got {value!r}") from None


def _check_norm_type(norm_type: object) -> float:
    p = _as_float(norm_type, "norm_type")
    if math.isnan(p):
        raise ValueError("distclip: norm_type must not be NaN")
    return p


def _check_max_norm(max_norm: object) -> float:
    value = _as_float(max_norm, "max_norm")
    if math.isnan(value) or value < 0:
        raise ValueError(f"distclip: max_norm must be a non-negative number, got {value}")
    return value


@dataclass
class Call:
    """One call as this rank sees it, or the error that keeps this rank from computing a norm.

    A rank with an ``error`` still takes part in every collective of the call (see
    ``rank_errors``), so the other ranks learn of it at once instead of waiting for the timeout.
    """

    fn: str
    norm_type: float
    max_norm: Optional[float]
    error_if_nonfinite: bool
    stage: Stage
    params: list[torch.Tensor]
    layout: Optional[LocalLayout] = None
    error: Optional[Exception] = None

    @property
    def signature(self) -> tuple:
        return agreement.call_signature(self.fn, self.norm_type, self.max_norm, self.error_if_nonfinite, self.stage)


def _prepare(
    fn: str, parameters: ParamsLike, norm_type: object, error_if_nonfinite: bool, pp_group: object, max_norm: object = None
) -> Call:
    """Steps 1 and 2: validate every argument and discover the layout, all locally.

    Without a process group the error is raised at once, as torch would. In a distributed job it
    is kept: raising here would leave the other ranks waiting in this call's collectives.
    """
    params: list[torch.Tensor] = []
    try:
        params, module = as_param_list(parameters)
        checked_max = _check_max_norm(max_norm) if fn == "clip_grad_norm_" else None
        p = _check_norm_type(norm_type)
        stage = current_stage(pp_group)
        LostMarks.raise_if_any()
        layout = PLANS.layout(params, module, stage)
        # adjacent views merged so each group needs few kernels (separate tensors skip the pass)
        layout.groups = {key: coalesce(ts) if _may_be_views(ts) else ts for key, ts in layout.groups.items()}
        return Call(fn, p, checked_max, bool(error_if_nonfinite), stage, params, layout)
    except Exception as error:
        if not (dist.is_available() and dist.is_initialized()):
            raise
        try:  # the reduction op the others most likely use, so the reduced flags stay meaningful
            p = float(norm_type)  # type: ignore[arg-type]
        except Exception:
            p = 2.0
        stage = Stage(True, dist.get_world_size())
        return Call(fn, p if math.isinf(p) else 2.0, None, bool(error_if_nonfinite), stage, params, error=error)


def _may_be_views(tensors: list[torch.Tensor]) -> bool:
    """Whether coalescing could merge anything: grads that are views of one buffer (FSDP2, DDP
    buckets, FSDP1 orig params) come as neighbours sharing a base. Separate grads, even views of
    their own tensors (``DTensor.from_local`` keeps a view), skip the pass. Only speed depends on
    this answer."""
    for a, b in ((0, 1), (-2, -1)):
        if len(tensors) > 1 and tensors[a]._base is not None and tensors[a]._base is tensors[b]._base:
            return True
    return False


def _norm_groups(layout: LocalLayout) -> dict:
    """The groups whose norms make the partial: the local grads, plus ``Partial`` grads made whole
    by one all-reduce per partial mesh group (issued by exactly the ranks of that mesh)."""
    if not layout.partial:
        return layout.groups
    groups = dict(layout.groups)
    for tensor, weight in reduce_partial_grads(layout.partial):
        groups.setdefault((tensor.device, tensor.dtype, weight), []).append(tensor)
    return groups


def _join_partial_reductions(params: list[torch.Tensor]) -> None:
    """A failed rank still issues the ``Partial``-grad collectives its mesh peers issue: which
    ones depends on the grads alone, so it can tell even when its other input is bad."""
    try:
        partial = [(p.grad, 0.0) for p in params if isinstance(p.grad, DTensor) and is_partial_sum(p.grad)]
        if partial:
            reduce_partial_grads(partial)
    except Exception:  # noqa: BLE001 - this rank raises its own error right after the main collective
        pass


def _scale_groups(layout: LocalLayout) -> dict:
    """Every local tensor to scale: a ``Partial`` grad is scaled summand by summand."""
    if not layout.partial:
        return layout.groups
    groups = dict(layout.groups)
    for grad, _ in layout.partial:
        local = grad._local_tensor  # DTensor internals, as in ``layout.local_layout``
        key = (local.device, local.dtype, None)
        groups[key] = groups.get(key, []) + [local]
    return groups


def _total_norm(call: Call, foreach: Optional[bool]) -> tuple[torch.Tensor, torch.dtype, Optional[torch.Tensor], Optional[float]]:
    """Steps 3 and 4: the total norm in float64 (identical on every rank), the dtype to return it
    in, and, where host reads are not allowed, a device-side flag set if the norm is poisoned
    (ranks disagreed or a rank failed: every grad must stay as it is), and the total as a float
    where it was read on the host (CPU)."""
    norm_type, stage, layout = call.norm_type, call.stage, call.layout
    if layout is not None:
        has_float64 = any(dtype in _FLOAT64 for _, dtype, _ in layout.groups) or any(
            g.dtype in _FLOAT64 for g, _ in layout.partial
        )
        groups = _norm_groups(layout)
    else:
        _join_partial_reductions(call.params)
        has_float64, groups = False, {}
    grad_device = next(iter(groups))[0] if groups else None
    device = reduction_device(stage) if stage.distributed else (grad_device or torch.device("cpu"))
    partial = local_partial(groups, norm_type, foreach, device)
    has_elements = any(t.numel() for tensors in groups.values() for t in tensors)  # stops at the first
    out_device = grad_device or device
    use_max = math.isinf(norm_type)
    sig = agreement.Signature(call.signature, layout.kinds if layout is not None else frozenset({("failed",)}), stage)
    if host_reads_allowed(device):  # every rank reads the same reduced values: they act together
        riders = [*agreement.slots(sig, use_max), float(has_float64), float(call.error is not None)] if stage.distributed else []
        total_value, values = reduce_partials_on_host(partial, has_elements, norm_type, stage, riders)
        if stage.distributed:
            if values[-1] > 0:
                rank_errors.raise_everywhere(call.error, device)
            if agreement.mismatch_values(values[:-2], sig, use_max):
                agreement.raise_mismatch(sig)
            has_float64 = values[-2] > 0  # any rank's float64 grad: every rank returns the same dtype
        total = torch.tensor(total_value, dtype=torch.float64, device=out_device)
        if call.error_if_nonfinite:
            _raise_if_nonfinite(call, total, torch.tensor(has_float64))
        return total, torch.float64 if has_float64 else torch.float32, None, total_value
    if not stage.distributed:
        total = reduce_partials(partial, has_elements, norm_type, stage)[0]
        out_dtype = torch.float64 if has_float64 else torch.float32
        _raise_if_nonfinite(call, total, torch.tensor(has_float64))
        return total, out_dtype, None, None
    # Accelerators: no host sync. A failure or disagreement poisons the norm and leaves the grads
    # alone; every decision that must agree is taken from the float64 total, identical on every rank.
    riders = [*agreement.slots(sig, use_max), float(has_float64), float(call.error is not None)]
    total, reduced = reduce_partials(partial, has_elements, norm_type, stage, riders)
    if call.error is not None:  # after the collective, which the others wait for
        raise call.error
    failed, has64 = reduced[-1] > 0, reduced[-2] > 0
    disagreed = agreement.mismatch(reduced[:-2], sig, use_max)
    poisoned = failed | disagreed
    total = torch.where(poisoned, math.nan, total)
    # The dtype follows this rank's own grads (agreeing would be a host sync).
    out_dtype = torch.float64 if has_float64 else torch.float32
    if call.error_if_nonfinite and not bool(torch.isfinite(total)):
        if bool(failed):
            raise rank_errors.RankInputError(
                "distclip: another rank could not take part (bad input there), so no norm was computed and no "
                "gradient was changed; that rank raised its own error (details are not gathered on accelerators)"
            )
        if bool(disagreed):
            agreement.raise_mismatch(sig)
    _raise_if_nonfinite(call, total, has64)
    return total.to(out_device), out_dtype, poisoned, None


def _raise_if_nonfinite(call: Call, total: torch.Tensor, has64: torch.Tensor) -> None:
    """``error_if_nonfinite``: the verdict on the norm as returned (float32 unless some rank holds
    float64 grads), computed from values identical on every rank, so every rank raises together.
    A host sync, as in torch."""
    if not call.error_if_nonfinite:
        return
    finite = torch.where(has64.to(total.device), torch.isfinite(total), torch.isfinite(total.float()))
    if not bool(finite):
        raise RuntimeError(
            f"The total norm of order {call.norm_type} for gradients from `parameters` is non-finite, so it "
            "cannot be clipped. To disable this error and scale the gradients by the non-finite norm "
            "anyway, set `error_if_nonfinite=False`"
        )


@torch.no_grad()
def get_total_norm(
    parameters: ParamsLike,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: Optional[bool] = None,
    *,
    pp_group: Optional[GroupLike] = None,
) -> torch.Tensor:
    r"""Compute the norm of the full, unsharded gradients of ``parameters``, whatever their layout.

    The result equals ``torch.nn.utils.get_total_norm`` run on one process over the full
    gradients, and is bit-identical on every rank. Every rank must call it (one all-reduce).

    Args:
        parameters (Tensor, Iterable[Tensor] or nn.Module): parameters whose ``.grad`` are
            measured; parameters without a grad are skipped. Pass the wrapped module for FSDP1.
        norm_type (float): p of the p-norm; ``inf``, ``-inf`` and ``0`` (non-zero count) allowed.
        error_if_nonfinite (bool): raise on every rank if the total norm is nan or inf.
        foreach (bool, optional): use foreach kernels (default: when available).
        pp_group (ProcessGroup or DeviceMesh, optional): the ranks holding the other pipeline
            stages of this rank's model replica; partials are summed across it.

    Returns:
        Total norm as a plain tensor: float32 (float64 if a local grad is float64), on the
        gradients' device.
    """
    call = _prepare("get_total_norm", parameters, norm_type, error_if_nonfinite, pp_group)
    total, out_dtype, _, _ = _total_norm(call, foreach)
    return total.to(out_dtype)


@torch.no_grad()
def clip_grad_norm_(
    parameters: ParamsLike,
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: Optional[bool] = None,
    *,
    pp_group: Optional[GroupLike] = None,
) -> torch.Tensor:
    r"""Clip the gradient norm of ``parameters`` in place, correctly under any sharding.

    Drop-in for ``torch.nn.utils.clip_grad_norm_``: the norm is computed over the full,
    unsharded gradients (see :func:`get_total_norm`) and every local gradient is multiplied by
    the same ``min(1, max_norm / (total_norm + 1e-6))`` on every rank, without a host sync.

    Args:
        parameters (Tensor, Iterable[Tensor] or nn.Module): parameters whose grads are clipped.
        max_norm (float): max norm of the gradients (non-negative).
        norm_type (float): p of the p-norm; ``inf``, ``-inf`` and ``0`` allowed.
        error_if_nonfinite (bool): raise on every rank, before any grad is changed, if the total
            norm is nan or inf.
        foreach (bool, optional): use foreach kernels (default: when available).
        pp_group (ProcessGroup or DeviceMesh, optional): the pipeline-parallel group.

    Returns:
        Total norm of the gradients before clipping (a plain tensor, identical on every rank).
    """
    call = _prepare("clip_grad_norm_", parameters, norm_type, error_if_nonfinite, pp_group, max_norm)
    total, out_dtype, poisoned, total_value = _total_norm(call, foreach)
    assert call.layout is not None and call.max_norm is not None  # a failed call has raised
    if total_value is not None:  # read on the host (CPU): the same float64 arithmetic, in Python
        coef_value = call.max_norm / (total_value + 1e-6)
        if coef_value > 1.0:  # not min(): a NaN coefficient must stay NaN, as clamp keeps it
            coef_value = 1.0
        if coef_value != 1.0:  # multiplying by exactly 1.0 changes nothing (~1 us per tensor)
            scale_(_scale_groups(call.layout), torch.tensor(coef_value, dtype=torch.float64), foreach)
        return total.to(out_dtype)
    # From the float64 total, identical on every rank: so is every coefficient, bit for bit.
    coef = (call.max_norm / (total + 1e-6)).clamp(max=1.0)
    if poisoned is not None:
        coef = torch.where(poisoned, 1.0, coef)
    # Multiplying by exactly 1.0 changes nothing; on CPU, where reading the coefficient is free,
    # that pass over every grad (~1 us per tensor) is skipped. Never on accelerators: a host sync.
    if not (host_reads_allowed(coef.device) and bool(coef == 1.0)):
        scale_(_scale_groups(call.layout), coef, foreach)
    return total.to(out_dtype)


@torch.no_grad()
def clip_grads_with_norm_(
    parameters: ParamsLike, max_norm: float, total_norm: torch.Tensor, foreach: Optional[bool] = None
) -> None:
    r"""Scale the gradients of ``parameters`` by ``min(1, max_norm / (total_norm + 1e-6))``.

    No communication (unless ``total_norm`` is a DTensor, which is made whole first) and no
    layout checks: ``total_norm`` (e.g. from :func:`get_total_norm`) must be the same on every
    rank for the clipped model to stay consistent.

    Args:
        parameters (Tensor, Iterable[Tensor] or nn.Module): parameters whose grads are scaled.
        max_norm (float): max norm of the gradients.
        total_norm (Tensor): total norm of the gradients.
        foreach (bool, optional): use foreach kernels (default: when available).
    """
    max_norm = _check_max_norm(max_norm)
    if not isinstance(total_norm, torch.Tensor):
        total_norm = torch.tensor(_as_float(total_norm, "total_norm"))
    elif hasattr(total_norm, "full_tensor"):  # a DTensor norm, e.g. from torch's own function
        total_norm = total_norm.full_tensor()
    groups = {key: coalesce(tensors) for key, tensors in local_grad_tensors(parameters).items()}
    scale_(groups, (max_norm / (total_norm + 1e-6)).clamp(max=1.0), foreach)


@torch.no_grad()
def clip_grad_value_(parameters: ParamsLike, clip_value: float, foreach: Optional[bool] = None) -> None:
    r"""Clamp every gradient element of ``parameters`` to ``[-clip_value, clip_value]`` in place.

    Element-wise, so it needs no communication under any layout; local shards are clamped.

    Args:
        parameters (Tensor, Iterable[Tensor] or nn.Module): parameters whose grads are clamped.
        clip_value (float): maximum allowed absolute value of the gradients.
        foreach (bool, optional): use foreach kernels (default: when available).
    """
    clip_value = _as_float(clip_value, "clip_value")
    for tensors in local_grad_tensors(parameters).values():
        tensors = coalesce(tensors)
        if foreach is False:
            for t in tensors:
                t.clamp_(min=-clip_value, max=clip_value)
        elif tensors:
            torch._foreach_clamp_min_(tensors, -clip_value)
            torch._foreach_clamp_max_(tensors, clip_value)
