"""A rank's context in the job (``Ctx``: its rank, the world, its device, the implementation
under test) and how the ranks tell each other what happened (``Agreement``): every step's outcome
goes through the rendezvous store, never through the process group, which a failing layout may
leave stuck or out of step. (distclip's own object exchange over the process group is
``distclip.comm.objects``.)"""

from __future__ import annotations

import base64
import datetime
import pickle
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from distclip._torch import default_store


class RanksLost(RuntimeError):
    """Some rank did not report an outcome in time: it is stuck (or dead); the job cannot go on."""


class Agreement:
    """Every rank's outcome of a step, exchanged through the rendezvous store.

    The store, unlike the process group, works whatever state the collectives are in: a rank that
    raised before a collective and a rank stuck in it until the process group's timeout both end up
    here, and nobody issues a collective the others do not. Ranks call it in the same order, so a
    counter names each round.
    """

    def __init__(self, store: dist.Store, rank: int, world: int, wait_s: float) -> None:
        self.store = dist.PrefixStore("distclip-verify/", store)
        self.rank, self.world, self.wait_s, self.round = rank, world, wait_s, 0

    def __call__(self, value: object) -> list:
        self.round += 1
        keys = [f"{self.round}/{r}" for r in range(self.world)]
        self.store.set(keys[self.rank], base64.b64encode(pickle.dumps(value)).decode())
        try:
            self.store.wait(keys, datetime.timedelta(seconds=self.wait_s))
        except Exception as e:
            missing = [r for r, k in enumerate(keys) if not self.store.check([k])]
            raise RanksLost(f"rank(s) {missing} did not report within {self.wait_s:.0f} s (hung or died)") from e
        return [pickle.loads(base64.b64decode(self.store.get(k))) for k in keys]


@dataclass
class Ctx:
    rank: int
    world: int
    device: torch.device
    impl: str
    timeout_s: float = 60.0  # the process group's timeout (used when it is rebuilt)
    agree: Agreement | None = None  # made from the default group's store on first use
    base_store: Optional[dist.Store] = None
    epoch: int = 0

    def agreement(self) -> Agreement:
        if self.agree is None:
            self.base_store = default_store()
            self.agree = Agreement(self.base_store, self.rank, self.world, wait_s=2 * self.timeout_s + 30)
        return self.agree


def reset_process_group(ctx: Ctx) -> None:
    """A fresh default process group on a fresh store prefix: after a timed-out collective the old
    one is out of step (ranks disagree on which collective comes next)."""
    assert ctx.base_store is not None  # set by ctx.agreement(), which every check() calls first
    backend = dist.get_backend()
    dist.destroy_process_group()
    ctx.epoch += 1
    dist.init_process_group(
        backend, store=dist.PrefixStore(f"distclip-verify-epoch{ctx.epoch}/", ctx.base_store),
        rank=ctx.rank, world_size=ctx.world, timeout=datetime.timedelta(seconds=ctx.timeout_s),
    )
