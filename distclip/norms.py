"""Seeing the norms: per-parameter and per-group global gradient norms, and how distclip sees a model.

    norms = distclip.grad_norms(model)                          # {name: norm, ..., "total": norm}
    norms = distclip.grad_norms(model, groups=lambda n: n.split(".")[0])
    distclip.clip_grads_with_norm_(model, max_norm, norms["total"])   # one collective in total
    print(distclip.describe(model))                             # local, no collective

``grad_norms`` measures every local gradient once per parameter (FSDP1 flat parameters are cut
back into their original parameters' segments), weights it as ``layout.local_layout`` does, and
adds the weighted partials into a vector indexed by a *global* order of names that every rank
shares. One all-reduce of that vector (SUM for finite p, MAX for +-inf, with NaN flags) gives every
rank the same dict. The order of names is agreed once per module (one ``all_gather_object``) and
cached (``NameOrder``); later calls check locally that the names are unchanged and ride a
"names changed" flag on the one all-reduce, so a change on any rank makes every rank re-agree in
that same call.
"""

from __future__ import annotations

import math
import weakref
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import ClassVar, Optional, Union, cast

import torch
import torch.distributed as dist
from torch import nn

from distclip import _fsdp1, agreement, rank_errors
from distclip.clip import _FLOAT64, _check_norm_type
from distclip.host_reads import host_reads_allowed
from distclip.layout import (
    _ANNOTATION_ATTR,
    DTensor,
    GroupLike,
    Stage,
    current_stage,
    local_layout,
    shard_pieces,
    stage_copies,
)
from distclip.local_norms import (
    _real_view,
    accumulation_dtype,
    owned_piece_norms,
)
from distclip.packet import HostView, Packet
from distclip.reduce import all_reduce, reduce_partial_grads, reduction_device

__all__ = ["NameOrder", "clean_name", "describe", "describe_rows", "grad_norms"]

NamedParams = Union[nn.Module, Iterable[tuple[str, torch.Tensor]]]  # noqa: UP007 - a runtime alias
TOTAL = "total"

# Per-entry flag slot: held + has_elements * _B + nan * _B**2 (exact in float64 for < 2**20 ranks;
# the NaN term is only used under MAX, where SUM's propagation of NaN is not available).
_B = float(2**20)
_WRAPPERS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def clean_name(name: str, ddp: bool = False) -> str:
    """A parameter name without wrapper prefixes: FSDP1's ``_fsdp_wrapped_module.``, activation
    checkpointing's ``_checkpoint_wrapped_module.``, ``torch.compile``'s ``_orig_mod.`` and, with
    ``ddp``, DDP's one leading ``module.``."""
    if ddp and name.startswith("module."):
        name = name[len("module.") :]
    if "_" in name:
        for wrapper in _WRAPPERS:
            if wrapper in name:
                name = name.replace(wrapper, "")
    return name


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


def _named(parameters: NamedParams) -> tuple[list[str], list[torch.Tensor], nn.Module | None]:
    if isinstance(parameters, nn.Module):
        ddp = type(parameters).__name__ == "DistributedDataParallel"
        names: list[str] = []
        params: list[torch.Tensor] = []
        for name, p in parameters.named_parameters():
            names.append(clean_name(name, ddp))
            params.append(p)
        return names, params, parameters
    if isinstance(parameters, torch.Tensor):
        raise TypeError("distclip: grad_norms needs names: pass an nn.Module or (name, parameter) pairs")
    names, params = [], []
    for item in parameters:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], torch.Tensor)):
            raise TypeError(
                "distclip: grad_norms needs names: pass an nn.Module or (name, parameter) pairs, got an element "
                f"of type {type(item).__name__}"
            )
        names.append(clean_name(item[0]))
        params.append(item[1])
    return names, params, None


def collect(parameters: NamedParams, stage: Stage) -> Local:
    """Names and local gradient units, from ``layout.local_layout`` (the weights distclip uses).
    Purely local; raises (before any collective) where ``local_layout`` does."""
    names, params, module = _named(parameters)
    layout = local_layout(params, module, stage, track=True)
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
    return Local(params, module, all_names, units, layout.kinds, flat, param_names)


# ----------------------------------------------------------------------------- per-tensor math


def _bucket_partials(tensors: list[torch.Tensor], norm_type: float) -> torch.Tensor:
    """``group_partial`` (weight 1) of each of the non-empty, same-device, same-dtype real
    ``tensors``: their pieces are measured together (flat chunks padded per tensor on CPU, see
    ``owned_piece_norms``) and summed back per tensor."""
    device, dtype = tensors[0].device, tensors[0].dtype
    acc = accumulation_dtype(dtype, device, norm_type)
    repair = 0 < norm_type < math.inf and acc == torch.float32 and host_reads_allowed(device)
    norms, owner = owned_piece_norms(tensors, norm_type, acc, repair)
    norms = norms.double()
    n = len(tensors)
    if norm_type == math.inf:  # scatter_reduce's amax/amin keep a NaN
        return norms.new_full((n,), -math.inf).scatter_reduce(0, owner, norms, "amax")
    if norm_type == -math.inf:
        out = norms.new_full((n,), math.inf).scatter_reduce(0, owner, norms, "amin")
    else:
        out = norms.new_zeros(n).index_add_(0, owner, norms if norm_type == 0 else norms.pow(norm_type))
        if norm_type > 0:
            return out
    # p <= 0 is blind to non-finite values: a max-abs pass poisons them with NaN, as group_partial
    max_acc = torch.float64 if dtype == torch.float64 else torch.float32
    peaks, peak_owner = owned_piece_norms(tensors, math.inf, max_acc)
    return out + norms.new_zeros(n).index_add_(0, peak_owner, peaks.double() * 0.0)


def identity(norm_type: float) -> float:
    """A partial's value when it covers no element."""
    return -math.inf if norm_type == math.inf else (math.inf if norm_type == -math.inf else 0.0)


def tensor_partials(tensors: list[torch.Tensor], norm_type: float, device: torch.device) -> torch.Tensor:
    """Float64 per-tensor partials on ``device`` (see ``local_norms``; weight 1): ``sum |g|^p`` for
    finite p, the count for p=0, max/min |g| for +-inf, ``identity`` for empty tensors; NaN
    poisoning for p <= 0 as the library does. The tensors of one (device, dtype) are measured
    together, in pieces of at most ``ROW`` elements on CPU (with overflow/underflow repair)."""
    out = torch.full((len(tensors),), identity(norm_type), dtype=torch.float64, device=device)
    buckets: dict[tuple, tuple[list[int], list[torch.Tensor]]] = {}
    for i, t in enumerate(tensors):
        if t.numel() == 0:
            continue
        idx, ts = buckets.setdefault((t.device, t.dtype), ([], []))
        idx.append(i)
        ts.append(t)
    for (_, dtype), (idx, ts) in buckets.items():
        if dtype.is_complex:
            ts = _real_view(ts, norm_type)
        values = _bucket_partials(ts, norm_type).to(device)
        out.index_copy_(0, torch.tensor(idx, device=device), values)
    return out


# ----------------------------------------------------------------------------- the name order


class NameOrder:
    """The global order of names, agreed once by every rank and cached.

    Keyed weakly by the module passed to ``grad_norms`` (one shared slot for (name, parameter)
    pairs) and by the process group and pipeline layout. ``local_sig`` is this rank's names and
    ``mark_replicated`` groups at the time of the agreement: a call whose local signature differs
    raises the "names changed" flag on its all-reduce, and every rank re-agrees in that call.

    ``names`` is the union of every rank's names (every pipeline stage), in rank order;
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
        """One ``all_gather_object`` over the call's group: every rank's names, stage and tied groups."""
        names, tied = local_sig
        mine = (stage.index, sorted(stage.pp_ranks) if stage.pp_ranks is not None else None, list(names), list(tied))
        everyone: list = [mine]
        if stage.distributed:
            everyone = [None] * stage.group_size
            dist.all_gather_object(everyone, mine, group=stage.group)
        order: dict[str, None] = {}
        for _, _, rank_names, _ in everyone:
            order.update(dict.fromkeys(rank_names))
        # the k-th tensor marked replicated over group R on each rank is one tied tensor
        nth: dict[tuple, str] = {}
        global_ranks = stage.global_ranks() if stage.distributed else [0]
        for rank, (_, _, _, rank_tied) in zip(global_ranks, everyone):
            seen: dict[tuple, int] = {}
            for name, ranks in rank_tied:
                k = seen[tuple(ranks)] = seen.get(tuple(ranks), -1) + 1
                nth[(rank, tuple(ranks), k)] = name
        me = dist.get_rank() if stage.distributed else 0
        peers: dict[str, list[str]] = {}
        seen = {}
        for name, ranks in tied:
            k = seen[tuple(ranks)] = seen.get(tuple(ranks), -1) + 1
            others = set(ranks) & set(stage.pp_ranks or ()) - {me}
            peers[name] = [nth[(q, tuple(ranks), k)] for q in sorted(others) if (q, tuple(ranks), k) in nth]
        return cls(cls.context_of(stage), local_sig, list(order), peers)

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


def _local_sig(local: Local, stage: Stage) -> tuple:
    tied: list[tuple[str, tuple[int, ...]]] = []
    for p, pnames in zip(local.params, local.param_names):
        annotation = p.__dict__.get(_ANNOTATION_ATTR)
        if annotation is not None and annotation.replicated_over is not None:
            ranks = tuple(sorted(annotation.replicated_over.ranks))
            tied.extend((n, ranks) for n in pnames)
    return (tuple(local.names), tuple(tied))


# ----------------------------------------------------------------------------- grad_norms


@torch.no_grad()
def grad_norms(
    parameters: NamedParams,
    norm_type: float = 2.0,
    *,
    groups: Callable[[str], str | None] | None = None,
    pp_group: Optional[GroupLike] = None,
    group: Optional[GroupLike] = None,
) -> dict[str, torch.Tensor]:
    r"""Global norms of the full gradients, per parameter (or per group), plus ``"total"``.

    Each value is the norm one process would compute over that parameter's (group's) full,
    unsharded gradient, whatever the layout: DTensors on any mesh, plain replicas, FSDP1 (flat
    parameters are cut back into their original parameters), ``mark_sharded`` /
    ``mark_replicated``, ``Partial`` grads, pipeline stages. The dict (keys, order, values, dtype)
    is the same on every rank; every rank must call it.

    Collectives: one all-reduce per call (plus ``Partial`` grads' one, as in ``clip_grad_norm_``).
    The first call with a module (or whenever some rank's parameter names or ``mark_replicated``
    groups changed) also agrees on the order of names with one ``all_gather_object`` (and then
    all-reduces again). Every rank must see a module for the first time in the same call. Reading
    which names are present is a host sync on accelerators.

    Args:
        parameters (nn.Module or Iterable[(str, Tensor)]): a module (names from
            ``named_parameters()`` without FSDP1, activation-checkpoint and ``torch.compile``
            wrapper prefixes, nor DDP's leading ``module.``) or ``(name, parameter)`` pairs (same
            clean-up, except ``module.``). Pass the module for FSDP1. Names are global across
            pipeline stages: one name on two stages is one entry (right for a tied weight marked
            with ``mark_replicated``; stages that number their layers locally should pass pairs
            with a stage prefix).
        norm_type (float): as in ``clip_grad_norm_``: any p > 0, ``inf``, ``-inf``, ``0``, p < 0.
        groups (callable, optional): ``name -> group name`` (a str, or ``None`` to leave the
            parameter out of the groups; it still counts in ``"total"``). Default: one entry per
            parameter.
        pp_group (ProcessGroup or DeviceMesh, optional): the pipeline-parallel group; the dict
            then holds the names of every stage.
        group (ProcessGroup or DeviceMesh, optional): the ranks that hold this model (default:
            the default process group); exactly those ranks call.

    Returns:
        ``{entry: norm, ..., "total": norm}``: entries in the agreed order (the union of every
        rank's names in rank order, or groups in order of first member). An entry is present iff
        some rank holds a grad (``.grad is not None``) for one of its parameters; one whose grads
        hold no element has norm 0. ``"total"`` is always present and equals
        :func:`get_total_norm` on the same parameters (to float64 rounding). Values are 0-dim
        float32 tensors (float64 if any rank holds a float64 grad), on the gradients' device.
        A tied weight counts once in ``"total"`` and in full in each entry that holds a copy.
    """
    def local_part() -> tuple[float, Stage, Local]:
        p = _check_norm_type(norm_type)
        if groups is not None and not callable(groups):
            raise TypeError(f"distclip: groups must be a callable name -> group name (or None), got {type(groups).__name__}")
        stage = current_stage(pp_group, group)
        return p, stage, collect(parameters, stage)

    found, error = rank_errors.attempt(local_part)
    if found is not None:
        p, stage, local = found
    else:  # bad input here: join the call's collectives holding nothing, then raise on every rank
        assert error is not None
        try:
            stage = current_stage(None, group)
        except Exception:
            raise error from None
        p = _fallback_norm_type(norm_type)
        local = Local([], parameters if isinstance(parameters, nn.Module) else None, [], [], frozenset({("failed",)}), {}, [])
    entry_groups = groups if callable(groups) else None
    sig = _local_sig(local, stage)
    order = NameOrder.cached(local.module, stage)
    if order is None:
        order = NameOrder.agree(sig, stage)
        order.store(local.module)
    stale = order.local_sig != sig
    partial_values = _reduce_partial_units(local.units)
    device = reduction_device(stage) if stage.distributed else None
    for _attempt in range(2):
        entry_names, entry_of = order.entries(entry_groups)
        packed, packet = _pack(local, order, entry_names, entry_of, partial_values, p, stage, device, stale, error is not None)
        all_reduce(packed, p, stage)
        # read on the host (a sync on accelerators, as reading which names are present is anyway)
        view = packet.decode_host(packed.tolist())
        rank_errors.settle(view.failed, error, packed.device, stage.group)
        if not view.names_changed:
            break
        order = NameOrder.agree(sig, stage)
        order.store(local.module)
        stale = False
    return _unpack(packed, view, entry_names, p, packet, local)


def _fallback_norm_type(norm_type: object) -> float:
    """A failed rank's norm type: the reduction op the others most likely use (MAX for ±inf)."""
    try:
        return math.inf if math.isinf(float(norm_type)) else 2.0  # type: ignore[arg-type]
    except Exception:
        return 2.0


def _reduce_partial_units(units: list[Unit]) -> dict[int, torch.Tensor]:
    """``Partial`` grads made whole (one all-reduce per partial mesh group, as in clip.py)."""
    wanted = [(cast(DTensor, u.tensor), float(i)) for i, u in enumerate(units) if u.partial]  # a partial unit holds its DTensor grad
    if not wanted:
        return {}
    # ``reduce_partial_grads`` returns (value, weight) pairs with the weight passed through
    # unchanged, in its own bucket order: the unit's index travels in the weight's place.
    return {int(i): value for value, i in reduce_partial_grads(wanted)}


def _pack(local, order, entry_names, entry_of, partial_values, p, stage, device, stale, failed):
    """This rank's vector (see ``packet``): its head is the per-entry weighted partials and the
    total's partial, then per-entry flags; the packet adds the agreement slots and the flags
    (names changed, has float64, failed)."""
    units = local.units
    n_entries = len(entry_names)
    tensors = [partial_values.get(i, u.tensor) for i, u in enumerate(units)]
    grad_device = tensors[0].device if tensors else None
    device = device or grad_device or torch.device("cpu")
    s = tensor_partials(tensors, p, device)
    index, weights, entry_weights, idx_all, idx_has = order.index, [], [], [], []
    ent = []
    for u in units:
        i = index.get(u.name)
        e = entry_of[i] if i is not None else -1  # unknown name: this rank raised "names changed"
        ent.append(e)
        weights.append(u.weight)
        w = u.weight
        peers = order.tied_peers.get(u.name)
        if peers is not None and e >= 0:  # a tied copy counts once per entry, in full in each
            copies = stage_copies(u.param.__dict__[_ANNOTATION_ATTR].replicated_over.ranks, stage.pp_ranks)
            same = 1 + sum(1 for q in peers if q in index and entry_of[index[q]] == e)
            w = w * copies / same
        entry_weights.append(w)
        if e >= 0:
            idx_all.append(e)
            if u.tensor.numel():
                idx_has.append(e)
    use_max = math.isinf(p)
    n = n_entries + 1  # entries, then the total
    flags = torch.zeros(n, dtype=torch.float64)
    flags.index_fill_(0, torch.tensor(idx_all + ([n_entries] if units else []), dtype=torch.long), 1.0)
    has_any = any(u.tensor.numel() for u in units)
    flags.index_fill_(0, torch.tensor(idx_has + ([n_entries] if has_any else []), dtype=torch.long), 1.0 + _B)
    flags = flags.to(device)
    ent_t = torch.tensor(ent, dtype=torch.long, device=device)
    keep = ent_t >= 0
    if use_max:
        sign = 1.0 if p > 0 else -1.0
        v = s * sign
        nan = torch.isnan(v)
        v = torch.where(nan, -math.inf, v)
        values = torch.full((n,), -math.inf, dtype=torch.float64, device=device)
        values[:n_entries].scatter_reduce_(0, ent_t[keep], v[keep], "amax")
        nan_e = torch.zeros(n, dtype=torch.float64, device=device)
        nan_e[:n_entries].scatter_reduce_(0, ent_t[keep], nan[keep].double(), "amax")
        if units:
            values[n_entries] = v.max()
            nan_e[n_entries] = nan.any().double()
        flags = flags + nan_e * (_B * _B)
    else:
        w_total = torch.tensor(weights, dtype=torch.float64, device=device)
        w_entry = torch.tensor(entry_weights, dtype=torch.float64, device=device)
        values = torch.zeros(n, dtype=torch.float64, device=device)
        values[:n_entries].index_add_(0, ent_t[keep], (s * w_entry)[keep])
        values[n_entries] = (s * w_total).sum()
    has_float64 = any(u.tensor.dtype in _FLOAT64 for u in units)
    call = agreement.call_signature(f"grad_norms[{len(order.names)} names {order.crc:08x}, {len(entry_names)} entries]", p, None, False, stage)
    packet = Packet(2 * n, agreement.Signature(call, local.kinds, stage) if stage.distributed else None, use_max)
    packed = packet.encode_device(torch.cat([values, flags]), device, names_changed=stale, has_float64=has_float64, failed=failed)
    return packed, packet


def _unpack(packed: torch.Tensor, view: HostView, entry_names: list[str], p: float, packet: Packet, local: Local) -> dict[str, torch.Tensor]:
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
    grad_device = local.units[0].tensor.device if local.units else packed.device
    held = [f >= 1 for f in view.head[n : 2 * n - 1]]  # which names are present (read on the host above)
    results = total.to(device=grad_device, dtype=out_dtype).unbind()
    out = {name: results[i] for i, name in enumerate(entry_names) if held[i]}
    out[TOTAL] = results[-1]
    return out


# ----------------------------------------------------------------------------- describe


def _placements_str(placements: tuple) -> str:
    return "(" + ", ".join(str(pl) for pl in placements) + ")"


def _fsdp1_over_tp(kind: str, spec: object, fsdp1_shards: int) -> tuple[str, tuple[int, ...], int]:
    """An FSDP1 row's kind, global shape and pieces when FSDP1 flattened the local piece of a
    DTensor (FSDP1 over TP): FSDP1 shards x TP pieces."""
    tp = _fsdp1.tp_pieces(spec)
    kind += f" by FSDP1, of one of {tp} TP pieces ({_fsdp1.tp_description(spec)}): {fsdp1_shards} FSDP1 shards x {tp} TP pieces"
    return kind, tuple(spec.shape), fsdp1_shards * tp  # type: ignore[attr-defined]  # a DTensorSpec


def describe_rows(parameters: NamedParams, *, pp_group: Optional[GroupLike] = None, group: Optional[GroupLike] = None) -> list[dict]:
    """How distclip sees each parameter on this rank: local and cheap (no collective).

    One row per named parameter (per original parameter inside an FSDP1 flat parameter), as a dict
    with ``name``, ``local_shape``, ``global_shape`` (None where only the user knows it),
    ``dtype``, ``kind`` (the layout), ``pieces`` (disjoint pieces of the full gradient within a
    pipeline stage), ``weight`` (what distclip multiplies this rank's ``sum |g|^p`` by; None when
    the parameter has no grad here and is skipped) and ``grad`` (whether it has one here).
    ``pp_group`` and ``group`` as in :func:`grad_norms` (they set the counts).
    """
    stage = current_stage(pp_group, group)
    local = collect(parameters, stage)
    fsdp1 = _fsdp1.shard_info(local.module) if local.module is not None else {}
    weights: dict[tuple, float] = {}
    partial: set = set()
    for u in local.units:
        weights[(id(u.param), u.name)] = u.weight
        if u.partial:
            partial.add(id(u.param))
    rows = []
    for p, pnames in zip(local.params, local.param_names):
        annotation = p.__dict__.get(_ANNOTATION_ATTR)
        mark = ""
        mark_pieces = 1
        if annotation is not None:
            for info in annotation.sharded_over:
                mark += f" + mark_sharded over ranks {sorted(info.ranks)}"
                mark_pieces *= info.size
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


def describe(parameters: NamedParams, *, pp_group: Optional[GroupLike] = None, group: Optional[GroupLike] = None) -> str:
    """A readable table of :func:`describe_rows`: how distclip sees this rank's parameters."""
    stage = current_stage(pp_group, group)
    rows = describe_rows(parameters, pp_group=pp_group, group=group)
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
