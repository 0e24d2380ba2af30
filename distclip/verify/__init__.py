"""The main job: distclip against a single-process float64 reference in real layouts.

    torchrun --standalone --nproc_per_node=4 -m distclip.verify
    python -m distclip.verify            # no torchrun: starts 4 local ranks itself (--nproc N)
    python -m distclip.verify --list     # the layouts

The modules, each importing only those above it (and ``distclip``, which never imports this
package):

- ``models``: the small real models, their data and loss, their single-process gradients.
- ``reference``: the float64 reference norm (``reference_norm``) every check compares with.
- ``context``: ``Ctx`` (a rank's view of the job) and the outcome agreement through the store.
- ``layouts``: hand-built layouts with synthetic grads, one builder each (sizes as arguments),
  and their registry ``HAND_BUILT``; the tests and the benchmarks build from it.
- ``scenarios``: one builder per real-model layout and the registry ``SCENARIOS`` of
  ``Scenario(name, build, allowed, tags)``; ``select`` by world size, name and tag.
- ``runner``: ``check`` one layout, ``run`` them all; the rows every rank agrees on.
- ``report``: the table and the summary line.
- ``launch``: start the ranks locally when not under torchrun.
- ``cli``: the command line (``main``); ``__main__`` runs it.
"""

from distclip.verify.cli import main, quiet_torch_warnings
from distclip.verify.context import Agreement, Ctx, RanksLost, reset_process_group
from distclip.verify.launch import launch_local
from distclip.verify.layouts import HAND_BUILT, HAND_BUILT_NAMES, LayoutBuilder
from distclip.verify.models import (
    BATCH,
    DIM,
    HIDDEN,
    OUT,
    SEQ,
    VOCAB,
    Block,
    LoRA,
    LoRABlock,
    MoE,
    PreNormBlock,
    batch,
    lora_input,
    loss_of,
    new_model,
    single_process_grads,
)
from distclip.verify.reference import reference_norm
from distclip.verify.report import format_table, summary
from distclip.verify.runner import NORM_TYPES, Row, RunAborted, check, clip, run, world_full
from distclip.verify.scenarios import (
    LAYOUT_NAMES,
    SCENARIOS,
    TAGS,
    Built,
    Scenario,
    build_2d,
    build_ddp,
    build_ep,
    build_ep_meta,
    build_fsdp1,
    build_fsdp1_lora,
    build_fsdp1_tp,
    build_fsdp2,
    build_hsdp,
    build_pp_fsdp,
    build_tied_pp,
    build_tied_pp_fsdp2,
    build_tp,
    build_tp_sp,
    build_two_models,
    clean_name,
    local_grad_tensors,
    mesh,
    plain_full,
    select,
)

__all__ = [
    "HAND_BUILT", "HAND_BUILT_NAMES", "LayoutBuilder",
    "BATCH", "DIM", "HIDDEN", "OUT", "SEQ", "VOCAB", "NORM_TYPES", "LAYOUT_NAMES", "SCENARIOS", "TAGS",
    "Agreement", "Block", "Built", "Ctx", "LoRA", "LoRABlock", "MoE", "PreNormBlock", "RanksLost", "Row", "RunAborted",
    "Scenario", "batch", "build_2d", "build_ddp", "build_ep", "build_ep_meta", "build_fsdp1", "build_fsdp1_lora",
    "build_fsdp1_tp", "build_fsdp2", "build_hsdp", "build_pp_fsdp", "build_tied_pp", "build_tied_pp_fsdp2", "build_tp",
    "build_tp_sp", "build_two_models", "check", "clean_name", "clip", "format_table", "launch_local", "local_grad_tensors",
    "lora_input", "loss_of", "main", "mesh", "new_model", "plain_full", "quiet_torch_warnings", "reference_norm", "reset_process_group", "run",
    "select", "single_process_grads", "summary", "world_full",
]
