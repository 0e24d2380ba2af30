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
  each op is a kernel launch, so ZClip's step is ten vector ops whatever the branch
  (:class:`_ZClipSteps`) and AutoClip's a sort of its history buffer.

The fixed policy and AutoClip are written once against a tiny math backend (``HOST``: Python
float64; :class:`DeviceMath`: the same operations as tensor ops) that gives the same bits both
ways. ZClip runs the same torch ops in both forms (on CPU tensors in the host form), so the two
forms agree bit for bit on CPU (``tests/worlds/test_guard.py`` checks both against the authors'
code). A non-finite norm never enters a policy's state (nor one of ``LEARN_BELOW`` = 1e150 or
more, whose square overflows float64), and a step the guard skips leaves the state as it was.

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
# The guard commits a norm to a policy's state only below this: its square (ZClip's variance)
# stays finite, and a product with a 0 coefficient never meets an inf (``0 * inf`` is NaN).
LEARN_BELOW = 1e150


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

    def __init__(self, max_norm: Optional[float] = 1.0, *, skip_above: Optional[float] = None) -> None:
        self.max_norm = _check_cap(max_norm)
        self.skip_above = None if skip_above is None else _check_positive(skip_above, "skip_above")
        self._state: Optional[dict[str, Scalar]] = None
        self._state_host: Optional[bool] = None
        self._loaded: Optional[dict[str, Any]] = None
        self._vec: Optional[torch.Tensor] = None  # the device form's state as one vector, in ``_fresh()`` order

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
        self._vec = None
        if isinstance(m, DeviceMath) and source:
            # one float64 vector, its lanes the keys' 0-dim views: a step's commit is one ``where``
            self._vec = torch.stack([v.to(device=m.device, dtype=torch.float64) if isinstance(v, torch.Tensor) else m.new(v)
                                     for v in source.values()])
            state: dict[str, Scalar] = dict(zip(source, self._vec.unbind()))
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
        """Keep the pending state where ``accept`` (a finite norm on a step that is not skipped).
        ``pending``: every key's next value in ``_fresh()`` order (a list on the host, a vector on
        the device, kept by one ``where``), or a dict of key -> next value (a policy of one's own,
        as before the vector form; ``{}`` for a policy without state)."""
        state = self._prepare(m)
        if isinstance(pending, dict):
            for k, v in pending.items():
                state[k] = m.where(accept, v, state[k])
        elif isinstance(pending, torch.Tensor):
            assert isinstance(m, DeviceMath) and self._vec is not None
            vec = self._vec = m.where(accept, pending, self._vec)
            self._state = dict(zip(state, vec.unbind()))
        elif pending and accept:
            state.update(zip(list(state), pending))

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
      a step the guard skips updates nothing, and the clip coefficient is distclip's ``min(1, threshold / (g + 1e-6))``
      (the reference applies ``threshold / (g + 1e-6)`` only when ``g > threshold``: they differ
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
        vec = self._prepare_lanes(m)
        steps = self._steps_on(vec.device)
        g_t = g if isinstance(g, torch.Tensor) else torch.tensor(float(g), dtype=torch.float64)
        threshold, clip_spike, skip_spike, pending = steps.step(vec, g_t)
        if self.skip_update_on_spike:
            pending = torch.where(clip_spike, vec, pending)
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

    - ``D = S[BASE] + S[SLOPE] * g`` is ``[g - mean - K, g - mean - K_skip, d, d, v, inf]`` with
      ``d = g - mean``, ``K = z_thresh * (std + eps)`` (``mode="percentile"``: ``z_thresh * std``)
      and ``K_skip = skip_above * (std + eps)``, both ``+inf`` during warm-up;
    - ``S[SPIKE] + S[NUM] / d`` is the same lanes on a spike: ``[., ., e, e, v, clip_val]`` with
      ``e = clip_val - mean`` (ZClip's reciprocal rule is ``clip_factor * (mean + z_thresh**2 *
      std * (std + eps) / d)``).

    A step: the phase's row of a table indexed by ``n`` (2 ops: the index as an integer, the row);
    ``D`` (1); the spike verdicts ``D[0:2] > 0`` (1); the spike lanes (1); ``X``, this step's lanes
    (``where``, 1); ``[e, e**2, v]`` (``pow``, 1); ``[mean', v', v'] = [mean, 0, 0] + M @ [e, e**2, v]``
    with ``M`` the phase's coefficients, Welford's or the EMA's (``addmv``, 1); ``[mean', v', std']``
    (``pow``, 1); the next ``S = bias + LANES @ [mean', v', std']`` (``addmv``, 1: every lane above
    is linear in those three with ``std**2`` for ``v``; the next phase's constants, ``-inf``
    included, are the row's bias); the threshold ``fmin(X[5], cap)`` (1: ``fmin`` drops the NaN a
    non-finite norm gives the lane).
    """

    N, READY, V, MEAN = 0, 1, 2, 3  # MEAN, MEAN + 1, MEAN + 2: ``[mean, 0, 0]``, the bias of ``[mean', v', v']``
    CANONICAL = {"n": N, "mean": MEAN, "v": V, "ready": READY}
    WIDTH = 6  # lanes of D: spike test, skip test, e, e, v, threshold
    BASE, SLOPE, SPIKE, NUM = slice(6, 12), slice(12, 18), slice(18, 24), slice(24, 30)
    SIZE = 30

    def __init__(self, policy: ZClip, device: torch.device) -> None:
        f64: dict[str, Any] = {"dtype": torch.float64, "device": device}
        w, alpha, zt = policy.warmup_steps, policy.alpha, policy.z_thresh
        beta, eps, cf = 1.0 - alpha, policy.eps, policy.clip_factor
        sa = policy.skip_above if policy.skip_above is not None else 0.0
        self.cap = torch.full((), policy.cap, **f64)
        self.pow_e = torch.full((3,), 1.0, **f64)
        self.pow_e[1] = 2.0  # [e, e**2, v]
        self.pow_w = torch.full((3,), 1.0, **f64)
        self.pow_w[2] = 0.5  # [mean', v', std']

        # LANES: every lane of the next S from [mean', v', std'] (the phase's constants come with the bias)
        lanes = torch.zeros(self.SIZE, 3, **f64)
        b, s, sp, nm = self.BASE.start, self.SLOPE.start, self.SPIKE.start, self.NUM.start
        mean_only = (1.0, 0.0, 0.0)
        rows: dict[int, tuple[float, float, float]] = {
            self.V: (0.0, 1.0, 0.0), self.MEAN: mean_only,
            b: (-1.0, 0.0, -zt), b + 1: (-1.0, 0.0, -sa), b + 2: (-1.0, 0.0, 0.0), b + 3: (-1.0, 0.0, 0.0),
            b + 4: (0.0, 1.0, 0.0), sp + 4: (0.0, 1.0, 0.0)}
        if policy.mode == "percentile":  # clip_val = mean + z_thresh * std
            rows.update({sp + 2: (0.0, 0.0, zt), sp + 3: (0.0, 0.0, zt), sp + 5: (1.0, 0.0, zt)})
        elif policy.clip_option == "mean":  # clip_val = mean
            rows[sp + 5] = mean_only
        else:  # clip_val = clip_factor * (mean + z_thresh**2 * std * (std + eps) / d), std**2 = v
            n = (0.0, cf * zt * zt, cf * zt * zt * eps)
            rows.update({sp + 2: (cf - 1.0, 0.0, 0.0), sp + 3: (cf - 1.0, 0.0, 0.0), sp + 5: (cf, 0.0, 0.0),
                         nm + 2: n, nm + 3: n, nm + 5: n})
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
        bias[:, b:b + 2] = -math.inf  # no spike during warm-up
        bias[w, b] = -zt * eps if policy.mode == "zscore" else 0.0
        if policy.skip_above is not None:
            bias[w, b + 1] = -sa * eps
        bias[:, b + 5] = math.inf
        bias[:, s:s + 4] = 1.0
        self.bias = bias
        # TABLE[k]: the step's coefficients M for phase k (row-major), then BIAS[next phase]
        m = torch.zeros(w + 1, 3, 3, **f64)
        c, a, b2 = m[:, 0, 0], m[:, 1, 2], m[:, 1, 1]
        c.copy_(1.0 / (phases + 1.0))  # Welford: mean += d / (n + 1), M2 += d**2 * n / (n + 1)
        b2.copy_(1.0 - c)
        a.fill_(1.0)
        a[w - 1], b2[w - 1] = 1.0 / w, (1.0 - 1.0 / w) / w  # the step that completes the warm-up: M2 / w
        c[w], a[w], b2[w] = beta, alpha, beta * alpha * alpha  # the EMA
        m[:, 2] = m[:, 1]
        following = torch.clamp(phases + 1.0, max=float(w)).long()
        self.table = torch.cat([m.view(w + 1, 9), bias.index_select(0, following)], dim=1)

    def build(self, canonical: dict[str, Any]) -> torch.Tensor:
        """``S`` from the canonical state (floats or 0-dim tensors anywhere; no host read)."""
        device = self.lanes.device
        values = {k: (v.to(device=device, dtype=torch.float64) if isinstance(v, torch.Tensor)
                      else torch.full((), float(v), dtype=torch.float64, device=device)) for k, v in canonical.items()}
        # a state saved before LEARN_BELOW may hold an inf variance: kept finite, as no step makes it now
        w_vec = torch.stack([values["mean"], values["v"], values["v"]]).nan_to_num(posinf=LEARN_BELOW ** 2).pow(self.pow_w)
        phase = values["n"].clamp(0.0, float(self.bias.shape[0] - 1)).long().view(1)
        return torch.addmv(self.bias.index_select(0, phase)[0], self.lanes, w_vec)

    def step(self, vec: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(threshold, spike (clip), spike (skip_above), next S) for the norm ``g``."""
        row = self.table.index_select(0, vec[self.N:self.N + 1].long())[0]
        d = torch.addcmul(vec[self.BASE], vec[self.SLOPE], g)
        spikes = d[0:2] > 0.0
        spike = spikes[0]
        on_spike = torch.addcdiv(vec[self.SPIKE], vec[self.NUM], d[2])
        x = torch.where(spike, on_spike, d)
        powers = x[2:5].pow(self.pow_e)
        moments = torch.addmv(vec[self.MEAN:self.MEAN + 3], row[:9].view(3, 3), powers)
        nxt = torch.addmv(row[9:], self.lanes, moments.pow(self.pow_w))
        return torch.fmin(x[5], self.cap), spike, spikes[1], nxt


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
