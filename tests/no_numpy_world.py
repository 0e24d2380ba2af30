"""One rank of a gloo world in which numpy cannot be imported (run by test_no_numpy.py).

    python tests/no_numpy_world.py RANK WORLD STORE_FILE

numpy is made unimportable before torch is imported, as in an environment with torch only. The
rank first checks that torch's own object collective really fails here (so the checks below can
fail), then runs every distclip path that exchanges Python objects: grad_norms' name agreement,
audit, a LayoutMismatchError's details, GradGuard's names of non-finite grads and
distclip.verify's reference. Prints ``OK`` or exits non-zero with the failures.
"""

from __future__ import annotations

import sys

sys.modules["numpy"] = None  # type: ignore[assignment]  # import numpy now raises ImportError

import datetime  # noqa: E402
import math  # noqa: E402
import warnings  # noqa: E402

warnings.filterwarnings("ignore", message=".*NumPy.*")
warnings.filterwarnings("ignore", message=".*numpy.*")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402


def main() -> int:
    rank, world, store = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    import distclip
    from distclip import verify

    errors: list[str] = []
    try:
        dist.all_gather_object([None] * world, rank)
        errors.append("torch's all_gather_object worked without numpy: this test cannot fail")
    except RuntimeError:
        pass

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()))
    try:
        norms = distclip.grad_norms(model)  # first call: the name order is agreed
        want = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in model.parameters()))
        if list(norms) != ["0.weight", "0.bias", "1.weight", "1.bias", "total"] or abs(float(norms["total"]) - want) > 1e-5 * want:
            errors.append(f"grad_norms: {dict(norms)}")
    except Exception as e:  # noqa: BLE001 - reported below
        errors.append(f"grad_norms: {type(e).__name__}: {e}")
    try:
        report = distclip.audit(list(model.parameters()))
        if not report.ok:
            errors.append(f"audit: {report}")
    except Exception as e:  # noqa: BLE001
        errors.append(f"audit: {type(e).__name__}: {e}")
    try:
        distclip.clip_grad_norm_(model, 1.0 + rank)  # ranks disagree: the details are exchanged
        errors.append("a max_norm that differs across ranks did not raise")
    except distclip.LayoutMismatchError as e:
        if "rank 1 called" not in str(e):
            errors.append(f"LayoutMismatchError without details: {e}")
    except Exception as e:  # noqa: BLE001
        errors.append(f"LayoutMismatchError path: {type(e).__name__}: {e}")
    try:
        guard = distclip.GradGuard(max_norm=1.0)
        model[0].weight.grad[0, 0] = math.nan
        out = guard.clip_(model)
        if out.nonfinite != ["0.weight"]:
            errors.append(f"GradGuard named {out.nonfinite} as non-finite")
    except Exception as e:  # noqa: BLE001
        errors.append(f"GradGuard: {type(e).__name__}: {e}")
    try:
        ctx = verify.Ctx(rank, world, torch.device("cpu"), "distclip")
        rows = verify.run(ctx, names=["DDP"], norm_types=(2.0,))
        if not rows or not all(r.ok for r in rows):
            errors.append(f"distclip.verify: {rows}")
    except Exception as e:  # noqa: BLE001
        errors.append(f"distclip.verify: {type(e).__name__}: {e}")
    dist.barrier()
    dist.destroy_process_group()
    if errors:
        print("\n".join(f"rank {rank}: {e}" for e in errors))
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
