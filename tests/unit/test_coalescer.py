"""A plan's remembered coalescing (``local_norms.Coalescer``) returns exactly what ``coalesce``
returns, call after call, as buffers are replaced, offsets move, views become standalone or
non-contiguous; and a plan-driven clip of FSDP2-like views matches the float64 reference."""

from __future__ import annotations

import math

import torch
from torch import nn

import distclip
from distclip.math.partials import Coalescer, coalesce

SIZES = [6, 0, 10, 3, 8]


def _views(buffer: torch.Tensor, sizes=SIZES, gap_after: int = -1) -> list[torch.Tensor]:
    out, at = [], 0
    for i, n in enumerate(sizes):
        out.append(buffer[at : at + n])
        at += n + (2 if i == gap_after else 0)
    return out


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(
        x.data_ptr() == y.data_ptr() and x.shape == y.shape and x.stride() == y.stride() for x, y in zip(a, b)
    )


def test_matches_coalesce_through_every_change():
    c = Coalescer()
    steps = []
    for _ in range(3):  # a new buffer each step, same layout: the remembered runs apply
        steps.append(_views(torch.randn(40)))
    steps.append(_views(torch.randn(40), gap_after=2))  # offsets moved: found anew
    steps.append(_views(torch.randn(40), gap_after=2))
    standalone = _views(torch.randn(40))
    standalone[3] = torch.randn(3)  # a tensor of its own where a view was (offset 0 there)
    steps.append(standalone)
    mixed = _views(torch.randn(40))
    mixed[2] = torch.randn(20)[::2]  # non-contiguous, same size
    steps.append(mixed)
    two = _views(torch.randn(40))
    other = torch.randn(40)
    two[4] = other[19:27]  # same offset and size, but in another base: must not merge
    steps.append(two)
    steps.append(_views(torch.randn(40)))
    for k, tensors in enumerate(steps):
        got, want = c.merge(tensors), coalesce(tensors)
        assert _same(got, want), k
        flat_got = torch.cat([t.flatten() for t in got])
        flat_want = torch.cat([t.flatten() for t in tensors if t.numel()])
        assert torch.equal(flat_got, flat_want), k  # the current values, not a remembered buffer's


def test_plan_driven_clip_of_bucket_views():
    """Grads that are views of one new bucket per step (DDP gradient_as_bucket_view, FSDP2):
    the plan's coalescer merges them; norm and clipped grads match float64 every step."""
    shapes = [(4, 5), (7,), (3, 3), (11,)]
    params = [nn.Parameter(torch.zeros(s)) for s in shapes]
    numel = sum(math.prod(s) for s in shapes)
    for step in range(5):
        bucket = torch.randn(numel, generator=torch.Generator().manual_seed(step)) * (step + 1)
        at = 0
        for p in params:
            n = p.numel()
            p.grad = bucket[at : at + n].view(p.shape)
            at += n
        ref = float(bucket.double().norm())
        total = distclip.clip_grad_norm_(params, max_norm=ref / 3)
        assert math.isclose(float(total), ref, rel_tol=1e-6), step
        clipped = float(torch.cat([p.grad.flatten() for p in params]).double().norm())
        assert math.isclose(clipped, ref / 3, rel_tol=1e-5), step
