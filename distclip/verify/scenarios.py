"""The layouts: one builder and one registry line each.

A builder takes the rank's ``Ctx``, builds a small real model (``models``) in its layout, runs a
real forward/backward and returns a ``Built``: what to clip, and how to see the stage's full
gradients and this rank's local ones. ``SCENARIOS`` is the registry, in the order the job runs
them: ``Scenario(name, build, allowed, tags)``, where ``allowed(world_size)`` says whether the
layout can be built at that world size and ``tags`` (from ``TAGS``) say what it exercises.
``select`` picks from it by world size, name and tag.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

import distclip
from distclip import _fsdp1
from distclip.verify.context import Ctx
from distclip.verify.models import (
    BATCH,
    DIM,
    OUT,
    SEQ,
    VOCAB,
    LoRA,
    LoRABlock,
    MoE,
    PreNormBlock,
    batch,
    expert_owner,
    grad_of,
    lora_input,
    loss_of,
    moe_reference_grads,
    new_model,
    single_process_grads,
)

# What a tag says about a layout (every scenario's tags come from here).
TAGS = {
    "ddp": "DistributedDataParallel replicas (plain tensors)",
    "fsdp1": "FullyShardedDataParallel (FSDP1): flat parameters, passed as the wrapped module",
    "fsdp2": "fully_shard (FSDP2): DTensor parameters",
    "tp": "tensor parallel (parallelize_module)",
    "dtensor": "DTensor grads: the layout is read from their placements",
    "2d": "a 2-D device mesh (HSDP, TP x FSDP, HYBRID_SHARD)",
    "pipeline": "pipeline stages, clipped with pp_group=",
    "marks": "mark_sharded / mark_replicated",
    "experts": "MoE experts spread unevenly over an expert-parallel group",
    "tied": "a weight tied across pipeline stages",
    "group": "several models in one world, each clipped with group=",
    "partial": "Partial DTensor grads, made whole before measuring",
    "frozen": "frozen parameters (no grad) inside a sharded unit",
    "meta": "built on the meta device, materialised with load_state_dict(assign=True)",
    "order": "parameters listed in a different order on each rank",
    "sparse": "sparse COO grads (nn.Embedding(sparse=True))",
}


@dataclass
class Built:
    """A layout after forward/backward: what to clip and how to see its full gradients."""

    parameters: distclip.ParamsLike  # passed to clip_grad_norm_ (module or list)
    local_full: Callable[[], dict[str, torch.Tensor]]  # collective within the stage; this stage's full grads
    local_grads: Callable[[], list[torch.Tensor]]  # this rank's local grad tensors (to save/restore)
    pp_group: Optional[distclip.GroupLike] = None
    reference_grads: dict[str, torch.Tensor] = field(default_factory=dict)  # single-process model
    # Several models in one world: ``group`` (passed to clip_grad_norm_) holds the ranks of this
    # rank's model, whose local_full/reference_grads names start with ``model``; its reference norm
    # is over those names only, and its result must be identical across ``group`` only.
    group: Optional[distclip.GroupLike] = None
    model: str = ""


@dataclass(frozen=True)
class Scenario:
    name: str
    build: Callable[[Ctx], Built]
    allowed: Callable[[int], bool]  # can it be built at this world size?
    tags: tuple[str, ...] = ()


# ----------------------------------------------------------------------------- builder helpers


def clean_name(name: str) -> str:
    for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "module."):
        name = name.replace(wrapper, "")
    return name


def plain_full(module: nn.Module, prefix: str = "") -> Callable[[], dict[str, torch.Tensor]]:
    def full() -> dict[str, torch.Tensor]:
        out = {}
        for name, p in module.named_parameters():
            if p.grad is None:
                continue
            g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
            out[prefix + clean_name(name)] = g.detach()
        return out

    return full


def local_grad_tensors(module: nn.Module) -> Callable[[], list[torch.Tensor]]:
    def grads() -> list[torch.Tensor]:
        out = []
        for p in module.parameters():
            if p.grad is not None:
                out.append(p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad)
        return out

    return grads


def mesh(ctx: Ctx, shape: tuple[int, ...], names: tuple[str, ...]) -> DeviceMesh:
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(ctx.device.type, shape, mesh_dim_names=names)


def _device_ids(ctx: Ctx) -> list[int] | None:
    return [ctx.device.index] if ctx.device.type == "cuda" else None


# ----------------------------------------------------------------------------- builders


def build_ddp(ctx: Ctx) -> Built:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = new_model(ctx.device)
    ddp = DDP(model, device_ids=_device_ids(ctx))
    loss_of(ddp(batch(ctx.device))).backward()
    return Built(ddp, plain_full(ddp), local_grad_tensors(ddp))


def build_fsdp1(strategy: str, use_orig_params: bool) -> Callable[[Ctx], Built]:
    """FSDP1 with ``strategy`` (a ShardingStrategy name), one unit per Linear."""

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


def build_hsdp(ctx: Ctx) -> Built:
    """FSDP2 on a (replicate, shard) mesh."""
    return build_fsdp2(ctx, hsdp=True)


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
    grad = grad_of(tied)
    dist.all_reduce(grad.to_local() if isinstance(grad, DTensor) else grad, group=emb_group)
    distclip.mark_replicated(tied, emb_group)

    def full() -> dict[str, torch.Tensor]:
        out = plain_full(part)()
        if "head.weight" in out:
            out["embed.weight"] = out.pop("head.weight")
        return out

    # the stage module itself (not its parameter list), so per-name tools see its names
    return Built(part, full, local_grad_tensors(part), pp_group=pp_group,
                 reference_grads=single_process_grads(ctx.device, tied=True))


def build_tied_pp_fsdp2(ctx: Ctx) -> Built:
    """The tied pipeline with each stage FSDP2-sharded: the tied copies are DTensors."""
    return build_tied_pp(ctx, fsdp=True)


def _world_group() -> dist.ProcessGroup:
    world = dist.group.WORLD
    assert world is not None  # the default process group is initialised
    return world


def build_ep(ctx: Ctx) -> Built:
    """Experts spread unevenly over the world (3 experts: at 4 ranks one rank holds none), each
    expert parameter marked with ``mark_sharded``; the dense trunk is replicated."""
    owned = [e for e in range(MoE.NUM_EXPERTS) if expert_owner(e, ctx.world) == ctx.rank]
    model = MoE(ctx.device, owned)
    world = _world_group()
    loss_of(model(batch(ctx.device), world)).backward()
    for expert in model.experts.values():
        for p in expert.parameters():
            distclip.mark_sharded(p, world)
    return Built(model, plain_full(model), local_grad_tensors(model), reference_grads=moe_reference_grads(ctx.device))


def build_ep_meta(ctx: Ctx) -> Built:
    """The MoE of ``build_ep`` as large models are built: on the meta device, experts marked by
    module (``mark_sharded(model.experts, group)``, remembered by name), then materialised with
    ``load_state_dict(..., assign=True)``, which replaces every parameter object. A mark on the
    meta parameters themselves would be lost with them (distclip raises for that)."""
    world = _world_group()
    owned = [e for e in range(MoE.NUM_EXPERTS) if expert_owner(e, ctx.world) == ctx.rank]
    with torch.device("meta"):
        model = MoE(torch.device("meta"), owned)
    distclip.mark_sharded(model.experts, world)  # also on a rank that holds no expert: one code path
    checkpoint = {k: v.detach().clone() for k, v in MoE(ctx.device, owned).state_dict().items()}  # this rank's shard
    model.load_state_dict(checkpoint, assign=True)
    assert not any(p.is_meta for p in model.parameters())  # every parameter object was replaced
    loss_of(model(batch(ctx.device), world)).backward()
    return Built(model, plain_full(model), local_grad_tensors(model), reference_grads=moe_reference_grads(ctx.device))


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
        reference.update({f"{name}.{n}": grad_of(p).detach().double().cpu() for n, p in single.named_parameters()})
    model = new_model(ctx.device)
    wrapped: nn.Module
    group: distclip.GroupLike
    if which == 0:
        for sub in (model.fc1, model.fc2, model.head):
            fully_shard(sub, mesh=half)
        fully_shard(model, mesh=half)
        wrapped, group = model, half
    else:
        group = half.get_group()
        wrapped = DDP(model, process_group=group, device_ids=_device_ids(ctx))
    loss_of(wrapped(batch(ctx.device, seeds[which]))).backward()
    prefix = "AB"[which] + "."
    return Built(wrapped, plain_full(wrapped, prefix), local_grad_tensors(wrapped), reference_grads=reference,
                 group=group, model=prefix)


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
    ref = {n: grad_of(p).detach().double().cpu() for n, p in reference.named_parameters()}
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


def build_tp_sp_any_order(ctx: Ctx) -> Built:
    """``build_tp_sp`` clipped as a list of its parameters in an order that differs by rank (what a
    ``set(...)`` of parameters gives): the LayerNorm's ``Partial`` weight and bias grads (alike in
    shape) must still be summed with their own summands on the other ranks."""
    built = build_tp_sp(ctx)
    assert isinstance(built.parameters, nn.Module)
    params = list(built.parameters.parameters())
    built.parameters = params[ctx.rank % len(params):] + params[: ctx.rank % len(params)]  # rotated by rank
    return built


def _sparse_model(device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(VOCAB, DIM, sparse=True), nn.Linear(DIM, OUT)).to(device)


def _values_full(module: nn.Module) -> Callable[[], dict[str, torch.Tensor]]:
    """The grads as distclip measures them: a sparse grad by its coalesced values."""
    def full() -> dict[str, torch.Tensor]:
        out = {}
        for name, p in module.named_parameters():
            if p.grad is not None:
                g = p.grad
                out[name] = (g.coalesce().values() if g.is_sparse else g).detach()
        return out

    return full


def build_sparse(ctx: Ctx) -> Built:
    """An ``nn.Embedding(sparse=True)`` replicated on every rank (each rank computes the same batch,
    as DDP replicas would hold the same grads): a sparse COO grad with repeated indices
    (uncoalesced), measured by its coalesced values and scaled through its own values."""
    reference = _sparse_model(ctx.device)
    loss_of(reference(batch(ctx.device))).backward()
    ref = {n: t.double().cpu() for n, t in _values_full(reference)().items()}
    model = _sparse_model(ctx.device)
    loss_of(model(batch(ctx.device))).backward()

    def grads() -> list[torch.Tensor]:
        return [p.grad._values() if p.grad.is_sparse else p.grad for p in model.parameters() if p.grad is not None]

    return Built(model, _values_full(model), grads, reference_grads=ref)


# ----------------------------------------------------------------------------- the registry


def any_size(world: int) -> bool:
    return True


def even(world: int) -> bool:
    return world % 2 == 0


def divides_seq(world: int) -> bool:
    return SEQ % world == 0  # sequence parallelism shards the sequence evenly


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("DDP", build_ddp, any_size, ("ddp",)),
    Scenario("FSDP1 FULL_SHARD flat", build_fsdp1("FULL_SHARD", False), any_size, ("fsdp1",)),
    Scenario("FSDP1 FULL_SHARD orig", build_fsdp1("FULL_SHARD", True), any_size, ("fsdp1",)),
    Scenario("FSDP1 SHARD_GRAD_OP", build_fsdp1("SHARD_GRAD_OP", True), any_size, ("fsdp1",)),
    Scenario("FSDP1 HYBRID_SHARD", build_fsdp1("HYBRID_SHARD", True), even, ("fsdp1", "2d")),
    Scenario("FSDP2", build_fsdp2, any_size, ("fsdp2", "dtensor")),
    Scenario("TP + plain", build_tp, any_size, ("tp", "dtensor")),
    Scenario("HSDP", build_hsdp, even, ("fsdp2", "dtensor", "2d")),
    Scenario("2D TP+FSDP", build_2d, any_size, ("fsdp2", "tp", "dtensor", "2d")),
    Scenario("FSDP1 over TP", build_fsdp1_tp, even, ("fsdp1", "tp", "dtensor", "2d")),
    Scenario("PP x FSDP", build_pp_fsdp, even, ("pipeline", "fsdp2", "dtensor")),
    Scenario("two models, group=", build_two_models, even, ("group", "fsdp2", "ddp", "dtensor")),
    Scenario("EP uneven experts", build_ep, any_size, ("experts", "marks")),
    Scenario("EP meta + assign", build_ep_meta, any_size, ("experts", "marks", "meta")),
    Scenario("tied embed PP", build_tied_pp, even, ("pipeline", "tied", "marks")),
    Scenario("tied embed PP x FSDP2", build_tied_pp_fsdp2, even, ("pipeline", "tied", "marks", "fsdp2", "dtensor")),
    Scenario("FSDP1 LoRA", build_fsdp1_lora, any_size, ("fsdp1", "frozen")),
    Scenario("TP + SP", build_tp_sp, divides_seq, ("tp", "dtensor", "partial")),
    Scenario("TP + SP, order by rank", build_tp_sp_any_order, divides_seq, ("tp", "dtensor", "partial", "order")),
    Scenario("sparse embedding", build_sparse, any_size, ("sparse",)),
)
LAYOUT_NAMES = tuple(s.name for s in SCENARIOS)


def select(
    world: int,
    names: Iterable[str] | None = None,
    *,
    tags: Iterable[str] | None = None,
    scenarios: Iterable[Scenario] | None = None,
) -> list[Scenario]:
    """The scenarios allowed at ``world`` ranks, in registry order: those named (all by default)
    that carry every tag in ``tags``. ``scenarios`` replaces the registry (``SCENARIOS``). An
    unknown name or tag raises ``ValueError``, naming the valid ones."""
    registry = SCENARIOS if scenarios is None else tuple(scenarios)
    valid = [s.name for s in registry]
    wanted = None if names is None else set(names)
    unknown = sorted((wanted or set()) - set(valid))
    if unknown:
        raise ValueError(f"unknown layout(s) {unknown}; valid names: {', '.join(valid)}")
    need = set(tags or ())
    if need - set(TAGS):
        raise ValueError(f"unknown tag(s) {sorted(need - set(TAGS))}; valid tags: {', '.join(TAGS)}")
    return [s for s in registry if s.allowed(world) and (wanted is None or s.name in wanted) and need <= set(s.tags)]
