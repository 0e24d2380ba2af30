"""Scale by simulation: the counting and the collectives for worlds of 1 024 and 16 384 ranks on
3-D and 4-D meshes (pp x dp x tp, with expert parallelism inside dp), without launching them.

For every rank we derive what it holds of each parameter kind and the weight distclip gives it
(``layout.shard_pieces`` / ``element_weight`` / ``stage_copies``, the functions the library itself
uses), then check that the weights of every piece sum to exactly 1 over the ranks holding it; that
every rank builds a reduction of the same op and length; and that the agreement check, reduced
over all ranks, stays quiet when ranks agree and fires when one rank differs.
"""

import math
from collections import defaultdict
from fractions import Fraction
from itertools import product

import pytest
import torch
from torch.distributed.tensor import Replicate, Shard

from distclip import agreement, reduce
from distclip.layout import Stage, element_weight, shard_pieces, stage_copies

CONFIGS = {
    # world: (pp, dp_replicate, dp_shard, tp, ep)  -- ep divides dp_replicate * dp_shard
    1024: (4, 1, 32, 8, 8),
    16384: (8, 16, 8, 16, 16),
}


def _ranks(pp, dr, ds, tp):
    """Row-major rank numbering of a (pp, dp_replicate, dp_shard, tp) mesh."""
    return {coords: i for i, coords in enumerate(product(range(pp), range(dr), range(ds), range(tp)))}


def _held_pieces(coords, config, num_experts):
    """(param, piece id, weight) for everything this rank holds, as distclip weighs it."""
    pp, dr, ds, tp, ep = config
    s, r, d, t = coords
    stage_size = dr * ds * tp
    out = []
    # HSDP x TP matrix: Replicate over dp_replicate, Shard(0) over dp_shard, Shard(1) over tp
    mesh_shape = (dr, ds, tp)
    w = element_weight(shard_pieces(mesh_shape, (Replicate(), Shard(0), Shard(1))), stage_size)
    out.append((("matrix", s), (d, t), w))
    # LayerNorm on the (dp_replicate, dp_shard) sub-mesh: replicated over tp
    w = element_weight(shard_pieces((dr, ds), (Replicate(), Shard(0))), stage_size)
    out.append((("norm", s), (d,), w))
    # plain bias, replicated over the whole stage (DDP-style)
    out.append((("bias", s), (), element_weight(1, stage_size)))
    # experts: num_experts spread over ep ranks of the flattened dp (uneven; some hold none)
    dp_index = r * ds + d
    ep_rank = dp_index % ep
    for e in range(num_experts):
        if e % (ep - 1) == ep_rank:  # uneven, and the last ep rank holds no expert at all
            out.append((("expert", s, e), (t,), element_weight(ep * tp, stage_size)))  # also TP-sharded
    # embedding tied between the first and last stage, vocab-sharded over tp
    if s in (0, pp - 1):
        pp_ranks_of_rank = frozenset(range(pp))  # stage indices stand in for the pp group's ranks
        copies = stage_copies(frozenset({0, pp - 1}), pp_ranks_of_rank)
        out.append((("tied",), (t,), element_weight(tp, stage_size, copies)))
    return out


@pytest.mark.parametrize("world", sorted(CONFIGS))
def test_every_element_counted_exactly_once(world):
    config = CONFIGS[world]
    pp, dr, ds, tp, ep = config
    assert pp * dr * ds * tp == world
    num_experts = 2 * ep - 3
    totals: dict = defaultdict(Fraction)
    for coords in _ranks(pp, dr, ds, tp):
        for param, piece, weight in _held_pieces(coords, config, num_experts):
            totals[(param, piece)] += Fraction(weight)
    assert totals and all(v == 1 for v in totals.values()), [k for k, v in totals.items() if v != 1][:5]
    # every piece of every parameter is somewhere
    assert sum(1 for (p, _) in totals if p[0] == "matrix") == pp * ds * tp
    assert sum(1 for (p, _) in totals if p[0] == "expert") == pp * num_experts * tp


@pytest.mark.parametrize("world", sorted(CONFIGS))
@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_every_rank_issues_the_same_collective_and_agreement_holds(world, norm_type):
    pp, dr, ds, tp, ep = CONFIGS[world]
    stage_size = dr * ds * tp
    use_max = math.isinf(norm_type)
    call = ("clip_grad_norm_", norm_type, 1.0, False, pp, stage_size)
    kinds_of_stage = {s: frozenset({("DTensor", (dr, ds, tp), s)}) for s in range(pp)}  # stages differ
    rows, shapes = [], set()
    for (s, r, d, t), rank in _ranks(pp, dr, ds, tp).items():
        stage = Stage(True, stage_size, frozenset(range(pp)), s, pp)
        slots = agreement.slots(agreement.Signature(call, kinds_of_stage[s], stage), use_max)
        shapes.add((reduce.reduction_op(norm_type), reduce.packed_length(len(slots))))
        rows.append(slots)
    assert len(shapes) == 1  # one collective, same op and size on every rank
    table = torch.tensor(rows, dtype=torch.float64)
    sig = agreement.Signature(call, kinds_of_stage[0], Stage(True, stage_size, None, 0, pp))

    def reduced(t):
        return t.max(0).values if use_max else t.sum(0)

    assert not bool(agreement.mismatch(reduced(table), sig, use_max, world))
    # one rank of stage 1 holds a different layout: every rank's identical verdict flips
    odd = agreement.slots(agreement.Signature(call, frozenset({("plain", 1.0, "float32")}), Stage(True, stage_size, None, 1, pp)), use_max)
    table[stage_size * 1 + 5] = torch.tensor(odd, dtype=torch.float64)
    assert bool(agreement.mismatch(reduced(table), sig, use_max, world))
    # one rank with another norm_type or max_norm
    table[stage_size * 1 + 5] = torch.tensor(rows[stage_size + 5])
    other = agreement.slots(agreement.Signature(call[:2] + (0.5,) + call[3:], kinds_of_stage[0], Stage(True, stage_size, None, 0, pp)), use_max)
    table[7] = torch.tensor(other, dtype=torch.float64)
    assert bool(agreement.mismatch(reduced(table), sig, use_max, world))
