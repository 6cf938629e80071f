"""Plots and a Markdown/HTML page from a ``treeopt eval`` results file.

``write_report(results, out_dir, profile=None)`` writes

- ``speedup.png``, ``tokens_per_step.png``: by method and category;
- ``accepted_hist.png``: accepted draft tokens per verification step, per method;
- ``acceptance_heatmap.png``: per method, P(the accepted child at depth d has rank k | the
  path reached depth d-1), from the per-step ranks;
- ``expected_vs_measured.png``: expected tokens per step F(tree) under an acceptance profile
  (recorded by the run, or given here) against the measured tokens per step;
- ``trees/<method>.png``: each evaluated tree (``treeopt.viz.draw_tree``);
- ``report.md`` and ``report.html`` putting them together with the summary table (rates as
  percentages, as in the terminal), the metric definitions, any greedy exactness failure and
  any greedy output that differs only at a numerical tie
  (``treeopt.evaluate.exactness``).
"""

from __future__ import annotations

import html
import math
import re
import textwrap
from pathlib import Path
from typing import Any

from treeopt.errors import TreeoptError
from treeopt.evaluate.exactness import DIFFERS, TIE, row_exactness, tie_line
from treeopt.evaluate.methods import AR, Method
from treeopt.evaluate.passk import disagreements
from treeopt.evaluate.results import load_results
from treeopt.evaluate.spread import FLAGS
from treeopt.profile import Profile
from treeopt.viz import draw_tree, place_labels


class ReportError(TreeoptError, ValueError):
    """Results that cannot be reported (missing or malformed)."""


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "tree"


def _nan(v: Any) -> float:
    return math.nan if v is None else float(v)


def bar_plot(summary: list[dict], metric: str, ylabel: str, path: Path,
             baseline: float | None = None, interval: tuple[str, str] | None = None) -> None:
    """Grouped bars: x = category, one bar per method; ``interval`` names the columns of
    an interval drawn as an error bar (rows without one get none)."""
    plt = _plt()
    methods = list(dict.fromkeys(r["method"] for r in summary))
    cats = list(dict.fromkeys(r["category"] for r in summary))
    value = {(r["method"], r["category"]): _nan(r.get(metric)) for r in summary}
    bounds = {(r["method"], r["category"]): (_nan(r.get(interval[0])), _nan(r.get(interval[1])))
              for r in summary} if interval else {}
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(cats) * max(1, len(methods)) * 0.35 + 3),
                                    3.6))
    for j, m in enumerate(methods):
        xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(cats))]
        ys = [value.get((m, c), math.nan) for c in cats]
        ax.bar(xs, ys, width, label=m)
        if bounds:
            bars = [(x, y, *bounds.get((m, c), (math.nan, math.nan)))
                    for x, y, c in zip(xs, ys, cats)]
            bars = [b for b in bars if not any(math.isnan(v) for v in b[1:])]
            if bars:
                ax.errorbar([b[0] for b in bars], [b[1] for b in bars],
                            yerr=[[max(0.0, y - lo) for _, y, lo, _ in bars],
                                  [max(0.0, hi - y) for _, y, _, hi in bars]],
                            fmt="none", ecolor="black", elinewidth=0.8, capsize=2)
    if baseline is not None:
        ax.axhline(baseline, color="black", lw=0.8, ls="--")
    ax.set_xticks(range(len(cats)))
    ax.set_xticklabels(cats, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=min(4, len(methods)))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def accepted_hist(rows: list[dict], methods: list[str], path: Path) -> bool:
    """Histogram of accepted draft tokens per step, one panel per speculative method."""
    plt = _plt()
    data = {m: [a for r in rows if r["method"] == m for a in (r.get("accepted_per_step") or [])]
            for m in methods if m != AR}
    data = {m: v for m, v in data.items() if v}
    if not data:
        return False
    fig, axes = plt.subplots(1, len(data), squeeze=False, figsize=(3.2 * len(data), 3.0))
    for ax, (m, vals) in zip(axes[0], data.items()):
        top = max(vals)
        ax.hist(vals, bins=[x - 0.5 for x in range(top + 2)], density=True, rwidth=0.85)
        ax.set_title(m, fontsize=9)
        ax.set_xlabel("accepted draft tokens per step")
        ax.set_xticks(range(top + 1))
    axes[0][0].set_ylabel("share of steps")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def depth_rank_table(rows: list[dict], method: Method) -> list[list[float]]:
    """(depth, rank) -> P(accepted child at depth d has rank k | the path reached depth d-1).

    Row d-1 is depth d (1..tree depth), column k-1 rank k (1..tree width); NaN where the tree
    has no node of that depth and rank, or no step reached that depth."""
    tree = method.tree
    depth, width = tree.depth, tree.width
    present = [[False] * width for _ in range(depth)]
    for i in range(1, tree.size):
        present[tree.depths[i] - 1][tree.ranks[i] - 1] = True
    hits = [[0] * width for _ in range(depth)]
    reached = [0] * depth
    for r in rows:
        if r["method"] != method.name:
            continue
        for acc, ranks in zip(r.get("accepted_per_step") or [], r.get("ranks_per_step") or []):
            for d in range(depth):
                if acc >= d:
                    reached[d] += 1
            for d, k in enumerate(ranks[:depth]):
                if 1 <= k <= width:
                    hits[d][k - 1] += 1
    return [[(hits[d][k] / reached[d] if reached[d] and present[d][k] else math.nan)
             for k in range(width)] for d in range(depth)]


def adaptive_methods(rows: list[dict], methods: list[str],
                     max_new_tokens: int | None = None) -> list[str]:
    """The methods whose tree changed from step to step (an adaptive drafter: EGAG, dynamic
    trees, cascades, an n-gram fill), from the rows' per-step tree sizes. Steps whose tree
    the remaining token budget may have cut (fewer than the method's deepest tree before
    ``max_new_tokens``; without it, the last step of each turn) are left out, so a fixed
    tree cut at the end of a turn does not count."""
    deepest: dict[str, int] = {}
    for r in rows:
        if r.get("depth_per_step"):
            deepest[r["method"]] = max(deepest.get(r["method"], 0), max(r["depth_per_step"]))
    out = []
    for m in methods:
        if m == AR or m not in deepest:
            continue
        for r in rows:
            if r["method"] != m or not r.get("nodes_per_step"):
                continue
            produced, free = 1, set()
            steps = list(zip(r["nodes_per_step"], r.get("accepted_per_step") or []))
            for i, (nodes, accepted) in enumerate(steps):
                room = (max_new_tokens - produced - 1 if max_new_tokens
                        else (deepest[m] if i < len(steps) - 1 else -1))
                if room >= deepest[m]:
                    free.add(nodes)
                produced += accepted + 1
            if len(free) > 1:
                out.append(m)
                break
    return out


def tree_size_hist(rows: list[dict], methods: list[str], path: Path) -> bool:
    """Histograms of the tree sizes (nodes, root included) and depths (edges) verified per
    step, one column per method (top: sizes, bottom: depths)."""
    data = {m: ([n for r in rows if r["method"] == m for n in (r.get("nodes_per_step") or [])],
                [d for r in rows if r["method"] == m for d in (r.get("depth_per_step") or [])])
            for m in methods}
    data = {m: v for m, v in data.items() if v[0]}
    if not data:
        return False
    plt = _plt()
    fig, axes = plt.subplots(2, len(data), squeeze=False, figsize=(3.2 * len(data), 5.4))
    for j, (m, (sizes, depths)) in enumerate(data.items()):
        for ax, vals, label in ((axes[0][j], sizes, "tree nodes per step (root included)"),
                                (axes[1][j], depths, "tree depth per step")):
            lo, hi = min(vals), max(vals)
            ax.hist(vals, bins=[x - 0.5 for x in range(lo, hi + 2)], density=True, rwidth=0.85)
            ax.set_xlabel(label, fontsize=8)
            if hi - lo <= 20:
                ax.set_xticks(range(lo, hi + 1))
            ax.tick_params(labelsize=7)
        axes[0][j].set_title(textwrap.fill(m, 34), fontsize=8)  # long nested specs wrap
    axes[0][0].set_ylabel("share of steps")
    axes[1][0].set_ylabel("share of steps")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


BUDGET_COLUMNS = ["method", "trees", "mean_nodes", "mean_depth", "tokens_per_step",
                  "tokens_per_s", "speedup"]


def budget_tables(doc: dict) -> list[tuple[str, list[dict]]]:
    """Per category: every method with the tree budget it actually used (mean nodes and depth
    per step), its tokens per step, tokens/s and speed-up, and whether its trees were
    adaptive or static (``adaptive_methods``), ordered by budget so that methods of the same
    budget sit together; plain decoding first. Empty for results without tree sizes."""
    summary, rows = doc.get("summary") or [], doc.get("rows") or []
    if not any(r.get("mean_nodes") is not None for r in summary):
        return []
    names = list(dict.fromkeys(r["method"] for r in summary))
    cfg = (doc.get("settings") or {}).get("config") or {}
    adaptive = set(adaptive_methods(rows, names, cfg.get("max_new_tokens")))
    out = []
    for cat in dict.fromkeys(r["category"] for r in summary):
        recs = [r for r in summary if r["category"] == cat and r.get("mean_nodes") is not None]
        recs.sort(key=lambda r: (r["method"] != AR, _nan(r.get("mean_nodes"))))
        out.append((cat, [{**{k: r.get(k) for k in BUDGET_COLUMNS},
                           "trees": "-" if r["method"] == AR else
                           ("adaptive" if r["method"] in adaptive else "static")}
                          for r in recs]))
    return out


BUDGET_NOTE = ("Tokens per step and tokens/s of adaptive trees (the tree changed from step to "
               "step) and static trees, with the budget each actually spent: mean tree nodes "
               "(root included) and depth per verification step. Compare methods of similar "
               "mean_nodes.")


def acceptance_heatmap(rows: list[dict], methods: list[Method], path: Path) -> bool:
    """One heat map per tree method: acceptance by depth (rows) and sibling rank (columns)."""
    plt = _plt()
    import numpy as np

    tables = [(m, np.array(depth_rank_table(rows, m), dtype=float)) for m in methods
              if m.tree is not None and m.tree.size > 1]
    tables = [(m, t) for m, t in tables if t.size and not np.isnan(t).all()]
    if not tables:
        return False
    fig, axes = plt.subplots(1, len(tables), squeeze=False,
                             figsize=(max(3.0, 0.5 * max(t.shape[1] for _, t in tables) + 2.2)
                                      * len(tables), 3.6))
    for ax, (m, t) in zip(axes[0], tables):
        im = ax.imshow(np.ma.masked_invalid(t), cmap="viridis", vmin=0.0, vmax=1.0,
                       aspect="auto")
        ax.set_title(m.name, fontsize=9)
        ax.set_xlabel("sibling rank")
        ax.set_ylabel("depth")
        ax.set_xticks(range(t.shape[1]))
        ax.set_xticklabels(range(1, t.shape[1] + 1), fontsize=7)
        ax.set_yticks(range(t.shape[0]))
        ax.set_yticklabels(range(1, t.shape[0] + 1), fontsize=7)
        if t.size <= 120:
            for (d, k), v in np.ndenumerate(t):
                if not np.isnan(v):
                    ax.text(k, d, f"{v:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if v < 0.5 else "black")
    fig.colorbar(im, ax=list(axes[0]), shrink=0.8,
                 label="P(rank k accepted at depth d | depth d-1 reached)")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


def expected_vs_measured(points: list[tuple[str, float, float]], path: Path) -> None:
    """Scatter of (method, expected, measured) tokens per step with the y = x line; methods
    at the same point share one label, and no label overlaps another
    (``treeopt.viz.place_labels``)."""

    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.0, 4.6))
    top = max(max(e, m) for _, e, m in points) * 1.1
    ax.plot([0, top], [0, top], color="grey", lw=0.8, ls="--")
    merged: dict[tuple[float, float], list[str]] = {}
    for name, e, m in points:
        merged.setdefault((round(e, 6), round(m, 6)), []).append(name)
    colors = []
    for e, m in merged:
        dots = ax.scatter([e], [m], s=20, zorder=3)
        colors.append(dots.get_facecolor()[0])
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("expected tokens per step (profile)")
    ax.set_ylabel("measured tokens per step")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    place_labels(ax, [(e, m, ", ".join(names)) for (e, m), names in merged.items()],
                 colors=colors)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# Shown as percentages, as format_summary does.
PERCENT_COLUMNS = ("acceptance_rate", "pass_at_1")


def _percent(v: Any) -> Any:
    if v is None or isinstance(v, str) or (isinstance(v, float) and math.isnan(v)):
        return v
    return f"{float(v):.1%}"


def _display(records: list[dict]) -> list[dict]:
    """The summary rows with the PERCENT_COLUMNS as percentage text."""
    return [{k: (_percent(v) if k in PERCENT_COLUMNS else v) for k, v in r.items()}
            for r in records]


def _md_table(records: list[dict], columns: list[str]) -> str:
    records = _display(records)

    def fmt(v: Any) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    head = "| " + " | ".join(columns) + " |\n|" + "|".join("---" for _ in columns) + "|\n"
    return head + "".join("| " + " | ".join(fmt(r.get(c)) for c in columns) + " |\n"
                          for r in records)


def write_report(results: str | Path | dict, out_dir: str | Path, profile: Any = None,
                 trees: bool = True) -> Path:
    """Write plots and ``report.md`` / ``report.html`` for a run; returns the Markdown path.

    results: a run folder, its results.json, or the loaded dict. profile: a Profile (or path,
    or p table) for expected tokens per step; defaults to what the run recorded."""
    doc = results if isinstance(results, dict) else load_results(results)
    summary, rows = doc.get("summary") or [], doc.get("rows") or []
    if not summary:
        raise ReportError("the results hold no summary rows; was the run empty?")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = doc.get("settings", {})
    methods = [Method.from_dict(m) for m in settings.get("methods", [])]
    names = [m.name for m in methods] or list(dict.fromkeys(r["method"] for r in summary))
    figures: list[tuple[str, str]] = []
    notes: list[str] = []

    bar_plot(summary, "speedup", "speed-up over plain decoding", out / "speedup.png", 1.0,
             interval=("speedup_ci95_low", "speedup_ci95_high"))
    figures.append(("Speed-up over plain decoding, by method and category (bars: bootstrap "
                    "95 % interval over prompts)", "speedup.png"))
    bar_plot(summary, "tokens_per_step", "tokens per target forward", out / "tokens_per_step.png",
             1.0)
    figures.append(("Tokens per step, by method and category", "tokens_per_step.png"))
    max_new = (settings.get("config") or {}).get("max_new_tokens")
    if tree_size_hist(rows, adaptive_methods(rows, names, max_new), out / "tree_sizes.png"):
        figures.append(("Tree sizes and depths used (methods whose tree changed from step "
                        "to step)", "tree_sizes.png"))
    if accepted_hist(rows, names, out / "accepted_hist.png"):
        figures.append(("Accepted draft tokens per verification step", "accepted_hist.png"))
    if acceptance_heatmap(rows, methods, out / "acceptance_heatmap.png"):
        figures.append(("Acceptance by depth and sibling rank (share of steps reaching the "
                        "parent's depth)", "acceptance_heatmap.png"))

    expected = _expected(doc, methods, profile)
    measured = {r["method"]: _nan(r.get("tokens_per_step")) for r in summary
                if r["category"] == "all"} or {r["method"]: _nan(r.get("tokens_per_step"))
                                               for r in summary}
    points = [(m, e, measured[m]) for m, e in expected.items()
              if m in measured and not math.isnan(measured[m])]
    if points:
        expected_vs_measured(points, out / "expected_vs_measured.png")
        figures.append(("Expected (profile) vs measured tokens per step",
                        "expected_vs_measured.png"))
    else:
        notes.append("No acceptance profile recorded or given: expected-vs-measured plot "
                     "skipped (pass --profile).")

    scoring = doc.get("pass_at_1")
    if isinstance(scoring, dict):
        limits = scoring.get("limits") or {}
        notes.append(f"pass@1: each output's code ran against its problem's tests in a "
                     f"subprocess (timeout {limits.get('timeout_s')} s, memory "
                     f"{limits.get('memory_mb')} MiB, network "
                     f"{'isolated' if scoring.get('network_isolated') else 'NOT isolated'}); "
                     "a best-effort sandbox (treeopt.evaluate.passk), not a security boundary.")

    tree_pics: list[tuple[str, str]] = []
    if trees:
        tree_pics, tree_note = _draw_trees(methods, out, profile)
        if tree_note:
            notes.append(tree_note)

    md = _markdown(doc, summary, figures, tree_pics, notes, expected)
    (out / "report.md").write_text(md, encoding="utf-8")
    (out / "report.html").write_text(_html(doc, summary, figures, tree_pics, notes),
                                     encoding="utf-8")
    return out / "report.md"


def _load_profile(profile: Any) -> Any:
    if profile is None or hasattr(profile, "table") or isinstance(profile, (list, tuple)):
        return profile

    return Profile.load(profile)


def _expected(doc: dict, methods: list[Method], profile: Any) -> dict[str, float]:
    prof = _load_profile(profile)
    if prof is not None:
        table = prof.table() if hasattr(prof, "table") else prof
        # Plain decoding and the default drafter's trees; the profile says nothing about
        # other drafters or the Hugging Face reference methods.
        return {m.name: (1.0 if m.is_plain else m.tree.expected_tokens(table))
                for m in methods if m.is_plain or m.uses_default_drafter}
    return {k: float(v) for k, v in (doc.get("expected_tokens_per_step") or {}).items()}


def _draw_trees(methods: list[Method], out: Path, profile: Any
                ) -> tuple[list[tuple[str, str]], str | None]:
    wanted = [m for m in methods if m.tree is not None and m.tree.size > 1]
    if not wanted:
        return [], None
    prof = _load_profile(profile)
    (out / "trees").mkdir(exist_ok=True)
    pics = []
    for m in wanted:
        rel = f"trees/{_safe(m.name)}.png"
        draw_tree(m.tree, out / rel, profile=prof,
                  title=f"{m.name} (size {m.tree.size}, depth {m.tree.depth})")
        pics.append((m.name, rel))
    return pics, None


SHOW = ["method", "category", "prompts", "new_tokens", "tokens_per_s", "speedup",
        "speedup_median", "speedup_ci95_low", "speedup_ci95_high", "flag", "tokens_per_step",
        "acceptance_rate", "mean_accepted", "expected_tokens_per_step", "matches_ar",
        "pass_at_1", "draft_ms_per_step", "verify_ms_per_step", "other_ms_per_step"]


def _columns(summary: list[dict]) -> list[str]:
    """The SHOW columns that hold something in at least one row."""
    return [c for c in SHOW if any(r.get(c) not in (None, "-", "") for r in summary)]


def _flag_notes(summary: list[dict]) -> list[str]:
    """One line per flagged summary row, then what each flag that appears means."""

    flagged = [r for r in summary if r.get("flag")]
    lines = [f"{r['method']} / {r['category']}: {_nan(r.get('speedup')):.2f}x, flagged "
             f"{r['flag']}" for r in flagged]
    seen = {f for r in flagged for f in str(r["flag"]).split(";") if f}
    return lines + [f"{f}: {FLAGS[f]}" for f in FLAGS if f in seen]


def _failures(doc: dict) -> list[str]:
    """Greedy outputs that differ from plain decoding (not at a numerical tie)."""

    return [f"{r['method']} differs from ar on prompt {r['prompt_key']} turn "
            f"{int(r.get('turn') or 1)} at new token {int(r.get('first_mismatch') or 0)}"
            for r in doc.get("rows") or [] if row_exactness(r) == DIFFERS]


def _ties(doc: dict) -> list[str]:
    """Greedy outputs that differ from plain decoding only at a numerical tie."""

    return [tie_line(r["method"], r["prompt_key"], int(r.get("turn") or 1),
                     r.get("first_mismatch"), r.get("tie_gap"), r.get("tie_tolerance"))
            for r in doc.get("rows") or [] if row_exactness(r) == TIE]


def _pass_notes(doc: dict) -> list[str]:
    """Greedy runs scored for pass@1 whose methods disagree on some prompt (every lossless
    method must pass or fail alike): a heading line, then one line per prompt; empty when
    they agree or the run is not greedy."""

    if (doc.get("settings", {}).get("config", {}) or {}).get("temperature"):
        return []
    lines = disagreements(doc.get("rows") or [])
    if not lines:
        return []
    return [f"PASS@1 DIFFERS BETWEEN GREEDY LOSSLESS METHODS on {len(lines)} prompt(s): "
            "their outputs must equal plain decoding's, so their pass@1 must be equal"] + lines


TIE_NOTE = ("differ from plain decoding only at a numerical tie: where they first differ, "
            "the token plain decoding chose and the token the method chose have logits "
            "within the model dtype's rounding tolerance of the target's best logit, so "
            "which one wins is rounding (half precision computes a batched tree pass and "
            "a one-token step differently), not the method. Not a failure; see exactness.")


def _settings_line(doc: dict) -> str:
    cfg = doc.get("settings", {}).get("config", {})
    mode = "greedy" if not cfg.get("temperature") else (
        f"sampling (temperature {cfg.get('temperature')}, top-p {cfg.get('top_p')}, "
        f"top-k {cfg.get('top_k')}, seed {cfg.get('seed')}, rule {cfg.get('rule')})")
    extra = {k: doc[k] for k in ("target", "draft", "dataset", "device") if k in doc}
    parts = [f"{doc.get('prompts', '?')} prompts", f"{cfg.get('max_new_tokens')} new tokens "
             "per turn", mode] + [f"{k} {v}" for k, v in extra.items()]
    threads = doc.get("threading")
    if isinstance(threads, dict):
        parts.append(f"{threads.get('torch_threads')} torch threads, OMP_WAIT_POLICY "
                     f"{threads.get('OMP_WAIT_POLICY') or 'unset'}, kernels "
                     f"{threads.get('kernels') or '?'}")
    cut = doc.get("long_prompts") or {}
    if cut.get("prompts_over"):
        verb = "skipped" if cut.get("policy") == "skip" else (
            f"cut from the left ({cut.get('tokens_cut')} tokens in all)")
        parts.append(f"{cut['prompts_over']} prompts longer than the window "
                     f"({cut.get('window')} tokens) minus the new tokens {verb}")
    return ", ".join(parts)


def _markdown(doc, summary, figures, tree_pics, notes, expected) -> str:
    cols = _columns(summary)
    lines = ["# treeopt evaluation report", "", _settings_line(doc), ""]
    fails = _failures(doc)
    if fails:
        lines += [f"**GREEDY EXACTNESS FAILED for {len(fails)} output(s)**: a lossless method "
                  "must reproduce plain decoding token for token.", ""]
        lines += [f"- {f}" for f in fails[:50]] + [""]
    ties = _ties(doc)
    if ties:
        lines += [f"**{len(ties)} greedy output(s) {TIE_NOTE}**", ""]
        lines += [f"- {t}" for t in ties[:50]] + [""]
    passes = _pass_notes(doc)
    if passes:
        lines += [f"**{passes[0]}**", ""] + [f"- {t}" for t in passes[1:51]] + [""]
    lines += ["## Summary", "", _md_table(summary, cols)]
    flags = _flag_notes(summary)
    if flags:
        lines += ["**Figures that cannot be trusted** (flag column):", ""]
        lines += [f"- {f}" for f in flags] + [""]
    budgets = budget_tables(doc)
    if budgets:
        lines += ["## Adaptive vs static trees", "", BUDGET_NOTE, ""]
        for cat, recs in budgets:
            lines += [f"### {cat}", "", _md_table(recs, BUDGET_COLUMNS)]
    lines += ["## Figures", ""]
    for title, rel in figures:
        lines += [f"### {title}", "", f"![{title}]({rel})", ""]
    if tree_pics:
        lines += ["## Trees evaluated", ""]
        for name, rel in tree_pics:
            exp = expected.get(name)
            cap = name + (f" (expected {exp:.3f} tokens/step)" if exp is not None else "")
            lines += [f"### {cap}", "", f"![{name}]({rel})", ""]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    lines += ["## Metric definitions", ""]
    lines += [f"- **{k}**: {v}" for k, v in (doc.get("metrics") or {}).items()] + [""]
    return "\n".join(lines)


def _html(doc, summary, figures, tree_pics, notes) -> str:
    import pandas as pd

    cols = _columns(summary)
    table = pd.DataFrame(_display(summary))[cols].to_html(
        index=False, na_rep="-", float_format=lambda v: f"{v:.3g}")
    parts = ["<!doctype html><html><head><meta charset='utf-8'>",
             "<title>treeopt evaluation report</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}"
             ".fail{color:#b00;font-weight:bold}img{max-width:100%}</style></head><body>",
             "<h1>treeopt evaluation report</h1>", f"<p>{html.escape(_settings_line(doc))}</p>"]
    fails = _failures(doc)
    if fails:
        parts.append(f"<p class='fail'>GREEDY EXACTNESS FAILED for {len(fails)} output(s)</p>"
                     "<ul>" + "".join(f"<li>{html.escape(f)}</li>" for f in fails[:50]) + "</ul>")
    ties = _ties(doc)
    if ties:
        parts.append(f"<p><b>{len(ties)} greedy output(s) {html.escape(TIE_NOTE)}</b></p>"
                     "<ul>" + "".join(f"<li>{html.escape(t)}</li>" for t in ties[:50])
                     + "</ul>")
    passes = _pass_notes(doc)
    if passes:
        parts.append(f"<p class='fail'>{html.escape(passes[0])}</p><ul>"
                     + "".join(f"<li>{html.escape(t)}</li>" for t in passes[1:51]) + "</ul>")
    parts += ["<h2>Summary</h2>", table]
    flags = _flag_notes(summary)
    if flags:
        parts.append("<p><b>Figures that cannot be trusted</b> (flag column):</p><ul>"
                     + "".join(f"<li>{html.escape(f)}</li>" for f in flags) + "</ul>")
    budgets = budget_tables(doc)
    if budgets:
        parts += ["<h2>Adaptive vs static trees</h2>", f"<p>{html.escape(BUDGET_NOTE)}</p>"]
        for cat, recs in budgets:
            parts += [f"<h3>{html.escape(str(cat))}</h3>", pd.DataFrame(recs)[BUDGET_COLUMNS]
                      .to_html(index=False, na_rep="-", float_format=lambda v: f"{v:.3g}")]
    parts.append("<h2>Figures</h2>")
    for title, rel in figures:
        parts.append(f"<h3>{html.escape(title)}</h3><img src='{html.escape(rel)}' "
                     f"alt='{html.escape(title)}'>")
    if tree_pics:
        parts.append("<h2>Trees evaluated</h2>")
        for name, rel in tree_pics:
            parts.append(f"<h3>{html.escape(name)}</h3><img src='{html.escape(rel)}' "
                         f"alt='{html.escape(name)}'>")
    if notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes)
                     + "</ul>")
    parts.append("<h2>Metric definitions</h2><ul>" + "".join(
        f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>"
        for k, v in (doc.get("metrics") or {}).items()) + "</ul></body></html>")
    return "\n".join(parts)
