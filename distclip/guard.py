"""Guarded steps: adaptive clipping and agreed step skipping, correct under any sharding.

    guard = distclip.GradGuard(max_norm=1.0, adaptive="zclip", skip_above=6.0)
    for batch in data:
        loss(model(batch)).backward()
        out = guard.clip_(model)           # every rank of the group: one all-reduce, as clip_grad_norm_
        guard.step(optimizer)              # optimizer.step() unless out.skip (the same on every rank)
        optimizer.zero_grad()

``clip_`` runs :func:`distclip.clip_grad_norm_`'s own steps (``clip.prepare_call``: validation and
layout discovery; ``clip.measure_total``: the local partial and the one all-reduce), then, from the
reduced float64 total that every rank holds bit for bit:

1. the policy (``distclip.policies``: fixed, ZClip, AutoClip) gives this step's threshold and a
   spike verdict, and its next state; no collective of its own, so every rank's state is
   identical by construction;
2. ``skip`` = the total is non-finite (``skip_nonfinite``) or a spike (``skip_above``); a skipped
   step changes neither the grads' scale nor the policy state;
3. the grads are scaled by ``min(1, threshold / (total + 1e-6))`` with distclip's foreach kernels.

Where host reads are free (CPU, see ``host_reads``) the policy runs on Python floats and the
verdicts are plain bools; on accelerators everything stays on the device (0-dim float64 tensors,
``torch.where``), and :meth:`GradGuard.step` hands the skip to fused optimizers as their
``found_inf`` (what ``GradScaler`` does), so a guarded step costs no host sync there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Optional, Union

import torch
from torch import nn

from distclip import clip as _clip
from distclip._dtensor import DTensor, local_of
from distclip._torch import declares_amp_scaling_step, phase
from distclip.comm import objects
from distclip.comm.reduce import reduction_device
from distclip.layout.discovery import CallGroup, GroupLike
from distclip.math.partials import scale_
from distclip.observe import grad_norms as _norms
from distclip.observe.name_order import stage_unique
from distclip.policies import HOST, DeviceMath, Policy, make_policy

__all__ = ["GradGuard", "GuardOutput"]

NamedLike = Union[nn.Module, Iterable[tuple[str, torch.Tensor]], Iterable[torch.Tensor], torch.Tensor]
TOTAL = "total"


class _Source:
    """What ``clip_`` was given, materialised once: a module, (name, parameter) pairs, or plain
    parameters (named ``parameters[i]`` by position)."""

    def __init__(self, parameters: Any) -> None:
        self.module: Optional[nn.Module] = None
        self.pairs: Optional[list[tuple[str, torch.Tensor]]] = None
        if isinstance(parameters, nn.Module):
            self.module = parameters
            self.params: Any = parameters
            return
        items = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
        if items and all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) for x in items):
            self.pairs = [(str(n), p) for n, p in items]
            self.params = [p for _, p in items]
        else:
            self.params = items

    def named(self) -> Any:
        """A module or (name, parameter) pairs, as ``distclip.grad_norms`` takes them."""
        if self.module is not None:
            return self.module
        if self.pairs is not None:
            return self.pairs
        return [(f"parameters[{i}]", p) for i, p in enumerate(self.params)]


def _find_nonfinite(source: _Source, stage: CallGroup) -> list[str]:
    """Every rank of the group together, only when the total is non-finite: the names of the
    parameters whose grads hold a NaN or inf anywhere (one object exchange, ``comm.objects``: no
    numpy; the union in rank order, the same list on every rank). A rank that cannot name its
    grads still joins."""
    found: Any
    try:
        local = _norms.collect(source.named(), stage)
        tensors = [local_of(u.tensor) if isinstance(u.tensor, DTensor) else u.tensor for u in local.units]
        bad = torch.stack([torch.isfinite(t).all() for t in tensors]).logical_not().tolist() if tensors else []
        tied = {n for p, names in zip(local.params, local.param_names) for n in names
                if (a := local.annotation(p)) is not None and a.replicated_over is not None}
        # every name, so that names two pipeline stages share are made unique as grad_norms makes them
        found = (stage.index, [u.name for u in local.units], [u.name for u, b in zip(local.units, bad) if b], tied)
    except Exception as e:  # noqa: BLE001 - joined below, raised on every rank
        if not stage.distributed:
            raise
        found = ("error", f"{type(e).__name__}: {e}")
    everyone: list = [found]
    if stage.distributed:
        everyone = objects.all_gather_objects(found, reduction_device(stage), stage.group, what="GradGuard.clip_")
    errors = [x[1] for x in everyone if len(x) == 2 and x[0] == "error"]
    if errors:
        raise RuntimeError(f"distclip: could not name the non-finite gradients: {errors[0]}")
    unique, _ = stage_unique([(index, names, tied) for index, names, _, tied in everyone])
    out: dict[str, None] = {}
    for index, _, bad_names, _ in everyone:
        out.update(dict.fromkeys(unique(index, n) for n in bad_names))
    return list(out)


class GuardOutput:
    """What :meth:`GradGuard.clip_` decided this step; identical on every rank of the group.

    Attributes:
        total_norm (Tensor): the global norm before clipping, as :func:`distclip.clip_grad_norm_`
            returns it (a plain tensor; float32 unless a grad is float64).
        threshold (Tensor or None): the ``max_norm`` applied this step (fixed or adaptive; ``inf``:
            not clipped), a 0-dim float64 tensor. ``None`` with ``groups`` (see
            ``group_thresholds``).
        skip (Tensor): 0-dim bool: the step is skipped (:meth:`GradGuard.step` does not step).
        spike (Tensor): 0-dim bool: the policy saw a spike above ``skip_above``.
        clip_coef (Tensor): 0-dim float64: the factor the grads were multiplied by (1 when
            skipped). With ``groups``: 1 (see ``group_thresholds``).
        group_norms (dict[str, Tensor]): with ``groups``: each group's global norm, as
            :func:`distclip.grad_norms` returns it (plus ``"total"``); else empty.
        group_thresholds (dict[str, Tensor]): with ``groups``: each clipped group's threshold.
        nonfinite (list[str]): see the property.
        skip_on_host (bool or None): the skip verdict as a Python bool where it was read for free
            (CPU); None on the device path (reading ``skip`` there is a host sync).

    Where host reads are free (CPU) the decisions are kept as Python values and these tensors are
    made when first read (CPU tensors); on accelerators they are the device tensors the decisions
    were computed in.
    """

    def __init__(self, total_norm: torch.Tensor, threshold: Union[torch.Tensor, float, None],
                 skip: Union[torch.Tensor, bool, Callable[[], torch.Tensor]],
                 spike: Union[torch.Tensor, bool], clip_coef: Union[torch.Tensor, float], nonfinite: Optional[list[str]],
                 find_nonfinite: Optional[Callable[[], list[str]]] = None, group_norms: Optional[dict[str, torch.Tensor]] = None,
                 group_thresholds: Optional[dict[str, torch.Tensor]] = None) -> None:
        self.total_norm = total_norm
        self._threshold, self._skip, self._spike, self._coef = threshold, skip, spike, clip_coef
        self.group_norms = group_norms or {}
        self.group_thresholds = group_thresholds or {}
        self.skip_on_host: Optional[bool] = skip if isinstance(skip, bool) else None
        self._nonfinite = nonfinite
        self._find = find_nonfinite

    @property
    def threshold(self) -> Optional[torch.Tensor]:
        if isinstance(self._threshold, float):
            self._threshold = torch.tensor(self._threshold, dtype=torch.float64)
        return self._threshold

    @property
    def skip(self) -> torch.Tensor:
        if isinstance(self._skip, bool):
            self._skip = torch.tensor(self._skip)
        elif callable(self._skip):  # made when first read (on the device: one op the clip itself does not need)
            self._skip = self._skip()
        return self._skip

    @property
    def spike(self) -> torch.Tensor:
        if isinstance(self._spike, bool):
            self._spike = torch.tensor(self._spike)
        return self._spike

    @property
    def clip_coef(self) -> torch.Tensor:
        if isinstance(self._coef, float):
            self._coef = torch.tensor(self._coef, dtype=torch.float64)
        return self._coef

    @property
    def nonfinite(self) -> list[str]:
        """Names of the parameters whose grads hold a NaN or inf, on any rank (the same list on
        every rank; ``[]`` when the total is finite).

        Where host reads are free (CPU) this was found inside ``clip_``, only on a non-finite
        step (one extra object exchange then). On accelerators it is found when first read:
        reading it is a host read of the verdict and, on a non-finite step, that one collective,
        so read it on every rank of the group (or on none), before the grads are zeroed.
        """
        if self._nonfinite is None:
            assert self._find is not None
            self._nonfinite = self._find()
            self._find = None
        return self._nonfinite

    def __repr__(self) -> str:
        return (f"GuardOutput(total_norm={self.total_norm}, threshold={self.threshold}, skip={self.skip}, "
                f"spike={self.spike}, clip_coef={self.clip_coef})")


def _as_group_policy(spec: Any) -> Optional[Policy]:
    if spec is None:
        return None
    if isinstance(spec, Policy):
        return make_policy(adaptive=spec)
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return make_policy(float(spec))
    if isinstance(spec, Mapping):
        return make_policy(**dict(spec))
    raise TypeError(f"distclip: a policy must be None, a number, a Policy or a dict of GradGuard keywords, got {type(spec).__name__}")


def inner_optimizers(optimizer: Any) -> list[Any]:
    """The torch optimizers a step runs: torchtitan's ``OptimizersContainer`` holds several."""
    inner = getattr(optimizer, "optimizers", None)
    if isinstance(inner, (list, tuple)) and inner and all(isinstance(o, torch.optim.Optimizer) for o in inner):
        return list(inner)
    return [optimizer]


# torch's optimizers whose fused kernels read ``self.found_inf`` (and skip the update when it is 1)
_FUSED_FOUND_INF = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.Adagrad)


def takes_found_inf(optimizers: list[Any]) -> bool:
    """Whether every optimizer skips its update on ``found_inf`` as ``GradScaler`` sets it: torch's
    Adam/AdamW/SGD/Adagrad with every param group ``fused`` (torchtitan sets ``fused`` per group),
    or an optimizer that declares it supports AMP scaling in its step itself (a non-fused torch one
    would raise on ``found_inf``)."""
    def one(o: Any) -> bool:
        if isinstance(o, _FUSED_FOUND_INF):
            return all(g.get("fused") for g in o.param_groups)
        return declares_amp_scaling_step(o)

    return all(one(o) for o in optimizers)


class GradGuard:
    r"""Gradient clipping with an adaptive threshold and agreed step skipping, under any sharding.

    Every rank of the group calls :meth:`clip_` once per optimizer step (after AMP unscaling,
    after the last micro-batch of gradient accumulation), then :meth:`step`. ``clip_`` computes
    the global norm exactly as :func:`distclip.clip_grad_norm_` (any layout: DDP, FSDP1/2, TP,
    HSDP, pipeline stages with ``pp_group``, experts with ``mark_sharded``, tied weights), with
    the same single all-reduce and no host sync on accelerators, and takes every decision from the
    reduced float64 total, which is bit-identical on every rank: the threshold, the skip verdict
    and the policy's next state agree everywhere without any collective of their own.

    Args:
        max_norm (float or None): the threshold (fixed policy) or its cap (adaptive policies,
            which also use it during warm-up). ``None``: no cap. Default 1.0.
        norm_type (float): p of the p-norm, as in ``clip_grad_norm_``. Default 2.
        adaptive (str or Policy, optional): ``None`` (a fixed ``max_norm``), ``"zclip"``
            (:class:`distclip.policies.ZClip`: EMA of mean and variance, z-score threshold,
            ZClip's reciprocal clip), ``"autoclip"`` (:class:`distclip.policies.AutoClip`: a
            percentile of the history of norms) or a policy object (copied; it carries its own
            ``max_norm`` and ``skip_above``, so leave ``skip_above`` and the options unset).
        skip_nonfinite (bool): skip the step, on every rank, when the total is NaN or inf.
            Default True. A non-finite norm never enters the adaptive state either way.
        skip_above (float, optional): skip spikes: for ZClip a z-score (after warm-up), for
            AutoClip a factor of the step's percentile threshold, for the fixed policy a factor of
            ``max_norm``.
        groups (callable, optional): ``name -> group name`` (or ``None``: not clipped, counted in
            the total only). Each group is then clipped by its own global norm, all groups'
            norms in one all-reduce (:func:`distclip.grad_norms`' reduction; names as there: pass
            the module or (name, parameter) pairs). Reading which groups are present is a host
            read on accelerators, so this mode always runs its policies on the host.
        policies (dict, optional): with ``groups``, a policy per group name: ``None`` (measured
            only), a number (fixed ``max_norm``), a policy object or a dict of these keywords
            (``{"adaptive": "zclip", "max_norm": 2.0}``). Groups not listed use the guard's own
            policy (a fresh copy each).
        foreach (bool, optional): use foreach kernels (default: when available).
        **policy_options: the policy's own keywords: ZClip's ``alpha`` (0.97), ``z_thresh``
            (2.5), ``eps`` (1e-6), ``warmup_steps`` (25), ``mode`` (``"zscore"``),
            ``clip_option`` (``"adaptive_scaling"``), ``clip_factor`` (1.0),
            ``skip_update_on_spike`` (False); AutoClip's ``percentile`` (10) and
            ``history_size`` (None: all).

    Attributes:
        calls (int): ``clip_`` calls so far (restored by :meth:`load_state_dict`).
        last (GuardOutput or None): the last call's output.
    """

    def __init__(self, max_norm: Optional[float] = 1.0, norm_type: float = 2.0, *, adaptive: Union[str, Policy, None] = None,
                 skip_nonfinite: bool = True, skip_above: Optional[float] = None,
                 groups: Optional[Callable[[str], Optional[str]]] = None, policies: Optional[Mapping[str, Any]] = None,
                 foreach: Optional[bool] = None, **policy_options: Any) -> None:
        self.policy = make_policy(max_norm, adaptive, skip_above=skip_above, **policy_options)
        self.norm_type = _clip.check_norm_type(norm_type)
        self.skip_nonfinite = bool(skip_nonfinite)
        if groups is not None and not callable(groups):
            raise TypeError(f"distclip: groups must be a callable name -> group name (or None), got {type(groups).__name__}")
        if policies is not None and groups is None:
            raise ValueError("distclip: policies= needs groups=")
        self.groups = groups
        self._group_specs: dict[str, Optional[Policy]] = {str(k): _as_group_policy(v) for k, v in (policies or {}).items()}
        if TOTAL in self._group_specs:
            raise ValueError(f"distclip: {TOTAL!r} is reserved for the total norm")
        self._group_policies: dict[str, Optional[Policy]] = {}
        self._pending_groups: dict[str, Any] = {}
        self.foreach = foreach
        self.calls = 0
        self.last: Optional[GuardOutput] = None
        self._unstepped: Optional[GuardOutput] = None
        self._fn = f"GradGuard.clip_{self._config()!r}"
        self._device_math: dict[torch.device, DeviceMath] = {}  # by device: each caches its constants

    def _config(self) -> tuple:
        groups = None
        if self.groups is not None:
            groups = tuple(sorted((k, v.config() if v is not None else None) for k, v in self._group_specs.items()))
        return (self.policy.config(), self.skip_nonfinite, groups)

    def __repr__(self) -> str:
        return f"GradGuard(policy={self.policy!r}, norm_type={self.norm_type}, skip_nonfinite={self.skip_nonfinite}, groups={self.groups!r})"

    # ------------------------------------------------------------------------- clip_
    @torch.no_grad()
    def clip_(self, parameters: NamedLike, *, pp_group: Optional[GroupLike] = None, group: Optional[GroupLike] = None) -> GuardOutput:
        """Measure the global gradient norm, decide this step's threshold and skip, and clip.

        Every rank of ``group`` must call it, once per optimizer step. One all-reduce (plus one
        per ``Partial``-grad mesh group, as in ``clip_grad_norm_``); on a non-finite step where
        host reads are free, one more (an object exchange) to name the non-finite grads.

        Args:
            parameters (nn.Module, Iterable[(str, Tensor)], Iterable[Tensor] or Tensor): whose
                grads are measured and clipped. Pass the module (FSDP1 needs it; names come from
                it) or (name, parameter) pairs; plain parameters are named ``parameters[i]``.
            pp_group (ProcessGroup or DeviceMesh, optional): the pipeline-parallel group.
            group (ProcessGroup or DeviceMesh, optional): the ranks that hold this model
                (default: the default process group).

        Returns:
            GuardOutput: ``total_norm``, ``threshold``, ``skip``, ``nonfinite``, ... identical
            on every rank of the group.
        """
        source = _Source(parameters)
        out = self._clip_groups(source, pp_group, group) if self.groups is not None else self._clip_total(source, pp_group, group)
        self.calls += 1
        self.last = self._unstepped = out
        return out

    def _clip_total(self, source: _Source, pp_group: Any, group: Any) -> GuardOutput:
        call = _clip.prepare_call(self._fn, source.params, self.norm_type, False, pp_group, None, group)
        measured = _clip.measure_total(call, self.foreach)
        total, out_dtype, poisoned = measured.norm, measured.dtype, measured.poisoned
        assert call.layout is not None  # a failed call has raised
        policy = self.policy
        if measured.value is not None:  # read on the host (CPU): Python float64, the same bits
            g = measured.value
            decided, spike, pending = policy.decide(HOST, g)
            threshold = float(decided)
            finite = math.isfinite(g)
            skip = (self.skip_nonfinite and not finite) or bool(spike)
            policy.commit(HOST, pending, g < policy.learn_below and not skip)
            coef = 1.0 if skip else _clip.host_coefficient(threshold, g)
            _clip.scale_host(_clip.scale_groups(call.layout), coef, self.foreach)
            nonfinite = [] if finite else _find_nonfinite(source, call.stage)
            return GuardOutput(total.to(out_dtype), threshold, skip, bool(spike), coef, nonfinite)
        # Accelerators: every decision on the device, from the float64 total (NaN if poisoned).
        m = self._device_math.get(total.device)
        if m is None:
            m = self._device_math[total.device] = DeviceMath(total.device)
        decided_t, spike_v, pending = policy.decide(m, total)
        threshold_t = torch.as_tensor(decided_t)
        # One compare (a norm is never negative; ``isfinite`` is four ops): finite (below +inf), the
        # constant False verdict of a policy without skip_above (below -inf), and small enough for
        # the policy to learn from (below its ``learn_below``).
        finite_t, never_t, learn_t = (total < m.vector((math.inf, -math.inf, policy.learn_below))).unbind()
        has_spike = isinstance(spike_v, torch.Tensor) or bool(spike_v)
        if isinstance(spike_v, torch.Tensor):
            spike_t = spike_v
        else:  # a constant verdict: made on the device, never copied there
            spike_t = torch.full((), True, dtype=torch.bool, device=total.device) if spike_v else never_t
        skip_t: Optional[torch.Tensor]
        if self.skip_nonfinite and not has_spike:  # a poisoned total is NaN: skipped as non-finite
            skip_t, accept_t = None, learn_t  # skip is ``~finite``, made when first read
        elif self.skip_nonfinite:
            skip_t = spike_t | ~finite_t
            accept_t = learn_t & ~spike_t
        else:
            skip_t = spike_t.clone() if poisoned is None else spike_t | poisoned
            accept_t = learn_t & ~skip_t
        if not (isinstance(pending, dict) and not pending):  # the fixed policy has no state: no verdict to make
            policy.commit(m, pending, accept_t)
        clipped = (threshold_t / (total + 1e-6)).clamp(max=1.0)
        coef_d = torch.where(finite_t, clipped, m.const(1.0)) if skip_t is None else torch.where(skip_t, m.const(1.0), clipped)
        with phase("scale"):
            scale_(_clip.scale_groups(call.layout), coef_d, self.foreach)
        stage = call.stage

        def find() -> list[str]:
            return [] if bool(finite_t) else _find_nonfinite(source, stage)

        return GuardOutput(total.to(out_dtype), threshold_t, skip_t if skip_t is not None else finite_t.logical_not, spike_t, coef_d,
                           None, find)

    # ------------------------------------------------------------------------- groups
    def _policy_for(self, name: str) -> Optional[Policy]:
        if name not in self._group_policies:
            spec = self._group_specs[name] if name in self._group_specs else self.policy
            policy = make_policy(adaptive=spec) if spec is not None else None
            if policy is not None and name in self._pending_groups:
                policy.load_state_dict(self._pending_groups.pop(name))
            self._group_policies[name] = policy
        return self._group_policies[name]

    def _clip_groups(self, source: _Source, pp_group: Any, group: Any) -> GuardOutput:
        values, shown, unit_tensors, entry_of_unit, stage = _group_norms64(source.named(), self.norm_type, self.groups, pp_group, group)
        floats = torch.stack(list(values.values())).tolist() if values else []
        g_of = dict(zip(values, floats))
        total = g_of.pop(TOTAL)
        finite = math.isfinite(total)
        decided: dict[str, tuple[Policy, float, Any, Any]] = {}
        spike = False
        for name, g in g_of.items():
            policy = self._policy_for(name)
            if policy is None:
                continue
            threshold, s, pending = policy.decide(HOST, g)
            spike = spike or bool(s)
            decided[name] = (policy, float(threshold), pending, g)
        skip = (self.skip_nonfinite and not finite) or spike
        thresholds: dict[str, torch.Tensor] = {}
        by_group: dict[str, dict] = {}
        for unit_tensor, e in zip(unit_tensors, entry_of_unit):
            if e in decided:
                t = local_of(unit_tensor) if isinstance(unit_tensor, DTensor) else unit_tensor
                by_group.setdefault(e, {}).setdefault((t.device, t.dtype, None), []).append(t)
        for name, (policy, threshold, pending, g) in decided.items():
            policy.commit(HOST, pending, g < policy.learn_below and not skip)
            thresholds[name] = torch.tensor(threshold, dtype=torch.float64)
            if not skip and name in by_group:
                _clip.scale_host(by_group[name], _clip.host_coefficient(threshold, g), self.foreach)
        nonfinite = [] if finite else _find_nonfinite(source, stage)
        return GuardOutput(shown[TOTAL], None, skip, spike, 1.0, nonfinite, group_norms=shown, group_thresholds=thresholds)

    # ------------------------------------------------------------------------- step
    def step(self, optimizer: Any, *args: Any, scaler: Any = None, **kwargs: Any) -> Any:
        """``optimizer.step(*args, **kwargs)`` unless the last :meth:`clip_` skipped the step.

        A skipped step leaves the parameters and the optimizer state (moments, step counters)
        bitwise as they were, on every rank.

        - Where host reads are free (CPU) the verdict is a plain bool: a skipped step does not
          call the optimizer at all.
        - On accelerators, an optimizer that takes ``found_inf`` (torch's Adam, AdamW, SGD and
          Adagrad with ``fused=True``, or any optimizer declaring AMP-scaling support in its step;
          also every optimizer of a container with ``.optimizers``, as torchtitan's) is stepped
          with the verdict as its ``found_inf``, as ``GradScaler`` does: the fused kernel skips
          the update and undoes the step counter, with no host sync. Any other optimizer costs
          one host read of the verdict.
        - ``scaler``: a ``GradScaler`` whose ``unscale_(optimizer)`` ran before ``clip_``:
          ``scaler.step(optimizer)`` unless skipped (one host read on accelerators; call
          ``scaler.update()`` after, either way).

        Returns:
            What the optimizer's ``step`` returned, or None when skipped.
        """
        out = self._unstepped
        if out is None:
            raise RuntimeError("distclip: GradGuard.step needs a clip_ call since the last step (once per optimizer step)")
        self._unstepped = None
        if out.skip_on_host is not None:
            if out.skip_on_host:
                return None
            return scaler.step(optimizer, *args, **kwargs) if scaler is not None else optimizer.step(*args, **kwargs)
        inner = inner_optimizers(optimizer)
        if scaler is None and takes_found_inf(inner):
            flag = out.skip.to(torch.float32)
            saved = [(o, getattr(o, "found_inf", None)) for o in inner]
            for o, prev in saved:
                o.found_inf = flag if prev is None else prev + flag.to(prev.device)
            try:
                return optimizer.step(*args, **kwargs)
            finally:
                for o, prev in saved:
                    if prev is None:
                        del o.found_inf
                    else:
                        o.found_inf = prev
        if bool(out.skip):  # one host read: this optimizer cannot take the verdict on the device
            return None
        return scaler.step(optimizer, *args, **kwargs) if scaler is not None else optimizer.step(*args, **kwargs)

    def mark_stepped(self) -> None:
        """The last :meth:`clip_`'s optimizer step is taken by the caller (Lightning steps the
        optimizer itself, after its clipping hook): :meth:`step` then needs a new ``clip_``."""
        self._unstepped = None

    # ------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The guard's state: ``calls`` and each policy's float64 state (floats on the host,
        0-dim device tensors on accelerators: no host read). The same on every rank, so any
        rank's copy resumes every rank, at any world size or layout."""
        policies: dict[str, Any] = {}
        if self.groups is None:
            policies[TOTAL] = self.policy.state_dict()
        else:
            for name, policy in self._group_policies.items():
                if policy is not None:
                    policies[name] = policy.state_dict()
            policies.update(self._pending_groups)
        return {"version": 1, "config": repr(self._config()), "calls": self.calls, "policies": policies}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict` (saved by any rank, at any world size). The guard's
        configuration must be the one it was saved with (``ValueError`` otherwise)."""
        if state_dict.get("version") != 1:
            raise ValueError(f"distclip: unknown GradGuard state version {state_dict.get('version')!r}")
        if state_dict["config"] != repr(self._config()):
            raise ValueError(f"distclip: this GradGuard is configured as {self._config()!r}, the state was saved by {state_dict['config']}")
        policies = dict(state_dict["policies"])
        if self.groups is None:
            self.policy.load_state_dict(policies[TOTAL])
        else:
            self._group_policies = {}
            self._pending_groups = policies
        self.calls = int(state_dict["calls"])
        self._unstepped = None


def _group_norms64(parameters: Any, norm_type: float, groups: Any, pp_group: Any, group: Any) -> tuple[
        dict[str, torch.Tensor], dict[str, torch.Tensor], list[torch.Tensor], list[Optional[str]], CallGroup]:
    """:func:`distclip.grad_norms` (one all-reduce; the first call per module also agrees on the
    names) keeping the float64 values: ``(float64 norms, the norms as grad_norms returns them,
    this rank's unit tensors, each unit's entry name, stage)``."""
    m = _norms.measure(parameters, norm_type, groups=groups, pp_group=pp_group, group=group)
    values = dict(zip(m.names, m.norms.unbind()))
    shown = dict(zip(m.names, m.norms.to(m.dtype).unbind()))
    return values, shown, m.tensors, m.unit_entries, m.stage
