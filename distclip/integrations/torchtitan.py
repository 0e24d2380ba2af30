"""torchtitan's ``clip_grad_norm_`` signature, computed by distclip: swap one import::

    # from torchtitan.distributed.utils import clip_grad_norm_
    from distclip.integrations.torchtitan import clip_grad_norm_

    grad_norm = clip_grad_norm_(
        [p for m in model_parts for p in m.parameters()],
        max_norm, foreach=True, pp_mesh=parallel_dims.get_optional_mesh("pp"), ep_enabled=parallel_dims.ep_enabled,
    )

Same arguments, same return semantics as ``torchtitan.distributed.utils.clip_grad_norm_``
(torchtitan 0.3.0): the total norm of the whole model (all pipeline stages when ``pp_mesh`` is
given) as a plain, reduced tensor whose ``.item()`` is the same on every rank, and every gradient
scaled in place by ``min(1, max_norm / (norm + 1e-6))``. Differences:

- torchtitan stacks per-tensor norms, which raises ("All operands in aten.stack.default must
  have the same mesh") when parameters live on different meshes, e.g. tensor-parallel weights on
  the 2-D ``(dp, tp)`` mesh beside LayerNorms on the dp mesh only; distclip reads each gradient's
  placements and sums one partial per rank, so any mix of meshes and plain tensors works.
- ``ep_enabled`` is accepted and needs nothing: torchtitan splits expert parameters (meshes with
  an ``"ep"`` dimension) from dense ones because of that stacking; distclip counts expert
  DTensors by their placements like every other DTensor (tested against torchtitan's EP path).
  Experts held as plain tensors over an expert-parallel group need ``distclip.mark_sharded``.
- The result is float32 (float64 if a grad is float64) even for bf16 grads, where torchtitan
  returns the grads' dtype; it is identical on every rank.
- One all-reduce over the default process group per call (torchtitan: one per mesh plus one over
  ``pp_mesh``), so every rank must call it, as in torchtitan's training loop.

Guarded steps (``distclip.GradGuard``: adaptive threshold, agreed skipping of NaN/inf steps and
spikes): pass ``guard=`` and step through it::

    guard = distclip.GradGuard(job_config.training.max_norm, adaptive="zclip", skip_above=6.0)
    grad_norm = clip_grad_norm_(params, job_config.training.max_norm, foreach=True, pp_mesh=pp_mesh, guard=guard)
    guard.step(self.optimizers)        # instead of self.optimizers.step(): skipped on every rank when the guard says so

``guard.step`` takes torchtitan's ``OptimizersContainer`` (each fused optimizer gets the verdict as
its ``found_inf``: no host sync) and the guard's ``state_dict`` belongs in the checkpoint.

torchtitan's own ``Trainer`` (and its flux, forge, torchft and RL trainers) looks the function up
at every step as ``dist_utils.clip_grad_norm_`` on the module ``torchtitan.distributed.utils``, so
an import swap in your code does not reach it. :func:`install` points that module attribute (and
any torchtitan module that imported the function by name) at distclip's, until :func:`uninstall`::

    from distclip.integrations import torchtitan as distclip_titan

    distclip_titan.install()          # before trainer.train(); every rank
    trainer.train()                   # torchtitan's loop, its config's max_norm, clipped by distclip
    distclip_titan.uninstall()        # or: with distclip_titan.installed(): trainer.train()
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable, Iterator
from typing import Any

import torch

import distclip
from distclip._dtensor import DTensor
from distclip.guard import GradGuard

__all__ = ["clip_grad_norm_", "install", "installed", "uninstall"]


@torch.no_grad()
def clip_grad_norm_(
    parameters: torch.Tensor | Iterable[torch.Tensor],
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    pp_mesh: Any | None = None,
    ep_enabled: bool = False,
    *,
    group: Any | None = None,
    guard: GradGuard | None = None,
) -> torch.Tensor:
    """Clip the gradient norm of ``parameters``; a drop-in for torchtitan's ``clip_grad_norm_``.

    Args:
        parameters: an iterable of Tensors or a single Tensor whose gradients are clipped.
        max_norm (float): max norm of the gradients.
        norm_type (float): type of the used p-norm; ``inf`` allowed.
        error_if_nonfinite (bool): raise on every rank if the total norm is nan or inf.
        foreach (bool, optional): use foreach kernels (default: when available).
        pp_mesh (DeviceMesh, optional): the 1-D pipeline-parallel mesh; the norm is reduced across
            the pipeline stages.
        ep_enabled (bool): accepted for compatibility; expert DTensors need no special handling.
        group (ProcessGroup or DeviceMesh, optional): distclip's: the ranks that hold this model
            when it lives on part of the world (default: every rank).
        guard (distclip.GradGuard, optional): distclip's: clip with this guard (its policy
            decides the threshold and whether the step is skipped; ``max_norm`` and ``norm_type``
            must be the guard's), then call ``guard.step(optimizers)`` instead of
            ``optimizers.step()``. With ``error_if_nonfinite`` a non-finite norm raises on every
            rank (a host read) instead of skipping.

    Returns:
        Total norm of the parameter gradients (viewed as a single vector), a plain tensor.
    """
    if not isinstance(ep_enabled, bool):
        raise TypeError(f"distclip: ep_enabled must be a bool, got {type(ep_enabled).__name__}")
    # torchtitan materialises generators too (they are consumed once, then clipped)
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    if guard is None:
        total = distclip.clip_grad_norm_(params, max_norm, norm_type, error_if_nonfinite, foreach, pp_group=pp_mesh, group=group)
        # torchtitan's own function returns its DTensor norm made whole (``full_tensor()``): a plain tensor
        return total.to_local() if isinstance(total, DTensor) else total
    if float(norm_type) != guard.norm_type or float(max_norm) != guard.policy.cap:
        raise ValueError(f"distclip: max_norm={max_norm}, norm_type={norm_type} differ from the guard's ({guard.policy.cap}, "
                         f"{guard.norm_type}): build the GradGuard from the same config")
    out = guard.clip_(params, pp_group=pp_mesh, group=group)
    if error_if_nonfinite and not bool(torch.isfinite(out.total_norm)):  # the same value on every rank
        raise RuntimeError(f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, so it cannot be clipped")
    return out.total_norm


# While installed: (module, torchtitan's original function) for every attribute that was pointed
# at distclip's, so uninstall() puts back exactly what it found.
_PATCHED: list[tuple[Any, Any]] = []


def install() -> None:
    """Make torchtitan's own training loops clip with distclip: point
    ``torchtitan.distributed.utils.clip_grad_norm_`` (what ``torchtitan.trainer`` calls, as
    ``dist_utils.clip_grad_norm_``) and every loaded ``torchtitan`` module's ``clip_grad_norm_``
    that is torchtitan's function at :func:`clip_grad_norm_`. Call it on every rank before
    training; calling it again does nothing. The loop keeps its arguments (``max_norm`` from the
    config, ``pp_mesh``, ``ep_enabled``) and its ``optimizers.step()``; for a guard, call
    :func:`clip_grad_norm_` with ``guard=`` in your own loop instead."""
    if _PATCHED:
        return
    import torchtitan.distributed.utils as dist_utils

    original = dist_utils.clip_grad_norm_
    for name, module in list(sys.modules.items()):
        if (name == "torchtitan" or name.startswith("torchtitan.")) and getattr(module, "clip_grad_norm_", None) is original:
            _PATCHED.append((module, original))
            setattr(module, "clip_grad_norm_", clip_grad_norm_)  # noqa: B010 - any module object


def uninstall() -> None:
    """Put torchtitan's ``clip_grad_norm_`` back where :func:`install` replaced it."""
    while _PATCHED:
        module, original = _PATCHED.pop()
        module.clip_grad_norm_ = original


@contextlib.contextmanager
def installed() -> Iterator[None]:
    """:func:`install` for the duration of a ``with`` block, then :func:`uninstall`."""
    install()
    try:
        yield
    finally:
        uninstall()
