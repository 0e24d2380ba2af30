"""The float64 reference norm every check compares distclip with: the main job, the tests and
the benchmarks all call :func:`reference_norm`, so "the right answer" is written once.

    reference_norm([full grads...], p)              # one process, over the full gradients
    reference_norm({"fc1.weight": g, ...}, p)       # a mapping: its values
    reference_norm(local grads, 2.0, weights=w)     # each tensor's |g|^p counted w times

It widens every element to float64 (complex: complex128, then the magnitudes), with torch alone,
independently of distclip's own code.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Optional, Union

import torch

__all__ = ["as_float64", "reference_norm"]


def as_float64(t: torch.Tensor) -> torch.Tensor:
    """Widen for the reference: complex grads keep their imaginary part."""
    return t.to(torch.complex128) if t.is_complex() else t.double()


def reference_norm(
    tensors: Union[Iterable[torch.Tensor], Mapping[str, torch.Tensor]],
    norm_type: float = 2.0,
    weights: Optional[Sequence[float]] = None,
) -> float:
    """The ``norm_type``-norm of all elements of ``tensors`` together, in float64 (complex: the
    norm of the magnitudes). No element at all: 0.0, as torch returns for no gradients.

    Args:
        tensors: the gradients (full, or this rank's pieces), or a mapping whose values they are.
        norm_type: any p torch's ``vector_norm`` takes (inf, -inf, 0 and negative p included).
        weights: one per tensor: its ``|g|^p`` counts that many times (a piece held by ``k``
            ranks weighs ``1/k``). Only for a finite ``norm_type > 0``; with weights the result
            is ``(sum w |g|^p)^(1/p)``.

    Returns:
        The norm as a Python float.
    """
    grads = list(tensors.values()) if isinstance(tensors, Mapping) else list(tensors)
    if weights is not None:
        if len(weights) != len(grads):
            raise ValueError(f"{len(weights)} weights for {len(grads)} tensors")
        if not (0 < norm_type < math.inf):
            raise ValueError(f"weights need a finite norm_type > 0, got {norm_type}")
        acc = torch.zeros((), dtype=torch.float64)
        for g, w in zip(grads, weights):
            acc += as_float64(g).abs().pow(norm_type).sum().cpu() * w  # summed where g lives
        return float(acc ** (1.0 / norm_type))
    flat = torch.cat([as_float64(g).abs().reshape(-1).cpu() for g in grads] + [torch.zeros(0, dtype=torch.float64)])
    return float(torch.linalg.vector_norm(flat, norm_type)) if flat.numel() else 0.0
