"""The main job: prove distclip against a single-process float64 reference in real layouts.

    torchrun --standalone --nproc_per_node=4 -m distclip.verify
    python -m distclip.verify            # no torchrun: starts 4 local ranks itself (--nproc N)
    python -m distclip.verify --list     # the layouts

Builds a small real model in every layout the world size allows, runs a real forward/backward,
clips with distclip, and compares the returned norm and the clipped gradients (gathered to full
tensors) with a float64 reference computed on one process over the full gradients. Prints one
table and a one-line summary; exits non-zero on any failure. CPU/gloo by default, GPU/NCCL when
launched on GPUs. ``--impl torch`` runs the same checks against ``torch.nn.utils.clip_grad_norm_``
to show where today's tool is wrong.

Every layout's outcome is agreed by all ranks through the rendezvous store (not through the process
group, which a failing layout may leave stuck or out of step) before the next layout starts. The
process group has a short timeout (``--timeout``, 60 s): a layout where some ranks wait in a
collective that others never enter (torch's own function raising on some ranks only) is reported
as ``FAIL (hang/timeout)``, the process group is rebuilt and the job goes on; it always ends with
the table, a summary line and a non-zero exit code on any failure.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import re
import sys
import warnings

import torch
import torch.distributed as dist

from distclip.verify.context import Ctx
from distclip.verify.launch import launch_local
from distclip.verify.report import format_table
from distclip.verify.runner import NORM_TYPES, RunAborted, run
from distclip.verify.scenarios import LAYOUT_NAMES, SCENARIOS, Scenario, select

# torch's warnings about its own demo wrappers (deprecations, FSDP2 view outputs, DTensor
# redistribution plans) say nothing about clipping; --verbose shows them.
_TORCH_DIR = os.path.dirname(torch.__file__)
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def quiet_torch_warnings() -> None:
    show = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        # raised inside torch, or attributed (stacklevel) to this package's demo models and
        # builders; distclip's own warnings come from its other modules and are shown
        if str(filename).startswith(_TORCH_DIR) or os.path.dirname(os.path.abspath(str(filename))) == _PACKAGE_DIR:
            return
        show(message, category, filename, lineno, file, line)

    warnings.showwarning = showwarning
    for name in ("torch.distributed", "torch.distributed.tensor", "torch.distributed.fsdp"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m distclip.verify", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impl", choices=("distclip", "torch"), default="distclip",
                        help="clip with distclip (default) or torch.nn.utils.clip_grad_norm_ (negative control)")
    parser.add_argument("--layouts", nargs="+", metavar="NAME",
                        help="subset of layouts, by name in any case or alias, e.g. fsdp2 tp-sp (default: all allowed; see --list)")
    parser.add_argument("--norm-types", nargs="+", type=float, default=list(NORM_TYPES), metavar="P",
                        help=f"norm types (default: {' '.join(f'{p:g}' for p in NORM_TYPES)})")
    parser.add_argument("--list", action="store_true", help="list the layouts and exit")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="process-group timeout in seconds: a layout that hangs fails after this (default 60)")
    parser.add_argument("--nproc", type=int, default=4,
                        help="ranks to start when not launched by torchrun (default 4; ignored under torchrun)")
    parser.add_argument("--verbose", action="store_true", help="show torch's own warnings about the demo wrappers")
    return parser


def _world_note(scenario: Scenario) -> str:
    sizes = [w for w in (1, 2, 3, 4, 8) if scenario.allowed(w)]
    return "any world size" if sizes == [1, 2, 3, 4, 8] else "world sizes " + ", ".join(map(str, sizes)) + ", ..."


def alias(name: str) -> str:
    """A layout name as typed on a command line: lower case, each run of other characters one
    ``-`` (``"TP + plain"`` -> ``tp-plain``, ``"two models, group="`` -> ``two-models-group``)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def resolve_layouts(names: list[str]) -> tuple[list[str], list[str]]:
    """(layout names, unknown): each of ``names`` matched to a layout by its exact name, its name
    in any case (``fsdp2``, ``"tp + sp"``) or its :func:`alias` (``fsdp1-full-shard-flat``)."""
    by_key = {alias(n): n for n in LAYOUT_NAMES}
    found, unknown = [], []
    for name in names:
        match = name if name in LAYOUT_NAMES else by_key.get(alias(name))
        if match is None:
            unknown.append(name)
        elif match not in found:
            found.append(match)
    return found, unknown


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(argv)
    launched = "RANK" in os.environ
    is_rank0 = os.environ.get("RANK", "0") == "0"
    if args.list:
        if is_rank0:
            for s in SCENARIOS:  # the name, the alias --layouts also takes, the world sizes it runs at
                print(f"{s.name:24s} {alias(s.name):24s} ({_world_note(s)})")
        return 0
    unknown: list[str] = []
    if args.layouts is not None:
        args.layouts, unknown = resolve_layouts(args.layouts)
    if unknown:
        if is_rank0:
            parser.print_usage(sys.stderr)
            print(f"{parser.prog}: error: unknown layout(s): {', '.join(map(repr, unknown))}\n"
                  f"valid layouts (any case, or the alias): {', '.join(f'{n!r} ({alias(n)})' for n in LAYOUT_NAMES)}",
                  file=sys.stderr, flush=True)
        return 2
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    if not launched:
        return launch_local(args.nproc, argv, args.timeout)
    return _worker(args)


def _worker(args: argparse.Namespace) -> int:
    if not args.verbose:
        quiet_torch_warnings()
    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() > 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=args.timeout))
    ctx = Ctx(dist.get_rank(), dist.get_world_size(), torch.device("cuda", local_rank) if use_cuda else torch.device("cpu"),
              args.impl, timeout_s=args.timeout)
    if not use_cuda and ctx.world > 1:
        torch.set_num_threads(1)  # several ranks share the CPU cores

    def progress(line: str) -> None:
        if ctx.rank == 0:
            print(line, flush=True)

    scenarios = select(ctx.world, args.layouts)
    skipped = [s.name for s in SCENARIOS if (args.layouts is None or s.name in args.layouts) and s not in scenarios]
    progress(f"distclip.verify: {len(scenarios)} layouts x {len(args.norm_types)} norm types on {ctx.world} ranks "
             f"({'nccl' if use_cuda else 'gloo'}), clipping with {args.impl}; process-group timeout {args.timeout:g} s")
    if skipped:
        progress(f"not applicable at world size {ctx.world}: {', '.join(skipped)}")
    aborted = False
    try:
        rows = run(ctx, args.layouts, tuple(args.norm_types), progress)
    except RunAborted as e:
        rows, aborted = e.rows, True
    progress("")
    progress(format_table(rows, ctx.world, args.impl) if rows else f"FAILED: no layout to run at world size {ctx.world}")
    code = 0 if rows and all(r.ok for r in rows) else 1
    if aborted:  # a rank is stuck in a collective: tearing the group down could block too
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    ctx.agreement()("done")  # nobody exits before rank 0 has printed: torchrun stops all ranks once one fails
    dist.destroy_process_group()
    return code
