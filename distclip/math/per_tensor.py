"""Per-tensor math: one float64 partial per gradient tensor, for ``grad_norms``.

The same measure as :func:`~distclip.math.partials.group_partial` (pieces of at most ``ROW``
elements on CPU, accumulation dtype, float32 overflow/underflow repair, complex grads by real
views, NaN poisoning for p <= 0), kept per tensor instead of summed per group: ``grad_norms``
adds each tensor's partial into its own entry. What it shares with ``partials`` (the pieces, the
repair, the accumulation dtype, the small-group rule) it imports from there; what is its own is
how many same-size tensors are measured as one matrix and summed back per tensor.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch

from distclip._torch import flatten_dense_tensors
from distclip.math.partials import (
    FLAT_CHUNK,
    FLAT_MAX,
    FLAT_MIN,
    ROW,
    accumulation_dtype,
    empty_partial,
    is_small_group,
    owned_piece_norms,
    real_view,
    repair_norms,
    repairs_float32,
)

__all__ = ["Buckets", "SizeBuckets", "taker", "tensor_partials"]


def _rows_norms(m: torch.Tensor, norm_type: float, acc: torch.dtype) -> torch.Tensor:
    """Norms along the last dim (one ``ROW``-bounded piece per row)."""
    if m.dtype == acc:
        return torch.linalg.vector_norm(m, norm_type, dim=-1)
    return torch.linalg.vector_norm(m, norm_type, dim=-1, dtype=acc)


def _combine_rows(norms: torch.Tensor, norm_type: float) -> torch.Tensor:
    """(k, r) float64 piece norms of k tensors -> their k partials (``group_partial``'s rule)."""
    if norm_type == math.inf:  # amax/amin keep a NaN
        return norms.amax(dim=1)
    if norm_type == -math.inf:
        return norms.amin(dim=1)
    return norms.sum(dim=1) if norm_type == 0 else norms.pow(norm_type).sum(dim=1)


def _same_size_partials(tensors: Sequence[torch.Tensor], n: int, norm_type: float, acc: torch.dtype, repair: bool) -> torch.Tensor:
    """Float64 per-tensor partials (weight 1, no poisoning) of CPU tensors of ``n`` elements each
    (``0 < n < FLAT_MAX``): one flat copy, viewed as (k, n), measured in pieces of at most ``ROW``
    elements along each row (a (k, n // ROW, ROW) strided view and the (k, n % ROW) tail), with
    no padding, so every norm type (p <= 0 included) is measured as the tensors themselves."""
    k = len(tensors)
    flat = flatten_dense_tensors(list(tensors)).view(k, n)
    parts = []
    r = n // ROW
    if r:
        body = flat.as_strided((k, r, ROW), (n, ROW, 1))
        norms = _rows_norms(body, norm_type, acc)
        if repair:
            norms = repair_norms(norms.reshape(-1), lambda idx: body[idx // r, idx % r], norm_type).view(k, r)
        parts.append(norms.double())
    if n % ROW:
        tail = flat[:, r * ROW :]
        norms = _rows_norms(tail, norm_type, acc)
        if repair:
            norms = repair_norms(norms, lambda idx: tail.index_select(0, idx), norm_type)
        parts.append(norms.double().unsqueeze(1))
    if norm_type > 0 and not math.isinf(norm_type) and len(parts) == 1 and r <= 1:
        return parts[0].reshape(-1).pow(norm_type)
    return _combine_rows(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0], norm_type)


@dataclass
class SizeBuckets:
    """How one (device, dtype) bucket of CPU tensors is measured: by size (most models hold a few
    distinct sizes many times), each size in chunks that bound the flat copy; the rest (empty,
    large) through ``owned_piece_norms``. Positions index the bucket's tensor list."""

    sizes: list[tuple[int, list[tuple[Callable[[Sequence], Any], torch.Tensor]]]]  # (numel, [(take, positions)])
    rest: Optional[tuple[Callable[[Sequence], Any], torch.Tensor, int]]  # (take, positions, count)

    @staticmethod
    def build(numels: list[int]) -> SizeBuckets:
        total = sum(numels)
        chunk = max(ROW, min(FLAT_CHUNK, total // 20))  # the flat copy stays under ~5 % of the bytes
        by_size: dict[int, list[int]] = {}
        rest: list[int] = []
        for i, n in enumerate(numels):
            (by_size.setdefault(n, []) if 0 < n < FLAT_MAX else rest).append(i)
        sizes = []
        for n, idx in by_size.items():
            step = max(1, chunk // n)
            parts = [idx[j : j + step] for j in range(0, len(idx), step)]
            sizes.append((n, [(taker(part), torch.tensor(part)) for part in parts]))
        return SizeBuckets(sizes, (taker(rest), torch.tensor(rest), len(rest)) if rest else None)


def taker(idx: list[int]) -> Callable[[Sequence], Any]:
    """A C-level picker of ``idx`` from a sequence, always returning a tuple (``layout.plan``'s
    checks pick their grads with it too)."""
    if len(idx) > 1:
        return operator.itemgetter(*idx)
    only = idx[0]
    return lambda xs: (xs[only],)


def _cpu_partials(tensors: list[torch.Tensor], norm_type: float, acc: torch.dtype, repair: bool, plan: SizeBuckets) -> torch.Tensor:
    out = torch.empty(len(tensors), dtype=torch.float64)
    for n, chunks in plan.sizes:
        for take, positions in chunks:
            out.index_copy_(0, positions, _same_size_partials(take(tensors), n, norm_type, acc, repair))
    if plan.rest is not None:
        take, positions, count = plan.rest
        out.index_copy_(0, positions, _owned_partials(list(take(tensors)), norm_type, acc, repair))
    return out


def _owned_partials(tensors: list[torch.Tensor], norm_type: float, acc: torch.dtype, repair: bool) -> torch.Tensor:
    """Per-tensor partials (weight 1, no poisoning) through ``owned_piece_norms``."""
    n = len(tensors)
    norms, owner = owned_piece_norms(tensors, norm_type, acc, repair)
    norms = norms.double()
    if norm_type == math.inf:  # scatter_reduce's amax/amin keep a NaN
        return norms.new_full((n,), -math.inf).scatter_reduce(0, owner, norms, "amax")
    if norm_type == -math.inf:
        return norms.new_full((n,), math.inf).scatter_reduce(0, owner, norms, "amin")
    return norms.new_zeros(n).index_add_(0, owner, norms if norm_type == 0 else norms.pow(norm_type))


def _bucket_partials(tensors: list[torch.Tensor], norm_type: float, sizes: Optional[SizeBuckets] = None) -> torch.Tensor:
    """``group_partial`` (weight 1) of each of the non-empty, same-device, same-dtype real
    ``tensors``: on CPU by size (``SizeBuckets``, built here unless given), elsewhere through
    ``owned_piece_norms`` (pieces measured together, summed back per tensor)."""
    device, dtype = tensors[0].device, tensors[0].dtype
    acc = accumulation_dtype(dtype, device, norm_type)
    repair = repairs_float32(norm_type, acc, device)
    if is_small_group(tensors, norm_type, repair):
        # measured in one float64 copy, as ``group_partial`` measures a small group, so that
        # "total" matches get_total_norm to float64 rounding rather than to float32's
        tensors = list(flatten_dense_tensors(tensors).double().split([t.numel() for t in tensors]))
        acc, repair = torch.float64, False
    # few tensors: measured in place, as ``group_partial`` measures them; many: by size
    cpu = device.type == "cpu" and len(tensors) >= FLAT_MIN
    if cpu:
        out = _cpu_partials(tensors, norm_type, acc, repair, sizes or SizeBuckets.build(list(map(torch.Tensor.numel, tensors))))
    else:
        out = _owned_partials(tensors, norm_type, acc, repair)
    if norm_type > 0:
        return out
    # p <= 0 is blind to non-finite values: a max-abs pass poisons them with NaN, as group_partial
    max_acc = torch.float64 if dtype == torch.float64 else torch.float32
    if cpu:
        peaks = _cpu_partials(tensors, math.inf, max_acc, False, sizes or SizeBuckets.build(list(map(torch.Tensor.numel, tensors))))
    else:
        peaks = _owned_partials(tensors, math.inf, max_acc, False)
    return out + peaks * 0.0


@dataclass
class Buckets:
    """The (device, dtype) buckets of a list of tensors: positions and, on CPU, the size plan."""

    members: list[tuple[torch.dtype, Callable[[Sequence], Any], torch.Tensor, Optional[SizeBuckets]]]

    @staticmethod
    def build(tensors: Sequence[torch.Tensor]) -> Buckets:
        found: dict[tuple, list[int]] = {}
        for i, t in enumerate(tensors):
            if t.numel():
                found.setdefault((t.device, t.dtype), []).append(i)
        members = []
        for (device, dtype), idx in found.items():
            chosen = [tensors[i] for i in idx]
            sizes = None
            if device.type == "cpu":
                numels = [t.numel() for t in (real_view(chosen, 2.0) if dtype.is_complex else chosen)]
                sizes = SizeBuckets.build(numels)
            members.append((dtype, taker(idx), torch.tensor(idx), sizes))
        return Buckets(members)


def tensor_partials(tensors: list[torch.Tensor], norm_type: float, device: torch.device, buckets: Optional[Buckets] = None) -> torch.Tensor:
    """Float64 per-tensor partials on ``device`` (as ``group_partial`` measures them; weight 1): ``sum |g|^p`` for
    finite p, the count for p=0, max/min |g| for +-inf, ``empty_partial`` for empty tensors; NaN
    poisoning for p <= 0 as the library does. The tensors of one (device, dtype) are measured
    together, in pieces of at most ``ROW`` elements on CPU (with overflow/underflow repair).
    ``buckets`` (from ``Buckets.build`` on tensors of the same devices, dtypes and sizes) saves
    working the buckets out again."""
    out = torch.full((len(tensors),), empty_partial(norm_type), dtype=torch.float64, device=device)
    for dtype, take, positions, sizes in (buckets or Buckets.build(tensors)).members:
        ts = list(take(tensors))
        if dtype.is_complex:
            ts = real_view(ts, norm_type)
            if norm_type != 2:  # magnitudes: as many elements as the tensors, not twice
                sizes = SizeBuckets.build(list(map(torch.Tensor.numel, ts))) if sizes is not None else None
        values = _bucket_partials(ts, norm_type, sizes).to(device)
        out.index_copy_(0, positions.to(device), values)
    return out
