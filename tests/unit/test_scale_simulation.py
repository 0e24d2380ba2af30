"""Scale by simulation: the counting and the collectives for worlds of 1 024 and 16 384 ranks on
4-D meshes (pp x dp_replicate x dp_shard x tp, with expert parallelism inside dp), without
launching them.

For every rank we build what it holds as real objects (DTensor grads on DeviceMeshes of the right
shape and global ranks, made without a process group; plain grads carrying the annotations that
``mark_sharded`` / ``mark_replicated`` record) and run them through the library's own layout
discovery (``layout.local_layout``) with that rank's ``CallGroup``. Then we check that the weights it
gives every piece sum to exactly 1 over the ranks holding that piece, and that every element of
every parameter is counted once; that every rank builds a reduction of the same op and length; and
that the agreement check, reduced over all ranks, stays quiet when ranks agree and fires when one
rank differs.
"""

import math
from collections import defaultdict
from fractions import Fraction
from itertools import product

import pytest
import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta

from distclip.comm import agreement, reduce
from distclip.comm.packet import TOTAL_HEAD, Packet
from distclip.layout import discovery as layout
from distclip.layout import marks
from distclip.layout.discovery import CallGroup
from distclip.layout.marks import Annotation, GroupInfo

CONFIGS = {
    # world: (pp, dp_replicate, dp_shard, tp, ep)  -- ep divides dp_replicate * dp_shard
    1024: (4, 1, 32, 8, 8),
    16384: (8, 16, 8, 16, 16),
}


class Simulation:
    """Every rank's parameters for one config, built as real tensors, and the ranks' layouts."""

    def __init__(self, config: tuple[int, ...]) -> None:
        self.config = config
        pp, dr, ds, tp, ep = config
        self.world = pp * dr * ds * tp
        self.grid = torch.arange(self.world).view(pp, dr, ds, tp)
        self.num_experts = 2 * ep - 3  # uneven: the last ep rank holds none
        # One mesh object per stage and shape, as a real job shares them (no process group needed).
        self.stage_mesh = [self._mesh(self.grid[s], ("dr", "ds", "tp")) for s in range(pp)]
        self.dp_mesh = [self._mesh(self.grid[s, :, :, 0], ("dr", "ds")) for s in range(pp)]
        self.numel: dict = {}

    @staticmethod
    def _mesh(ranks: torch.Tensor, names: tuple[str, ...]) -> DeviceMesh:
        return DeviceMesh("cpu", ranks, mesh_dim_names=names, _init_backend=False, _rank=int(ranks.flatten()[0]))

    @staticmethod
    def _dtensor(local_shape, global_shape, mesh, placements) -> nn.Parameter:
        meta = TensorMeta(torch.Size(global_shape), torch.empty(global_shape, device="meta").stride(), torch.float32)
        spec = DTensorSpec(mesh, tuple(placements), meta)
        p = DTensor(torch.zeros(local_shape), spec, requires_grad=True)
        p.grad = DTensor(torch.ones(local_shape), spec, requires_grad=False)
        return p

    @staticmethod
    def _plain(shape, annotation=None) -> nn.Parameter:
        p = nn.Parameter(torch.zeros(shape))
        p.grad = torch.ones(shape)
        if annotation is not None:
            setattr(p, marks.TENSOR_MARK_ATTR, annotation)  # what mark_sharded/mark_replicated record
        return p

    def held(self, coords) -> list[tuple[tuple, tuple, nn.Parameter]]:
        """(param, piece id, parameter) for everything the rank at ``coords`` holds."""
        pp, dr, ds, tp, ep = self.config
        s, r, d, t = coords
        out = []
        # HSDP x TP matrix: Replicate over dp_replicate, Shard(0) over dp_shard, Shard(1) over tp
        out.append((("matrix", s), (d, t), self._dtensor((2, 3), (2 * ds, 3 * tp), self.stage_mesh[s], [Replicate(), Shard(0), Shard(1)])))
        self.numel[("matrix", s)] = 6 * ds * tp
        # LayerNorm on the (dp_replicate, dp_shard) sub-mesh: replicated over tp
        out.append((("norm", s), (d,), self._dtensor((2,), (2 * ds,), self.dp_mesh[s], [Replicate(), Shard(0)])))
        self.numel[("norm", s)] = 2 * ds
        # plain bias, replicated over the whole stage (DDP-style)
        out.append((("bias", s), (), self._plain((3,))))
        self.numel[("bias", s)] = 3
        # experts: spread over ep ranks of the flattened dp (uneven; the last ep rank holds none),
        # each split over tp too: two marks that must compose
        dp_index = r * ds + d
        ep_rank, ep_base = dp_index % ep, dp_index - dp_index % ep  # ep groups: consecutive dp ranks
        ep_ranks = frozenset(int(self.grid[s].flatten(0, 1)[ep_base + i, t]) for i in range(ep))
        tp_ranks = frozenset(self.grid[s, r, d].tolist())
        expert_marks = Annotation((GroupInfo(ep_ranks), GroupInfo(tp_ranks)))
        for e in range(self.num_experts):
            if e % (ep - 1) == ep_rank:
                # the ep groups of the stage are data-parallel replicas of each other
                out.append((("expert", s, e), (t,), self._plain((4, 2), expert_marks)))
                self.numel[("expert", s, e)] = 8 * tp
        # embedding tied between the first and last stage, vocab-sharded over tp (a DTensor on the
        # tp sub-mesh), declared with mark_replicated over the embedding group
        if s in (0, pp - 1):
            tp_mesh = self._mesh(self.grid[s, r, d], ("tp",))
            p = self._dtensor((3, 4), (3 * tp, 4), tp_mesh, [Shard(0)])
            group = frozenset(int(self.grid[stage, r, d, t]) for stage in (0, pp - 1))
            setattr(p, marks.TENSOR_MARK_ATTR, Annotation((), GroupInfo(group)))
            out.append((("tied",), (t,), p))
            self.numel[("tied",)] = 12 * tp
        return out

    def stage(self, coords) -> CallGroup:
        pp, dr, ds, tp, _ = self.config
        s, r, d, t = coords
        return CallGroup(True, dr * ds * tp, frozenset(self.grid[:, r, d, t].tolist()), s, pp)

    def weights(self):
        """Yield (param, piece, weight, local numel) for every local tensor of every rank, as the
        library's layout discovery weighs it."""
        pp, dr, ds, tp, _ = self.config
        for coords in product(range(pp), range(dr), range(ds), range(tp)):
            held = self.held(coords)
            params = [p for _, _, p in held]
            found = layout.local_layout(params, None, self.stage(coords))
            piece_of = {}
            for param, piece, p in held:
                local = p.grad._local_tensor if isinstance(p.grad, DTensor) else p.grad
                piece_of[id(local)] = (param, piece)
            seen = 0
            for (_, _, weight), tensors in found.groups.items():
                for t in tensors:
                    param, piece = piece_of[id(t)]
                    seen += 1
                    yield param, piece, weight, t.numel()
            assert seen == len(held)


def _ranks(pp, dr, ds, tp):
    """Row-major rank numbering of a (pp, dp_replicate, dp_shard, tp) mesh."""
    return {coords: i for i, coords in enumerate(product(range(pp), range(dr), range(ds), range(tp)))}


def _count(config):
    sim = Simulation(config)
    totals: dict = defaultdict(Fraction)
    elements: dict = defaultdict(Fraction)
    for param, piece, weight, numel in sim.weights():
        totals[(param, piece)] += Fraction(weight)
        elements[param] += Fraction(weight) * numel
    return sim, totals, elements


@pytest.mark.parametrize("world", sorted(CONFIGS))
def test_every_element_counted_exactly_once(world):
    config = CONFIGS[world]
    pp, dr, ds, tp, ep = config
    assert pp * dr * ds * tp == world
    sim, totals, elements = _count(config)
    assert totals and all(v == 1 for v in totals.values()), [(k, v) for k, v in totals.items() if v != 1][:5]
    assert elements == {k: Fraction(v) for k, v in sim.numel.items()}
    # every piece of every parameter is somewhere
    assert sum(1 for (p, _) in totals if p[0] == "matrix") == pp * ds * tp
    assert len({p[:3] for (p, _) in totals if p[0] == "expert"}) == pp * sim.num_experts


def test_simulation_catches_a_discovery_that_forgets_a_mark(monkeypatch):
    """Mutant: an annotation that keeps only its last group (the bug reported for ep x tp experts)
    must make the count wrong, or this simulation proves nothing."""
    monkeypatch.setattr(Annotation, "pieces", property(lambda self: self.sharded_over[-1].size if self.sharded_over else 1))
    _, totals, _ = _count(CONFIGS[1024])
    assert any(v != 1 for k, v in totals.items() if k[0][0] == "expert")


@pytest.mark.parametrize("world", sorted(CONFIGS))
@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_every_rank_issues_the_same_collective_and_agreement_holds(world, norm_type):
    pp, dr, ds, tp, ep = CONFIGS[world]
    stage_size = dr * ds * tp
    use_max = math.isinf(norm_type)
    call = ("clip_grad_norm_", norm_type, 1.0, False, pp, stage_size)
    kinds_of_stage = {s: frozenset({("DTensor", (dr, ds, tp), s)}) for s in range(pp)}  # stages differ
    rows, shapes = [], set()
    for (s, _r, _d, _t), _rank in _ranks(pp, dr, ds, tp).items():
        stage = CallGroup(True, stage_size, frozenset(range(pp)), s, pp)
        packet = Packet(TOTAL_HEAD, agreement.Signature(call, kinds_of_stage[s], stage), use_max)
        slots = packet.encode_host([1.0, 0.0, 1.0]).tolist()
        shapes.add((reduce.reduction_op(norm_type), packet.length))
        rows.append(slots)
    assert len(shapes) == 1  # one collective, same op and size on every rank
    table = torch.tensor(rows, dtype=torch.float64)
    sig = agreement.Signature(call, kinds_of_stage[0], CallGroup(True, stage_size, None, 0, pp))

    def reduced(t):
        return t.max(0).values if use_max else t.sum(0)

    def disagreed(t):
        return bool(Packet(TOTAL_HEAD, sig, use_max).decode_device(reduced(t)).disagreed)

    assert sig.stage.group_size == world
    assert not disagreed(table)
    # one rank of stage 1 holds a different layout: every rank's identical verdict flips
    odd_sig = agreement.Signature(call, frozenset({("plain", 1.0, "float32")}), CallGroup(True, stage_size, None, 1, pp))
    odd = Packet(TOTAL_HEAD, odd_sig, use_max).encode_host([1.0, 0.0, 1.0]).tolist()
    table[stage_size * 1 + 5] = torch.tensor(odd, dtype=torch.float64)
    assert disagreed(table)
    # one rank with another norm_type or max_norm
    table[stage_size * 1 + 5] = torch.tensor(rows[stage_size + 5])
    other_sig = agreement.Signature(call[:2] + (0.5,) + call[3:], kinds_of_stage[0], CallGroup(True, stage_size, None, 0, pp))
    table[7] = Packet(TOTAL_HEAD, other_sig, use_max).encode_host([1.0, 0.0, 1.0])
    assert disagreed(table)
