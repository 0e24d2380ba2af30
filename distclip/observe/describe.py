"""How distclip sees a model, rank by rank: :func:`describe_rows` and :func:`describe`.

Local and cheap (no collective): a row's weight is discovery's (through ``grad_norms.collect``);
its kind and pieces are read from the parameter's own layout, with or without a grad.
"""

from __future__ import annotations

from typing import Optional

import torch.distributed as dist

from distclip import _fsdp1
from distclip.layout.discovery import DTensor, GroupLike, call_group, shard_pieces, stage_copies
from distclip.observe.grad_norms import collect
from distclip.observe.names import NamedParams, Prefixes, parameters_of

__all__ = ["describe", "describe_rows"]


def _placements_str(placements: tuple) -> str:
    return "(" + ", ".join(str(pl) for pl in placements) + ")"


def _fsdp1_over_tp(kind: str, spec: object, fsdp1_shards: int) -> tuple[str, tuple[int, ...], int]:
    """An FSDP1 row's kind, global shape and pieces when FSDP1 flattened the local piece of a
    DTensor (FSDP1 over TP): FSDP1 shards x TP pieces."""
    tp = _fsdp1.tp_pieces(spec)
    kind += f" by FSDP1, of one of {tp} TP pieces ({_fsdp1.tp_description(spec)}): {fsdp1_shards} FSDP1 shards x {tp} TP pieces"
    return kind, tuple(spec.shape), fsdp1_shards * tp  # type: ignore[attr-defined]  # a DTensorSpec


def describe_rows(
    parameters: NamedParams,
    *,
    pp_group: Optional[GroupLike] = None,
    group: Optional[GroupLike] = None,
    trainable_only: bool = False,
    strip_prefixes: Prefixes = False,
) -> list[dict]:
    """How distclip sees each parameter on this rank: local and cheap (no collective).

    One row per named parameter (per original parameter inside an FSDP1 flat parameter), as a dict
    with ``name``, ``local_shape``, ``global_shape`` (None where only the user knows it),
    ``dtype``, ``kind`` (the layout), ``pieces`` (disjoint pieces of the full gradient within a
    pipeline stage), ``weight`` (what distclip multiplies this rank's ``sum |g|^p`` by; None when
    the parameter has no grad here and is skipped) and ``grad`` (whether it has one here).
    ``parameters``, ``pp_group``, ``group``, ``trainable_only`` and ``strip_prefixes`` as in
    :func:`grad_norms` (any form ``clip_grad_norm_`` takes; the groups set the counts).
    """
    stage = call_group(pp_group, group)
    local = collect(parameters_of(parameters, trainable_only, strip_prefixes), stage)
    fsdp1 = _fsdp1.fsdp1_pieces(local.module, described=True) if local.module is not None else {}
    weights: dict[tuple, float] = {}
    partial: set = set()
    for u in local.units:
        weights[(id(u.param), u.name)] = u.weight
        if u.partial:
            partial.add(id(u.param))
    rows = []
    for p, pnames in zip(local.params, local.param_names):
        annotation = local.annotation(p)
        mark = ""
        mark_pieces = annotation.pieces if annotation is not None else 1  # what ``weigh`` multiplies by
        if annotation is not None:
            for over in annotation.sharded_over:
                mark += f" + mark_sharded over ranks {sorted(over.ranks)}"
            if annotation.replicated_over is not None:
                copies = stage_copies(annotation.replicated_over.ranks, stage.pp_ranks)
                mark += f" + mark_replicated over ranks {sorted(annotation.replicated_over.ranks)} ({copies} stage copies)"
        segments = local.flat.get(id(p))
        info = fsdp1.get(id(p))
        grad = p.grad
        local_shape: tuple[int, ...]
        global_shape: Optional[tuple[int, ...]]
        for k, name in enumerate(pnames):
            if segments is not None:
                seg = segments[k]
                kind = (f"FSDP1 flat parameter segment [{seg.offset}:{seg.offset + seg.numel}] of the local shard, "
                        f"sharded over {info.shards if info else '?'} ranks")
                local_shape, global_shape, pieces = (seg.numel,), tuple(seg.shape), (info.shards if info else 1)
                if seg.tp_spec is not None:  # FSDP1 over TP: the segment is one TP piece, itself sharded
                    kind, global_shape, pieces = _fsdp1_over_tp(kind, seg.tp_spec, pieces)
            elif isinstance(p, DTensor):
                mesh = p.device_mesh  # public properties: describe is not on the hot path
                placements = grad.placements if isinstance(grad, DTensor) else p.placements
                kind = f"DTensor on mesh {tuple(mesh.shape)} {mesh.mesh_dim_names or ''} {_placements_str(placements)}"
                if id(p) in partial:
                    kind += " (grad Partial: made whole by one all-reduce first)"
                local_shape, global_shape = tuple(p.to_local().shape), tuple(p.shape)
                pieces = shard_pieces(tuple(mesh.shape), p.placements)
            elif info is not None:
                kind = f"FSDP1 use_orig_params view of the local shard, sharded over {info.shards} ranks"
                local_shape, global_shape, pieces = tuple(p.shape), tuple(info.shape) if info.shape else None, info.shards
                if info.tp_spec is not None:
                    kind, global_shape, pieces = _fsdp1_over_tp(kind, info.tp_spec, pieces)
            else:
                kind = f"plain tensor, replicated across the stage's {stage.size} ranks"
                local_shape, global_shape, pieces = tuple(p.shape), (tuple(p.shape) if mark_pieces == 1 else None), 1
            pieces *= mark_pieces
            weight = weights.get((id(p), name))
            rows.append({
                "name": name, "local_shape": local_shape, "global_shape": global_shape, "dtype": str(p.dtype).replace("torch.", ""),
                "kind": kind + mark, "pieces": pieces, "weight": weight, "grad": grad is not None,
            })
    return rows


def describe(
    parameters: NamedParams,
    *,
    pp_group: Optional[GroupLike] = None,
    group: Optional[GroupLike] = None,
    trainable_only: bool = False,
    strip_prefixes: Prefixes = False,
) -> str:
    """A readable table of :func:`describe_rows` (same arguments): how distclip sees this rank's
    parameters."""
    stage = call_group(pp_group, group)
    rows = describe_rows(parameters, pp_group=pp_group, group=group, trainable_only=trainable_only, strip_prefixes=strip_prefixes)
    where = f"rank {dist.get_rank()}, " if stage.distributed else ""
    header = (f"distclip layout ({where}pipeline stage {stage.index} of {stage.pp_size}, {stage.size} ranks per stage); "
              f"weight = pieces / (ranks per stage x stage copies)")
    cols = ["name", "local", "global", "dtype", "pieces", "weight", "layout"]
    table = [cols]
    for r in rows:
        weight = "no grad" if r["weight"] is None else f"{r['weight']:.6g}"
        table.append([r["name"], str(list(r["local_shape"])), "?" if r["global_shape"] is None else str(list(r["global_shape"])),
                      r["dtype"], str(r["pieces"]), weight, r["kind"]])
    widths = [max(len(row[i]) for row in table) for i in range(len(cols) - 1)]
    lines = [header]
    for row in table:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])
    return "\n".join(lines)
