"""Pipeline parallel (torch.distributed.pipelining, GPipe) x FSDP2, clipped with ``pp_group``.

    torchrun --standalone --nproc_per_node=4 examples/pipeline_fsdp2.py [--steps 3]

Ranks form a (pp, dp) mesh: each pipeline stage holds half of the layers, FSDP2-sharded over its
dp ranks. Each stage sees only its own gradients, so clipping each stage by its own norm (what
``torch.nn.utils.clip_grad_norm_`` does) uses a different coefficient on every stage. distclip
sums the partials across ``pp_group`` and every rank of every stage scales by the same number.
Rank 0 checks the norm against the whole model trained on one process with torch's clip.
"""

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

import distclip

DIM, BATCH, MICROBATCHES = 16, 16, 2  # BATCH: global batch, split over the dp ranks


def full_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(DIM, DIM), nn.ReLU(), nn.LayerNorm(DIM),  # stage 0
        nn.Linear(DIM, DIM), nn.ReLU(), nn.Linear(DIM, 1),  # stage 1
    )


def batches(steps):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(BATCH, DIM, generator=g), torch.randn(BATCH, 1, generator=g)) for _ in range(steps)]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--max-norm", type=float, default=0.2)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("pp", "dp"))
    stage_id, dp_rank, dp_size = mesh["pp"].get_local_rank(), mesh["dp"].get_local_rank(), mesh["dp"].size()

    layers = list(full_model())
    stage_module = nn.Sequential(*(layers[:3] if stage_id == 0 else layers[3:]))
    fully_shard(stage_module, mesh=mesh["dp"])
    stage = PipelineStage(stage_module, stage_id, 2, torch.device("cpu"), group=mesh["pp"].get_group())
    schedule = ScheduleGPipe(stage, MICROBATCHES, loss_fn=nn.functional.mse_loss)  # grads averaged over microbatches
    opt = torch.optim.SGD(stage_module.parameters(), lr=0.1)

    norms = []
    for x, y in batches(args.steps):
        x, y = x.chunk(dp_size)[dp_rank], y.chunk(dp_size)[dp_rank]
        opt.zero_grad()
        if stage_id == 0:
            schedule.step(x)
        else:
            schedule.step(target=y)
        norm = distclip.clip_grad_norm_(stage_module, args.max_norm, pp_group=mesh["pp"])
        norms.append(float(norm))
        opt.step()

    every_rank = [None] * world
    dist.all_gather_object(every_rank, norms)
    assert all(n == norms for n in every_rank), f"norms differ across ranks: {every_rank}"
    if rank == 0:
        for step, n in enumerate(norms):
            print(f"step {step}: grad norm {n:.6f} (identical on all {world} ranks, both stages)")
        model = full_model()
        ref_opt = torch.optim.SGD(model.parameters(), lr=0.1)
        reference = []
        for x, y in batches(args.steps):
            ref_opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            reference.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_norm)))
            ref_opt.step()
        print(f"one-process reference (torch's clip): {[round(n, 6) for n in reference]}")
        for ours, ref in zip(norms, reference):
            assert abs(ours - ref) <= 1e-5 * ref, (norms, reference)
        print("OK: pipeline_fsdp2")
    # Every rank is done with gloo before any rank tears it down: a rank that destroys its group
    # while another still works (rank 0's reference) can abort with "terminate called without an
    # active exception" (a gloo teardown race).
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
