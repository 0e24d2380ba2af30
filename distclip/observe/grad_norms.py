"""Seeing the norms: per-parameter and per-group global gradient norms, and how distclip sees a model.

    norms = distclip.grad_norms(model)                          # {name: norm, ..., "total": norm}
    norms = distclip.grad_norms(model, groups=lambda n: n.split(".")[0])
    logger.log(dict(zip(norms.names, norms.norms.tolist())))    # every norm in one transfer
    distclip.clip_grads_with_norm_(model, max_norm, norms["total"])   # one collective in total
    print(distclip.describe(model))                             # local, no collective

``grad_norms`` measures every local gradient once per parameter (FSDP1 flat parameters are cut
back into their original parameters' segments), weights it as ``layout.local_layout`` does, and
adds the weighted partials into a vector indexed by a *global* order of names that every rank
shares. One all-reduce of that vector (SUM for finite p, MAX for +-inf, with NaN flags) gives every
rank the same dict. The order of names is agreed once per module (one object exchange, see
``exchange``) and cached (``NameOrder``); later calls check locally that the names are unchanged
and ride a "names changed" flag on the one all-reduce, so a change on any rank makes every rank
re-agree in that same call.

What a call works out locally (names, units, weights, where each unit's partial goes) is kept as a
``NormsPlan`` per parameter list: a later call with the same parameters and grads of the same
layout (checked per parameter, as ``plan`` does for the clip) only reads the grads, measures them
and reduces. A call whose check fails, or whose parameters need more than the plan's steps (FSDP1
flat parameters), works everything out again, through the same plan type.

``parameters`` takes every form ``clip_grad_norm_`` takes (a tensor, an iterable of tensors, a
module, ``named_parameters()``, a generator); unnamed tensors are named by their position,
``"param[3]"``.
"""

from __future__ import annotations

import functools
import math
import operator
import weakref
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any, ClassVar, NamedTuple, Optional, Union, cast

import torch
import torch.distributed as dist
from torch import nn

from distclip import _fsdp1
from distclip._dtensor import local_of, spec_of
from distclip._torch import flatten_dense_tensors
from distclip.clip import _FLOAT64, _check_norm_type, join_partial_grads
from distclip.comm import agreement
from distclip.comm import failure as rank_errors
from distclip.comm import objects as exchange
from distclip.comm.packet import HostView, Packet, failed_vector
from distclip.comm.reduce import all_reduce, reduce_partial_grads, reduction_device
from distclip.layout.discovery import (
    Annotation,
    DTensor,
    GroupLike,
    Stage,
    current_stage,
    local_layout,
    pairing_names,
    shard_pieces,
    stage_copies,
)
from distclip.layout.marks import Marks
from distclip.layout.plan import identity_of
from distclip.math.partials import (
    FLAT_CHUNK,
    FLAT_MAX,
    FLAT_MIN,
    ROW,
    _real_view,
    _repair,
    accumulation_dtype,
    is_small_group,
    owned_piece_norms,
    repairs_float32,
)

__all__ = ["GradNorms", "Measured", "NameOrder", "clean_name", "describe", "describe_rows", "grad_norms"]

# What ``clip_grad_norm_`` takes, plus (name, tensor) pairs
NamedParams = Union[nn.Module, torch.Tensor, Iterable[Union[torch.Tensor, tuple[str, torch.Tensor]]]]  # noqa: UP007 - a runtime alias
Prefixes = Union[bool, Sequence[str]]  # noqa: UP007 - a runtime alias
TOTAL = "total"

# Per-entry flag slot: held + has_elements * _B + nan * _B**2 (exact in float64 for < 2**20 ranks;
# the NaN term is only used under MAX, where SUM's propagation of NaN is not available).
_B = float(2**20)
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


# ----------------------------------------------------------------------------- the result


class GradNorms(dict[str, torch.Tensor]):
    """What :func:`grad_norms` returns: the dict ``{entry: norm, ..., "total": norm}`` (0-dim
    tensors, as before) and the same norms as one tensor, so a logger reads every norm with one
    device-to-host copy (``norms.norms.tolist()``) instead of one ``.item()`` per entry.

    Attributes:
        names (tuple[str, ...]): the keys, in order (``"total"`` last).
        norms (Tensor): 1-D, ``norms[i]`` is ``self[names[i]]`` (the dict's values are views of it).
    """

    names: tuple[str, ...]
    norms: torch.Tensor

    def __init__(self, names: Sequence[str], norms: torch.Tensor) -> None:
        super().__init__(zip(names, norms.unbind()))
        self.names = tuple(names)
        self.norms = norms


# ----------------------------------------------------------------------------- local units


@dataclass
class Unit:
    """One local gradient tensor of one named parameter (an FSDP1 flat parameter gives several)."""

    name: str
    param: torch.Tensor
    tensor: torch.Tensor  # what is measured (a ``Partial`` DTensor grad when ``partial``)
    weight: float  # distclip's weight (see ``layout``)
    partial: bool = False
    segment: _fsdp1.FlatSegment | None = None


@dataclass
class Local:
    """What this rank passes: parameters, their names and its local gradient units."""

    params: list[torch.Tensor]
    module: nn.Module | None
    names: list[str]  # every local name (segments for flat parameters), with or without grad
    units: list[Unit]
    kinds: frozenset
    flat: dict[int, list[_fsdp1.FlatSegment]]  # id(flat param) -> its segments
    param_names: list[list[str]]  # per parameter, the names it stands for
    marks: dict[int, Annotation] = field(default_factory=dict)  # the parameters' marks, by id

    def annotation(self, param: torch.Tensor) -> Optional[Annotation]:
        return self.marks.get(id(param))


@dataclass
class Named:
    """``parameters`` as names and tensors (``parameters_of``): what every observe tool starts from."""

    names: list[str]
    params: list[torch.Tensor]
    module: nn.Module | None


_first = operator.itemgetter(0)
_second = operator.itemgetter(1)
_requires_grad = operator.attrgetter("requires_grad")


def parameters_of(parameters: NamedParams, trainable_only: bool = False, strip_prefixes: Prefixes = False) -> Named:
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
            leading: tuple[str, ...]) -> Named:
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
    return Named(cast(list[str], found), params, module)


def collect(parameters: Union[NamedParams, Named], stage: Stage) -> Local:
    """Names and local gradient units, from ``layout.local_layout`` (the weights distclip uses).
    Purely local; raises (before any collective) where ``local_layout`` does."""
    named = parameters if isinstance(parameters, Named) else parameters_of(parameters)
    names, params, module = named.names, named.params, named.module
    layout = local_layout(params, module, stage, entries=True)
    flat: dict[int, list[_fsdp1.FlatSegment]] = {}
    if module is not None:
        for p in params:
            if _fsdp1.is_flat_parameter(p):
                flat[id(p)] = _fsdp1.flat_segments(p)
    param_names: list[list[str]] = []
    all_names: list[str] = []
    for name, p in zip(names, params):
        segments = flat.get(id(p))
        if segments is None:
            param_names.append([name])
        else:
            prefix = name[: -len("_flat_param")] if name.endswith("_flat_param") else name + "."
            param_names.append([clean_name(prefix + s.fqn) for s in segments])
        all_names.extend(param_names[-1])
    units: list[Unit] = []
    runs_seen: set[int] = set()
    for entry in layout.entries:
        p = params[entry.index]
        segments = flat.get(id(p))
        if segments is None:
            units.append(Unit(names[entry.index], p, entry.tensor, entry.weight, entry.partial))
            continue
        if entry.offset is not None:  # FSDP1 over TP: one run of segments that share a weight
            start, stop = entry.offset, entry.offset + entry.tensor.numel()
            inside = [seg.numel and start <= seg.offset and seg.offset + seg.numel <= stop for seg in segments]
            for seg_name, seg, here in zip(param_names[entry.index], segments, inside):
                if here:
                    units.append(Unit(seg_name, p, entry.tensor[seg.offset - start : seg.offset - start + seg.numel], entry.weight, False, seg))
            if entry.index not in runs_seen:  # segments outside the shard go with the first run
                runs_seen.add(entry.index)
                # their weight (for describe; they hold no element): the run's per TP piece, whose
                # FSDP1 shards and marks every segment shares (an empty run stands for segment 0)
                model = segments[inside.index(True)] if any(inside) else segments[0]
                per_tp_piece = entry.weight / _fsdp1.tp_pieces(model.tp_spec)
                for seg_name, seg in zip(param_names[entry.index], segments):
                    if not seg.numel:
                        units.append(Unit(seg_name, p, entry.tensor[:0], per_tp_piece * _fsdp1.tp_pieces(seg.tp_spec), False, seg))
            continue
        flat_grad = entry.tensor.reshape(-1)  # the local shard, padding removed
        for seg_name, seg in zip(param_names[entry.index], segments):
            units.append(Unit(seg_name, p, flat_grad[seg.offset : seg.offset + seg.numel], entry.weight, False, seg))
    return Local(params, module, all_names, units, layout.kinds, flat, param_names, layout.marks)


# ----------------------------------------------------------------------------- per-tensor math


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
            norms = _repair(norms.reshape(-1), lambda idx: body[idx // r, idx % r], norm_type).view(k, r)
        parts.append(norms.double())
    if n % ROW:
        tail = flat[:, r * ROW :]
        norms = _rows_norms(tail, norm_type, acc)
        if repair:
            norms = _repair(norms, lambda idx: tail.index_select(0, idx), norm_type)
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
            sizes.append((n, [(_taker(part), torch.tensor(part)) for part in parts]))
        return SizeBuckets(sizes, (_taker(rest), torch.tensor(rest), len(rest)) if rest else None)


def _taker(idx: list[int]) -> Callable[[Sequence], Any]:
    """A C-level picker of ``idx`` from a sequence, always returning a tuple."""
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


def identity(norm_type: float) -> float:
    """A partial's value when it covers no element."""
    return -math.inf if norm_type == math.inf else (math.inf if norm_type == -math.inf else 0.0)


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
                numels = [t.numel() for t in (_real_view(chosen, 2.0) if dtype.is_complex else chosen)]
                sizes = SizeBuckets.build(numels)
            members.append((dtype, _taker(idx), torch.tensor(idx), sizes))
        return Buckets(members)


def tensor_partials(tensors: list[torch.Tensor], norm_type: float, device: torch.device, buckets: Optional[Buckets] = None) -> torch.Tensor:
    """Float64 per-tensor partials on ``device`` (see ``local_norms``; weight 1): ``sum |g|^p`` for
    finite p, the count for p=0, max/min |g| for +-inf, ``identity`` for empty tensors; NaN
    poisoning for p <= 0 as the library does. The tensors of one (device, dtype) are measured
    together, in pieces of at most ``ROW`` elements on CPU (with overflow/underflow repair).
    ``buckets`` (from ``Buckets.build`` on tensors of the same devices, dtypes and sizes) saves
    working the buckets out again."""
    out = torch.full((len(tensors),), identity(norm_type), dtype=torch.float64, device=device)
    for dtype, take, positions, sizes in (buckets or Buckets.build(tensors)).members:
        ts = list(take(tensors))
        if dtype.is_complex:
            ts = _real_view(ts, norm_type)
            if norm_type != 2:  # magnitudes: as many elements as the tensors, not twice
                sizes = SizeBuckets.build(list(map(torch.Tensor.numel, ts))) if sizes is not None else None
        values = _bucket_partials(ts, norm_type, sizes).to(device)
        out.index_copy_(0, positions.to(device), values)
    return out


# ----------------------------------------------------------------------------- the name order


def stage_unique(held: list[tuple[int, Iterable[str], set[str]]]) -> tuple[Callable[[int, str], str], set[str]]:
    """The one rule for names across pipeline stages, from every rank's (stage index, names, tied
    names): a name two stages hold for different tensors (stages built as separate
    ``nn.Sequential``s both have ``0.weight``) becomes ``stage{i}.`` + name on every stage that
    holds it; a tied copy's name (``mark_replicated``) stays as it is, and so does a name within one
    stage. Returns ``unique(stage index, name)`` and the names that clash."""
    stages_of: dict[str, set[int]] = {}
    for index, names, tied in held:
        for n in names:
            if n not in tied:
                stages_of.setdefault(n, set()).add(index)
    clashes = {n for n, stages in stages_of.items() if len(stages) > 1}

    def unique(index: int, name: str) -> str:
        return f"stage{index}.{name}" if name in clashes else name

    return unique, clashes


class NameOrder:
    """The global order of names, agreed once by every rank and cached.

    Keyed weakly by the module passed to ``grad_norms`` (one shared slot for (name, parameter)
    pairs) and by the process group and pipeline layout. ``local_sig`` is this rank's names and
    ``mark_replicated`` groups at the time of the agreement: a call whose local signature differs
    raises the "names changed" flag on its all-reduce, and every rank re-agrees in that call.

    ``names`` is the union of every rank's names (every pipeline stage), in rank order, a name that
    two stages hold for different tensors made unique as ``stage{i}.name`` on each (``index`` also
    finds this rank's own names under them);
    ``tied_peers[name]`` lists, for a local ``mark_replicated`` parameter, the names of its copies
    on the other pipeline stages (matched by group and order), so that a tied weight counts once
    per dict entry even when its copies carry different names on different stages.
    """

    _by_module: ClassVar[weakref.WeakKeyDictionary] = weakref.WeakKeyDictionary()
    _pairs: ClassVar[dict[tuple, NameOrder]] = {}

    def __init__(self, context: tuple, local_sig: tuple, names: list[str], tied_peers: dict[str, list[str]]) -> None:
        self.context = context
        self.local_sig = local_sig
        self.names = names
        self.index = {n: i for i, n in enumerate(names)}
        self.tied_peers = tied_peers
        self.crc = zlib.crc32("\0".join(names).encode())
        self._groups: tuple | None = None  # (groups callable, entry names, entry of name)

    @staticmethod
    def context_of(stage: Stage) -> tuple:
        group = (stage.group or dist.group.WORLD) if stage.distributed else None
        return (id(group), stage.ranks, stage.size, stage.pp_ranks)

    @classmethod
    def cached(cls, module: nn.Module | None, stage: Stage) -> NameOrder | None:
        found = cls._by_module.get(module) if module is not None else cls._pairs.get(cls.context_of(stage)[:1])
        if found is not None and found.context == cls.context_of(stage):
            return found
        return None

    def store(self, module: nn.Module | None) -> None:
        if module is not None:
            NameOrder._by_module[module] = self
        else:
            NameOrder._pairs.clear()
            NameOrder._pairs[self.context[:1]] = self

    @classmethod
    def agree(cls, local_sig: tuple, stage: Stage) -> NameOrder:
        """One object exchange over the call's group (``exchange``: no numpy): every rank's
        names, stage and tied groups."""
        names, tied = local_sig
        mine = (stage.index, sorted(stage.pp_ranks) if stage.pp_ranks is not None else None, list(names), list(tied))
        everyone: list = [mine]
        if stage.distributed:
            everyone = exchange.all_gather_objects(mine, reduction_device(stage), stage.group, what="grad_norms")
        unique, clashes = stage_unique([(index, rank_names, {n for n, _ in rank_tied}) for index, _, rank_names, rank_tied in everyone])

        order: dict[str, None] = {}
        for index, _, rank_names, _ in everyone:
            order.update(dict.fromkeys(unique(index, n) for n in rank_names))
        # the k-th tensor marked replicated over group R on each rank is one tied tensor
        nth: dict[tuple, str] = {}
        global_ranks = stage.global_ranks() if stage.distributed else [0]
        for rank, (index, _, _, rank_tied) in zip(global_ranks, everyone):
            seen: dict[tuple, int] = {}
            for name, ranks in rank_tied:
                k = seen[tuple(ranks)] = seen.get(tuple(ranks), -1) + 1
                nth[(rank, tuple(ranks), k)] = unique(index, name)
        me = dist.get_rank() if stage.distributed else 0
        peers: dict[str, list[str]] = {}
        seen = {}
        for name, ranks in tied:
            k = seen[tuple(ranks)] = seen.get(tuple(ranks), -1) + 1
            others = set(ranks) & set(stage.pp_ranks or ()) - {me}
            peers[name] = [nth[(q, tuple(ranks), k)] for q in sorted(others) if (q, tuple(ranks), k) in nth]
        found = cls(cls.context_of(stage), local_sig, list(order), peers)
        # this rank's own names find their entries under their stage-unique names
        found.index.update((n, found.index[unique(stage.index, n)]) for n in names if n in clashes)
        return found

    def entries(self, groups: Callable[[str], str | None] | None) -> tuple[list[str], list[int]]:
        """Entry names and, per global name, its entry (-1: left out); cached per ``groups``."""
        if self._groups is not None and self._groups[0] is groups:
            return self._groups[1], self._groups[2]
        if groups is None:
            entry_names, entry_of = list(self.names), list(range(len(self.names)))
        else:
            entry_names, entry_of, where = [], [], {}
            for name in self.names:
                g = groups(name)
                if g is None:
                    entry_of.append(-1)
                    continue
                if not isinstance(g, str):
                    raise TypeError(f"distclip: groups({name!r}) returned {type(g).__name__}; expected a str or None")
                if g not in where:
                    where[g] = len(entry_names)
                    entry_names.append(g)
                entry_of.append(where[g])
        if TOTAL in entry_names:
            raise ValueError(f"distclip: a {'group' if groups else 'parameter'} is named {TOTAL!r}, which grad_norms reserves for the total")
        self._groups = (groups, entry_names, entry_of)
        return entry_names, entry_of


def _local_sig(local: Local) -> tuple:
    tied: list[tuple[str, tuple[int, ...]]] = []
    for p, pnames in zip(local.params, local.param_names):
        annotation = local.annotation(p)
        if annotation is not None and annotation.replicated_over is not None:
            ranks = tuple(sorted(annotation.replicated_over.ranks))
            tied.extend((n, ranks) for n in pnames)
    return (tuple(local.names), tuple(tied))


# ----------------------------------------------------------------------------- the plan


def _replicated_ranks(annotation: Optional[Annotation]) -> Optional[frozenset[int]]:
    return annotation.replicated_over.ranks if annotation is not None and annotation.replicated_over is not None else None


_GRAD, _LOCAL = 0, 1  # how a unit's tensor is found again: the grad itself, or a DTensor grad's local tensor
_grad_of = operator.attrgetter("grad")
_dtype_of = operator.attrgetter("dtype")
_get_device = torch.Tensor.get_device


@dataclass
class Packing:
    """The static part of one call's vector, for one name order and ``groups``: where each unit's
    partial goes and with which weights, and the per-entry flags (which entries are held and hold
    elements), as tensors on the reduction device."""

    order: NameOrder
    groups: Optional[Callable]
    entry_names: list[str]
    ent: torch.Tensor  # per unit, its entry (kept units only)
    keep: torch.Tensor  # per unit, whether its name has an entry
    all_kept: bool
    w_total: torch.Tensor
    w_entry: torch.Tensor  # kept units only
    flags: torch.Tensor  # per entry and the total: held (1) + has elements (_B)


class NormsPlan:
    """What one call worked out locally for one parameter list: names, units (which parameter,
    weight, whether ``Partial``), agreement kinds, buckets; and the checks that tell a later call
    whether it still holds: the same parameter objects and names, grads where there were grads, of
    the same class, plain ones of the same dtype and device, DTensor ones with the same spec
    object, no mark made since, and the same tensors behind the parameters' ids
    (``plan.identity_of``). Holds no tensor and no reference to a parameter."""

    _cache: ClassVar[dict[tuple, NormsPlan]] = {}
    _SIZE: ClassVar[int] = 8

    def __init__(self, named: Named, local: Local, stage: Stage) -> None:
        self._module = weakref.ref(local.module) if local.module is not None else None  # never keeps a model alive
        self.names = named.names
        self.ids = list(map(id, named.params))
        self.identity = identity_of(named.params)  # the tensors behind those ids (no reference kept)
        self.kinds = local.kinds
        self.sig = _local_sig(local)
        self.all_names = local.names
        self.unit_names = [u.name for u in local.units]
        self.weights = [u.weight for u in local.units]
        self.tied = [_replicated_ranks(local.annotation(u.param)) for u in local.units]
        self.partial = [i for i, u in enumerate(local.units) if u.partial]
        self.partial_names = pairing_names([local.units[i].tensor for i in self.partial], [local.units[i].param for i in self.partial])
        self.has_elements = [bool(u.tensor.numel()) for u in local.units]
        self.has_float64 = any(u.tensor.dtype in _FLOAT64 for u in local.units)
        self.grad_device = local.units[0].tensor.device if local.units else None
        self.buckets = Buckets.build([u.tensor for u in local.units])
        self.packing: Optional[Packing] = None
        self.valid = True
        self.marks_version = Marks.version
        self.steps = self._steps(named.params, local)  # None: not reusable (FSDP1 segments, slices)
        self.key: Optional[tuple] = None

    @property
    def module(self) -> nn.Module | None:
        return self._module() if self._module is not None else None

    @staticmethod
    def _steps(params: list[torch.Tensor], local: Local) -> Optional[tuple]:
        """(unit param positions, unit ways, grad classes, plain checks, DTensor checks), or None.
        FSDP1 modules are worked out anew each call, as before: their views and shard facts come
        from FSDP1's handles, which this check does not read."""
        if any(map(_fsdp1.is_fsdp1_managed, params)):
            return None
        where = {id(p): i for i, p in enumerate(params)}
        positions, ways = [], []
        for u in local.units:
            if u.segment is not None or id(u.param) not in where:
                return None
            grad = u.param.grad
            if u.tensor is grad:
                ways.append(_GRAD)
            elif isinstance(grad, DTensor) and u.tensor is local_of(grad):
                ways.append(_LOCAL)
            else:  # a slice (padding removed): worked out anew each call
                return None
            positions.append(where[id(u.param)])
        grads = list(map(_grad_of, params))
        plain: dict[tuple, list[int]] = {}
        dtensor: list[int] = []
        for i, g in enumerate(grads):
            if g is None:
                continue
            if isinstance(g, DTensor):
                dtensor.append(i)
            else:
                plain.setdefault((g.dtype, g.device), []).append(i)
        plain_checks = [(_taker(idx), dtype, device, -1 if device.type == "cpu" or device.index is None else device.index)
                        for (dtype, device), idx in plain.items()]
        dtensor_check = (_taker(dtensor), tuple(spec_of(grads[i]) for i in dtensor)) if dtensor else None
        return (_taker(positions) if positions else None, ways, list(map(type, grads)), plain_checks, dtensor_check)

    def tensors(self, params: list[torch.Tensor]) -> Optional[list[torch.Tensor]]:
        """This call's unit tensors if the plan holds for ``params``, else None."""
        if not self.valid or self.steps is None or Marks.version != self.marks_version:
            return None
        take, ways, types, plain_checks, dtensor_check = self.steps
        grads = list(map(_grad_of, params))
        if list(map(type, grads)) != types:
            return None
        for pick, dtype, device, index in plain_checks:
            ts = pick(grads)
            if not all(map(operator.is_, map(_dtype_of, ts), repeat(dtype))):
                return None
            if ts[0].device != device or not all(map(index.__eq__, map(_get_device, ts))):
                return None
        if dtensor_check is not None:
            pick, specs = dtensor_check
            if not all(map(operator.is_, map(spec_of, pick(grads)), specs)):
                return None
        if take is None:
            return []
        unit_grads = list(take(grads))
        if _LOCAL in ways:
            return [local_of(g) if w else g for g, w in zip(unit_grads, ways)]
        return unit_grads

    # ------------------------------------------------------------------ the cache

    @classmethod
    def find(cls, named: Named, stage: Stage) -> Optional[tuple[NormsPlan, list[torch.Tensor]]]:
        key = (stage, len(named.params), id(named.params[0]) if named.params else 0)
        plan = cls._cache.get(key)
        if plan is None or plan.ids != list(map(id, named.params)) or plan.names != named.names or plan.module is not named.module:
            return None
        if identity_of(named.params) != plan.identity:  # a recycled id: another tensor behind it
            cls._cache.pop(key, None)
            return None
        tensors = plan.tensors(named.params)
        if tensors is None:
            cls._cache.pop(key, None)
            return None
        return plan, tensors

    def keep(self, named: Named, stage: Stage) -> None:
        if self.steps is None:
            return
        key = self.key = (stage, len(named.params), id(named.params[0]) if named.params else 0)
        cache = NormsPlan._cache
        cache.pop(key, None)
        cache[key] = self
        while len(cache) > self._SIZE:
            cache.pop(next(iter(cache)))

    def packing_for(self, order: NameOrder, groups: Optional[Callable], stage: Stage, device: torch.device) -> Packing:
        found = self.packing
        if found is not None and found.order is order and found.groups is groups and found.ent.device == device:
            return found
        entry_names, entry_of = order.entries(groups)
        n_entries = len(entry_names)
        index = order.index
        ent, entry_weights, idx_all, idx_has = [], [], [], []
        for name, w, ranks, has in zip(self.unit_names, self.weights, self.tied, self.has_elements):
            i = index.get(name)
            e = entry_of[i] if i is not None else -1  # unknown name: this rank raised "names changed"
            ent.append(e)
            peers = order.tied_peers.get(name) if ranks is not None else None
            if peers is not None and ranks is not None and e >= 0:  # a tied copy counts once per entry, in full in each
                copies = stage_copies(ranks, stage.pp_ranks)
                same = 1 + sum(1 for q in peers if q in index and entry_of[index[q]] == e)
                w = w * copies / same
            entry_weights.append(w)
            if e >= 0:
                idx_all.append(e)
                if has:
                    idx_has.append(e)
        n = n_entries + 1  # entries, then the total
        flags = torch.zeros(n, dtype=torch.float64)
        flags.index_fill_(0, torch.tensor(idx_all + ([n_entries] if self.unit_names else []), dtype=torch.long), 1.0)
        held = idx_has + ([n_entries] if any(self.has_elements) else [])
        flags.index_fill_(0, torch.tensor(held, dtype=torch.long), 1.0 + _B)
        ent_t = torch.tensor(ent, dtype=torch.long)
        keep = ent_t >= 0
        all_kept = bool(keep.all())
        w_entry = torch.tensor(entry_weights, dtype=torch.float64)
        packing = Packing(order, groups, entry_names, (ent_t if all_kept else ent_t[keep]).to(device), keep.to(device), all_kept,
                          torch.tensor(self.weights, dtype=torch.float64, device=device),
                          (w_entry if all_kept else w_entry[keep]).to(device), flags.to(device))
        self.packing = packing
        return packing


# ----------------------------------------------------------------------------- grad_norms


@torch.no_grad()
def grad_norms(
    parameters: NamedParams,
    norm_type: float = 2.0,
    *,
    groups: Callable[[str], str | None] | None = None,
    pp_group: Optional[GroupLike] = None,
    group: Optional[GroupLike] = None,
    trainable_only: bool = False,
    strip_prefixes: Prefixes = False,
) -> GradNorms:
    r"""Global norms of the full gradients, per parameter (or per group), plus ``"total"``.

    Each value is the norm one process would compute over that parameter's (group's) full,
    unsharded gradient, whatever the layout: DTensors on any mesh, plain replicas, FSDP1 (flat
    parameters are cut back into their original parameters), ``mark_sharded`` /
    ``mark_replicated``, ``Partial`` grads, pipeline stages. The dict (keys, order, values, dtype)
    is the same on every rank; every rank must call it.

    Collectives: one all-reduce per call (plus ``Partial`` grads' one, as in ``clip_grad_norm_``).
    The first call with a module (or whenever some rank's parameter names or ``mark_replicated``
    groups changed) also agrees on the order of names with one object exchange (and then
    all-reduces again). Every rank must see a module for the first time in the same call. Reading
    which names are present is a host sync on accelerators.

    Args:
        parameters (nn.Module, Tensor or Iterable[Tensor or (str, Tensor)]): whatever
            ``clip_grad_norm_`` takes, or ``(name, parameter)`` pairs (``named_parameters()``). A
            module gives names from ``named_parameters()`` without FSDP1, activation-checkpoint
            and ``torch.compile`` wrapper prefixes, nor DDP's leading ``module.``; pairs get the
            same clean-up, except ``module.``; bare tensors are named by position,
            ``"param[3]"``. Pass the module for FSDP1. Names are global across pipeline stages:
            one name on two stages is one entry (right for a tied weight marked with
            ``mark_replicated``; stages that number their layers locally should pass pairs with
            a stage prefix).
        norm_type (float): as in ``clip_grad_norm_``: any p > 0, ``inf``, ``-inf``, ``0``, p < 0.
        groups (callable, optional): ``name -> group name`` (a str, or ``None`` to leave the
            parameter out of the groups; it still counts in ``"total"``). Default: one entry per
            parameter.
        pp_group (ProcessGroup or DeviceMesh, optional): the pipeline-parallel group; the dict
            then holds the names of every stage.
        group (ProcessGroup or DeviceMesh, optional): the ranks that hold this model (default:
            the default process group); exactly those ranks call.
        trainable_only (bool): leave out parameters with ``requires_grad=False`` (a frozen base
            under LoRA) from the names and the total. Default: False.
        strip_prefixes (bool or Sequence[str]): also drop these leading prefixes from the names;
            ``True``: DDP's ``module.`` and PEFT's ``base_model.model.``. Default: False.

    Returns:
        :class:`GradNorms`, a dict ``{entry: norm, ..., "total": norm}``: entries in the agreed
        order (the union of every rank's names in rank order, or groups in order of first
        member). An entry is present iff some rank holds a grad (``.grad is not None``) for one
        of its parameters; one whose grads hold no element has norm 0. ``"total"`` is always
        present and equals :func:`get_total_norm` on the same parameters (to float64 rounding).
        Values are 0-dim float32 tensors (float64 if any rank holds a float64 grad), on the
        gradients' device, views of ``.norms``, the same norms as one 1-D tensor in the order
        of ``.names`` (for a logger: one transfer). A tied weight counts once in ``"total"`` and
        in full in each entry that holds a copy.
    """
    m = measure(parameters, norm_type, groups=groups, pp_group=pp_group, group=group, trainable_only=trainable_only,
                strip_prefixes=strip_prefixes, units=False)
    return GradNorms(m.names, m.norms.to(m.dtype))


class Measured(NamedTuple):
    """What :func:`measure` found: the entry names (``"total"`` last) and their norms in float64,
    the dtype ``grad_norms`` returns them in, this rank's unit tensors (as measured, ``Partial``
    grads as they are) and each one's entry (None: left out of the groups), and the stage."""

    names: tuple[str, ...]
    norms: torch.Tensor
    dtype: torch.dtype
    tensors: list[torch.Tensor]
    unit_entries: list[Optional[str]]
    stage: Stage


def measure(
    parameters: NamedParams,
    norm_type: object = 2.0,
    *,
    groups: Callable[[str], str | None] | None = None,
    pp_group: Optional[GroupLike] = None,
    group: Optional[GroupLike] = None,
    trainable_only: bool = False,
    strip_prefixes: Prefixes = False,
    units: bool = True,
) -> Measured:
    """:func:`grad_norms` keeping the float64 values and this rank's units (``GradGuard`` clips
    each group with them; ``units=False``: no unit entries). Same arguments, same collectives."""
    seen: list[list[torch.Tensor]] = []  # the parameters, once read: a failed rank's ``Partial`` collectives

    def local_part() -> tuple[float, Stage, NormsPlan, list[torch.Tensor]]:
        p = _check_norm_type(norm_type)
        if groups is not None and not callable(groups):
            raise TypeError(f"distclip: groups must be a callable name -> group name (or None), got {type(groups).__name__}")
        stage = current_stage(pp_group, group)
        named = parameters_of(parameters, trainable_only, strip_prefixes)
        seen.append(named.params)
        found = NormsPlan.find(named, stage)
        if found is not None:
            return p, stage, found[0], found[1]
        local = collect(named, stage)
        plan = NormsPlan(named, local, stage)
        plan.keep(named, stage)
        return p, stage, plan, [u.tensor for u in local.units]

    found, error = rank_errors.attempt(local_part)
    if found is not None:
        p, stage, plan, tensors = found
    else:  # bad input here: join the call's collectives holding nothing, then raise on every rank
        assert error is not None
        try:
            stage = current_stage(None, group)
        except Exception:
            raise error from None
        p = _fallback_norm_type(norm_type)
        module = parameters if isinstance(parameters, nn.Module) else None
        empty = Local([], module, [], [], frozenset({("failed",)}), {}, [])
        plan, tensors = NormsPlan(Named([], [], module), empty, stage), []
    entry_groups = groups if callable(groups) else None
    order = NameOrder.cached(plan.module, stage)
    if order is None:
        order = NameOrder.agree(plan.sig, stage)
        order.store(plan.module)
    stale = order.local_sig != plan.sig
    device = reduction_device(stage) if stage.distributed else None
    device = device or plan.grad_device or torch.device("cpu")
    # From here to the all-reduce every failure takes the one failure path: the rank still sends
    # a vector (``failed_vector``) and every rank raises together.
    partials: Optional[torch.Tensor] = None
    if error is None:
        partials, error = rank_errors.attempt(lambda: _unit_partials(plan, tensors, p, device))
    else:  # the ``Partial`` collectives its peers issue here
        if not seen:  # failed before reading them (a generator is still unread)
            try:
                seen.append(parameters_of(parameters, trainable_only, strip_prefixes).params)
            except Exception:  # noqa: BLE001 - nothing to join with; this rank raises its own error below
                pass
        join_partial_grads([q.grad for q in seen[0]] if seen else [], seen[0] if seen else [])
    for _attempt in range(2):
        built = None
        if error is None:
            assert partials is not None
            built, error = rank_errors.attempt(functools.partial(_pack, plan, order, entry_groups, partials, p, stage, device, stale))
        packed = built[1] if built is not None else _failed(order, entry_groups, p, stage, device, error)
        all_reduce(packed, p, stage)
        if built is None:  # this rank failed: every rank raises together, this one its own error
            rank_errors.settle(True, error, packed.device, stage.group)
        assert built is not None
        packing, _, packet = built
        # read on the host (a sync on accelerators, as reading which names are present is anyway)
        view = packet.decode_host(packed.tolist())
        rank_errors.settle(view.failed, None, packed.device, stage.group)
        if not view.names_changed:
            break
        order = NameOrder.agree(plan.sig, stage)
        order.store(plan.module)
        stale = False
    names, norms64 = _unpack(packed, view._replace(has_float64=True), packing.entry_names, p, packet, plan)
    unit_entries: list[Optional[str]] = []
    if units:
        entry_names, entry_of = order.entries(entry_groups)
        for name in plan.unit_names:
            at = order.index.get(name)
            e = entry_of[at] if at is not None else -1
            unit_entries.append(entry_names[e] if e >= 0 else None)
    return Measured(names, norms64, torch.float64 if view.has_float64 else torch.float32, tensors, unit_entries, stage)


def _unit_partials(plan: NormsPlan, tensors: list[torch.Tensor], p: float, device: torch.device) -> torch.Tensor:
    """The per-unit partials: ``Partial`` grads made whole first (their collectives go out before
    anything here can fail; a failure inside them is not followed by a join), then measured."""
    if plan.partial:
        tensors = list(tensors)
        for i, value in _reduce_partial_units(tensors, plan.partial, plan.partial_names).items():
            tensors[i] = value
    return tensor_partials(tensors, p, device, plan.buckets if not plan.partial else None)


def _failed(order: NameOrder, entry_groups: Optional[Callable], p: float, stage: Stage, device: torch.device,
            error: Optional[Exception]) -> torch.Tensor:
    """A failed rank's vector: as long as the others' (their entries follow the agreed order)."""
    assert error is not None
    try:
        n = len(order.entries(entry_groups)[0]) + 1
    except Exception:  # the length is what failed: no vector of the others' length to send
        raise error from None
    return failed_vector(2 * n, stage.distributed, math.isinf(p), device)


def _fallback_norm_type(norm_type: object) -> float:
    """A failed rank's norm type: the reduction op the others most likely use (MAX for ±inf)."""
    try:
        return math.inf if math.isinf(float(norm_type)) else 2.0  # type: ignore[arg-type]
    except Exception:
        return 2.0


def _reduce_partial_units(tensors: list[torch.Tensor], partial: list[int], names: list[str]) -> dict[int, torch.Tensor]:
    """``Partial`` grads made whole (one all-reduce per partial mesh group, as in clip.py), paired
    across ranks by ``names`` (``layout.pairing_names``)."""
    wanted = [(cast(DTensor, tensors[i]), float(i), name) for i, name in zip(partial, names)]  # a partial unit holds its DTensor grad
    # ``reduce_partial_grads`` returns (value, weight) pairs with the weight passed through
    # unchanged, in its own bucket order: the unit's index travels in the weight's place.
    return {int(i): value for value, i in reduce_partial_grads(wanted)}


def _pack(plan: NormsPlan, order: NameOrder, groups: Optional[Callable], s: torch.Tensor, p: float, stage: Stage,
          device: torch.device, stale: bool) -> tuple[Packing, torch.Tensor, Packet]:
    """This rank's vector (see ``packet``): its head is the per-entry weighted partials and the
    total's partial, then per-entry flags; the packet adds the agreement slots and the flags
    (names changed, has float64, failed). ``s``: the per-unit partials. Returns the packing (where
    each unit went, for ``groups`` in ``order``) with it."""
    packing = plan.packing_for(order, groups, stage, device)
    n_entries = len(packing.entry_names)
    n = n_entries + 1  # entries, then the total
    flags = packing.flags
    ent_t = packing.ent
    has_units = bool(plan.unit_names)
    if math.isinf(p):
        sign = 1.0 if p > 0 else -1.0
        v = s * sign
        nan = torch.isnan(v)
        v = torch.where(nan, -math.inf, v)
        kept_v, kept_nan = (v, nan) if packing.all_kept else (v[packing.keep], nan[packing.keep])
        values = torch.full((n,), -math.inf, dtype=torch.float64, device=device)
        values[:n_entries].scatter_reduce_(0, ent_t, kept_v, "amax")
        nan_e = torch.zeros(n, dtype=torch.float64, device=device)
        nan_e[:n_entries].scatter_reduce_(0, ent_t, kept_nan.double(), "amax")
        if has_units:
            values[n_entries] = v.max()
            nan_e[n_entries] = nan.any().double()
        flags = flags + nan_e * (_B * _B)
    else:
        kept = s if packing.all_kept else s[packing.keep]
        values = torch.zeros(n, dtype=torch.float64, device=device)
        values[:n_entries].index_add_(0, ent_t, kept * packing.w_entry)
        values[n_entries] = s.dot(packing.w_total)
    order = packing.order
    call = agreement.call_signature(f"grad_norms[{len(order.names)} names {order.crc:08x}, {n_entries} entries]", p, None, False, stage)
    packet = Packet(2 * n, agreement.Signature(call, plan.kinds, stage) if stage.distributed else None, math.isinf(p))
    packed = packet.encode_device(torch.cat([values, flags]), device, names_changed=stale, has_float64=plan.has_float64)
    return packing, packed, packet


def _unpack(packed: torch.Tensor, view: HostView, entry_names: list[str], p: float, packet: Packet, plan: NormsPlan) -> tuple[
        tuple[str, ...], torch.Tensor]:
    """The entries present (``"total"`` last) and their norms, on the grads' device."""
    n = len(entry_names) + 1
    values, flags = packed[:n], packed[n : 2 * n]
    if view.disagreed:
        assert packet.sig is not None  # one process always agrees with itself
        agreement.raise_mismatch(packet.sig)
    has = flags >= _B
    if math.isinf(p):
        sign = 1.0 if p > 0 else -1.0
        total = torch.where(flags >= _B * _B, math.nan, values * sign)
    elif p == 0:
        total = values.round()
    else:
        total = values.pow(1.0 / p)
    total = torch.where(has, total, 0.0)
    out_dtype = torch.float64 if view.has_float64 else torch.float32
    grad_device = plan.grad_device or packed.device
    held = [f >= 1 for f in view.head[n : 2 * n - 1]]  # which names are present (read on the host above)
    norms = total.to(device=grad_device, dtype=out_dtype)
    if all(held):
        return (*entry_names, TOTAL), norms
    kept = [i for i, h in enumerate(held) if h]
    return (*(entry_names[i] for i in kept), TOTAL), norms[torch.tensor([*kept, n - 1], device=norms.device)]


# ----------------------------------------------------------------------------- describe


def _placements_str(placements: tuple) -> str:
    return "(" + ", ".join(str(pl) for pl in placements) + ")"


def _fsdp1_over_tp(kind: str, spec: object, fsdp1_shards: int) -> tuple[str, tuple[int, ...], int]:
    """An FSDP1 row's kind, global shape and pieces when FSDP1 flattened the local piece of a
    DTensor (FSDP1 over TP): FSDP1 shards x TP pieces."""
    tp = _fsdp1.tp_pieces(spec)
    kind += f" by FSDP1, of one of {tp} TP pieces ({_fsdp1.tp_description(spec)}): {fsdp1_shards} FSDP1 shards x {tp} TP pieces"
    return kind, tuple(spec.shape), fsdp1_shards * tp  # type: ignore[attr-defined]  # a DTensorSpec


def describe_rows(
    parameters: NamedParams,
    *,
    pp_group: Optional[GroupLike] = None,
    group: Optional[GroupLike] = None,
    trainable_only: bool = False,
    strip_prefixes: Prefixes = False,
) -> list[dict]:
    """How distclip sees each parameter on this rank: local and cheap (no collective).

    One row per named parameter (per original parameter inside an FSDP1 flat parameter), as a dict
    with ``name``, ``local_shape``, ``global_shape`` (None where only the user knows it),
    ``dtype``, ``kind`` (the layout), ``pieces`` (disjoint pieces of the full gradient within a
    pipeline stage), ``weight`` (what distclip multiplies this rank's ``sum |g|^p`` by; None when
    the parameter has no grad here and is skipped) and ``grad`` (whether it has one here).
    ``parameters``, ``pp_group``, ``group``, ``trainable_only`` and ``strip_prefixes`` as in
    :func:`grad_norms` (any form ``clip_grad_norm_`` takes; the groups set the counts).
    """
    stage = current_stage(pp_group, group)
    local = collect(parameters_of(parameters, trainable_only, strip_prefixes), stage)
    fsdp1 = _fsdp1.shard_info(local.module) if local.module is not None else {}
    weights: dict[tuple, float] = {}
    partial: set = set()
    for u in local.units:
        weights[(id(u.param), u.name)] = u.weight
        if u.partial:
            partial.add(id(u.param))
    rows = []
    for p, pnames in zip(local.params, local.param_names):
        annotation = local.annotation(p)
        mark = ""
        mark_pieces = 1
        if annotation is not None:
            for over in annotation.sharded_over:
                mark += f" + mark_sharded over ranks {sorted(over.ranks)}"
                mark_pieces *= over.size
            if annotation.replicated_over is not None:
                copies = stage_copies(annotation.replicated_over.ranks, stage.pp_ranks)
                mark += f" + mark_replicated over ranks {sorted(annotation.replicated_over.ranks)} ({copies} stage copies)"
        segments = local.flat.get(id(p))
        info = fsdp1.get(id(p))
        grad = p.grad
        local_shape: tuple[int, ...]
        global_shape: Optional[tuple[int, ...]]
        for k, name in enumerate(pnames):
            if segments is not None:
                seg = segments[k]
                kind = (f"FSDP1 flat parameter segment [{seg.offset}:{seg.offset + seg.numel}] of the local shard, "
                        f"sharded over {info.size if info else '?'} ranks")
                local_shape, global_shape, pieces = (seg.numel,), tuple(seg.shape), (info.size if info else 1)
                if seg.tp_spec is not None:  # FSDP1 over TP: the segment is one TP piece, itself sharded
                    kind, global_shape, pieces = _fsdp1_over_tp(kind, seg.tp_spec, pieces)
            elif isinstance(p, DTensor):
                mesh = p.device_mesh  # public properties: describe is not on the hot path
                placements = grad.placements if isinstance(grad, DTensor) else p.placements
                kind = f"DTensor on mesh {tuple(mesh.shape)} {mesh.mesh_dim_names or ''} {_placements_str(placements)}"
                if id(p) in partial:
                    kind += " (grad Partial: made whole by one all-reduce first)"
                local_shape, global_shape = tuple(p.to_local().shape), tuple(p.shape)
                pieces = shard_pieces(tuple(mesh.shape), p.placements)
            elif info is not None:
                kind = f"FSDP1 use_orig_params view of the local shard, sharded over {info.size} ranks"
                local_shape, global_shape, pieces = tuple(p.shape), tuple(info.shape) if info.shape else None, info.size
                if info.tp_spec is not None:
                    kind, global_shape, pieces = _fsdp1_over_tp(kind, info.tp_spec, pieces)
            else:
                kind = f"plain tensor, replicated across the stage's {stage.size} ranks"
                local_shape, global_shape, pieces = tuple(p.shape), (tuple(p.shape) if mark_pieces == 1 else None), 1
            pieces *= mark_pieces
            weight = weights.get((id(p), name))
            rows.append({
                "name": name, "local_shape": local_shape, "global_shape": global_shape, "dtype": str(p.dtype).replace("torch.", ""),
                "kind": kind + mark, "pieces": pieces, "weight": weight, "grad": grad is not None,
            })
    return rows


def describe(
    parameters: NamedParams,
    *,
    pp_group: Optional[GroupLike] = None,
    group: Optional[GroupLike] = None,
    trainable_only: bool = False,
    strip_prefixes: Prefixes = False,
) -> str:
    """A readable table of :func:`describe_rows` (same arguments): how distclip sees this rank's
    parameters."""
    stage = current_stage(pp_group, group)
    rows = describe_rows(parameters, pp_group=pp_group, group=group, trainable_only=trainable_only, strip_prefixes=strip_prefixes)
    where = f"rank {dist.get_rank()}, " if stage.distributed else ""
    header = (f"distclip layout ({where}pipeline stage {stage.index} of {stage.pp_size}, {stage.size} ranks per stage); "
              f"weight = pieces / (ranks per stage x stage copies)")
    cols = ["name", "local", "global", "dtype", "pieces", "weight", "layout"]
    table = [cols]
    for r in rows:
        weight = "no grad" if r["weight"] is None else f"{r['weight']:.6g}"
        table.append([r["name"], str(list(r["local_shape"])), "?" if r["global_shape"] is None else str(list(r["global_shape"])),
                      r["dtype"], str(r["pieces"]), weight, r["kind"]])
    widths = [max(len(row[i]) for row in table) for i in range(len(cols) - 1)]
    lines = [header]
    for row in table:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])
    return "\n".join(lines)
