"""distclip's algorithm, top-down.

1. Validate every argument (the same on every rank, so every rank raises the same error before
   any collective and before any gradient is touched).
2. Layout discovery (``layout``): each local gradient and the weight that makes each element of
   the full model count exactly once across the world.
3. Local math (``local_norms``): this rank's weighted partial, in float64.
4. Communication (``reduce``): one all-reduce of the partial, identical result on every rank.
5. Scale every local gradient by ``min(1, max_norm / (total + 1e-6))`` with foreach kernels.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

from distclip import agreement
from distclip.layout import LocalLayout, ParamsLike, Stage, as_param_list, current_stage, local_grad_tensors, local_layout
from distclip.local_norms import coalesce, local_partial, scale_
from distclip.reduce import reduce_partial_grads, reduce_partials, reduction_device

__all__ = ["clip_grad_norm_", "get_total_norm", "clip_grads_with_norm_", "clip_grad_value_"]

# Grads whose norm is returned as float64, as torch does (complex128's magnitudes are float64).
_FLOAT64 = (torch.float64, torch.complex128)


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


def _local_layout(parameters: ParamsLike, stage: Stage) -> LocalLayout:
    """Layout discovery, then adjacent views merged so each group needs few kernels."""
    params, module = as_param_list(parameters)
    layout = local_layout(params, module, stage)
    layout.groups = {key: coalesce(tensors) for key, tensors in layout.groups.items()}
    return layout


def _norm_groups(layout: LocalLayout) -> dict:
    """The groups whose norms make the partial: the local grads, plus ``Partial`` grads made whole
    by one all-reduce per partial mesh group (issued by exactly the ranks of that mesh)."""
    if not layout.partial:
        return layout.groups
    groups = dict(layout.groups)
    for tensor, weight in reduce_partial_grads(layout.partial):
        groups.setdefault((tensor.device, tensor.dtype, weight), []).append(tensor)
    return groups


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


def _total_norm(
    layout: LocalLayout, norm_type: float, error_if_nonfinite: bool, foreach: Optional[bool], stage: Stage, call: tuple
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The total norm, and (on accelerators) a device-side flag set if the ranks disagreed."""
    has_float64 = any(dtype in _FLOAT64 for _, dtype, _ in layout.groups) or any(
        g.dtype in _FLOAT64 for g, _ in layout.partial
    )
    groups = _norm_groups(layout)
    grad_device = next(iter(groups))[0] if groups else None
    device = reduction_device(stage) if stage.distributed else (grad_device or torch.device("cpu"))
    partial = local_partial(groups, norm_type, foreach, device)
    has_elements = any(tensors for tensors in groups.values())  # coalesce dropped empty tensors
    use_max = math.isinf(norm_type)
    sig = agreement.Signature(call, layout.kinds, stage) if stage.distributed else None
    riders = (agreement.slots(sig, use_max) if sig else []) + [float(has_float64)]
    total, reduced = reduce_partials(partial, has_elements, norm_type, stage, riders)
    disagreed = None
    if sig is not None:
        disagreed = agreement.mismatch(reduced[:-1], sig, use_max)
        if device.type == "cpu":
            if bool(disagreed):  # reading a CPU tensor is free; every rank sees the same value
                agreement.raise_mismatch(sig)
            disagreed = None
            # float64 if any rank holds a float64 grad (an fp64 expert on one rank, say), so every
            # rank returns the same dtype. On accelerators reading this would be a host sync, so
            # there the dtype follows this rank's own grads.
            has_float64 = bool(reduced[-1] > 0)
        else:  # no host sync: a disagreement poisons the norm and leaves the grads alone
            total = torch.where(disagreed, math.nan, total)
    out_dtype = torch.float64 if has_float64 else torch.float32
    # The returned value is the same on every rank (on CPU its dtype is agreed too), so every rank
    # raises together. A host sync, as in torch.
    if error_if_nonfinite and not bool(torch.isfinite(total.to(out_dtype))):
        if disagreed is not None and bool(disagreed):
            agreement.raise_mismatch(sig)
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, so it "
            "cannot be clipped. To disable this error and scale the gradients by the non-finite norm "
            "anyway, set `error_if_nonfinite=False`"
        )
    return total.to(device=grad_device or device, dtype=out_dtype), disagreed


@torch.no_grad()
def get_total_norm(
    parameters: ParamsLike,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: Optional[bool] = None,
    *,
    pp_group: object = None,
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
    p = _check_norm_type(norm_type)
    stage = current_stage(pp_group)
    call = agreement.call_signature("get_total_norm", p, None, error_if_nonfinite, stage)
    return _total_norm(_local_layout(parameters, stage), p, error_if_nonfinite, foreach, stage, call)[0]


@torch.no_grad()
def clip_grad_norm_(
    parameters: ParamsLike,
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: Optional[bool] = None,
    *,
    pp_group: object = None,
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
    max_norm = _check_max_norm(max_norm)
    p = _check_norm_type(norm_type)
    stage = current_stage(pp_group)
    layout = _local_layout(parameters, stage)
    call = agreement.call_signature("clip_grad_norm_", p, max_norm, error_if_nonfinite, stage)
    total, disagreed = _total_norm(layout, p, error_if_nonfinite, foreach, stage, call)
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    if disagreed is not None:
        coef = torch.where(disagreed.to(coef.device), 1.0, coef)
    scale_(_scale_groups(layout), coef, foreach)
    return total


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
