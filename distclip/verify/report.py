"""What the job prints at the end: the table of every (layout, norm type) and the summary line."""

from __future__ import annotations

from distclip.verify.runner import Row


def format_table(rows: list[Row], world: int, impl: str) -> str:
    header = f"{'layout':24s} {'norm':>5s} {'reference':>14s} {impl:>14s} {'rel err':>9s}  pass"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r.layout:24s} {r.norm_type:>5g} {r.reference:14.8g} {r.result:14.8g} {r.rel_err:9.1e}  "
            f"{'PASS' if r.ok else 'FAIL'}{'  ' + r.detail if r.detail else ''}"
        )
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
