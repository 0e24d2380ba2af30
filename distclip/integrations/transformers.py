"""Gradient-norm clipping for the Hugging Face ``Trainer`` that is correct under every layout.

    from distclip.integrations.transformers import GradientClipping

    args = TrainingArguments(..., max_grad_norm=0)         # the Trainer's own clipping off
    trainer = Trainer(model, args, ..., callbacks=[GradientClipping(max_norm=1.0)])

The ``Trainer`` clips with ``accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)``
(torch's function for DDP and FSDP2, FSDP1's own method for FSDP1), or, for DTensors on several
meshes, with one torch norm per mesh. Neither sees pipeline stages, ``mark_sharded`` layouts or a
partly wrapped model, and torch's function raises where parameters live on two meshes. This
callback clips the whole model with :func:`distclip.clip_grad_norm_` instead:

- in ``on_pre_optimizer_step``, which the ``Trainer`` calls once per optimizer step, after the
  last micro-batch of a gradient-accumulation window (the grads are the accumulated ones) and
  right before ``optimizer.step()``;
- after AMP unscaling: with a ``GradScaler`` (fp16 on an accelerator) the gradients are unscaled
  first, unless the ``Trainer`` already did (it measures its own norm through Accelerate, which
  unscales);
- over the model the ``Trainer`` hands its callbacks (the FSDP1 root under FSDP1, the
  ``PeftModel`` or ``PreTrainedModel`` otherwise: DDP's replicas are its plain grads);
- logging the pre-clip norm as ``grad_norm`` in the ``Trainer``'s logs (what it prints, what
  ``trainer.state.log_history`` keeps, and what the callbacks after this one report), replacing
  the ``Trainer``'s own measurement; ``log_group_norms=True`` adds ``grad_norm/<name>`` per
  parameter (or per group) from :func:`distclip.grad_norms`, in the same single collective as the
  total.

``TrainingArguments(max_grad_norm=...)`` must be ``0`` (or ``None``): the default ``1.0`` would clip
a second time, with the ``Trainer``'s function, so :meth:`on_train_begin` raises on every rank
before the first step. DeepSpeed is refused (its engine owns the gradients: use its
``gradient_clipping`` setting).

Reporting integrations (``report_to="wandb"``, ``"tensorboard"``, ...) are callbacks that the
``Trainer`` puts before the ones you pass; to have them report distclip's norm, put this callback
first: ``trainer.callback_handler.callbacks.insert(0, clip)`` (or :func:`attach`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import distclip
from distclip.clip import check_max_norm
from distclip.layout.discovery import GroupLike

try:
    from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
except ImportError as e:
    raise ImportError("distclip.integrations.transformers needs transformers: pip install 'distclip[transformers]'") from e
if not hasattr(TrainerCallback, "on_pre_optimizer_step"):  # older Trainers have no hook between the last backward and the step
    raise ImportError("distclip.integrations.transformers needs a transformers whose TrainerCallback has on_pre_optimizer_step "
                      "(4.47 or newer; tested with 5.24): pip install -U 'distclip[transformers]'")

__all__ = ["GradientClipping", "attach"]

# Prefixes that wrappers put before every parameter name: PEFT's (``base_model.model.``) and DDP's
# (``module.``). Log keys drop them, so a LoRA run logs ``grad_norm/model.layers.0...``.
_NAME_PREFIXES = ("base_model.model.", "module.")


def _log_key(name: str) -> str:
    for prefix in _NAME_PREFIXES:
        name = name.removeprefix(prefix)
    return name


class GradientClipping(TrainerCallback):
    """Clip the gradient norm of the whole model with distclip once per optimizer step.

    Args:
        max_norm (float): max norm of the gradients (non-negative).
        norm_type (float): p of the p-norm; ``inf`` allowed. Default ``2.0``.
        error_if_nonfinite (bool): raise on every rank if the norm is nan or inf.
        foreach (bool, optional): use foreach kernels (default: when available).
        pp_group (ProcessGroup or DeviceMesh, optional): the pipeline-parallel group, if the
            model the ``Trainer`` holds is one pipeline stage.
        group (ProcessGroup or DeviceMesh, optional): the ranks that hold this model, when it
            lives on part of the world (default: every rank).
        log_name (str): the key of the norm in the ``Trainer``'s logs. Default ``"grad_norm"``
            (the ``Trainer``'s own key, whose value this replaces).
        log_group_norms (bool): also log the pre-clip norm of each parameter (or group) as
            ``{log_name}/{name}`` (PEFT's ``base_model.model.`` and DDP's ``module.`` prefixes
            dropped), computed with :func:`distclip.grad_norms` in the same single collective
            as the total. Frozen parameters (a LoRA base) have no grad and no entry.
        groups (callable, optional): ``parameter name -> group name`` (or ``None`` to leave it
            out) for ``log_group_norms``; default: one entry per parameter.

    After each clip, :attr:`last_norm` holds the pre-clip norm (a plain 0-dim tensor, identical on
    every rank) and :attr:`last_group_norms` the per-name norms (``log_group_norms`` only). Reading
    them on an accelerator is a host sync; the callback itself reads them only when the ``Trainer``
    logs (every ``logging_steps``), with one device-to-host copy.
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
        log_name: str = "grad_norm",
        log_group_norms: bool = False,
        groups: Callable[[str], str | None] | None = None,
    ) -> None:
        max_norm = check_max_norm(max_norm, "GradientClipping", numbers_only=True)
        if groups is not None and not callable(groups):
            raise TypeError(f"GradientClipping: groups must be a callable name -> group name, got {type(groups).__name__}")
        self.max_norm = max_norm
        self.norm_type = float(norm_type)
        self.error_if_nonfinite = error_if_nonfinite
        self.foreach = foreach
        self.pp_group = pp_group
        self.group = group
        self.log_name = log_name
        self.log_group_norms = log_group_norms
        self.groups = groups
        self.last_norm: torch.Tensor | None = None
        self.last_group_norms: dict[str, torch.Tensor] = {}
        self._last_step = -1  # the global step whose optimizer step last_norm belongs to

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        # The arguments are the same on every rank, so every rank raises here, before the first
        # step's collectives.
        if args.max_grad_norm is not None and args.max_grad_norm > 0:
            raise ValueError(
                f"GradientClipping clips the gradients already; set TrainingArguments(max_grad_norm=0) "
                f"(it is {args.max_grad_norm!r}, the Trainer would clip a second time with Accelerate's/torch's "
                "function, which is wrong or raises under sharded layouts)"
            )
        if getattr(args, "deepspeed", None):
            raise ValueError("GradientClipping does not support DeepSpeed (its engine owns the gradients): "
                             "use DeepSpeed's `gradient_clipping` config entry")
        self.last_norm, self.last_group_norms, self._last_step = None, {}, -1

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        model = kwargs.get("model")
        if not isinstance(model, nn.Module):
            raise TypeError("GradientClipping: the Trainer passed no model to its callbacks")
        _unscale(kwargs.get("optimizer"))
        if self.log_group_norms:
            # Every per-name norm and the total in one collective, then a communication-free clip.
            per_name = distclip.grad_norms(model, self.norm_type, groups=self.groups, pp_group=self.pp_group, group=self.group)
            norm = per_name["total"]
            if self.error_if_nonfinite and not bool(torch.isfinite(norm)):  # the same value on every rank
                raise RuntimeError(f"GradientClipping: the total norm of order {self.norm_type} of the gradients is non-finite")
            distclip.clip_grads_with_norm_(model, self.max_norm, norm, self.foreach)
            self.last_group_norms = {name: value for name, value in per_name.items() if name != "total"}
        else:
            norm = distclip.clip_grad_norm_(
                model, self.max_norm, self.norm_type, self.error_if_nonfinite, self.foreach, pp_group=self.pp_group, group=self.group
            )
        self.last_norm = norm
        self._last_step = state.global_step + 1  # the Trainer counts the step after optimizer.step()

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs: dict[str, float] | None = None,
               **kwargs: Any) -> None:
        # Only a training log of the step just clipped (evaluation logs have no "loss" key).
        if logs is None or "loss" not in logs or self.last_norm is None or state.global_step != self._last_step:
            return
        names = list(self.last_group_norms)
        values = torch.stack([self.last_norm.float(), *(v.float() for v in self.last_group_norms.values())]).tolist()  # one copy
        entries = {self.log_name: values[0], **{f"{self.log_name}/{_log_key(n)}": v for n, v in zip(names, values[1:])}}
        logs.update(entries)
        # The Trainer stored a copy of the logs before its callbacks ran: correct that copy too.
        history = state.log_history[-1] if state.log_history else None
        if history is not None and history.get("step") == state.global_step and "loss" in history:
            history.update(entries)


def _unscale(optimizer: Any) -> None:
    """Unscale the gradients of an Accelerate-wrapped optimizer whose ``GradScaler`` is enabled,
    unless already done this step (the ``Trainer`` measures its own norm through Accelerate's
    ``clip_grad_norm_``, which unscales; ``GradScaler.unscale_`` refuses a second call and the
    optimizer step that follows then uses the unscaled grads)."""
    scaler = getattr(optimizer, "scaler", None)
    inner = getattr(optimizer, "optimizer", None)
    if scaler is None or inner is None or not scaler.is_enabled():
        return
    try:
        scaler.unscale_(inner)
    except RuntimeError as e:  # raised before touching any grad, the same on every rank
        if "already been called" not in str(e):
            raise


def attach(trainer: Trainer, callback: GradientClipping) -> GradientClipping:
    """Put ``callback`` first among ``trainer``'s callbacks, so that reporting integrations
    (``report_to=...``), which the ``Trainer`` places before the callbacks it is given, report
    distclip's norm. Returns ``callback``."""
    if not isinstance(callback, GradientClipping):
        raise TypeError(f"attach: expected a GradientClipping, got {type(callback).__name__}")
    callbacks = trainer.callback_handler.callbacks
    if callback in callbacks:
        callbacks.remove(callback)
    callbacks.insert(0, callback)
    return callback
