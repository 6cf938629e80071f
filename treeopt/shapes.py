"""Baseline tree shapes and named presets, and tree specs: the one place a string (a shape, a
preset, a growmap or tree-set file) becomes a tree (:func:`resolve_tree`).

Every function returns a :class:`~treeopt.tree.Tree` (breadth-first ids, consecutive siblings,
the i-th child of a node is the draft's i-th choice there).

Units: sizes count NODES, root included (a tree of n nodes drafts n - 1 tokens); depths count
EDGES (``Tree.depth``; the root is at depth 0). The exact DP counts levels (root included,
Sequoia's convention) and the conversion is made once, in ``treeopt.search.dp``.

Spec strings (:func:`from_name`)::

    chain:8                     a chain of 8 nodes (7 drafted tokens, depth 7)
    kary:2x3                    full 2-ary tree of depth 3 (15 nodes)
    chains:4x5                  4 independent chains of 5 draft tokens (SpecInfer's K x L, 21 nodes)
    specinfer:1,1,3,1,1,1,1,1   SpecInfer expansion config: every node at level i gets e[i] children
    greedy:64                   Medusa-style greedy: 64 nodes by path probability (needs a profile)
    greedy:64x4                 the same within depth 4
    dp:64 / dp:64x8             exact DP optimum, at most 64 nodes, depth <= 8 edges (needs a
                                profile; the DP gets depth + 1 levels)
    paths:[[0],[1],[0,0]]       Medusa/EAGLE rank paths (0-based)
    parents:[-1,0,0,1]          a parent array
    mc_sim_7b_63                a named preset (see PRESETS)
    growmaps/x.pt               a growmap file (.pt or .json)

Every shape is checked against the one tree-size cap, ``treeopt.limits.MAX_TREE_NODES``,
BEFORE it is built (a full k-ary tree's size is computed, not materialised), and numbers that
are not integers (``1e400``, ``Infinity``) are refused, each with a one-line ShapeError.
"""

from __future__ import annotations

import heapq
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from treeopt.errors import TreeoptError
from treeopt.growmap import load_growmap
from treeopt.limits import MAX_TREE_NODES, parse_json, show_number
from treeopt.profile.model import reliable_table
from treeopt.search.dp import levels_for_depth, solve
from treeopt.tree import Tree, TreeError, as_depth_table
from treeopt.treeset import TreeSet, is_treeset_file, load_treeset

GROWMAP_SUFFIXES = (".pt", ".pth", ".json")


class ShapeError(TreeoptError, ValueError):
    """An unknown or malformed shape spec (one-line message)."""


# ---------------------------------------------------------------------------- shapes
def chain(nodes: int | None = None, *, draft_tokens: int | None = None) -> Tree:
    """A chain: give its size in ``nodes`` (root included; ``chain:N``) or the number of
    ``draft_tokens`` it speculates per step (``nodes - 1``; ``eval --chain L``, a model
    drafter's default). ``chain(4) == chain(draft_tokens=3)``: depth 3, 4 nodes. The one
    place chains are built."""
    if (nodes is None) == (draft_tokens is None):
        raise ShapeError("give a chain's size either in nodes or in draft_tokens, not both")
    if draft_tokens is not None:
        _positive(draft_tokens, "chain draft tokens", minimum=0)
        nodes = draft_tokens + 1
    _positive(nodes, "chain size", minimum=1)
    _cap(nodes, "chain")
    return Tree(tuple([-1] + list(range(nodes - 1))))


def kary(k: int, depth: int) -> Tree:
    """Full ``k``-ary tree of the given depth: ``(k**(depth+1) - 1) / (k - 1)`` nodes."""
    _positive(k, "k", minimum=1)
    _positive(depth, "depth", minimum=0)
    size, level = 1, 1
    for _ in range(depth):  # stops as soon as it is too big: at most MAX_TREE_NODES rounds
        level *= k
        size += level
        if size > MAX_TREE_NODES:
            break
    _cap(size, f"kary {show_number(k)}x{show_number(depth)}", at_least=depth > 0)
    return specinfer([k] * depth) if depth else Tree((-1,))


def independent_chains(k: int, draft_tokens: int) -> Tree:
    """``k`` independent chains of ``draft_tokens`` drafted tokens each (SpecInfer-style
    K x L): the root has ``k`` children (ranks 1..k) and each continues as a chain of rank-1
    nodes. Size ``1 + k * draft_tokens``, depth ``draft_tokens``."""
    _positive(k, "k", minimum=1)
    _positive(draft_tokens, "chain draft tokens", minimum=1)
    _cap(1 + k * draft_tokens, f"chains {show_number(k)}x{show_number(draft_tokens)}")
    parents = [-1] + [0] * k
    for level in range(1, draft_tokens):
        first = 1 + (level - 1) * k
        parents += list(range(first, first + k))
    return Tree(tuple(parents))


def specinfer(expansion: Sequence[int]) -> Tree:
    """SpecInfer's expansion config ``<e0, e1, ...>``: every node at depth i gets ``e[i]``
    children. ``specinfer([1, 1, 3, 1])`` is a 2-token chain that fans out to 3 and continues
    each branch one token."""
    expansion = list(expansion)
    if not expansion:
        raise ShapeError("specinfer expansion is empty; give at least one level, e.g. 1,1,3")
    for i, e in enumerate(expansion[: MAX_TREE_NODES + 1]):
        _positive(e, f"expansion[{i}]", minimum=1)
    _cap(len(expansion) + 1, "specinfer", at_least=True)  # every level adds a node or more
    size, width = 1, 1
    for e in expansion:  # the size, before anything is built
        width *= e
        size += width
        if size > MAX_TREE_NODES:
            break
    _cap(size, f"specinfer {_short_list(expansion)}", at_least=True)
    parents = [-1]
    level = [0]
    for e in expansion:
        nxt = []
        for node in level:
            for _ in range(e):
                nxt.append(len(parents))
                parents.append(node)
        level = nxt
    return Tree(tuple(parents))


def top_path_product(p: Sequence[float] | Sequence[Sequence[float]], size: int,
                     max_depth: int | None = None) -> Tree:
    """Medusa's greedy construction: starting from the root, repeatedly add the candidate
    node with the highest path probability (product of ``p`` along its rank path); the
    candidates are each node's first child and its next sibling rank.

    ``p`` is a rank profile (1-D) or depth-aware (2-D, row d for a parent at depth d); ties go
    to the shallower, then lexicographically smaller rank path. When every row of ``p`` is
    non-increasing in rank the result is optimal (the top path probabilities always form a
    valid tree), so it cross-checks the exact DP; otherwise it is just a baseline."""
    _positive(size, "size", minimum=1)
    _cap(size, "greedy tree")
    if max_depth is not None:
        _positive(max_depth, "max_depth", minimum=0)
    table = as_depth_table(p)

    def rank_prob(depth: int, rank: int) -> float:
        row = table[min(depth, len(table) - 1)]
        return row[rank - 1] if rank <= len(row) else 0.0

    heap: list[tuple[float, int, tuple[int, ...], float, float]] = []

    def offer(parent_path: tuple[int, ...], parent_prob: float, rank: int) -> None:
        if max_depth is not None and len(parent_path) >= max_depth:
            return
        q = parent_prob * rank_prob(len(parent_path), rank)
        path = parent_path + (rank - 1,)
        heapq.heappush(heap, (-q, len(path), path, q, parent_prob))

    paths: list[tuple[int, ...]] = []
    offer((), 1.0, 1)
    while len(paths) + 1 < size and heap:
        _, _, path, q, parent_prob = heapq.heappop(heap)
        paths.append(path)
        offer(path, q, 1)
        offer(path[:-1], parent_prob, path[-1] + 2)
    if len(paths) + 1 < size:
        raise ShapeError(f"cannot place {size} nodes within depth {max_depth}")
    return Tree.from_paths(paths)


# ---------------------------------------------------------------------------- presets
@dataclass(frozen=True)
class Preset:
    """A named published tree: Medusa/EAGLE-style 0-based rank paths plus attribution."""

    name: str
    paths: tuple[tuple[int, ...], ...]
    source: str
    description: str

    def tree(self) -> Tree:
        return Tree.from_paths(self.paths)


_MC_SIM_7B_63 = [
    [0], [0, 0], [1], [0, 1], [2], [0, 0, 0], [1, 0], [0, 2], [3], [0, 3], [4], [0, 4], [2, 0],
    [0, 5], [0, 0, 1], [5], [0, 6], [6], [0, 7], [0, 1, 0], [1, 1], [7], [0, 8], [0, 0, 2],
    [3, 0], [0, 9], [8], [9], [1, 0, 0], [0, 2, 0], [1, 2], [0, 0, 3], [4, 0], [2, 1],
    [0, 0, 4], [0, 0, 5], [0, 0, 0, 0], [0, 1, 1], [0, 0, 6], [0, 3, 0], [5, 0], [1, 3],
    [0, 0, 7], [0, 0, 8], [0, 0, 9], [6, 0], [0, 4, 0], [1, 4], [7, 0], [0, 1, 2], [2, 0, 0],
    [3, 1], [2, 2], [8, 0], [0, 5, 0], [1, 5], [1, 0, 1], [0, 2, 1], [9, 0], [0, 6, 0],
    [0, 0, 0, 1], [1, 6], [0, 7, 0],
]

PRESETS: dict[str, Preset] = {
    "mc_sim_7b_63": Preset(
        "mc_sim_7b_63", tuple(tuple(x) for x in _MC_SIM_7B_63),
        source="Medusa (FasterDecoding/Medusa, medusa/model/medusa_choices.py, Apache-2.0)",
        description="Medusa's default 64-node tree for Vicuna-7B (63 drafted tokens, depth 4), "
                    "also EAGLE's default choices",
    ),
    "sequoia-example-8": Preset(
        "sequoia-example-8", ((0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0)),
        source="treeopt design notes (growmap example)",
        description="8 nodes: roots [[0],[1,2,3],[4,5,6],[7]]",
    ),
}
PRESETS["medusa-63"] = PRESETS["mc_sim_7b_63"]


# ---------------------------------------------------------------------------- specs
SPEC_HELP = ("chain:N, kary:KxD, chains:KxL, specinfer:E1,E2,..., greedy:N[xD], dp:N[xD], "
             "paths:[[0],[1],[0,0]], parents:[-1,0,0], a preset name "
             f"({', '.join(sorted(PRESETS))}) or a growmap file (.pt/.json)")


def from_name(spec: str, profile=None) -> Tree:
    """Parse a shape spec (see the module docstring). ``greedy:`` and ``dp:`` need
    ``profile`` (a :class:`~treeopt.profile.Profile` or a rank table)."""
    spec = spec.strip()
    kind, sep, arg = spec.partition(":")
    kind = kind.lower()
    try:
        if sep and kind == "chain":
            return chain(_int(arg, spec))
        if sep and kind in ("kary", "k-ary"):
            k, d = _pair(arg, spec)
            return kary(k, d)
        if sep and kind in ("chains", "kxl"):
            k, length = _pair(arg, spec)
            return independent_chains(k, length)
        if sep and kind == "specinfer":
            return specinfer([_int(x, spec) for x in arg.split(",")])
        if sep and kind == "greedy":
            n, d = _size_depth(arg, spec)
            return top_path_product(_table(profile, spec), n, max_depth=d)
        if sep and kind == "dp":
            n, d = _size_depth(arg, spec)
            return _dp_tree(_table(profile, spec), n, d)
        if sep and kind == "paths":
            tree = Tree.from_paths(_paths(_json_list(arg, spec), spec))  # <= cap entries: cheap
            _cap(tree.size, "paths tree")
            return tree
        if sep and kind == "parents":
            return Tree.from_parents(_parents(_json_list(arg, spec), spec))
    except TreeError as exc:
        raise ShapeError(f"shape {_short_spec(spec)!r}: {exc}") from None
    except ShapeError as exc:
        if str(exc).startswith("shape "):
            raise
        raise ShapeError(f"shape {_short_spec(spec)!r}: {exc}") from None
    if spec in PRESETS:
        return PRESETS[spec].tree()
    if is_file_spec(spec):
        return load_growmap(spec)[0]
    raise ShapeError(f"unknown shape {_short_spec(spec)!r}; use {SPEC_HELP}")


def is_file_spec(spec: str) -> bool:
    """Whether a spec names a growmap file (by extension, or an existing file) rather than a
    built-in shape or preset."""
    spec = spec.strip()
    if spec in PRESETS:
        return False
    kind, sep, _ = spec.partition(":")
    if sep and kind.lower() in _KINDS and not Path(spec).suffix.lower() in GROWMAP_SUFFIXES:
        return False
    path = Path(spec)
    return path.suffix.lower() in GROWMAP_SUFFIXES or path.is_file()


def describe(spec: str) -> str:
    """Short display name for a spec (file paths shortened to their name)."""
    path = Path(spec)
    return path.name if path.suffix.lower() in GROWMAP_SUFFIXES else spec


def _table(profile, spec: str) -> list[list[float]]:
    """The rank table of ``profile``: a Profile's is the one every search uses (its depth
    rows measured on enough steps, ``treeopt.pipeline.rank_table``); a table is taken as is."""
    if profile is None:
        raise ShapeError(f"shape {spec!r} needs an acceptance profile (--profile)")
    if hasattr(profile, "table"):
        return reliable_table(profile)
    return as_depth_table(profile)


def _dp_tree(table: list[list[float]], n: int, depth: int | None) -> Tree:
    _cap(n, "dp tree")
    # ``depth`` counts edges; the DP counts levels, root included. An n-node tree has at most
    # n levels, so a larger limit changes nothing and is clamped (dp:64x1000000 is dp:64).
    levels = min(levels_for_depth(depth), n) if depth is not None else n
    return solve(table, n, levels).tree(n, levels, at_most=True)


def _int(text: str, spec: str) -> int:
    text = text.strip()
    if len(text) > 30:  # beyond any cap; int() of thousands of digits is slow or refused
        raise ShapeError(f"shape {_short_spec(spec)!r}: {_short_spec(text)!r} is too large "
                         f"(the limit is {MAX_TREE_NODES} tree nodes, MAX_TREE_NODES)")
    try:
        return int(text)
    except ValueError:
        raise ShapeError(f"shape {_short_spec(spec)!r}: {text!r} is not an integer") from None


def _pair(arg: str, spec: str) -> tuple[int, int]:
    parts = arg.lower().split("x")
    if len(parts) != 2:
        raise ShapeError(f"shape {spec!r}: expected two numbers like 4x5")
    return _int(parts[0], spec), _int(parts[1], spec)


def _size_depth(arg: str, spec: str) -> tuple[int, int | None]:
    if "x" in arg.lower():
        return _pair(arg, spec)
    return _int(arg, spec), None


def _json_list(arg: str, spec: str) -> list:
    value = parse_json(arg, lambda msg: ShapeError(f"shape {_short_spec(spec)!r}: not a JSON "
                                                   f"list ({msg})"))
    if not isinstance(value, list):
        raise ShapeError(f"shape {_short_spec(spec)!r}: not a JSON list")
    if len(value) > MAX_TREE_NODES:
        raise ShapeError(f"shape {_short_spec(spec)!r}: {len(value)} entries; a tree has at most "
                         f"{MAX_TREE_NODES} nodes (MAX_TREE_NODES)")
    return value


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _parents(values: list, spec: str) -> list[int]:
    for i, x in enumerate(values):
        if not _is_int(x):
            raise ShapeError(f"shape {_short_spec(spec)!r}: parents[{i}] = {show_number(x)} "
                             "is not an integer")
    return values


def _paths(values: list, spec: str) -> list[list[int]]:
    for i, path in enumerate(values):
        if not isinstance(path, list) or len(path) >= MAX_TREE_NODES or not all(
                _is_int(r) for r in path):
            raise ShapeError(f"shape {_short_spec(spec)!r}: paths[{i}] must be a list of "
                             f"fewer than {MAX_TREE_NODES} integer ranks")
    return values


def _positive(x, name: str, minimum: int) -> None:
    if isinstance(x, bool) or not isinstance(x, int) or x < minimum:
        raise ShapeError(f"{name} must be an integer >= {minimum}, got {show_number(x)}")


def _cap(n: int, what: str, at_least: bool = False) -> None:
    """The one tree-size cap, checked before a shape is built."""
    if n > MAX_TREE_NODES:
        amount = f"more than {MAX_TREE_NODES}" if at_least else show_number(n)
        raise ShapeError(f"{what} would have {amount} nodes, over the limit of "
                         f"{MAX_TREE_NODES} tree nodes (MAX_TREE_NODES: the engine verifies "
                         "every node in one forward)")


def _short_spec(text: str) -> str:
    return text if len(text) <= 60 else text[:57] + "..."


def _short_list(values: list) -> str:
    shown = ",".join(show_number(v) for v in values[:8])
    return shown + (",..." if len(values) > 8 else "")


_KINDS = ("chain", "kary", "k-ary", "chains", "kxl", "specinfer", "greedy", "dp", "paths",
          "parents")


def resolve_tree(spec: Tree | TreeSet | str | os.PathLike | None, profile=None
                 ) -> Tree | TreeSet | None:
    """treeopt's one rule from a tree spec to a tree: a ``Tree`` from a Tree, a growmap file
    (.pt/.json), or a shape string such as ``"chain:4"``, ``"kary:2x3"``, ``"dp:64x8"``
    (:func:`from_name`; ``dp:``/``greedy:`` need ``profile``); ``None`` stays None. A tree set
    (``treeopt.treeset``: a TreeSet or its .json file) comes back as a TreeSet, whose tree for
    a prompt ``treeopt.api.tree_for_prompt`` picks. Every caller (``generate``, ``eval``,
    ``chat``, the CLI) resolves tree specs here."""
    if spec is None or isinstance(spec, (Tree, TreeSet)):
        return spec
    text = str(spec).strip()
    path = Path(text).expanduser()
    if is_treeset_file(path):
        return load_treeset(path)
    if path.is_file():
        return load_growmap(path)[0]
    return from_name(text, profile=profile)
