"""Extra peak memory of one ``clip_grad_norm_`` call: distclip next to torch (issue 27, item 6).

    python benchmarks/bench_memory.py --out benchmarks/results         # 512 MiB of grads per case
    python benchmarks/bench_memory.py --mib 64 --cases bf16,emb_bf16    # a quick look

**Resident memory, one call in a fresh process.** For every case and method a child process (this
file with ``--child``) fills the grads in place (no temporaries), calls the same method once on a
tiny grad of the same dtype (imports and lazy set-up out of the way), resets the kernel's
high-water mark (``5`` into ``/proc/self/clear_refs``), reads ``VmHWM``, makes the one call and
reads ``VmHWM`` again: the difference is the call's extra peak resident memory, what a step pays on
top of its grads. Clipping is on (``max_norm`` 1, far below the norm), so the scale runs too. A
second call in the same child is measured from the profiler's allocator records
(``measure.extra_peak_bytes``), which neither page granularity nor the C allocator's reuse blurs.

Methods: ``distclip`` (the CPU path: float32 pieces, float64 repair), ``distclip_never``
(``DISTCLIP_HOST_READS=never``: the no-host-read path, float64 accumulation, here over CPU rows)
and ``torch`` (``torch.nn.utils.clip_grad_norm_``).

**Bytes on the accelerator path, counted.** Without an accelerator, the accelerator path
(``_foreach_norm`` over whole tensors) runs on meta tensors of the same shapes under ``OpBytes``: a
``TorchDispatchMode`` that holds the bytes of every tensor the call's ops create until the last
tensor on that storage is freed, and adds, while an op runs, what its kernel allocates inside
(``kernel_bytes``: the converted copy a reduction with another ``dtype`` reads, the fused
``_foreach_norm``'s per-chunk partials), as torch's CUDA sources do it. The same counter run over
the CPU kernels on CPU tensors is checked against the profiler's allocator records (``model_check``).

Cases: one (rows, 4096) grad of fp32, bf16 or fp16; ``emb_*``: an embedding grad of rows of 4096
in which seven rows of every eight are zero (tokens not in the batch; row 0, the padding row,
among them); ``layers_bf16``: transformer layers (qkv, out, up, down, two norm scales, d=2048).
Writes ``memory.json`` (``memory_<tag>.json`` with ``--tag``), with the hardware record, into ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import subprocess
import sys
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Optional

if __package__ in (None, ""):  # run as a file: the package importable, after any --src (a child's PYTHONPATH)
    _root = str(Path(__file__).resolve().parents[1])
    if _root not in sys.path:
        sys.path.append(_root)

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "fp32": (torch.float32, "dense"),
    "bf16": (torch.bfloat16, "dense"),
    "fp16": (torch.float16, "dense"),
    "emb_bf16": (torch.bfloat16, "embedding"),
    "emb_fp32": (torch.float32, "embedding"),
    "layers_bf16": (torch.bfloat16, "layers"),
}
METHODS = ("distclip", "distclip_never", "torch")
WIDTH = 4096  # elements per row of the dense and embedding grads
LOWP = (torch.float16, torch.bfloat16)
FOREACH_CHUNK = 1 << 16  # torch's MultiTensorApply.cuh kChunkSize


# ----------------------------------------------------------------------------- the grads


def shapes(kind: str, dtype: torch.dtype, mib: float) -> list[tuple[int, ...]]:
    """The grad shapes of a case holding at least ``mib`` MiB."""
    elements = int(mib * 2**20) // torch.empty((), dtype=dtype).element_size()
    if kind in ("dense", "embedding"):
        return [(max(8, -(-elements // WIDTH) // 8 * 8), WIDTH)]
    d = 2048
    layer = [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d), (d,), (d,)]
    per_layer = sum(math.prod(s) for s in layer)
    return layer * max(1, -(-elements // per_layer))


def make_grads(kind: str, dtype: torch.dtype, mib: float, device: str = "cpu") -> list[torch.Tensor]:
    """The case's grads, filled in place a slice at a time (no temporary as large as a grad)."""
    gen = torch.Generator().manual_seed(0)
    grads = [torch.empty(s, dtype=dtype, device=device) for s in shapes(kind, dtype, mib)]
    if device == "meta":
        return grads
    for g in grads:
        for part in g.view(-1).split(1 << 22):
            part.normal_(generator=gen)
        if kind == "embedding":  # rows 8k+1 keep their values; row 0 (padding) is zero
            rows = g.view(-1, 8, WIDTH)
            for k in (0, 2, 3, 4, 5, 6, 7):
                rows[:, k].zero_()
    return grads


def params_of(grads: list[torch.Tensor]) -> list[torch.nn.Parameter]:
    # torch.empty's pages are never touched: the parameters cost no resident memory
    params = []
    for g in grads:
        p = torch.nn.Parameter(torch.empty(g.shape, dtype=g.dtype, device=g.device))
        p.grad = g
        params.append(p)
    return params


def clip_fn(method: str, params: list[torch.nn.Parameter], norm_type: float = 2.0) -> Callable[[], Any]:
    if method == "torch":
        return lambda: torch.nn.utils.clip_grad_norm_(params, 1.0, norm_type)
    import distclip

    return lambda: distclip.clip_grad_norm_(params, 1.0, norm_type)


# ----------------------------------------------------------------------------- resident memory (child)


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child(case: str, method: str, mib: float, threads: int) -> dict:
    """One case and method in this (fresh) process: the one call's extra peak RSS, then a second
    call's extra peak from the profiler's allocator records."""
    torch.set_num_threads(threads)
    dtype, kind = CASES[case]
    warm = params_of([torch.randn(4, WIDTH).to(dtype)])
    clip_fn(method, warm)()  # imports and lazy set-up, on another parameter list
    del warm
    grads = make_grads(kind, dtype, mib)
    params = params_of(grads)
    fn = clip_fn(method, params)
    gc.collect()
    reset = reset_hwm()
    rss = status_kib("VmRSS")
    base = status_kib("VmHWM")
    norm = float(fn())
    peak = status_kib("VmHWM")
    from benchmarks.measure import extra_peak_bytes

    alloc, how = extra_peak_bytes(fn, torch.device("cpu"))
    grad_bytes = sum(g.numel() * g.element_size() for g in grads)
    return {
        "case": case, "method": method, "grad_bytes": grad_bytes, "n_grads": len(grads), "norm": norm,
        "rss_extra_bytes": (peak - base) * 1024, "rss_before_bytes": rss * 1024, "hwm_reset": reset,
        "alloc_extra_bytes": alloc, "alloc_source": how,
    }


def run_child(case: str, method: str, mib: float, threads: int, src: Optional[str]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "DISTCLIP_HOST_READS": "never" if method == "distclip_never" else "auto"}
    env["PYTHONPATH"] = os.pathsep.join([p for p in (src, str(ROOT), env.get("PYTHONPATH")) if p])
    cmd = [sys.executable, __file__, "--child", case, method, "--mib", str(mib), "--threads", str(threads)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{case}/{method} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- bytes on the accelerator path


def _converts(src: torch.dtype, dst: Optional[torch.dtype], kernels: str) -> bool:
    """Whether a reduction of ``src`` elements with ``dtype=dst`` reads a converted copy of its
    whole input (ReduceOpsUtils.h ``make_reduction``: ``self.to(in_dtype)``; on CUDA half and
    bfloat16 to float32 is converted inside the kernel)."""
    return dst is not None and dst != src and not (kernels == "cuda" and src in LOWP and dst == torch.float32)


def kernel_bytes(func: Any, args: tuple, kwargs: dict, kernels: str) -> int:
    """Bytes an op's kernel allocates inside (beyond its outputs) while it runs, for the ops the
    norms use: ``linalg_vector_norm`` with a ``dtype`` (the converted copy), ``_foreach_norm``
    (ForeachReduceOp.cu: the fused kernel for p in {1, 2, inf} over dense float tensors keeps
    (tensors x chunks of the widest) partials; otherwise one ``linalg_vector_norm`` per tensor)
    and a complex ``abs`` (a complex temporary of its input on CPU, assumed on accelerators too)."""
    aten = torch.ops.aten
    if func in (aten.abs.default, aten.abs.out) and args[0].is_complex():  # computed complex, then made real
        return args[0].numel() * args[0].element_size()
    if func is aten.linalg_vector_norm.default:
        x, dtype = args[0], kwargs.get("dtype", args[4] if len(args) > 4 else None)
        return x.numel() * dtype.itemsize if _converts(x.dtype, dtype, kernels) else 0
    if func is aten._foreach_norm.Scalar:
        tensors = [t for t in args[0] if t.numel()]
        if not tensors:
            return 0
        p = float(args[1]) if len(args) > 1 else 2.0
        out = kwargs.get("dtype", args[2] if len(args) > 2 else None) or tensors[0].dtype
        fused = (
            kernels == "cuda" and p in (1.0, 2.0, math.inf) and all(t.is_floating_point() and t.is_contiguous() for t in tensors)
        )
        if fused:
            opmath = torch.float32 if out in LOWP else out
            widest = max(-(-t.numel() // FOREACH_CHUNK) for t in tensors)
            return (len(tensors) * widest + 320) * opmath.itemsize
        return max((t.numel() * out.itemsize for t in tensors if _converts(t.dtype, out, kernels)), default=0)
    return 0


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


class OpBytes(TorchDispatchMode):
    """Peak bytes held by the tensors a call's ops create on ``device_type`` plus, while an op runs,
    ``kernel_bytes`` (``kernels``: ``"cuda"`` or ``"cpu"`` rules). Storages that existed before (the
    grads) and views of them cost nothing; a storage counts until the last tensor on it is freed."""

    def __init__(self, device_type: str = "meta", kernels: str = "cuda") -> None:
        super().__init__()
        self.device_type, self.kernels = device_type, kernels
        self.sizes: dict[int, int] = {}
        self.refs: dict[int, int] = {}
        self.live = self.peak = self.ops = 0
        self.peak_op = ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops += 1
        inputs = {_storage_key(t) for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == self.device_type:
                self._hold(t, inputs)
        now = self.live + kernel_bytes(func, args, kwargs, self.kernels)
        if now > self.peak:
            self.peak, self.peak_op = now, str(func)
        return out

    def _hold(self, t: torch.Tensor, inputs: set[int]) -> None:
        key = _storage_key(t)
        if key not in self.sizes:
            if key in inputs:  # a view or in-place result of a tensor made before (a grad)
                return
            self.sizes[key], self.refs[key] = t.untyped_storage().nbytes(), 0
            self.live += self.sizes[key]
        self.refs[key] += 1
        weakref.finalize(t, self._drop, key)

    def _drop(self, key: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            self.live -= self.sizes.pop(key)
            del self.refs[key]


def count(fn: Callable[[], Any], device_type: str, kernels: str = "cuda") -> tuple[int, str]:
    """(peak bytes, the op at the peak) of ``fn()`` under ``OpBytes``."""
    counter = OpBytes(device_type, kernels)
    with counter:
        fn()
    return counter.peak, counter.peak_op


def counted_bytes(method: str, grads: list[torch.Tensor], norm_type: float = 2.0, kernels: str = "cuda") -> tuple[int, str]:
    """``count`` of one call over ``grads``, after a first (discovery and the layout plan: a first
    call's own allocations are not the norm's)."""
    fn = clip_fn(method, params_of(grads), norm_type)
    fn()
    return count(fn, grads[0].device.type, kernels)


def model_check(mib: float = 16.0) -> list[dict]:
    """``OpBytes`` with the CPU kernels' rules over CPU calls against the profiler's allocator records."""
    from benchmarks.measure import extra_peak_bytes

    rows = []
    for case, norm_type in (("bf16", 2.0), ("emb_bf16", 2.0), ("emb_fp32", 2.0), ("fp32", 3.0)):
        dtype, kind = CASES[case]
        grads = make_grads(kind, dtype, mib)
        counted, _ = counted_bytes("distclip", grads, norm_type, kernels="cpu")
        fn = clip_fn("distclip", params_of(grads), norm_type)
        measured, _ = extra_peak_bytes(fn, torch.device("cpu"))
        rows.append({"case": case, "norm_type": norm_type, "counted": counted, "profiler": measured})
    return rows


NORM_TYPES = (2.0, 1.0, 3.0, math.inf, 0.0, -1.0)


def device_counts(case: str, mib: float) -> dict:
    dtype, kind = CASES[case]
    grads = make_grads(kind, dtype, mib, device="meta")
    grad_bytes = sum(g.numel() * g.element_size() for g in grads)
    row: dict = {"case": case, "grad_bytes": grad_bytes}
    for method in ("distclip", "torch"):
        per_p = {str(p): counted_bytes(method, grads, p)[0] for p in NORM_TYPES}
        row[method] = per_p
    return row


# ----------------------------------------------------------------------------- driver


def frac(x: Optional[float], total: int) -> str:
    return "n/a" if x is None else f"{x / total:.3f}x"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--mib", type=float, default=512.0, help="MiB of grads per case")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--src", default=None, help="import distclip from this directory (a before/after comparison)")
    ap.add_argument("--tag", default=None, help="write memory_<tag>.json instead of memory.json")
    ap.add_argument("--no-device", action="store_true", help="skip the counted accelerator-path bytes")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", nargs=2, metavar=("CASE", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.mib, args.threads)))
        return
    cases, methods = args.cases.split(","), args.methods.split(",")
    rss: list[dict] = []
    print(f"extra peak memory of one clip_grad_norm_ call, {args.mib:g} MiB of grads, x the grads' bytes (RSS / allocator)")
    print(f"{'case':<12} " + " ".join(f"{m:>24}" for m in methods))
    for case in cases:
        cells = []
        for method in methods:
            r = run_child(case, method, args.mib, args.threads, args.src)
            rss.append(r)
            cells.append(f"{frac(r['rss_extra_bytes'], r['grad_bytes'])} / {frac(r['alloc_extra_bytes'], r['grad_bytes'])}")
        print(f"{case:<12} " + " ".join(f"{c:>24}" for c in cells), flush=True)
    device: list[dict] = []
    check: list[dict] = []
    if not args.no_device:
        if args.src:
            sys.path.insert(0, args.src)
        torch.set_num_threads(args.threads)
        print("\naccelerator path, counted on meta tensors (OpBytes), x the grads' bytes: p=2 / worst p of " + str(NORM_TYPES))
        for case in cases:
            row = device_counts(case, args.mib)
            device.append(row)
            total = row["grad_bytes"]
            cells = [f"{frac(row[m]['2.0'], total)} / {frac(max(row[m].values()), total)}" for m in ("distclip", "torch")]
            print(f"{case:<12} distclip {cells[0]:>16}   torch {cells[1]:>16}", flush=True)
        check = model_check()
        pairs = (f"{c['case']} p={c['norm_type']:g} {c['counted']} / {c['profiler']}" for c in check)
        print("counter vs profiler on CPU (bytes): " + ", ".join(pairs))
    if args.out:
        import distclip
        from benchmarks.env import cpu_model, git_commit, mem_total_gib

        meta = {
            "cpu_model": cpu_model(), "cpus_usable": len(os.sched_getaffinity(0)), "mem_total_gib": mem_total_gib(),
            "threads": args.threads, "torch": torch.__version__, "distclip": distclip.__version__, "distclip_src": args.src or str(ROOT),
            "python": platform.python_version(), "git_commit": git_commit(), "mib": args.mib,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "argv": sys.argv[1:],
        }
        path = Path(args.out)
        path.mkdir(parents=True, exist_ok=True)
        name = f"memory_{args.tag}.json" if args.tag else "memory.json"
        (path / name).write_text(json.dumps({"meta": meta, "rss": rss, "device_counted": device, "model_check": check}, indent=1))
        print(f"wrote {path / name}")


if __name__ == "__main__":
    main()
