"""Real wrappers in layouts where ranks legitimately hold different things, or where a mark meets
re-wrapping: LoRA under FSDP1 (most ranks hold no trainable element), a Megatron-TP weight inside
FSDP2 (marked after wrapping: right; marked before: reported, never silently wrong)."""

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from harness import run_world

NORMS = (1.0, 2.0, math.inf, 0.0, -math.inf, 0.5)


class LoraBlock(nn.Module):
    """A frozen base layer plus a trainable low-rank adapter (registered first, so under FSDP1 the
    adapter's elements sit at the start of the block's flat parameter: on 4 ranks only rank 0's
    shard holds any of them)."""

    def __init__(self) -> None:
        super().__init__()
        self.adapter = nn.Linear(16, 2, bias=False)
        self.base = nn.Linear(16, 16)
        self.base.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.pad(self.adapter(x), (0, 14))


def lora_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[LoraBlock() for _ in range(3)])


def lora_batch() -> torch.Tensor:
    return torch.randn(5, 16, generator=torch.Generator().manual_seed(7))


def _lora_fsdp1(rank, world):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    import distclip

    reference = lora_model()
    (reference(lora_batch()).pow(2).sum() * 10).backward()
    full = torch.cat([p.grad.double().reshape(-1) for p in reference.parameters() if p.grad is not None])
    model = FSDP(lora_model(), auto_wrap_policy=ModuleWrapPolicy({LoraBlock}), use_orig_params=True, device_id=torch.device("cpu"))
    (model(lora_batch()).pow(2).sum() * 10).backward()
    holds = sum(p.grad is not None and p.grad.numel() > 0 for p in model.parameters())
    saved = [p.grad.clone() if p.grad is not None else None for p in model.parameters()]
    out = {"holds": holds}
    for p_norm in NORMS:
        for p, s in zip(model.parameters(), saved):
            if s is not None:
                p.grad.copy_(s)
        ref = float(torch.linalg.vector_norm(full, p_norm))
        assert ref > 0
        total = float(distclip.clip_grad_norm_(model, ref / 2, p_norm))
        out[p_norm] = (total, ref)
        if p_norm in (2.0, math.inf):  # FSDP1's own method agrees where it is defined
            for p, s in zip(model.parameters(), saved):
                if s is not None:
                    p.grad.copy_(s)
            out[("fsdp1", p_norm)] = float(model.clip_grad_norm_(1e9, p_norm))
    return out


@pytest.fixture(scope="module")
def lora_results():
    return run_world(_lora_fsdp1, 4)


def test_lora_under_fsdp1_ranks_without_trainable_elements(lora_results):
    """Ranks whose shards hold no trainable element take part like the others (the agreement
    check once compared the kinds of grads held, and raised on every rank)."""
    results = lora_results
    assert results[0]["holds"] > 0 and all(r["holds"] == 0 for r in results[1:]), [r["holds"] for r in results]


@pytest.mark.parametrize("p_norm", NORMS, ids=lambda p: f"p{p:g}")
def test_lora_under_fsdp1_matches_reference(lora_results, p_norm):
    values = {r[p_norm][0] for r in lora_results}
    assert len(values) == 1, (p_norm, values)
    total, ref = lora_results[0][p_norm]
    assert abs(total - ref) <= 1e-6 * ref, (p_norm, total, ref)


@pytest.mark.parametrize("p_norm", (2.0, math.inf), ids=lambda p: f"p{p:g}")
def test_lora_under_fsdp1_fsdp1s_own_method_agrees(lora_results, p_norm):
    own = lora_results[0][("fsdp1", p_norm)]
    assert abs(own - lora_results[0][p_norm][1]) <= 1e-5 * own


def _megatron_in_fsdp2(rank, world, mark_before):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import distclip

    mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "tp"))
    tp_rank = mesh.get_local_rank("tp")
    torch.manual_seed(0)
    full = nn.Linear(6, 8, bias=False)  # rows split over tp, Megatron-style column parallel
    local = nn.Linear(6, 4, bias=False)
    with torch.no_grad():
        local.weight.copy_(full.weight[4 * tp_rank : 4 * tp_rank + 4])
    model = nn.Sequential(local, nn.LayerNorm(4))
    if mark_before:
        distclip.mark_sharded(model[0].weight, mesh["tp"])
    fully_shard(model, mesh=mesh["dp"])
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
    model(x).pow(2).sum().backward()
    if not mark_before:
        distclip.mark_sharded(model[0].weight, mesh["tp"])  # after wrapping: on the DTensor
    w = model[0].weight.grad.full_tensor()  # this tp rank's rows
    pieces = [torch.empty_like(w) for _ in range(2)]
    dist.all_gather(pieces, w, group=mesh["tp"].get_group())
    norm_grads = [p.grad.full_tensor() for p in model[1].parameters()]
    # The LayerNorm is replicated over tp but sees different inputs per tp rank: average it so it
    # is a true replica (what a real TP model's all-reduce would give).
    for g in norm_grads:
        dist.all_reduce(g, group=mesh["tp"].get_group())
        g /= 2
    for p, g in zip(model[1].parameters(), norm_grads):
        p.grad.to_local().copy_(g.tensor_split(world // 2)[mesh.get_local_rank("dp")])
    ref = float(torch.linalg.vector_norm(torch.cat([t.double().reshape(-1) for t in [*pieces, *norm_grads]])))
    try:
        total = float(distclip.get_total_norm(model))
        return ("ok", total, ref)
    except ValueError as e:
        return ("error", str(e), ref)


def test_megatron_tp_weight_inside_fsdp2_marked_after_wrapping():
    results = run_world(_megatron_in_fsdp2, 4, False)
    for status, total, ref in results:
        assert status == "ok" and abs(total - ref) <= 1e-6 * ref, (total, ref)


def test_mark_before_fully_shard_follows_the_slot():
    """A parameter mark is kept by the module slot, so fully_shard replacing the parameter keeps it
    (it used to be reported as lost; a mark on the object could not follow)."""
    results = run_world(_megatron_in_fsdp2, 4, True)
    for status, total, ref in results:
        assert status == "ok" and abs(total - ref) <= 1e-6 * ref, (total, ref)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_complex_single_process_matches_torch(dtype):
    import distclip

    g = torch.complex(torch.randn(40, 7), torch.randn(40, 7)).to(dtype)
    for p_norm in (1.0, 2.0, 3.0, math.inf):
        a, b = nn.Parameter(torch.zeros_like(g)), nn.Parameter(torch.zeros_like(g))
        a.grad, b.grad = g.clone(), g.clone()
        ours = distclip.clip_grad_norm_([a], 1.0, p_norm)
        theirs = torch.nn.utils.clip_grad_norm_([b], 1.0, p_norm)
        assert ours.dtype == theirs.dtype and not ours.is_complex()
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)


@pytest.mark.parametrize("scale,dtype", [(1e-22, torch.float32), (1e-30, torch.float32), (1e-25, torch.bfloat16)])
def test_underflow_single_process(scale, dtype):
    """g^2 underflows float32: torch loses the norm (1e-30: returns 0); distclip stays within 1e-6."""
    import distclip

    grads = [(torch.randn(1000, generator=torch.Generator().manual_seed(i)) * scale).to(dtype) for i in range(200)]
    grads.append((torch.randn(70000, generator=torch.Generator().manual_seed(999)) * scale).to(dtype))  # row path
    params = []
    for g in grads:
        p = nn.Parameter(torch.zeros(g.shape, dtype=dtype))
        p.grad = g
        params.append(p)
    ref = float(torch.linalg.vector_norm(torch.cat([g.double() for g in grads])))
    total = float(distclip.clip.total_grad_norm(params))
    assert abs(total - ref) <= 1e-6 * ref, (total, ref)
