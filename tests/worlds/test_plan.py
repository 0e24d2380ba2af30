"""Layout plans are reused across calls but never stale: every change a plan depends on is seen at
the next call, and a plan keeps nothing alive."""

import gc
import math
import weakref

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

import distclip
from distclip.clip import PLANS
from harness import run_world
from worlds import dparam, full_grad, pparam, reference_norm


def _params(n=6, dtype=torch.float32):
    out = []
    for i in range(n):
        p = nn.Parameter(torch.zeros(3 + i, dtype=dtype))
        p.grad = full_grad((3 + i,), i, dtype)
        out.append(p)
    return out


def _ref(params, p=2.0):
    return reference_norm([q.grad for q in params if q.grad is not None], p)


def test_dtype_changes_under_the_same_parameters():
    params = _params()
    for _ in range(2):
        assert distclip.clip.total_grad_norm(params).dtype == torch.float32
    for q in params:
        if hasattr(torch.Tensor, "grad_dtype"):  # torch >= 2.10 checks grad dtypes unless told not to
            q.grad_dtype = None
            q.grad = q.grad.double() * 2
        else:  # older torch refuses such a grad outright; the grad's own data can still change dtype
            q.grad.data = q.grad.double() * 2
    total = distclip.clip.total_grad_norm(params)
    assert total.dtype == torch.float64 and abs(float(total) - _ref(params)) < 1e-12 * _ref(params)
    # (A device change under the same parameter objects cannot be made on a CPU-only machine:
    # torch refuses a grad on another device. The plan checks the device like the dtype.)


def test_grads_set_to_none_and_lists_changing_order_or_length():
    params = _params()
    distclip.clip.total_grad_norm(params)
    params[2].grad = None
    assert abs(float(distclip.clip.total_grad_norm(params)) - _ref(params)) <= 1e-6 * _ref(params)
    params[2].grad = full_grad((5,), 77)
    for variant in (params[::-1], params[:4], params + _params(2)):
        for _ in range(2):
            assert abs(float(distclip.clip.total_grad_norm(variant)) - _ref(variant)) <= 1e-6 * _ref(variant)


def test_a_plan_keeps_no_model_alive():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    model(torch.randn(3, 4)).sum().backward()
    distclip.clip_grad_norm_(model, 1.0)
    distclip.clip_grad_norm_(model, 1.0)
    ids = tuple(id(p) for p in model.parameters())
    assert any(key[1] == ids for key in PLANS.plans)
    assert all(weakref.getweakrefcount(p) == 0 for p in model.parameters())  # torch's swap_tensors needs none
    refs = [weakref.ref(p) for p in model.parameters()] + [weakref.ref(model)]  # the test's own, after the calls
    del model
    gc.collect()
    assert all(r() is None for r in refs)


def test_a_plan_is_not_trusted_for_another_tensor_at_the_same_id():
    """A plan names parameters by id only: a swapped parameter (same object, another tensor behind
    it, what ``.to()`` does to DTensor parameters) or a recycled id must not pass its check."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    model(torch.randn(3, 4)).sum().backward()
    params = list(model.parameters())
    for _ in range(3):
        distclip.clip_grad_norm_(params, 1e9)
    plan = PLANS.plans[PLANS.key(params, distclip.layout.discovery.SINGLE_PROCESS)]
    assert plan.apply(params) is not None
    grad = params[0].grad
    params[0].grad = None
    torch.utils.swap_tensors(params[0], nn.Parameter(torch.zeros(4, 4)))
    params[0].grad = grad
    assert plan.apply(params) is None  # discovered anew
    assert abs(float(distclip.clip_grad_norm_(params, 1e9)) - _ref(params)) <= 1e-6 * _ref(params)


def _placement_changes(rank, world):
    mesh = init_device_mesh("cpu", (world,))
    full = [full_grad((2 * world, 3), 1), full_grad((5,), 2)]
    shard = dparam(full[0], mesh, [Shard(0)])
    plain = pparam(full[1])
    out = []
    for _ in range(2):
        out.append((float(distclip.clip.total_grad_norm([shard, plain])), reference_norm(full, 2.0)))
    # same parameter objects, grads now replicated DTensors: the weight must change
    shard.grad = distribute_tensor(full[0].clone(), mesh, [Replicate()])
    out.append((float(distclip.clip.total_grad_norm([shard, plain])), reference_norm(full, 2.0)))
    # a mark made after the plan was built: the plain grad is now one of `world` pieces
    piece = full_grad((5,), 3)
    plain.grad = piece.clone()
    distclip.clip.total_grad_norm([shard, plain])
    distclip.mark_sharded(plain, dist.group.WORLD)
    out.append((float(distclip.clip.total_grad_norm([shard, plain])), reference_norm([full[0]] + [piece] * world, 2.0)))
    # reordered list with different weights per entry
    out.append((float(distclip.clip.total_grad_norm([plain, shard])), reference_norm([full[0]] + [piece] * world, 2.0)))
    # every norm type through a reused plan
    for p in (1.0, math.inf, 0.5, -2.0, 0.0):
        for _ in range(2):
            out.append((float(distclip.clip.total_grad_norm([shard, plain], p)), reference_norm([full[0]] + [piece] * world, p)))
    return out


def test_same_parameters_whose_grads_change_placement_or_marks():
    for rank_results in run_world(_placement_changes, 2):
        for got, ref in rank_results:
            assert abs(got - ref) <= 1e-6 * ref, rank_results


def _specs_renewed(rank, world):
    from torch.distributed.tensor import DTensor, Partial

    mesh = init_device_mesh("cpu", (world,))
    full = [full_grad((2 * world, 3), 4), full_grad((6,), 5)]
    shard = dparam(full[0], mesh, [Shard(0)])
    summed = dparam(full[1], mesh, [Replicate()])
    params = [shard, summed]
    ids = tuple(map(id, params))

    def renew(placement=Shard(0)):
        # a spec object per grad per call (DTensor.from_local), the same mesh and placements
        local = full[0].tensor_split(world)[rank] if placement == Shard(0) else full[0]
        shard.grad = DTensor.from_local(local.clone(), mesh, [placement])
        summed.grad = DTensor.from_local(full[1] / world, mesh, [Partial()])

    def plan():
        return next(found for key, found in PLANS.plans.items() if key[1] == ids)

    out = []
    for _ in range(2):
        renew()
        out.append((float(distclip.clip.total_grad_norm(params)), reference_norm(full, 2.0)))
    built = plan()
    for p in (2.0, 1.0, math.inf):
        renew()
        out.append((float(distclip.clip.total_grad_norm(params, p)), reference_norm(full, p)))
    held = plan() is built and built.valid  # new spec objects of the same structure: the plan holds
    renew(Replicate())  # another placement under a new spec: the plan must not hold
    out.append((float(distclip.clip.total_grad_norm(params)), reference_norm(full, 2.0)))
    replaced = plan() is not built or not built.valid
    return out, held, replaced


def test_new_spec_objects_of_the_same_structure_keep_the_plan_and_others_do_not():
    for rank_results, held, replaced in run_world(_specs_renewed, 2):
        for got, ref in rank_results:
            assert abs(got - ref) <= 1e-6 * ref, rank_results
        assert held and replaced
