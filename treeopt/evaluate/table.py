"""The compact terminal table of ``treeopt eval``: one narrow line per method and category
(speed-up with its interval, tokens per step, outputs equal to plain decoding, flags). The
full summary stays in ``summary.csv``, the report and ``treeopt eval --wide``."""

from __future__ import annotations

import math
from typing import Any

COLUMNS = ("method", "category", "speed-up (95% CI)", "tokens/step", "equal", "flags")


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


def compact_rows(summary) -> list[list[str]]:
    """The cells of the compact table, one list per summary row (header excluded)."""
    rows = []
    for r in summary.to_dict("records"):
        speed = f"{r['speedup']:.2f}x" if _num(r.get("speedup")) else "-"
        lo, hi = r.get("speedup_ci95_low"), r.get("speedup_ci95_high")
        if speed != "-" and _num(lo) and _num(hi):
            speed += f" ({lo:.2f}-{hi:.2f})"
        tps = f"{r['tokens_per_step']:.2f}" if _num(r.get("tokens_per_step")) else "-"
        equal = r.get("matches_ar")
        flag = r.get("flag")
        rows.append([str(r.get("method", "")), str(r.get("category", "")), speed, tps,
                     equal if isinstance(equal, str) and equal else "-",
                     flag if isinstance(flag, str) and flag else "-"])
    return rows


def format_compact(summary) -> str:
    """The summary (a DataFrame with method, category, speedup, speedup_ci95_low/high,
    tokens_per_step, matches_ar, flag) as an aligned table; the category column only when
    the run has more than one, the flags column only when a row is flagged."""
    rows = compact_rows(summary)
    keep = [True] * len(COLUMNS)
    keep[1] = len({r[1] for r in rows}) > 1
    keep[5] = any(r[5] != "-" for r in rows)
    table = [[c for c, k in zip(COLUMNS, keep) if k]] + \
        [[c for c, k in zip(r, keep) if k] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    right = {i for i, name in enumerate(table[0]) if name in COLUMNS[2:4]}
    return "\n".join("  ".join(cell.rjust(w) if i in right else cell.ljust(w)
                               for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
                     for row in table)
