"""What the job prints at the end: the table of every (layout, norm type) and the summary line."""

from __future__ import annotations

from distclip.verify.runner import Row

# What each row checks, printed under the table (the columns' names are short).
LEGEND = (
    "float64 ref: the norm of one process over the full, unsharded gradients, in float64; "
    "rel err: |result - ref| / ref (pass: <= 1e-6);\n"
    "grads: every gradient after the clip, gathered whole, equals the gradient before it times "
    "min(1, max_norm / (ref + 1e-6)) (rtol 1e-5; max_norm = ref / 2, so every row clips); "
    "'-': not checked (the norm failed first)"
)


def grads_check(row: Row) -> str:
    """The clipped-gradient check of a row: ``ok``, ``DIFF`` or ``-`` (not reached). A row passes
    only when its norm, its clipped grads and the ranks' agreement all pass; the runner checks the
    grads after the norm."""
    if row.ok:
        return "ok"
    if "clipped grads differ" in row.detail:
        return "DIFF"
    if "norm differs across ranks" in row.detail or "grads differ from single-process" in row.detail:
        return "ok"  # checked after the grads, which passed
    return "-"


def format_table(rows: list[Row], world: int, impl: str) -> str:
    # "pass" stays the fifth field after the layout name (tests and scripts read it there)
    header = f"{'layout':24s} {'norm':>5s} {'float64 ref':>14s} {impl:>14s} {'rel err':>9s}  pass  grads"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r.layout:24s} {r.norm_type:>5g} {r.reference:14.8g} {r.result:14.8g} {r.rel_err:9.1e}  "
            f"{'PASS' if r.ok else 'FAIL'}  {grads_check(r):5s}{'  ' + r.detail if r.detail else ''}".rstrip()
        )
    lines.append("")
    lines.append(LEGEND)
    lines.append(summary(rows, world, impl))
    return "\n".join(lines)


def summary(rows: list[Row], world: int, impl: str) -> str:
    passed = sum(r.ok for r in rows)
    layouts = list(dict.fromkeys(r.layout for r in rows))
    failed = [name for name in layouts if not all(r.ok for r in rows if r.layout == name)]
    line = (
        f"{'ALL PASS' if rows and passed == len(rows) else 'FAILED'}: {passed}/{len(rows)} checks passed "
        f"({len(layouts)} layouts x {len(rows) // max(len(layouts), 1)} norm types, world size {world}, {impl})"
    )
    return line + (f"; failing layouts: {', '.join(failed)}" if failed else "")
