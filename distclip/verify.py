"""The main job: prove distclip against a single-process float64 reference in real layouts.

    torchrun --standalone --nproc_per_node=4 -m distclip.verify
    python -m distclip.verify            # no torchrun: starts 4 local ranks itself (--nproc N)
    python -m distclip.verify --list     # the layouts

Builds a small real model in every layout the world size allows, runs a real forward/backward,
clips with distclip, and compares the returned norm and the clipped gradients (gathered to full
tensors) with a float64 reference computed on one process over the full gradients. Prints one
table and a one-line summary; exits non-zero on any failure. CPU/gloo by default, GPU/NCCL when
launched on GPUs. ``--impl torch`` runs the same checks against ``torch.nn.utils.clip_grad_norm_``
to show where today's tool is wrong.

Every layout's outcome is agreed by all ranks through the rendezvous store (not through the process
group, which a failing layout may leave stuck or out of step) before the next layout starts. The
process group has a short timeout (``--timeout``, 60 s): a layout where some ranks wait in a
collective that others never enter (torch's own function raising on some ranks only) is reported
as ``FAIL (hang/timeout)``, the process group is rebuilt and the job goes on; it always ends with
the table, a summary line and a non-zero exit code on any failure.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import logging
import math
import os
import pickle
import re
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional, TypeVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import distclip
from distclip import _fsdp1
from distclip.layout import DeviceMesh, GroupLike, ParamsLike

_T = TypeVar("_T")

NORM_TYPES = (1.0, 2.0, 3.0, math.inf, 0.5, 0.0, -math.inf, -2.0)  # every grad is non-zero, so p <= 0 means something
VOCAB, DIM, HIDDEN, OUT = 16, 8, 24, 2  # OUT=2 rows: at 4 ranks, some FSDP shards are empty
BATCH, SEQ = 4, 8  # SEQ divisible by 4: sequence parallelism shards it evenly


class Block(nn.Module):
    """embedding -> MLP residual -> LayerNorm -> head; small, with every common parameter kind."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.fc1 = nn.Linear(DIM, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, DIM)
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, OUT)

    def trunk(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        return x + self.fc2(F.gelu(self.fc1(x)))

    def top(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.top(self.trunk(tokens))


def loss_of(out: torch.Tensor) -> torch.Tensor:
    return out.float().pow(2).mean() * 100.0  # x100: norms well above 1, so clipping happens


def batch(device: torch.device, seed: int = 1234) -> torch.Tensor:
    """Random tokens in which every vocabulary row occurs: no embedding row gets an exact-zero
    gradient, so the p <= 0 references (min |g|, count of non-zeros, negative p) are not trivial."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (BATCH * SEQ,), generator=g)
    tokens[torch.randperm(BATCH * SEQ, generator=g)[:VOCAB]] = torch.arange(VOCAB)
    return tokens.view(BATCH, SEQ).to(device)


def new_model(device: torch.device) -> Block:
    torch.manual_seed(0)
    return Block().to(device)


def clean_name(name: str) -> str:
    for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "module."):
        name = name.replace(wrapper, "")
    return name


@dataclass
class Built:
    """A layout after forward/backward: what to clip and how to see its full gradients."""

    parameters: ParamsLike  # passed to clip_grad_norm_ (module or list)
    local_full: Callable[[], dict[str, torch.Tensor]]  # collective within the stage; this stage's full grads
    local_grads: Callable[[], list[torch.Tensor]]  # this rank's local grad tensors (to save/restore)
    pp_group: Optional[GroupLike] = None
    reference_grads: dict[str, torch.Tensor] = field(default_factory=dict)  # single-process model
    # Several models in one world: ``group`` (passed to clip_grad_norm_) holds the ranks of this
    # rank's model, whose local_full/reference_grads names start with ``model``; its reference norm
    # is over those names only, and its result must be identical across ``group`` only.
    group: Optional[GroupLike] = None
    model: str = ""


@dataclass(frozen=True)
class Scenario:
    name: str
    build: Callable[[Ctx], Built]
    allowed: Callable[[int], bool]


def _grad(p: torch.Tensor) -> torch.Tensor:
    assert p.grad is not None  # every parameter of these reference models gets a grad
    return p.grad


def single_process_grads(device: torch.device, tied: bool = False) -> dict[str, torch.Tensor]:
    model = new_model(device)
    if tied:
        model.head = nn.Linear(DIM, VOCAB, bias=False).to(device)
        model.head.weight = model.embed.weight
    loss_of(model(batch(device))).backward()
    return {n: _grad(p).detach().double().cpu() for n, p in model.named_parameters()}


def plain_full(module: nn.Module, prefix: str = "") -> Callable[[], dict[str, torch.Tensor]]:
    def full() -> dict[str, torch.Tensor]:
        out = {}
        for name, p in module.named_parameters():
            if p.grad is None:
                continue
            g = p.grad.full_tensor() if isinstance(p.grad, distclip.layout.DTensor) else p.grad
            out[prefix + clean_name(name)] = g.detach()
        return out

    return full


def local_grad_tensors(module: nn.Module) -> Callable[[], list[torch.Tensor]]:
    def grads() -> list[torch.Tensor]:
        out = []
        for p in module.parameters():
            if p.grad is not None:
                out.append(p.grad.to_local() if isinstance(p.grad, distclip.layout.DTensor) else p.grad)
        return out

    return grads


def mesh(ctx: Ctx, shape: tuple[int, ...], names: tuple[str, ...]):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(ctx.device.type, shape, mesh_dim_names=names)


# ----------------------------------------------------------------------------- layouts


def build_ddp(ctx: Ctx) -> Built:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = new_model(ctx.device)
    ddp = DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    loss_of(ddp(batch(ctx.device))).backward()
    return Built(ddp, plain_full(ddp), local_grad_tensors(ddp))


def build_fsdp1(strategy: str, use_orig_params: bool) -> Callable[[Ctx], Built]:
    def build(ctx: Ctx) -> Built:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import ShardingStrategy
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        kwargs: dict = {}
        if strategy == "HYBRID_SHARD":
            kwargs["device_mesh"] = mesh(ctx, (ctx.world // 2, 2), ("replicate", "shard"))
        model = FSDP(
            new_model(ctx.device),
            sharding_strategy=getattr(ShardingStrategy, strategy),
            use_orig_params=use_orig_params,
            auto_wrap_policy=ModuleWrapPolicy({nn.Linear}),
            device_id=ctx.device,
            **kwargs,
        )
        loss_of(model(batch(ctx.device))).backward()

        def full() -> dict[str, torch.Tensor]:
            if not use_orig_params:
                return {clean_name(n): g for n, g in _fsdp1.full_flat_grads(model).items()}
            with FSDP.summon_full_params(model, with_grads=True):
                return {clean_name(n): p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}

        return Built(model, full, local_grad_tensors(model))

    return build


def build_fsdp2(ctx: Ctx, hsdp: bool = False) -> Built:
    from torch.distributed.fsdp import fully_shard

    dp_mesh = mesh(ctx, (2, ctx.world // 2), ("replicate", "shard")) if hsdp else mesh(ctx, (ctx.world,), ("dp",))
    model = new_model(ctx.device)
    for sub in (model.fc1, model.fc2, model.head):
        fully_shard(sub, mesh=dp_mesh)
    fully_shard(model, mesh=dp_mesh)
    loss_of(model(batch(ctx.device))).backward()
    return Built(model, plain_full(model), local_grad_tensors(model))


def build_tp(ctx: Ctx) -> Built:
    """Tensor parallel MLP; embedding, norm and head stay plain replicated tensors (a DTensor +
    plain mix, which torch's own function rejects)."""
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    tp_mesh = mesh(ctx, (ctx.world,), ("tp",))
    model = new_model(ctx.device)
    parallelize_module(model, tp_mesh, {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()})
    loss_of(model(batch(ctx.device))).backward()
    return Built(model, plain_full(model), local_grad_tensors(model))


def build_2d(ctx: Ctx) -> Built:
    """TP inside FSDP2 on a (dp, tp) mesh; embedding, norm and head live on the dp-only mesh
    (torch's own function raises on this mix, pytorch #180346)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    tp = 2 if ctx.world % 2 == 0 else 1
    mesh_2d = mesh(ctx, (ctx.world // tp, tp), ("dp", "tp"))
    model = new_model(ctx.device)
    parallelize_module(model, mesh_2d["tp"], {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()})
    for sub in (model.fc1, model.fc2):
        fully_shard(sub, mesh=mesh_2d["dp"])
    fully_shard(model, mesh=mesh_2d["dp"])
    loss_of(model(batch(ctx.device))).backward()
    return Built(model, plain_full(model), local_grad_tensors(model))


def build_fsdp1_tp(ctx: Ctx) -> Built:
    """The 2-D recipe with FSDP1: TP on mesh["tp"], then FSDP1 (FULL_SHARD, use_orig_params=False)
    on mesh["dp"], one unit per Linear. FSDP1 flattens the TP pieces (plain tensors): fc1's flat
    parameter holds 2 TP pieces of everything, fc2's a Shard(1) weight beside a Replicate bias (two
    weights in one flat shard), the root's embedding and norm none, the head's none."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    mesh_2d = mesh(ctx, (ctx.world // 2, 2), ("dp", "tp"))
    model = new_model(ctx.device)
    parallelize_module(model, mesh_2d["tp"], {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()})
    fsdp = FSDP(model, device_mesh=mesh_2d["dp"], use_orig_params=False, auto_wrap_policy=ModuleWrapPolicy({nn.Linear}),
                device_id=ctx.device)
    loss_of(fsdp(batch(ctx.device))).backward()

    def full() -> dict[str, torch.Tensor]:  # flat shards gathered over dp, TP pieces over tp
        return {clean_name(n): g for n, g in _fsdp1.full_flat_grads(fsdp).items()}

    return Built(fsdp, full, local_grad_tensors(fsdp))


def _pipeline_groups(ctx: Ctx) -> tuple[int, int, dist.ProcessGroup, DeviceMesh]:
    """pp=2: ranks [0, W/2) hold stage 0, [W/2, W) stage 1; rank r pairs with r +- W/2."""
    pp_mesh = mesh(ctx, (2, ctx.world // 2), ("pp", "dp"))
    stage = pp_mesh.get_local_rank("pp")
    peer = ctx.rank + ctx.world // 2 if stage == 0 else ctx.rank - ctx.world // 2
    return stage, peer, pp_mesh["pp"].get_group(), pp_mesh


def _run_pipeline(stage: int, peer: int, stage0: Callable, stage1: Callable, device: torch.device) -> None:
    """Two-stage pipeline step with real activations crossing ranks (send/recv)."""
    if stage == 0:
        act = stage0(batch(device))
        dist.send(act.detach().contiguous(), peer)
        grad = torch.empty_like(act)
        dist.recv(grad, peer)
        act.backward(grad)
    else:
        act = torch.empty(BATCH, SEQ, DIM, device=device)
        dist.recv(act, peer)
        act.requires_grad_(True)
        loss_of(stage1(act)).backward()
        assert act.grad is not None  # set by the backward just above
        dist.send(act.grad.contiguous(), peer)


def build_pp_fsdp(ctx: Ctx) -> Built:
    """Two pipeline stages, each FSDP2-sharded over its own dp mesh."""
    from torch.distributed.fsdp import fully_shard

    stage, peer, _, pp_mesh = _pipeline_groups(ctx)
    full_model = new_model(ctx.device)
    keep = ("embed", "fc1", "fc2") if stage == 0 else ("norm", "head")
    part = nn.ModuleDict({k: getattr(full_model, k) for k in keep})
    for k in keep:
        fully_shard(part[k], mesh=pp_mesh["dp"])

    def stage0(tokens):
        x = part["embed"](tokens)
        return x + part["fc2"](F.gelu(part["fc1"](x)))

    _run_pipeline(stage, peer, stage0, lambda x: part["head"](part["norm"](x)), ctx.device)
    # pp_group as a 1-D DeviceMesh here (the tied layout passes a ProcessGroup)
    return Built(list(part.parameters()), plain_full(part), local_grad_tensors(part), pp_group=pp_mesh["pp"])


def build_tied_pp(ctx: Ctx, fsdp: bool = False) -> Built:
    """Embedding on stage 0 tied to the output head on stage 1 (a copy per stage whose grads are
    summed across the embedding group, Megatron-style); counted once via mark_replicated. With
    ``fsdp`` each stage is FSDP2-sharded over its dp mesh, so the tied copies are DTensors (marked
    after wrapping)."""
    stage, peer, pp_group, pp_mesh = _pipeline_groups(ctx)
    full_model = new_model(ctx.device)
    head = nn.Linear(DIM, VOCAB, bias=False).to(ctx.device)
    head.weight = nn.Parameter(full_model.embed.weight.detach().clone())
    keep = ("embed", "fc1", "fc2") if stage == 0 else ("norm",)
    part = nn.ModuleDict({k: getattr(full_model, k) for k in keep})
    if stage == 1:
        part["head"] = head
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for k in list(part):
            fully_shard(part[k], mesh=pp_mesh["dp"])
    tied = part["embed"].weight if stage == 0 else part["head"].weight
    assert isinstance(tied, torch.Tensor)  # an nn.Parameter

    def stage0(tokens):
        x = part["embed"](tokens)
        return x + part["fc2"](F.gelu(part["fc1"](x)))

    _run_pipeline(stage, peer, stage0, lambda x: part["head"](part["norm"](x)), ctx.device)
    embedding_groups = [dist.new_group([r, r + ctx.world // 2]) for r in range(ctx.world // 2)]
    emb_group = embedding_groups[ctx.rank % (ctx.world // 2)]
    # Both copies now hold the tied weight's grad (under FSDP2: the same shard on both stages,
    # whose ranks pair up by dp coordinate).
    grad = _grad(tied)
    dist.all_reduce(grad.to_local() if isinstance(grad, distclip.layout.DTensor) else grad, group=emb_group)
    distclip.mark_replicated(tied, emb_group)

    def full() -> dict[str, torch.Tensor]:
        out = plain_full(part)()
        if "head.weight" in out:
            out["embed.weight"] = out.pop("head.weight")
        return out

    # the stage module itself (not its parameter list), so per-name tools see its names
    return Built(part, full, local_grad_tensors(part), pp_group=pp_group,
                 reference_grads=single_process_grads(ctx.device, tied=True))


class MoE(nn.Module):
    """Dense trunk plus NUM_EXPERTS experts spread unevenly over the expert-parallel group."""

    NUM_EXPERTS = 3

    def __init__(self, device: torch.device, owned: list[int]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.dense = nn.Linear(DIM, DIM).to(device)
        experts = [nn.Linear(DIM, DIM).to(device) for _ in range(self.NUM_EXPERTS)]
        self.experts = nn.ModuleDict({str(e): experts[e] for e in owned})
        self.embed = nn.Embedding(VOCAB, DIM).to(device)

    def forward(self, tokens: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        x = self.dense(self.embed(tokens))
        route, routed = tokens % self.NUM_EXPERTS, x.detach()  # experts do not backprop into the trunk
        y = torch.zeros_like(x)
        for e, expert in self.experts.items():
            y = y + (route == int(e)).unsqueeze(-1) * expert(routed)
        if group is not None:  # combine the experts of all ranks; each expert's grad stays local
            combined = y.detach().clone()
            dist.all_reduce(combined, group=group)
            y = y + (combined - y.detach())
        return x + y


def _expert_owner(expert: int, world: int) -> int:
    return expert % world  # 3 experts on 4 ranks: rank 3 holds none; on 2 ranks: 2 + 1


def build_ep(ctx: Ctx) -> Built:
    owned = [e for e in range(MoE.NUM_EXPERTS) if _expert_owner(e, ctx.world) == ctx.rank]
    model = MoE(ctx.device, owned)
    loss_of(model(batch(ctx.device), dist.group.WORLD)).backward()
    world = dist.group.WORLD
    assert world is not None  # the default process group is initialised
    for expert in model.experts.values():
        for p in expert.parameters():
            distclip.mark_sharded(p, world)
    reference = MoE(ctx.device, list(range(MoE.NUM_EXPERTS)))
    loss_of(reference(batch(ctx.device), None)).backward()
    ref = {n: _grad(p).detach().double().cpu() for n, p in reference.named_parameters()}
    return Built(model, plain_full(model), local_grad_tensors(model), reference_grads=ref)


def build_ep_meta(ctx: Ctx) -> Built:
    """The MoE of ``build_ep`` as large models are built: on the meta device, experts marked by
    module (``mark_sharded(model.experts, group)``, remembered by name), then materialised with
    ``load_state_dict(..., assign=True)``, which replaces every parameter object. A mark on the
    meta parameters themselves would be lost with them (distclip raises for that)."""
    world = dist.group.WORLD
    assert world is not None  # the default process group is initialised
    owned = [e for e in range(MoE.NUM_EXPERTS) if _expert_owner(e, ctx.world) == ctx.rank]
    with torch.device("meta"):
        model = MoE(torch.device("meta"), owned)
    distclip.mark_sharded(model.experts, world)  # also on a rank that holds no expert: one code path
    checkpoint = {k: v.detach().clone() for k, v in MoE(ctx.device, owned).state_dict().items()}  # this rank's shard
    model.load_state_dict(checkpoint, assign=True)
    assert not any(p.is_meta for p in model.parameters())  # every parameter object was replaced
    loss_of(model(batch(ctx.device), world)).backward()
    reference = MoE(ctx.device, list(range(MoE.NUM_EXPERTS)))
    loss_of(reference(batch(ctx.device), None)).backward()
    ref = {n: _grad(p).detach().double().cpu() for n, p in reference.named_parameters()}
    return Built(model, plain_full(model), local_grad_tensors(model), reference_grads=ref)


def build_two_models(ctx: Ctx) -> Built:
    """Two models in one world: ranks [0, W/2) train model A, FSDP2 over their half (the group
    given as a 1-D DeviceMesh); ranks [W/2, W) train model B, DDP over their half (the group given
    as a ProcessGroup), on another batch. Each rank clips its own model with ``group=`` its half;
    each model's reference is its own single-process norm."""
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    halves = mesh(ctx, (2, ctx.world // 2), ("model", "dp"))  # every rank creates both halves' groups
    half = halves["dp"]  # this rank's half
    which = halves.get_local_rank("model")
    seeds = (1234, 4321)  # model B sees another batch: other grads, another norm
    reference: dict[str, torch.Tensor] = {}
    for name, seed in zip("AB", seeds):
        single = new_model(ctx.device)
        loss_of(single(batch(ctx.device, seed))).backward()
        reference.update({f"{name}.{n}": _grad(p).detach().double().cpu() for n, p in single.named_parameters()})
    model = new_model(ctx.device)
    wrapped: nn.Module
    group: GroupLike
    if which == 0:
        for sub in (model.fc1, model.fc2, model.head):
            fully_shard(sub, mesh=half)
        fully_shard(model, mesh=half)
        wrapped, group = model, half
    else:
        group = half.get_group()
        wrapped = DDP(model, process_group=group, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    loss_of(wrapped(batch(ctx.device, seeds[which]))).backward()
    prefix = "AB"[which] + "."
    return Built(wrapped, plain_full(wrapped, prefix), local_grad_tensors(wrapped), reference_grads=reference,
                 group=group, model=prefix)


class LoRABlock(nn.Module):
    """A frozen Linear(16, 16) plus a trainable rank-2 adapter Linear(16, 2): in one FSDP1 flat
    parameter of 304 elements the 32 trainable ones come last, so at 4 ranks only the last rank's
    shard holds any of them."""

    WIDTH, RANK = 16, 2

    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Linear(self.WIDTH, self.WIDTH)
        self.frozen.requires_grad_(False)
        self.adapter = nn.Linear(self.WIDTH, self.RANK, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = self.adapter(x).repeat_interleave(self.WIDTH // self.RANK, dim=-1)
        return x + torch.tanh(self.frozen(x) + up)


class LoRA(nn.Module):
    def __init__(self, blocks: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(LoRABlock() for _ in range(blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def lora_input(device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(4321)
    return torch.randn(BATCH, SEQ, LoRABlock.WIDTH, generator=g).to(device)


def build_fsdp1_lora(ctx: Ctx) -> Built:
    """FSDP1 FULL_SHARD, use_orig_params=True, one unit per block, frozen base weights: most ranks
    hold no trainable element in their shard (FSDP1's own ``model.clip_grad_norm_`` is right here)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    reference = LoRA().to(ctx.device)
    loss_of(reference(lora_input(ctx.device))).backward()
    ref = {n: p.grad.detach().double().cpu() for n, p in reference.named_parameters() if p.grad is not None}
    model = FSDP(
        LoRA().to(ctx.device),
        sharding_strategy=ShardingStrategy.FULL_SHARD,
        use_orig_params=True,
        auto_wrap_policy=ModuleWrapPolicy({LoRABlock}),
        device_id=ctx.device,
    )
    loss_of(model(lora_input(ctx.device))).backward()

    def full() -> dict[str, torch.Tensor]:
        # summon_full_params(with_grads=True) fills zeros for the frozen weights: leave them out
        with FSDP.summon_full_params(model, with_grads=True):
            return {
                clean_name(n): p.grad.detach().clone()
                for n, p in model.named_parameters()
                if p.grad is not None and p.requires_grad
            }

    return Built(model, full, local_grad_tensors(model), reference_grads=ref)


class PreNormBlock(Block):
    """The same parameters as Block in the pre-norm order sequence parallelism needs:
    embed -> x + fc2(gelu(fc1(norm(x)))) -> head."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        x = x + self.fc2(F.gelu(self.fc1(self.norm(x))))
        return self.head(x)


def build_tp_sp(ctx: Ctx) -> Built:
    """Tensor + sequence parallel (Megatron-SP / torchtitan style): the embedding reduce-scatters
    onto sequence shards, LayerNorm runs on its sequence shard (SequenceParallel), fc1 all-gathers
    the sequence, fc2 reduce-scatters back onto it; the head stays a plain replicated Linear. The
    LayerNorm's weight and bias grads are ``Partial`` DTensors (sums over the sequence shards)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    torch.manual_seed(0)
    reference = PreNormBlock().to(ctx.device)
    loss_of(reference(batch(ctx.device))).backward()
    ref = {n: _grad(p).detach().double().cpu() for n, p in reference.named_parameters()}
    tp_mesh = mesh(ctx, (ctx.world,), ("tp",))
    torch.manual_seed(0)
    model = PreNormBlock().to(ctx.device)
    parallelize_module(model, tp_mesh, {
        "embed": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "norm": SequenceParallel(),
        "fc1": ColwiseParallel(input_layouts=Shard(1)),
        "fc2": RowwiseParallel(output_layouts=Shard(1)),
        "head": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True),
    })
    loss_of(model(batch(ctx.device))).backward()
    return Built(model, plain_full(model), local_grad_tensors(model), reference_grads=ref)


SCENARIOS = (
    Scenario("DDP", build_ddp, lambda w: True),
    Scenario("FSDP1 FULL_SHARD flat", build_fsdp1("FULL_SHARD", False), lambda w: True),
    Scenario("FSDP1 FULL_SHARD orig", build_fsdp1("FULL_SHARD", True), lambda w: True),
    Scenario("FSDP1 SHARD_GRAD_OP", build_fsdp1("SHARD_GRAD_OP", True), lambda w: True),
    Scenario("FSDP1 HYBRID_SHARD", build_fsdp1("HYBRID_SHARD", True), lambda w: w % 2 == 0),
    Scenario("FSDP2", build_fsdp2, lambda w: True),
    Scenario("TP + plain", build_tp, lambda w: True),
    Scenario("HSDP", lambda ctx: build_fsdp2(ctx, hsdp=True), lambda w: w % 2 == 0),
    Scenario("2D TP+FSDP", build_2d, lambda w: True),
    Scenario("FSDP1 over TP", build_fsdp1_tp, lambda w: w % 2 == 0),
    Scenario("PP x FSDP", build_pp_fsdp, lambda w: w % 2 == 0),
    Scenario("two models, group=", build_two_models, lambda w: w % 2 == 0),
    Scenario("EP uneven experts", build_ep, lambda w: True),
    Scenario("EP meta + assign", build_ep_meta, lambda w: True),
    Scenario("tied embed PP", build_tied_pp, lambda w: w % 2 == 0),
    Scenario("tied embed PP x FSDP2", lambda ctx: build_tied_pp(ctx, fsdp=True), lambda w: w % 2 == 0),
    Scenario("FSDP1 LoRA", build_fsdp1_lora, lambda w: True),
    Scenario("TP + SP", build_tp_sp, lambda w: SEQ % w == 0),
)
LAYOUT_NAMES = tuple(s.name for s in SCENARIOS)

# ----------------------------------------------------------------------------- checking


@dataclass
class Row:
    layout: str
    norm_type: float
    reference: float
    result: float
    rel_err: float
    ok: bool
    detail: str = ""


def _world_full(local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {k: v.detach().double().cpu() for k, v in local.items()})
    merged: dict[str, torch.Tensor] = {}
    for part in gathered:
        for k, v in part.items():
            merged.setdefault(k, v)
    return dict(sorted(merged.items()))


def reference_norm(grads: dict[str, torch.Tensor], norm_type: float) -> float:
    flat = torch.cat([g.reshape(-1) for g in grads.values()]) if grads else torch.zeros(0, dtype=torch.float64)
    return float(torch.linalg.vector_norm(flat, norm_type)) if flat.numel() else 0.0


def clip(ctx: Ctx, built: Built, max_norm: float, norm_type: float) -> torch.Tensor:
    if ctx.impl == "torch":
        params = built.parameters.parameters() if isinstance(built.parameters, nn.Module) else built.parameters
        total = torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)
        return total.full_tensor() if hasattr(total, "full_tensor") else total
    return distclip.clip_grad_norm_(built.parameters, max_norm, norm_type, pp_group=built.pp_group, group=built.group)


def _model_ranks(built: Built, world: int) -> list[int]:
    """The ranks holding this rank's model: those of ``built.group``, or the whole world."""
    if built.group is None:
        return list(range(world))
    if isinstance(built.group, DeviceMesh):
        return [int(r) for r in built.group.mesh.flatten().tolist()]
    return dist.get_process_group_ranks(built.group)


# ----------------------------------------------------------------------------- agreement


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
            self.base_store = dist.distributed_c10d._get_default_store()
            self.agree = Agreement(self.base_store, self.rank, self.world, wait_s=2 * self.timeout_s + 30)
        return self.agree


def _error(e: BaseException) -> str:
    message = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\] ", "", " ".join(str(e).split()))  # gloo's source location
    return f"{type(e).__name__}: {message[:240]}"


def _is_timeout(message: str) -> bool:
    text = message.lower()
    return any(s in text for s in ("timed out", "timeout", "time out", "distbackenderror", "connection closed", "connection reset"))


def _attempt(fn: Callable[[], _T]) -> tuple[_T | None, str | None]:
    try:
        return fn(), None
    except Exception as e:  # noqa: BLE001 - every failure becomes a row, on every rank
        return None, _error(e)


def _describe(errors: list[str | None]) -> str:
    """'ranks 2,3: RuntimeError: ...; ranks 0,1: DistBackendError: ...timed out...'"""
    by_message: dict[str, list[int]] = {}
    for rank, message in enumerate(errors):
        if message is not None:
            by_message.setdefault(message, []).append(rank)
    parts = [f"rank{'s' if len(r) > 1 else ''} {','.join(map(str, r))}: {m}" for m, r in by_message.items()]
    return "; ".join(parts)


def _failure(errors: list[str | None]) -> tuple[str, bool]:
    """(detail, hung): hung when some rank timed out in a collective or did not raise at all while
    others did (it was left waiting): the process group must be rebuilt."""
    raised = [e for e in errors if e is not None]
    hung = any(_is_timeout(e) for e in raised)
    detail = _describe(errors)
    return (f"hang/timeout: {detail}" if hung else detail), hung


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


def _save_grads(built: Built) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(g, g.detach().clone()) for g in built.local_grads()]


def _restore_grads(built: Built, saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    current = built.local_grads()
    if len(current) != len(saved) or any(c.data_ptr() != s[0].data_ptr() for c, s in zip(current, saved)):
        raise RuntimeError("the gradients were replaced (not scaled in place) by the clip call; cannot restore them")
    for g, (_, copy) in zip(current, saved):
        g.copy_(copy)


def check(ctx: Ctx, scenario: Scenario, norm_types: tuple[float, ...]) -> tuple[list[Row], bool]:
    """One layout, every norm type. Returns (rows, reset): rows are the same on every rank; reset
    says the process group may be out of step (a timeout, or a step that failed part-way).

    Each step (build, reference, clip, comparison) runs under try/except on every rank and its
    outcome is agreed before the next step, so a rank that raised never skips a collective that
    the others make.
    """
    agree = ctx.agreement()
    rows: list[Row] = []

    def not_run(from_index: int, why: str) -> None:
        for p in norm_types[from_index:]:
            rows.append(Row(scenario.name, p, math.nan, math.nan, math.nan, False, why))

    built, err = _attempt(lambda: scenario.build(ctx))
    errors = agree(err)
    if any(errors):
        detail, hung = _failure(errors)
        not_run(0, f"build failed: {detail}")
        return rows, True  # a failed build leaves the process group in an unknown state
    assert built is not None  # no rank raised, so this one built it

    state: dict = {}

    def prepare() -> tuple[str, float]:
        if "saved" not in state:
            state["saved"] = _save_grads(built)
        else:
            _restore_grads(built, state["saved"])
        state["before"] = before = _world_full(built.local_full())
        if "sanity" not in state:
            expected = built.reference_grads or single_process_grads(ctx.device)
            bad = [n for n in expected if n not in before or not torch.allclose(before[n], expected[n], rtol=1e-4, atol=1e-6)]
            extra = [n for n in before if n not in expected]
            state["sanity"] = f"grads differ from single-process model: {bad + extra}" if bad or extra else ""
        return state["sanity"]

    for i, norm_type in enumerate(norm_types):
        _, err = _attempt(prepare)
        errors = agree(err)
        if any(errors):
            detail, hung = _failure(errors)
            not_run(i, f"reference failed: {detail}")
            return rows, True
        # this rank's model's norm (the world's one model, unless the layout holds several)
        ref = reference_norm({n: g for n, g in state["before"].items() if n.startswith(built.model)}, norm_type)
        max_norm = ref * 0.5

        def clip_once(m: float = max_norm, p: float = norm_type) -> float:
            return float(clip(ctx, built, m, p).detach().double().cpu())

        total, err = _attempt(clip_once)
        outcomes = agree((total, err, ref, built.model))
        errors = [o[1] for o in outcomes]
        results = [o[0] for o in outcomes]
        shown_ref = outcomes[0][2]  # a row shows rank 0's model; the other models' numbers go in its detail
        others = _other_models(outcomes)
        if any(errors):
            detail, hung = _failure(errors)
            rows.append(Row(scenario.name, norm_type, shown_ref, math.nan, math.nan, False, _with_models(detail, others)))
            if hung:
                not_run(i + 1, "not run: the process group was rebuilt after the timeout above")
                return rows, True
            continue

        def compare(results: list = results, ref: float = ref, max_norm: float = max_norm) -> tuple[bool, str]:
            result = results[ctx.rank]
            before = state["before"]
            after = _world_full(built.local_full())
            coef = min(1.0, max_norm / (ref + 1e-6))
            rel = abs(result - ref) / ref if ref else abs(result)
            if not rel <= 1e-6:
                return False, "norm differs from reference"
            mine = [n for n in before if n.startswith(built.model)]  # the other models are clipped by their own norms
            if not all(torch.allclose(after[n], before[n] * coef, rtol=1e-5, atol=1e-8) for n in mine):
                return False, "clipped grads differ from reference"
            if len({repr(results[r]) for r in _model_ranks(built, ctx.world)}) != 1:
                return False, f"norm differs across ranks: {results}"
            if state["sanity"]:
                return False, state["sanity"]
            return True, ""

        verdict, err = _attempt(compare)
        verdicts = agree((verdict, err))  # verdict: (ok, detail), or None when compare raised
        errors = [e for _, e in verdicts]
        result = results[0]
        rel = abs(result - shown_ref) / shown_ref if shown_ref else abs(result)
        if any(errors):
            detail, hung = _failure(errors)
            rows.append(Row(scenario.name, norm_type, shown_ref, result, rel, False,
                            _with_models(f"comparison failed: {detail}", others)))
            not_run(i + 1, "not run: comparison failed above")
            return rows, True
        ok = all(v[0] for v, _ in verdicts)
        detail = next((v[1] for v, _ in verdicts if not v[0] and v[1]), "")
        rows.append(Row(scenario.name, norm_type, shown_ref, result, rel, ok, _with_models(detail, others)))
    return rows, False


def _other_models(outcomes: list) -> dict[str, tuple[float, float]]:
    """{model: (reference, result)} of every model but rank 0's, from the first rank holding it
    (empty when the world holds one model); outcomes are the agreed (total, error, ref, model)."""
    others: dict[str, tuple[float, float]] = {}
    for total, _, ref, model in outcomes:
        if model != outcomes[0][3] and model not in others:
            others[model] = (ref, math.nan if total is None else total)
    return others


def _with_models(detail: str, others: dict[str, tuple[float, float]]) -> str:
    shown = [f"model {m.rstrip('.')}: reference {r:.8g}, result {t:.8g}" for m, (r, t) in others.items()]
    return "; ".join(x for x in (detail, *shown) if x)


def select(world: int, names: list[str] | None = None) -> list[Scenario]:
    unknown = sorted(set(names or ()) - set(LAYOUT_NAMES))
    if unknown:
        raise ValueError(f"unknown layout(s) {unknown}; valid names: {', '.join(LAYOUT_NAMES)}")
    return [s for s in SCENARIOS if s.allowed(world) and (names is None or s.name in names)]


def run(
    ctx: Ctx,
    names: list[str] | None = None,
    norm_types: tuple[float, ...] = NORM_TYPES,
    progress: Callable[[str], None] | None = None,
) -> list[Row]:
    """Every selected layout allowed at this world size; rows are identical on every rank. A
    layout that hangs is reported and the process group rebuilt; a rank that stops reporting ends
    the run (its layout and the rest are reported as not run)."""
    scenarios = select(ctx.world, names)
    rows: list[Row] = []
    for n, scenario in enumerate(scenarios, 1):
        start = time.perf_counter()
        try:
            layout_rows, hung = check(ctx, scenario, norm_types)
        except RanksLost as e:
            for s in scenarios[n - 1:]:
                why = f"hang: {e}" if s is scenario else "not run: an earlier layout hung"
                rows.extend(Row(s.name, p, math.nan, math.nan, math.nan, False, why) for p in norm_types)
            if progress:
                progress(f"[{n}/{len(scenarios)}] {scenario.name:24s} FAIL (hang): {e}; stopping")
            raise RunAborted(rows) from e
        rows.extend(layout_rows)
        if progress:
            passed = sum(r.ok for r in layout_rows)
            timed_out = any("hang/timeout" in r.detail for r in layout_rows)
            verdict = "PASS" if passed == len(layout_rows) else "FAIL (hang/timeout)" if timed_out else "FAIL"
            progress(f"[{n}/{len(scenarios)}] {scenario.name:24s} {verdict} {passed}/{len(layout_rows)}  "
                     f"({time.perf_counter() - start:.1f} s)")
        if hung:  # the process group may be out of step: a fresh one for the next layout
            reset_process_group(ctx)
    return rows


class RunAborted(RuntimeError):
    def __init__(self, rows: list[Row]) -> None:
        super().__init__("a rank stopped reporting")
        self.rows = rows


def format_table(rows: list[Row], world: int, impl: str) -> str:
    header = f"{'layout':24s} {'norm':>5s} {'reference':>14s} {impl:>14s} {'rel err':>9s}  pass"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r.layout:24s} {r.norm_type:>5g} {r.reference:14.8g} {r.result:14.8g} {r.rel_err:9.1e}  "
            f"{'PASS' if r.ok else 'FAIL'}{'  ' + r.detail if r.detail else ''}"
        )
    lines.append(summary(rows, world, impl))
    return "\n".join(lines)


def summary(rows: list[Row], world: int, impl: str) -> str:
    passed = sum(r.ok for r in rows)
    layouts = list(dict.fromkeys(r.layout for r in rows))
    failed = [name for name in layouts if not all(r.ok for r in rows if r.layout == name)]
    line = (
        f"{'ALL PASS' if rows and passed == len(rows) else 'FAILED'}: {passed}/{len(rows)} checks passed "
        f"({len(layouts)} layouts x {len(rows) // max(len(layouts), 1)} norm types, world size {world}, {impl})"
    )
    return line + (f"; failing layouts: {', '.join(failed)}" if failed else "")


# ----------------------------------------------------------------------------- command line

# torch's warnings about its own demo wrappers (deprecations, FSDP2 view outputs, DTensor
# redistribution plans) say nothing about clipping; --verbose shows them.
_TORCH_DIR = os.path.dirname(torch.__file__)


def _quiet_torch_warnings() -> None:
    show = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        # raised inside torch, or attributed (stacklevel) to this file's demo models; distclip's
        # own warnings come from its other modules and are shown
        if str(filename).startswith(_TORCH_DIR) or os.path.abspath(str(filename)) == os.path.abspath(__file__):
            return
        show(message, category, filename, lineno, file, line)

    warnings.showwarning = showwarning
    for name in ("torch.distributed", "torch.distributed.tensor", "torch.distributed.fsdp"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m distclip.verify", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impl", choices=("distclip", "torch"), default="distclip",
                        help="clip with distclip (default) or torch.nn.utils.clip_grad_norm_ (negative control)")
    parser.add_argument("--layouts", nargs="+", metavar="NAME", help="subset of layout names (default: all allowed; see --list)")
    parser.add_argument("--norm-types", nargs="+", type=float, default=list(NORM_TYPES), metavar="P",
                        help=f"norm types (default: {' '.join(f'{p:g}' for p in NORM_TYPES)})")
    parser.add_argument("--list", action="store_true", help="list the layouts and exit")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="process-group timeout in seconds: a layout that hangs fails after this (default 60)")
    parser.add_argument("--nproc", type=int, default=4,
                        help="ranks to start when not launched by torchrun (default 4; ignored under torchrun)")
    parser.add_argument("--verbose", action="store_true", help="show torch's own warnings about the demo wrappers")
    return parser


def _world_note(scenario: Scenario) -> str:
    sizes = [w for w in (1, 2, 3, 4, 8) if scenario.allowed(w)]
    return "any world size" if sizes == [1, 2, 3, 4, 8] else "world sizes " + ", ".join(map(str, sizes)) + ", ..."


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(argv)
    launched = "RANK" in os.environ
    is_rank0 = os.environ.get("RANK", "0") == "0"
    if args.list:
        if is_rank0:
            for s in SCENARIOS:
                print(f"{s.name:24s} ({_world_note(s)})")
        return 0
    unknown = sorted(set(args.layouts or ()) - set(LAYOUT_NAMES))
    if unknown:
        if is_rank0:
            parser.print_usage(sys.stderr)
            print(f"{parser.prog}: error: unknown layout(s): {', '.join(map(repr, unknown))}\n"
                  f"valid layouts: {', '.join(repr(n) for n in LAYOUT_NAMES)}", file=sys.stderr, flush=True)
        return 2
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    if not launched:
        return launch_local(args.nproc, argv, args.timeout)
    return _worker(args)


def _worker(args: argparse.Namespace) -> int:
    if not args.verbose:
        _quiet_torch_warnings()
    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() > 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=args.timeout))
    ctx = Ctx(dist.get_rank(), dist.get_world_size(), torch.device("cuda", local_rank) if use_cuda else torch.device("cpu"),
              args.impl, timeout_s=args.timeout)
    if not use_cuda and ctx.world > 1:
        torch.set_num_threads(1)  # several ranks share the CPU cores

    def progress(line: str) -> None:
        if ctx.rank == 0:
            print(line, flush=True)

    scenarios = select(ctx.world, args.layouts)
    skipped = [s.name for s in SCENARIOS if (args.layouts is None or s.name in args.layouts) and s not in scenarios]
    progress(f"distclip.verify: {len(scenarios)} layouts x {len(args.norm_types)} norm types on {ctx.world} ranks "
             f"({'nccl' if use_cuda else 'gloo'}), clipping with {args.impl}; process-group timeout {args.timeout:g} s")
    if skipped:
        progress(f"not applicable at world size {ctx.world}: {', '.join(skipped)}")
    aborted = False
    try:
        rows = run(ctx, args.layouts, tuple(args.norm_types), progress)
    except RunAborted as e:
        rows, aborted = e.rows, True
    progress("")
    progress(format_table(rows, ctx.world, args.impl) if rows else f"FAILED: no layout to run at world size {ctx.world}")
    code = 0 if rows and all(r.ok for r in rows) else 1
    if aborted:  # a rank is stuck in a collective: tearing the group down could block too
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    ctx.agreement()("done")  # nobody exits before rank 0 has printed: torchrun stops all ranks once one fails
    dist.destroy_process_group()
    return code


# ----------------------------------------------------------------------------- no torchrun


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_local(nproc: int, argv: list[str], timeout_s: float) -> int:
    """``python -m distclip.verify`` without torchrun: start ``nproc`` local ranks (this module,
    with RANK etc. set), wait for them, and return the job's exit code (no launcher traceback)."""
    if nproc < 1:
        print("distclip.verify: --nproc must be at least 1", file=sys.stderr)
        return 2
    shown = [a for i, a in enumerate(argv) if not (a == "--nproc" or a.startswith("--nproc=") or (i and argv[i - 1] == "--nproc"))]
    shown = [f"'{a}'" if " " in a else a for a in shown]
    print(f"distclip.verify: not launched by torchrun (RANK unset), starting {nproc} local ranks myself (--nproc); "
          f"same as: torchrun --standalone --nproc_per_node={nproc} -m distclip.verify {' '.join(shown)}".rstrip(), flush=True)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc)}
    env.setdefault("OMP_NUM_THREADS", "1")
    procs = [
        subprocess.Popen([sys.executable, "-m", "distclip.verify", *argv], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
        for r in range(nproc)
    ]
    grace = 2 * timeout_s + 60  # after one rank fails, how long the others may take to finish
    failed_at: float | None = None
    try:
        while any(p.poll() is None for p in procs):
            if failed_at is None and any(p.poll() not in (None, 0) for p in procs):
                failed_at = time.monotonic()
            if failed_at is not None and time.monotonic() - failed_at > grace:
                break
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    codes = [p.returncode for p in procs]
    if all(c == 0 for c in codes):
        return 0
    if codes[0] not in (0, 1):  # rank 0 did not get to print the summary
        print(f"distclip.verify: FAILED: rank exit codes {codes}", file=sys.stderr, flush=True)
    return codes[0] if codes[0] not in (0, None) else 1


if __name__ == "__main__":
    sys.exit(main())
