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

With ``guard=distclip.GradGuard(...)`` the callback clips with the guard (adaptive threshold,
agreed step skipping, see ``distclip.guard``) and a skipped step leaves the parameters and the
optimizer state untouched on every rank: a fused optimizer (``fused=True``) without a GradScaler
gets the verdict as its ``found_inf`` (no host sync); otherwise (non-fused optimizers, 16-bit AMP
with a GradScaler) the verdict is read on the host (free on CPU) and, on a skipped step, the grads
the optimizer would apply are set to ``None`` for that step, so it updates nothing.

Do not also set ``Trainer(gradient_clip_val=...)``: that would clip twice, so :meth:`setup`
raises on every rank before any collective.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

import distclip
from distclip.clip import check_max_norm
from distclip.guard import GradGuard, GuardOutput, inner_optimizers, takes_found_inf
from distclip.layout.discovery import GroupLike

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
        max_norm (float, optional): max norm of the gradients (non-negative); required unless
            ``guard`` is given.
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
        guard (distclip.GradGuard, optional): clip with this guard instead (its ``max_norm``,
            ``norm_type``, policy and groups; pass neither ``max_norm`` nor ``norm_type``, nor
            ``error_if_nonfinite``). Logs ``{log_name}/threshold`` and ``{log_name}/skipped``
            besides the norm, and with ``log_group_norms`` the guard's group norms (the guard
            needs ``groups=``).

    After each clip, :attr:`last_norm` holds the norm (a plain tensor, identical on every rank)
    and, with a guard, :attr:`last_output` the guard's :class:`~distclip.GuardOutput`.
    """

    def __init__(
        self,
        max_norm: float | None = None,
        norm_type: float | None = None,
        error_if_nonfinite: bool = False,
        foreach: bool | None = None,
        *,
        pp_group: GroupLike | None = None,
        group: GroupLike | None = None,
        log_norm: bool = True,
        log_name: str = "grad_norm",
        log_group_norms: bool = False,
        groups: Callable[[str], str | None] | None = None,
        guard: GradGuard | None = None,
    ) -> None:
        super().__init__()
        if guard is not None:
            if not isinstance(guard, GradGuard):
                raise TypeError(f"GradientClipping: guard must be a distclip.GradGuard, got {type(guard).__name__}")
            if max_norm is not None or norm_type is not None or error_if_nonfinite:
                raise ValueError("GradientClipping: with guard=, set max_norm and norm_type on the GradGuard (it skips "
                                 "non-finite steps instead of raising)")
            if log_group_norms and guard.groups is None:
                raise ValueError("GradientClipping: log_group_norms with a guard logs the guard's groups: GradGuard(groups=...)")
            max_norm = guard.policy.cap
            norm_type = guard.norm_type
        if max_norm is None:
            raise TypeError("GradientClipping needs max_norm (or guard=)")
        self.max_norm = check_max_norm(float(max_norm), "GradientClipping")  # anything ``float()`` takes, as Lightning's own
        self.norm_type = 2.0 if norm_type is None else float(norm_type)
        self.guard = guard
        self.last_output: GuardOutput | None = None
        self._found_inf_set: list[Any] = []
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
        if self.guard is not None:
            self._guarded_step(trainer, pl_module, module, optimizer, logging)
            return
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

    def _guarded_step(self, trainer: Trainer, pl_module: LightningModule, module: nn.Module, optimizer: Any, logging: bool) -> None:
        """Clip with the guard; make the optimizer step that follows this hook a no-op if skipped."""
        assert self.guard is not None
        self._clear_found_inf()
        out = self.guard.clip_(module, pp_group=self.pp_group, group=self.group)
        self.guard.mark_stepped()  # Lightning steps the optimizer itself, right after this hook
        self.last_output, self.last_norm = out, out.total_norm
        inner = inner_optimizers(optimizer)
        scaler = getattr(trainer.precision_plugin, "scaler", None)  # GradScaler.step overrides found_inf
        if out.skip_on_host is None and scaler is None and takes_found_inf(inner):
            flag = out.skip.to(torch.float32)
            for o in inner:  # read by the fused kernel of the step that follows: no host sync
                o.found_inf = flag
                self._found_inf_set.append(o)
        elif out.skip_on_host if out.skip_on_host is not None else bool(out.skip):  # the verdict; a host read on accelerators only
            for o in inner:
                for param_group in o.param_groups:
                    for p in param_group["params"]:
                        p.grad = None  # the optimizer skips parameters without a grad: nothing changes
        if not logging:
            return
        pl_module.log(self.log_name, out.total_norm, on_step=True, on_epoch=False, sync_dist=False)
        if out.threshold is not None:
            pl_module.log(f"{self.log_name}/threshold", out.threshold.float(), on_step=True, on_epoch=False, sync_dist=False)
        pl_module.log(f"{self.log_name}/skipped", out.skip.float(), on_step=True, on_epoch=False, sync_dist=False)
        if self.log_group_norms:
            for name, value in out.group_norms.items():
                if name != "total":
                    pl_module.log(f"{self.log_name}/{name}", value, on_step=True, on_epoch=False, sync_dist=False)

    def _clear_found_inf(self) -> None:
        for o in self._found_inf_set:
            if hasattr(o, "found_inf"):
                del o.found_inf
        self._found_inf_set = []

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._clear_found_inf()  # after the optimizer step(s) of this batch

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._clear_found_inf()
