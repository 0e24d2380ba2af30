"""Local math: this rank's partial norm over the gradients it holds.

The partial is a float64 scalar that the reduction combines across ranks:

    p > 0:             sum(weight * sum(|g|^p))
    p < 0:             the same, NaN if any grad is non-finite
    p == 0:            sum(weight * count(g != 0)), NaN if any grad is non-finite
    p == inf:          max |g|   (NaN if any grad is NaN)
    p == -inf:         min |g|   (NaN if any grad is non-finite)

Norms are taken per piece (see ``_Pieces``: on CPU rows of about ``ROW`` elements, small grads
copied into flat chunks; on accelerators one ``torch._foreach_norm`` per group) and accumulated at
least in float32; only the per-piece values are raised to ``p`` and summed in float64. On CPU
the default p=2 never converts a grad to float64 (other p accumulate in float64 for accuracy, at
a cost); on accelerators ``_foreach_norm`` accumulates in float64 in-kernel. Every copy a norm
needs (a conversion, the float64 repair, complex magnitudes) is made a bounded block at a time
(``block_elements``), so one call's extra memory stays a small fraction of the grads' bytes.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import math
import operator
from collections.abc import Sequence
from typing import NamedTuple, Optional, cast

import torch

from distclip._torch import base_of, below_autograd, flatten_dense_tensors
from distclip.host_reads import host_reads_allowed

GroupKey = tuple  # (device, dtype, weight): how local grads are grouped for one kernel each

# On CPU every norm is taken over pieces of about ROW elements (at most ROW_MAX), then the piece norms are combined
# in float64. torch's CPU kernel accumulates float32 in a few lanes, so its error grows with the
# length it reduces, while row-wise reduction runs at the same speed for every width from 256 to
# 8192 (benchmarks/README.md, "Row length").
ROW = 512
# The grad dtypes whose norms are returned in float64 (every other dtype's in float32)
FLOAT64_DTYPES = (torch.float64, torch.complex128)
# A tensor measured in place is cut into rows of one length (``row_shape``): ROW, or where ROW does
# not divide its size, a divisor of it between ROW_MIN and ROW_MAX, so that it needs one view and
# one norm kernel instead of a second view for its tail and that tail's copy into a flat chunk
# (FSDP1's flat shards have any size; benchmarks/README.md, "FSDP1"). Rows of up to 1024 elements
# keep the error within 2.5x of 512's (above).
ROW_MIN, ROW_MAX = ROW // 2, 2 * ROW


class RowShape(NamedTuple):
    """How an in-place tensor of ``rows * length + tail`` elements is cut into pieces."""

    rows: int
    length: int
    tail: int


@functools.lru_cache(maxsize=1 << 12)  # a pure function of the size: a model has few distinct sizes
def row_shape(n: int) -> RowShape:
    """The rows of a tensor of ``n > ROW`` elements: of ``ROW`` elements if that divides ``n``, else
    of the divisor of ``n`` in [``ROW_MIN``, ``ROW_MAX``] nearest to ``ROW``, else of ``ROW`` elements
    and a tail."""
    if n % ROW:
        for d in range(1, ROW_MAX - ROW + 1):
            for length in (ROW + d, ROW - d):
                if ROW_MIN <= length <= ROW_MAX and n % length == 0:
                    return RowShape(n // length, length, 0)
    return RowShape(n // ROW, ROW, n % ROW)


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


def may_be_views(tensors: list[torch.Tensor]) -> bool:
    """Whether coalescing could merge anything: grads that are views of one buffer (FSDP2, DDP
    buckets, FSDP1 orig params) come as neighbours sharing a base. Separate grads, even views of
    their own tensors (``DTensor.from_local`` keeps a view), skip the pass. Only speed depends on
    this answer."""
    for a, b in ((0, 1), (-2, -1)):
        if len(tensors) > 1 and base_of(tensors[a]) is not None and base_of(tensors[a]) is base_of(tensors[b]):
            return True
    return False


def coalesce(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Merge runs of contiguous views that lie back to back in one base tensor into 1-D views.

    FSDP2's sharded grads are views into one reduce-scatter buffer per group (DDP's with
    ``gradient_as_bucket_view`` and FSDP1's with ``use_orig_params`` likewise), so a model with
    thousands of parameters needs a handful of kernels instead of one per parameter. Only exact
    adjacency inside the same base merges: padding between views is never read. Empty tensors
    are dropped.
    """
    return _merge(tensors, _runs(tensors))


# A run of a coalesced group: tensors[start:stop] (non-empty; more than one lie back to back in
# one base and are merged into one 1-D view of ``numel`` elements).
Run = tuple[int, int, int]  # (start, stop, numel)


def _runs(tensors: list[torch.Tensor]) -> list[Run]:
    runs: list[Run] = []
    base: Optional[torch.Tensor] = None
    end = 0
    itemsize = tensors[0].element_size() if tensors else 0  # one dtype per group
    for i, t in enumerate(tensors):
        n = t.numel()
        if n == 0:
            continue
        t_base = base_of(t)  # views share their root base; standalone tensors never merge
        if t_base is None or not t.is_contiguous():
            runs.append((i, i + 1, n))
            base = None
            continue
        ptr = t.data_ptr()
        if runs and base is not None and t_base is base and ptr == end:
            first, _, numel = runs[-1]
            runs[-1] = (first, i + 1, numel + n)
        else:
            runs.append((i, i + 1, n))
            base = t_base
        end = ptr + n * itemsize
    return runs


def _merge(tensors: list[torch.Tensor], runs: list[Run]) -> list[torch.Tensor]:
    out = []
    for start, stop, numel in runs:
        first = tensors[start]
        out.append(first if stop - start == 1 else first.as_strided((numel,), (1,), first.storage_offset()))
    return out


class Coalescer:
    """:func:`coalesce` for one group of a plan, remembered across calls.

    FSDP2 and DDP bucket views come back every step at the same storage offsets with the same
    sizes, only in a new buffer. The first call finds the runs (Python per tensor); later calls
    check that the group's tensors still have the offsets, sizes and contiguity it saw, that each
    run still shares one base, and that no two neighbouring runs that lie back to back now share
    one (C-level ``map`` calls, a few per tensor), and merge by the remembered runs; anything else
    finds the runs anew. The views it returns are those :func:`coalesce` would return.
    """

    def __init__(self) -> None:
        self.runs: Optional[list[Run]] = None
        self.offsets: list = []
        self.numels: list = []
        self.seams: list[tuple[int, int]] = []  # (last of a run, first of the next) lying back to back

    def merge(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        offsets = list(map(torch.Tensor.storage_offset, tensors))
        if self.runs is not None and offsets == self.offsets and list(map(torch.Tensor.numel, tensors)) == self.numels:
            bases = list(map(base_of, tensors))
            if self._still_holds(tensors, bases):
                return _merge(tensors, self.runs)
        self._learn(tensors, offsets)
        assert self.runs is not None
        return _merge(tensors, self.runs)

    def _still_holds(self, tensors: list[torch.Tensor], bases: list[Optional[torch.Tensor]]) -> bool:
        assert self.runs is not None
        for start, stop, _ in self.runs:
            if stop - start == 1:
                continue
            first = bases[start]
            if first is None or not all(map(operator.is_, bases[start + 1 : stop], itertools.repeat(first))):
                return False
            if not all(map(torch.Tensor.is_contiguous, tensors[start:stop])):
                return False
        for a, b in self.seams:  # split before: merged now if both are contiguous views of one base
            if bases[a] is not None and bases[a] is bases[b] and tensors[a].is_contiguous() and tensors[b].is_contiguous():
                return False
        return True

    def _learn(self, tensors: list[torch.Tensor], offsets: list) -> None:
        runs = _runs(tensors)
        numels = list(map(torch.Tensor.numel, tensors))
        seams = []
        for (_, stop, _), (start, _, _) in zip(runs, runs[1:]):
            last = stop - 1
            while last > 0 and numels[last] == 0:
                last -= 1
            if offsets[last] + numels[last] == offsets[start]:
                seams.append((last, start))
        self.runs, self.offsets, self.numels, self.seams = runs, offsets, numels, seams


def scale_(groups: dict[GroupKey, list[torch.Tensor]], coef: torch.Tensor, foreach: Optional[bool]) -> None:
    """Multiply every tensor in place by the 0-dim ``coef`` (no host sync).

    ``coef`` is cast to float32/float64 groups' own dtype: ``_foreach_mul_`` with a 0-dim tensor
    of another dtype takes a slow per-tensor path (benchmarks/README.md, "scale"). The cast
    is deterministic, so every rank still multiplies by the same bits. Low-precision groups get a
    float32 coefficient, as in torch. Never a Python scalar: on CPU ``_foreach_mul_`` with a scalar
    is about three times slower than with a 0-dim tensor (benchmarks/README.md, "scale").
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


# On CPU a norm kernel's fixed cost per tensor (``_foreach_norm`` loops over tensors there) is
# more than reading 16K floats. Tensors below FLAT_MAX elements are therefore copied into flat
# buffers and measured row by row (benchmarks/README.md, "Row length"; with two ranks sharing the
# memory bus the copy costs more, hence the lower bound). The copy
# is made chunk by chunk, one chunk alive at a time, each at most 1/20 of the group's grad bytes
# and at most FLAT_CHUNK elements, so the extra memory stays under 10% of the rank's local grad
# bytes; a tensor larger than a chunk is measured in place. Small models get chunks of at least
# FLAT_CHUNK_MIN elements (128 KB of float32) instead: each chunk costs a copy call, a norm call
# and the overflow check (fixed costs that dominate below a few MB of grads), and 1/20 of a small
# model's grads is too little memory to matter.
FLAT_MIN = 2  # fewer candidates than this are measured in place
FLAT_MAX = 1 << 13
FLAT_CHUNK = 1 << 20
FLAT_CHUNK_MIN = 1 << 15
# A CPU p=2 group of at most this many elements is measured in one float64 copy (``group_partial``).
SMALL_GROUP = 1 << 16


def chunk_elements(total: int) -> int:
    """Elements per flat chunk (a multiple of ``ROW``) for a group of ``total`` elements."""
    return max(FLAT_CHUNK_MIN, min(FLAT_CHUNK, total // 20)) // ROW * ROW


# Every copy a norm makes (the conversion to the accumulation dtype, which torch's reductions with
# ``dtype=`` make of their whole input; the float64 repair; a complex grad's magnitudes) is made a
# block of at most ``block_elements`` elements at a time, never of a whole tensor or flat chunk: a
# bf16 grad once cost twice its bytes in float32 and four times in float64 (benchmarks/README.md,
# "Memory"). A block's float64 copy is 1/64 of the group's grad bytes, at least BLOCK_MIN elements
# (640 KiB: a small group's matrices take few blocks) and at most BLOCK_MAX (8 MiB: larger blocks
# gain no speed; blocks that stay in the cache convert faster than one pass over a whole tensor).
BLOCK_MIN = 80 << 10
BLOCK_MAX = 1 << 20
# Elements per chunk of ``_foreach_norm``'s fused accelerator kernel (torch's MultiTensorApply.cuh,
# ``kChunkSize``): it keeps one partial per chunk of its widest tensor for every tensor it is given.
FOREACH_CHUNK = 1 << 16
REPAIR_BATCH = BLOCK_MAX // ROW_MAX  # pieces gathered per float64 repair kernel (``repair_norms``)


def block_elements(nbytes: int) -> int:
    """Elements per conversion block for a group of ``nbytes`` grad bytes."""
    return max(BLOCK_MIN, min(BLOCK_MAX, nbytes // 512))


def measures_in_rows(device: torch.device) -> bool:
    """Whether norms on ``device`` are taken over rows (CPU: its kernels accumulate in a few lanes,
    see ``ROW``); accelerator reductions are tree-shaped and take whole tensors."""
    return device.type == "cpu"


class _Pieces:
    """A partition of tensors into pieces of at most ``ROW`` elements (CPU) for the norm kernels:
    ``mats`` (row matrices: one piece per row), ``flat`` (tensors to copy into flat chunks, whose
    rows are the pieces) and ``small`` (one piece each, through ``_foreach_norm``).

    With ``owned``, every piece lies inside one tensor (flat tensors are zero-padded to whole rows)
    and ``*_owner`` say which: the index in ``tensors`` of each mat, flat tensor and small piece.
    With ``magnitudes``, the tensors are complex and measured by their magnitudes, taken a chunk,
    block or batch at a time. ``block``: elements per conversion block (``block_elements``).

    On accelerators every tensor is a small piece; where ``_foreach_norm`` would copy whole
    tensors (``_copies_whole``), tensors above ``block`` elements are cut into views of ``block``.
    """

    def __init__(
        self,
        tensors: list[torch.Tensor],
        flatten: bool,
        owned: bool = False,
        magnitudes: bool = False,
        norm_type: float = 2.0,
        acc: Optional[torch.dtype] = None,
    ) -> None:
        self.mats: list[torch.Tensor] = []
        self.flat: list[torch.Tensor] = []
        self.small: list[torch.Tensor] = []
        self.owned = owned
        self.magnitudes = magnitudes
        self.mat_owner: list[int] = []
        self.flat_owner: list[int] = []
        self.small_owner: list[int] = []
        self.chunk_owners: list[torch.Tensor] = []  # filled as ``chunks`` is consumed (owned only)
        self.chunk = 0
        self.block = BLOCK_MIN
        self.widest = 0  # accelerators: at least the largest small piece (``_batches``)
        numels = list(map(torch.Tensor.numel, tensors))  # C-level: no Python per tensor
        if not numels:
            return
        total = sum(numels)
        # magnitudes: torch's complex abs makes a complex temporary of its input, and the
        # magnitudes and their conversion come on top: a quarter of the block. At least a row.
        self.block = max(ROW_MAX, min(total, block_elements(total * tensors[0].element_size()) // (4 if magnitudes else 1)))
        if not measures_in_rows(tensors[0].device):
            kept = [i for i, n in enumerate(numels) if n] if 0 in numels else range(len(tensors))
            self.small = [tensors[i] for i in kept] if 0 in numels else list(tensors)
            self.small_owner = list(kept) if owned else []
            self.widest = max(numels)
            if self.small and _copies_whole(self.small, norm_type, acc, magnitudes):
                self._split_small()
            return
        self.chunk = chunk_elements(total)
        flat_max = min(FLAT_MAX, self.chunk + 1)
        if flatten and max(numels) < flat_max and min(numels) > 0 and len(tensors) >= FLAT_MIN:
            self.flat = list(tensors)  # the common case of many small grads: no Python per tensor
            self.flat_owner = list(range(len(tensors))) if owned else []
            return
        if min(numels) >= (flat_max if flatten else ROW + 1) and all(map(torch.Tensor.is_contiguous, tensors)):
            # The common case of large grads (FSDP1's flat shards): each a row matrix in place,
            # one C-level view call per tensor, where no size leaves a tail.
            views = list(map(_mat_view, numels))
            if None not in views:
                found = cast(list[tuple[tuple[int, int], tuple[int, int]]], views)
                sizes, strides = map(operator.itemgetter(0), found), map(operator.itemgetter(1), found)
                self.mats = list(map(torch.Tensor.as_strided, tensors, sizes, strides))
                self.mat_owner = list(range(len(tensors))) if owned else []
                return
        for i, (t, n) in enumerate(zip(tensors, numels)):
            if n == 0:
                continue
            if flatten and n < flat_max:
                self.flat.append(t)
                self.flat_owner.append(i)
            elif n <= ROW:
                self.small.append(t)
                self.small_owner.append(i)
            else:
                self._rows(t, n, i, flatten)
        if len(self.flat) < FLAT_MIN:
            flat, self.flat, flat_owner, self.flat_owner = self.flat, [], self.flat_owner, []
            for t, i in zip(flat, flat_owner):
                if t.numel() <= ROW:
                    self.small.append(t)
                    self.small_owner.append(i)
                else:
                    self._rows(t, t.numel(), i, False)

    def _rows(self, t: torch.Tensor, n: int, owner: int, flatten: bool) -> None:
        if not t.is_contiguous():  # rare; a copy keeps the accurate row path
            t = t.contiguous()
        rows, length, tail_numel = row_shape(n)
        self.mats.append(t.as_strided((rows, length), (length, 1)))  # one view call per tensor
        self.mat_owner.append(owner)
        if tail_numel:
            tail = t.as_strided((tail_numel,), (1,), t.storage_offset() + rows * length)
            if flatten:
                self.flat.append(tail)
                self.flat_owner.append(owner)
            else:
                self.small.append(tail)
                self.small_owner.append(owner)

    def _split_small(self) -> None:
        """Cut the small pieces above ``block`` elements into views of at most ``block`` (along
        the first dim where a tensor is not contiguous, which bounds them where its rows are
        smaller than a block)."""
        block = self.block
        if self.widest <= block:
            return
        self.widest = block
        small, owners = self.small, self.small_owner
        self.small, self.small_owner = [], []
        for k, t in enumerate(small):
            n = t.numel()
            if n <= block:
                parts: Sequence[torch.Tensor] = (t,)
            elif t.is_contiguous():
                parts = t.view(-1).split(block)
            else:
                parts = t.split(max(1, block // (n // t.shape[0])), dim=0)
            self.small.extend(parts)
            if owners:
                self.small_owner.extend([owners[k]] * len(parts))

    def chunks(self):
        """Yield ``flat`` copied into (rows, ROW) matrices, zero-padded, a bounded chunk at a time
        (the caller drops each before asking for the next), with the owner of each row (a tensor
        of indices) if ``owned``, else None. Owned chunks pad every tensor to whole rows."""
        numels = list(map(torch.Tensor.numel, self.flat))
        sizes = [-(-n // ROW) * ROW for n in numels] if self.owned else numels
        ends = list(itertools.accumulate(sizes))
        zeros = self.flat[0].new_zeros(ROW) if self.owned and self.flat else None
        i = 0
        while i < len(ends):
            base = ends[i - 1] if i else 0
            j = max(bisect.bisect_right(ends, base + self.chunk, lo=i), i + 1)  # tensors i..j-1 fit
            owner = None
            if self.owned:
                assert zeros is not None
                chunk = []
                for t, n, size in zip(self.flat[i:j], numels[i:j], sizes[i:j]):
                    chunk.append(t)
                    if size != n:
                        chunk.append(zeros[: size - n])
                rows = torch.tensor([size // ROW for size in sizes[i:j]])
                owner = torch.tensor(self.flat_owner[i:j]).repeat_interleave(rows)
            else:
                chunk = self.flat[i:j]
                pad = -(ends[j - 1] - base) % ROW
                if pad:
                    chunk.append(chunk[0].new_zeros(pad))
            # private but stable (DDP, FSDP1 and apex use it): one C++ call copies the whole chunk
            flat = flatten_dense_tensors(chunk)
            del chunk
            yield flat.view(-1, ROW), owner
            del flat
            i = j


def _copies_whole(tensors: list[torch.Tensor], norm_type: float, acc: Optional[torch.dtype], magnitudes: bool) -> bool:
    """Whether ``_foreach_norm`` on an accelerator would copy whole tensors: for magnitudes, and
    where it converts to ``acc`` on its per-tensor fallback (``linalg_vector_norm``, which converts
    its whole input). torch's ForeachReduceOp.cu takes that fallback (``use_slowpath``) for p other
    than 1, 2 and inf and for tensors its fused kernel cannot read (contiguity is the test here: a
    stricter one than the kernel's)."""
    if magnitudes:
        return True
    if acc is None or tensors[0].dtype == acc:
        return False
    return norm_type not in (1.0, 2.0, math.inf) or not all(map(torch.Tensor.is_contiguous, tensors))


@functools.lru_cache(maxsize=1 << 12)
def _mat_view(n: int) -> Optional[tuple[tuple[int, int], tuple[int, int]]]:
    """The (size, stride) of the row matrix of a tensor of ``n > ROW`` elements; None if
    ``row_shape`` leaves it a tail."""
    rows, length, tail = row_shape(n)
    return None if tail else ((rows, length), (length, 1))


class _Scratch:
    """One buffer of at most ``block`` elements per dtype, reused by every block of a group: fresh
    block copies fragment the C heap (the small norms kept between them land in the holes a freed
    block leaves), and resident memory then grows by every block (benchmarks/README.md, "Memory")."""

    def __init__(self, block: int) -> None:
        self.block = block
        self.buffers: dict[torch.dtype, torch.Tensor] = {}

    def like(self, m: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised contiguous matrix of ``m``'s shape (at most ``block`` elements) and ``dtype``."""
        buffer = self.buffers.get(dtype)
        if buffer is None:
            buffer = self.buffers[dtype] = torch.empty(self.block, dtype=dtype, device=m.device)
        return buffer.as_strided(m.shape, (m.shape[1], 1))


def _block_rows(m: torch.Tensor, magnitudes: bool, scratch: _Scratch, dtype: torch.dtype) -> torch.Tensor:
    """The block of rows ``m`` (at most ``scratch.block`` elements) as ``dtype``, in ``scratch``:
    the copy a reduction with ``dtype=`` makes; with ``magnitudes``, of ``m``'s magnitudes."""
    if magnitudes:
        m = torch.abs(m, out=scratch.like(m, m.dtype.to_real()))
    return m if m.dtype == dtype else scratch.like(m, dtype).copy_(m)


def _block_norms(m: torch.Tensor, norm_type: float, acc: torch.dtype, magnitudes: bool, scratch: _Scratch) -> torch.Tensor:
    """Norms of the rows of ``m``: in one kernel where that copies nothing, else (a conversion to
    ``acc``, magnitudes) a block of rows at a time through ``scratch``."""
    if not magnitudes and m.dtype == acc:
        return torch.linalg.vector_norm(m, norm_type, dim=1)
    step = max(1, scratch.block // m.shape[1])
    blocks = (_block_rows(m[i : i + step], magnitudes, scratch, acc) for i in range(0, m.shape[0], step))
    parts = [torch.linalg.vector_norm(b, norm_type, dim=1) for b in blocks]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def piece_norms(
    tensors: list[torch.Tensor],
    norm_type: float,
    acc: torch.dtype,
    foreach: Optional[bool],
    repair: bool = False,
    magnitudes: bool = False,
) -> torch.Tensor:
    """1-D tensor of norms of pieces that partition ``tensors`` (see ``_Pieces``).

    With ``repair`` (CPU, float32 accumulation of a finite p > 0), pieces whose norm overflowed or
    may have underflowed are recomputed in float64 (see ``TINY``). With ``magnitudes``, complex
    ``tensors`` are measured by their magnitudes.
    """
    # The pieces are views and copies made here and dropped here: no graph records them.
    with below_autograd():
        # zero padding of flat chunks would change min|g| and sum |g|^p for p < 0
        pieces = _Pieces(tensors, foreach is not False and norm_type >= 0, magnitudes=magnitudes, norm_type=norm_type, acc=acc)
        return _cat(_piece_norm_parts(pieces, norm_type, acc, foreach, repair), acc, tensors[0].device if tensors else None)


def owned_piece_norms(
    tensors: list[torch.Tensor], norm_type: float, acc: torch.dtype, repair: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``piece_norms`` for per-tensor norms: (norms of pieces that each lie inside one tensor, the
    index in ``tensors`` of the tensor each piece belongs to). Flat chunks pad every tensor to
    whole rows, so p < 0 (where a zero counts) measures tensors in place."""
    pieces = _Pieces(tensors, norm_type >= 0, owned=True, norm_type=norm_type, acc=acc)
    parts = _piece_norm_parts(pieces, norm_type, acc, None, repair)
    owners = list(pieces.chunk_owners)
    if pieces.mats:
        rows = torch.tensor([m.shape[0] for m in pieces.mats])
        owners.append(torch.tensor(pieces.mat_owner).repeat_interleave(rows))
    if pieces.small:
        owners.append(torch.tensor(pieces.small_owner))
    device = tensors[0].device if tensors else None
    norms = _cat(parts, acc, device)
    owner = torch.cat(owners) if owners else torch.empty(0, dtype=torch.long)
    return norms, owner.to(norms.device)


def _cat(parts: list[torch.Tensor], acc: torch.dtype, device: Optional[torch.device]) -> torch.Tensor:
    if not parts:
        return torch.empty(0, dtype=acc, device=device)
    if len(parts) == 1:
        return parts[0]
    return torch.cat([p.double() for p in parts]) if any(p.dtype != acc for p in parts) else torch.cat(parts)


def _piece_norm_parts(pieces: _Pieces, norm_type: float, acc: torch.dtype, foreach: Optional[bool], repair: bool) -> list[torch.Tensor]:
    """The norms of ``pieces`` in order: flat chunk rows, mat rows, small pieces."""
    parts = []
    scratch = _Scratch(pieces.block)  # allocated on first use
    for m, owner in pieces.chunks():
        norms = _block_norms(m, norm_type, acc, pieces.magnitudes, scratch)
        if repair:  # checked now: the chunk is dropped next (never with magnitudes: p != 2 is float64)
            norms = repair_norms(norms, lambda idx, m=m: m.index_select(0, idx), norm_type, max(1, pieces.block // ROW))
        parts.append(norms)
        if owner is not None:
            pieces.chunk_owners.append(owner)
        del m
    if pieces.mats:
        mats = pieces.mats
        if not pieces.magnitudes and mats[0].dtype == acc:  # one kernel per matrix, nothing copied (a C-level map)
            rows = list(map(torch.linalg.vector_norm, mats, itertools.repeat(norm_type), itertools.repeat(1)))
        else:
            rows = [_block_norms(m, norm_type, acc, pieces.magnitudes, scratch) for m in mats]
        norms = torch.cat(rows) if len(rows) > 1 else rows[0]
        if repair:  # one check for all matrices: FSDP1 has many
            norms = _repair_mats(norms, mats, norm_type, pieces.magnitudes, scratch)
        parts.append(norms)
    if pieces.small:
        parts.extend(_small_norms(pieces.small, norm_type, acc, foreach, repair, pieces.magnitudes, pieces.block, pieces.widest))
    return parts


def _small_norms(
    small: list[torch.Tensor],
    norm_type: float,
    acc: torch.dtype,
    foreach: Optional[bool],
    repair: bool,
    magnitudes: bool,
    block: int,
    widest: int,
) -> list[torch.Tensor]:
    """The norms of ``small``, one tensor per ``_batches`` run."""
    parts = []
    for i, j in _batches(small, block, magnitudes, widest):
        batch = small[i:j] if j - i < len(small) else small
        if magnitudes:
            batch = [t.abs() for t in batch]
        if foreach is False:
            norms = torch.stack([torch.linalg.vector_norm(t, norm_type, dtype=acc) for t in batch])
        else:
            norms = torch.stack(list(torch._foreach_norm(batch, norm_type, dtype=acc)))
        if repair:
            norms = repair_norms(norms, lambda idx, batch=batch: [batch[k] for k in idx.tolist()], norm_type)
        parts.append(norms)
    return parts


def _batches(tensors: list[torch.Tensor], block: int, magnitudes: bool, widest: int) -> list[tuple[int, int]]:
    """Runs ``tensors[i:j]`` measured by one ``_foreach_norm`` each, such that the partials of its
    fused accelerator kernel (one per ``FOREACH_CHUNK`` of the widest tensor, for every tensor;
    ``widest``: at least the largest numel, 0 where no fused kernel runs) and, with ``magnitudes``,
    the run's magnitudes stay within ``block`` elements. A tensor's norm does not depend on its run."""
    if not magnitudes and len(tensors) * -(-widest // FOREACH_CHUNK) <= block:
        return [(0, len(tensors))]
    numels = list(map(torch.Tensor.numel, tensors))
    runs = []
    start = count = run_chunks = elements = 0  # the current run: tensors, chunks of its widest, elements
    for i, n in enumerate(numels):
        chunks = max(run_chunks, -(-n // FOREACH_CHUNK))
        if count and ((count + 1) * chunks > block or (magnitudes and elements + n > block)):
            runs.append((start, i))
            start, count, chunks, elements = i, 0, -(-n // FOREACH_CHUNK), 0
        count, run_chunks, elements = count + 1, chunks, elements + n
    runs.append((start, len(numels)))
    return runs


# A float32 piece norm below this may have lost its value to underflow of g^2 (fp32/bf16 grads of
# ~1e-22 and smaller: the squares fall below float32's normal range). A piece has at most ROW_MAX
# (1024) elements on CPU, so a piece whose norm is at least TINY has a sum of squares of at least
# TINY^2 = 2^-100, and what its underflowed squares lose (each less than float32's smallest
# subnormal, 2^-149) is below 1024 * 2^-149 / 2^-100 = 2e-12 of it.
TINY = 2.0**-50


def _sound(norms: torch.Tensor) -> bool:
    """Whether no piece needs the float64 repair, read from one ``aminmax`` (CPU only: free reads)
    instead of a flag per piece. A NaN piece, never repaired, makes both ends NaN: False, and the
    caller's flags decide."""
    if not norms.numel():
        return True
    low, high = torch.aminmax(norms)
    return low.item() >= TINY and high.item() < math.inf


def repair_norms(norms: torch.Tensor, pieces_at, norm_type: float, batch: int = REPAIR_BATCH) -> torch.Tensor:
    """CPU slow path, taken only for the pieces whose float32 norm overflowed (sum g^2 beyond
    float32 although the norm is representable: fairscale #263) or may have underflowed (below
    ``TINY``, which includes all-zero pieces): those pieces alone (``pieces_at(indices)``) are
    recomputed in float64, ``batch`` pieces at a time.

    ``pieces_at`` returns the pieces as the rows of one matrix where they are rows (measured in one
    call: a model whose grads are mostly zero, such as experts that saw no token, would otherwise
    pay one kernel per 512 elements; benchmarks/README.md) or as a list of tensors."""
    if _sound(norms):
        return norms
    bad = torch.isinf(norms) | (norms < TINY)
    if not bool(bad.any()):  # CPU only: a free read
        return norms
    fixed = norms.double()
    for idx in bad.nonzero().flatten().split(batch):
        pieces = pieces_at(idx)
        if isinstance(pieces, torch.Tensor):
            fixed[idx] = torch.linalg.vector_norm(pieces, norm_type, dim=1, dtype=torch.float64)
        else:
            fixed[idx] = torch.stack(list(torch._foreach_norm(pieces, norm_type, dtype=torch.float64)))
        del pieces
    return fixed


def _repair_mats(norms: torch.Tensor, mats: list[torch.Tensor], norm_type: float, magnitudes: bool, scratch: _Scratch) -> torch.Tensor:
    """``repair_norms`` for the concatenated row norms of matrices measured in place: every block of
    rows (``scratch.block`` elements) that holds a bad row is measured again in float64, in place,
    not its whole matrix (no gather: mostly-zero grads, such as experts that saw no token, would
    otherwise copy every row, or pay one kernel per 512 elements)."""
    if _sound(norms):
        return norms
    bad = torch.isinf(norms) | (norms < TINY)
    if not bool(bad.any()):  # CPU only: a free read
        return norms
    starts = list(itertools.accumulate((m.shape[0] for m in mats), initial=0))
    fixed = norms.double()
    bad_mats = torch.bucketize(bad.nonzero().flatten(), torch.tensor(starts[1:]), right=True).unique().tolist() if len(mats) > 1 else [0]
    for i in bad_mats:
        m, at = mats[i], starts[i]
        rows, step = m.shape[0], max(1, scratch.block // m.shape[1])
        if rows <= step:
            blocks = [0]
        else:  # per-block flags without a list of the bad rows
            flags, whole = bad[at : starts[i + 1]], rows // step * step
            blocks = flags[:whole].view(-1, step).any(1).nonzero().flatten().tolist()
            if whole < rows and bool(flags[whole:].any()):
                blocks.append(rows // step)
        for k in blocks:
            start, stop = k * step, min(rows, (k + 1) * step)
            if rows <= step and not magnitudes:  # one block, whose copy nothing outlives: no scratch
                fixed[at : at + rows] = torch.linalg.vector_norm(m, norm_type, dim=1, dtype=torch.float64)
                continue
            block = _block_rows(m[start:stop], magnitudes, scratch, torch.float64)
            fixed[at + start : at + stop] = torch.linalg.vector_norm(block, norm_type, dim=1)
    return fixed


def real_view(tensors: list[torch.Tensor], norm_type: float) -> list[torch.Tensor]:
    """Complex grads as real tensors with the same p-norm: for p=2 the (re, im) pairs (no copy),
    otherwise the magnitudes. torch measures complex grads by their magnitudes too."""
    if norm_type == 2:
        return [torch.view_as_real(t) if t.is_contiguous() else torch.view_as_real(t.contiguous()) for t in tensors]
    return [t.abs() for t in tensors]


def empty_partial(norm_type: float) -> float:
    """A partial's value when it covers no element: the identity of its reduction."""
    return -math.inf if norm_type == math.inf else (math.inf if norm_type == -math.inf else 0.0)


def repairs_float32(norm_type: float, acc: torch.dtype, device: torch.device) -> bool:
    """Whether float32 piece norms are checked and repaired (see ``repair_norms``): finite p > 0 on the
    host, where reading a tensor is not a device sync."""
    return 0 < norm_type < math.inf and acc == torch.float32 and host_reads_allowed(device)


def is_small_group(tensors: Sequence[torch.Tensor], norm_type: float, repair: bool) -> bool:
    """Whether a CPU p=2 group is measured in one float64 copy rather than in float32 pieces
    (``group_partial``; ``grad_norms`` measures the same groups the same way, so that its
    ``"total"`` matches ``get_total_norm`` to float64 rounding)."""
    return repair and norm_type == 2 and len(tensors) > 1 and sum(map(torch.Tensor.numel, tensors)) <= SMALL_GROUP


def group_partial(tensors: list[torch.Tensor], weight: float, norm_type: float, foreach: Optional[bool]) -> torch.Tensor:
    """Float64 partial (see module docstring) of same-device, same-dtype, same-weight tensors."""
    # complex grads: p=2 through real views; other p by magnitudes, taken a block at a time
    magnitudes = tensors[0].is_complex() and norm_type != 2
    if tensors[0].is_complex() and not magnitudes:
        tensors = real_view(tensors, norm_type)
    device, dtype = tensors[0].device, tensors[0].dtype.to_real()
    acc = accumulation_dtype(dtype, device, norm_type)
    repair = repairs_float32(norm_type, acc, device)
    if is_small_group(tensors, norm_type, repair):
        # A small group (a small model): one float64 copy and one dot product. Nothing to
        # repair in float64, and four kernels instead of the pieces' dozen, whose fixed cost is
        # all there is to a small model's norm.
        flat = flatten_dense_tensors(tensors).double()
        partial = torch.dot(flat, flat)
        return partial if weight == 1.0 else partial * weight
    norms = piece_norms(tensors, norm_type, acc, foreach, repair, magnitudes).double()
    if norm_type == math.inf:
        return norms.max() if norms.numel() else norms.new_full((), -math.inf)
    if norm_type == -math.inf:
        partial = norms.min() if norms.numel() else norms.new_full((), math.inf)
    elif norm_type > 0:
        partial = norms.pow(norm_type).sum()
        return partial if weight == 1.0 else partial * weight  # x * 1.0 is x: one device op fewer
    else:
        partial = (norms.sum() if norm_type == 0 else norms.pow(norm_type).sum()) * weight
    # p <= 0 is blind to non-finite values (an inf is just a non-zero, or larger than the min);
    # a max-abs pass poisons the partial with NaN so a NaN or inf grad always shows.
    max_acc = torch.float64 if dtype == torch.float64 else torch.float32  # a max is exact in the grad's range
    return partial + piece_norms(tensors, math.inf, max_acc, foreach, magnitudes=magnitudes).double().sum() * 0.0


@functools.lru_cache(maxsize=64)
def _piece_weights(runs: tuple[tuple[float, int], ...], pinned: bool) -> torch.Tensor:
    """The weight of each tensor, in order, from (weight, count) runs: a host tensor (never
    written to), pinned for a copy to CUDA without a sync."""
    weights = torch.tensor([w for w, n in runs for _ in range(n)], dtype=torch.float64)
    return weights.pin_memory() if pinned else weights


def _weighted_partial(
    groups: dict[GroupKey, list[torch.Tensor]], norm_type: float, foreach: Optional[bool], device: torch.device
) -> Optional[torch.Tensor]:
    """Accelerators, groups of one device and dtype that differ by weight alone (a 2-D mesh and
    its submesh), finite p > 0: one norm kernel over every tensor and ``dot(norms^p, weights)``,
    a handful of device ops whatever the number of groups (a sum in another order than one per
    group, float64 either way). None where that does not apply."""
    live = [(key, ts) for key, ts in groups.items() if ts]
    if len(live) < 2 or not 0 < norm_type < math.inf or foreach is False or host_reads_allowed(device) or measures_in_rows(device):
        return None
    first = live[0][1][0]
    if first.is_complex() or first.device != device or any(key[:2] != live[0][0][:2] for key, _ in live):
        return None
    tensors = [t for _, ts in live for t in ts]
    acc = accumulation_dtype(first.dtype, device, norm_type)
    # one piece per tensor, in order (``_Pieces`` on accelerators): none empty (dropped) or cut (copies)
    if min(map(torch.Tensor.numel, tensors)) == 0 or _copies_whole(tensors, norm_type, acc, False):
        return None
    norms = piece_norms(tensors, norm_type, acc, foreach).double()
    runs = tuple((key[2], len(ts)) for key, ts in live)
    weights = _piece_weights(runs, device.type == "cuda").to(device, non_blocking=True)
    return torch.dot(norms.pow(norm_type), weights)


def local_partial(groups: dict[GroupKey, list[torch.Tensor]], norm_type: float, foreach: Optional[bool], device: torch.device) -> torch.Tensor:
    """This rank's float64 partial on ``device`` over all its local gradients."""
    fused = _weighted_partial(groups, norm_type, foreach, device)
    if fused is not None:
        return fused
    partials = [group_partial(ts, weight, norm_type, foreach) for (_, _, weight), ts in groups.items() if ts]
    if len(partials) == 1 and partials[0].device == device:
        return partials[0]
    partials = [t.to(device) for t in partials]
    if not partials:
        return torch.full((), empty_partial(norm_type), dtype=torch.float64, device=device)  # a fill, not a host copy
    stacked = torch.stack(partials)
    if norm_type == math.inf:
        return stacked.max()
    if norm_type == -math.inf:
        return stacked.min()
    return stacked.sum()
