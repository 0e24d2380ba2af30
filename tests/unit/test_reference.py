"""The one float64 reference norm (``distclip.verify.reference``) that the main job, the tests and
the benchmarks compare with: its forms agree with each other and with a direct computation."""

from __future__ import annotations

import math

import pytest
import torch

from distclip.verify.reference import reference_norm

NORMS = (1.0, 2.0, 3.0, 0.5, math.inf, -math.inf, 0.0, -2.0)


def _grads():
    g = torch.Generator().manual_seed(3)
    return [torch.randn(4, 3, generator=g), torch.randn(7, generator=g).to(torch.bfloat16), torch.randn(2, 2, generator=g).double()]


@pytest.mark.parametrize("p", NORMS)
def test_list_and_mapping_match_a_direct_float64_norm(p):
    grads = _grads()
    flat = torch.cat([t.double().reshape(-1) for t in grads])
    expected = float(torch.linalg.vector_norm(flat, p))
    assert reference_norm(grads, p) == expected
    assert reference_norm({str(i): t for i, t in enumerate(grads)}, p) == expected


@pytest.mark.parametrize("p", (1.0, 2.0, 3.0, 0.5))
def test_weights_count_a_tensor_that_many_times(p):
    a, b, c = _grads()
    # b held by two ranks (weight 1/2 each, two pieces) equals b counted once
    weighted = reference_norm([a, b, b, c], p, weights=[1.0, 0.5, 0.5, 1.0])
    assert weighted == pytest.approx(reference_norm([a, b, c], p), rel=1e-12)
    assert reference_norm([a, b], p, weights=[2.0, 1.0]) == pytest.approx(reference_norm([a, a, b], p), rel=1e-12)


def test_weights_refused_where_they_mean_nothing():
    grads = _grads()
    for p in (math.inf, -math.inf, 0.0, -2.0):
        with pytest.raises(ValueError, match="finite norm_type > 0"):
            reference_norm(grads, p, weights=[1.0] * 3)
    with pytest.raises(ValueError, match="2 weights for 3 tensors"):
        reference_norm(grads, 2.0, weights=[1.0, 1.0])


def test_complex_magnitudes_and_no_elements():
    z = torch.tensor([3 + 4j, 0 + 1j], dtype=torch.complex64)
    assert reference_norm([z], 2.0) == pytest.approx(math.sqrt(26), rel=1e-12)
    assert reference_norm([z], math.inf) == 5.0
    assert reference_norm([], 2.0) == 0.0 and reference_norm({}, math.inf) == 0.0
    assert reference_norm([torch.zeros(0)], 1.0) == 0.0
