"""The main job: prove distclip against a single-process float64 reference in real layouts.

    torchrun --standalone --nproc_per_node=4 -m distclip.verify

Builds a small real model in every layout the world size allows, runs a real forward/backward,
clips with distclip, and compares the returned norm and the clipped gradients (gathered to full
tensors) with a float64 reference computed on one process over the full gradients. Prints one
table and a one-line summary; exits non-zero on any failure. CPU/gloo by default, GPU/NCCL when
launched on GPUs. ``--impl torch`` runs the same checks against ``torch.nn.utils.clip_grad_norm_``
to show where today's tool is wrong.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import distclip
from distclip import _fsdp1

NORM_TYPES = (1.0, 2.0, 3.0, math.inf)
VOCAB, DIM, HIDDEN, OUT = 16, 8, 24, 2  # OUT=2 rows: at 4 ranks, some FSDP shards are empty


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


def batch(device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, VOCAB, (4, 6), generator=g).to(device)


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

    parameters: object  # passed to clip_grad_norm_ (module or list)
    local_full: Callable[[], dict[str, torch.Tensor]]  # collective within the stage; this stage's full grads
    local_grads: Callable[[], list[torch.Tensor]]  # this rank's local grad tensors (to save/restore)
    pp_group: object = None
    reference_grads: dict[str, torch.Tensor] = field(default_factory=dict)  # single-process model


@dataclass(frozen=True)
class Scenario:
    name: str
    build: Callable[["Ctx"], Built]
    allowed: Callable[[int], bool]


@dataclass
class Ctx:
    rank: int
    world: int
    device: torch.device
    impl: str


def single_process_grads(device: torch.device, tied: bool = False) -> dict[str, torch.Tensor]:
    model = new_model(device)
    if tied:
        model.head = nn.Linear(DIM, VOCAB, bias=False).to(device)
        model.head.weight = model.embed.weight
    loss_of(model(batch(device))).backward()
    return {n: p.grad.detach().double().cpu() for n, p in model.named_parameters()}


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
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    tp_mesh = mesh(ctx, (ctx.world,), ("tp",))
    model = new_model(ctx.device)
    parallelize_module(model, tp_mesh, {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()})
    loss_of(model(batch(ctx.device))).backward()
    return Built(model, plain_full(model), local_grad_tensors(model))


def build_2d(ctx: Ctx) -> Built:
    """TP inside FSDP2 on a (dp, tp) mesh; embedding, norm and head live on the dp-only mesh
    (torch's own function raises on this mix, pytorch #180346)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    tp = 2 if ctx.world % 2 == 0 else 1
    mesh_2d = mesh(ctx, (ctx.world // tp, tp), ("dp", "tp"))
    model = new_model(ctx.device)
    parallelize_module(model, mesh_2d["tp"], {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()})
    for sub in (model.fc1, model.fc2):
        fully_shard(sub, mesh=mesh_2d["dp"])
    fully_shard(model, mesh=mesh_2d["dp"])
    loss_of(model(batch(ctx.device))).backward()
    return Built(model, plain_full(model), local_grad_tensors(model))


def _pipeline_groups(ctx: Ctx) -> tuple[int, int, "dist.ProcessGroup", Optional[object]]:
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
        act = torch.empty(4, 6, DIM, device=device)
        dist.recv(act, peer)
        act.requires_grad_(True)
        loss_of(stage1(act)).backward()
        dist.send(act.grad.contiguous(), peer)


def build_pp_fsdp(ctx: Ctx) -> Built:
    """Two pipeline stages, each FSDP2-sharded over its own dp mesh."""
    from torch.distributed.fsdp import fully_shard

    stage, peer, pp_group, pp_mesh = _pipeline_groups(ctx)
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


def build_tied_pp(ctx: Ctx) -> Built:
    """Embedding on stage 0 tied to the output head on stage 1 (a copy per stage whose grads are
    summed across the embedding group, Megatron-style); counted once via mark_replicated."""
    stage, peer, pp_group, _ = _pipeline_groups(ctx)
    full_model = new_model(ctx.device)
    head = nn.Linear(DIM, VOCAB, bias=False).to(ctx.device)
    head.weight = nn.Parameter(full_model.embed.weight.detach().clone())
    keep = ("embed", "fc1", "fc2") if stage == 0 else ("norm",)
    part = nn.ModuleDict({k: getattr(full_model, k) for k in keep})
    if stage == 1:
        part["head"] = head
    tied = part["embed"].weight if stage == 0 else part["head"].weight

    def stage0(tokens):
        x = part["embed"](tokens)
        return x + part["fc2"](F.gelu(part["fc1"](x)))

    _run_pipeline(stage, peer, stage0, lambda x: part["head"](part["norm"](x)), ctx.device)
    embedding_groups = [dist.new_group([r, r + ctx.world // 2]) for r in range(ctx.world // 2)]
    emb_group = embedding_groups[ctx.rank % (ctx.world // 2)]
    dist.all_reduce(tied.grad, group=emb_group)  # both copies now hold the tied weight's grad
    distclip.mark_replicated(tied, emb_group)

    def full() -> dict[str, torch.Tensor]:
        out = plain_full(part)()
        if "head.weight" in out:
            out["embed.weight"] = out.pop("head.weight")
        return out

    return Built(list(part.parameters()), full, local_grad_tensors(part), pp_group=pp_group,
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

    def forward(self, tokens: torch.Tensor, group: Optional["dist.ProcessGroup"]) -> torch.Tensor:
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
    for expert in model.experts.values():
        for p in expert.parameters():
            distclip.mark_sharded(p, dist.group.WORLD)
    reference = MoE(ctx.device, list(range(MoE.NUM_EXPERTS)))
    loss_of(reference(batch(ctx.device), None)).backward()
    ref = {n: p.grad.detach().double().cpu() for n, p in reference.named_parameters()}
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
    Scenario("PP x FSDP", build_pp_fsdp, lambda w: w % 2 == 0),
    Scenario("EP uneven experts", build_ep, lambda w: True),
    Scenario("tied embed PP", build_tied_pp, lambda w: w % 2 == 0),
)

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
    return distclip.clip_grad_norm_(built.parameters, max_norm, norm_type, pp_group=built.pp_group)


def check(ctx: Ctx, scenario: Scenario, norm_types: tuple[float, ...]) -> list[Row]:
    built = scenario.build(ctx)
    saved = [g.detach().clone() for g in built.local_grads()]
    rows = []
    sanity = ""
    for norm_type in norm_types:
        for g, s in zip(built.local_grads(), saved):
            g.copy_(s)
        before = _world_full(built.local_full())
        if not sanity:
            expected = built.reference_grads or single_process_grads(ctx.device)
            bad = [n for n in expected if n not in before or not torch.allclose(before[n], expected[n], rtol=1e-4, atol=1e-6)]
            sanity = f"grads differ from single-process model: {bad}" if bad else "ok"
        ref = reference_norm(before, norm_type)
        max_norm = ref * 0.5
        try:
            total = clip(ctx, built, max_norm, norm_type)
            result, detail = float(total.detach().double().cpu()), ""
        except Exception as e:  # the torch baseline raises on several layouts
            result, detail = math.nan, f"{type(e).__name__}: {str(e)[:60]}"
        after = _world_full(built.local_full())
        coef = min(1.0, max_norm / (ref + 1e-6))
        rel = abs(result - ref) / ref if ref else abs(result)
        ok = rel <= 1e-6 and not detail
        if ok and not all(torch.allclose(after[n], before[n] * coef, rtol=1e-5, atol=1e-8) for n in before):
            ok, detail = False, "clipped grads differ from reference"
        everyone: list = [None] * ctx.world
        dist.all_gather_object(everyone, result)
        if ok and len({repr(v) for v in everyone}) != 1:
            ok, detail = False, f"norm differs across ranks: {everyone}"
        if ok and sanity != "ok":
            ok, detail = False, sanity
        rows.append(Row(scenario.name, norm_type, ref, result, rel, ok, detail))
    return rows


def run(ctx: Ctx, names: Optional[list[str]] = None, norm_types: tuple[float, ...] = NORM_TYPES) -> list[Row]:
    rows: list[Row] = []
    for scenario in SCENARIOS:
        if scenario.allowed(ctx.world) and (names is None or scenario.name in names):
            rows.extend(check(ctx, scenario, norm_types))
    return rows


def format_table(rows: list[Row], world: int, impl: str) -> str:
    header = f"{'layout':24s} {'norm':>5s} {'reference':>14s} {impl:>14s} {'rel err':>9s}  pass"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r.layout:24s} {r.norm_type:>5g} {r.reference:14.8g} {r.result:14.8g} {r.rel_err:9.1e}  "
            f"{'PASS' if r.ok else 'FAIL'}{'  ' + r.detail if r.detail else ''}"
        )
    passed = sum(r.ok for r in rows)
    layouts = len({r.layout for r in rows})
    lines.append(
        f"{'ALL PASS' if passed == len(rows) else 'FAILED'}: {passed}/{len(rows)} checks passed "
        f"({layouts} layouts x {len(rows) // max(layouts, 1)} norm types, world size {world}, {impl})"
    )
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impl", choices=("distclip", "torch"), default="distclip")
    parser.add_argument("--layouts", nargs="*", help="subset of layout names (default: all allowed)")
    args = parser.parse_args(argv)
    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() > 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    ctx = Ctx(dist.get_rank(), dist.get_world_size(), torch.device("cuda", local_rank) if use_cuda else torch.device("cpu"), args.impl)
    if not use_cuda and ctx.world > 1:
        torch.set_num_threads(1)  # several ranks share the CPU cores
    try:
        rows = run(ctx, args.layouts)
    finally:
        dist.barrier()
    if ctx.rank == 0:
        print(format_table(rows, ctx.world, args.impl), flush=True)
    dist.destroy_process_group()
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
