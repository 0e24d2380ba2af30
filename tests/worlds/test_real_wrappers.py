"""Real wrappers (DDP, FSDP1, fully_shard, parallelize_module, pipelines, MoE, LoRA, sequence
parallel) with a real forward/backward, in spawned gloo worlds of 1, 2 and 4 ranks; a mutant of the
FSDP1 padding rule that the checks must catch; plus AMP under FSDP2."""

import math

import pytest
import torch
import torch.distributed as dist

from harness import run_world

NORMS = (1.0, 2.0, 3.0, math.inf)
NORMS_NON_POSITIVE = (0.5, 0.0, -math.inf, -2.0)  # meaningful because no verify grad is exactly zero


def verify_world(rank, world, impl, layouts, norms=NORMS):
    from distclip import verify

    ctx = verify.Ctx(rank, world, torch.device("cpu"), impl)
    rows = verify.run(ctx, layouts, norms)
    extra = []
    if impl == "distclip" and world == 4 and (layouts is None or "2D TP+FSDP" in layouts):
        extra.append(_strided_shard_is_exercised(ctx))
    if impl == "distclip" and world == 4 and (layouts is None or "TP + SP" in layouts):
        extra.append(_partial_is_exercised(ctx))
    if impl == "distclip" and world == 4 and (layouts is None or "FSDP1 LoRA" in layouts):
        extra.append(_lora_shards_are_mostly_frozen(ctx))
    return [(r.layout, r.norm_type, r.ok, r.detail, r.reference) for r in rows] + extra


def _strided_shard_is_exercised(ctx):
    """2D TP+FSDP with ColwiseParallel on dim 0 yields _StridedShard placements: make sure the
    layout under test really contains them."""
    from torch.distributed.tensor.placement_types import _StridedShard

    from distclip import verify

    built = verify.build_2d(ctx)
    placements = [p.grad.placements for p in built.parameters.parameters() if p.grad is not None]
    found = any(isinstance(pl, _StridedShard) for pls in placements for pl in pls)
    return ("_StridedShard present", 0.0, found, str(placements), 1.0)


def _partial_is_exercised(ctx):
    """TP + SP: the LayerNorm under SequenceParallel must leave Partial DTensor grads (sums over the
    sequence shards), or the layout does not test what it claims."""
    from torch.distributed.tensor.placement_types import Partial

    from distclip import verify

    built = verify.build_tp_sp(ctx)
    placements = {n: p.grad.placements for n, p in built.parameters.named_parameters() if hasattr(p.grad, "placements")}
    norm = [placements.get("norm.weight"), placements.get("norm.bias")]
    found = all(pls is not None and any(isinstance(pl, Partial) for pl in pls) for pls in norm)
    return ("Partial present", 0.0, found, str(placements), 1.0)


def _lora_shards_are_mostly_frozen(ctx):
    """FSDP1 LoRA at 4 ranks: only one rank's shards hold trainable elements; FSDP1's own
    clip_grad_norm_ agrees with the single-process reference (a check of the reference)."""
    from distclip import verify

    built = verify.build_fsdp1_lora(ctx)
    trainable = sum(g.numel() for g in built.local_grads())
    holders = [None] * ctx.world
    dist.all_gather_object(holders, trainable)
    reference = verify.reference_norm(built.reference_grads, 2.0)
    fsdp_norm = float(built.parameters.clip_grad_norm_(float("inf"), 2.0))
    found = sum(n > 0 for n in holders) == 1 and abs(fsdp_norm - reference) <= 1e-6 * reference
    detail = f"trainable local elements per rank {holders}; FSDP1 norm {fsdp_norm}, reference {reference}"
    return ("LoRA shards mostly frozen", 2.0, found, detail, 1.0)


def _expected_layouts(world):
    from distclip import verify

    names = {s.name for s in verify.SCENARIOS if s.allowed(world)}
    if world == 4:
        names |= {"_StridedShard present", "Partial present", "LoRA shards mostly frozen"}
    return names


WORLD_SIZES = (1, 2, 4)


@pytest.fixture(scope="module")
def real_worlds():
    """``real_worlds(n)``: rank 0's rows of the one run of the n-rank world, after checking that
    every rank reports the same rows. A world that fails as a whole fails every test reading it."""
    runs: dict[int, tuple[list | None, str]] = {}

    def get(world_size: int) -> list:
        if world_size not in runs:
            norms = NORMS + (NORMS_NON_POSITIVE if world_size > 1 else ())
            try:
                per_rank = run_world(verify_world, world_size, "distclip", None, norms)
                same = all(rows == per_rank[0] for rows in per_rank)
                runs[world_size] = (per_rank[0], "" if same else "ranks report different outcomes")
            except Exception as e:  # noqa: BLE001 - reported by every test of this world
                runs[world_size] = (None, f"{type(e).__name__}: {e}")
        rows, error = runs[world_size]
        if error:
            pytest.fail(f"the {world_size}-rank world: {error}", pytrace=False)
        return rows

    return get


def _layout_ids():
    return [pytest.param(w, name, id=f"{w}ranks-{name}") for w in WORLD_SIZES for name in sorted(_expected_layouts(w))]


@pytest.mark.parametrize(("world_size", "layout"), _layout_ids())
def test_every_real_layout_matches_reference(real_worlds, world_size, layout):
    rows = [row for row in real_worlds(world_size) if row[0] == layout]
    assert rows, f"no rows for {layout}"
    failures = [row for row in rows if not row[2]]
    assert not failures, failures


@pytest.mark.parametrize("world_size", WORLD_SIZES, ids=lambda w: f"{w}ranks")
def test_every_real_layout_ran(real_worlds, world_size):
    rows = real_worlds(world_size)
    layouts = {row[0] for row in rows}
    assert layouts == _expected_layouts(world_size), layouts
    assert len(layouts) == {1: 13, 2: 20, 4: 23}[world_size], layouts
    # p <= 0 references are not degenerate: no exact-zero grad anywhere (min |g| > 0, negative p > 0)
    trivial = [row for row in rows if row[1] in (-math.inf, -2.0) and not row[4] > 0]
    assert not trivial, trivial


def test_torch_baseline_fails_where_the_field_notes_say():
    """Negative control: the same checks fail for torch.nn.utils.clip_grad_norm_ on pipeline
    stages (each stage clips with its own norm), on the DTensor+plain mix, on the MoE layout and on
    FSDP1 LoRA (each rank clips with its own shard's norm), and pass on DDP, where torch is right.
    Proves the checks can fail."""
    layouts = ["DDP", "TP + plain", "PP x FSDP", "EP uneven experts", "tied embed PP", "FSDP1 LoRA"]
    per_rank = run_world(verify_world, 2, "torch", layouts)
    assert all(rows == per_rank[0] for rows in per_rank), "ranks report different outcomes"
    ok = {}
    for layout, _, passed, _, _ in per_rank[0]:
        ok[layout] = ok.get(layout, True) and passed
    assert ok["DDP"]
    assert not any(ok[name] for name in layouts[1:]), ok


def _fsdp1_padding_mutant_world(rank, world):
    """The FULL_SHARD flat layout with the real FSDP1 rule, then with a mutant that forgets the
    flat parameter's zero padding (counts it as gradient): the p <= 0 checks must catch it."""
    from distclip import _fsdp1, verify

    real = _fsdp1.fsdp1_pieces
    padding: list = []

    def forgets_padding(module):
        found = real(module)
        padding.append(sum(piece.trailing_padding for piece in found.values()))
        return {k: piece._replace(trailing_padding=0) for k, piece in found.items()}

    ctx = verify.Ctx(rank, world, torch.device("cpu"), "distclip")
    norms = (1.0, 2.0, 0.0, -math.inf, -2.0)
    honest = verify.run(ctx, ["FSDP1 FULL_SHARD flat"], norms)
    _fsdp1.fsdp1_pieces = forgets_padding
    try:
        mutant = verify.run(ctx, ["FSDP1 FULL_SHARD flat"], norms)
    finally:
        _fsdp1.fsdp1_pieces = real
    gathered = [None] * world
    dist.all_gather_object(gathered, max(padding, default=0))
    return [(r.norm_type, r.ok) for r in honest], [(r.norm_type, r.ok) for r in mutant], gathered


def test_fsdp1_padding_mutant_is_caught():
    """At 4 ranks the head's flat parameter (18 elements) is padded to 20: the last rank's shard
    ends with 2 zeros. Counting them as gradient leaves p > 0 and p = 0 unchanged (zeros add
    nothing) but makes min |g| = 0 and the negative-p norm 0: those rows must FAIL."""
    honest, mutant, padding = run_world(_fsdp1_padding_mutant_world, 4)[0]
    assert max(padding) > 0, "no rank holds padding: the mutant is not exercised"
    assert all(ok for _, ok in honest), honest
    verdict = dict(mutant)
    assert not verdict[-math.inf] and not verdict[-2.0], mutant
    assert verdict[1.0] and verdict[2.0] and verdict[0.0], mutant


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
