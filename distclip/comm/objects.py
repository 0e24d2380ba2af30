"""Python objects between ranks without numpy, and collectives that say why they hung.

torch's object collectives (``all_gather_object`` and friends) turn tensors back into bytes with
``Tensor.numpy()``, so they raise ``RuntimeError: Numpy is not available`` where numpy is not
installed, and distclip declares only torch. The paths that need objects (the name order of
``grad_norms``, ``audit``'s records, a mismatch's details, the names of non-finite grads,
``distclip.verify``'s reference) use :func:`all_gather_objects` instead: each rank pickles its
object into a ``uint8`` tensor, the byte counts are gathered first, then every buffer padded to
the longest. Bytes come back through a ``bytearray`` that a tensor views (``torch.frombuffer``),
which needs no numpy either.

:func:`every_rank_must_call` turns the backend's bare timeout (a call made on one rank only waits
in its first collective until the process group's timeout) into a text that says what to do.
"""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import Iterator
from typing import Any, Optional

import torch
import torch.distributed as dist

__all__ = ["all_gather_bytes", "all_gather_objects", "every_rank_must_call", "tensor_bytes"]

# what gloo, NCCL and the TCP store say when a peer never joined the collective (or left it)
_STALLED = ("timed out", "timeout", "time out", "connection closed", "connection reset", "broken pipe")


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw bytes of a tensor's elements (copied to the host, contiguous), without numpy."""
    data = t.detach().reshape(-1).contiguous().cpu().view(torch.uint8)
    if data.numel() == 0:
        return b""
    out = bytearray(data.numel())
    torch.frombuffer(out, dtype=torch.uint8).copy_(data)
    return bytes(out)


def all_gather_bytes(
    payload: bytes, device: torch.device, group: Optional[dist.ProcessGroup] = None, what: str = "a distclip call"
) -> list[bytes]:
    """Every rank of ``group`` together: every rank's ``payload``, in group-rank order.

    Two ``all_gather`` collectives on ``device`` (the byte counts, then the buffers padded to the
    longest) and one copy to the host. ``what`` names the caller in a timeout's hint."""
    world = dist.get_world_size(group)
    with every_rank_must_call(what, world):
        size = torch.tensor([len(payload)], dtype=torch.int64, device=device)
        sizes = [torch.empty_like(size) for _ in range(world)]
        dist.all_gather(sizes, size, group=group)
        lengths = [int(n) for n in torch.cat(sizes).tolist()]
        longest = max(max(lengths), 1)
        mine = torch.zeros(longest, dtype=torch.uint8)
        if payload:
            mine[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        mine = mine.to(device)
        everyone = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(everyone, mine, group=group)
    raw = tensor_bytes(torch.stack(everyone))
    return [raw[r * longest : r * longest + n] for r, n in enumerate(lengths)]


def all_gather_objects(
    obj: Any, device: torch.device, group: Optional[dist.ProcessGroup] = None, what: str = "a distclip call"
) -> list[Any]:
    """Every rank of ``group`` together: every rank's picklable ``obj``, in group-rank order
    (``all_gather_object`` without numpy; see :func:`all_gather_bytes`)."""
    payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return [pickle.loads(b) for b in all_gather_bytes(payload, device, group, what)]


@contextlib.contextmanager
def every_rank_must_call(what: str, group_size: int) -> Iterator[None]:
    """Around a collective: a backend error that says the peers never came (a timeout, a closed
    connection) is raised again, same class where it allows, with the likely cause and what to do
    (the original stays chained as ``__cause__``)."""
    try:
        yield
    except RuntimeError as e:
        if not any(s in str(e).lower() for s in _STALLED) or "every rank of the group must call" in str(e):
            raise
        text = (
            f"distclip: {what} waited for the other ranks of its group ({group_size} ranks) until the backend gave up: "
            "every rank of the group must call the same distclip function in the same step (a call made on "
            "one rank only, e.g. under `if rank == 0:`, or skipped by a rank that returned early, waits here); "
            "for a model held by only some ranks, pass exactly those ranks as group=. "
            f"The backend said: {' '.join(str(e).split())[:400]}"
        )
        try:
            hinted = type(e)(text)
        except Exception:  # an error class whose constructor wants other arguments
            hinted = RuntimeError(text)
        raise hinted from e
