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

import torch.distributed as dist

from distclip.layout import Stage


class LayoutMismatchError(RuntimeError):
    """Ranks passed calls or layouts that cannot belong to one model (raised on every rank)."""


@dataclass(frozen=True)
class Signature:
    call: tuple  # must be equal on every rank of the world
    kinds: frozenset  # must be equal on every rank of one stage
    stage: Stage


def crc_halves(value: object) -> tuple[int, int]:
    """Two 16-bit halves of the crc32 of ``repr(value)``: deterministic across processes, unlike
    ``hash()`` (``packet`` encodes them on the reduced vector)."""
    h = zlib.crc32(repr(value).encode())
    return h >> 16, h & 0xFFFF


def raise_mismatch(sig: Signature) -> None:
    """Error path, taken by every rank together: gather the details and raise."""
    raise LayoutMismatchError(_describe(sig))


def _describe(sig: Signature) -> str:
    """Error path only, on every rank together: gather every rank's signature, name the odd ones.

    "Most ranks" is said only of a true majority; when no value is shared by more than half of the
    ranks, every rank's value is listed."""
    gathered: list = [None] * sig.stage.group_size
    dist.all_gather_object(gathered, (sig.call, sorted(map(repr, sig.kinds)), sig.stage.index), group=sig.stage.group)
    # by global rank (the group's ranks in group-rank order)
    everyone = dict(zip(sig.stage.global_ranks(), gathered))
    lines = []
    calls = Counter(call for call, _, _ in everyone.values())
    usual_call, count = calls.most_common(1)[0]
    if len(calls) > 1:
        if 2 * count > len(everyone):
            for rank, (call, _, _) in everyone.items():
                if call != usual_call:
                    lines.append(f"rank {rank} called {_call_str(call)}, most ranks {_call_str(usual_call)}")
        else:
            lines.append("no call is shared by most ranks: " + "; ".join(
                f"rank {rank} called {_call_str(call)}" for rank, (call, _, _) in everyone.items()))
    for stage in sorted({s for _, _, s in everyone.values()}):
        members = [(rank, kinds) for rank, (_, kinds, s) in everyone.items() if s == stage]
        layouts = Counter(tuple(k) for _, k in members)
        usual_kinds, count = layouts.most_common(1)[0]
        if len(layouts) == 1:
            continue
        majority = 2 * count > len(members)
        census_differs = False
        for rank, kinds in members:
            if tuple(kinds) != usual_kinds or not majority:
                extra, missing = sorted(set(kinds) - set(usual_kinds)), sorted(set(usual_kinds) - set(kinds))
                census_differs = census_differs or any("parameters held" in k for k in extra + missing)
                if majority:
                    lines.append(
                        f"rank {rank} (pipeline stage {stage}) holds a different layout than most ranks of its "
                        f"stage: extra {extra or 'none'}, missing {missing or 'none'}"
                    )
                else:
                    lines.append(f"rank {rank} (pipeline stage {stage}) holds {kinds}")
        if not majority:
            lines.insert(len(lines) - len(members), f"no layout is shared by most ranks of pipeline stage {stage}:")
        empty = [rank for rank, kinds in members if len(kinds) == 1 and "parameters held" in kinds[0] and kinds[0].endswith(", 0, 0)")]
        if empty and len(empty) < len(members):
            lines.append(
                f"rank(s) {empty} passed no parameters: if they hold no part of this model, call distclip only on the "
                "ranks that hold it, passing those ranks as group= (a ProcessGroup or 1-D DeviceMesh)"
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


def _call_str(call: tuple) -> str:
    fn, norm_type, max_norm, error_if_nonfinite, pp_size, stage_size = call
    extra = "" if max_norm is None else f", max_norm={max_norm}"
    return (
        f"{fn}(norm_type={norm_type}{extra}, error_if_nonfinite={error_if_nonfinite}) with {pp_size} "
        f"pipeline stage(s) of {stage_size} ranks"
    )


def call_signature(fn: str, norm_type: float, max_norm: Optional[float], error_if_nonfinite: bool, stage: Stage) -> tuple:
    return (fn, norm_type, max_norm, bool(error_if_nonfinite), stage.pp_size, stage.size)
