"""Guarded steps: an adaptive (ZClip) threshold, and spikes and NaNs skipped on every rank.

    torchrun --standalone --nproc_per_node=2 examples/guarded_training.py [--steps 120] [--out guarded_training.png]

A small regression MLP sharded with FSDP2, trained with AdamW. ``distclip.GradGuard`` measures
the global gradient norm (one all-reduce, as ``distclip.clip_grad_norm_``), clips at a threshold
that adapts to the norm's running mean and variance (ZClip's z-score rule), and skips the step on
every rank when the norm is a spike (z > ``skip_above``) or non-finite. Two bad batches are
injected, each on one rank only: a corrupted batch (labels x1000) on the last rank at step 70,
and a NaN on rank 0 at step 90. Every rank skips both steps (parameters and AdamW state are
checked to be unchanged), ``out.nonfinite`` names the NaN's parameters on every rank, and training
goes on. Rank 0 plots the norm and the threshold over the steps (``--out``, a PNG; needs
matplotlib, else the plot is skipped) and prints ``OK: guarded_training`` last.
"""

import argparse
import math
import os

import torch
import torch.distributed as dist
from torch import nn

import distclip

SPIKE_STEP, NAN_STEP = 70, 90
MAX_NORM = 5.0


def batch(step, rank, world):
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(16, 8, generator=g)
    y = x[:, :2].sum(-1, keepdim=True) - x[:, 2:4].prod(-1, keepdim=True) + 0.1 * torch.randn(16, 1, generator=g)
    if step == SPIKE_STEP and rank == world - 1:
        y = y * 1000.0  # a corrupted batch on one rank (bad labels): a gradient spike
    if step == NAN_STEP and rank == 0:
        x[3, 5] = math.nan  # a NaN in one rank's data
    return x, y


def snapshot(model, opt):
    params = [p.detach().to_local().clone() for p in model.parameters()]
    state = [v.to_local().clone() if hasattr(v, "to_local") else v.clone() for s in opt.state.values() for v in s.values()]
    return params + state


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--out", default="guarded_training.png", help="where rank 0 saves the plot")
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))
    for layer in (model[0], model[2], model[4]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    # ZClip: 25 warm-up steps at MAX_NORM, then clipped at an adaptive threshold when z > 2.5; skipped when z > 6
    guard = distclip.GradGuard(max_norm=MAX_NORM, adaptive="zclip", skip_above=6.0)

    norms, thresholds, skipped, losses = [], [], [], []
    for step in range(args.steps):
        x, y = batch(step, rank, world)
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        before = snapshot(model, opt) if step in (SPIKE_STEP, NAN_STEP) else None
        out = guard.clip_(model)  # every rank: one all-reduce; the same decisions everywhere
        guard.step(opt)  # opt.step() unless out.skip
        opt.zero_grad()
        if bool(out.skip):
            skipped.append(step)
            if rank == 0:
                reason = f"non-finite grads in {out.nonfinite}" if out.nonfinite else f"spike, norm {float(out.total_norm):.3g}"
                print(f"step {step}: skipped on every rank ({reason})")
        if before is not None:
            after = snapshot(model, opt)
            assert all(torch.equal(a, b) for a, b in zip(before, after)), f"step {step} changed the model"
        norms.append(float(out.total_norm))
        thresholds.append(float(out.threshold))
        losses.append(float(loss.detach()) if math.isfinite(float(loss.detach())) else math.nan)

    assert SPIKE_STEP in skipped and NAN_STEP in skipped, skipped
    assert len(skipped) <= 4, skipped  # the guard skips the bad steps, not the training
    every = [None] * world
    dist.all_gather_object(every, (skipped, [t.hex() for t in thresholds]))
    assert all(e == every[0] for e in every), "ranks decided differently"
    adaptive = [s for s, t in enumerate(thresholds) if t < MAX_NORM and s not in skipped]
    assert adaptive, "the adaptive threshold never clipped"
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < first, (first, last)
    if rank == 0:
        print(f"{args.steps} steps on {world} ranks: skipped {skipped}; clipped at the adaptive threshold at steps "
              f"{adaptive}; loss {first:.3f} -> {last:.3f}")
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib is not installed: no plot")
        else:
            fig, ax = plt.subplots(figsize=(8, 4))
            steps = range(len(norms))
            shown = [n if math.isfinite(n) else float("nan") for n in norms]
            ax.semilogy(steps, shown, label="global grad norm (before clipping)", lw=1)
            ax.semilogy(steps, thresholds, label=f"threshold applied (ZClip, cap {MAX_NORM})", lw=1.5)
            ax.scatter(adaptive, [thresholds[s] for s in adaptive], s=12, color="C1", zorder=3, label="clipped adaptively")
            ax.axvspan(0, 24, color="grey", alpha=0.12, label="ZClip warm-up (threshold = cap)")
            for s in skipped:
                ax.axvline(s, color="red", alpha=0.4, lw=1)
                ax.annotate("NaN: skipped" if not math.isfinite(norms[s]) else "spike: skipped", (s, 0.5), color="red", rotation=90, fontsize=8)
            ax.set_xlabel("step")
            ax.set_title(f"GradGuard on {world} ranks (FSDP2): skipped steps in red")
            ax.legend(loc="upper right", fontsize=8)
            fig.tight_layout()
            fig.savefig(args.out, dpi=110)
            print(f"plot saved to {os.path.abspath(args.out)}")
        print("OK: guarded_training")
    # Every rank is done with gloo before any rank tears it down: a rank that destroys its group
    # while another still works (rank 0's plot) can abort with "terminate called without an
    # active exception" (a gloo teardown race).
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
