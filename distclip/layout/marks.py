"""Marks: what ``mark_sharded`` / ``mark_replicated`` declared, kept in distclip's own table.

A mark says how a parameter's local gradient is laid out when the tensor cannot show it (a
Megatron-TP weight, MoE experts over an expert-parallel group, a weight tied across pipeline
stages). Where it is kept decides whether it survives what torch does to parameters, so:

- **By slot, never on the parameter.** A mark is kept by the module that holds the parameter
  (weakly: a freed model takes its marks with it) and the parameter's name in that module. It
  holds for whatever parameter object the slot holds at each call, so it survives every way torch
  replaces or swaps a parameter: ``fully_shard`` before or after the mark, ``_apply`` (``.to()``,
  ``.cpu()``, which swap DTensor parameters with ``torch.utils.swap_tensors``), ``to_empty``,
  ``load_state_dict(assign=True)``, swap-on-conversion loading. Nothing is stored on the
  parameter itself: no weakref (``swap_tensors`` refuses a tensor that has one), no attribute
  (``torch.save(model)`` and ``copy.deepcopy`` see none). A deepcopy or a reloaded model is a new
  model: it is unmarked.
- **A module mark** (``mark_sharded(module, group)``) covers every parameter under the module at
  each call; a parameter mark covers the slots that hold that parameter when it is marked (found
  with one pass over the live modules, kept as an index for the next marks).
- **A tensor held by no module** when it is marked (a bare tensor passed to ``get_total_norm``)
  keeps its mark on itself (a picklable record of ranks, no group object): there is no slot to
  follow.
- **Lost marks** are those whose slot no longer holds a parameter (FSDP1 without
  ``use_orig_params`` flattens the module's parameters into one FlatParameter): reported once, by a
  ``ValueError`` on every rank of the next call on the model that holds the marked module, never
  in a call on another model.
"""

from __future__ import annotations

import gc
import math
import operator
import sys
import weakref
from dataclasses import dataclass, field
from itertools import repeat
from typing import ClassVar, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from distclip._dtensor import DeviceMesh

GroupLike = Union["dist.ProcessGroup", "DeviceMesh"]

# the attribute of a tensor held by no module when it was marked (see the module docstring)
TENSOR_MARK_ATTR = "_distclip_annotation"
# ``sys.getrefcount`` of a loose tensor held only by ``Marks.loose``: the table and the call's argument
_HELD_HERE_ONLY = 2


@dataclass(frozen=True)
class GroupInfo:
    """A process group as a mark needs it: its member ranks (global), fixed when it is named.
    Ranks only, so a mark pickles and copies like any small record."""

    ranks: frozenset[int] = frozenset()

    @property
    def size(self) -> int:
        return len(self.ranks)


@dataclass(frozen=True)
class Annotation:
    """What ``mark_sharded`` / ``mark_replicated`` recorded for a parameter.

    ``sharded_over`` holds every group the tensor is split over (an expert split over an
    expert-parallel *and* a tensor-parallel group is in ``ep * tp`` pieces); marking with the same
    group twice changes nothing.
    """

    sharded_over: tuple[GroupInfo, ...] = ()
    replicated_over: Optional[GroupInfo] = None

    @property
    def pieces(self) -> int:
        return math.prod(g.size for g in self.sharded_over)

    def merged(self, other: Optional[Annotation]) -> Annotation:
        """This annotation with the groups of ``other`` added (the same group twice counts once)."""
        if other is None or other == self:
            return self
        sharded = self.sharded_over + tuple(g for g in other.sharded_over if g not in self.sharded_over)
        return Annotation(sharded, other.replicated_over if other.replicated_over is not None else self.replicated_over)


def as_process_group(group: object, what: str) -> dist.ProcessGroup:
    """Accept a ProcessGroup or a 1-D DeviceMesh; raise TypeError for anything else."""
    if dist.is_available():
        if isinstance(group, DeviceMesh):
            if group.ndim != 1:
                raise TypeError(f"{what} must be a ProcessGroup or a 1-D DeviceMesh, got a {group.ndim}-D DeviceMesh")
            return group.get_group()
        if isinstance(group, dist.ProcessGroup):
            return group
    raise TypeError(f"{what} must be a torch.distributed ProcessGroup or a 1-D DeviceMesh, got {type(group).__name__}")


def group_info(group: object, what: str) -> GroupInfo:
    return GroupInfo(frozenset(dist.get_process_group_ranks(as_process_group(group, what))))


@dataclass
class ModuleMarks:
    """The marks kept for one module: ``tree`` covers every parameter under it (a module mark),
    ``own`` the module's own parameters by name (parameter marks). ``tree_names``: the names under
    the module when it was marked, to notice a parameter FSDP1 flattened away."""

    tree: Optional[Annotation] = None
    tree_names: frozenset[str] = frozenset()
    own: dict[str, Annotation] = field(default_factory=dict)


class Marks:
    """Every mark of this process, by the module that holds its slot (weakly).

    ``version`` counts marks: a layout plan made before a mark is not trusted after it (the plan
    cannot tell which parameters a new mark reaches without walking the marked modules)."""

    version: ClassVar[int] = 0
    by_module: ClassVar[weakref.WeakKeyDictionary[nn.Module, ModuleMarks]] = weakref.WeakKeyDictionary()
    # Tensors held by no module when marked, by id. Held strongly (a weakref would make
    # ``swap_tensors`` refuse them) until ``prune`` sees that only this table holds them, or a call
    # finds them in a module slot, which then keeps the mark.
    loose: ClassVar[dict[int, torch.Tensor]] = {}

    @classmethod
    def prune(cls) -> None:
        """Let go of the loose tensors nothing but this table holds (the user dropped them)."""
        for key in list(cls.loose):
            if sys.getrefcount(cls.loose[key]) <= _HELD_HERE_ONLY:
                del cls.loose[key]

    @classmethod
    def of(cls, module: nn.Module) -> ModuleMarks:
        found = cls.by_module.get(module)
        if found is None:
            found = cls.by_module[module] = ModuleMarks()
        return found


class _Owners:
    """Which module slots hold a parameter: an index of every live module's parameters, built with
    one pass over the garbage collector's objects and kept (modules weakly, parameters by id, each
    hit checked against the slot) so that marking many parameters costs one pass, not one each."""

    index: ClassVar[dict[int, list[tuple[weakref.ref, str]]]] = {}
    parents: ClassVar[dict[int, tuple[weakref.ref, str]]] = {}  # id(module) -> (a module holding it, its name there)

    @classmethod
    def of(cls, tensor: torch.Tensor) -> list[tuple[nn.Module, str]]:
        found = cls._lookup(tensor)
        if not found:
            cls._rebuild()
            found = cls._lookup(tensor)
        return found

    @classmethod
    def _lookup(cls, tensor: torch.Tensor) -> list[tuple[nn.Module, str]]:
        out = []
        for ref, name in cls.index.get(id(tensor), ()):
            module = ref()
            if module is not None and module.__dict__.get("_parameters", {}).get(name) is tensor:
                out.append((module, name))
        return out

    @classmethod
    def _rebuild(cls) -> None:
        index: dict[int, list[tuple[weakref.ref, str]]] = {}
        parents: dict[int, tuple[weakref.ref, str]] = {}
        # ``type()``, not ``isinstance``: some module-level objects warn when their ``__class__`` is read
        for obj in gc.get_objects():
            if issubclass(type(obj), nn.Module):
                params = obj.__dict__.get("_parameters")
                ref = weakref.ref(obj)
                if params:
                    for name, p in params.items():
                        if p is not None:
                            index.setdefault(id(p), []).append((ref, name))
                for name, child in (obj.__dict__.get("_modules") or {}).items():
                    if child is not None:
                        parents.setdefault(id(child), (ref, name))
        cls.index, cls.parents = index, parents

    @classmethod
    def names(cls, tensors: list[torch.Tensor]) -> list[str]:
        """``name_of`` each tensor, or of the parameter whose grad it is, from the index as it stands."""
        names = [cls.name_of(t, rebuild=False) for t in tensors]
        if not all(names):
            by_grad = cls.grads()
            names = [name or (cls.name_of(by_grad[id(t)], rebuild=False) if id(t) in by_grad else "")
                     for name, t in zip(names, tensors)]
        return names

    @classmethod
    def grads(cls) -> dict[int, torch.Tensor]:
        """id(grad) -> parameter, for the parameters of the live modules (the index as it stands)."""
        out: dict[int, torch.Tensor] = {}
        for slots in cls.index.values():
            for ref, name in slots:
                module = ref()
                p = module.__dict__.get("_parameters", {}).get(name) if module is not None else None
                if p is not None and p.grad is not None:
                    out[id(p.grad)] = p
        return out

    @classmethod
    def name_of(cls, tensor: torch.Tensor, rebuild: bool = True) -> str:
        """``tensor``'s name under the topmost module that holds it ("" if no module holds it)."""
        owners = cls.of(tensor) if rebuild else cls._lookup(tensor)
        if not owners:
            return ""
        module, name = owners[0]
        parts = [name]
        for _ in range(64):  # a cycle of modules would be a bug elsewhere: stop, the name stays rank-agreed
            up = cls.parents.get(id(module))
            parent = up[0]() if up is not None else None
            if up is None or parent is None or parent.__dict__.get("_modules", {}).get(up[1]) is not module:
                break
            parts.append(up[1])
            module = parent
        return unwrapped(".".join(reversed(parts)))


def names_of(params: list[torch.Tensor], module: Optional[nn.Module]) -> list[str]:
    """A name for each tensor that every rank gives the same tensor: its name in ``module``, or
    without a module its name under the topmost module holding it, or, for a grad given without
    its parameter (torch's two-step API), its parameter's name; "" where nothing names it."""
    if module is not None:
        found: dict[int, str] = {}
        for name, p in module.named_parameters(remove_duplicate=False):
            found.setdefault(id(p), unwrapped(name))
        return [found.get(id(p), "") for p in params]
    names = _Owners.names(params)
    if not all(names):  # the index may predate these modules: look once more, with a fresh one
        _Owners._rebuild()
        names = _Owners.names(params)
    return names


def annotate(target: object, fn: str, group: object, sharded: bool) -> None:
    """``mark_sharded`` (``sharded``) / ``mark_replicated``: validate, then record by slot."""
    if not isinstance(target, (torch.Tensor, nn.Module)):
        raise TypeError(f"distclip.{fn}: expected a torch.Tensor parameter or an nn.Module, got {type(target).__name__}")
    pg = as_process_group(group, f"distclip.{fn}: group")
    if dist.get_rank(pg) < 0:
        raise ValueError(f"distclip.{fn}: this rank ({dist.get_rank()}) is not a member of the given group")
    info = GroupInfo(frozenset(dist.get_process_group_ranks(pg)))
    mark = Annotation((info,), None) if sharded else Annotation((), info)
    if isinstance(target, nn.Module):
        marks = Marks.of(target)
        marks.tree = mark if marks.tree is None else marks.tree.merged(mark)
        marks.tree_names = marks.tree_names | frozenset(unwrapped(name) for name, _ in target.named_parameters())
        Marks.version += 1
        return
    owners = _Owners.of(target)
    if not owners:  # no slot to follow: the mark stays on the tensor
        current: Optional[Annotation] = target.__dict__.get(TENSOR_MARK_ATTR)
        new = mark if current is None else current.merged(mark)
        if new != current:
            setattr(target, TENSOR_MARK_ATTR, new)
            Marks.loose[id(target)] = target
            Marks.version += 1
        return
    for module, name in owners:
        own = Marks.of(module).own
        old = own.get(name)
        own[name] = mark if old is None else old.merged(mark)
    Marks.version += 1


def unwrapped(name: str) -> str:
    """A parameter name without the prefixes wrappers insert between modules (FSDP1, activation
    checkpointing, ``torch.compile``), so a module mark matches its parameters after wrapping."""
    if "_" in name:
        for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod."):
            name = name.replace(wrapper, "")
    return name


def marked_parameters() -> list[torch.Tensor]:
    """Every live parameter a slot mark covers now (``get_total_norm`` refuses their grads given
    alone: only the parameter's slot knows how they are split)."""
    Marks.prune()
    out: dict[int, torch.Tensor] = dict(Marks.loose)
    for module, marks in list(Marks.by_module.items()):
        if marks.tree is not None:
            out.update((id(p), p) for p in module.parameters())
        params = module.__dict__.get("_parameters", {})
        for name in marks.own:
            p = params.get(name)
            if p is not None:
                out[id(p)] = p
    return list(out.values())


def table(params: list[torch.Tensor], module: Optional[nn.Module]) -> dict[int, Annotation]:
    """The marks of ``params`` for one call, by ``id`` (valid while the call holds them): slot
    marks of every marked module, merged with marks kept on the tensors themselves.

    Raises ``ValueError`` for marks lost since the last call on ``module`` (a marked slot that
    FSDP1 flattened away), once; only where the marked module lies inside ``module``."""
    out: dict[int, Annotation] = {}
    if Marks.by_module:
        lost: list[str] = []
        for marked, marks in list(Marks.by_module.items()):
            if marks.tree is not None:
                present = set()
                for name, p in marked.named_parameters():
                    present.add(unwrapped(name))
                    out[id(p)] = marks.tree.merged(out.get(id(p)))
                missing = marks.tree_names - present
                if missing and module is not None and _inside(marked, module):
                    lost.extend(
                        f"parameter {name!r} of a marked {type(marked).__name__} is no longer a parameter (flattened by "
                        "FSDP1 without use_orig_params?)" for name in sorted(missing))
                    marks.tree_names = marks.tree_names - missing
            if marks.own:
                slots = marked.__dict__.get("_parameters", {})
                for name, annotation in list(marks.own.items()):
                    p = slots.get(name)
                    if p is not None:
                        out[id(p)] = annotation.merged(out.get(id(p)))
                    elif module is not None and _inside(marked, module):
                        lost.append(f"the marked parameter {name!r} of a {type(marked).__name__} is no longer a parameter "
                                    "(flattened by FSDP1 without use_orig_params?)")
                        del marks.own[name]
        if lost:
            raise ValueError(
                "distclip: marks were lost: " + "; ".join(lost[:5]) + (" ..." if len(lost) > 5 else "")
                + ". FSDP1 without use_orig_params=True replaces a module's parameters by one FlatParameter, whose "
                "segments no mark can follow: wrap with use_orig_params=True, or mark the FlatParameter after wrapping "
                "with only the sharding FSDP1 does not do (e.g. the tensor-parallel group)")
    on_tensors = list(map(dict.get, map(_dict_of, params), repeat(TENSOR_MARK_ATTR)))  # C-level: no Python per tensor
    if any(on_tensors):
        slots = _slots_in(module) if module is not None else {}
        for tensor, own in zip(params, on_tensors):
            if own is None:
                continue
            out[id(tensor)] = own.merged(out.get(id(tensor)))
            found = slots.get(id(tensor))
            if found:  # now in a module: the slot keeps the mark from here on, the tensor nothing
                for holder, name in found:
                    marks = Marks.of(holder)
                    marks.own[name] = own.merged(marks.own.get(name))
                del tensor.__dict__[TENSOR_MARK_ATTR]
                Marks.loose.pop(id(tensor), None)
    return out


def _slots_in(module: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """Every parameter slot under ``module``: id(parameter) -> [(holding module, name)]."""
    out: dict[int, list[tuple[nn.Module, str]]] = {}
    for m in module.modules():
        for name, p in m.__dict__.get("_parameters", {}).items():
            if p is not None:
                out.setdefault(id(p), []).append((m, name))
    return out


_dict_of = operator.attrgetter("__dict__")


def _inside(marked: nn.Module, module: nn.Module) -> bool:
    return marked is module or any(m is marked for m in module.modules())


def mark_sharded(param: Union[torch.Tensor, nn.Module], group: GroupLike) -> Union[torch.Tensor, nn.Module]:
    """Declare that ``param``'s local gradient is one disjoint piece of a tensor split over ``group``.

    Use it for Megatron-style tensor-parallel weights, MoE experts spread over an expert-parallel
    group (a rank may hold any number of experts, including none), or ZeRO-style flat partitions.
    Copies of the same piece on other ranks of the pipeline stage (data-parallel replicas) are
    counted once. Marks compose: a tensor marked over an expert-parallel group and a
    tensor-parallel group is in ``ep * tp`` pieces; the same group twice counts once. On a DTensor
    parameter the mark adds to what its placements show.

    The mark is kept by the module slot that holds the parameter (given a module: every parameter
    under it), never on the parameter object: it holds for whatever parameter the slot holds at
    each call, so it survives ``fully_shard`` (before or after the mark), ``.to()``, ``to_empty``,
    ``load_state_dict(assign=True)`` and re-wrapping, and leaves ``torch.save``, ``copy.deepcopy``
    and ``torch.utils.swap_tensors`` as they are. A deepcopy or a reloaded model is unmarked.

    Args:
        param (Tensor or nn.Module): a parameter (plain tensor or DTensor), or a module whose
            parameters are all marked.
        group (ProcessGroup or DeviceMesh): the ranks that together hold the whole tensor; this
            rank must be a member.

    Returns:
        ``param``, unchanged (the mark is distclip's).
    """
    annotate(param, "mark_sharded", group, sharded=True)
    return param


def mark_replicated(param: Union[torch.Tensor, nn.Module], group: GroupLike) -> Union[torch.Tensor, nn.Module]:
    """Declare that ``param``'s gradient is identical on every rank of ``group``; count it once.

    Use it for a weight tied across pipeline stages (an input embedding on the first stage and
    the output head on the last): ``group`` holds the ranks with the copies, e.g. Megatron's
    embedding group. Within a stage, plain tensors are already counted once. Works on DTensor
    parameters too and on modules (every parameter under it), kept by slot as
    :func:`mark_sharded`'s marks.

    Args:
        param (Tensor or nn.Module): a parameter (plain tensor or DTensor), or a module.
        group (ProcessGroup or DeviceMesh): ranks holding identical copies; this rank must be a member.

    Returns:
        ``param``, unchanged (the mark is distclip's).
    """
    annotate(param, "mark_replicated", group, sharded=False)
    return param
