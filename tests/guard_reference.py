"""Single-process reference implementations of GradGuard's policies, written from the authors'
reference code, fed plain float norms (tests/worlds/test_guard.py compares GradGuard's trajectories with
them).

- ``RefZClip``: ``bluorion-com/ZClip`` ``zclip/zclip.py`` (``ZClip.step``: warm-up buffer with a
  two-pass mean and population variance, ``_compute_clip_val``, ``_update_ema``), with the two
  documented changes for guarded steps: a non-finite norm never enters the statistics, and a
  skipped step updates nothing.
- ``RefAutoClip``: ``pseeth/autoclip`` ``autoclip.py`` (``grad_history.append``;
  ``np.percentile(grad_history, clip_percentile)``), with the same two changes.
"""

from __future__ import annotations

import math

import numpy as np


class RefZClip:
    def __init__(self, max_norm=1.0, alpha=0.97, z_thresh=2.5, eps=1e-6, warmup_steps=25, mode="zscore",
                 clip_option="adaptive_scaling", clip_factor=1.0, skip_update_on_spike=False, skip_above=None,
                 skip_nonfinite=True):
        self.max_norm, self.alpha, self.z_thresh, self.eps = max_norm, alpha, z_thresh, eps
        self.warmup_steps, self.mode, self.clip_option, self.clip_factor = warmup_steps, mode, clip_option, clip_factor
        self.skip_update_on_spike, self.skip_above, self.skip_nonfinite = skip_update_on_spike, skip_above, skip_nonfinite
        self.buffer, self.initialized, self.mean, self.var = [], False, None, None

    def _initialize_ema(self):
        self.mean = sum(self.buffer) / len(self.buffer)
        self.var = sum((x - self.mean) ** 2 for x in self.buffer) / len(self.buffer)
        self.initialized = True
        self.buffer = []

    def _update_ema(self, grad_norm):
        self.mean = self.alpha * self.mean + (1 - self.alpha) * grad_norm
        self.var = self.alpha * self.var + (1 - self.alpha) * (grad_norm - self.mean) ** 2

    def _compute_clip_val(self, grad_norm):
        std = self.var ** 0.5
        if self.mode == "percentile":
            threshold = self.mean + self.z_thresh * std
            if grad_norm > threshold:
                return threshold
        else:
            z = (grad_norm - self.mean) / (std + self.eps)
            if z > self.z_thresh:
                if self.clip_option == "adaptive_scaling":
                    eta = z / self.z_thresh
                    threshold = self.mean + (self.z_thresh * std) / eta
                    threshold = threshold * self.clip_factor
                else:
                    threshold = self.mean
                return threshold
        return None

    def step(self, g):
        """(threshold, skip) for the norm ``g``."""
        cap = math.inf if self.max_norm is None else self.max_norm
        finite = math.isfinite(g)
        if not self.initialized:
            skip = self.skip_nonfinite and not finite
            if finite and not skip:
                self.buffer.append(g)
                if len(self.buffer) >= self.warmup_steps:
                    self._initialize_ema()
            return cap, skip
        z = (g - self.mean) / (self.var ** 0.5 + self.eps)
        spike = self.skip_above is not None and z > self.skip_above
        skip = (self.skip_nonfinite and not finite) or spike
        clip_val = self._compute_clip_val(g)
        threshold = min(clip_val if clip_val is not None else math.inf, cap)
        if finite and not skip and not (clip_val is not None and self.skip_update_on_spike):
            self._update_ema(clip_val if clip_val is not None else g)
        return threshold, skip


class RefAutoClip:
    def __init__(self, max_norm=1.0, percentile=10.0, history_size=None, skip_above=None, skip_nonfinite=True):
        self.max_norm, self.percentile, self.history_size = max_norm, percentile, history_size
        self.skip_above, self.skip_nonfinite = skip_above, skip_nonfinite
        self.grad_history = []

    def step(self, g):
        cap = math.inf if self.max_norm is None else self.max_norm
        finite = math.isfinite(g)
        history = self.grad_history + ([g] if finite else [])
        if self.history_size is not None:
            history = history[-self.history_size:]
        clip_value = float(np.percentile(history, self.percentile)) if history else math.inf
        spike = self.skip_above is not None and g > self.skip_above * clip_value
        skip = (self.skip_nonfinite and not finite) or spike
        if finite and not skip:
            self.grad_history = history
        return min(clip_value, cap), skip


def reference(kind: str, **kw):
    return {"zclip": RefZClip, "autoclip": RefAutoClip}[kind](**kw)


def norm_stream(steps: int, seed: int = 0, spikes=(), nans=()):
    """A norm sequence with drift, noise, some spikes (x8) and non-finite values."""
    rng = np.random.default_rng(seed)
    out = []
    for t in range(steps):
        g = 2.0 + 0.5 * math.sin(t / 15) + 0.2 * float(rng.standard_normal())
        if t in spikes:
            g *= 8.0
        if t in nans:
            g = math.nan if t % 2 else math.inf
        out.append(g)
    return out
