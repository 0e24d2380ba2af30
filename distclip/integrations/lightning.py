"""Gradient-norm clipping for Lightning that is correct under every strategy.

    from distclip.integrations.lightning import GradientClipping

    trainer = Trainer(strategy=ModelParallelStrategy(...), callbacks=[GradientClipping(1.0)])

Lightning's own ``Trainer(gradient_clip_val=..., gradient_clip_algorithm="norm")`` calls
``torch.nn.utils.clip_grad_norm_`` on the optimizer's parameters: it raises under
``ModelParallelStrategy`` when parameters live on different meshes (a LayerNorm on the
data-parallel mesh beside tensor-parallel weights) and is refused under ``FSDPStrategy`` (FSDP1).
This callback clips the whole model with :func:`distclip.clip_grad_norm_` instead:

- in ``on_before_optimizer_step``, which Lightning calls after the AMP ``GradScaler`` has
  unscaled the gradients and only on the step that really steps (gradient accumulation is
  respected: one clip per optimizer step, over the accumulated gradients);
- over the strategy's wrapped model (the FSDP1 root, the DDP wrapper or the LightningModule), so
  FSDP1's sharding groups are found;
- logging the pre-clip norm as ``grad_norm`` (``log_norm=True``) when a logger is attached.

Do not also set ``Trainer(gradient_clip_val=...)``: that would clip twice, so :meth:`setup`
raises on every rank before any collective.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

import distclip
from distclip.layout import GroupLike

try:
    from lightning.pytorch import Callback, LightningModule, Trainer
except ImportError:  # the standalone ``pytorch_lightning`` package
    try:
        from pytorch_lightning import Callback, LightningModule, Trainer  # type: ignore[no-redef,assignment]
    except ImportError as e:
        raise ImportError(
            "distclip.integrations.lightning needs Lightning: pip install 'distclip[lightning]'"
        ) from e

__all__ = ["GradientClipping"]

# Strategies whose engine owns the gradients (partitioned, ``param.grad`` is None): they have
# their own clipping setting, so this callback refuses them rather than clip nothing.
_OWN_CLIPPING = {"DeepSpeedStrategy": "DeepSpeed's `gradient_clipping` config entry"}


class GradientClipping(Callback):
    """Clip the gradient norm of the whole model with distclip once per optimizer step.

    Args:
        max_norm (float): max norm of the gradients (non-negative).
        norm_type (float): p of the p-norm; ``inf`` allowed. Default ``2.0``.
        error_if_nonfinite (bool): raise on every rank if the norm is nan or inf.
        foreach (bool, optional): use foreach kernels (default: when available).
        pp_group (ProcessGroup or DeviceMesh, optional): the pipeline-parallel group, if the
            LightningModule holds one pipeline stage.
        group (ProcessGroup or DeviceMesh, optional): the ranks that hold this model, when it
            lives on part of the world (default: every rank).
        log_norm (bool): log the pre-clip norm as ``log_name`` through ``LightningModule.log``
            when the trainer has a logger. Default ``True``.
        log_name (str): the logged key. Default ``"grad_norm"``.
        log_group_norms (bool): also log the pre-clip norm of each parameter (or group) as
            ``{log_name}/{name}``, computed with ``distclip.grad_norms`` in the same single
            collective as the total.
        groups (callable, optional): ``parameter name -> group name`` (or ``None`` to leave it
            out) for ``log_group_norms``; default: one entry per parameter.

    After each clip, :attr:`last_norm` holds the norm (a plain tensor, identical on every rank).
    """

    def __init__(
        self,
        max_norm: float,
        norm_type: float = 2.0,
        error_if_nonfinite: bool = False,
        foreach: bool | None = None,
        *,
        pp_group: GroupLike | None = None,
        group: GroupLike | None = None,
        log_norm: bool = True,
        log_name: str = "grad_norm",
        log_group_norms: bool = False,
        groups: Callable[[str], str | None] | None = None,
    ) -> None:
        super().__init__()
        max_norm = float(max_norm)
        if math.isnan(max_norm) or max_norm < 0:
            raise ValueError(f"GradientClipping: max_norm must be a non-negative number, got {max_norm}")
        self.max_norm = max_norm
        self.norm_type = float(norm_type)
        self.error_if_nonfinite = error_if_nonfinite
        self.foreach = foreach
        self.pp_group = pp_group
        self.group = group
        self.log_norm = log_norm
        self.log_name = log_name
        self.log_group_norms = log_group_norms
        self.groups = groups
        self.last_norm: torch.Tensor | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # Runs on every rank with the same configuration, before any clipping collective, so
        # every rank raises the same error.
        if trainer.gradient_clip_val:
            raise ValueError(
                f"GradientClipping clips the gradients already; remove `Trainer(gradient_clip_val="
                f"{trainer.gradient_clip_val!r})` (it would clip a second time, with torch's function, "
                "which is wrong or refused under sharded strategies)"
            )
        strategy = type(trainer.strategy).__name__
        if strategy in _OWN_CLIPPING:
            raise ValueError(f"GradientClipping does not support {strategy}: use {_OWN_CLIPPING[strategy]}")

    def _clipped_module(self, trainer: Trainer, pl_module: LightningModule) -> nn.Module:
        """The outermost module holding the LightningModule's parameters: the FSDP1 root wrapper
        (whose own flat parameter lies outside the LightningModule), the DDP wrapper, or the
        LightningModule itself."""
        model = getattr(trainer.strategy, "model", None)
        return model if isinstance(model, nn.Module) else pl_module

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        # Also called for each `optimizer.step()` under manual optimization: the whole model is
        # clipped there too.
        module = self._clipped_module(trainer, pl_module)
        logging = self.log_norm and trainer.logger is not None  # the same on every rank
        per_name: Mapping[str, torch.Tensor] | None = None
        if logging and self.log_group_norms:
            # Every per-name norm and the total in one collective, then a communication-free clip.
            per_name = distclip.grad_norms(module, self.norm_type, groups=self.groups, pp_group=self.pp_group, group=self.group)
            norm = per_name["total"]
            if self.error_if_nonfinite and not bool(torch.isfinite(norm)):  # same value on every rank
                raise RuntimeError(
                    f"GradientClipping: the total norm of order {self.norm_type} of the gradients is non-finite"
                )
            distclip.clip_grads_with_norm_(module, self.max_norm, norm, self.foreach)
        else:
            norm = distclip.clip_grad_norm_(
                module, self.max_norm, self.norm_type, self.error_if_nonfinite, self.foreach, pp_group=self.pp_group, group=self.group
            )
        self.last_norm = norm
        if not logging:
            return
        # The norms are identical on every rank: no sync_dist needed.
        pl_module.log(self.log_name, norm, on_step=True, on_epoch=False, sync_dist=False)
        for name, value in (per_name or {}).items():
            if name != "total":
                pl_module.log(f"{self.log_name}/{name}", value, on_step=True, on_epoch=False, sync_dist=False)
