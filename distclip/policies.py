"""Clipping policies for :class:`distclip.GradGuard`: a fixed threshold, ZClip and AutoClip.

A policy turns the step's total gradient norm into the threshold (``max_norm``) applied this step
and a spike verdict, from a small float64 state. Its only input is the **reduced float64 total**
that distclip's one all-reduce gives every rank bit for bit, so every rank computes the same
threshold and the same next state without any collective of its own.

Each policy is written once against a tiny math backend and runs two ways:

- ``HOST`` (where ``distclip.host_reads.host_reads_allowed`` says a read is free, i.e. CPU): the
  state is Python floats, the arithmetic Python's float64;
- :class:`DeviceMath` (accelerators, ``meta``): the state is float64 tensors on the device (one
  vector whose lanes are the keys' 0-dim views, committed by one ``torch.where``), every branch a
  ``torch.where``; nothing is read on the host (no ``.item()``, no ``bool()``). On a GPU each op is
  a kernel launch, so independent scalar operations of one kind run as the lanes of one
  ``torch._foreach_*`` op (``each``).

Both backends run the same IEEE float64 operations in the same order (``+ - * /``, ``sqrt``,
comparisons), so they give the same bits (``tests/worlds/test_guard.py`` checks it; no fused
``lerp``/``addcmul``, whose kernels may round once where the host rounds twice). A non-finite norm
never enters a policy's state, and a step the guard skips leaves the state as it was.

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
import operator
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
    def sqrt(x: Scalar) -> Scalar:
        x = float(x)
        if x != x:
            return math.nan
        return math.sqrt(x) if x > 0.0 else 0.0  # a rounding-negative variance counts as 0

    @staticmethod
    def div(a: Scalar, b: Scalar) -> Scalar:
        a, b = float(a), float(b)
        if b != 0.0:
            return a / b
        if a == 0.0 or a != a:
            return math.nan
        return math.copysign(_INF, a) * math.copysign(1.0, b)

    @staticmethod
    def minimum(a: Scalar, b: float) -> Scalar:
        a = float(a)
        return a if (a != a or a <= b) else b

    @staticmethod
    def floor(x: Scalar) -> Scalar:
        x = float(x)
        return float(math.floor(x)) if math.isfinite(x) else x

    @staticmethod
    def isfinite(x: Scalar) -> Flag:
        return math.isfinite(float(x))

    @staticmethod
    def false() -> Flag:
        return False

    @classmethod
    def each(cls, op: str, xs: list[Scalar], ys: list[Scalar]) -> list[Scalar]:
        """``[x op y for x, y in zip(xs, ys)]``, ``op`` one of ``"add" "sub" "mul" "div"``."""
        if op == "div":
            return [cls.div(x, y) for x, y in zip(xs, ys)]
        return [_BINARY[op](float(x), float(y)) for x, y in zip(xs, ys)]

    @staticmethod
    def rows(*rows: list[Scalar]) -> tuple[list[float], ...]:
        """Candidate values of a state, one list per row: ``where`` picks a whole row."""
        return tuple([float(x) for x in row] for row in rows)


_BINARY = {"add": operator.add, "sub": operator.sub, "mul": operator.mul}

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

    def sqrt(self, x: Scalar) -> torch.Tensor:
        return torch.sqrt(self._t(x).clamp(min=0.0))  # clamp keeps NaN

    def div(self, a: Scalar, b: Scalar) -> torch.Tensor:
        # a device divisor: CUDA divides by a host scalar as a multiplication by its reciprocal,
        # which rounds differently from the host's division
        return self._t(a) / self._t(b)

    def minimum(self, a: Scalar, b: float) -> torch.Tensor:
        return self._t(a).clamp(max=b)  # clamp keeps a NaN ``a``, as ``HOST.minimum``

    def floor(self, x: Scalar) -> torch.Tensor:
        return torch.floor(self._t(x))

    def isfinite(self, x: Scalar) -> torch.Tensor:
        return torch.isfinite(self._t(x))

    def false(self) -> torch.Tensor:
        return torch.zeros((), dtype=torch.bool, device=self.device)

    def each(self, op: str, xs: list[Scalar], ys: list[Scalar]) -> list[torch.Tensor]:
        """``op`` lane by lane over 0-dim tensors, in one device op (``torch._foreach_<op>``): the
        same IEEE operation on each lane as ``HOST.each``."""
        return list(getattr(torch, f"_foreach_{op}")([self._t(x) for x in xs], [self._t(y) for y in ys]))

    def rows(self, *rows: list[Scalar]) -> torch.Tensor:
        """The rows as one float64 tensor (one device op): ``where`` picks a whole row."""
        return torch.stack([self._t(x) for row in rows for x in row]).view(len(rows), -1)


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
      warm-up or the EMA (the reference would poison them with NaN), a step the guard skips
      updates nothing, and the clip coefficient is distclip's ``min(1, threshold / (g + 1e-6))``
      (the reference applies ``threshold / (g + 1e-6)`` only when ``g > threshold``: they differ
      by at most 1e-6 relative, for ``g`` within 1e-6 of the threshold).

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

    def config(self) -> tuple:
        return (self.kind, self.max_norm, self.skip_above, self.alpha, self.z_thresh, self.eps, self.warmup_steps, self.mode,
                self.clip_option if self.mode == "zscore" else None, self.clip_factor, self.skip_update_on_spike)

    def _fresh(self) -> dict[str, float]:
        # n: warm-up norms so far; during warm-up ``mean``/``v`` are Welford's running mean and sum
        # of squared deviations, after it (``ready`` 1.0) the EMA mean and variance
        return {"n": 0.0, "mean": 0.0, "v": 0.0, "ready": 0.0}

    def decide(self, m: Math, g: Scalar) -> tuple[Scalar, Flag, Any]:
        s = self._prepare(m)
        n, mean, v, r = s["n"], s["mean"], s["v"], s["ready"]
        zt, alpha, beta, w = self.z_thresh, self.alpha, 1 - self.alpha, float(self.warmup_steps)
        # Both branches (warm-up, EMA) are computed: on the device which one applies cannot be read.
        # Each value is the same IEEE operations in the same order as the formula beside it;
        # independent operations of one kind are the lanes of one ``m.each`` (one device op).
        d, n1 = m.each("sub", [g, n], [mean, -1.0])  # d = g - mean; n1 = n + 1
        # n stops at warmup_steps once the warm-up is done: ready is n >= warmup_steps
        full: Flag
        ready: Flag
        if isinstance(m, DeviceMath):
            full, ready = (n1 >= m.vector((w, w + 1.0))).unbind()
        else:
            full, ready = n1 >= w, n1 >= w + 1.0
        std = m.sqrt(v)
        se, zs = std + self.eps, zt * std
        # z = d / (std + eps) against the EMA before this step; Welford's d / n1; the spike
        # thresholds divided by the ready flag: +inf during warm-up, so no spike then
        num, den = [d, d, zt], [se, n1, r]
        if self.skip_above is not None:
            num.append(self.skip_above)
            den.append(r)
        z, q, zt_ready, *skip_ready = m.each("div", num, den)
        clip_val: Scalar
        if self.mode == "zscore":
            is_spike = z > zt_ready
            if self.clip_option == "adaptive_scaling":
                eta = m.div(z, zt)  # the reference's rescaling ratio: a larger outlier gets a lower threshold
                clip_val, wmean1 = m.each("add", [mean, mean], [m.div(zs, eta), q])  # mean + zt * std / eta; mean + d / n1
                if self.clip_factor != 1.0:
                    clip_val = clip_val * self.clip_factor
            else:
                clip_val, wmean1 = mean, mean + q
        else:
            clip_val, wmean1 = m.each("add", [mean, mean], [zs, q])  # mean + zt * std; mean + d / n1
            is_spike = (g > clip_val) & ready
        x = m.where(is_spike, clip_val, g)  # the EMA sees the clipped norm on a spike
        threshold = m.where(is_spike, clip_val, self.cap)
        if self.max_norm is not None:
            threshold = m.minimum(threshold, self.max_norm)
        bx, am, av = m.each("mul", [x, mean, v], [beta, alpha, alpha])
        mean1 = am + bx  # alpha * mean + (1 - alpha) * x
        dev, gw = m.each("sub", [x, g], [mean1, wmean1])
        dev2, p = m.each("mul", [dev, d], [dev, gw])
        var1, m2 = m.each("add", [av, v], [beta * dev2, p])  # alpha * v + (1 - alpha) * dev**2; v + d * (g - wmean1)
        if self.skip_update_on_spike:
            mean1, var1 = m.where(is_spike, mean, mean1), m.where(is_spike, v, var1)
        # the next state (n, mean, v, ready): the EMA's, or the warm-up's (population variance once full)
        rows: Any = m.rows([n, mean1, var1, 1.0], [n1, wmean1, m.div(m2, n1), 1.0], [n1, wmean1, m2, 0.0])
        pending: Any = m.where(ready, rows[0], m.where(full, rows[1], rows[2]))
        spike: Flag = False  # no spike verdict without skip_above (a constant: no device op)
        if self.skip_above is not None:
            spike = z > skip_ready[0]
        return threshold, spike, pending


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
