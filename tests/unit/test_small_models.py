"""One process, small models: the fast paths (one float64 dot for a small p=2 CPU group, flat
chunks from two tensors on, no packet without a process group) give the float64 reference,
also where float32 sums of squares overflow or underflow, and torch's results elsewhere."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import distclip
from distclip.math import partials as local_norms


def _params(values: list[torch.Tensor]) -> list[nn.Parameter]:
    out = []
    for v in values:
        p = nn.Parameter(torch.zeros(v.shape, dtype=v.dtype))
        p.grad = v.clone()
        out.append(p)
    return out


def _reference(values: list[torch.Tensor], p: float = 2.0) -> float:
    flat = torch.cat([v.double().flatten() for v in values])
    return float(torch.linalg.vector_norm(flat, p))


@pytest.mark.parametrize("scale", [1e20, 1e-20, 1.0])
def test_small_group_overflow_and_underflow_give_the_reference(scale):
    # 1e20**2 overflows float32 and 1e-20**2 underflows it: the float64 dot needs no repair
    g = torch.Generator().manual_seed(0)
    values = [(torch.randn(s, generator=g, dtype=torch.float64) * scale).float() for s in ((8, 8), (3,), (17, 5))]
    assert sum(v.numel() for v in values) <= local_norms.SMALL_GROUP
    ref = _reference(values)
    got = float(distclip.get_total_norm([v.clone() for v in values]))
    assert math.isclose(got, ref, rel_tol=1e-6), (got, ref)
    params = _params(values)
    total = distclip.clip_grad_norm_(params, max_norm=ref / 4)
    assert math.isclose(float(total), ref, rel_tol=1e-6)
    clipped = _reference([p.grad for p in params])
    want = ref * min(1.0, (ref / 4) / (ref + 1e-6))  # torch's coefficient, eps included
    assert math.isclose(clipped, want, rel_tol=1e-5), (clipped, want)


BOUND = local_norms.SMALL_GROUP


@pytest.mark.parametrize("numel", [BOUND - 1, BOUND, BOUND + 1, 3 * BOUND])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_either_side_of_the_small_group_bound(numel, dtype):
    g = torch.Generator().manual_seed(numel)
    sizes = [numel // 3, numel // 3, numel - 2 * (numel // 3)]
    values = [torch.randn(n, generator=g).to(dtype) for n in sizes]
    ref = _reference(values)
    got = float(distclip.get_total_norm([v.clone() for v in values]))
    assert math.isclose(got, ref, rel_tol=2e-6), (got, ref)
    want = float(torch.nn.utils.get_total_norm([v.clone() for v in values]))  # in the grads' dtype
    assert math.isclose(got, want, rel_tol=1e-2 if dtype != torch.float32 else 1e-5)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_small_group_nonfinite(bad):
    values = [torch.ones(4, 4), torch.ones(7)]
    values[1][3] = bad
    got = float(distclip.clip_grad_norm_(_params(values), 1.0))
    assert (math.isnan(got) if math.isnan(bad) else got == math.inf)
    with pytest.raises(RuntimeError, match="non-finite"):
        distclip.clip_grad_norm_(_params(values), 1.0, error_if_nonfinite=True)


@pytest.mark.parametrize("n", [2, 5, 31, 32, 100])
def test_few_tensors_flat_chunks(n):
    # from two tensors up the flat copy is used (and chunks hold at least FLAT_CHUNK_MIN elements)
    g = torch.Generator().manual_seed(n)
    shapes = [(32, 32), (32,), (64, 16), (128,), (600,), (40, 41)]
    values = [torch.randn(shapes[i % len(shapes)], generator=g) * (10.0 ** (i % 7 - 3)) for i in range(n)]
    for p in (1.0, 2.0, 3.0, math.inf):
        ref = _reference(values, p)
        got = float(distclip.get_total_norm([v.clone() for v in values], p))
        assert math.isclose(got, ref, rel_tol=2e-6), (p, got, ref)


def test_chunk_elements_bounds():
    assert local_norms.chunk_elements(10) == local_norms.FLAT_CHUNK_MIN
    assert local_norms.chunk_elements(10**10) == local_norms.FLAT_CHUNK
    big = 100 * local_norms.FLAT_CHUNK_MIN
    assert local_norms.chunk_elements(big) == big // 20 // local_norms.ROW * local_norms.ROW
    assert local_norms.chunk_elements(big) <= big / 10  # extra memory under 10 % above the floor


def _mixed_values(kind: str) -> list[torch.Tensor]:
    """Tensors that reach every piece kind of a large CPU group (above ``SMALL_GROUP``): flat
    chunk rows, row matrices measured in place (several, with tails) and small pieces; the
    second half of each is zero, tiny (its squares underflow float32) or huge (overflow)."""
    g = torch.Generator().manual_seed(1)
    sizes = [3 * local_norms.FLAT_MAX + 77, 2 * local_norms.FLAT_MAX + 5, 300, 9000, 2000, 2000, 2000] + [700] * 40
    special = {"zero": 0.0, "tiny": 1e-25, "huge": 1e25}[kind]
    out = []
    for i, n in enumerate(sizes):
        v = torch.randn(n, generator=g, dtype=torch.float64)
        if i % 2 == 0:
            v[n // 2 :] *= special
        out.append(v.float())
    assert sum(v.numel() for v in out) > local_norms.SMALL_GROUP
    return out


@pytest.mark.parametrize("kind", ["zero", "tiny", "huge"])
def test_repaired_pieces_give_the_reference(kind):
    # The repair recomputes every bad piece in float64, a matrix of rows at a time: each
    # repaired norm must be the float64 norm of exactly its own piece (a wrong row gather fails).
    values = _mixed_values(kind)
    ref = _reference(values)
    got = float(distclip.get_total_norm([v.clone() for v in values]))
    assert math.isclose(got, ref, rel_tol=1e-6), (got, ref)
    # single pieces, as grad_norms measures them (same-size tensors share one flat copy)
    norms = distclip.grad_norms(_params(values))
    for (name, norm), v in zip(norms.items(), values):
        want = float(torch.linalg.vector_norm(v.double()))
        assert math.isclose(float(norm), want, rel_tol=1e-6), (name, float(norm), want)


def test_repair_of_row_matrices_is_one_gather_per_matrix():
    # Mostly-zero grads (experts that saw no token) make every row piece a repair: the repair
    # must not fall back to one kernel per 512-element row.
    values = [torch.zeros(20 * local_norms.FLAT_MAX) for _ in range(4)]
    values[0][5] = 3.0
    from torch.profiler import profile

    with profile() as prof:
        total = distclip.get_total_norm(values)
    assert float(total) == 3.0
    calls = sum(e.count for e in prof.key_averages() if e.key == "aten::linalg_vector_norm")
    assert calls <= 12, calls  # 4 row matrices + their repair, not 4 * 320 rows


@pytest.mark.parametrize("n", [local_norms.ROW + 1, 13_800, 16_001, 65_537, 100_003, 1 << 20])
def test_row_shapes_cover_each_tensor_once(n):
    rows, length, tail = local_norms.row_shape(n)
    assert rows * length + tail == n and tail < length
    assert local_norms.ROW_MIN <= length <= local_norms.ROW_MAX
    assert tail == 0 or length == local_norms.ROW  # a tail only where no divisor is near ROW


def test_large_grads_of_any_size_are_one_kernel_each_and_accurate():
    # FSDP1's flat shards have any size (13 800 here: 4 000 small params in 80 units on 2 ranks).
    # Each is measured as one in-place row matrix: one norm kernel, no tail view, no flat copy; and
    # rows of about 512 elements keep float32's error far below one long reduction's, also on the
    # adversarial case of one large element among many small ones.
    sizes = [13_800, 13_800, 20_000, 65_536 + 512 * 3]
    values = []
    for n in sizes:
        v = torch.full((n,), 1e-3)
        v[0] = 1.0
        values.append(v)
    from torch.profiler import profile

    with profile() as prof:
        total = distclip.get_total_norm(values)
    calls = sum(e.count for e in prof.key_averages() if e.key == "aten::linalg_vector_norm")
    copies = sum(e.count for e in prof.key_averages() if e.key == "aten::flatten_dense_tensors")
    assert calls == len(sizes) and copies == 0, (calls, copies)
    ref = _reference(values)
    assert abs(float(total) - ref) / ref < 3e-6, (float(total), ref)
    whole = math.sqrt(sum(float(torch.linalg.vector_norm(v)) ** 2 for v in values))
    assert abs(whole - ref) / ref > 1e-5  # the adversarial case: what one long reduction gets wrong
    # grads clipped by the same norm, as torch scales them
    params = _params(values)
    distclip.clip_grad_norm_(params, 1.0)
    for p, v in zip(params, values):
        torch.testing.assert_close(p.grad, v * (1.0 / (ref + 1e-6)), rtol=1e-5, atol=0)
