"""torch's own FSDP2 and FSDP1 clip tests, run against distclip on CPU gloo ranks.

Ported from PyTorch (BSD-3-Clause: Copyright (c) 2016- Facebook, Inc (Adam Paszke) and the PyTorch
contributors; see PyTorch's LICENSE):

- ``test/distributed/_composable/fsdp/test_fully_shard_clip_grad_norm_.py`` at commit
  0f31e61295ea6ab54df9279d4fd1e4c32599e81b: ``_TestClipGradNormBase._test_clip_grad_norm`` and
  ``test_clip_grad_norm_1d`` (world size 2). ``test_clip_grad_norm_2d`` (dp x tp with sequence
  parallelism) is written in ``_fsdp2_world`` but not run: torch's test ``Transformer`` under TP
  cannot run forward on CPU (its attention's CPU flash kernel has no DTensor sharding rule, and the
  math kernel mixes plain tensors into DTensor ops), with distclip or with torch's own clip; 2-D
  TP + FSDP2 and TP + sequence parallelism are layouts of ``distclip.verify``;
- ``test/distributed/fsdp/test_fsdp_clip_grad_norm.py`` at commit
  031c7bfb22ac88a62c9100ffed784ab63c5ae38d: ``_test_ddp_parity`` (FSDP1 against DDP with torch's
  ``clip_grad_norm_``), where FSDP1's own ``FullyShardedDataParallel.clip_grad_norm_`` is replaced by
  ``distclip.clip_grad_norm_(fsdp_model, ...)``; ``test_non_root`` tests FSDP1's own method (an
  error distclip has no reason to raise: it clips any module) and is not ported.

``torch.nn.utils.clip_grad_norm_`` on the sharded model is replaced by ``distclip.clip_grad_norm_``;
the reference stays torch's function on the replicated (DDP) model. The assertions are torch's,
``self.assertEqual`` being ``torch.testing.assert_close`` (its defaults), with one difference (README,
"differs from torch"): the count of all-reduces. torch expects one per mesh dim of its result
(``Partial`` -> ``Replicate``); distclip makes one per call, plus, for ``Partial`` grads (the 2-D
test's LayerNorms under sequence parallelism), a pairing check and their values per partial mesh
group. GPUs become CPU gloo ranks; ``offload_params`` is run as False only (CPU offload of a CPU
model is the model itself); the FSDP2 test's losses are scaled (``LOSS_SCALE``).
"""

from __future__ import annotations

import copy
import functools
import itertools

import pytest
import torch
import torch.distributed as dist

import distclip
from checks import count_collectives
from harness import CaseWorld

# torch's test needs every grad's norm above max_norm (so that the clip is not vacuous); its seeds
# give that on CUDA, not on CPU, where the same seeds draw other values: both models' losses are
# scaled alike, which keeps that precondition and changes nothing else the test checks.
LOSS_SCALE = 100.0
# and its check that FSDP2's grads equal the replicated model's after several optimizer steps holds
# on CUDA in float32, not on CPU, where float32 reduction orders differ more (it fails there with
# torch's own clip too): the models are float64 on CPU, which keeps that check as it is
DTYPE = torch.float64


def _norm_cases(two_d: bool) -> tuple[str, ...]:
    return tuple(f"p={p}" for p in ((2, 1, 3, float("inf")) if two_d else (2, 1, float("inf"))))


def _fsdp2_world(rank: int, world: int, two_d: bool) -> dict[str, list[str]]:
    """{f"p={norm_type}": failures} for every norm type of torch's test, on each rank."""
    from torch.distributed._composable import replicate
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard
    from torch.testing._internal.distributed._tensor.common_dtensor import ModelArgs, Transformer, TransformerBlock

    by_case: dict[str, list[str]] = {}
    norm_types = (2, 1, 3, float("inf")) if two_d else (2, 1, float("inf"))
    for norm_type in norm_types:
        by_case[f"p={norm_type}"] = failures = []
        torch.manual_seed(42)
        model = Transformer(ModelArgs(dropout_p=0.0)).to(DTYPE)
        if two_d:
            global_mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
            dp_mesh, tp_mesh = global_mesh["dp"], global_mesh["tp"]
            ref_model = replicate(copy.deepcopy(model), process_group=dp_mesh.get_group())
            model = Transformer.parallelize(model, tp_mesh, use_seq_parallel=True)
        else:
            dp_mesh = init_device_mesh("cpu", (world,))
            ref_model = replicate(copy.deepcopy(model))
        ref_optim = torch.optim.Adam(ref_model.parameters(), lr=1e-2)
        for module in model.modules():
            if isinstance(module, TransformerBlock):
                fully_shard(module, mesh=dp_mesh)
        fully_shard(model, mesh=dp_mesh)
        optim = torch.optim.Adam(model.parameters(), lr=1e-2)
        max_norm = 1
        vector_norm_fn = functools.partial(torch.linalg.vector_norm, ord=norm_type)
        torch.manual_seed(42 + dp_mesh.get_local_rank() + 1)
        inp = torch.randint(0, model.model_args.vocab_size, (3, 16))
        # CPU: SDPA's math kernel (the CPU flash kernel has no DTensor sharding rule)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        for iter_idx in range(10):
            ref_optim.zero_grad()
            with sdpa_kernel(SDPBackend.MATH):
                (ref_model(inp).sum() * LOSS_SCALE).backward()
                optim.zero_grad()
                (model(inp).sum() * LOSS_SCALE).backward()

            ref_grads = [p.grad.detach().clone() for p in ref_model.parameters()]
            local_grads = [p.grad.to_local().detach().clone() for p in model.parameters()]
            for ref_grad, param in zip(ref_grads, model.parameters()):
                if tuple(param.placements) == (Shard(0), Shard(0)):  # torch's own skip (strided sharding)
                    continue
                try:
                    torch.testing.assert_close(ref_grad, param.grad.full_tensor())
                except AssertionError as e:
                    failures.append(f"p={norm_type} iter {iter_idx}: grads before the clip: {e}")
            assert all(vector_norm_fn(g).item() > max_norm for g in ref_grads)
            assert all(vector_norm_fn(g).item() > max_norm for g in local_grads)

            ref_total_norm = torch.nn.utils.clip_grad_norm_(ref_model.parameters(), max_norm=max_norm, norm_type=norm_type)
            with count_collectives() as comm_mode:  # torch's CommDebugMode sees no c10d collective on CPU gloo
                total_norm = distclip.clip_grad_norm_(model.parameters(), max_norm=max_norm, norm_type=norm_type, foreach=True)
            try:
                torch.testing.assert_close(ref_total_norm, total_norm.full_tensor())
            except AssertionError as e:
                failures.append(f"p={norm_type} iter {iter_idx}: total norm: {e}")
            # torch: one all-reduce per mesh dim of its result; distclip: one per call, plus two per
            # partial mesh group of Partial grads (the pairing check and the values)
            partial_groups = 1 if two_d else 0
            expected_all_reduces = 1 + 2 * partial_groups
            got = comm_mode.count
            if got != expected_all_reduces:
                failures.append(f"p={norm_type} iter {iter_idx}: {got} all-reduces, expected {expected_all_reduces}")
            for param, grad in zip(ref_model.parameters(), ref_grads):
                assert vector_norm_fn(param.grad).item() <= max_norm
                if torch.count_nonzero(grad):
                    assert not torch.equal(param.grad, grad)
            for param, grad in zip(model.parameters(), local_grads):
                assert vector_norm_fn(param.grad.to_local()).item() <= max_norm
                if torch.count_nonzero(grad):
                    assert not torch.equal(param.grad.to_local(), grad)
            ref_optim.step()
            optim.step()
    return by_case


@pytest.fixture(scope="module")
def fsdp2_world():
    return CaseWorld(_fsdp2_world, 2, _norm_cases(False), False, timeout=600)


@pytest.mark.parametrize("case", _norm_cases(False))
def test_fully_shard_clip_grad_norm_1d(fsdp2_world, case):
    fsdp2_world.check(case, shown=20)


FSDP1_CASES = tuple(
    f"max_norm={max_norm} p={norm_type} {strategy} use_orig_params={orig}"
    for max_norm, norm_type, strategy, orig in itertools.product(
        [1, 2.5], [1, 2, float("inf")], ["FULL_SHARD", "NO_SHARD", "mixed_strategy"], [False, True])
)


def _fsdp1_world(rank: int, world: int) -> dict[str, list[str]]:
    """{label: failures} for every name in FSDP1_CASES, on each rank."""
    from torch.distributed.fsdp import ShardingStrategy
    from torch.distributed.fsdp.fully_sharded_data_parallel import CPUOffload
    from torch.distributed.fsdp.fully_sharded_data_parallel import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from torch.nn import TransformerDecoderLayer, TransformerEncoderLayer
    from torch.nn.parallel import DistributedDataParallel as DDP
    from torch.testing._internal.common_fsdp import DEVICEInitMode, FSDPInitMode, TransformerWithSharedParams

    by_case: dict[str, list[str]] = {}
    process_group = dist.distributed_c10d._get_default_group()
    for max_norm, norm_type, sharding_strategy, use_orig_params in itertools.product(
        [1, 2.5], [1, 2, float("inf")], [ShardingStrategy.FULL_SHARD, ShardingStrategy.NO_SHARD, "mixed_strategy"], [False, True]
    ):
        strategy = sharding_strategy if isinstance(sharding_strategy, str) else sharding_strategy.name
        label = f"max_norm={max_norm} p={norm_type} {strategy} use_orig_params={use_orig_params}"
        by_case[label] = failures = []
        local_model = TransformerWithSharedParams.init(process_group, FSDPInitMode.NO_FSDP, DEVICEInitMode.DEVICE_BEFORE,
                                                       deterministic=True)
        ddp_model = DDP(local_model)
        fsdp_kwargs = {"cpu_offload": CPUOffload(offload_params=False), "use_orig_params": use_orig_params,
                       "device_id": torch.device("cpu")}
        if sharding_strategy == "mixed_strategy":
            fsdp_model = TransformerWithSharedParams.init(process_group, FSDPInitMode.NO_FSDP, DEVICEInitMode.DEVICE_BEFORE,
                                                          deterministic=True)
            fsdp_model.transformer.encoder = FSDP(fsdp_model.transformer.encoder, sharding_strategy=ShardingStrategy.NO_SHARD,
                                                  **fsdp_kwargs)
            fsdp_model.transformer.decoder = FSDP(fsdp_model.transformer.decoder, sharding_strategy=ShardingStrategy.FULL_SHARD,
                                                  **fsdp_kwargs)
            fsdp_model = FSDP(fsdp_model, sharding_strategy=ShardingStrategy.FULL_SHARD, **fsdp_kwargs)
        else:
            fsdp_kwargs.update({"sharding_strategy": sharding_strategy,
                                "auto_wrap_policy": ModuleWrapPolicy({TransformerEncoderLayer, TransformerDecoderLayer})})
            fsdp_model = TransformerWithSharedParams.init(process_group, FSDPInitMode.RECURSIVE, DEVICEInitMode.DEVICE_BEFORE,
                                                          deterministic=True, fsdp_kwargs=fsdp_kwargs)
        LR = 1e-2
        ddp_optim = torch.optim.Adam(ddp_model.parameters(), lr=LR)
        fsdp_optim = torch.optim.Adam(fsdp_model.parameters(), lr=LR)
        device = torch.device("cpu")
        LARGE_FACTOR = 100
        inp = ddp_model.module.get_input(device)
        for model in (ddp_model, fsdp_model):
            out = model(*inp)
            loss = model.module.get_loss(inp, out) if isinstance(model, (DDP, FSDP)) else model.get_loss(inp, out)
            loss.backward()
        for param in itertools.chain(ddp_model.parameters(), fsdp_model.parameters()):
            if param.grad is not None:
                param.grad *= LARGE_FACTOR
        orig_ddp_grads = [param.grad.detach().clone() for param in ddp_model.parameters()]
        orig_fsdp_grads = [param.grad.detach().clone() if param.grad is not None else None for param in fsdp_model.parameters()]
        ddp_total_norm = torch.nn.utils.clip_grad_norm_(ddp_model.parameters(), max_norm=max_norm, norm_type=norm_type)
        fsdp_total_norm = distclip.clip_grad_norm_(fsdp_model, max_norm=max_norm, norm_type=norm_type)
        try:
            torch.testing.assert_close(ddp_total_norm, fsdp_total_norm)
            for param, orig_grad in zip(ddp_model.parameters(), orig_ddp_grads):
                assert not torch.equal(param.grad, orig_grad)
            for param, orig_grad in zip(fsdp_model.parameters(), orig_fsdp_grads):
                if param.grad is None:
                    assert orig_grad is None
                else:
                    assert not torch.equal(param.grad, orig_grad)
            ddp_optim.step()
            fsdp_optim.step()
            with FSDP.summon_full_params(fsdp_model):
                for (n1, p1), (n2, p2) in zip(ddp_model.module.named_parameters(), fsdp_model.named_parameters()):
                    assert n1 == n2, (n1, n2)
                    torch.testing.assert_close(p1, p2)
        except AssertionError as e:
            failures.append(f"{label}: {e}")
    return by_case


@pytest.fixture(scope="module")
def fsdp1_world():
    return CaseWorld(_fsdp1_world, 2, FSDP1_CASES, timeout=600)


@pytest.mark.parametrize("case", FSDP1_CASES)
def test_fsdp1_clip_grad_norm_ddp_parity(fsdp1_world, case):
    fsdp1_world.check(case, shown=20)
