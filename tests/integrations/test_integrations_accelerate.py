"""The README's Accelerate recipe with a real ``accelerate.Accelerator`` on CPU (2 gloo ranks).

On CPU Accelerate runs as MULTI_CPU (DDP): its FSDP/TP paths need an accelerator device (a
``fsdp_plugin`` or ``ACCELERATE_USE_FSDP`` is ignored there) and fp16 AMP creates no GradScaler
on CPU, so this checks the recipe itself (clip the prepared model only when
``accelerator.sync_gradients``, after ``accelerator.unscale_gradients()``) under gradient
accumulation, against a float64 single-process reference and against Accelerate's own
``clip_grad_norm_`` (which is right for DDP).
"""

import os

import pytest
import torch
from torch import nn

from harness import run_world

if os.environ.get("DISTCLIP_REQUIRE_INTEGRATIONS") == "1":
    import accelerate  # noqa: F401  - in CI a missing package is a failure, not a skip
else:
    pytest.importorskip("accelerate", reason="accelerate is not installed (pip install 'distclip[accelerate]')")

D, B, MAX_NORM, LR, ACCUM, STEPS = 8, 4, 0.05, 0.5, 2, 2


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 1))


def _data(world):
    return torch.randn(world * ACCUM * STEPS * B, D + 1, generator=torch.Generator().manual_seed(1))


def _loss(net, batch):
    return nn.functional.mse_loss(net(batch[:, :D]).squeeze(-1), batch[:, D])


def accelerate_world(rank, world):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT="29563",
    )
    from accelerate import Accelerator

    import distclip

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=ACCUM)
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    model, opt = accelerator.prepare(model, opt)
    mine = _data(world)[rank::world]  # this rank's samples, in order
    norms, accelerate_norms = [], []
    for i in range(ACCUM * STEPS):
        with accelerator.accumulate(model):
            accelerator.backward(_loss(model, mine[i * B : (i + 1) * B]))
            if accelerator.sync_gradients:  # the step that really steps
                accelerator.unscale_gradients()  # a no-op without a GradScaler; required with one
                saved = [p.grad.clone() for p in model.parameters()]
                accelerate_norms.append(float(accelerator.clip_grad_norm_(model.parameters(), MAX_NORM)))
                for p, g in zip(model.parameters(), saved):
                    p.grad.copy_(g)
                norms.append(float(distclip.clip_grad_norm_(model, MAX_NORM)))
            opt.step()
            opt.zero_grad()
    params = {n.removeprefix("module."): p.detach().double().numpy().copy() for n, p in model.named_parameters()}
    return {"type": str(accelerator.distributed_type), "norms": norms, "accelerate_norms": accelerate_norms, "params": params}


def test_accelerate_recipe_with_gradient_accumulation():
    world = 2
    results = run_world(accelerate_world, world, timeout=300)
    r0 = results[0]
    assert r0["type"] == "DistributedType.MULTI_CPU", r0["type"]
    assert len(r0["norms"]) == STEPS and all(n > MAX_NORM for n in r0["norms"]), r0["norms"]
    assert results[1]["norms"] == r0["norms"]
    assert r0["norms"] == pytest.approx(r0["accelerate_norms"], rel=1e-6)
    # float64, one process, torch's clip, over the samples each optimizer step saw
    data = _data(world)
    per_rank = [data[r::world] for r in range(world)]
    net = _net().double()
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    ref_norms = []
    for s in range(STEPS):
        batch = torch.cat([per_rank[r][s * ACCUM * B : (s + 1) * ACCUM * B] for r in range(world)]).double()
        opt.zero_grad()
        _loss(net, batch).backward()
        ref_norms.append(float(torch.nn.utils.clip_grad_norm_(net.parameters(), MAX_NORM)))
        opt.step()
    assert r0["norms"] == pytest.approx(ref_norms, rel=1e-5)
    for name, p in net.named_parameters():
        for r in results:
            torch.testing.assert_close(torch.from_numpy(r["params"][name]), p.detach(), rtol=1e-5, atol=1e-6, msg=name)
