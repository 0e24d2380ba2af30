"""Clipping policies for :class:`distclip.GradGuard`: a fixed threshold, ZClip and AutoClip.

A policy turns the step's total gradient norm into the threshold (``max_norm``) applied this step
and a spike verdict, from a small float64 state. Its only input is the **reduced float64 total**
that distclip's one all-reduce gives every rank bit for bit, so every rank computes the same
threshold and the same next state without any collective of its own.

A policy runs two ways, chosen by the guard:

- the host form (where ``distclip.host_reads.host_reads_allowed`` says a read is free, i.e. CPU):
  the decisions come back as Python values;
- the device form (accelerators, ``meta``): the state is float64 tensors on the device and every
  branch a ``torch.where``; nothing is read on the host (no ``.item()``, no ``bool()``). On a GPU
  each op is a kernel launch, so ZClip's step is eleven vector ops whatever the branch
  (:class:`_ZClipSteps`) and AutoClip's a sort of its history buffer.

The fixed policy and AutoClip are written once against a tiny math backend (``HOST``: Python
float64; :class:`DeviceMath`: the same operations as tensor ops) that gives the same bits both
ways. ZClip runs the same torch ops in both forms (on CPU tensors in the host form), so the two
forms agree bit for bit on CPU (``tests/worlds/test_guard.py`` checks both against the authors'
code). A non-finite norm never enters a policy's state (nor, for ZClip, one of 1e150 or more,
whose square overflows float64), and a step the guard skips leaves the state as it was.

The two adaptive rules follow their authors' reference code:

- :class:`ZClip` (Kumar et al., "ZClip: Adaptive Spike Mitigation for LLM Pre-Training",
  arXiv 2504.02507; ``github.com/bluorion-com/ZClip`` ``zclip/zclip.py``);
- :class:`AutoClip` (Seetharaman et al., "AutoClip: Adaptive Gradient Clipping for Source
  Separation Networks", arXiv 2007.14469; ``github.com/pseeth/autoclip`` ``autoclip.py``).
"""

from __future__ import annotations

import bisect
import collections
import copy
import math
from typing import Any, Optional, Union

import torch

from distclip.clip import check_max_norm

__all__ = ["Policy", "FixedThreshold", "ZClip", "AutoClip", "make_policy", "HOST", "DeviceMath"]

Scalar = Union[float, torch.Tensor]  # a Python float (host) or a 0-dim float64 tensor (device)
Flag = Union[bool, torch.Tensor]  # a Python bool (host) or a 0-dim bool tensor (device)
_INF = math.inf


# ----------------------------------------------------------------------------- math backends


class _HostMath:
    """Python float64 arithmetic with the semantics of the torch ops :class:`DeviceMath` uses
    (a division by zero gives ±inf/NaN instead of raising)."""

    host = True
    device = None

    @staticmethod
    def const(value: float) -> float:
        return float(value)

    @staticmethod
    def where(cond: Flag, a: Scalar, b: Scalar) -> Scalar:
        return a if cond else b

    @staticmethod
    def minimum(a: Scalar, b: float) -> Scalar:
        a = float(a)
        return a if (a != a or a <= b) else b

    @staticmethod
    def isfinite(x: Scalar) -> Flag:
        return math.isfinite(float(x))


HOST = _HostMath()


class DeviceMath:
    """The same operations as ``HOST`` as float64 tensor ops on ``device``: no host read, every
    branch a ``torch.where``. Constants are made with fill kernels (``torch.full``), never copied
    from the host, once per value: an operand ``torch.where`` would otherwise turn into a new
    tensor (one more device op) every call. The guard keeps one ``DeviceMath`` per device.

    Cached constants are operands only, never results: what a policy returns or stores is made
    by :meth:`new` (a caller may write to it in place)."""

    host = False

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._consts: dict[tuple[type, float], torch.Tensor] = {}
        self._vectors: dict[tuple[float, ...], torch.Tensor] = {}

    def new(self, value: float) -> torch.Tensor:
        """A fresh 0-dim float64 tensor holding ``value``."""
        return torch.full((), float(value), dtype=torch.float64, device=self.device)

    def const(self, value: Union[float, bool]) -> torch.Tensor:
        """A cached, read-only 0-dim float64 (bool for a bool ``value``) tensor holding ``value``."""
        key = (type(value), value)
        found = self._consts.get(key)
        if found is None:
            dtype = torch.bool if isinstance(value, bool) else torch.float64
            found = self._consts[key] = torch.full((), value, dtype=dtype, device=self.device)
        return found

    def vector(self, values: tuple[float, ...]) -> torch.Tensor:
        """A cached, read-only float64 vector holding ``values`` (an operand only, as ``const``)."""
        found = self._vectors.get(values)
        if found is None:
            # stacked fill constants: ``torch.tensor(values, device=...)`` would be a blocking host copy
            found = self._vectors[values] = torch.stack([self.const(float(v)) for v in values])
        return found

    def _t(self, x: Scalar) -> torch.Tensor:
        return x if isinstance(x, torch.Tensor) else self.const(float(x))

    def where(self, cond: Flag, a: Scalar, b: Scalar) -> torch.Tensor:
        if not isinstance(cond, torch.Tensor):
            cond = self.const(bool(cond))
        return torch.where(cond, self._t(a), self._t(b))

    def minimum(self, a: Scalar, b: float) -> torch.Tensor:
        return self._t(a).clamp(max=b)  # clamp keeps a NaN ``a``, as ``HOST.minimum``

    def isfinite(self, x: Scalar) -> torch.Tensor:
        return torch.isfinite(self._t(x))


Math = Union[_HostMath, DeviceMath]


def _check_positive(value: object, name: str, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"distclip: {name} must be a number, got {type(value).__name__}")
    v = float(value)
    if not (v >= 0.0 if allow_zero else v > 0.0) or math.isnan(v) or math.isinf(v):
        raise ValueError(f"distclip: {name} must be a finite {'non-negative' if allow_zero else 'positive'} number, got {value!r}")
    return v


def _check_cap(max_norm: object) -> Optional[float]:
    if isinstance(max_norm, torch.Tensor) and max_norm.numel() == 1:
        max_norm = float(max_norm)
    return None if max_norm is None else check_max_norm(max_norm, numbers_only=True)


def _to_float(value: Any) -> float:
    """A saved number (Python float or 0-dim tensor, anywhere) as a float: a host read, at load time only."""
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


# ----------------------------------------------------------------------------- policies


class Policy:
    """A fixed threshold; the base of the adaptive policies.

    Args:
        max_norm (float or None): the threshold (for adaptive policies: its cap). ``None``: no
            cap (a fixed policy then never clips: it measures only).
        skip_above (float, optional): flag the step as a spike (the guard skips it) when the norm
            exceeds ``skip_above * max_norm``. Adaptive policies give it their own meaning.

    A policy holds its state (floats or float64 device tensors, see the module docstring);
    :class:`~distclip.GradGuard` calls :meth:`decide` with the reduced total, then :meth:`commit`.
    """

    kind = "fixed"
    learn_below = _INF  # the guard commits a norm to the state only below this (and finite)

    def __init__(self, max_norm: Optional[float] = 1.0, *, skip_above: Optional[float] = None) -> None:
        self.max_norm = _check_cap(max_norm)
        self.skip_above = None if skip_above is None else _check_positive(skip_above, "skip_above")
        self._state: Optional[dict[str, Scalar]] = None
        self._state_host: Optional[bool] = None
        self._loaded: Optional[dict[str, Any]] = None

    @property
    def cap(self) -> float:
        """``max_norm`` as a float (``inf`` when None)."""
        return _INF if self.max_norm is None else self.max_norm

    def config(self) -> tuple:
        """What defines the policy (compared across ranks and against a loaded state)."""
        return (self.kind, self.max_norm, self.skip_above)

    def __repr__(self) -> str:
        return f"{type(self).__name__}{self.config()[1:]}"

    # -- state -----------------------------------------------------------------------------
    def _fresh(self) -> dict[str, float]:
        return {}

    def _prepare(self, m: Math) -> dict[str, Scalar]:
        """The state in ``m``'s form, created (or converted: one host copy, after a load or a
        switch between host and device) when needed."""
        if self._state is not None and self._state_host == m.host and (m.host or self._on(m.device)):
            return self._state
        source: dict[str, Any] = self._loaded if self._loaded is not None else (self._state if self._state is not None else self._fresh())
        state: dict[str, Scalar]
        if isinstance(m, DeviceMath):
            state = {k: v.to(device=m.device, dtype=torch.float64) if isinstance(v, torch.Tensor) else m.new(v) for k, v in source.items()}
        else:
            state = {k: _to_float(v) for k, v in source.items()}
        self._state, self._state_host, self._loaded = state, m.host, None
        return state

    def _on(self, device: Optional[torch.device]) -> bool:
        if not self._state:
            return True
        first = next(iter(self._state.values()))
        return isinstance(first, torch.Tensor) and first.device == device

    def decide(self, m: Math, g: Scalar) -> tuple[Scalar, Flag, Any]:
        """From the reduced float64 total ``g``: ``(threshold, spike, pending state)``. Pure: the
        state changes only in :meth:`commit`."""
        self._prepare(m)
        spike: Flag = False  # no spike verdict without skip_above (a constant: no device op)
        if self.skip_above is not None and self.max_norm is not None:
            spike = g > self.skip_above * self.max_norm
        return (m.new(self.cap) if isinstance(m, DeviceMath) else m.const(self.cap)), spike, {}

    def commit(self, m: Math, pending: Any, accept: Flag) -> None:
        """Keep the pending state (a dict of key -> next value, ``{}`` without state) where
        ``accept``: the guard accepts a norm below :attr:`learn_below` on a step it does not skip."""
        state = self._prepare(m)
        for k, v in pending.items():
            state[k] = m.where(accept, v, state[k])

    def state_dict(self) -> dict[str, Any]:
        """The state (floats, or 0-dim float64 device tensors: no host read) and the config."""
        state = self._loaded if self._loaded is not None else (self._state if self._state is not None else self._fresh())
        return {"config": list(self.config()), "state": dict(state)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by :meth:`state_dict` (from any world size, host or device form)."""
        config = tuple(state_dict["config"])
        if config != self.config():
            raise ValueError(f"distclip: the saved policy {config} differs from this one {self.config()}")
        fresh = self._fresh()
        missing = set(fresh) - set(state_dict["state"])
        if missing:
            raise ValueError(f"distclip: the saved {self.kind} state lacks {sorted(missing)}")
        self._loaded = {k: state_dict["state"][k] for k in fresh}
        self._state = None


class FixedThreshold(Policy):
    """A fixed ``max_norm``, as :func:`distclip.clip_grad_norm_` (the default policy)."""


class ZClip(Policy):
    r"""ZClip: z-score spike detection on an EMA of the mean and variance of the norm.

    The variant of the reference code (``bluorion-com/ZClip``, ``zclip/zclip.py``), default
    arguments as there:

    - **Warm-up**: the first ``warmup_steps`` (25) norms are collected and the step is clipped at
      ``max_norm``; the step that completes them sets ``mean`` to their mean and ``var`` to their
      population variance (computed here with Welford's update instead of a buffer: the same
      values to rounding).
    - **Then** each step's ``z = (g - mean) / (sqrt(var) + eps)`` (``eps`` 1e-6) against the EMA
      *before* this step. ``mode="zscore"`` (default): ``z > z_thresh`` (2.5) is a spike, clipped
      at, with ``clip_option="adaptive_scaling"`` (default), ZClip's reciprocal rule
      ``(mean + z_thresh * std / (z / z_thresh)) * clip_factor`` (``clip_factor`` multiplies the
      whole threshold, as the code does; default 1), or with ``clip_option="mean"`` at ``mean``.
      ``mode="percentile"``: the threshold ``mean + z_thresh * std`` applies when exceeded.
      Steps that are not spikes are clipped at ``max_norm`` only (``None``: not clipped); a spike
      at ``min(adaptive threshold, max_norm)``.
    - **EMA update** with the *clipped* norm on a spike and the raw norm otherwise:
      ``mean = alpha * mean + (1 - alpha) * x``, ``var = alpha * var + (1 - alpha) * (x - mean)**2``
      with the *updated* mean, ``alpha`` 0.97. ``skip_update_on_spike=True`` keeps the EMA on
      spikes.
    - Differences from the reference, all for distributed use: a non-finite norm never enters the
      warm-up or the EMA (the reference would poison them with NaN), nor does a norm of 1e150 or
      more (its square overflows float64: the reference's variance would be inf from then on),
      a step the guard skips updates nothing, and the clip coefficient is distclip's
      ``min(1, threshold / (g + 1e-6))`` (the reference applies ``threshold / (g + 1e-6)`` only when ``g > threshold``: they differ
      by at most 1e-6 relative, for ``g`` within 1e-6 of the threshold).

    How it runs: a step is the same eleven float64 vector ops on the host (CPU tensors) and on an
    accelerator (no host read, no branch), over one state vector (:class:`_ZClipSteps`). The
    formulas are the reference's rearranged so that each op does one step for every lane (the
    spike test ``z > z_thresh`` as ``g - mean - z_thresh * (std + eps) > 0``, the EMA variance as
    ``alpha * var + (1 - alpha) * alpha**2 * (x - mean)**2``): the same values to rounding.

    Args:
        max_norm (float or None): the cap (ZClip's ``max_grad_norm``), also the threshold during
            warm-up. Default 1.0.
        alpha, z_thresh, eps, warmup_steps, mode, clip_option, clip_factor, skip_update_on_spike:
            as in the reference.
        skip_above (float, optional): a z-score: after warm-up, a step whose ``z`` exceeds it is a
            spike the guard skips (e.g. 6). During warm-up only non-finite norms are skipped.
    """

    kind = "zclip"
    # a norm's square stays finite, and no product with a 0 coefficient in the step's ``addmv``
    # meets an inf (``0 * inf`` is NaN: a NaN state would index no row of the phase table)
    learn_below = 1e150

    def __init__(self, max_norm: Optional[float] = 1.0, *, alpha: float = 0.97, z_thresh: float = 2.5, eps: float = 1e-6,
                 warmup_steps: int = 25, mode: str = "zscore", clip_option: str = "adaptive_scaling", clip_factor: float = 1.0,
                 skip_update_on_spike: bool = False, skip_above: Optional[float] = None) -> None:
        super().__init__(max_norm, skip_above=skip_above)
        self.alpha = _check_positive(alpha, "alpha")
        if self.alpha >= 1.0:
            raise ValueError(f"distclip: alpha must be in (0, 1), got {alpha!r}")
        self.z_thresh = _check_positive(z_thresh, "z_thresh")
        self.eps = _check_positive(eps, "eps")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise ValueError(f"distclip: warmup_steps must be a positive int, got {warmup_steps!r}")
        self.warmup_steps = warmup_steps
        self.mode = str(mode).lower()
        if self.mode not in ("zscore", "percentile"):
            raise ValueError(f"distclip: ZClip mode must be 'zscore' or 'percentile', got {mode!r}")
        self.clip_option = str(clip_option).lower()
        if self.clip_option not in ("adaptive_scaling", "mean"):
            raise ValueError(f"distclip: ZClip clip_option must be 'adaptive_scaling' or 'mean', got {clip_option!r}")
        self.clip_factor = _check_positive(clip_factor, "clip_factor")
        self.skip_update_on_spike = bool(skip_update_on_spike)
        self._lanes: Optional[torch.Tensor] = None  # the state vector ``S`` of :class:`_ZClipSteps`
        self._steps: dict[torch.device, _ZClipSteps] = {}  # the step's constant tables, by device
        self._host_form = True  # the form state_dict gives: floats (host) or device tensors

    def config(self) -> tuple:
        return (self.kind, self.max_norm, self.skip_above, self.alpha, self.z_thresh, self.eps, self.warmup_steps, self.mode,
                self.clip_option if self.mode == "zscore" else None, self.clip_factor, self.skip_update_on_spike)

    def _fresh(self) -> dict[str, float]:
        # n: warm-up norms so far; during warm-up ``mean``/``v`` are Welford's running mean and sum
        # of squared deviations, after it (``ready`` 1.0) the EMA mean and variance
        return {"n": 0.0, "mean": 0.0, "v": 0.0, "ready": 0.0}

    def _steps_on(self, device: torch.device) -> _ZClipSteps:
        steps = self._steps.get(device)
        if steps is None:
            steps = self._steps[device] = _ZClipSteps(self, device)
        return steps

    def _prepare_lanes(self, m: Math) -> torch.Tensor:
        """The state vector on ``m``'s device (CPU in the host form): built from the canonical
        state at the start and after a load, moved (one copy) after a switch of device."""
        device = torch.device("cpu") if m.host else m.device
        assert device is not None
        self._host_form = m.host
        if self._loaded is not None or self._lanes is None:
            source = self._loaded if self._loaded is not None else self._fresh()
            self._lanes, self._loaded = self._steps_on(device).build(source), None
        elif self._lanes.device != device:
            self._lanes = self._lanes.to(device)
        return self._lanes

    def decide(self, m: Math, g: Scalar) -> tuple[Scalar, Flag, Any]:
        state = self._prepare_lanes(m)
        steps = self._steps_on(state.device)
        g_t = g if isinstance(g, torch.Tensor) else torch.full((), float(g), dtype=torch.float64, device=state.device)
        threshold, clip_spike, skip_spike, pending = steps.step(state, g_t)
        if self.skip_update_on_spike:
            pending = torch.where(clip_spike, state, pending)
        spike: Flag = False  # no spike verdict without skip_above (a constant: no device op)
        if self.skip_above is not None:
            spike = bool(skip_spike) if m.host else skip_spike
        return (float(threshold) if m.host else threshold), spike, pending

    def commit(self, m: Math, pending: Any, accept: Flag) -> None:
        if isinstance(accept, torch.Tensor):
            assert self._lanes is not None
            self._lanes = torch.where(accept, pending, self._lanes)
        elif accept:
            self._lanes = pending

    def state_dict(self) -> dict[str, Any]:
        """``{"config", "state": {"n", "mean", "v", "ready"}}``: floats in the host form, 0-dim
        float64 device tensors in the device form (no host read)."""
        if self._loaded is not None or self._lanes is None:
            return super().state_dict()
        lanes = _ZClipSteps.CANONICAL
        state: dict[str, Any] = {k: self._lanes[i] for k, i in lanes.items()}
        if self._host_form:
            state = {k: float(v) for k, v in state.items()}
        return {"config": list(self.config()), "state": state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._lanes = None


class _ZClipSteps:
    """One ZClip step as eleven float64 vector ops over the state vector ``S`` (on the device it
    lives on), and the constant tables they read.

    ``S`` holds the canonical state (``n``, ``ready``, ``v``, ``mean``) and, worked out by the
    previous step, the lanes this step needs so that each op is one formula over a few lanes:

    - ``D = S[BASE] + S[SLOPE] * g`` is ``[g - mean - K, g - mean - K_skip, g, d, v, mean, inf]``
      with ``d = g - mean``, ``K = z_thresh * (std + eps)`` (``mode="percentile"``:
      ``z_thresh * std``) and ``K_skip = skip_above * (std + eps)``, both ``+inf`` during warm-up;
    - ``S[SPIKE] + S[NUM] / d`` is the same lanes on a spike: ``[., ., x, e, v, mean, x]`` with
      ``x = clip_val`` (ZClip's reciprocal rule is ``clip_factor * (mean + z_thresh**2 * std *
      (std + eps) / d)``) and ``e = x - mean``.

    A step: the phase's row of a table indexed by ``n`` (2 ops: the index as an integer, the row);
    ``D`` (``addcmul``, 1); the spike verdicts ``D[0:2] > 0`` (1); the spike lanes (``addcdiv``, 1);
    ``X``, this step's lanes (``where``, 1); ``[x, e**2, v, mean]`` (``pow``, 1);
    ``[mean', v', v'] = M @ [x, e**2, v, mean]`` with ``M`` the phase's coefficients: the EMA's
    ``alpha * mean + (1 - alpha) * x`` and ``alpha * v + (1 - alpha) * alpha**2 * e**2`` (the
    reference's ``(x - mean')**2`` expanded), or Welford's (``mv``, 1); ``[mean', v', std']``
    (``pow``, 1); the next ``S = bias + LANES @ [mean', v', std']`` (``addmv``, 1: every lane is
    linear in those three, with ``std**2`` for ``v``; the next phase's constants, ``+-inf``
    included, are the row's bias); the threshold ``fmin(X[6], cap)`` (1: ``fmin`` drops the NaN a
    non-finite norm gives the lane). The table has ``warmup_steps + 1`` rows of 44 float64 (352 B).
    """

    N, READY, V, MEAN = 0, 1, 2, 3
    CANONICAL = {"n": N, "mean": MEAN, "v": V, "ready": READY}
    SPIKE_TEST, SKIP_TEST, X, E, VAR, AVG, THRESHOLD = range(7)  # the lanes of D and X
    BASE, SLOPE, SPIKE, NUM = slice(4, 11), slice(11, 18), slice(18, 25), slice(25, 32)
    SIZE = 32
    COEFS = 12  # M, 3 x 4, at the start of a table row

    def __init__(self, policy: ZClip, device: torch.device) -> None:
        f64: dict[str, Any] = {"dtype": torch.float64, "device": device}
        w, alpha, zt = policy.warmup_steps, policy.alpha, policy.z_thresh
        self.warmup_steps = w
        beta, eps, cf = 1.0 - alpha, policy.eps, policy.clip_factor
        sa = policy.skip_above if policy.skip_above is not None else 0.0
        self.cap = torch.full((), policy.cap, **f64)
        self.pow_x = torch.full((4,), 1.0, **f64)
        self.pow_x[1] = 2.0  # [x, e**2, v, mean]
        self.pow_w = torch.full((3,), 1.0, **f64)
        self.pow_w[2] = 0.5  # [mean', v', std']

        # LANES: every lane of the next S from [mean', v', std'] (the phase's constants are the bias)
        base, slope, spike, num = self.BASE.start, self.SLOPE.start, self.SPIKE.start, self.NUM.start
        mean_, var_ = (1.0, 0.0, 0.0), (0.0, 1.0, 0.0)
        rows: dict[int, tuple[float, float, float]] = {
            self.V: var_, self.MEAN: mean_,
            base + self.SPIKE_TEST: (-1.0, 0.0, -zt), base + self.SKIP_TEST: (-1.0, 0.0, -sa), base + self.E: (-1.0, 0.0, 0.0),
            base + self.VAR: var_, base + self.AVG: mean_, spike + self.VAR: var_, spike + self.AVG: mean_}
        if policy.mode == "percentile":  # clip_val = mean + z_thresh * std
            clip_val, excess, reciprocal = (1.0, 0.0, zt), (0.0, 0.0, zt), None
        elif policy.clip_option == "mean":  # clip_val = mean
            clip_val, excess, reciprocal = mean_, None, None
        else:  # clip_val = clip_factor * mean + clip_factor * z_thresh**2 * (v + eps * std) / d
            clip_val, excess, reciprocal = (cf, 0.0, 0.0), (cf - 1.0, 0.0, 0.0), (0.0, cf * zt * zt, cf * zt * zt * eps)
        for lane in (self.X, self.THRESHOLD):
            rows[spike + lane] = clip_val
            if reciprocal is not None:
                rows[num + lane] = reciprocal
        if excess is not None:
            rows[spike + self.E] = excess
        if reciprocal is not None:
            rows[num + self.E] = reciprocal
        lanes = torch.zeros(self.SIZE, 3, **f64)
        for lane, row in rows.items():
            for j, value in enumerate(row):
                if value:
                    lanes[lane, j] = value
        self.lanes = lanes

        # BIAS[p]: the constant lanes of a state in phase p = n, 0..w (w: the warm-up is done)
        phases = torch.arange(w + 1, **f64)
        bias = torch.zeros(w + 1, self.SIZE, **f64)
        bias[:, self.N] = phases
        bias[w, self.READY] = 1.0
        bias[:, base:base + 2] = -math.inf  # no spike during warm-up
        bias[w, base + self.SPIKE_TEST] = -zt * eps if policy.mode == "zscore" else 0.0
        if policy.skip_above is not None:
            bias[w, base + self.SKIP_TEST] = -sa * eps
        bias[:, base + self.THRESHOLD] = math.inf  # no clip_val off a spike
        bias[:, slope:slope + 4] = 1.0  # the lanes that hold g
        self.warm_bias, self.ready_bias = bias[0].clone(), bias[w].clone()  # for ``build`` (with ``n`` set)
        # TABLE[k]: M for phase k (row-major), then BIAS[next phase]
        coefs = torch.zeros(w + 1, 3, 4, **f64)
        weight_x, weight_mean, weight_e2, weight_v = coefs[:, 0, 0], coefs[:, 0, 3], coefs[:, 1, 1], coefs[:, 1, 2]
        weight_x.copy_(1.0 / (phases + 1.0))  # Welford: mean' = (1 - q) mean + q g, M2' = M2 + (1 - q) d**2, q = 1 / (n + 1)
        weight_mean.copy_(1.0 - weight_x)
        weight_e2.copy_(weight_mean)
        weight_v.fill_(1.0)
        weight_v[w - 1], weight_e2[w - 1] = 1.0 / w, (1.0 - 1.0 / w) / w  # the step that completes the warm-up: M2 / w
        weight_x[w], weight_mean[w], weight_e2[w], weight_v[w] = beta, alpha, beta * alpha * alpha, alpha  # the EMA
        coefs[:, 2] = coefs[:, 1]
        following = torch.clamp(phases + 1.0, max=float(w)).long()
        self.table = torch.cat([coefs.view(w + 1, self.COEFS), bias.index_select(0, following)], dim=1)

    def build(self, canonical: dict[str, Any]) -> torch.Tensor:
        """``S`` from the canonical state (floats or 0-dim tensors anywhere; no host read)."""
        device = self.lanes.device
        values = {k: (v.to(device=device, dtype=torch.float64) if isinstance(v, torch.Tensor)
                      else torch.full((), float(v), dtype=torch.float64, device=device)) for k, v in canonical.items()}
        # within what a step can make (ZClip.learn_below; an older version learned any finite norm)
        mean = values["mean"].nan_to_num(0.0).clamp(-ZClip.learn_below, ZClip.learn_below)
        var = values["v"].nan_to_num(0.0).clamp(0.0, ZClip.learn_below ** 2)
        moments = torch.stack([mean, var, var]).pow(self.pow_w)
        phase = values["n"].nan_to_num(0.0).clamp(0.0, float(self.warmup_steps)).floor()
        bias = torch.where(phase >= self.warmup_steps, self.ready_bias, self.warm_bias)
        bias = torch.cat([phase.view(1), bias[self.N + 1:]])
        return torch.addmv(bias, self.lanes, moments)

    def step(self, state: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(threshold, spike (clip), spike (skip_above), next S) for the norm ``g``."""
        row = self.table.index_select(0, state[self.N:self.N + 1].long())[0]
        d = torch.addcmul(state[self.BASE], state[self.SLOPE], g)
        spikes = d[self.SPIKE_TEST:self.SKIP_TEST + 1] > 0.0
        spike = spikes[0]
        on_spike = torch.addcdiv(state[self.SPIKE], state[self.NUM], d[self.E])
        x = torch.where(spike, on_spike, d)
        moments = torch.mv(row[:self.COEFS].view(3, 4), x[self.X:self.AVG + 1].pow(self.pow_x))
        following = torch.addmv(row[self.COEFS:], self.lanes, moments.pow(self.pow_w))
        return torch.fmin(x[self.THRESHOLD], self.cap), spike, spikes[1], following


class _HostHistory:
    """AutoClip's history on the host: the accepted norms in order (at most ``size``) and sorted."""

    def __init__(self, size: Optional[int], values: list[float], count: float) -> None:
        self.size = size
        self.order: collections.deque[float] = collections.deque(values)
        self.sorted = sorted(values)
        self.count = count  # norms accepted since the start (the ring's write position)

    def export(self) -> tuple[list[float], float]:
        return list(self.order), self.count


class _DeviceHistory:
    """AutoClip's history on the device: a ring of ``capacity`` float64 slots (norm number ``j``
    in slot ``j % size``, or ``j`` without a size; unused slots ``+inf``) and the count."""

    def __init__(self, size: Optional[int], slots: torch.Tensor, count: torch.Tensor) -> None:
        self.size = size
        self.slots = slots
        self.count = count
        self.arange = torch.arange(slots.numel(), device=slots.device, dtype=torch.float64)

    def grow(self, needed: int) -> None:
        """Unbounded history: room for ``needed`` norms (a host-known count: no read)."""
        capacity = self.slots.numel()
        if self.size is not None or needed <= capacity:
            return
        new = max(64, capacity)
        while new < needed:
            new *= 2
        pad = torch.full((new - capacity,), _INF, dtype=torch.float64, device=self.slots.device)
        self.slots = torch.cat([self.slots, pad])
        self.arange = torch.arange(new, device=self.slots.device, dtype=torch.float64)


def _lerp(a: Scalar, b: Scalar, t: Scalar, m: Math) -> Scalar:
    """numpy's linear interpolation (``numpy.percentile``'s ``_lerp``): from ``b`` when ``t >= 0.5``."""
    diff = b - a
    return m.where(t >= 0.5, b - diff * (1.0 - t), a + diff * t)


class AutoClip(Policy):
    r"""AutoClip: clip at a percentile of the history of gradient norms.

    The variant of the reference code (``pseeth/autoclip``, ``autoclip.py``): each step appends
    its norm to the history, then clips at ``numpy.percentile(history, percentile)`` (linear
    interpolation between order statistics, numpy's default; computed here with the same
    formula), so the first step's threshold is its own norm. ``percentile`` defaults to the
    paper's 10. ``history_size=None`` (default) keeps the whole history, as the PyTorch reference
    does; an int keeps the last ``history_size`` norms, as the TensorFlow reference
    (``autoclip_tf.py``, 10 000 there). The threshold is capped at ``max_norm`` (``None``: no cap;
    the reference has none).

    Differences from the reference, for distributed use: a non-finite norm never enters the
    history (the reference's percentile would be NaN from then on; that step's threshold is the
    percentile of the history without it), a step the guard skips is not appended, and the clip
    coefficient is distclip's ``min(1, threshold / (g + 1e-6))`` (torch's, as the reference).

    Cost per step: on the host a sorted insert (O(history) memory moves); on the device a sort of
    the history buffer (unbounded history grows by doubling: set ``history_size`` for long runs).

    Args:
        max_norm (float or None): the cap. Default 1.0.
        percentile (float): the percentile in [0, 100]. Default 10.
        history_size (int, optional): how many recent norms to keep. Default: all.
        skip_above (float, optional): a factor of this step's threshold (the percentile, before
            the cap): a norm above ``skip_above * threshold`` is a spike the guard skips.
    """

    kind = "autoclip"

    def __init__(self, max_norm: Optional[float] = 1.0, *, percentile: float = 10.0, history_size: Optional[int] = None,
                 skip_above: Optional[float] = None) -> None:
        super().__init__(max_norm, skip_above=skip_above)
        q = _check_positive(percentile, "percentile", allow_zero=True)
        if q > 100.0:
            raise ValueError(f"distclip: percentile must be in [0, 100], got {percentile!r}")
        self.percentile = q
        if history_size is not None and (isinstance(history_size, bool) or not isinstance(history_size, int) or history_size < 1):
            raise ValueError(f"distclip: history_size must be a positive int or None, got {history_size!r}")
        self.history_size = history_size
        self._hist: Union[_HostHistory, _DeviceHistory, None] = None
        self._bound = 0  # a host-known upper bound on the count (grows the unbounded ring without a read)

    def config(self) -> tuple:
        return (self.kind, self.max_norm, self.skip_above, self.percentile, self.history_size)

    # -- state: (values in order, count), converted between the two forms --------------------
    def _export(self) -> tuple[Any, Any]:
        """(values, count): host: a list oldest first; device: the ring slots (no read)."""
        if self._loaded is not None:
            return self._loaded["history"], self._loaded["count"]
        if isinstance(self._hist, _HostHistory):
            return self._hist.export()
        if isinstance(self._hist, _DeviceHistory):
            return self._hist.slots, self._hist.count
        return [], 0.0

    def _history_list(self, values: Any, count: Any) -> list[float]:
        """The accepted norms oldest first, from either form (reads device values: load time only)."""
        n = int(_to_float(count))
        vals = values.double().cpu().tolist() if isinstance(values, torch.Tensor) else [float(v) for v in values]
        if isinstance(values, torch.Tensor):  # ring slots
            if self.history_size is None:
                return vals[:n]
            k = min(n, self.history_size)
            return [vals[(n - k + i) % self.history_size] for i in range(k)]
        return vals[-self.history_size:] if self.history_size is not None else vals

    def _ring(self, order: list[float], count: float, device: torch.device) -> _DeviceHistory:
        n = int(count)
        capacity = self.history_size if self.history_size is not None else max(64, len(order))
        slots = [_INF] * capacity
        k = len(order)
        for i, v in enumerate(order):
            slots[((n - k + i) % self.history_size) if self.history_size is not None else i] = v
        return _DeviceHistory(self.history_size, torch.tensor(slots, dtype=torch.float64, device=device),
                              torch.full((), float(n if self.history_size is not None else k), dtype=torch.float64, device=device))

    def _prepare_hist(self, m: Math) -> Union[_HostHistory, _DeviceHistory]:
        hist = self._hist
        if m.host and isinstance(hist, _HostHistory) and self._loaded is None:
            return hist
        if not m.host and isinstance(hist, _DeviceHistory) and self._loaded is None and hist.slots.device == m.device:
            return hist
        values, count = self._export()
        if isinstance(m, DeviceMath) and isinstance(values, torch.Tensor):  # device form to device: no read
            slots = values.to(device=m.device, dtype=torch.float64)
            cnt = count.to(device=m.device, dtype=torch.float64) if isinstance(count, torch.Tensor) else m.new(count)
            new: Union[_HostHistory, _DeviceHistory] = _DeviceHistory(self.history_size, slots, cnt)
        else:
            order = self._history_list(values, count)
            if m.host:
                new = _HostHistory(self.history_size, order, _to_float(count) if self.history_size is not None else float(len(order)))
            else:
                assert m.device is not None
                new = self._ring(order, _to_float(count) if self.history_size is not None else float(len(order)), m.device)
        self._hist, self._loaded = new, None
        return new

    def decide(self, m: Math, g: Scalar) -> tuple[Scalar, Flag, Any]:
        hist = self._prepare_hist(m)
        q = self.percentile / 100.0
        self._bound += 1
        if isinstance(hist, _HostHistory):
            finite = m.isfinite(g)
            evicted = None
            s = hist.sorted
            if finite:  # tentatively in (undone in commit when not accepted)
                bisect.insort(s, float(g))
                if hist.size is not None and len(hist.order) >= hist.size:
                    evicted = hist.order[0]
                    del s[bisect.bisect_left(s, evicted)]
            k = len(s)
            if k:
                pos = (k - 1) * q
                lo = math.floor(pos)
                t = pos - lo
                value: Scalar = _lerp(s[lo], s[min(lo + 1, k - 1)], t, m)
            else:
                value = _INF
            pending: Any = (float(g), evicted, bool(finite))
        else:
            assert isinstance(m, DeviceMath)
            hist.grow(self._bound)
            finite_t = m.isfinite(g)
            index = torch.remainder(hist.count, float(hist.size)) if hist.size is not None else hist.count
            candidate = torch.where((hist.arange == index) & finite_t, g, hist.slots)
            count1 = hist.count + finite_t  # float64 + bool
            k_t = count1.clamp(max=float(hist.size)) if hist.size is not None else count1
            ordered = torch.sort(candidate).values  # slots never written hold +inf: they sort last
            last = k_t - 1.0
            pos_t = last * q
            lo_t = torch.floor(pos_t).clamp(min=0.0)
            hi_t = torch.minimum(lo_t + 1.0, last).clamp(min=0.0)
            a, b = ordered.gather(0, torch.stack([lo_t, hi_t]).long()).unbind()
            value = torch.where(k_t > 0, _lerp(a, b, pos_t - lo_t, m), _INF)
            pending = (candidate, count1)
        spike: Flag = False  # no spike verdict without skip_above (a constant: no device op)
        if self.skip_above is not None:
            spike = g > value * self.skip_above
        threshold = m.minimum(value, self.max_norm) if self.max_norm is not None else value
        if m.host:
            threshold = float(threshold)
        return threshold, spike, pending

    def commit(self, m: Math, pending: Any, accept: Flag) -> None:
        hist = self._hist
        if isinstance(hist, _HostHistory):
            g, evicted, finite = pending
            if not finite:
                return
            if accept:
                hist.order.append(g)
                if evicted is not None:
                    hist.order.popleft()
                hist.count += 1.0
            else:  # undo the tentative insert
                del hist.sorted[bisect.bisect_left(hist.sorted, g)]
                if evicted is not None:
                    bisect.insort(hist.sorted, evicted)
        elif isinstance(hist, _DeviceHistory):
            candidate, count1 = pending
            assert isinstance(accept, torch.Tensor)  # the device form decides on the device
            hist.slots = torch.where(accept, candidate, hist.slots)
            hist.count = torch.where(accept, count1, hist.count)

    def state_dict(self) -> dict[str, Any]:
        """``{"config", "state": {"history", "count", "form"}}``: on the host the history oldest
        first (``form="order"``, a CPU float64 tensor); on the device the ring slots and the count
        as they are (``form="ring"``, device tensors: no host read)."""
        values, count = self._export()
        if isinstance(values, list):
            return {"config": list(self.config()),
                    "state": {"history": torch.tensor(values, dtype=torch.float64), "count": _to_float(count), "form": "order"}}
        return {"config": list(self.config()), "state": {"history": values, "count": count, "form": "ring"}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        config = tuple(state_dict["config"])
        if config != self.config():
            raise ValueError(f"distclip: the saved policy {config} differs from this one {self.config()}")
        st = state_dict["state"]
        values = st["history"]
        if st.get("form", "order") == "order":  # oldest first: kept as a list (the host form)
            values = values.double().cpu().tolist() if isinstance(values, torch.Tensor) else [float(v) for v in values]
            bound = len(values) if self.history_size is None else int(_to_float(st["count"]))
        else:  # ring slots: the count is at most the number of slots (unbounded) or unknown without a read
            values = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=torch.float64)
            bound = values.numel()
        self._loaded = {"history": values, "count": st["count"]}
        self._hist = None
        self._bound = bound


# ----------------------------------------------------------------------------- construction

_ADAPTIVE = {None: FixedThreshold, "fixed": FixedThreshold, "zclip": ZClip, "autoclip": AutoClip}


def make_policy(max_norm: Optional[float] = 1.0, adaptive: Union[str, Policy, None] = None, *, skip_above: Optional[float] = None,
                **options: Any) -> Policy:
    """The policy ``GradGuard(max_norm, adaptive=..., skip_above=..., **options)`` uses.

    Args:
        max_norm (float or None): the threshold, or the adaptive policies' cap.
        adaptive (str or Policy, optional): ``None`` (fixed), ``"zclip"``, ``"autoclip"``, or a
            policy object (copied; ``max_norm``/``skip_above``/options must then be left unset).
        skip_above (float, optional): see each policy.
        **options: the policy's own keywords (e.g. ``alpha``, ``z_thresh``, ``warmup_steps`` for
            ZClip; ``percentile``, ``history_size`` for AutoClip).

    Returns:
        A fresh :class:`Policy`.
    """
    if isinstance(adaptive, Policy):
        if options or skip_above is not None:
            raise TypeError("distclip: pass the options to the policy object itself")
        return copy.deepcopy(adaptive)
    key = adaptive.lower() if isinstance(adaptive, str) else adaptive
    if key not in _ADAPTIVE:
        raise ValueError(f"distclip: adaptive must be None, 'zclip', 'autoclip' or a Policy, got {adaptive!r}")
    cls = _ADAPTIVE[key]
    try:
        return cls(max_norm, skip_above=skip_above, **options)
    except TypeError as e:
        raise TypeError(f"distclip: {cls.__name__}: {e}") from None
