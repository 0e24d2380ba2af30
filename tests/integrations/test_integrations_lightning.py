"""distclip.integrations.lightning.GradientClipping with a real ``lightning.Trainer`` on CPU.

Each world runs real Trainers inside an already initialised gloo world (tests/harness.py; the
env vars make Lightning treat the processes as launched externally), and compares the trained
parameters with a float64 single-process reference trained with torch's own clip.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from harness import run_world

if os.environ.get("DISTCLIP_REQUIRE_INTEGRATIONS") == "1":
    import lightning  # noqa: F401  - in CI a missing package is a failure, not a skip
else:
    pytest.importorskip("lightning", reason="lightning is not installed (pip install 'distclip[lightning]')")

D, H, B = 8, 16, 4  # features, hidden, per-rank micro-batch
MAX_NORM = 0.05  # small enough that every step clips
LR = 0.5


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1, self.w2 = nn.Linear(D, H), nn.Linear(H, D)
        self.norm, self.head = nn.LayerNorm(D), nn.Linear(D, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.w2(torch.relu(self.w1(x))))).squeeze(-1)


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = _Net()
    with torch.no_grad():  # a LayerNorm that is not the identity, so its grads matter
        net.norm.weight.uniform_(0.5, 1.5)
        net.norm.bias.uniform_(-0.5, 0.5)
    return net


def _data(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, D + 1, generator=g)


def _loss(net: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    x, y = batch[:, :D], batch[:, D]
    return ((net(x) - y) ** 2).mean()


def reference(step_batches: list[torch.Tensor], clip: bool = True) -> tuple[dict[str, torch.Tensor], list[float]]:
    """One process, float64, torch's clip: one SGD step per entry of ``step_batches``; the
    parameters after the last step and the pre-clip norm of every step."""
    net = _net().double()
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    norms = []
    for batch in step_batches:
        opt.zero_grad()
        _loss(net, batch.double()).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(net.parameters(), MAX_NORM if clip else float("inf"))))
        opt.step()
    return {n: p.detach() for n, p in net.named_parameters()}, norms


def _assert_params(results: list, ref: dict[str, torch.Tensor]) -> None:
    assert ref.keys() == results[0]["params"].keys()
    for name, expected in ref.items():
        for r in results:
            torch.testing.assert_close(torch.from_numpy(r["params"][name]), expected, rtol=1e-5, atol=1e-6, msg=name)


def _make_module(parallel: bool):
    import lightning.pytorch as pl

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _net()
            self.clip_calls = 0

        def configure_model(self) -> None:
            # Lightning calls it again for trainer.test(): parallelize once, as its docs advise
            if not parallel or getattr(self, "_parallelized", False):
                return
            self._parallelized = True
            from torch.distributed.fsdp import fully_shard
            from torch.distributed.tensor.parallel import (
                ColwiseParallel,
                RowwiseParallel,
                parallelize_module,
            )

            mesh = self.device_mesh
            parallelize_module(self.net, mesh["tensor_parallel"], {"w1": ColwiseParallel(), "w2": RowwiseParallel()})
            # norm and head are not tensor-parallel: after fully_shard they live on the dp mesh
            # only, beside w1/w2 on the 2-D mesh. torch's clip_grad_norm_ cannot mix them.
            for name in ("w1", "w2", "head"):
                fully_shard(getattr(self.net, name), mesh=mesh["data_parallel"])
            fully_shard(self.net, mesh=mesh["data_parallel"])

        def training_step(self, batch, batch_idx):
            return _loss(self.net, batch)

        def test_step(self, batch, batch_idx):
            return _loss(self.net, batch)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=LR)

    return Net()


def _full_params(module) -> dict:
    """Full parameters as numpy arrays (pickled by value: tensors would travel as shared memory
    that vanishes with the process)."""
    out = {}
    for name, p in module.net.named_parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name] = t.detach().double().numpy().copy()
    return out


def _fit(module, callbacks, n_samples, world, dp_rank, dp_size, **trainer_kwargs):
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    kwargs = {
        "accelerator": "cpu",
        "devices": world,
        "callbacks": callbacks,
        "max_epochs": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "use_distributed_sampler": False,  # each data-parallel rank reads samples dp_rank::dp_size, in order
    }
    trainer = pl.Trainer(**{**kwargs, **trainer_kwargs})
    trainer.fit(module, DataLoader(_data(n_samples)[dp_rank::dp_size], batch_size=B, shuffle=False))
    return trainer


def _externally_launched(rank: int, world: int) -> None:
    # Lightning's LightningEnvironment: LOCAL_RANK set means the processes exist already; the
    # harness initialised the gloo world, so Lightning skips init_process_group.
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(world), RANK=str(rank))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29555")


class _CountingClip:
    """GradientClipping that also records each norm (one entry per optimizer step)."""

    @staticmethod
    def make(**kwargs):
        from distclip.integrations.lightning import GradientClipping

        class Counting(GradientClipping):
            norms: list[float]

            def on_before_optimizer_step(self, trainer, pl_module, optimizer):
                super().on_before_optimizer_step(trainer, pl_module, optimizer)
                self.norms.append(float(self.last_norm))

        cb = Counting(MAX_NORM, **kwargs)
        cb.norms = []
        return cb


def model_parallel_world(rank, world):
    from lightning.pytorch.strategies import ModelParallelStrategy

    _externally_launched(rank, world)
    strategy = lambda: ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=2)
    n = 2 * 2 * B  # 2 dp ranks x 2 steps x B

    # 1. Lightning's own norm clipping raises on the mixed meshes.
    try:
        _fit(_make_module(True), [], n, world, rank // 2, 2, strategy=strategy(), gradient_clip_val=MAX_NORM, max_steps=1)
        lightning_own = "no error"
    except Exception as e:  # noqa: BLE001
        lightning_own = f"{type(e).__name__}: {e}"

    # 2. Both clippings at once: refused at setup, on every rank.
    from distclip.integrations.lightning import GradientClipping

    try:
        _fit(_make_module(True), [GradientClipping(MAX_NORM)], n, world, rank // 2, 2, strategy=strategy(), gradient_clip_val=1.0)
        double = "no error"
    except ValueError as e:
        double = str(e)

    # 3. GradientClipping trains correctly.
    module = _make_module(True)
    cb = _CountingClip.make()
    trainer = _fit(module, [cb], n, world, rank // 2, 2, strategy=strategy())
    meshes = {tuple(p.device_mesh.mesh_dim_names) for p in module.parameters()}
    params = _full_params(module)

    # 4. fit, then test: Lightning moves the model (``model.to(root_device)``), which swaps every
    # DTensor parameter; distclip must have left nothing on them that swap_tensors refuses.
    from torch.utils.data import DataLoader

    try:
        trainer.test(module, DataLoader(_data(n)[rank // 2 :: 2], batch_size=B, shuffle=False), verbose=False)
        tested = "ok"
    except Exception as e:  # noqa: BLE001
        tested = f"{type(e).__name__}: {e}"
    return {"lightning_own": lightning_own, "double": double, "norms": cb.norms, "params": params, "meshes": meshes,
            "tested": tested}


def test_model_parallel_tp_fsdp2_mixed_meshes():
    results = run_world(model_parallel_world, 4, timeout=400)
    r0 = results[0]
    # the layout under test really mixes meshes
    assert r0["meshes"] == {("data_parallel",), ("data_parallel", "tensor_parallel")}, r0["meshes"]
    # Lightning's own clipping fails here, on every rank
    for r in results:
        assert r["lightning_own"] != "no error", r["lightning_own"]
        assert "mesh" in r["lightning_own"].lower(), r["lightning_own"]
        assert "gradient_clip_val" in r["double"], r["double"]
        assert r["tested"] == "ok", r["tested"]  # fit then test with the callback
    # two optimizer steps, the same norm on every rank, clipping active
    assert len(r0["norms"]) == 2 and all(n > MAX_NORM for n in r0["norms"]), r0["norms"]
    assert all(r["norms"] == r0["norms"] for r in results)
    # the update equals one process in float64 with torch's clip; dp rank r read samples
    # r, r+2, ..., so step s used samples [2*B*s, 2*B*(s+1)) in total
    data = _data(2 * 2 * B)
    ref, ref_norms = reference([data[: 2 * B], data[2 * B :]])
    assert r0["norms"] == pytest.approx(ref_norms, rel=1e-5)
    _assert_params(results, ref)
    # the comparison can fail: unclipped training ends far outside the tolerance
    unclipped, _ = reference([data[: 2 * B], data[2 * B :]], clip=False)
    assert all(not torch.allclose(unclipped[n], ref[n], rtol=1e-3, atol=1e-4) for n in ref)


def ddp_world(rank, world, logdir):
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.plugins import MixedPrecision

    _externally_launched(rank, world)
    accumulate, steps = 2, 2
    n = world * accumulate * steps * B
    module = _make_module(False)
    cb = _CountingClip.make()
    _fit(module, [cb], n, world, rank, world, strategy="ddp", accumulate_grad_batches=accumulate)
    # fp16 AMP (a GradScaler on CPU) with a logger: the clipped norm is the unscaled one, logged
    amp_cb = _CountingClip.make(log_group_norms=True, groups=lambda name: name.split(".")[1])  # net.<layer>.*
    trainer = _fit(
        _make_module(False), [amp_cb], n, world, rank, world, strategy="ddp", accumulate_grad_batches=accumulate,
        # Trainer(precision="16-mixed") falls back to bf16 (no scaler) on CPU: ask for fp16 + a scaler
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**12))],
        logger=CSVLogger(logdir), log_every_n_steps=1,
    )
    scaler = trainer.precision_plugin.scaler
    return {
        "norms": cb.norms,
        "params": _full_params(module),
        "amp_norms": amp_cb.norms,
        "amp_scale": float(scaler.get_scale()) if scaler is not None else None,
        "logged": {k: float(v) for k, v in trainer.logged_metrics.items() if k.startswith("grad_norm")},
    }


def test_ddp_with_gradient_accumulation_amp_and_logging(tmp_path):
    world, accumulate, steps = 2, 2, 2
    results = run_world(ddp_world, world, str(tmp_path), timeout=300)
    r0 = results[0]
    # one clip per optimizer step, not per micro-batch
    assert len(r0["norms"]) == steps and all(n > MAX_NORM for n in r0["norms"]), r0["norms"]
    assert results[1]["norms"] == r0["norms"]
    data = _data(world * accumulate * steps * B)
    # rank r reads samples r, r+world, ...; its micro-batch j is the j-th B of those
    per_rank = [data[r::world] for r in range(world)]
    step_batches = [
        torch.cat([per_rank[r][(s * accumulate + j) * B : (s * accumulate + j + 1) * B] for r in range(world) for j in range(accumulate)])
        for s in range(steps)
    ]
    ref, ref_norms = reference(step_batches)
    assert r0["norms"] == pytest.approx(ref_norms, rel=1e-5)
    _assert_params(results, ref)
    # AMP: a real GradScaler scaled the loss (scale >> 1), yet the clipped norm is the unscaled
    # one (fp16 forward: loose tolerance), so the clip ran after unscale_; and it was logged
    assert r0["amp_scale"] is not None and r0["amp_scale"] >= 2.0**10, r0["amp_scale"]
    assert r0["amp_norms"] == pytest.approx(ref_norms, rel=2e-2), (r0["amp_norms"], ref_norms)
    assert results[1]["amp_norms"] == r0["amp_norms"]
    logged = r0["logged"]
    assert logged["grad_norm"] == pytest.approx(r0["amp_norms"][-1], rel=1e-6)
    # per-layer norms (distclip.grad_norms, same collective) add up to the total
    layers = {"grad_norm/w1", "grad_norm/w2", "grad_norm/norm", "grad_norm/head"}
    assert set(logged) == layers | {"grad_norm"}, logged
    assert sum(logged[k] ** 2 for k in layers) ** 0.5 == pytest.approx(logged["grad_norm"], rel=1e-5)
    assert (tmp_path / "lightning_logs").exists()


def test_import_distclip_imports_no_trainer():
    import subprocess
    import sys

    code = (
        "import sys, distclip, distclip.integrations; "
        "bad = [m for m in ('lightning', 'pytorch_lightning', 'torchtitan', 'accelerate') if m in sys.modules]; "
        "assert not bad, bad"
    )
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
