"""Mixture of experts with expert parallelism, uneven experts and a rank that holds none.

    torchrun --standalone --nproc_per_node=3 examples/moe_expert_parallel.py [--steps 3]

Experts are plain tensors spread over the expert-parallel group (here the world): with 3 experts
on 3 ranks as [2, 1, 0], the last rank holds no expert at all (it still calls clip, which issues
its one collective). ``distclip.mark_sharded(p, group)`` says "this expert is one disjoint piece of
the model across ``group``"; the router and the output layer are replicated and need nothing.
Every rank sees the same tokens (experts in a tensor-parallel region): each rank runs its own
experts and one all-reduce sums the expert outputs. Rank 0 checks the norm against all experts on
one process with torch's clip.
"""

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn

import distclip

DIM, HIDDEN, TOKENS, EXPERTS = 16, 32, 24, 3


class SumAcrossRanks(torch.autograd.Function):
    """Forward: all-reduce (sum) the expert outputs. Backward: identity, because every rank
    computes the same loss from the same summed output."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad


class MoE(nn.Module):
    def __init__(self, expert_ids, distributed):
        super().__init__()
        torch.manual_seed(0)
        all_experts = [nn.Sequential(nn.Linear(DIM, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, DIM)) for _ in range(EXPERTS)]
        self.router = nn.Linear(DIM, EXPERTS)
        self.out = nn.Linear(DIM, 1)
        self.expert_ids = list(expert_ids)
        self.experts = nn.ModuleList(all_experts[i] for i in self.expert_ids)
        self.distributed = distributed

    def forward(self, x):
        gates = torch.softmax(self.router(x), dim=-1)
        top = gates.argmax(dim=-1)
        # each rank fills the rows of its own experts (top-1 routing: only the routed tokens)
        rows = [torch.zeros_like(x) for _ in range(EXPERTS)]
        for i, expert in zip(self.expert_ids, self.experts):
            routed = top == i
            rows[i] = torch.zeros_like(x).index_put((routed.nonzero().squeeze(-1),), expert(x[routed]))
        expert_out = torch.stack(rows)
        if self.distributed:
            expert_out = SumAcrossRanks.apply(expert_out)  # every rank now holds every expert's output
        # the gating is computed on every rank from the same tensors: router grads stay replicated
        y = (gates.t().unsqueeze(-1) * expert_out).sum(0)
        return self.out(x + y).squeeze(-1)


def batches(steps):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(TOKENS, DIM, generator=g), torch.randn(TOKENS, generator=g)) for _ in range(steps)]


def train(model, data, clip, max_norm):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    norms = []
    for x, y in data:
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        norms.append(float(clip(model, max_norm)))
        opt.step()
    return norms


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--max-norm", type=float, default=0.1)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    ep_group = dist.group.WORLD
    # uneven: rank 0 holds experts [0, 1], rank 1 holds [2], ranks 2.. hold none
    owner = [0, 0, 1] if world >= 2 else [0, 0, 0]
    mine = [i for i in range(EXPERTS) if owner[i] == rank]
    model = MoE(mine, distributed=True)
    for p in model.experts.parameters():
        distclip.mark_sharded(p, ep_group)  # once, after building the model

    norms = train(model, batches(args.steps), distclip.clip_grad_norm_, args.max_norm)

    every_rank = [None] * world
    dist.all_gather_object(every_rank, norms)
    assert all(n == norms for n in every_rank), f"norms differ across ranks: {every_rank}"
    print(f"rank {rank}: experts {mine}, norms {[round(n, 6) for n in norms]}")
    if rank == 0:
        reference = train(
            MoE(range(EXPERTS), distributed=False), batches(args.steps),
            lambda m, c: torch.nn.utils.clip_grad_norm_(m.parameters(), c), args.max_norm,
        )
        print(f"one-process reference (torch's clip): {[round(n, 6) for n in reference]}")
        for ours, ref in zip(norms, reference):
            assert abs(ours - ref) <= 1e-5 * ref, (norms, reference)
        print("OK: moe_expert_parallel")
    # Every rank is done with gloo before any rank tears it down: a rank that destroys its group
    # while another still works (rank 0's reference) can abort with "terminate called without an
    # active exception" (a gloo teardown race).
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
