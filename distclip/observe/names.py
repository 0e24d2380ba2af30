"""Names of the parameters a call is given: any form ``clip_grad_norm_`` takes, named.

A module gives ``named_parameters()`` without wrapper prefixes (:func:`clean_name`); (name,
tensor) pairs keep their names (same clean-up); bare tensors are named by position,
``"param[3]"``. Every observe tool (``grad_norms``, ``describe``, ``audit``, ``GradGuard``'s
groups) starts from :func:`parameters_of`.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import Union, cast

import torch
from torch import nn

__all__ = ["LEADING_PREFIXES", "CallParameters", "NamedParams", "Prefixes", "clean_name", "parameters_of"]

# What ``clip_grad_norm_`` takes, plus (name, tensor) pairs
NamedParams = Union[nn.Module, torch.Tensor, Iterable[Union[torch.Tensor, tuple[str, torch.Tensor]]]]  # noqa: UP007 - a runtime alias
Prefixes = Union[bool, Sequence[str]]  # noqa: UP007 - a runtime alias

_WRAPPERS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
# Leading prefixes dropped with ``strip_prefixes=True``: DDP's / DataParallel's ``module.`` and
# PEFT's ``base_model.model.`` (in this order: DDP wraps the PEFT model)
LEADING_PREFIXES = ("module.", "base_model.model.")


def clean_name(name: str, ddp: bool = False, prefixes: Sequence[str] = ()) -> str:
    """A parameter name without wrapper prefixes: FSDP1's ``_fsdp_wrapped_module.``, activation
    checkpointing's ``_checkpoint_wrapped_module.``, ``torch.compile``'s ``_orig_mod.`` and, with
    ``ddp``, DDP's one leading ``module.``; then each of ``prefixes`` (in order) where the name
    starts with it (e.g. :data:`LEADING_PREFIXES`)."""
    if ddp and name.startswith("module."):
        name = name[len("module.") :]
    if "_" in name:
        for wrapper in _WRAPPERS:
            if wrapper in name:
                name = name.replace(wrapper, "")
    for prefix in prefixes:
        if name.startswith(prefix):
            name = name[len(prefix) :]
    return name


def _leading(strip_prefixes: Prefixes) -> tuple[str, ...]:
    if strip_prefixes is True:
        return LEADING_PREFIXES
    if strip_prefixes is False or strip_prefixes is None:
        return ()
    if isinstance(strip_prefixes, str) or not all(isinstance(x, str) for x in strip_prefixes):
        raise TypeError(f"distclip: strip_prefixes must be a bool or a sequence of str, got {strip_prefixes!r}")
    return tuple(strip_prefixes)


@dataclass
class CallParameters:
    """``parameters`` as names and tensors (``parameters_of``): what every observe tool starts from."""

    names: list[str]
    params: list[torch.Tensor]
    module: nn.Module | None


_first = operator.itemgetter(0)
_second = operator.itemgetter(1)
_requires_grad = operator.attrgetter("requires_grad")


def parameters_of(parameters: NamedParams, trainable_only: bool = False, strip_prefixes: Prefixes = False) -> CallParameters:
    """Names and tensors from any form ``clip_grad_norm_`` takes, or (name, tensor) pairs.

    A module gives ``named_parameters()`` (wrapper prefixes removed, see :func:`clean_name`; DDP's
    leading ``module.`` too); pairs keep their names (same clean-up, except ``module.``); a bare
    tensor is named by its position in the iterable, ``"param[3]"``. ``trainable_only`` drops
    tensors with ``requires_grad=False``; ``strip_prefixes`` drops leading prefixes (``True``:
    :data:`LEADING_PREFIXES`, or a sequence of str)."""
    leading = _leading(strip_prefixes)
    module: nn.Module | None = None
    ddp = False
    if isinstance(parameters, nn.Module):
        module = parameters
        ddp = type(parameters).__name__ in ("DistributedDataParallel", "DataParallel")
        items: list = list(parameters.named_parameters())
    elif isinstance(parameters, torch.Tensor):
        items = [("param[0]", parameters)]
    elif isinstance(parameters, (str, bytes)) or not isinstance(parameters, Iterable):
        raise TypeError(
            "distclip: parameters must be a tensor, an iterable of tensors or of (name, tensor) pairs, or an "
            f"nn.Module; got {type(parameters).__name__}"
        )
    else:
        items = list(parameters)  # once: a generator is read here only
    types = set(map(type, items))
    if types == {tuple}:  # pairs, the common case: checked with C-level passes, not Python per item
        lengths = set(map(len, items))
        if lengths == {2}:
            names, params = list(map(_first, items)), list(map(_second, items))
            if set(map(type, names)) == {str} and all(map(isinstance, params, repeat(torch.Tensor))):
                return _finish(names, params, module, trainable_only, ddp, leading)
    names, params = [], []
    for i, item in enumerate(items):
        if isinstance(item, torch.Tensor):
            names.append(f"param[{i}]")
            params.append(item)
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], torch.Tensor):
            names.append(item[0])
            params.append(item[1])
        else:
            raise TypeError(
                "distclip: parameters must be tensors or (name, tensor) pairs (as from named_parameters()); "
                f"element {i} is of type {type(item).__name__}"
            )
    return _finish(names, params, module, trainable_only, ddp, leading)


_CLEAN: dict[tuple, str] = {}  # (raw name, ddp, prefixes) -> clean name: names repeat every call


def _finish(names: list[str], params: list[torch.Tensor], module: nn.Module | None, trainable_only: bool, ddp: bool,
            leading: tuple[str, ...]) -> CallParameters:
    if trainable_only:
        keep = list(map(_requires_grad, params))
        if not all(keep):
            names = [n for n, k in zip(names, keep) if k]
            params = [p for p, k in zip(params, keep) if k]
    if len(_CLEAN) > 1 << 20:
        _CLEAN.clear()
    found = list(map(_CLEAN.get, zip(names, repeat(ddp), repeat(leading))))
    if None in found:
        for i, name in enumerate(names):
            if found[i] is None:
                found[i] = _CLEAN[(name, ddp, leading)] = clean_name(name, ddp, leading)
    return CallParameters(cast(list[str], found), params, module)
