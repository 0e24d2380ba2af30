"""The global order of names that every rank's ``grad_norms`` vector is indexed by.

Agreed once per module by one object exchange (``comm.objects``) and cached (:class:`NameOrder`);
a later call checks locally that its names are unchanged and rides a "names changed" flag on its
one all-reduce, so that a change on any rank makes every rank re-agree in that same call.
:func:`stage_unique` is the one rule for names across pipeline stages (``audit`` and
``GradGuard`` use it too).
"""

from __future__ import annotations

import weakref
import zlib
from collections.abc import Callable, Iterable
from typing import ClassVar

import torch.distributed as dist
from torch import nn

from distclip.comm import objects
from distclip.comm.reduce import reduction_device
from distclip.layout.discovery import CallGroup

__all__ = ["TOTAL", "NameOrder", "stage_unique"]

# The key of the total in ``grad_norms``' dict, which no entry may take
TOTAL = "total"


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
    def context_of(stage: CallGroup) -> tuple:
        group = (stage.group or dist.group.WORLD) if stage.distributed else None
        return (id(group), stage.ranks, stage.size, stage.pp_ranks)

    @classmethod
    def cached(cls, module: nn.Module | None, stage: CallGroup) -> NameOrder | None:
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
    def agree(cls, local_sig: tuple, stage: CallGroup) -> NameOrder:
        """One object exchange over the call's group (``comm.objects``: no numpy): every rank's
        names, stage and tied groups."""
        names, tied = local_sig
        mine = (stage.index, sorted(stage.pp_ranks) if stage.pp_ranks is not None else None, list(names), list(tied))
        everyone: list = [mine]
        if stage.distributed:
            everyone = objects.all_gather_objects(mine, reduction_device(stage), stage.group, what="grad_norms")
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
