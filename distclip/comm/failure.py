"""One rank's bad input reaches every rank within the call.

A rank that gets bad input (a NaN ``max_norm`` from its own schedule, a wrongly built
``pp_group``, a layout it cannot count, a grad its local math cannot measure) cannot compute a
partial norm. If it raised at once, the other ranks would wait in the all-reduce until the
process-group timeout (minutes; forever with NCCL and no watchdog). Instead it still takes part in
every collective of the call, with a flag set in the reduced vector; every rank then sees the flag
and raises: the failing rank its own exception, the others the same exception class with a message
naming the failing rank and its problem. No gradient is changed on any rank.

Every failure between a call's entry and its collective takes this one path: argument checks and
discovery, the local math and the packing of the vector all run under :func:`attempt`, and a rank
that failed at any of them sends ``packet.failed_vector`` (the others' length, the flag set,
built from nothing the rank holds), after issuing the ``Partial``-grad collectives its peers issue
(``audit``'s exchanges carry the error instead).

Only the error path gathers messages (one ``all_gather`` of fixed-size byte buffers, no pickling),
and only where reading the flag costs no host sync (see ``host_reads``); on accelerators the flag
poisons the norm on the device instead, and the failing rank raises its own exception.
"""

from __future__ import annotations

import builtins
from typing import Callable, Optional, TypeVar

import torch
import torch.distributed as dist

MESSAGE_BYTES = 1024
_T = TypeVar("_T")


class NotANumberError(TypeError, ValueError):
    """A string argument that is no number (``max_norm="abc"``, ``norm_type="fro"``): a
    ``ValueError``, as torch raises (``float(...)``), and a ``TypeError``, as distclip always has."""


class LayoutMismatchError(RuntimeError):
    """Ranks passed calls or layouts that cannot belong to one model (raised on every rank)."""


class RankInputError(RuntimeError):
    """Another rank failed before the norm could be computed (its exception was not a built-in)."""


def _encode(error: Optional[BaseException]) -> bytes:
    if error is None:
        return b""
    return f"{type(error).__name__}\0{error}".encode("utf-8", "replace")[: MESSAGE_BYTES - 1]


def gather(
    error: Optional[BaseException], device: torch.device, group: Optional[dist.ProcessGroup] = None
) -> list[Optional[tuple[str, str]]]:
    """Error path only, every rank of ``group`` together: each rank's (exception class name,
    message) or None, in group-rank order."""
    payload = _encode(error)
    mine = torch.zeros(MESSAGE_BYTES, dtype=torch.uint8)
    mine[0] = 1 if error is not None else 0
    if payload:
        mine[1 : 1 + len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    mine = mine.to(device)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, mine, group=group)
    out: list[Optional[tuple[str, str]]] = []
    for buf in everyone:
        raw = bytes(buf.cpu().tolist())
        if raw[0] == 0:
            out.append(None)
            continue
        name, _, message = raw[1:].rstrip(b"\0").decode("utf-8", "replace").partition("\0")
        out.append((name, message))
    return out


def _exception_class(name: str) -> type[Exception]:
    known = {"LayoutMismatchError": LayoutMismatchError, "NotANumberError": NotANumberError}
    cls = known.get(name, getattr(builtins, name, None))
    if isinstance(cls, type) and issubclass(cls, Exception) and cls.__init__ is not None:
        return cls
    return RankInputError


def raise_everywhere(error: Optional[BaseException], device: torch.device, group: Optional[dist.ProcessGroup] = None) -> None:
    """Called by every rank of ``group`` once the reduced flag says some rank failed: raise on
    every rank. Ranks are named by their global rank."""
    failures = gather(error, device, group)
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(len(failures)))
    raise_gathered(failures, error, ranks)


def error_summary(error: BaseException) -> tuple[str, str]:
    """What a failed rank shares of its error: (exception class name, message)."""
    return type(error).__name__, str(error)


def raise_gathered(failures: list[Optional[tuple[str, str]]], error: Optional[BaseException], ranks: list[int]) -> None:
    """Every rank, with every rank's (class name, message) or None in group-rank order: the failed
    rank raises its own exception, every other rank the same class naming the failed rank."""
    if error is not None:
        raise error
    bad = [(ranks[i], f) for i, f in enumerate(failures) if f is not None]
    rank, (name, message) = bad[0]
    others = f" (and {len(bad) - 1} more rank(s): {', '.join(str(r) for r, _ in bad[1:])})" if len(bad) > 1 else ""
    cls = _exception_class(name)
    text = (
        f"distclip: rank {rank} could not take part, so no rank computed a norm or changed a gradient{others}. "
        f"Rank {rank} raised {name}: {message}"
    )
    try:
        exc = cls(text)
    except Exception:  # an exception class whose constructor wants other arguments
        exc = RankInputError(text)
    raise exc


def attempt(fn: Callable[[], _T]) -> tuple[Optional[_T], Optional[Exception]]:
    """Run a local part of a function that communicates (validation, discovery, local math, packing).

    Without a process group an error is raised at once, as torch would. In a distributed job it is
    returned instead: the rank still joins every collective of the call with the failure flag set
    (``packet``), and :func:`settle` then raises on every rank together."""
    try:
        return fn(), None
    except Exception as error:
        if not (dist.is_available() and dist.is_initialized()):
            raise
        return None, error


def settle(any_failed: bool, error: Optional[BaseException], device: torch.device, group: Optional[dist.ProcessGroup]) -> None:
    """After the collective that carried the failure flags, on every rank of ``group`` together:
    raise everywhere if any rank failed (its own error on the failed rank)."""
    if any_failed:
        raise_everywhere(error, device, group)
    if error is not None:  # cannot happen: this rank's own flag was set
        raise error
