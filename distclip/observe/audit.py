"""Audit a layout: does distclip count this model's gradients the way they really lie?

``distclip.audit(model)`` is slow by design (one object exchange of every local gradient's
hash and float64 statistics, plus a few norm calls): run it once after setting a model up, not
every step. It checks, from the *values* every rank holds, what distclip otherwise takes on
trust:

- every piece distclip treats as copies (a plain tensor across its pipeline stage, a DTensor
  across its mesh's non-sharded dims, an FSDP1 shard across the replicate group, a
  ``mark_sharded`` piece across the ranks at the same position of its groups, a
  ``mark_replicated`` tensor across its group) is bit-identical on the ranks that hold it; a plain
  tensor that is really a tensor-parallel shard (a forgotten ``mark_sharded``) differs here;
- the pieces of a ``mark_sharded`` tensor are not identical non-zero copies across its group (a
  ``mark_sharded`` over the data-parallel group instead of the tensor-parallel one);
- ``get_total_norm`` and ``grad_norms`` (p = 1, 2, inf) match a float64 reference computed on every
  rank from one copy of every distinct piece, found from the placements, not from distclip's
  weights.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional, Sequence, Union, cast

import torch
import torch.distributed as dist

from distclip import _fsdp1
from distclip._dtensor import SHARD_PLACEMENTS, DTensor, partial_dims, spec_of
from distclip.clip import total_grad_norm
from distclip.comm import failure, objects
from distclip.comm.reduce import reduction_device
from distclip.host_reads import host_reads_allowed
from distclip.layout.discovery import CallGroup, GroupLike, call_group, pairing_names
from distclip.observe.grad_norms import LocalGrads, NamedGrad, collect, grad_norms
from distclip.observe.name_order import stage_unique
from distclip.observe.names import NamedParams, Prefixes, parameters_of

__all__ = ["AuditReport", "audit"]

NORM_TYPES = (1.0, 2.0, math.inf)


class Record(NamedTuple):
    """One local gradient piece as a rank saw it; every rank's records are gathered to every rank."""

    key: tuple  # which tensor: ("name", name, stage) or, for a mark_replicated one, ("tied", group size, k)
    piece: tuple  # which piece of it (equal keys and pieces hold copies): ("plain",), ("dtensor", mesh shape, coords), ...
    rank: int
    name: str
    kind: str  # the layout, as the problems describe it
    digest: str  # hash of its bytes
    numel: int
    zero: bool  # empty or all zeros
    marks: tuple[tuple[int, ...], ...]  # the sorted ranks of each mark_sharded group
    stats: dict[float, float]  # per norm type: sum |g|^p (the max for inf)


@dataclass
class AuditReport:
    """The verdict of :func:`audit` (the same on every rank)."""

    ok: bool
    problems: list[str]
    norm: float  # distclip's total 2-norm (get_total_norm)
    reference_norm: float  # the float64 reference from the gathered pieces
    details: dict = field(default_factory=dict)  # per norm type: (distclip, reference)

    def __str__(self) -> str:
        head = "distclip audit: OK" if self.ok else f"distclip audit: {len(self.problems)} problem(s)"
        reference = f"float64 reference {self.reference_norm:.9g}"
        if not self.ok:
            # the reference counts one copy of each piece by its name, pipeline stage and position, as
            # distclip sees them: a layout problem below (a forgotten pp_group on stages with the same
            # names, a forgotten mark) makes it the norm of what distclip counted, not of the model
            reference += " over the pieces as distclip names them (name, stage, position): not the model's norm if the layout is wrong"
        lines = [f"{head} (2-norm {self.norm:.9g}, {reference})"]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


def _hash(t: torch.Tensor) -> str:
    data = t.detach().reshape(-1).contiguous().cpu()
    if data.is_complex():
        data = torch.view_as_real(data).reshape(-1)
    return hashlib.blake2b(objects.tensor_bytes(data), digest_size=12).hexdigest()


def _stats(t: torch.Tensor) -> dict[float, float]:
    x = t.detach().reshape(-1).cpu()
    x = x.abs().double() if x.is_complex() else x.double().abs()
    out = {p: float(x.pow(p).sum()) for p in NORM_TYPES if not math.isinf(p)}
    out[math.inf] = float(x.max()) if x.numel() else -math.inf
    if x.numel() and bool(torch.isnan(x).any()):
        out[math.inf] = math.nan
    return out


def _positions(annotation, rank: int) -> tuple:
    return tuple(sorted(info.ranks).index(rank) for info in annotation.sharded_over) if annotation else ()


def _measured(record: Record, tensor: torch.Tensor) -> Record:
    """``record`` with the hash, size and statistics of ``tensor`` (the local piece it names)."""
    zero = tensor.numel() == 0 or not bool(tensor.detach().ne(0).any())
    return record._replace(digest=_hash(tensor), numel=tensor.numel(), zero=zero, stats=_stats(tensor))


def _whole(unit) -> torch.Tensor:
    """A ``Partial`` grad made whole with DTensor's own redistribute (collective over its mesh)."""
    from torch.distributed.tensor import Replicate

    grad = unit.tensor
    dims = partial_dims(spec_of(grad))
    placements = [Replicate() if i in dims else pl for i, pl in enumerate(grad.placements)]
    return grad.redistribute(grad.device_mesh, placements).to_local()


@torch.no_grad()
def audit(
    parameters: NamedParams,
    *,
    pp_group: Optional[GroupLike] = None,
    group: Optional[GroupLike] = None,
    rtol: float = 1e-5,
    trainable_only: bool = False,
    strip_prefixes: Prefixes = False,
) -> AuditReport:
    """Check that distclip's view of ``parameters`` matches the gradients every rank holds.

    Slow by design: gathers a hash and float64 statistics of every local gradient piece from every
    rank (one object exchange), makes ``Partial`` grads whole, and calls ``get_total_norm`` and
    ``grad_norms`` for p = 1, 2 and inf. Every rank must call it; no gradient is changed; every
    rank returns the same report.

    Args:
        parameters (nn.Module, Tensor or Iterable[Tensor or (str, Tensor)]): as for
            :func:`distclip.grad_norms` (whatever ``clip_grad_norm_`` takes, or named pairs).
        pp_group (ProcessGroup or DeviceMesh, optional): the pipeline-parallel group.
        group (ProcessGroup or DeviceMesh, optional): the ranks that hold this model (default:
            the default process group); exactly those ranks call.
        rtol (float): relative tolerance of the norm comparisons.
        trainable_only (bool), strip_prefixes (bool or Sequence[str]): as for
            :func:`distclip.grad_norms`.

    Returns:
        :class:`AuditReport` with ``ok``, ``problems`` (readable, naming parameters and ranks),
        ``norm`` (distclip's 2-norm), ``reference_norm`` and ``details``.
    """
    found, error = failure.attempt(functools.partial(_local_records, parameters, pp_group, group, trainable_only, strip_prefixes))
    # Every rank learns whether any failed before the first collective a failed rank could not
    # join: making a Partial grad whole is a collective over its mesh (a failed rank would leave
    # its peers waiting there until the process-group timeout).
    if found is None:
        assert error is not None
        try:
            stage = call_group(None, group)
        except Exception:
            raise error from None
    else:
        stage = found.stage
    if stage.distributed:
        failures = failure.gather(error, reduction_device(stage), stage.group)
        if any(f is not None for f in failures) or error is not None:
            failure.raise_gathered(failures, error, stage.global_ranks())
    elif error is not None:
        raise error
    assert found is not None  # a failed rank raised above
    measured, error = failure.attempt(functools.partial(_made_whole, found.local, found.records))
    everyone: list = [measured]
    if stage.distributed:  # the records' exchange carries each rank's failure: every rank raises together
        shared = objects.all_gather_objects((measured, failure.error_summary(error) if error is not None else None),
                                             reduction_device(stage), stage.group, what="audit")
        failures = [failure for _, failure in shared]
        if any(f is not None for f in failures) or error is not None:
            failure.raise_gathered(failures, error, stage.global_ranks())
        everyone = [rank_records for rank_records, _ in shared]
    problems = _copy_problems(everyone)
    details = _compare_norms(found, everyone, pp_group, group, rtol, trainable_only, strip_prefixes, problems)
    return AuditReport(not problems, problems, details[2.0][0], details[2.0][1], details)


class _Inputs(NamedTuple):
    """This rank's side of an audit, worked out before any collective."""

    stage: CallGroup
    items: Union[torch.nn.Module, list[tuple[str, torch.Tensor]]]  # what the norm calls get: the module, or named pairs
    local: LocalGrads
    records: list[Record]  # one per local gradient piece (a Partial grad's not measured yet)


def _local_records(parameters: NamedParams, pp_group: Optional[GroupLike], group: Optional[GroupLike], trainable_only: bool,
                   strip_prefixes: Prefixes) -> _Inputs:
    stage = call_group(pp_group, group)
    named = parameters_of(parameters, trainable_only, strip_prefixes)  # a generator is read once, here
    # a module goes on as itself (FSDP1 needs it); anything else as its named pairs
    items: Union[torch.nn.Module, list[tuple[str, torch.Tensor]]] = (
        named.module if named.module is not None else list(zip(named.names, named.params)))
    local = collect(named, stage)
    rank = dist.get_rank() if stage.distributed else 0
    fsdp1 = _fsdp1.fsdp1_pieces(local.module, described=True) if local.module is not None else {}
    tied_key = _tied_keys(local)
    records: list[Record] = []
    for u in local.units:
        annotation = local.annotation(u.param)
        marks = tuple(tuple(sorted(i.ranks)) for i in annotation.sharded_over) if annotation else ()
        key = tied_key.get((id(u.param), u.name), ("name", u.name, stage.index))
        piece, kind = _piece_of(u, fsdp1, marks)
        if key[0] == "tied":
            kind = "mark_replicated tensor"
        record = Record(key, piece + _positions(annotation, rank), rank, u.name, kind, "", 0, True, marks, {})
        # a Partial grad is measured once made whole, by a collective, after the failure check
        records.append(record if u.partial else _measured(record, u.tensor))
    return _Inputs(stage, items, local, records)


def _tied_keys(local: LocalGrads) -> dict[tuple, tuple]:
    """(id(param), name) -> ("tied", group size, k) for every ``mark_replicated`` name: the k-th
    tied tensor of every rank is one tensor, its copies on the other stages and on the other
    data-parallel replicas (each with its own group) all copies."""
    seen: dict[int, int] = defaultdict(int)
    keys: dict[tuple, tuple] = {}
    for param, pnames in zip(local.params, local.param_names):
        annotation = local.annotation(param)
        if annotation is not None and annotation.replicated_over is not None:
            size = len(annotation.replicated_over.ranks)
            for n in pnames:
                keys[(id(param), n)] = ("tied", size, seen[size])
                seen[size] += 1
    return keys


def _piece_of(u: NamedGrad, fsdp1: dict, marks: tuple) -> tuple[tuple, str]:
    """Which piece of its tensor ``u`` holds (equal pieces on two ranks are copies) and its layout
    in words."""
    if isinstance(u.param, DTensor):
        grad = cast(DTensor, u.param.grad)  # a unit is made only for a grad; a DTensor's is a DTensor
        mesh = grad.device_mesh
        coord: Sequence[int] = mesh.get_coordinate() or []
        sharded = tuple(c for c, pl in zip(coord, grad.placements) if isinstance(pl, SHARD_PLACEMENTS))
        # by mesh shape, not ranks: equal sub-meshes (a dp mesh per tp rank) hold copies
        return ("dtensor", tuple(mesh.shape), sharded), f"DTensor {tuple(grad.placements)} on mesh {tuple(mesh.shape)}"
    if id(u.param) in fsdp1:
        # FSDP1 over TP: which TP piece the shard is of (equal TP coordinates hold copies)
        tp = _fsdp1.tp_coordinate(u.segment.tp_spec if u.segment is not None else fsdp1[id(u.param)].tp_spec)
        return ("fsdp1", fsdp1[id(u.param)].rank, *tp), "FSDP1 shard"
    return ("plain",), "plain tensor (replicated across the stage)" if not marks else "mark_sharded tensor"


def _made_whole(local: LocalGrads, records: list[Record]) -> list[Record]:
    """``records`` with every ``Partial`` grad made whole and measured. Every one is made whole
    before any is measured, so that the collectives go out whatever the local math does next, in
    an order every rank agrees on, whatever order each rank's list has (``reduce._pairing_key``)."""
    units = local.units
    held = [i for i, u in enumerate(units) if u.partial]
    names = pairing_names([units[i].tensor for i in held], [units[i].param for i in held])
    keyed = sorted(zip(held, names), key=lambda item: (item[1], tuple(units[item[0]].tensor.shape), str(units[item[0]].tensor.dtype),
                                                       repr(spec_of(units[item[0]].tensor).placements)))
    wholes = [(i, _whole(units[i])) for i, _ in keyed]
    out = list(records)
    for i, tensor in wholes:
        out[i] = _measured(records[i], tensor)
    return out


def _compare_norms(found: _Inputs, everyone: list[list[Record]], pp_group: Optional[GroupLike], group: Optional[GroupLike],
                   rtol: float, trainable_only: bool, strip_prefixes: Prefixes, problems: list[str]) -> dict:
    """distclip's norms (``get_total_norm``'s and ``grad_norms``') against the float64 reference
    of the gathered pieces, for every norm type: the details, the problems appended."""
    stage, items, local = found.stage, found.items, found.local
    reference_total, reference_by_name = _reference(everyone)
    details = {}
    for p in NORM_TYPES:
        # ``local.module`` is set exactly when ``items`` is a module
        mine = float(_on_every_rank(functools.partial(
            total_grad_norm, cast(torch.nn.Module, items) if local.module is not None else local.params, p, pp_group=pp_group,
            group=group), stage))
        by_name = grad_norms(items, p, pp_group=pp_group, group=group, trainable_only=trainable_only,
                             strip_prefixes=strip_prefixes if local.module is not None else False)
        ref = reference_total[p]
        details[p] = (mine, ref)
        if not _close(mine, ref, rtol):
            problems.append(f"distclip's total {p:g}-norm {mine:.9g} differs from the float64 reference {ref:.9g} "
                            f"(relative error {_rel(mine, ref):.2e})")
        if not _close(float(by_name["total"]), ref, rtol):
            problems.append(f"grad_norms' total {p:g}-norm {float(by_name['total']):.9g} differs from the reference {ref:.9g}")
        for name, ref_n in reference_by_name[p].items():
            got = by_name.get(name)
            if got is None:
                problems.append(f"{name}: missing from grad_norms")
            elif not _close(float(got), ref_n, rtol):
                problems.append(f"{name}: grad_norms {p:g}-norm {float(got):.9g} vs float64 reference {ref_n:.9g}")
    return details


def _on_every_rank(fn: Callable[[], torch.Tensor], stage: CallGroup) -> torch.Tensor:
    """``fn()``, a distclip norm call, raising on every rank if it raised on any. Without host reads
    a rank that fails raises alone and the others get a NaN norm: the audit's next collective would
    leave them waiting until the timeout, so one gather of the errors follows (elsewhere the call
    itself raises on every rank)."""
    if not stage.distributed or host_reads_allowed(reduction_device(stage)):
        return fn()
    value, error = failure.attempt(fn)
    failures = failure.gather(error, reduction_device(stage), stage.group)
    if any(f is not None for f in failures) or error is not None:
        failure.raise_gathered(failures, error, stage.global_ranks())
    assert value is not None
    return value


def _copy_problems(everyone: list[list[Record]]) -> list[str]:
    problems = []
    holders: dict[tuple, list[Record]] = defaultdict(list)
    by_key: dict[tuple, list[Record]] = defaultdict(list)
    for records in everyone:
        for r in records:
            holders[(r.key, r.piece)].append(r)
            by_key[r.key].append(r)
    classes = {}  # per (key, piece) held by several ranks: its ranks by digest
    for where, rs in holders.items():
        hashes = defaultdict(list)
        for r in rs:
            hashes[r.digest].append(r.rank)
        if len(rs) > 1:
            classes[where] = sorted(hashes.values(), key=len, reverse=True)
    stages = _forgotten_stages(classes, holders)
    for where, groups in classes.items():
        if len(groups) > 1:
            rs = holders[where]
            names = sorted({r.name for r in rs})
            if stages:
                hint = " (pipeline stages without pp_group? see below)"
            elif rs[0].kind.startswith("plain"):
                hint = " (a tensor-parallel shard without mark_sharded, or replicas out of sync?)"
            else:
                hint = ""
            problems.append(
                f"{', '.join(names)}: a {rs[0].kind} that distclip counts as identical copies differs across ranks: "
                + " vs ".join(f"ranks {sorted(g)}" for g in groups) + hint
            )
    if stages:
        problems.append(
            f"every tensor that distclip counts as copies differs across the same {stages} equal sets of ranks, with the "
            f"same shapes: this is what {stages} pipeline stages of identical shapes look like when pp_group is not "
            f"passed (each stage is then counted as a replica of the others, and the norm is the true one divided by "
            f"sqrt({stages}) = {math.sqrt(stages):.4g}; the layout check cannot see it, since every rank holds the same "
            "shapes): pass pp_group. If the ranks hold tensor-parallel shards instead, mark those with mark_sharded."
        )
    for rs in by_key.values():
        for r in rs:
            for group in r.marks:
                same = [q.rank for q in rs
                        if q.rank in group and q.rank != r.rank and q.digest == r.digest and q.piece != r.piece and not r.zero]
                if same and r.rank < min(same):
                    problems.append(
                        f"{r.name}: marked sharded over ranks {list(group)}, but ranks {[r.rank, *same]} hold identical non-zero "
                        "gradients: these look like replicas, not pieces (mark_sharded over the wrong group?)"
                    )
    return problems


def _forgotten_stages(classes: dict[tuple, list[list[int]]], holders: dict[tuple, list[Record]]) -> int:
    """The number of stages when the differences fit a forgotten ``pp_group`` over stages of
    identical shapes, else 0: every piece held by several ranks (tied ones aside) differs, each
    into the same number k >= 2 of equal sets of ranks, and one partition of the ranks into k
    sets explains them all."""
    pieces = [(where, groups) for where, groups in classes.items() if where[0][0] != "tied"]
    if not pieces or any(len(groups) < 2 for _, groups in pieces):
        return 0
    ks = {len(groups) for _, groups in pieces}
    if len(ks) != 1 or any(len({len(g) for g in groups}) != 1 for _, groups in pieces):
        return 0
    k = ks.pop()
    # ranks in one class of some piece are in one stage; ranks in two classes of a piece are not
    parent: dict[int, int] = {}

    def root(x: int) -> int:
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    for _, groups in pieces:
        for g in groups:
            for r in g[1:]:
                parent[root(r)] = root(g[0])
    for _, groups in pieces:
        roots = [{root(r) for r in g} for g in groups]
        if any(len(x) != 1 for x in roots) or len(set().union(*roots)) != len(groups):
            return 0
    return k if len({root(r) for r in parent}) == k else 0


def _reference(everyone: list[list[Record]]) -> tuple[dict, dict]:
    """Float64 norms from one copy (the lowest rank's) of every distinct piece: total and per name."""
    first: dict[tuple, Record] = {}
    for records in everyone:
        for r in records:
            first.setdefault((r.key, r.piece), r)
    # the names grad_norms gives: a name two stages hold for different tensors is made unique by stage
    held: dict[int, set[str]] = defaultdict(set)
    tied_names: set[str] = set()
    for records in everyone:
        for r in records:
            if r.key[0] == "tied":
                tied_names.add(r.name)
            else:
                held[r.key[2]].add(r.name)
    unique, _ = stage_unique([(stage, names, tied_names) for stage, names in held.items()])
    by_name_pieces: dict[str, dict] = defaultdict(dict)
    for records in everyone:
        for r in records:
            # a tied tensor's copies on every stage are one piece; a named one's, one per stage
            tied = r.key[0] == "tied"
            name = r.name if tied else unique(r.key[2], r.name)
            by_name_pieces[name].setdefault((tied, r.key if tied else r.key[2], r.piece), r)
    total, per_name = {}, {}
    for p in NORM_TYPES:
        total[p] = _combine([r.stats[p] for r in first.values()], [r.numel for r in first.values()], p)
        per_name[p] = {n: _combine([r.stats[p] for r in pieces.values()], [r.numel for r in pieces.values()], p)
                       for n, pieces in by_name_pieces.items()}
    return total, per_name


def _combine(values: list[float], numels: list[int], p: float) -> float:
    if not any(numels):
        return 0.0
    if math.isinf(p):
        return math.nan if any(math.isnan(v) for v in values) else max(values)
    return math.fsum(values) ** (1.0 / p)


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b) if b else abs(a)


def _close(a: float, b: float, rtol: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    if math.isinf(a) or math.isinf(b):
        return a == b
    return _rel(a, b) <= rtol
