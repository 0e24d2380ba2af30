"""Real wrappers (DDP, FSDP1, fully_shard, parallelize_module, pipelines, MoE) with a real
forward/backward, in spawned gloo worlds of 1, 2 and 4 ranks; plus AMP under FSDP2."""

import math

import pytest
import torch
import torch.distributed as dist

from harness import run_world

NORMS = (1.0, 2.0, 3.0, math.inf)


def verify_world(rank, world, impl, layouts):
    from distclip import verify

    ctx = verify.Ctx(rank, world, torch.device("cpu"), impl)
    rows = verify.run(ctx, layouts, NORMS)
    extra = []
    if impl == "distclip" and world == 4 and (layouts is None or "2D TP+FSDP" in layouts):
        extra.append(_strided_shard_is_exercised(ctx))
    return [(r.layout, r.norm_type, r.ok, r.detail) for r in rows] + extra


def _strided_shard_is_exercised(ctx):
    """2D TP+FSDP with ColwiseParallel on dim 0 yields _StridedShard placements: make sure the
    layout under test really contains them."""
    from torch.distributed.tensor.placement_types import _StridedShard

    from distclip import verify

    built = verify.build_2d(ctx)
    placements = [p.grad.placements for p in built.parameters.parameters() if p.grad is not None]
    found = any(isinstance(pl, _StridedShard) for pls in placements for pl in pls)
    return ("_StridedShard present", 0.0, found, str(placements))


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_every_real_layout_matches_reference(world_size):
    per_rank = run_world(verify_world, world_size, "distclip", None)
    failures = [row for row in per_rank[0] if not row[2]]
    assert not failures, failures
    layouts = {row[0] for row in per_rank[0]}
    assert len(layouts) >= (13 if world_size == 4 else 8 if world_size == 1 else 12), layouts


def test_torch_baseline_fails_where_the_field_notes_say():
    """Negative control: the same checks fail for torch.nn.utils.clip_grad_norm_ on pipeline
    stages (each stage clips with its own norm), on the DTensor+plain mix and on the MoE layout,
    and pass on DDP, where torch is right. Proves the checks can fail."""
    layouts = ["DDP", "TP + plain", "PP x FSDP", "EP uneven experts", "tied embed PP"]
    rows = run_world(verify_world, 2, "torch", layouts)[0]
    ok = {}
    for layout, _, passed, _ in rows:
        ok[layout] = ok.get(layout, True) and passed
    assert ok["DDP"]
    assert not any(ok[name] for name in layouts[1:]), ok


def amp_fsdp2_world(rank, world):
    """The canonical AMP loop with distclip under FSDP2 equals the same loop on one process with
    torch's clip (GradScaler works on CPU)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import distclip
    from distclip import verify

    def train(model, clip, steps=3):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        norms = []
        for _ in range(steps):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = verify.loss_of(model(verify.batch(torch.device("cpu"))))
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            norms.append(float(clip(model)))
            scaler.step(opt)
            scaler.update()
        return norms

    mesh = init_device_mesh("cpu", (world,))
    sharded = verify.new_model(torch.device("cpu"))
    for sub in (sharded.fc1, sharded.fc2, sharded.head):
        fully_shard(sub, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    ours = train(sharded, lambda m: distclip.clip_grad_norm_(m, 1.0))
    reference = train(verify.new_model(torch.device("cpu")), lambda m: torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0))
    for a, b in zip(ours, reference):
        assert abs(a - b) <= 1e-3 * b, (ours, reference)
    final = {n: p.full_tensor() for n, p in sharded.named_parameters()}
    ref_model = verify.new_model(torch.device("cpu"))
    train(ref_model, lambda m: torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0))
    for n, p in ref_model.named_parameters():
        torch.testing.assert_close(final[n], p.detach(), rtol=1e-3, atol=1e-4)
    assert dist.get_world_size() == world
    return ours


def test_amp_grad_scaler_loop_under_fsdp2():
    norms = run_world(amp_fsdp2_world, 2)
    assert norms[0] == norms[1]
    assert all(n > 1.0 for n in norms[0])  # clipping was active


def _fsdp1_params_without_module(rank, world):
    from distclip import verify

    built = verify.build_fsdp1("FULL_SHARD", True)(verify.Ctx(rank, world, torch.device("cpu"), "distclip"))
    try:
        import distclip

        distclip.clip_grad_norm_(built.parameters.parameters(), 1.0)  # the module's params, not the module
        return "no error"
    except TypeError as e:
        return str(e)


def test_fsdp1_parameters_without_their_module_are_rejected_not_miscounted():
    messages = run_world(_fsdp1_params_without_module, 2)
    assert len(set(messages)) == 1 and "FSDP1-managed parameter without its module" in messages[0], messages
