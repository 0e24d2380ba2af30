"""torch's own clip tests, run against distclip on one process (no process group).

Ported from PyTorch's ``test/test_nn.py`` at pytorch/pytorch commit
74f2fa66feec00335f72813782f4802e80bff4cb (``TestNNDeviceType``):

- ``test_clip_grad_norm``: parametrized over ``foreach`` (False, True) and ``norm_type``
  (0.5, 1.5, 2, 4, 'inf'), 10 variants per device
- ``test_clip_grad_value``: parametrized over ``foreach`` (False, True)
- ``test_clip_grad_norm_error_if_nonfinite``
- not ported: ``test_clip_grad_norm_multi_device`` (``@onlyCUDA @deviceCountAtLeast(2)``: one
  model split over two GPUs); it is the only other clip test in the file.

The test bodies are torch's, with ``torch.nn.utils.{clip_grad_norm_, get_total_norm,
clip_grads_with_norm_, clip_grad_value_}`` replaced by ``distclip``'s and the assertions unchanged:
``self.assertEqual`` is ``assert_equal`` below (torch ``TestCase.assertEqual``'s defaults),
``assertLessEqual``/``assertGreaterEqual`` are plain comparisons, ``assertRaisesRegex`` keeps
unittest's semantics. ``instantiate_device_type_tests`` becomes a ``device`` parameter: ``cpu``,
plus ``cuda`` where available. The XLA/MPS skips of the originals cannot trigger here.

PyTorch is BSD-3-Clause licensed: Copyright (c) 2016- Facebook, Inc (Adam Paszke) and the PyTorch
contributors (see PyTorch's LICENSE); the ported test code keeps that notice.
"""

import contextlib
import math
import re
import warnings
from itertools import product

import pytest
import torch
from torch import inf, nan, nn

import distclip

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# torch's RelaxedNumberPair (the pair ``TestCase.assertEqual`` uses when one side is a Python
# number) takes each side's tolerances from torch's defaults for its type, float -> float32,
# int -> int64, and uses the larger of the two: (rtol, atol).
_NUMBER_TOLERANCES = {int: (0.0, 0.0), float: (1.3e-6, 1e-5)}


def _to_number(value):
    if isinstance(value, torch.Tensor):
        assert value.numel() == 1, f"Only single element tensor-likes can be compared against a number. Got {value.numel()} elements instead."
        value = value.item()
    if isinstance(value, bool):
        value = int(value)
    assert type(value) in _NUMBER_TOLERANCES, f"unsupported number-like {value!r}"
    return value


def assert_equal(actual, expected, msg=None):
    """``torch.testing._internal.common_utils.TestCase.assertEqual`` with its defaults
    (``exact_dtype=True``, ``exact_device=False``, ``exact_layout=False``, ``equal_nan=True``, no
    precision override; tensors: ``assert_close``'s default rtol/atol for the dtype),
    for the inputs these tests compare: tensors, sequences of tensors, strings, numbers and
    one-element tensors against numbers (torch's ``RelaxedNumberPair``: no dtype check, the looser float32
    tolerances for Python floats)."""
    msg = None if msg is None else str(msg)
    if isinstance(actual, torch.Tensor) and isinstance(expected, torch.Tensor):
        torch.testing.assert_close(actual, expected, equal_nan=True, check_device=False, check_layout=False, msg=msg)
    elif isinstance(actual, str) and isinstance(expected, str):  # torch's StringPair: equal strings
        assert actual == expected, f"Strings are not equal: {actual!r} != {expected!r}. {msg or ''}"
    elif isinstance(actual, (list, tuple)) and isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), f"sequence lengths differ: {len(actual)} != {len(expected)}. {msg or ''}"
        for a, e in zip(actual, expected):
            assert_equal(a, e, msg)
    else:
        a, e = _to_number(actual), _to_number(expected)
        rtol, atol = (max(t) for t in zip(_NUMBER_TOLERANCES[type(a)], _NUMBER_TOLERANCES[type(e)]))
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol, equal_nan=True, check_dtype=False, msg=msg)


@contextlib.contextmanager
def assert_raises_regex(expected_exception, expected_regex, msg=None):
    """unittest's ``assertRaisesRegex`` as a context manager: the exception (or a subclass) must be
    raised and ``re.search`` its message; any other exception propagates."""
    try:
        yield
    except expected_exception as error:
        if not re.search(expected_regex, str(error)):
            raise AssertionError(f'"{expected_regex}" does not match "{error}" : {msg}') from error
        return
    raise AssertionError(f"{expected_exception.__name__} not raised : {msg}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("foreach", (False, True), ids=lambda f: f"foreach_{f}")
def test_clip_grad_value(foreach, device):
    l = nn.Linear(10, 10).to(device)  # noqa: E741 - torch's name
    clip_value = 2.5

    grad_w, grad_b = torch.arange(-50.0, 50, device=device).view(10, 10).div_(5), torch.ones(10, device=device).mul_(2)
    for grad_list in [[grad_w, grad_b], [grad_w, None]]:
        for p, g in zip(l.parameters(), grad_list):
            p._grad = g.clone().view_as(p.data) if g is not None else g

        distclip.clip_grad_value_(l.parameters(), clip_value, foreach=foreach)
        for p in filter(lambda p: p.grad is not None, l.parameters()):
            assert p.grad.data.max() <= clip_value
            assert p.grad.data.min() >= -clip_value

    # Should accept a single Tensor as input
    p1, p2 = torch.randn(10, 10, device=device), torch.randn(10, 10, device=device)
    g = torch.arange(-50.0, 50, device=device).view(10, 10).div_(5)
    p1._grad = g.clone()
    p2._grad = g.clone()
    distclip.clip_grad_value_(p1, clip_value, foreach=foreach)
    distclip.clip_grad_value_([p2], clip_value, foreach=foreach)
    assert_equal(p1.grad, p2.grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm_type", (0.5, 1.5, 2, 4, "inf"), ids=lambda n: f"norm_type_{n}")
@pytest.mark.parametrize("foreach", (False, True), ids=lambda f: f"foreach_{f}")
def test_clip_grad_norm(norm_type, foreach, device):
    l = nn.Linear(10, 10).to(device)  # noqa: E741 - torch's name
    max_norm = 2

    def compute_norm(norm_type):
        norm_type = float(norm_type)
        if norm_type != inf:
            total_norm = 0
            for p in l.parameters():
                total_norm += p.grad.data.abs().pow(norm_type).sum()
            return pow(total_norm, 1.0 / norm_type)
        else:
            return max(p.grad.data.abs().max() for p in l.parameters())

    def compare_scaling(grads):
        p_scale = [p.grad.data.div(g).view(-1) for p, g in zip(l.parameters(), grads)]
        scale = torch.cat(p_scale)
        assert_equal(scale.std(), 0)
        return scale[0]

    grads = torch.arange(1.0, 101, device=device).view(10, 10), torch.ones(10, device=device).div(1000)
    for p, g in zip(l.parameters(), grads):
        p._grad = g.clone().view_as(p.data)
    norm_before = compute_norm(norm_type)
    norm = distclip.clip_grad_norm_(l.parameters(), max_norm, norm_type=norm_type, foreach=foreach)
    norm_after = compute_norm(norm_type)
    assert_equal(norm, norm_before)
    assert_equal(norm_after, max_norm)
    assert norm_after <= norm_before
    compare_scaling(grads)

    # decomposed APIs should behave as expected
    grads = torch.arange(1.0, 101, device=device).view(10, 10), torch.ones(10, device=device).div(1000)
    for p, g in zip(l.parameters(), grads):
        p._grad = g.clone().view_as(p)
    norm_before = compute_norm(norm_type)
    grads = [p.grad for p in l.parameters()]
    total_norm = distclip.get_total_norm(grads, norm_type=norm_type, foreach=foreach)
    distclip.clip_grads_with_norm_(l.parameters(), max_norm, total_norm, foreach=foreach)
    norm_after = compute_norm(norm_type)
    assert_equal(total_norm, norm_before)
    assert_equal(norm_after, max_norm)
    assert norm_after <= norm_before
    compare_scaling(grads)

    # Small gradients should be left unchanged
    grads = torch.rand(10, 10, device=device).div(10000), torch.ones(10, device=device).div(500)
    for p, g in zip(l.parameters(), grads):
        p.grad.data.copy_(g)
    norm_before = compute_norm(norm_type)
    norm = distclip.clip_grad_norm_(l.parameters(), max_norm, norm_type=norm_type, foreach=foreach)
    norm_after = compute_norm(norm_type)
    assert_equal(norm, norm_before)
    assert_equal(norm_before, norm_after)
    assert norm_after <= max_norm
    scale = compare_scaling(grads)
    assert_equal(scale, 1)

    # Should accept a single Tensor as input
    p1, p2 = torch.randn(10, 10, device=device), torch.randn(10, 10, device=device)
    g = torch.arange(1.0, 101, device=device).view(10, 10)
    p1._grad = g.clone()
    p2._grad = g.clone()
    distclip.clip_grad_norm_(p1, max_norm, norm_type=norm_type, foreach=foreach)
    distclip.clip_grad_norm_([p2], max_norm, norm_type=norm_type, foreach=foreach)
    assert_equal(p1.grad, p2.grad)

    # Should warning when parameters generator exhausted
    params = l.parameters()
    for p in params:  # noqa: B007 - torch's loop: exhausts the generator
        pass
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        distclip.clip_grad_norm_(params, max_norm, norm_type=norm_type, foreach=foreach)
        assert_equal(len(w), 1)
        assert_equal(str(w[0].message), "`parameters` is an empty generator, no gradient clipping will occur.")


# Check that clip_grad_norm_ raises an error if the total norm of the
# parameters' gradients is non-finite
@pytest.mark.parametrize("device", DEVICES)
def test_clip_grad_norm_error_if_nonfinite(device):
    norms_pos = [0.1, 1, 2, 3.5, inf]
    norms_neg = [-0.1, -1, -2, -3.5]
    norms_except_0 = norms_pos + norms_neg
    norms_all = norms_except_0 + [0]

    # Each entry in test_cases has the following values, in this order:
    #
    # grad_only_one_elem    If True, only one element of the parameter's
    #                       gradient is set to the scalar grad, and the
    #                       rest of the elements are 0. If False, all grad
    #                       elements are equal to the scalar.
    #
    # prefix_finite_grad_param  If True, prefix a parameter that has a grad
    #                           of 1.
    #
    # scalars           Scalars to use as the parameter's grad, through
    #                   multiplication
    #
    # norms_nonfinite   Norm types that should produce nonfinite total norm
    #
    # norms_finite      Norm types that should produce finite total norm
    test_cases = [
        # Test errors from an infinite grad
        (False, False, [inf, -inf], norms_except_0, [0]),
        (False, True, [inf, -inf], norms_pos, norms_neg + [0]),
        (True, False, [inf, -inf], norms_pos, norms_neg + [0]),
        (True, True, [inf, -inf], norms_pos, norms_neg + [0]),
        # Test errors from a NaN grad
        (False, False, [nan], norms_except_0, [0]),
        (False, True, [nan], norms_except_0, [0]),
        (True, False, [nan], norms_except_0, [0]),
        (True, True, [nan], norms_except_0, [0]),
        # Test a grad that should never error
        (False, False, [2e22, -2e22], [], norms_all),
        (False, True, [2e22, -2e22], [], norms_all),
        (True, False, [2e22, -2e22], [], norms_all),
        (True, True, [2e22, -2e22], [], norms_all),
        # Test a grad that will overflow to inf for only some norm orders
        (False, False, [2e200, -2e200], [3.5, 2, -2, -3.5], [inf, 1, 0.1, 0, -1, -0.1]),
        (False, True, [2e200, -2e200], [3.5, 2], norms_neg + [inf, 1, 0.1, 0]),
        (True, False, [2e200, -2e200], [3.5, 2], norms_neg + [inf, 1, 0.1, 0]),
        (True, True, [2e200, -2e200], [3.5, 2], norms_neg + [inf, 1, 0.1, 0]),
    ]

    def gen_parameters(scalar, grad_only_one_elem, prefix_finite_grad_param):
        param = torch.ones(10, dtype=torch.float64, device=device, requires_grad=True)

        if grad_only_one_elem:
            param[1].mul(scalar).sum().backward()
        else:
            param.mul(scalar).sum().backward()

        if prefix_finite_grad_param:
            prefix_param = torch.ones(1, dtype=torch.float64, device=device, requires_grad=True)
            prefix_param.mul(1).sum().backward()
            parameters = [prefix_param, param]
        else:
            parameters = [param]

        return parameters

    def run_test_case(norm_type, error_if_nonfinite, scalar, grad_only_one_elem, prefix_finite_grad_param, is_norm_nonfinite):
        msg = (
            f"norm_type: {norm_type}, ",
            f"error_if_nonfinite: {error_if_nonfinite}, "
            f"scalar: {scalar}, "
            f"grad_only_one_elem: {grad_only_one_elem}, "
            f"prefix_finite_grad_param: {prefix_finite_grad_param}, "
            f"is_norm_nonfinite: {is_norm_nonfinite}",
        )

        parameters = gen_parameters(scalar, grad_only_one_elem, prefix_finite_grad_param)

        # Should only throw an error if the total norm is expected to be
        # nonfinite and `error_if_nonfinite=True`
        if is_norm_nonfinite and error_if_nonfinite:
            error_msg = f"The total norm of order {float(norm_type)} for gradients"

            grads_before = [p.grad.clone() for p in parameters]

            with assert_raises_regex(RuntimeError, error_msg, msg=msg):
                distclip.clip_grad_norm_(parameters, 1, norm_type=norm_type, error_if_nonfinite=True)

            # Grad should not change if error is thrown
            grads_after = [p.grad for p in parameters]
            assert_equal(grads_before, grads_after, msg=msg)
        else:
            distclip.clip_grad_norm_(parameters, 1, norm_type=norm_type, error_if_nonfinite=error_if_nonfinite)

    for grad_only_one_elem, prefix_finite_grad_param, scalars, norms_nonfinite, norms_finite in test_cases:
        for error_if_nonfinite in [False, True]:
            for norm_type, scalar in product(norms_nonfinite, scalars):
                run_test_case(norm_type, error_if_nonfinite, scalar, grad_only_one_elem, prefix_finite_grad_param, True)

            for norm_type, scalar in product(norms_finite, scalars):
                # distclip's one deliberate change to this test (README, "differs from torch"): a
                # NaN/inf grad makes the norm NaN for p <= 0 too (torch's p <= 0 norms are blind to
                # it: a count or a min that ignores the bad grad), so those cases expect the error.
                distclip_nonfinite = norm_type <= 0 and not math.isfinite(scalar)
                run_test_case(norm_type, error_if_nonfinite, scalar, grad_only_one_elem, prefix_finite_grad_param, distclip_nonfinite)
