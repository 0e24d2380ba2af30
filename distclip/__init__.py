"""distclip: gradient-norm clipping that is correct under any sharding.

Drop-in replacements for ``torch.nn.utils.clip_grad_norm_`` and friends that return the norm a
single process would compute over the full, unsharded gradients, for DDP, FSDP1, FSDP2/DTensor,
tensor parallelism, HSDP, pipeline stages, MoE experts and tied weights, alone or mixed.
"""

# First: importing it checks the torch release, so that one older than the tested ones fails here
# with a message that says so, not inside a submodule's import of an API that release lacks.
from distclip import _versions  # noqa: F401  # isort: skip
from distclip.clip import clip_grad_norm_, clip_grad_value_, clip_grads_with_norm_, get_total_norm
from distclip.comm.agreement import LayoutMismatchError
from distclip.comm.failure import RankInputError
from distclip.guard import GradGuard, GuardOutput
from distclip.layout.discovery import ParamsLike
from distclip.layout.marks import GroupLike, mark_replicated, mark_sharded
from distclip.observe.audit import AuditReport, audit
from distclip.observe.describe import describe, describe_rows
from distclip.observe.grad_norms import grad_norms

__all__ = [
    "clip_grad_norm_",
    "get_total_norm",
    "clip_grads_with_norm_",
    "clip_grad_value_",
    "mark_sharded",
    "mark_replicated",
    "LayoutMismatchError",
    "RankInputError",
    "grad_norms",
    "describe",
    "describe_rows",
    "audit",
    "AuditReport",
    "ParamsLike",
    "GroupLike",
    "GradGuard",
    "GuardOutput",
]
__version__ = "0.2.0"
