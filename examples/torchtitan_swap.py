"""torchtitan's training-loop clip call, with distclip swapped in by one import.

    torchrun --standalone --nproc_per_node=4 examples/torchtitan_swap.py [--steps 3]

torchtitan 0.3.0 clips with ``torchtitan.distributed.utils.clip_grad_norm_``, which stacks
per-tensor norms and raises when parameters live on different meshes (here: tensor-parallel MLP
weights on the 2-D (dp, tp) mesh, LayerNorms and the head on the dp mesh only). The loop below is
torchtitan's (``model_parts``, ``pp_mesh``, ``ep_enabled``), with the import swapped.
"""

import argparse
import os
import warnings

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

# from torchtitan.distributed.utils import clip_grad_norm_     # raises on this model
from distclip.integrations.torchtitan import clip_grad_norm_

DIM, HIDDEN, BATCH = 16, 32, 8


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.norm = nn.LayerNorm(DIM)
        self.w1, self.w2 = nn.Linear(DIM, HIDDEN), nn.Linear(HIDDEN, DIM)
        self.head = nn.Linear(DIM, 4)

    def forward(self, x):
        return self.head(x + self.w2(torch.relu(self.w1(self.norm(x)))))


def main():
    # torch's FSDP2 warns that RowwiseParallel's output (a DTensor's local view) is a view: this
    # model does no in-place op on it.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPLinear\) returned a view tensor")
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--max-norm", type=float, default=1.0)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "tp"))

    model = Model()
    parallelize_module(model, mesh["tp"], {"w1": ColwiseParallel(), "w2": RowwiseParallel()})
    for layer in (model.w1, model.w2, model.head):
        fully_shard(layer, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    model_parts = [model]  # torchtitan's list of pipeline-stage modules on this rank
    pp_mesh, ep_enabled = None, False  # parallel_dims.get_optional_mesh("pp"), parallel_dims.ep_enabled
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)

    try:  # torchtitan's own function on this model, for the record
        from torchtitan.distributed.utils import clip_grad_norm_ as torchtitan_clip

        nn.functional.mse_loss(model(torch.randn(BATCH, DIM)), torch.zeros(BATCH, 4)).backward()
        torchtitan_clip([p for m in model_parts for p in m.parameters()], args.max_norm)
        torchtitan_says = "no error"
    except ImportError:
        torchtitan_says = "torchtitan not installed"
    except RuntimeError as e:
        torchtitan_says = f"raises: {str(e)[:70]}..."

    g = torch.Generator().manual_seed(1)
    norms = []
    for _ in range(args.steps):
        x = torch.randn(BATCH * mesh["dp"].size(), DIM, generator=g).chunk(mesh["dp"].size())[mesh["dp"].get_local_rank()]
        opt.zero_grad()
        nn.functional.mse_loss(model(x), torch.zeros(x.shape[0], 4)).backward()
        grad_norm = clip_grad_norm_(
            [p for m in model_parts for p in m.parameters()],
            args.max_norm,
            foreach=True,
            pp_mesh=pp_mesh,
            ep_enabled=ep_enabled,
        )
        norms.append(grad_norm.item())
        opt.step()

    every_rank = [None] * world
    dist.all_gather_object(every_rank, norms)
    assert all(n == norms for n in every_rank), f"norms differ across ranks: {every_rank}"
    if rank == 0:
        print(f"torchtitan's clip_grad_norm_ on this model: {torchtitan_says}")
        print(f"distclip grad norms {[round(n, 6) for n in norms]} (identical on all {world} ranks)")
        ref_model, g = Model(), torch.Generator().manual_seed(1)
        ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=1e-2)
        reference = []
        for _ in range(args.steps):
            x = torch.randn(BATCH * mesh["dp"].size(), DIM, generator=g)
            ref_opt.zero_grad()
            nn.functional.mse_loss(ref_model(x), torch.zeros(x.shape[0], 4)).backward()
            reference.append(float(torch.nn.utils.clip_grad_norm_(ref_model.parameters(), args.max_norm)))
            ref_opt.step()
        print(f"one-process reference (torch's clip): {[round(n, 6) for n in reference]}")
        for ours, ref in zip(norms, reference):
            assert abs(ours - ref) <= 1e-4 * ref, (norms, reference)
        print("OK: torchtitan_swap")
    # Every rank is done with gloo before any rank tears it down: a rank that destroys its group
    # while another still works (rank 0's reference) can abort with "terminate called without an
    # active exception" (a gloo teardown race).
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
