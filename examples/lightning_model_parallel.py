"""Lightning ``ModelParallelStrategy`` (FSDP2 + tensor parallel) with distclip's callback.

    torchrun --standalone --nproc_per_node=4 examples/lightning_model_parallel.py [--steps 3]
    python examples/lightning_model_parallel.py --devices 4   # Lightning launches the processes

``Trainer(gradient_clip_val=..., gradient_clip_algorithm="norm")`` calls torch's
``clip_grad_norm_``, which raises here: the MLP is tensor-parallel on the 2-D mesh, the LayerNorm
and the head only on the data-parallel mesh. ``GradientClipping`` clips the whole model with
distclip after AMP unscaling, once per optimizer step, and logs ``grad_norm``. Rank 0 checks
every norm against one process in float64 with torch's clip over the same samples.
"""

import argparse
import warnings

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from distclip.integrations.lightning import GradientClipping

DIM, HIDDEN = 16, 32
SAMPLES, BATCH, ACCUM, DP, MAX_NORM = 64, 4, 2, 2, 0.5  # BATCH: per data-parallel rank and micro-batch


class Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up, self.down = nn.Linear(DIM, HIDDEN), nn.Linear(HIDDEN, DIM)
        self.norm, self.head = nn.LayerNorm(DIM), nn.Linear(DIM, 1)

    def forward(self, x):
        return self.head(self.norm(x + self.down(torch.relu(self.up(x))))).sum(-1)  # (B, 1) -> (B,), not a view

    def configure_model(self):
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor.parallel import (
            ColwiseParallel,
            RowwiseParallel,
            parallelize_module,
        )

        tp, dp = self.device_mesh["tensor_parallel"], self.device_mesh["data_parallel"]
        parallelize_module(self, tp, {"up": ColwiseParallel(), "down": RowwiseParallel()})
        for layer in (self.up, self.down, self.head):
            fully_shard(layer, mesh=dp)
        fully_shard(self, mesh=dp)  # the LayerNorm: on the dp mesh only

    def training_step(self, batch, batch_idx):
        x, y = batch[:, :DIM], batch[:, DIM]
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


class RecordNorms(pl.Callback):
    def __init__(self, clip):
        self.clip, self.norms = clip, []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # runs after GradientClipping's
        self.norms.append(float(self.clip.last_norm))


def dataset():
    return torch.randn(SAMPLES, DIM + 1, generator=torch.Generator().manual_seed(0))


def one_process_norms(steps):
    """The same training in one process, float64: optimizer step ``s`` sees micro-batches ``2s``
    and ``2s+1`` of every data-parallel rank, in the order Lightning's ``DistributedSampler``
    (shuffled, seed 0, over the dp ranks only) gives them; the DP- and accumulation-averaged MSE
    of equal batches is the MSE of their union."""
    data = dataset().double()
    per_rank = [data[list(DistributedSampler(data, num_replicas=DP, rank=r, shuffle=True, seed=0))] for r in range(DP)]
    net = Net().double()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    norms = []
    for s in range(steps):
        batch = torch.cat([shard[s * ACCUM * BATCH : (s + 1) * ACCUM * BATCH] for shard in per_rank])
        opt.zero_grad()
        nn.functional.mse_loss(net(batch[:, :DIM]), batch[:, DIM]).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(net.parameters(), MAX_NORM)))
        opt.step()
    return norms


def main():
    # torch's FSDP2 warns that RowwiseParallel's output (a DTensor's local view) is a view: this
    # model does no in-place op on it.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPLinear\) returned a view tensor")
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--devices", type=int, default=4)
    args = parser.parse_args()
    clip = GradientClipping(max_norm=MAX_NORM)  # instead of Trainer(gradient_clip_val=MAX_NORM)
    record = RecordNorms(clip)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=ModelParallelStrategy(data_parallel_size=DP, tensor_parallel_size=args.devices // DP),
        callbacks=[clip, record],
        max_steps=args.steps,
        accumulate_grad_batches=ACCUM,  # one clip per optimizer step, over the accumulated grads
        logger=pl.loggers.CSVLogger("lightning_logs_example"),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Net(), DataLoader(dataset(), batch_size=BATCH))

    every_rank = [None] * dist.get_world_size()
    dist.all_gather_object(every_rank, record.norms)
    assert len(record.norms) == args.steps, record.norms
    assert all(n == record.norms for n in every_rank), f"norms differ across ranks: {every_rank}"
    if trainer.global_rank == 0:
        print(f"grad norms {[round(n, 6) for n in record.norms]} (identical on all {len(every_rank)} ranks)")
        print(f"logged grad_norm: {float(trainer.logged_metrics['grad_norm']):.6f}")
        reference = one_process_norms(args.steps)
        print(f"one-process float64 reference (torch's clip): {[round(n, 6) for n in reference]}")
        for ours, ref in zip(record.norms, reference):
            assert abs(ours - ref) <= 1e-5 * ref, (record.norms, reference)
        print("OK: lightning_model_parallel")
    # Leave no gloo threads running into interpreter shutdown (which aborts the process:
    # "terminate called without an active exception"), as the other examples do.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
