"""GradGuard inside the trainer integrations, in one 2-rank gloo world:

- Lightning (DDP, gradient accumulation): ``GradientClipping(guard=...)`` skips the optimizer
  step on both ranks when one rank's grads hold a NaN or a x1e6 spike, with Adam (grads set to
  None for the step), fused AdamW on the accelerator path (``found_inf``, no host read) and fp16
  AMP with a GradScaler; the parameters and optimizer state are bitwise unchanged on skipped
  steps and changed on the others; one guard step per optimizer step; threshold and skip logged.
- torchtitan: the adapter's ``guard=`` on FSDP2 with torchtitan's own ``OptimizersContainer``
  (two fused optimizers), stepped through ``guard.step(container)``, on both paths.
"""

from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch
from torch import nn

from harness import run_world

REQUIRE = os.environ.get("DISTCLIP_REQUIRE_INTEGRATIONS") == "1"
HAVE = {name: importlib.util.find_spec(name) is not None for name in ("lightning", "torchtitan")}
SKIPPED = {3, 5}  # optimizer steps: a NaN on rank 1 at step 3, a x1e6 spike on rank 0 at step 5


def _require(name: str) -> None:
    if not HAVE[name]:
        if REQUIRE:
            pytest.fail(f"{name} is not installed but DISTCLIP_REQUIRE_INTEGRATIONS=1")
        pytest.skip(f"{name} is not installed (pip install 'distclip[{name}]')")


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def _snapshot(params, optimizers):
    p = [_local(x.detach()).clone() for x in params]
    s = [(k, _local(v).clone()) for o in optimizers for st in o.state.values() for k, v in sorted(st.items())]
    return p, s


def _same(a, b) -> bool:
    (pa, sa), (pb, sb) = a, b
    return (len(pa) == len(pb) and all(torch.equal(x, y) for x, y in zip(pa, pb))
            and [k for k, _ in sa] == [k for k, _ in sb] and all(torch.equal(x, y) for (_, x), (_, y) in zip(sa, sb)))


def _lightning_part(rank: int, world: int, logdir: str) -> dict:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.plugins import MixedPrecision
    from torch.utils.data import DataLoader

    import distclip
    from checks import host_reads
    from distclip.integrations.lightning import GradientClipping

    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(world), RANK=str(rank))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29556")

    class Inject(pl.Callback):  # before GradientClipping in the callback list: after AMP unscaling
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            step = trainer.global_step
            w = pl_module.net[0].weight
            if step == 3 and rank == 1:
                w.grad[0, 0] = math.nan
            if step == 5 and rank == 0:
                w.grad[1, 1] *= 1e6

    class Record(pl.Callback):  # after GradientClipping: the step that follows is the guarded one
        def __init__(self):
            self.rows, self.pending = [], None

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.pending = (trainer.global_step, _snapshot(list(pl_module.parameters()), [optimizer]), optimizer)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if self.pending is not None:
                step, before, optimizer = self.pending
                self.rows.append((step, _same(before, _snapshot(list(pl_module.parameters()), [optimizer]))))
                self.pending = None

    class Net(pl.LightningModule):
        def __init__(self, fused: bool):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 1))
            self.fused = fused

        def training_step(self, batch, batch_idx):
            return (self.net(batch[:, :6]).squeeze(-1) - batch[:, 6]).pow(2).mean()

        def configure_optimizers(self):
            if self.fused:
                return torch.optim.AdamW(self.parameters(), lr=1e-2, fused=True)
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    data = torch.randn(world * 2 * 7 * 4, 7, generator=torch.Generator().manual_seed(1))
    out = {}
    for name, fused, mode, amp in (("adam", False, "auto", False), ("fused_never", True, "never", False), ("amp", False, "auto", True)):
        guard = distclip.GradGuard(1.0, adaptive="zclip", warmup_steps=2, skip_above=6.0)
        record = Record()
        clipping = GradientClipping(guard=guard)
        kwargs: dict = dict(accelerator="cpu", devices=world, strategy="ddp", max_steps=7, accumulate_grad_batches=2,
                            callbacks=[Inject(), clipping, record], enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, num_sanity_val_steps=0, use_distributed_sampler=False,
                            logger=CSVLogger(logdir) if name == "adam" else False, log_every_n_steps=1)
        if amp:
            kwargs["plugins"] = [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10))]
        with host_reads(mode):
            trainer = pl.Trainer(**kwargs)
            trainer.fit(Net(fused), DataLoader(data[rank::world], batch_size=4, shuffle=False))
        out[name] = {"rows": record.rows, "calls": guard.calls, "global_step": trainer.global_step,
                     "skip_host": clipping.last_output is not None and clipping.last_output.skip_on_host is not None,
                     "logged": sorted(k for k in trainer.logged_metrics if k.startswith("grad_norm")),
                     "found_inf_left": any(hasattr(o, "found_inf") for o in trainer.optimizers)}
    return out


def _torchtitan_part(rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torchtitan.components.optimizer.optimizer import OptimizersContainer, ParamGroupConfig

    import distclip
    from checks import host_reads
    from distclip.integrations.torchtitan import clip_grad_norm_

    out = {}
    for mode in ("auto", "never"):
        mesh = init_device_mesh("cpu", (world,))
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
        for m in (model[0], model[2], model):
            fully_shard(m, mesh=mesh)
        config = OptimizersContainer.Config(param_groups=[
            ParamGroupConfig(pattern=r"\.bias$", optimizer_name="Adam", optimizer_kwargs={"lr": 1e-2}),
            ParamGroupConfig(pattern=r".*", optimizer_name="AdamW", optimizer_kwargs={"lr": 1e-2})], implementation="fused")
        optimizers = OptimizersContainer(config, model_parts=[model])
        guard = distclip.GradGuard(1.0, adaptive="zclip", warmup_steps=2, skip_above=6.0)
        rows = []
        with host_reads(mode):
            for step in range(8):
                model(torch.randn(4, 8, generator=torch.Generator().manual_seed(10 * step + rank))).pow(2).mean().backward()
                if step == 3 and rank == 1:
                    _local(model[0].weight.grad)[0, 0] = math.nan
                if step == 5 and rank == 0:
                    _local(model[2].weight.grad).view(-1)[0] *= 1e6
                before = _snapshot(list(model.parameters()), optimizers.optimizers)
                norm = clip_grad_norm_(list(model.parameters()), 1.0, foreach=True, guard=guard)
                guard.step(optimizers)
                rows.append((step, _same(before, _snapshot(list(model.parameters()), optimizers.optimizers)), float(norm),
                             guard.last is not None and guard.last.skip_on_host is not None))
                optimizers.zero_grad()
        try:
            clip_grad_norm_(list(model.parameters()), 2.0, guard=guard)
            mismatch = "no error"
        except ValueError as e:
            mismatch = str(e)
        out[mode] = {"rows": rows, "mismatch": mismatch, "n_optimizers": len(optimizers.optimizers)}
    return out


def _world(rank: int, world: int, logdir: str) -> dict:
    out = {}
    if HAVE["torchtitan"]:
        out["torchtitan"] = _torchtitan_part(rank, world)
    if HAVE["lightning"]:
        out["lightning"] = _lightning_part(rank, world, logdir)
    return out


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    if not any(HAVE.values()):
        pytest.skip("neither lightning nor torchtitan is installed")
    return run_world(_world, 2, str(tmp_path_factory.mktemp("guard_logs")), timeout=400)


@pytest.mark.parametrize("variant", ["adam", "fused_never", "amp"])
def test_lightning_gradient_clipping_with_guard(world2, variant):
    _require("lightning")
    for rank, res in enumerate(world2):
        r = res["lightning"][variant]
        steps = [s for s, _ in r["rows"]]
        assert steps == list(range(7)), (rank, r["rows"])  # one guarded step per optimizer step (accumulation 2)
        assert r["calls"] == r["global_step"] == 7
        for step, same in r["rows"]:
            assert same == (step in SKIPPED), (rank, variant, step)
        assert r["skip_host"] == (variant != "fused_never")
        assert not r["found_inf_left"]
        if variant == "adam":
            assert {"grad_norm", "grad_norm/threshold", "grad_norm/skipped"} <= set(r["logged"]), r["logged"]


@pytest.mark.parametrize("mode", ["auto", "never"])
def test_torchtitan_adapter_with_guard_and_optimizers_container(world2, mode):
    _require("torchtitan")
    for rank, res in enumerate(world2):
        r = res["torchtitan"][mode]
        assert r["n_optimizers"] == 2
        for step, same, norm, skip_host in r["rows"]:
            assert same == (step in SKIPPED), (rank, step)
            assert math.isfinite(norm) == (step != 3), (step, norm)
            assert skip_host == (mode == "auto")
        assert "differ from the guard" in r["mismatch"], r["mismatch"]
    norms = [[repr(row[2]) for row in res["torchtitan"][mode]["rows"]] for res in world2]  # repr: NaN == NaN
    assert norms[0] == norms[1]
