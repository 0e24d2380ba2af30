"""The records of a benchmark workload: what a builder is given (:class:`Build`) and what it
returns (:class:`Workload`). Their own module, so that the methods (which take a workload) and the
registry (which names each layout's minimal method) import it and not each other."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn


def local(t: torch.Tensor) -> torch.Tensor:
    """The local tensor of a DTensor, else the tensor."""
    from torch.distributed.tensor import DTensor

    return t._local_tensor if isinstance(t, DTensor) else t


@dataclass
class Workload:
    layout: str  # a key of LAYOUTS
    size: str  # "small" | "large"
    n_params: int  # parameter tensors of the (unsharded) model
    params: list[torch.Tensor]  # what is passed as `parameters` (FSDP1: the flat parameters)
    module: Optional[nn.Module] = None  # FSDP1 root: distclip and FSDP1's own method get it
    weights: list[float] = field(default_factory=list)  # per param: 1/(ranks holding each element)
    mesh_desc: str = ""
    minimal: Optional[Callable[[Workload, float], torch.Tensor]] = None  # set from the registry
    info: dict = field(default_factory=dict)  # layout facts the minimal method needs (e.g. tp)

    @property
    def target(self) -> object:
        """What distclip is given: the FSDP1 module, else the parameters."""
        return self.module if self.module is not None else self.params

    @property
    def local_grads(self) -> list[torch.Tensor]:
        return [local(p.grad) for p in self.params if p.grad is not None]

    @property
    def local_bytes(self) -> int:
        return sum(g.numel() * g.element_size() for g in self.local_grads)

    @property
    def is_dtensor(self) -> bool:
        return any(hasattr(p.grad, "device_mesh") for p in self.params if p.grad is not None)


@dataclass
class Build:
    """What a builder gets: the model's shapes (``blocks``) and where and how to make it."""

    layout: str
    size: str
    n: int  # requested parameter count (small sizes)
    blocks: list[list[tuple[int, ...]]]
    device: torch.device
    fsdp2_grads: str = "backward"

    @property
    def world(self) -> int:
        return dist.get_world_size()

    @property
    def rank(self) -> int:
        return dist.get_rank()

    @property
    def n_params(self) -> int:
        return sum(len(b) for b in self.blocks)

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return [s for b in self.blocks for s in b]

    def gen(self, seed: int = 1234, per_rank: bool = True) -> torch.Generator:
        return torch.Generator(self.device).manual_seed(seed + (self.rank if per_rank else 0))

    def workload(
        self,
        params: list[torch.Tensor],
        weights: list[float],
        desc: str,
        *,
        module: Optional[nn.Module] = None,
        info: Optional[dict] = None,
        n_params: Optional[int] = None,
    ) -> Workload:
        n = self.n_params if n_params is None else n_params
        return Workload(self.layout, self.size, n, params, module, weights, desc, info=info or {})
