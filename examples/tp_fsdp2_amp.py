"""2-D tensor parallel + FSDP2 with AdamW, bf16 autocast and a GradScaler, clipped by distclip.

    torchrun --standalone --nproc_per_node=4 examples/tp_fsdp2_amp.py [--steps 5] [--tp 2]

The MLP weights are tensor-parallel on the 2-D (dp, tp) mesh; the LayerNorms and the head are only
FSDP-sharded, so they live on the 1-D dp mesh. ``torch.nn.utils.clip_grad_norm_`` raises on such a
model ("All operands in aten.stack.default must have the same mesh"); distclip needs the module
and nothing else. Every step prints the norm, checks it is identical on every rank, and rank 0
checks it against the same training run on one process with torch's clip.
"""

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    parallelize_module,
)

import distclip

DIM, HIDDEN, BATCH = 32, 64, 16  # BATCH: global batch, split over the dp ranks


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.up = nn.Linear(DIM, HIDDEN)
        self.down = nn.Linear(HIDDEN, DIM)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(self.norm(x))))


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.final_norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, 1)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(self.final_norm(x)).sum(-1)  # (B, 1) -> (B,), not a view (FSDP2 warns on views)


def batches(steps):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(BATCH, DIM, generator=g), torch.randn(BATCH, generator=g)) for _ in range(steps)]


def train(model, data, clip, dp_rank=0, dp_size=1, max_norm=0.5):
    """The canonical AMP loop: scale, backward, unscale, clip, step, update."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    norms = []
    for x, y in data:
        x, y = x.chunk(dp_size)[dp_rank], y.chunk(dp_size)[dp_rank]
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.mse_loss(model(x).float(), y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)  # clip the true gradients, not the scaled ones
        norms.append(float(clip(model, max_norm)))
        scaler.step(opt)
        scaler.update()
    return norms


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--tp", type=int, default=2)
    args = parser.parse_args()
    dist.init_process_group("gloo")  # "nccl" + init_device_mesh("cuda", ...) on GPUs
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    mesh = init_device_mesh("cpu", (world // args.tp, args.tp), mesh_dim_names=("dp", "tp"))

    torch.manual_seed(0)
    model = Model()
    for block in model.blocks:
        parallelize_module(block, mesh["tp"], {"up": ColwiseParallel(), "down": RowwiseParallel()})
        fully_shard(block, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    meshes = sorted({p.device_mesh.mesh_dim_names for p in model.parameters()})
    data = batches(args.steps)

    norms = train(model, data, distclip.clip_grad_norm_, mesh["dp"].get_local_rank(), mesh["dp"].size())

    every_rank = [None] * world
    dist.all_gather_object(every_rank, norms)
    assert all(n == norms for n in every_rank), f"norms differ across ranks: {every_rank}"
    if rank == 0:
        print(f"parameter meshes: {meshes}")
        for step, n in enumerate(norms):
            print(f"step {step}: grad norm {n:.6f} (identical on all {world} ranks)")
        torch.manual_seed(0)
        reference = train(Model(), data, lambda m, c: torch.nn.utils.clip_grad_norm_(m.parameters(), c))
        print(f"one-process reference (torch's clip): {[round(n, 6) for n in reference]}")
        for ours, ref in zip(norms, reference):  # bf16 autocast: agree to bf16 precision
            assert abs(ours - ref) <= 3e-2 * ref, (norms, reference)
        print("OK: tp_fsdp2_amp")
    # Every rank is done with gloo before any rank tears it down: a rank that destroys its group
    # while another still works (rank 0's reference) can abort with "terminate called without an
    # active exception" (a gloo teardown race).
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
