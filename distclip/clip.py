"""distclip's algorithm, top-down.

1. Validate every argument and discover the layout (``layout.discovery``, reused through ``layout.plan``), all
   locally. A rank that cannot (bad input) keeps its error and still takes part in the call's
   collectives, so every rank raises together and no gradient changes (``comm.failure``).
2. Layout discovery gives each local gradient the weight that makes each element of the full
   model count exactly once across the world.
3. Local math (``math.partials``): this rank's weighted partial, in float64.
4. Communication (``comm.reduce`` of the vector ``comm.packet`` owns): one all-reduce of the partial
   with the agreement and failure flags,
   identical result on every rank (plus one per mesh group of ``Partial`` grads).
5. Scale every local gradient by ``min(1, max_norm / (total + 1e-6))`` with foreach kernels.
"""

from __future__ import annotations

import math
import numbers
import types
import warnings
from dataclasses import dataclass
from typing import NamedTuple, Optional, cast

import torch
import torch.distributed as dist
from torch import nn

from distclip._dtensor import DTensor, Replicate, is_sum_dim, local_of, partial_dims, reducible_partial, spec_of
from distclip._torch import phase
from distclip.comm import agreement, failure
from distclip.comm.failure import NotANumberError
from distclip.comm.packet import (
    TOTAL_HEAD,
    Packet,
    failed_vector,
    total_from_head,
    total_from_head_host,
    total_head,
    total_head_host,
)
from distclip.comm.reduce import all_reduce, reduce_partial_grads, reduction_device
from distclip.gc_pause import paused as gc_paused
from distclip.host_reads import host_reads_allowed
from distclip.layout import marks
from distclip.layout.discovery import (
    CallGroup,
    GroupLike,
    LocalLayout,
    ParamsLike,
    as_param_list,
    call_group,
    local_grad_tensors,
    local_layout,
    pairing_names,
    reject_unknown_layouts,
)
from distclip.layout.plan import PlanCache
from distclip.math.partials import coalesce, local_partial, may_be_views, scale_

__all__ = ["clip_grad_norm_", "get_total_norm", "total_grad_norm", "clip_grads_with_norm_", "clip_grad_value_"]

# Grads whose norm is returned as float64, as torch does (complex128's magnitudes are float64).
_FLOAT64 = (torch.float64, torch.complex128)

# Layout plans of the parameter lists seen recently (see ``plan``): the only state kept across
# calls, checked on every call and dropped with the parameters it names.
PLANS = PlanCache()


def _as_float(value: object, name: str) -> float:
    """``float(value)`` as torch takes it (numbers, one-element tensors, numeric strings such as
    ``"1.0"`` or ``"inf"``: torch 2.13 converts them with ``float()``), refusing booleans."""
    cls = value.__class__
    if cls is float or cls is int:  # the common case, before the slower abstract-class checks
        return float(value)  # type: ignore[arg-type]
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        return float(value)
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, str)):
        raise TypeError(f"distclip: {name} must be a real number, got {type(value).__name__}")
    try:
        return float(value)
    except ValueError:
        hint = ""
        if name == "norm_type" and isinstance(value, str) and value.strip().lower() in ("fro", "frobenius", "l2", "euclidean"):
            hint = ": the Frobenius norm of the gradients seen as one vector is their 2-norm, so pass norm_type=2.0"
        raise NotANumberError(f"distclip: {name} must be a real number, got {value!r}{hint}") from None


def check_norm_type(norm_type: object) -> float:
    """``norm_type`` as a float: any real number but NaN (``inf``, ``-inf`` and 0 included)."""
    p = _as_float(norm_type, "norm_type")
    if math.isnan(p):
        raise ValueError("distclip: norm_type must not be NaN")
    return p


def check_max_norm(max_norm: object, owner: str = "distclip", numbers_only: bool = False) -> float:
    """``max_norm`` as a float: a real number as torch takes it (``_as_float``), not NaN, not
    negative. The one check of the clip functions, ``GradGuard``'s policies and the
    integrations; ``owner`` starts the message. ``numbers_only``: a Python ``int`` or ``float``
    alone (no string, no tensor, no bool), as ``GradGuard`` and the Transformers callback take it."""
    if numbers_only and (isinstance(max_norm, bool) or not isinstance(max_norm, (int, float))):
        raise TypeError(f"{owner}: max_norm must be a number, got {type(max_norm).__name__}")
    value = _as_float(max_norm, "max_norm")
    if math.isnan(value) or value < 0:
        raise ValueError(f"{owner}: max_norm must be a non-negative number, got {value}")
    return value


def fallback_norm_type(norm_type: object) -> float:
    """The norm type a rank whose input is bad reduces with: the reduction op the other ranks most
    likely use (MAX for a readable ``±inf``, SUM otherwise), so the reduced flags stay meaningful."""
    try:
        p = float(norm_type)  # type: ignore[arg-type]
    except Exception:
        return 2.0
    return p if math.isinf(p) else 2.0


@dataclass
class Call:
    """One call as this rank sees it, or the error that keeps this rank from computing a norm.

    A rank with an ``error`` still takes part in every collective of the call (see
    ``comm.failure``), so the other ranks learn of it at once instead of waiting for the timeout.
    """

    fn: str
    norm_type: float
    max_norm: Optional[float]
    error_if_nonfinite: bool
    stage: CallGroup
    params: list[torch.Tensor]
    layout: Optional[LocalLayout] = None
    error: Optional[Exception] = None
    measures_tensors: bool = False  # ``params`` are the tensors to measure themselves (``get_total_norm``)

    @property
    def signature(self) -> tuple:
        return agreement.call_signature(self.fn, self.norm_type, self.max_norm, self.error_if_nonfinite, self.stage)


def prepare_call(
    fn: str,
    parameters: ParamsLike,
    norm_type: object,
    error_if_nonfinite: bool,
    pp_group: object,
    max_norm: object = None,
    group: object = None,
    measures_tensors: bool = False,
) -> Call:
    """Steps 1 and 2: validate every argument and discover the layout, all locally.

    ``measures_tensors``: measure the tensors themselves (``get_total_norm``'s rule for tensors, as torch),
    not the ``.grad`` of parameters; a module is always measured by its parameters' grads.

    Without a process group the error is raised at once, as torch would. In a distributed job it
    is kept: raising here would leave the other ranks of the group waiting in this call's
    collectives.
    """
    seen: list[torch.Tensor] = []  # the parameters, for a failed rank's ``Partial`` collectives

    def local() -> Call:
        params, module = as_param_list(parameters)
        seen.extend(params)
        checked_max = check_max_norm(max_norm) if fn == "clip_grad_norm_" else None
        p = check_norm_type(norm_type)
        stage = call_group(pp_group, group)
        if measures_tensors and module is None:
            if stage.distributed:
                reject_unknown_layouts(params, marks.table(params, None))
            layout = local_layout(params, None, stage, grads=params)
        else:
            layout = PLANS.layout(params, module, stage)
        layout.groups = _coalesced(layout)
        return Call(fn, p, checked_max, bool(error_if_nonfinite), stage, params, layout, measures_tensors=measures_tensors and module is None)

    with phase("layout"), gc_paused():
        call, error = failure.attempt(local)
    if call is not None:
        return call
    assert error is not None
    try:  # join the collectives of the group the others use; without a valid group there is none to join
        stage = call_group(None, group)
    except Exception:
        raise error from None
    return Call(fn, fallback_norm_type(norm_type), None, bool(error_if_nonfinite), stage, seen, error=error,
                measures_tensors=measures_tensors)


def _coalesced(layout: LocalLayout) -> dict:
    """The groups with adjacent views merged, so each group needs few kernels: separate tensors
    skip the pass, and a plan remembers which groups hold views and how they merge."""
    coalescers = layout.coalescers
    if coalescers is None:  # discovery's own layout
        return {key: coalesce(ts) if may_be_views(ts) else ts for key, ts in layout.groups.items()}
    return {key: coalescers[key].merge(ts) if key in coalescers else ts for key, ts in layout.groups.items()}


def _norm_groups(layout: LocalLayout) -> dict:
    """The groups whose norms make the partial: the local grads, plus ``Partial`` grads made whole
    by one all-reduce per partial mesh group (issued by exactly the ranks of that mesh), and sparse
    grads' coalesced values (``LocalLayout.resolve``)."""
    if not layout.partial and not layout.measure_only:
        return layout.groups
    groups = dict(layout.groups)
    for key, tensors in layout.measure_only.items():
        groups[key] = groups.get(key, []) + tensors
    if layout.partial:
        for tensor, weight in reduce_partial_grads(layout.named_partial()):
            key = (tensor.device, tensor.dtype, weight)
            groups[key] = groups.get(key, []) + [tensor]
    return groups


def _join_partial_reductions(call: Call) -> None:
    """A failed rank still issues the ``Partial``-grad collectives its mesh peers issue: which
    ones depends on the grads alone, so it can tell even when its other input is bad."""
    join_partial_grads(call.params if call.measures_tensors else [p.grad for p in call.params], call.params)


def join_partial_grads(grads: list, holders: Optional[list] = None) -> None:
    """``_join_partial_reductions`` for a list of grads (``grad_norms`` joins with its own);
    ``holders``: the parameter of each grad (None: the grads were given themselves), which name
    them as the healthy ranks do (``layout.pairing_names``)."""
    try:
        chosen = [(t, h) for t, h in zip(grads, holders if holders is not None else grads) if reducible_partial(t)]
        if chosen:
            names = pairing_names([t for t, _ in chosen], [h for _, h in chosen])
            reduce_partial_grads([(cast(DTensor, t), 0.0, name) for (t, _), name in zip(chosen, names)])
    except Exception:  # noqa: BLE001 - this rank raises its own error right after the main collective
        pass


def scale_groups(layout: LocalLayout) -> dict:
    """Every local tensor to scale: a ``Partial`` grad is scaled summand by summand, a sparse grad
    through its values (``LocalLayout.resolve``). Groups that differ by weight alone are merged:
    one coefficient cast and one kernel per (device, dtype)."""
    if not layout.partial and not layout.scale_only and len({key[:2] for key in layout.groups}) == len(layout.groups):
        return layout.groups
    groups: dict = {}
    for key, tensors in layout.groups.items():
        groups[(key[0], key[1], None)] = groups.get((key[0], key[1], None), []) + tensors
    for key, tensors in layout.scale_only.items():
        groups[(key[0], key[1], None)] = groups.get((key[0], key[1], None), []) + tensors
    for grad, _ in layout.partial:
        local = local_of(grad)
        key = (local.device, local.dtype, None)
        groups[key] = groups.get(key, []) + [local]
    return groups


class _LocalPart(NamedTuple):
    """This rank's part of a total norm, before the reduction."""

    head: Optional[list[float]]  # ``total_head_host``'s floats where host reads are allowed, else None
    partial: Optional[torch.Tensor]  # the float64 partial on the device where host reads are not allowed
    has_elements: bool  # this rank holds at least one element
    has_float64: bool
    device: torch.device  # where the head is reduced
    grad_device: Optional[torch.device]


def _local_part(call: Call, foreach: Optional[bool], device: Optional[torch.device]) -> _LocalPart:
    """Step 3 on this rank: the local partial (and, on the host, its head), on ``device`` (None: a
    single process, the grads' device). Raises whatever the grads make the local math raise."""
    layout = call.layout
    assert layout is not None  # a failed call never computes a partial
    norm_type = call.norm_type
    groups = _norm_groups(layout)  # first: its ``Partial`` collectives go out whatever fails after them
    has_float64 = any(dtype in _FLOAT64 for _, dtype, _ in layout.groups) or any(g.dtype in _FLOAT64 for g, _ in layout.partial)
    grad_device = next(iter(groups))[0] if groups else None
    if device is None:
        device = grad_device or torch.device("cpu")
    with phase("local_norms"):
        partial = local_partial(groups, norm_type, foreach, device)
    has_elements = any(t.numel() for tensors in groups.values() for t in tensors)  # stops at the first
    if host_reads_allowed(device):
        return _LocalPart(total_head_host(partial.item(), has_elements, norm_type), None, has_elements, has_float64, device, grad_device)
    return _LocalPart(None, partial, has_elements, has_float64, device, grad_device)


def _total_of_partial(partial: torch.Tensor, has_elements: bool, norm_type: float) -> torch.Tensor:
    """A single process's total from its partial on the device: ``total_from_head(total_head(...))``
    without the head (nothing to reduce): the same float64 operations, the flags known on the host."""
    if not has_elements:
        return torch.zeros((), dtype=torch.float64, device=partial.device)
    if math.isinf(norm_type):  # the head's sign, NaN flag and sign back give the partial itself
        return partial
    return partial.round() if norm_type == 0 else partial.pow(1.0 / norm_type)


def _vector_to_reduce(call: Call, foreach: Optional[bool], device: torch.device) -> tuple[torch.Tensor, Optional[tuple[_LocalPart, Packet]],
                                                                                  Optional[Exception]]:
    """A distributed call's one failure path, from its entry to its collective: this rank's
    vector for the all-reduce and (its part, its packet), or, if anything failed here (argument
    checks and discovery in ``prepare_call``, the local math, the packing), the failed vector
    (``packet.failed_vector``) and the error. Either way this rank has issued exactly the
    ``Partial``-grad collectives its peers issue."""
    use_max = math.isinf(call.norm_type)
    if call.error is not None:
        _join_partial_reductions(call)
        return failed_vector(TOTAL_HEAD, True, use_max, device), None, call.error

    def encoded() -> tuple[torch.Tensor, tuple[_LocalPart, Packet]]:
        mine = _local_part(call, foreach, device)
        assert call.layout is not None
        packet = Packet(TOTAL_HEAD, agreement.Signature(call.signature, call.layout.tensor_kinds, call.stage), use_max)
        if mine.head is not None:
            return packet.encode_host(mine.head, has_float64=mine.has_float64), (mine, packet)
        assert mine.partial is not None
        if math.isinf(call.norm_type):  # the NaN flag is computed on the device
            head = total_head(mine.partial, mine.has_elements, call.norm_type)
            return packet.encode_device(head, device, has_float64=mine.has_float64), (mine, packet)
        # a finite p's head is [partial, 0, present]: its flags are host numbers (``total_head``)
        tail = [0.0, float(mine.has_elements)]
        return packet.encode_device(mine.partial, device, host_tail=tail, has_float64=mine.has_float64), (mine, packet)

    # A failure inside ``_norm_groups`` is not followed by a join: its collectives may have gone out.
    found, error = failure.attempt(encoded)
    if found is None:
        return failed_vector(TOTAL_HEAD, True, use_max, device), None, error
    return found[0], found[1], None


class Total(NamedTuple):
    """A call's total norm, identical on every rank (``measure_total``)."""

    norm: torch.Tensor  # float64
    dtype: torch.dtype  # the dtype to return it in: float64 if a grad is float64, else float32
    poisoned: Optional[torch.Tensor]  # accelerators: 0-dim bool, ranks disagreed or one failed (grads stay as they are)
    value: Optional[float]  # the norm as a float where it was read on the host (CPU)


def measure_total(call: Call, foreach: Optional[bool]) -> Total:
    """Steps 3 and 4: the total norm in float64 (identical on every rank), the dtype to return it
    in, and, where host reads are not allowed, a device-side flag set if the norm is poisoned
    (ranks disagreed or a rank failed: every grad must stay as it is), and the total as a float
    where it was read on the host (CPU)."""
    norm_type, stage = call.norm_type, call.stage
    if not stage.distributed:
        # One process: no rank to agree with or to tell of a failure, so an error is raised at
        # once, as torch would (``prepare_call`` has raised its own).
        mine = _local_part(call, foreach, None)
        out_dtype = torch.float64 if mine.has_float64 else torch.float32
        if mine.head is not None:
            # on the host: no packet and no collective; the same head and root as the reduced
            # path, from the same Python floats
            total_value = total_from_head_host(mine.head, norm_type)
            total = torch.tensor(total_value, dtype=torch.float64, device=mine.grad_device or mine.device)
            if call.error_if_nonfinite:
                _raise_if_nonfinite(call, total, torch.tensor(mine.has_float64))
            return Total(total, out_dtype, None, total_value)
        assert mine.partial is not None
        total = _total_of_partial(mine.partial, mine.has_elements, norm_type)
        if call.error_if_nonfinite:
            _raise_if_nonfinite(call, total, torch.tensor(mine.has_float64))
        return Total(total, out_dtype, None, None)
    device = reduction_device(stage)
    packed, found, error = _vector_to_reduce(call, foreach, device)
    with phase("reduce"):
        all_reduce(packed, norm_type, stage)
    host_reads = host_reads_allowed(device)
    if found is None:  # this rank failed; the others know it from the flag
        assert error is not None
        if host_reads:  # every rank raises together: this one its own error
            failure.settle(True, error, device, stage.group)
        raise error  # accelerators: the others see a NaN norm and leave every grad alone
    mine, packet = found
    out_device = mine.grad_device or device
    if host_reads:  # every rank reads the same reduced values: they act together
        host = packet.decode_host(packed.tolist())
        failure.settle(host.failed, None, device, stage.group)
        if host.disagreed:
            assert packet.sig is not None
            agreement.raise_mismatch(packet.sig)
        total_value = total_from_head_host(host.head, norm_type)
        total = torch.tensor(total_value, dtype=torch.float64, device=out_device)
        # any rank's float64 grad: every rank returns the same dtype
        if call.error_if_nonfinite:
            _raise_if_nonfinite(call, total, torch.tensor(host.has_float64))
        return Total(total, torch.float64 if host.has_float64 else torch.float32, None, total_value)
    # Accelerators: no host sync. A failure or disagreement poisons the norm and leaves the grads
    # alone; every decision that must agree is taken from the float64 total, identical on every rank.
    total = total_from_head(packed[:TOTAL_HEAD], norm_type)
    # The dtype follows this rank's own grads (agreeing would be a host sync).
    out_dtype = torch.float64 if mine.has_float64 else torch.float32
    poisoned = packet.poisoned(packed)
    total = total.masked_fill(poisoned, math.nan)
    if call.error_if_nonfinite and not bool(torch.isfinite(total)):
        view = packet.decode_device(packed)
        if bool(view.failed):
            raise failure.RankInputError(
                "distclip: another rank could not take part (bad input there), so no norm was computed and no "
                "gradient was changed; that rank raised its own error (details are not gathered on accelerators)"
            )
        if bool(view.disagreed):
            assert packet.sig is not None
            agreement.raise_mismatch(packet.sig)
    if call.error_if_nonfinite:
        _raise_if_nonfinite(call, total, packet.decode_device(packed).has_float64)
    return Total(total.to(out_device), out_dtype, poisoned, None)


def as_torch_returns(total: torch.Tensor, call: Call) -> torch.Tensor:
    """The total in the kind torch returns, already reduced: where every grad this rank measured is
    a DTensor on one mesh (FSDP2, TP, HSDP), torch returns a DTensor, and code written for it reads
    ``total.full_tensor()``; so does this, a ``Replicate`` DTensor on that mesh holding the same
    value on every rank (``.full_tensor()``, ``.to_local()``, ``.item()`` and ``float()`` all give
    the global norm, no communication). Elsewhere a plain tensor, as torch (plain and DDP grads,
    FSDP1) or where torch raises (DTensors on several meshes, or mixed with plain tensors)."""
    mesh = call.layout.result_mesh if call.layout is not None else None
    if mesh is None:
        return total
    return DTensor.from_local(total, mesh, [Replicate()] * mesh.ndim, run_check=False)


def _raise_if_nonfinite(call: Call, total: torch.Tensor, has64: torch.Tensor) -> None:
    """``error_if_nonfinite``: the verdict on the norm as returned (float32 unless some rank holds
    float64 grads), computed from values identical on every rank, so every rank raises together.
    A host sync, as in torch."""
    if not call.error_if_nonfinite:
        return
    finite = torch.where(has64.to(total.device), torch.isfinite(total), torch.isfinite(total.float()))
    if not bool(finite):
        raise RuntimeError(
            f"The total norm of order {call.norm_type} for gradients from `parameters` is non-finite, so it "
            "cannot be clipped. To disable this error and scale the gradients by the non-finite norm "
            "anyway, set `error_if_nonfinite=False`"
        )


def _materialize(parameters: ParamsLike, what: str) -> ParamsLike:
    """A generator consumed once, with torch's warning when it is empty (a generator used twice)."""
    if isinstance(parameters, types.GeneratorType):
        parameters = list(parameters)
        if not parameters:
            warnings.warn(f"`{what}` is an empty generator, no gradient clipping will occur.", stacklevel=4)
    return parameters


@torch.no_grad()
def get_total_norm(
    tensors: ParamsLike,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: Optional[bool] = None,
    *,
    pp_group: Optional[GroupLike] = None,
    group: Optional[GroupLike] = None,
) -> torch.Tensor:
    r"""Compute the norm of the full, unsharded ``tensors`` (or of a module's gradients), whatever
    their layout.

    What is measured follows one rule: **tensors are measured as given**, as
    ``torch.nn.utils.get_total_norm`` does (torch's two-step API:
    ``total = get_total_norm([p.grad for p in params])`` then
    ``clip_grads_with_norm_(params, max_norm, total)``); **a module is measured by its parameters'
    gradients** (the only way FSDP1 flat shards and ``mark_sharded`` parameters can be counted).
    A tensor's layout is what it shows: a DTensor by its mesh and placements (``Partial`` made
    whole), a plain tensor as replicated across the pipeline stage, a tensor marked itself by its
    mark. A plain tensor whose layout only its parameter knows (the gradient of a parameter marked
    with ``mark_sharded``/``mark_replicated``, or of an FSDP1 FlatParameter) raises ``ValueError``
    on every rank instead of being counted as a replica: pass the module. The result equals
    torch's function run on one process over the full tensors, and is bit-identical on every rank
    of the group. Every rank of ``group`` must call it (one all-reduce).

    Args:
        tensors (Tensor, Iterable[Tensor] or nn.Module): the tensors to measure (usually
            gradients), or a module whose parameters' gradients are measured (those without a
            grad skipped). Pass the wrapped module for FSDP1.
        norm_type (float): p of the p-norm; ``inf``, ``-inf`` and ``0`` (non-zero count) allowed.
        error_if_nonfinite (bool): raise on every rank if the total norm is nan or inf.
        foreach (bool, optional): use foreach kernels (default: when available).
        pp_group (ProcessGroup or DeviceMesh, optional): the ranks holding the other pipeline
            stages of this rank's model replica; partials are summed across it.
        group (ProcessGroup or DeviceMesh, optional): the ranks that hold this model (default:
            the default process group); exactly those ranks call, and every count (stages,
            replicas, pieces) is relative to it.

    Returns:
        Total norm, float32 (float64 if a measured tensor is float64), on the tensors' device: a
        ``Replicate`` DTensor where every measured tensor is a DTensor on one mesh (what torch
        returns a DTensor for, here already reduced), else a plain tensor.
    """
    tensors = _materialize(tensors, "tensors")
    # Parameters given: their values are measured, as torch does. Warned whenever the tensors look
    # like parameters, not only when every one has a grad (a LoRA model's frozen base has none).
    if isinstance(tensors, (list, tuple)) and tensors and any(isinstance(t, nn.Parameter) or (t.is_leaf and t.requires_grad)
                                                              for t in tensors if isinstance(t, torch.Tensor)):
        warnings.warn(
            "distclip.get_total_norm measures the tensors it is given, as torch does: these look like parameters "
            "(leaf tensors that require grad), so their values are measured, not their gradients. Pass "
            "[p.grad for p in params if p.grad is not None] or the module to measure the gradients", stacklevel=3,
        )
    call = prepare_call("get_total_norm", tensors, norm_type, error_if_nonfinite, pp_group, group=group, measures_tensors=True)
    total = measure_total(call, foreach)
    return as_torch_returns(total.norm.to(total.dtype), call)


def total_grad_norm(
    parameters: ParamsLike,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: Optional[bool] = None,
    *,
    pp_group: Optional[GroupLike] = None,
    group: Optional[GroupLike] = None,
) -> torch.Tensor:
    """The norm of the gradients of ``parameters`` (a module or parameters, read through
    ``.grad``, marks and all), as :func:`clip_grad_norm_` computes it, without clipping: what
    ``distclip.audit`` and the integrations compare against."""
    with torch.no_grad():
        call = prepare_call("get_total_norm", parameters, norm_type, error_if_nonfinite, pp_group, group=group)
        total = measure_total(call, foreach)
    return total.norm.to(total.dtype)


@torch.no_grad()
def clip_grad_norm_(
    parameters: ParamsLike,
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: Optional[bool] = None,
    *,
    pp_group: Optional[GroupLike] = None,
    group: Optional[GroupLike] = None,
) -> torch.Tensor:
    r"""Clip the gradient norm of ``parameters`` in place, correctly under any sharding.

    Drop-in for ``torch.nn.utils.clip_grad_norm_``: the norm is computed over the full,
    unsharded gradients (see :func:`get_total_norm`) and every local gradient is multiplied by
    the same ``min(1, max_norm / (total_norm + 1e-6))`` on every rank, without a host sync.

    Args:
        parameters (Tensor, Iterable[Tensor] or nn.Module): parameters whose grads are clipped.
        max_norm (float): max norm of the gradients (non-negative).
        norm_type (float): p of the p-norm; ``inf``, ``-inf`` and ``0`` allowed.
        error_if_nonfinite (bool): raise on every rank, before any grad is changed, if the total
            norm is nan or inf.
        foreach (bool, optional): use foreach kernels (default: when available).
        pp_group (ProcessGroup or DeviceMesh, optional): the pipeline-parallel group.
        group (ProcessGroup or DeviceMesh, optional): the ranks that hold this model (default:
            the default process group); exactly those ranks call.

    Returns:
        Total norm of the gradients before clipping, identical on every rank: a ``Replicate``
        DTensor where every grad is a DTensor on one mesh (as torch returns a DTensor there), else
        a plain tensor.
    """
    parameters = _materialize(parameters, "parameters")
    call = prepare_call("clip_grad_norm_", parameters, norm_type, error_if_nonfinite, pp_group, max_norm, group)
    total = measure_total(call, foreach)
    assert call.layout is not None and call.max_norm is not None  # a failed call has raised
    if total.value is not None:  # read on the host (CPU): the same float64 arithmetic, in Python
        scale_host(scale_groups(call.layout), host_coefficient(call.max_norm, total.value), foreach)
        return as_torch_returns(total.norm.to(total.dtype), call)
    # From the float64 total, identical on every rank: so is every coefficient, bit for bit.
    coef = (call.max_norm / (total.norm + 1e-6)).clamp(max=1.0)
    if total.poisoned is not None:
        coef = coef.masked_fill(total.poisoned, 1.0)
    # Multiplying by exactly 1.0 changes nothing; on CPU, where reading the coefficient is free,
    # that pass over every grad is skipped. Never on accelerators: a host sync.
    if not (host_reads_allowed(coef.device) and bool(coef == 1.0)):
        with phase("scale"):
            scale_(scale_groups(call.layout), coef, foreach)
    return as_torch_returns(total.norm.to(total.dtype), call)


def host_coefficient(max_norm: float, total: float) -> float:
    """``min(1, max_norm / (total + 1e-6))`` in Python float64, the bits ``clamp`` gives on the
    device: a NaN coefficient stays NaN (not ``min()``)."""
    coef = max_norm / (total + 1e-6)
    return 1.0 if coef > 1.0 else coef


def scale_host(groups: dict, coef: float, foreach: Optional[bool]) -> None:
    """Scale ``groups`` by a coefficient read on the host (CPU): multiplying by exactly 1.0
    changes nothing, so that pass over every grad is skipped."""
    if coef != 1.0:
        with phase("scale"):
            scale_(groups, torch.tensor(coef, dtype=torch.float64), foreach)


@torch.no_grad()
def clip_grads_with_norm_(
    parameters: ParamsLike, max_norm: float, total_norm: torch.Tensor, foreach: Optional[bool] = None
) -> None:
    r"""Scale the gradients of ``parameters`` by ``min(1, max_norm / (total_norm + 1e-6))``.

    No communication (unless ``total_norm`` is a DTensor, which is made whole first) and no
    layout checks: ``total_norm`` (e.g. from :func:`get_total_norm`) must be the same on every
    rank for the clipped model to stay consistent.

    Args:
        parameters (Tensor, Iterable[Tensor] or nn.Module): parameters whose grads are scaled.
        max_norm (float): max norm of the gradients.
        total_norm (Tensor): total norm of the gradients.
        foreach (bool, optional): use foreach kernels (default: when available).
    """
    max_norm = check_max_norm(max_norm)
    if not isinstance(total_norm, torch.Tensor):
        total_norm = torch.tensor(_as_float(total_norm, "total_norm"))
    elif hasattr(total_norm, "full_tensor"):  # a DTensor norm, e.g. from torch's own function
        total_norm = total_norm.full_tensor()
    groups = {key: coalesce(tensors) for key, tensors in local_grad_tensors(parameters).items()}
    scale_(groups, (max_norm / (total_norm + 1e-6)).clamp(max=1.0), foreach)


@torch.no_grad()
def clip_grad_value_(parameters: ParamsLike, clip_value: float, foreach: Optional[bool] = None) -> None:
    r"""Clamp every element of the full gradients of ``parameters`` to ``[-clip_value, clip_value]``
    in place, under any layout.

    Element-wise: local shards and replicas are clamped where they are, with no communication.
    ``Partial`` DTensor grads (unreduced sums, e.g. LayerNorm grads under SequenceParallel) hold
    summands, whose clamp would not bound the full gradient: they are first made whole (one
    all-reduce per partial mesh group, issued by exactly the ranks of that mesh, as the norm path
    does), clamped, and written back as summands of the clamped value (the whole value on the
    first rank of each partial mesh dimension and zeros elsewhere for a sum; the value everywhere
    for an average), so the gradient each DTensor stands for equals the one-process clamp.

    Args:
        parameters (Tensor, Iterable[Tensor] or nn.Module): parameters whose grads are clamped.
        clip_value (float): maximum allowed absolute value of the gradients.
        foreach (bool, optional): use foreach kernels (default: when available).
    """
    params, _ = as_param_list(parameters)
    try:
        clip_value = _as_float(clip_value, "clip_value")
    except Exception:
        if dist.is_available() and dist.is_initialized():  # still join the Partial grads' collectives
            _join_partial_reductions(Call("clip_grad_value_", 2.0, None, False, CallGroup(True), params))
        raise
    holders = [p for p in params if reducible_partial(p.grad)]
    if holders:
        _clamp_partial_grads([cast(DTensor, p.grad) for p in holders], holders, clip_value)
    plain = [p for p in params if not reducible_partial(p.grad)] if holders else params
    for p in plain:  # a clamp is not linear: a sparse grad's repeated indices are summed first
        if p.grad is not None and p.grad.is_sparse and not p.grad.is_coalesced():
            p.grad = p.grad.coalesce()
    for tensors in local_grad_tensors(plain).values():
        tensors = coalesce(tensors)
        if foreach is False:
            for t in tensors:
                t.clamp_(min=-clip_value, max=clip_value)
        elif tensors:
            torch._foreach_clamp_min_(tensors, -clip_value)
            torch._foreach_clamp_max_(tensors, clip_value)


def _clamp_partial_grads(grads: list[DTensor], holders: list[torch.Tensor], clip_value: float) -> None:
    """Clamp ``Partial`` grads' full values and write them back as summands (see ``clip_grad_value_``);
    ``holders``: their parameters, which name them for the pairing across ranks."""
    # ``reduce_partial_grads`` returns its own order with the tag passed through: the index
    # travels in the tag's place
    names = pairing_names(grads, holders)
    for value, index in reduce_partial_grads([(g, float(i), n) for i, (g, n) in enumerate(zip(grads, names))]):
        grad = grads[int(index)]
        spec, local = spec_of(grad), local_of(grad)
        clamped = value.clamp(-clip_value, clip_value).view(local.shape)
        # this rank is the first of every partial mesh dim where the op is a sum
        first = all(spec.mesh.get_local_rank(dim) == 0 for dim in partial_dims(spec) if is_sum_dim(spec, dim))
        local.copy_(clamped if first else torch.zeros_like(clamped))
