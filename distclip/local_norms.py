"""Local math: this rank's partial norm over the gradients it holds.

The partial is a float64 scalar that the reduction combines across ranks:

    p > 0:             sum(weight * sum(|g|^p))
    p < 0:             the same, NaN if any grad is non-finite
    p == 0:            sum(weight * count(g != 0)), NaN if any grad is non-finite
    p == inf:          max |g|   (NaN if any grad is NaN)
    p == -inf:         min |g|   (NaN if any grad is non-finite)

Per-piece norms are computed with ``torch._foreach_norm`` grouped by (device, dtype, weight) and
accumulated at least in float32; only the few per-piece values are raised to ``p`` and summed in
float64. On CPU the default p=2 never converts a grad to float64 (other p accumulate in float64
for accuracy, at a cost); on accelerators ``_foreach_norm`` accumulates in float64 in-kernel.
"""

from __future__ import annotations

import bisect
import itertools
import math
from typing import Optional

import torch

from distclip.host_reads import host_reads_allowed
from distclip.layout import GroupKey

# On CPU every norm is taken over pieces of at most ROW elements, then the piece norms are combined
# in float64. torch's CPU kernel accumulates float32 in a few lanes, so its error grows with the
# length it reduces; measured on the CI machine (fp32, worst over constant and near-constant data,
# the adversarial case for rounding bias): rows of 512: 3.7e-7 relative error, 1024: 9.3e-7, 8192:
# 6.8e-6; one 64M-element vector_norm: 5e-3. Row-wise reduction runs at the same speed (~19 GB/s)
# for every width from 256 to 8192.
ROW = 512


def accumulation_dtype(dtype: torch.dtype, device: torch.device, norm_type: float) -> torch.dtype:
    """The dtype per-piece norms are accumulated in.

    - float64 grads, and p-norms other than 2 on CPU: float64. torch's CPU kernels accumulate
      |g|^p naively for p != 2 (p=1 over 10k fp32 elements: relative error 1.5e-6); p=2, the
      default, keeps its fast float32 path.
    - CPU otherwise: float32; an overflow or underflow is detected and repaired without any
      device sync.
    - Accelerators (wherever ``host_reads_allowed`` says no): no host check is allowed, so finite
      p-norms of grads whose |g|^p can overflow or underflow float32 (bf16 and fp32 share its
      range) accumulate in float64.
    """
    finite_p = norm_type != 0 and not math.isinf(norm_type)
    if dtype == torch.float64 or (device.type == "cpu" and finite_p and norm_type != 2):
        return torch.float64
    if host_reads_allowed(device) or not finite_p:  # float32 with a cheap check and repair
        return torch.float32
    if dtype == torch.float16 and abs(norm_type) <= 2:  # 65504^2 * 2^31 elements still fits float32
        return torch.float32
    return torch.float64


def coalesce(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Merge runs of contiguous views that lie back to back in one base tensor into 1-D views.

    FSDP2's sharded grads are views into one reduce-scatter buffer per group (DDP's with
    ``gradient_as_bucket_view`` and FSDP1's with ``use_orig_params`` likewise), so a model with
    thousands of parameters needs a handful of kernels instead of one per parameter. Only exact
    adjacency inside the same base merges: padding between views is never read. Empty tensors
    are dropped.
    """
    out: list[torch.Tensor] = []
    run: list[torch.Tensor] = []
    base: Optional[torch.Tensor] = None
    end = run_numel = 0
    itemsize = tensors[0].element_size() if tensors else 0  # one dtype per group
    for t in tensors:
        n = t.numel()
        if n == 0:
            continue
        t_base = t._base  # views share their root ``_base``; standalone tensors never merge
        if t_base is None or not t.is_contiguous():
            _flush(run, run_numel, out)
            run = []
            out.append(t)
            continue
        ptr = t.data_ptr()
        if run and t_base is base and ptr == end:
            run.append(t)
            run_numel += n
        else:
            _flush(run, run_numel, out)
            run, base, run_numel = [t], t_base, n
        end = ptr + n * itemsize
    _flush(run, run_numel, out)
    return out


def _flush(run: list[torch.Tensor], numel: int, out: list[torch.Tensor]) -> None:
    if len(run) == 1:
        out.append(run[0])
    elif run:
        out.append(run[0].as_strided((numel,), (1,), run[0].storage_offset()))


def scale_(groups: dict[GroupKey, list[torch.Tensor]], coef: torch.Tensor, foreach: Optional[bool]) -> None:
    """Multiply every tensor in place by the 0-dim ``coef`` (no host sync).

    ``coef`` is cast to float32/float64 groups' own dtype: ``_foreach_mul_`` with a 0-dim tensor
    of another dtype takes a slow path (4000 small fp32 grads: 6.6 ms instead of 2.1 ms). The cast
    is deterministic, so every rank still multiplies by the same bits. Low-precision groups get a
    float32 coefficient, as in torch.
    """
    for key, tensors in groups.items():
        device, dtype = key[0], key[1]  # keys start with the device and dtype
        coef_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
        coef_here = coef.to(device=device, dtype=coef_dtype)
        if foreach is False:
            for t in tensors:
                t.mul_(coef_here)
        elif tensors:
            torch._foreach_mul_(tensors, coef_here)


# On CPU a norm kernel costs ~5 us per tensor (``_foreach_norm`` loops over tensors there), more
# than reading 16K floats. Tensors below FLAT_MAX elements are therefore copied into flat buffers
# and measured row by row (measured on the CI machine, per tensor, norm kernel vs copy + rows:
# 1024 elements 5.3 vs 0.9 us, 4096: 4.8 vs 1.7, 8192: 7.0 vs 3.0, 16384: 6.6 vs 6.1; with two
# ranks sharing the memory bus the copy costs more, hence the lower bound). The copy
# is made chunk by chunk, one chunk alive at a time, each at most 1/20 of the group's grad bytes
# (at least ROW elements) and at most FLAT_CHUNK elements, so the extra memory stays under 10% of
# the rank's local grad bytes; a tensor larger than a chunk is measured in place.
FLAT_MIN = 32  # fewer candidates than this are measured in place
FLAT_MAX = 1 << 13
FLAT_CHUNK = 1 << 20


class _Pieces:
    """A partition of tensors into pieces of at most ``ROW`` elements (CPU) for the norm kernels:
    ``mats`` (row matrices: one piece per row), ``flat`` (tensors to copy into flat chunks, whose
    rows are the pieces) and ``small`` (one piece each, through ``_foreach_norm``)."""

    def __init__(self, tensors: list[torch.Tensor], flatten: bool) -> None:
        self.mats: list[torch.Tensor] = []
        self.flat: list[torch.Tensor] = []
        self.small: list[torch.Tensor] = []
        self.chunk = 0
        numels = list(map(torch.Tensor.numel, tensors))  # C-level: no Python per tensor
        if not numels:
            return
        if tensors[0].device.type != "cpu":  # accelerator reductions are tree-shaped: no rows needed
            self.small = [t for t, n in zip(tensors, numels) if n] if 0 in numels else list(tensors)
            return
        total = sum(numels)
        self.chunk = max(ROW, min(FLAT_CHUNK, total // 20)) // ROW * ROW
        flat_max = min(FLAT_MAX, self.chunk + 1)
        if flatten and max(numels) < flat_max and min(numels) > 0 and len(tensors) >= FLAT_MIN:
            self.flat = list(tensors)  # the common case of many small grads: no Python per tensor
            return
        for t, n in zip(tensors, numels):
            if n == 0:
                continue
            if flatten and n < flat_max:
                self.flat.append(t)
            elif n <= ROW:
                self.small.append(t)
            else:
                self._rows(t, n, flatten)
        if len(self.flat) < FLAT_MIN:
            flat, self.flat = self.flat, []
            for t in flat:
                if t.numel() <= ROW:
                    self.small.append(t)
                else:
                    self._rows(t, t.numel(), False)

    def _rows(self, t: torch.Tensor, n: int, flatten: bool) -> None:
        if not t.is_contiguous():  # rare; a copy keeps the accurate row path
            t = t.contiguous()
        rows, offset = n // ROW, t.storage_offset()
        self.mats.append(t.as_strided((rows, ROW), (ROW, 1)))  # one view call per tensor
        if n % ROW:
            (self.flat if flatten else self.small).append(t.as_strided((n % ROW,), (1,), offset + rows * ROW))

    def chunks(self):
        """Yield ``flat`` copied into (rows, ROW) matrices, zero-padded, a bounded chunk at a time
        (the caller drops each before asking for the next)."""
        ends = list(itertools.accumulate(map(torch.Tensor.numel, self.flat)))
        i = 0
        while i < len(ends):
            base = ends[i - 1] if i else 0
            j = max(bisect.bisect_right(ends, base + self.chunk, lo=i), i + 1)  # tensors i..j-1 fit
            chunk = self.flat[i:j]
            pad = -(ends[j - 1] - base) % ROW
            if pad:
                chunk.append(chunk[0].new_zeros(pad))
            # private but stable (DDP, FSDP1 and apex use it): one C++ call copies the whole chunk
            flat = torch._utils._flatten_dense_tensors(chunk)
            del chunk
            yield flat.view(-1, ROW)
            del flat
            i = j


def _row_norms(m: torch.Tensor, norm_type: float, acc: torch.dtype, repair: bool) -> torch.Tensor:
    norms = torch.linalg.vector_norm(m, norm_type, dim=1, dtype=acc)
    return _repair(norms, lambda rows: list(m.index_select(0, rows)), norm_type) if repair else norms


def piece_norms(
    tensors: list[torch.Tensor],
    norm_type: float,
    acc: torch.dtype,
    foreach: Optional[bool],
    repair: bool = False,
    flatten: bool = True,
) -> torch.Tensor:
    """1-D tensor of norms of pieces that partition ``tensors`` (see ``_Pieces``).

    With ``repair`` (CPU, float32 accumulation of a finite p > 0), pieces whose norm overflowed or
    may have underflowed are recomputed in float64 (see ``TINY``). ``flatten=False`` keeps one
    norm per tensor of at most ``ROW`` elements, in order (for per-tensor norms).
    """
    # zero padding of flat chunks would change min|g| and sum |g|^p for p < 0
    pieces = _Pieces(tensors, flatten and foreach is not False and norm_type >= 0)
    parts = []
    for m in pieces.chunks():
        parts.append(_row_norms(m, norm_type, acc, repair))  # checked now: the chunk is dropped next
        del m
    if pieces.mats:
        mats = pieces.mats
        if mats[0].dtype == acc:  # an explicit dtype costs ~1 us more per call, even when it is the same
            rows = [torch.linalg.vector_norm(m, norm_type, dim=1) for m in mats]
        else:
            rows = [torch.linalg.vector_norm(m, norm_type, dim=1, dtype=acc) for m in mats]
        norms = torch.cat(rows) if len(rows) > 1 else rows[0]
        if repair:
            starts = list(itertools.accumulate((m.shape[0] for m in mats), initial=0))

            def row(k: int) -> torch.Tensor:
                i = bisect.bisect_right(starts, k) - 1
                return mats[i][k - starts[i]]

            norms = _repair(norms, lambda idx: [row(k) for k in idx.tolist()], norm_type)
        parts.append(norms)
    if pieces.small:
        small = pieces.small
        if foreach is False:
            norms = torch.stack([torch.linalg.vector_norm(t, norm_type, dtype=acc) for t in small])
        else:
            norms = torch.stack(list(torch._foreach_norm(small, norm_type, dtype=acc)))
        if repair:
            norms = _repair(norms, lambda idx: [small[k] for k in idx.tolist()], norm_type)
        parts.append(norms)
    if not parts:
        return torch.empty(0, dtype=acc, device=tensors[0].device)
    if len(parts) == 1:
        return parts[0]
    return torch.cat([p.double() for p in parts]) if any(p.dtype != acc for p in parts) else torch.cat(parts)


# A float32 piece norm below this may have lost its value to underflow of g^2 (fp32/bf16 grads of
# ~1e-22 and smaller: the squares fall below float32's normal range). A piece has at most ROW
# elements on CPU, so above it the largest element is >= TINY / sqrt(ROW) ~ 1e-17 and its square
# (1e-34) keeps full float32 precision: what the smaller elements lose is < 1e-12 of the sum.
TINY = 2.0**-50


def _repair(norms: torch.Tensor, pieces_at, norm_type: float) -> torch.Tensor:
    """CPU slow path, taken only for the pieces whose float32 norm overflowed (sum g^2 beyond
    float32 although the norm is representable: fairscale #263) or may have underflowed (below
    ``TINY``, which includes all-zero pieces): those pieces alone (``pieces_at(indices)``) are
    recomputed in float64."""
    bad = torch.isinf(norms) | (norms < TINY)
    if not bool(bad.any()):  # CPU only: a free read
        return norms
    idx = bad.nonzero().flatten()
    fixed = norms.double()
    redo = torch._foreach_norm(pieces_at(idx), norm_type, dtype=torch.float64)
    fixed[idx] = torch.stack(list(redo))
    return fixed


def _real_view(tensors: list[torch.Tensor], norm_type: float) -> list[torch.Tensor]:
    """Complex grads as real tensors with the same p-norm: for p=2 the (re, im) pairs (no copy),
    otherwise the magnitudes. torch measures complex grads by their magnitudes too."""
    if norm_type == 2:
        return [torch.view_as_real(t) if t.is_contiguous() else torch.view_as_real(t.contiguous()) for t in tensors]
    return [t.abs() for t in tensors]


def group_partial(tensors: list[torch.Tensor], weight: float, norm_type: float, foreach: Optional[bool]) -> torch.Tensor:
    """Float64 partial (see module docstring) of same-device, same-dtype, same-weight tensors."""
    if tensors[0].is_complex():
        tensors = _real_view(tensors, norm_type)
    device, dtype = tensors[0].device, tensors[0].dtype
    acc = accumulation_dtype(dtype, device, norm_type)
    # Reading a CPU tensor is not a device sync: there float32 is checked and repaired.
    repair = 0 < norm_type < math.inf and acc == torch.float32 and host_reads_allowed(device)
    norms = piece_norms(tensors, norm_type, acc, foreach, repair).double()
    if norm_type == math.inf:
        return norms.max() if norms.numel() else norms.new_full((), -math.inf)
    if norm_type == -math.inf:
        partial = norms.min() if norms.numel() else norms.new_full((), math.inf)
    elif norm_type > 0:
        return norms.pow(norm_type).sum() * weight
    else:
        partial = (norms.sum() if norm_type == 0 else norms.pow(norm_type).sum()) * weight
    # p <= 0 is blind to non-finite values (an inf is just a non-zero, or larger than the min);
    # a max-abs pass poisons the partial with NaN so a NaN or inf grad always shows.
    max_acc = torch.float64 if dtype == torch.float64 else torch.float32  # a max is exact in the grad's range
    return partial + piece_norms(tensors, math.inf, max_acc, foreach).double().sum() * 0.0


def local_partial(groups: dict[GroupKey, list[torch.Tensor]], norm_type: float, foreach: Optional[bool], device: torch.device) -> torch.Tensor:
    """This rank's float64 partial on ``device`` over all its local gradients."""
    partials = [group_partial(ts, weight, norm_type, foreach).to(device) for (_, _, weight), ts in groups.items() if ts]
    if norm_type == math.inf:
        identity = -math.inf
    elif norm_type == -math.inf:
        identity = math.inf
    else:
        identity = 0.0
    if not partials:
        return torch.full((), identity, dtype=torch.float64, device=device)  # a fill, not a host copy
    stacked = torch.stack(partials)
    if norm_type == math.inf:
        return stacked.max()
    if norm_type == -math.inf:
        return stacked.min()
    return stacked.sum()
