"""Agreement: detect ranks whose calls cannot belong to one model, on every rank at once.

Each rank's :class:`Signature` holds

- its *call signature* (which function, ``norm_type``, ``max_norm``, ``error_if_nonfinite``,
  pipeline size and stage size), which every rank of the group must share, and
- its *stage layout* (the set of layout kinds it holds: DTensor mesh shapes and placements,
  FSDP1 shards, plain and ``mark_replicated`` tensors), which every rank of a stage must share.

``packet`` encodes them as hashes on the call's single all-reduce and tests the reduced numbers;
every rank sees the same numbers, so every rank reaches the same verdict, and only then (error
path only, every rank together) :func:`raise_mismatch` gathers the details to say which rank
differs.
"""

from __future__ import annotations

import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Optional

from distclip.comm.failure import LayoutMismatchError
from distclip.comm.objects import all_gather_objects
from distclip.comm.reduce import reduction_device
from distclip.layout.discovery import CallGroup

__all__ = ["LayoutMismatchError", "Signature", "crc_bytes", "raise_mismatch", "call_signature"]


@dataclass(frozen=True)
class Signature:
    call: tuple  # must be equal on every rank of the world
    tensor_kinds: frozenset  # must be equal on every rank of one stage
    stage: CallGroup


def crc_bytes(value: object) -> tuple[int, ...]:
    """The four bytes of the crc32 of ``repr(value)``: deterministic across processes, unlike
    ``hash()`` (``packet`` encodes them on the reduced vector; bytes, not wider parts, so that its
    sums of ``n * h^2`` stay exact in float64 for any world size up to 2^18 ranks)."""
    h = zlib.crc32(repr(value).encode())
    return h >> 24, (h >> 16) & 0xFF, (h >> 8) & 0xFF, h & 0xFF


def raise_mismatch(sig: Signature) -> None:
    """Error path, taken by every rank together: gather the details and raise."""
    raise LayoutMismatchError(_describe(sig))


def _describe(sig: Signature) -> str:
    """Error path only, on every rank together: gather every rank's signature, name the odd ones.

    "Most ranks" is said only of a true majority; when no value is shared by more than half of the
    ranks, every rank's value is listed. Layouts are said in words (:func:`_kind_str`)."""
    stage = sig.stage
    mine = (sig.call, sorted(sig.tensor_kinds, key=repr), stage.index, sorted(stage.pp_ranks) if stage.pp_ranks is not None else None)
    gathered = all_gather_objects(mine, reduction_device(stage), stage.group, what="the mismatch report")
    # by global rank (the group's ranks in group-rank order)
    everyone = dict(zip(stage.global_ranks(), gathered))
    lines = []
    calls = Counter(call for call, _, _, _ in everyone.values())
    usual_call, count = calls.most_common(1)[0]
    if len(calls) > 1:
        if 2 * count > len(everyone):
            for rank, (call, _, _, _) in everyone.items():
                if call != usual_call:
                    lines.append(f"rank {rank} called {_call_str(call)}, most ranks {_call_str(usual_call)}")
        else:
            lines.append("no call is shared by most ranks: " + "; ".join(
                f"rank {rank} called {_call_str(call)}" for rank, (call, _, _, _) in everyone.items()))
    for index in sorted({s for _, _, s, _ in everyone.values()}):
        members = [(rank, tuple(kinds)) for rank, (_, kinds, s, _) in everyone.items() if s == index]
        layouts = Counter(k for _, k in members)
        usual_kinds, count = layouts.most_common(1)[0]
        if len(layouts) == 1:
            continue
        majority = 2 * count > len(members)
        census_differs = False
        start = len(lines)
        for rank, kinds in members:
            if kinds != usual_kinds or not majority:
                census_differs = census_differs or _census(kinds) != _census(usual_kinds)
                if majority:
                    lines.append(f"rank {rank} (pipeline stage {index}) holds {_difference(kinds, usual_kinds)}")
                else:
                    lines.append(f"rank {rank} (pipeline stage {index}) holds {_layout_str(kinds)}")
        if not majority:
            lines.insert(start, f"no layout is shared by most ranks of pipeline stage {index}:")
        empty = [rank for rank, kinds in members if _census(kinds) == (0, 0) and len(kinds) == 1]
        if empty and len(empty) < len(members):
            lines.append(
                f"rank(s) {empty} passed no parameters: if they hold no part of this model, call distclip only on the "
                "ranks that hold it, passing those ranks as group= (a ProcessGroup or 1-D DeviceMesh)"
            )
        elif census_differs and stage.pp_size > 1 and _pp_group_holds_copies(everyone):
            lines.append(
                "ranks that pp_group puts in one stage hold different parameters, while the ranks of each pp_group hold "
                "the same ones: pp_group looks like the data-parallel group (ranks holding copies of one stage); "
                "pass the group of ranks that hold *different* stages, one rank per stage (e.g. mesh['pp'], "
                "not mesh['dp'])"
            )
        elif census_differs:
            lines.append(
                "ranks of one stage hold different parameters: if they hold different pipeline stages, pass "
                "pp_group; if they hold different experts (or other pieces of a split tensor), mark those "
                "with mark_sharded"
            )
    if not lines:  # hash collision in the other direction cannot happen; keep the message useful
        lines.append("the ranks' signatures differ")
    return "distclip: ranks disagree, so no norm was computed and no gradient was changed:\n  " + "\n  ".join(lines)


_CENSUS = "parameters held"


def _census(kinds: tuple) -> tuple[int, int] | None:
    """(number of parameters, digest of their dtypes and shapes) from a rank's kinds."""
    for kind in kinds:
        if kind and isinstance(kind[0], str) and kind[0].startswith(_CENSUS):
            return kind[1], kind[2]
    return None


def _kind_str(kind: tuple) -> str:
    """One layout kind (``layout.fingerprint``) in words."""
    head = kind[0] if kind else ""
    if head == "plain":
        return f"plain {kind[1].replace('torch.', '')} tensors"
    if head == "mark_replicated":
        return f"{kind[1].replace('torch.', '')} tensors marked with mark_replicated"
    if head == "DTensor":
        _, shape, names, placements, dtype = kind[:5]
        dims = f" {tuple(names)}" if names else ""
        marked = " marked with mark_replicated" if len(kind) > 5 else ""
        return f"{dtype.replace('torch.', '')} DTensors on a mesh of shape {tuple(shape)}{dims}, placed ({', '.join(placements)}){marked}"
    if head == "FSDP1":
        dtype = kind[2].replace("torch.", "")
        if isinstance(kind[1], tuple):
            return f"FSDP1 {dtype} flat shards (segment weights {', '.join(f'{w:g}' for w in kind[1])})"
        return f"FSDP1 {dtype} flat shards of weight {kind[1]:g}"
    if head == "failed":
        return "nothing it could measure (its own input failed)"
    return " ".join(map(str, kind))


def _layout_str(kinds: tuple) -> str:
    census = _census(kinds)
    held = [_kind_str(k) for k in kinds if _census((k,)) is None]
    count = f"{census[0]} parameter(s)" if census is not None else "parameters"
    return count + (": " + "; ".join(held) if held else "")


def _difference(kinds: tuple, usual: tuple) -> str:
    """What a rank holds, in words, next to what most ranks of its stage hold."""
    parts = []
    mine, theirs = _census(kinds), _census(usual)
    if mine != theirs and mine is not None and theirs is not None:
        if mine[0] != theirs[0]:
            parts.append(f"{mine[0]} parameter(s) where most ranks of its stage hold {theirs[0]}")
        else:
            parts.append(f"{mine[0]} parameter(s), as most ranks of its stage, but of other dtypes or shapes")
    extra = [_kind_str(k) for k in kinds if k not in usual and _census((k,)) is None]
    missing = [_kind_str(k) for k in usual if k not in kinds and _census((k,)) is None]
    if extra:
        parts.append("also " + "; ".join(extra) + " (most ranks of its stage hold none)")
    if missing:
        parts.append("no " + "; no ".join(missing) + " (which most ranks of its stage hold)")
    return ", ".join(parts) if parts else "a different layout than most ranks of its stage"


def _pp_group_holds_copies(everyone: dict) -> bool:
    """Whether, on every rank, the members of its pp_group hold the same parameters (a data-parallel
    group passed as pp_group): stages would differ, copies do not."""
    census = {rank: _census(tuple(kinds)) for rank, (_, kinds, _, _) in everyone.items()}
    groups = {tuple(pp) for _, _, _, pp in everyone.values() if pp}
    return bool(groups) and all(len({census.get(r) for r in pp}) == 1 for pp in groups if len(pp) > 1)


def _call_str(call: tuple) -> str:
    fn, norm_type, max_norm, error_if_nonfinite, pp_size, stage_size = call
    extra = "" if max_norm is None else f", max_norm={max_norm}"
    return (
        f"{fn}(norm_type={norm_type}{extra}, error_if_nonfinite={error_if_nonfinite}) with {pp_size} "
        f"pipeline stage(s) of {stage_size} ranks"
    )


def call_signature(fn: str, norm_type: float, max_norm: Optional[float], error_if_nonfinite: bool, stage: CallGroup) -> tuple:
    return (fn, norm_type, max_norm, bool(error_if_nonfinite), stage.pp_size, stage.size)
