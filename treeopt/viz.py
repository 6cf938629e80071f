"""Pictures: a token tree as a top-down graph, and expected tokens per step against tree size.

Drawing uses matplotlib's Agg backend (no display needed) and networkx for the graph; the
layered top-down layout is computed here, so graphviz is not needed. ``.dot`` files are
written as text (render them with graphviz if you have it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from treeopt.errors import TreeoptError
from treeopt.search.dp import solve
from treeopt.shapes import chain, independent_chains, kary, top_path_product
from treeopt.tree import Tree

IMAGE_SUFFIXES = (".png", ".svg", ".pdf")
SUFFIXES = IMAGE_SUFFIXES + (".dot",)
PROB_FLOOR = 1e-3  # colour scale floor: rarer nodes share the darkest colour


class VizError(TreeoptError, ValueError):
    """A picture that cannot be made (unknown format, bad sizes); one line."""


def _table(profile):
    if profile is None:
        return None
    return profile.table() if hasattr(profile, "table") else profile


def tree_summary(tree: Tree, profile=None) -> str:
    """One line: size, depth, width and, with a profile, F (expected tokens per step)."""
    parts = [f"size {tree.size}", f"depth {tree.depth}", f"width {tree.width}",
             f"{len(tree.leaves)} leaves"]
    if profile is not None:
        parts.append(f"F = {tree.expected_tokens(_table(profile)):.4f} tokens/step")
    return ", ".join(parts)


def layout(tree: Tree) -> dict[int, tuple[float, float]]:
    """Layered top-down positions: y = -depth; leaves get consecutive x in depth-first
    (rank) order and every parent sits midway between its first and last child."""
    x: dict[int, float] = {}
    next_leaf = 0.0
    stack = [(0, False)]
    while stack:
        node, done = stack.pop()
        kids = tree.children[node]
        if not kids:
            x[node] = next_leaf
            next_leaf += 1.0
        elif done:
            x[node] = (x[kids[0]] + x[kids[-1]]) / 2
        else:
            stack.append((node, True))
            stack.extend((k, False) for k in reversed(kids))
    return {n: (x[n], -float(tree.depths[n])) for n in range(tree.size)}


def to_graph(tree: Tree, profile=None):
    """networkx DiGraph of the tree; nodes carry ``rank``, ``depth`` and (with a profile)
    ``prob`` (probability the node is reached); edges carry ``prob`` of their child."""
    import networkx as nx

    probs = tree.path_probs(_table(profile)) if profile is not None else None
    g = nx.DiGraph()
    for n in range(tree.size):
        attrs = {"rank": tree.ranks[n], "depth": tree.depths[n]}
        if probs is not None:
            attrs["prob"] = probs[n]
        g.add_node(n, **attrs)
    for n in range(1, tree.size):
        g.add_edge(tree.parents[n], n, **({"prob": probs[n]} if probs is not None else {}))
    return g


def top1_path(tree: Tree) -> list[int]:
    """The all-top-1 path: the root and every node whose path from the root takes the
    draft's first choice (sibling rank 1) at every level, root first."""
    path = [0]
    while True:
        kids = [k for k in tree.children[path[-1]] if tree.ranks[k] == 1]
        if not kids:
            return path
        path.append(kids[0])


TOP1_WIDTH = (2.6, 4.5)   # points: the all-top-1 path's edges, small to large nodes
OTHER_WIDTH = (0.12, 0.4)  # other edges, fractions of that width: P(reached) = 0 .. 1


def edge_styles(tree: Tree, profile=None, node_points: float = 20.0
                ) -> dict[tuple[int, int], tuple[float, str]]:
    """(parent, child) -> (line width in points, colour) for every edge: the all-top-1 path
    thick and dark whatever the profile (so it stands out in small trees too), every other
    edge at most ``OTHER_WIDTH[1]`` of that width, wider the likelier it is reached when a
    profile is given. ``node_points``: the node diameter the widths are scaled to."""
    thick = max(TOP1_WIDTH[0], min(TOP1_WIDTH[1], 0.2 * node_points))
    on_path = set(top1_path(tree))
    probs = tree.path_probs(_table(profile)) if profile is not None else None
    styles = {}
    for n in range(1, tree.size):
        edge = (tree.parents[n], n)
        if n in on_path:
            styles[edge] = (thick, "#1a1a1a")
        else:
            share = probs[n] if probs is not None else 0.5
            lo, hi = OTHER_WIDTH
            styles[edge] = (thick * (lo + (hi - lo) * share), "#777777")
    return styles


def draw_tree(tree: Tree, out_path: str | Path, profile=None, title: str | None = None) -> Path:
    """Draw ``tree`` top-down to ``out_path`` (.png, .svg, .pdf or .dot).

    Nodes are labelled by sibling rank (the root ``r``). The all-top-1 path (the draft's
    first choice at every level) is drawn thick and dark (``edge_styles``). With a
    ``profile`` (a Profile or a rank table), nodes are coloured by the probability of being
    reached (with a colour bar) and the other edges' widths follow it; the subtitle gives
    size, depth and F."""
    out_path = Path(out_path)
    suffix = out_path.suffix.lower()
    if suffix not in SUFFIXES:
        raise VizError(f"{out_path}: unknown picture format {out_path.suffix!r}; "
                       f"use one of {', '.join(SUFFIXES)}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    summary = tree_summary(tree, profile)
    if suffix == ".dot":
        out_path.write_text(to_dot(tree, profile, title=title))
        return out_path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import networkx as nx
    from matplotlib import cm, colors

    g = to_graph(tree, profile)
    pos = layout(tree)
    n_leaves = len(tree.leaves)
    levels = tree.depth + 1
    summary_len = max(len(summary), len(title or ""))
    fig_w = min(40.0, max(4.5, 0.42 * n_leaves + 1.8, 0.085 * summary_len + 1.5))
    fig_h = min(20.0, max(3.2, 0.95 * levels + 1.8))
    fig, ax = plt.subplots(figsize=(fig_w, fig_h))
    plot_w = fig_w * (0.8 if profile is not None else 0.92)
    spacing_in = plot_w / max(n_leaves, 1)
    diam_in = max(0.08, min(0.36, 0.8 * spacing_in, 0.6 * fig_h / levels))
    node_size = (diam_in * 72) ** 2
    font = max(3.5, min(9.0, diam_in * 72 * 0.45))

    if profile is not None:
        probs = [g.nodes[n]["prob"] for n in g.nodes]
        norm = colors.LogNorm(vmin=PROB_FLOOR, vmax=1.0, clip=True)
        cmap = matplotlib.colormaps["viridis"]
        node_color = [cmap(norm(max(v, PROB_FLOOR))) for v in probs]
        label_color = ["white" if norm(max(v, PROB_FLOOR)) < 0.6 else "black" for v in probs]
    else:
        node_color = ["#9ecae1"] * tree.size
        label_color = ["black"] * tree.size
    styles = edge_styles(tree, profile, diam_in * 72)
    edges = list(g.edges)
    nx.draw_networkx_edges(g, pos, ax=ax, edgelist=edges, width=[styles[e][0] for e in edges],
                           edge_color=[styles[e][1] for e in edges], arrows=False)
    nx.draw_networkx_nodes(g, pos, ax=ax, node_size=node_size, node_color=node_color,
                           edgecolors="#333333", linewidths=0.6)
    for n, (x, y) in pos.items():
        ax.text(x, y, "r" if n == 0 else str(tree.ranks[n]), ha="center", va="center",
                fontsize=font, color=label_color[n])
    ax.set_xlim(-0.7, max(n_leaves - 1, 0) + 0.7)
    ax.set_ylim(-tree.depth - 0.6, 0.6)
    ax.set_yticks([-d for d in range(levels)])
    ax.set_yticklabels([str(d) for d in range(levels)], fontsize=8)
    ax.set_ylabel("depth", fontsize=8)
    ax.tick_params(left=False, labelleft=True, bottom=False, labelbottom=False)
    for side in ("top", "right", "bottom", "left"):
        ax.spines[side].set_visible(False)
    heading = (f"{title}\n" if title else "") + summary + (
        "\nthick: the all-top-1 path" if tree.size > 1 else "")
    ax.set_title(heading, fontsize=10)
    if profile is not None:
        sm = cm.ScalarMappable(norm=norm, cmap=cmap)
        bar = fig.colorbar(sm, ax=ax, fraction=0.025 if fig_w > 10 else 0.05, pad=0.01)
        bar.set_label("P(node reached), log scale", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=150 if suffix == ".png" else None)
    plt.close(fig)
    return out_path


def to_dot(tree: Tree, profile=None, title: str | None = None) -> str:
    """Graphviz text for the tree: one ``nK`` node per tree node, one edge per parent link;
    with a profile, fill colour and pen width follow the probability of being reached."""
    probs = tree.path_probs(_table(profile)) if profile is not None else None
    label = (f"{title}\\n" if title else "") + tree_summary(tree, profile)
    lines = ["digraph tree {",
             f'  graph [rankdir=TB, labelloc=t, label="{_dot_escape(label)}"];',
             '  node [shape=circle, style=filled, fillcolor="#9ecae1", fontsize=10];']
    if probs is not None:
        import matplotlib
        from matplotlib import colors

        cmap = matplotlib.colormaps["viridis"]
        norm = colors.LogNorm(vmin=PROB_FLOOR, vmax=1.0, clip=True)
    for n in range(tree.size):
        attrs = [f'label="{"r" if n == 0 else tree.ranks[n]}"']
        if probs is not None:
            shade = float(norm(max(probs[n], PROB_FLOOR)))
            attrs.append(f'fillcolor="{colors.to_hex(cmap(shade))}"')
            attrs.append(f'tooltip="node {n}, depth {tree.depths[n]}, P(reached) = '
                         f'{probs[n]:.4g}"')
            if shade < 0.6:
                attrs.append('fontcolor="white"')
        lines.append(f"  n{n} [{', '.join(attrs)}];")
    for n in range(1, tree.size):
        extra = f" [penwidth={0.4 + 3.6 * probs[n]:.2f}]" if probs is not None else ""
        lines.append(f"  n{tree.parents[n]} -> n{n}{extra};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _dot_escape(text: str) -> str:
    return text.replace('"', '\\"')


# ---------------------------------------------------------------------------- labels
LABEL_DISTANCES = (6.0, 11.0, 18.0, 28.0, 40.0, 56.0)  # points from the labelled point
LABEL_ANGLES = (30, -30, 150, -150, 0, 180, 90, -90, 60, -60, 120, -120)  # degrees, in order


def place_labels(ax, points: Sequence[tuple[float, float, str]], fontsize: float = 7.0,
                 marker_radius: float = 5.0, colors: Sequence | None = None) -> list:
    """Label points ``(x, y, text)`` (data coordinates) so that no label overlaps another
    label, a labelled point's marker, the legend or the edge of the axes, and, where a
    free place exists, no plotted line crosses it. Each label tries positions around its
    point at growing distances (``LABEL_DISTANCES``, in points) and directions
    (``LABEL_ANGLES``) and takes the first free one, else the least crowded; one placed away
    from its point gets a thin leader line. ``colors``: one text colour per point (e.g. its
    marker's). Call it once the limits and the layout are final (after ``tight_layout``).
    Returns the annotations in the order of ``points``."""
    import math

    from matplotlib.transforms import Bbox

    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    px = fig.dpi / 72.0
    r = marker_radius * px
    centres = [tuple(ax.transData.transform((x, y))) for x, y, _ in points]
    obstacles = [Bbox.from_extents(cx - r, cy - r, cx + r, cy + r) for cx, cy in centres]
    legend = ax.get_legend()
    if legend is not None:
        obstacles.append(legend.get_window_extent(renderer))
    lines = [line.get_transform().transform_path(line.get_path()) for line in ax.get_lines()
             if line.get_visible() and line.get_linestyle() not in ("None", "", " ", "none")]
    frame = ax.get_window_extent(renderer)

    def overlap(a, b) -> float:
        w = min(a.x1, b.x1) - max(a.x0, b.x0)
        h = min(a.y1, b.y1) - max(a.y0, b.y0)
        return w * h if w > 0 and h > 0 else 0.0

    def outside(b) -> float:
        return b.width * b.height - overlap(b, frame)

    out: dict[int, Any] = {}
    order = sorted(range(len(points)), key=lambda i: (centres[i][0], -centres[i][1]))
    for i in order:
        x, y, text = points[i]
        ann = ax.annotate(text, (x, y), xytext=(0, 0), textcoords="offset points",
                          fontsize=fontsize, annotation_clip=False)
        best = None
        for dist in LABEL_DISTANCES:
            for angle in LABEL_ANGLES:
                c, s_ = math.cos(math.radians(angle)), math.sin(math.radians(angle))
                ha = "left" if c > 0.3 else "right" if c < -0.3 else "center"
                va = "bottom" if s_ > 0.3 else "top" if s_ < -0.3 else "center"
                ann.xyann = (dist * c, dist * s_)
                ann.set_horizontalalignment(ha)
                ann.set_verticalalignment(va)
                box = ann.get_window_extent(renderer).expanded(1.06, 1.2)
                hard = sum(overlap(box, o) for o in obstacles) + outside(box)
                crossings = sum(1 for path in lines if path.intersects_bbox(box, filled=False))
                score = (hard, crossings)
                if best is None or score < best[0]:
                    best = (score, dist, c, s_, ha, va, box)
                if score == (0.0, 0):
                    break
            if best[0] == (0.0, 0):
                break
        ann.remove()
        _, dist, c, s_, ha, va, box = best
        leader = dict(arrowstyle="-", color="0.45", lw=0.5, shrinkA=0, shrinkB=r / px
                      ) if dist > LABEL_DISTANCES[0] else None
        ann = ax.annotate(text, (x, y), xytext=(dist * c, dist * s_),
                          textcoords="offset points", fontsize=fontsize, ha=ha, va=va,
                          annotation_clip=False, arrowprops=leader,
                          color=colors[i] if colors is not None else None)
        obstacles.append(box)
        out[i] = ann
    return [out[i] for i in range(len(points))]


# ---------------------------------------------------------------------------- F vs size
def expected_vs_size(profile, sizes: Sequence[int], max_depth: int | None = None,
                     karys: Sequence[int] = (2, 3, 4)) -> dict[str, list[tuple[int, float]]]:
    """Expected tokens per step by tree size for the DP optimum and the baselines.

    Returns ``{curve name: [(size, F), ...]}``: "DP optimum" (at most n nodes, depth <=
    ``max_depth``, exact), "chain", "best K×L" (best independent chains with at most n nodes),
    "Medusa greedy" and "k-ary (k=K)" (full trees, only at their own sizes)."""

    table = _table(profile)
    sizes = sorted({int(n) for n in sizes})
    if not sizes or sizes[0] < 1:
        raise VizError("sizes must be positive integers")
    top = sizes[-1]
    levels = (max_depth + 1) if max_depth is not None else top
    dp = solve(table, top, levels)
    curves: dict[str, list[tuple[int, float]]] = {
        "DP optimum": [(n, dp.value(n, min(levels, n), at_most=True)) for n in sizes],
        "Medusa greedy": [(n, top_path_product(table, n, max_depth).expected_tokens(table))
                          for n in sizes],
        "chain": [(n, chain(min(n, levels)).expected_tokens(table)) for n in sizes],
    }
    kxl_cache: dict[tuple[int, int], float] = {}

    def best_kxl(n: int) -> float:
        best = 1.0
        for k in range(1, n):
            for length in range(1, (n - 1) // k + 1):
                if max_depth is not None and length > max_depth:
                    break
                if (k, length) not in kxl_cache:
                    kxl_cache[(k, length)] = independent_chains(k, length).expected_tokens(table)
                best = max(best, kxl_cache[(k, length)])
        return best

    curves["best K×L"] = [(n, best_kxl(n)) for n in sizes]
    for k in karys:
        pts = []
        d = 1
        while True:
            t = kary(k, d)
            if t.size > top or (max_depth is not None and d > max_depth):
                break
            pts.append((t.size, t.expected_tokens(table)))
            d += 1
        if pts:
            curves[f"{k}-ary"] = pts
    return curves


def plot_expected_vs_size(profile, sizes: Sequence[int], out_path: str | Path,
                          max_depth: int | None = None, title: str | None = None,
                          curves: dict | None = None,
                          points: dict[str, tuple[int, float]] | None = None) -> Path:
    """Plot :func:`expected_vs_size` (or precomputed ``curves``) to ``out_path``
    (.png/.svg/.pdf): expected tokens per step against tree size, log-2 size axis.
    ``points`` marks individual shapes: ``{label: (size, F)}``."""
    out_path = Path(out_path)
    if out_path.suffix.lower() not in IMAGE_SUFFIXES:
        raise VizError(f"{out_path}: unknown plot format {out_path.suffix!r}; "
                       f"use one of {', '.join(IMAGE_SUFFIXES)}")
    if curves is None:
        curves = expected_vs_size(profile, sizes, max_depth)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"DP optimum": dict(color="black", lw=2.2, marker="o", ms=3, zorder=5),
              "Medusa greedy": dict(color="tab:purple", lw=1.2, ls="--"),
              "chain": dict(color="tab:red", lw=1.4),
              "best K×L": dict(color="tab:orange", lw=1.4)}
    extra_colors = iter(["tab:blue", "tab:green", "tab:cyan", "tab:brown", "tab:olive",
                         "tab:gray", "tab:pink"])
    for name, pts in curves.items():
        xs, ys = zip(*pts) if pts else ((), ())
        style = styles.get(name) or dict(lw=1.0, marker="s", ms=4, ls=":",
                                         color=next(extra_colors, None))
        ax.plot(xs, ys, label=name, **style)
    merged: dict[tuple[int, float], list[str]] = {}
    for label, (size, f) in (points or {}).items():
        merged.setdefault((size, round(f, 6)), []).append(label)
    for size, f in merged:
        ax.scatter([size], [f], marker="*", s=70, color="crimson", zorder=6)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tree size (nodes, root included)")
    ax.set_ylabel("expected tokens per step (F)")
    depth_note = f", depth ≤ {max_depth}" if max_depth is not None else ""
    ax.set_title(title or f"Expected tokens per step vs tree size{depth_note}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    # Labels last, once the layout is fixed, each where it overlaps no other label.
    place_labels(ax, [(size, f, ", ".join(labels)) for (size, f), labels in merged.items()])
    fig.savefig(out_path, dpi=150 if out_path.suffix.lower() == ".png" else None)
    plt.close(fig)
    return out_path
