"""The reduced vector's two forms (host: Python floats; device: tensors, no host sync) agree bit for
bit on the same inputs: the encoded vectors, the verdicts read from a reduced vector (agreement,
flags) and the total. The reduction is simulated (SUM or MAX over the ranks' vectors), so no
process group is needed."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from distclip.comm.agreement import Signature, call_signature
from distclip.comm.packet import TOTAL_HEAD, Packet, total_from_head, total_from_head_host, total_head, total_head_host
from distclip.layout.discovery import CallGroup

NORMS = (2.0, 1.0, 0.5, 3.0, 0.0, -2.0, math.inf, -math.inf)
PARTIALS = (0.0, 1.25, 7.0e-30, 3.0e38, math.inf, math.nan)


def _sig(kinds, stage, fn="clip_grad_norm_", p=2.0):
    return Signature(call_signature(fn, p, 1.0, False, stage), frozenset(kinds), stage)


def _ranks(stage_size=2, pp_size=1):
    """One Signature per rank of a world of ``stage_size * pp_size`` ranks."""
    pp_ranks = frozenset(range(pp_size)) if pp_size > 1 else None
    return [CallGroup(True, stage_size, pp_ranks, r % pp_size, pp_size) for r in range(stage_size * pp_size)]


def _reduce(vectors, use_max):
    stacked = torch.stack(vectors)
    return stacked.max(0).values if use_max else stacked.sum(0)


@pytest.mark.parametrize("norm_type", NORMS)
def test_host_and_device_forms_agree_bit_for_bit(norm_type):
    use_max = math.isinf(norm_type)
    stages = _ranks(2, 2)
    layouts = {"agree": [("plain", "float32")] * 4, "one differs": [("plain", "float32")] * 3 + [("DTensor", "float32")]}
    for (label, kinds), values, failed_rank in itertools.product(layouts.items(), itertools.permutations(PARTIALS, 4), (None, 2)):
        host_vecs, dev_vecs, packets = [], [], []
        for rank, stage in enumerate(stages):
            packet = Packet(TOTAL_HEAD, _sig([kinds[rank]], stage), use_max)
            flags = {"has_float64": rank == 1, "failed": rank == failed_rank}
            host = packet.encode_host(total_head_host(values[rank], values[rank] != 0.0, norm_type), **flags)
            dev = packet.encode_device(total_head(torch.tensor(values[rank], dtype=torch.float64), values[rank] != 0.0, norm_type),
                                       torch.device("cpu"), **flags)
            assert torch.equal(host, dev) or torch.equal(host.isnan(), dev.isnan()) and torch.equal(host.nan_to_num(), dev.nan_to_num())
            host_vecs.append(host)
            dev_vecs.append(dev)
            packets.append(packet)
        reduced_host, reduced_dev = _reduce(host_vecs, use_max), _reduce(dev_vecs, use_max)
        for packet in packets:
            h = packet.decode_host(reduced_host.tolist())
            d = packet.decode_device(reduced_dev)
            assert h.disagreed == bool(d.disagreed) == (label == "one differs"), (label, values)
            assert h.failed == bool(d.failed) == (failed_rank is not None)
            assert h.has_float64 == bool(d.has_float64) is True
            assert h.names_changed == bool(d.names_changed) is False
            total_h = total_from_head_host(h.head, norm_type)
            total_d = float(total_from_head(d.head, norm_type))
            assert (math.isnan(total_h) and math.isnan(total_d)) or total_h == total_d, (norm_type, values, total_h, total_d)


def test_a_different_call_is_seen_under_sum_and_max():
    stages = _ranks(4)
    for use_max in (False, True):
        vecs, packets = [], []
        for rank, stage in enumerate(stages):
            packet = Packet(TOTAL_HEAD, _sig([("plain",)], stage, p=3.0 if rank == 2 else 2.0), use_max)
            vecs.append(packet.encode_host([1.0, 0.0, 1.0]))
            packets.append(packet)
        reduced = _reduce(vecs, use_max)
        assert all(p.decode_host(reduced.tolist()).disagreed for p in packets)
        assert all(bool(p.decode_device(reduced).disagreed) for p in packets)


def test_one_process_has_no_agreement_slots():
    packet = Packet(TOTAL_HEAD, None, False)
    vec = packet.encode_host([4.0, 0.0, 1.0], has_float64=True)
    assert vec.numel() == TOTAL_HEAD + 3
    view = packet.decode_host(vec.tolist())
    assert not view.disagreed and view.has_float64 and not view.failed
    assert total_from_head_host(view.head, 2.0) == 2.0
