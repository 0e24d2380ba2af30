"""Extra peak memory of one ``clip_grad_norm_`` call: at most 10 % of the local
grads' bytes plus 1 MiB, for every dtype, norm type and zero pattern, on the CPU path and on the
no-host-read (accelerator) path, with the results of the blocked conversions unchanged.

- resident memory of one call in a fresh process (``benchmarks/bench_memory.py --child``), and
  the allocator's peak of a second call (exact, no page or C-heap noise);
- the accelerator path, counted on meta tensors (``bench_memory.OpBytes``), a counter that is
  itself checked against the CPU allocator's records;
- the accelerator path's values, run on CPU tensors (``measures_in_rows`` patched).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import distclip
from distclip.math import partials as local_norms

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from benchmarks import bench_memory  # noqa: E402 - the benchmark's grads, calls and counter
from benchmarks.measure import extra_peak_bytes  # noqa: E402

MIB = 2**20


def bound(grad_bytes: int) -> float:
    return 0.10 * grad_bytes + MIB


# ----------------------------------------------------------------------------- resident memory


RSS_CASES = [("bf16", "distclip"), ("emb_bf16", "distclip"), ("emb_bf16", "distclip_never")]


def test_one_call_in_a_fresh_process():
    """64 MiB of grads per case: a bf16 grad (its float32 accumulation was a whole copy, 2x) and an
    embedding with zero rows (its float64 repair measured the whole matrix again, 4x bf16), on the
    CPU path, and the embedding on the no-host-read path (float64 accumulation: was 4x). Each case
    in its own process, all at once."""
    procs = {}
    for case, method in RSS_CASES:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "DISTCLIP_HOST_READS": "never" if method == "distclip_never" else "auto"}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_memory.py"), "--child", case, method, "--mib", "64"]
        procs[case, method] = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for key, proc in procs.items():
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, (key, err[-3000:])
        r = json.loads(out.strip().splitlines()[-1])
        limit = bound(r["grad_bytes"])
        assert r["alloc_extra_bytes"] <= limit, (key, r)  # the allocator's records: exact
        # resident memory: the same bound, plus a page-granular allowance for the C heap
        assert r["rss_extra_bytes"] <= limit + MIB / 2, (key, r)


# ----------------------------------------------------------------------------- accelerator path, counted


def _meta(shape, dtype):
    return torch.empty(shape, dtype=dtype, device="meta")


NORM_TYPES = (2.0, 1.0, 3.0, 0.5, math.inf, -math.inf, 0.0, -1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.complex64])
def test_accelerator_path_bytes(dtype):
    """One large grad (a conversion of the whole tensor on ``_foreach_norm``'s per-tensor
    fallback, which it takes for p other than 1, 2, inf; complex magnitudes) and many small grads
    beside a large one (the fused kernel's partials: tensors x chunks of the widest)."""
    layouts = {"large": [_meta((4096, 4096), dtype)], "many": [_meta((8,), dtype) for _ in range(5000)] + [_meta((1 << 24,), dtype)]}
    for name, grads in layouts.items():
        limit = bound(sum(g.numel() * g.element_size() for g in grads))
        params = bench_memory.params_of(grads)
        distclip.clip_grad_norm_(params, 1.0)  # discovery and the layout plan
        for p in NORM_TYPES if name == "large" else (2.0, 3.0):
            peak, op = bench_memory.count(bench_memory.clip_fn("distclip", params, p), "meta")
            assert peak <= limit, (name, dtype, p, peak, op, limit)


def test_counter_matches_the_cpu_allocator():
    """``OpBytes`` with the CPU kernels' rules agrees with the profiler's allocator records on CPU
    calls (conversions, repairs, blocks and norms): what it counts on meta is what it would see."""
    for case, p in (("bf16", 2.0), ("emb_bf16", 2.0), ("emb_fp32", 2.0), ("fp32", 3.0)):
        dtype, kind = bench_memory.CASES[case]
        grads = bench_memory.make_grads(kind, dtype, 8)
        counted, _ = bench_memory.counted_bytes("distclip", grads, p, kernels="cpu")
        measured, _ = extra_peak_bytes(bench_memory.clip_fn("distclip", bench_memory.params_of(grads), p), torch.device("cpu"))
        assert measured is not None and abs(counted - measured) <= 0.05 * measured + 64 * 1024, (case, counted, measured)


# ----------------------------------------------------------------------------- values


def _reference(grads, p):
    v = torch.cat([g.reshape(-1).to(torch.complex128 if g.is_complex() else torch.float64).abs() for g in grads])
    return float(torch.linalg.vector_norm(v, p))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.complex64])
def test_accelerator_path_values(monkeypatch, dtype):
    """The accelerator path (whole tensors, cut into views and batches where it must) on CPU
    tensors, float64 accumulation as without host reads: the float64 reference norm."""
    monkeypatch.setattr(local_norms, "measures_in_rows", lambda device: False)
    monkeypatch.setenv("DISTCLIP_HOST_READS", "never")
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in [(400, 500), (7,), (90000,)] + [(5,)] * 300]
    grads[0][::3] = 0
    for p in NORM_TYPES:
        got, want = float(distclip.get_total_norm(grads, norm_type=p)), _reference(grads, p)
        assert math.isclose(got, want, rel_tol=1e-5), (dtype, p, got, want)


@pytest.mark.parametrize("dtype,acc", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.float32, torch.float64)])
def test_blocks_give_the_bits_of_one_conversion(dtype, acc):
    """A conversion made a block of rows at a time gives the bits of the conversion of the whole
    matrix (what ``vector_norm(..., dtype=acc)`` makes), so the CPU path's results are unchanged."""
    m = torch.randn(1000, 512, dtype=torch.float64).to(dtype)
    scratch = local_norms._Scratch(local_norms.BLOCK_MIN // 3)
    for p in (2.0, 1.0, 3.0, math.inf):
        assert torch.equal(local_norms._block_norms(m, p, acc, False, scratch), torch.linalg.vector_norm(m, p, dim=1, dtype=acc))
    z = torch.randn(1000, 512, dtype=torch.complex64)
    want = torch.linalg.vector_norm(z.abs(), 3.0, dim=1, dtype=torch.float64)  # magnitudes in float32, as before
    assert torch.equal(local_norms._block_norms(z, 3.0, torch.float64, True, scratch), want)
