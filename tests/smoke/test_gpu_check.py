"""benchmarks/gpu_check.py: its CPU smoke run end to end (what CI runs), its host-read counter,
its layout verdicts, and its GPU driver on canned part results (CI has no GPU to run that branch)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from benchmarks import gpu_check  # noqa: E402

SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
CALLS = ("clip_grad_norm_", "get_total_norm", "clip_grads_with_norm_", "grad_norms",
         "GradGuard.clip_+step (fixed, fused AdamW)", "GradGuard.clip_+step (zclip past warm-up, fused AdamW)")


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the script runs the full GPU check (minutes): run it by hand")
def test_cpu_smoke_runs_says_what_it_skipped_and_passes(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("DISTCLIP_HOST_READS", None)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], capture_output=True, text=True, timeout=240, env=env)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    result = json.loads(out.read_text())
    assert result["cuda"] is False and result["ok"] is True
    # (a) the smoke layouts, every check passed, on gloo ranks
    (verify,) = result["verify"].values()
    assert verify["ok"] and verify["backend"] == "gloo" and verify["world"] == 2
    assert verify["passed"] == list(gpu_check.SMOKE_LAYOUTS) and not verify["failed"]
    assert {name: (e["checks"], e["passed"]) for name, e in verify["layouts"].items()} == {n: (2, 2) for n in gpu_check.SMOKE_LAYOUTS}
    # (b) every public call on the no-host-read path, none reading a value in a warm call
    syncs = result["host_syncs"]
    assert syncs["ok"] and "DISTCLIP_HOST_READS=never" in syncs["method"]
    assert tuple(syncs["calls"]) == CALLS
    assert all(c["warm_call_syncs"] == 0 and "error" not in c for c in syncs["calls"].values()), syncs
    # (c) a small table, every method timed
    timing = result["timing"]["sizes"]
    assert list(timing) == ["20", "100"]
    assert all(timing[n][m]["median_ms"] > 0 for n in timing for m in ("distclip", "torch", "minimal"))
    # what it could not do without CUDA is said, in the JSON and in the summary
    skipped = " | ".join(s["item"] for s in result["skipped"])
    for item in ("CUDA graph capture", "set_sync_debug_mode", "1 B bf16", "verify on CUDA tensors"):
        assert item in skipped, skipped
    assert all("no CUDA" in s["why"] or "smoke subset" in s["why"] for s in result["skipped"])
    assert "skipped: CUDA graph capture: no CUDA device" in proc.stdout
    assert "verify gloo_w2_cpu: PASS 2/2 layouts (4/4 checks" in proc.stdout
    assert proc.stdout.rstrip().splitlines()[-1].startswith("ALL PASS: gpu_check CPU smoke")


def test_host_read_counter_counts_reads_and_only_reads():
    counter = gpu_check._SyncCounter(torch.device("cpu"))
    x = torch.arange(4.0)
    assert counter.run(lambda: float(x.sum())) == 1
    assert counter.run(lambda: bool(x.max() > 2)) == 1
    assert counter.run(lambda: x.nonzero()) == 1
    assert counter.run(lambda: torch._foreach_mul_([x, x.clone()], x.sum())) == 0
    assert len(counter.events) == 3 and all("test_gpu_check.py" in e for e in counter.events), counter.events


def _row(layout: str, ok: bool, detail: str = "") -> dict:
    return {"layout": layout, "norm_type": 2.0, "reference": 1.0, "result": 1.0, "rel_err": 0.0, "ok": ok, "detail": detail}


def test_layout_verdicts_keep_distclip_failures_apart_from_gloo_limits():
    gloo = "build failed: ranks 0,1,2,3: RuntimeError: ProcessGroupGloo::reduce_scatter: unsupported device type cuda"
    rows = [_row("DDP", True), _row("FSDP2", False, gloo), _row("HSDP", False, "norm differs from reference"),
            _row("TP + plain", False, "hang/timeout: ranks 0,1: DistBackendError: gloo timed out")]
    shared = gpu_check.summarize_verify({"rows": rows}, shared_gpu_gloo=True)
    assert shared["passed"] == ["DDP"] and shared["gloo_limited"] == ["FSDP2"]
    assert shared["failed"] == ["HSDP", "TP + plain"] and not shared["ok"]
    alone = gpu_check.summarize_verify({"rows": rows}, shared_gpu_gloo=False)  # NCCL or CPU: every failure counts
    assert alone["failed"] == ["FSDP2", "HSDP", "TP + plain"] and not alone["gloo_limited"]
    assert gpu_check.summarize_verify({"rows": rows[:2]}, shared_gpu_gloo=True)["ok"]
    assert not gpu_check.summarize_verify({"rows": rows[1:2]}, shared_gpu_gloo=True)["ok"]  # gloo limits alone are no pass
    assert not gpu_check.summarize_verify({"rows": []}, shared_gpu_gloo=False)["ok"]  # nothing run is not a pass


def _fake_gpu_parts(started: list, broken_method: bool = False):
    """``_launch`` on a GPU, as canned part results (each launch is recorded in ``started``)."""

    def fake_launch(args, part, world, extra, env_extra, timeout_s, shared_gpu):
        started.append((part, world, shared_gpu, env_extra.get("GPU_CHECK_BACKEND")))
        if part == "verify":
            rows = [_row("DDP", True), _row("FSDP2", world == 1, "" if world == 1 else "RuntimeError: gloo: unsupported device type")]
            return {"rows": rows, "norm_types": [2.0], "not_applicable": [], "aborted": False, "seconds": 1.0,
                    "backend": "gloo" if shared_gpu else "nccl", "world": world, "device": "cuda:0"}, ""
        if part == "syncs":
            calls = {c: {"first_call_syncs": 0, "first_sync_sites": [], "warm_call_syncs": 0, "warm_sync_sites": [],
                         "error_mode": "no error", "ok": True} for c in CALLS}
            return {"calls": calls, "method": "set_sync_debug_mode", "device": "cuda:0", "ok": True}, ""
        if part == "graph":
            target = extra[extra.index("--target") + 1]
            if target == "distclip":
                return {"target": target, "captured": False, "error": "RuntimeError: capture failed"}, ""
            return {"target": target, "captured": True, "replay_matches_eager": True, "capture_error_mode": "global"}, ""
        sizes = {str(n): {m: {"median_ms": 0.1, "min_ms": 0.1, "repeats": 2} for m in ("distclip", "torch", "minimal")}
                 for n in gpu_check.SIZES}
        if broken_method:
            sizes["20"]["distclip"] = {"error": "NameError: boom"}
        large = {m: {"median_ms": 3.0, "fraction_of_bandwidth": 0.5} for m in ("distclip", "torch", "minimal")}
        return {"sizes": sizes, "copy_bandwidth": {"gb_per_s": 3000.0},
                "large": {"elements": 1_006_632_960, "ideal_ms": 1.5, "methods": large}}, ""

    return fake_launch


def _as_if_on_a_gpu(monkeypatch, fake_launch) -> None:
    monkeypatch.setattr(gpu_check, "_device", lambda: torch.device("cuda", 0))
    monkeypatch.setattr(gpu_check, "_environment", lambda device: {"torch": "x", "distclip": "y", "gpu": "FakeGPU"})
    monkeypatch.setattr(gpu_check, "_launch", fake_launch)


def test_gpu_driver_runs_every_part_and_reports_them(tmp_path, monkeypatch, capsys):
    """The CUDA branch of ``main`` on canned part results: which parts it starts, with what, and
    how the JSON and the summary report them (a graph capture that fails both ways is a "no")."""
    started: list = []
    _as_if_on_a_gpu(monkeypatch, _fake_gpu_parts(started))
    out = tmp_path / "gpu.json"
    assert gpu_check.main(["--out", str(out), "--world", "3"]) == 0
    result = json.loads(out.read_text())
    assert ("verify", 1, False, None) in started and ("verify", 3, True, "gloo") in started
    assert [s[0] for s in started].count("graph") == 4  # distclip failed in global mode and was tried thread-local
    assert result["verify"]["nccl_w1"]["ok"] and result["verify"]["gloo_w3_shared_gpu"]["gloo_limited"] == ["FSDP2"]
    assert result["cuda_graph"]["distclip"]["captured"] is False and result["cuda_graph"]["torch"]["captured"] is True
    assert not result["skipped"]
    text = capsys.readouterr().out
    assert "CUDA graph capture of a warm distclip call: no" in text and "50% of bandwidth" in text
    assert text.rstrip().splitlines()[-1].startswith("ALL PASS: gpu_check on FakeGPU")


def test_gpu_driver_fails_when_a_method_raises(tmp_path, monkeypatch, capsys):
    _as_if_on_a_gpu(monkeypatch, _fake_gpu_parts([], broken_method=True))
    assert gpu_check.main(["--out", str(tmp_path / "gpu.json")]) == 1
    text = capsys.readouterr().out
    assert "distclip raised: NameError: boom" in text and text.rstrip().splitlines()[-1].startswith("FAILED")
