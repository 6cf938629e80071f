"""Drafting: the draft model grows a token tree level by level.

One draft forward per level: level 0 feeds the committed tokens the draft has not seen yet
(ending with the root), level d >= 1 feeds every node at depth d that has children, with tree
attention over the nodes fed before it (the draft's KV cache keeps them; the engine later keeps
only the accepted path). Children come from the draft's top-k (greedy) or are drawn from the
processed draft distribution Q, without replacement (Sequoia) or with (SpecInfer); Q is kept
for every expanded node because stochastic verification needs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from treeopt.decode.attention import forward_tree
from treeopt.decode.sampling import GREEDY, Sampling, draw_children
from treeopt.tree import Tree, ancestor_mask


@dataclass(frozen=True)
class LevelPlan:
    """How to expand the nodes of one depth.

    nodes:    (e,) int64 ids of the nodes at this depth that have children (the expanders).
    fed:      number of tree nodes (root excluded) fed to the draft before this level.
    mask:     (e, fed + e) bool ancestor-or-self mask over the fed tree nodes and this level
              (None for depth 0: the root is part of the committed prefix).
    k:        largest number of children of an expander here.
    rows, cols: (c,) int64: child j of the next level (in id order) is pick[rows[j], cols[j]].
    children: (first, last + 1) ids of the next level.
    """

    depth: int
    nodes: torch.Tensor
    fed: int
    mask: torch.Tensor | None
    k: int
    rows: torch.Tensor
    cols: torch.Tensor
    children: tuple[int, int]


@dataclass(frozen=True)
class DraftPlan:
    """Per tree shape: one LevelPlan per depth 0..depth-1; ``fed_index[v]`` is the position of
    node v among the tree nodes fed to the draft (-1 for the root and unfed leaves);
    ``row[v]`` is v's row in its level's Q."""

    levels: tuple[LevelPlan, ...]
    fed_index: tuple[int, ...]
    row: tuple[int, ...]


@lru_cache(maxsize=256)
def draft_plan(tree: Tree, device: str = "cpu") -> DraftPlan:
    full = ancestor_mask(tree)
    fed_nodes: list[int] = []
    fed_index = [-1] * tree.size
    row = [-1] * tree.size
    levels = []
    for d in range(tree.depth):
        nodes = [v for v in tree.levels[d] if tree.children[v]]
        for r, v in enumerate(nodes):
            row[v] = r
        mask = None
        fed = len(fed_nodes)
        if d > 0:
            for v in nodes:
                fed_index[v] = len(fed_nodes)
                fed_nodes.append(v)
            cols_ids = torch.tensor(fed_nodes)
            mask = full[torch.tensor(nodes)][:, cols_ids].to(device)
        rows, cols = [], []
        for r, v in enumerate(nodes):
            for j in range(len(tree.children[v])):
                rows.append(r)
                cols.append(j)
        nxt = tree.levels[d + 1]
        levels.append(LevelPlan(
            depth=d, nodes=torch.tensor(nodes, device=device), fed=fed, mask=mask,
            k=max(len(tree.children[v]) for v in nodes),
            rows=torch.tensor(rows, device=device), cols=torch.tensor(cols, device=device),
            children=(nxt[0], nxt[-1] + 1)))
    return DraftPlan(tuple(levels), tuple(fed_index), tuple(row))


@dataclass
class DraftedTree:
    """A drafted tree: tokens (size,) int64 on the model device (node 0 = root);
    q: per depth, (e_d, V) float32 processed draft probs of that depth's expanders
    (None in greedy mode); forwards: draft forwards run."""

    tokens: torch.Tensor
    q: list[torch.Tensor] | None
    forwards: int


def feed_pending(draft, cache, pending: torch.Tensor, root_pos: int) -> torch.Tensor:
    """The first draft forward of a step: the committed tokens the draft has not processed,
    ``pending`` (1, p) int64 ending with the root, at positions root_pos - p + 1 .. root_pos.
    Returns the draft logits (1, V) at the root."""
    p = pending.shape[1]
    positions = torch.arange(root_pos - p + 1, root_pos + 1, device=pending.device)[None]
    return forward_tree(draft, pending, positions, None, cache, logits_to_keep=1)[0]


def pick_children(logits: torch.Tensor, k: int, sampling: Sampling = GREEDY,
                  generator: torch.Generator | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The k children of each expanded node, as every model drafter chooses them.

    logits: (e, V) draft logits of the expanded nodes. Greedy ``sampling``: the draft's top-k
    tokens, q None. Otherwise Q = ``sampling.probs(logits)`` and k children drawn from it
    (``draw_children``: with replacement for the SpecInfer rule, else without), q = Q.
    Returns (children (e, k) int64 in rank order, q (e, V) float32 or None)."""
    if sampling.greedy:
        return logits.topk(k, dim=-1).indices, None
    q = sampling.probs(logits)
    return draw_children(q, k, sampling.rule == "specinfer", generator), q


def draft_tree(draft, cache, pending: torch.Tensor, root_pos: int, tree: Tree, *,
               sampling: Sampling = GREEDY, generator: torch.Generator | None = None
               ) -> DraftedTree:
    """Grow ``tree`` with the draft model, one forward per level.

    draft: a causal LM; cache: its DynamicCache holding the first ``root_pos + 1 - p``
    committed tokens; pending: (1, p) int64, the committed tokens it has not processed yet,
    ending with the root (p >= 1), at positions root_pos - p + 1 .. root_pos.
    After the call the cache holds all committed tokens followed by the expanded tree nodes
    of depth >= 1 in ``DraftPlan.fed_index`` order.
    Greedy ``sampling``: children are the draft's top-k tokens; otherwise they are drawn from
    Q = ``sampling.probs(logits)``, with replacement for the SpecInfer rule, else without.
    """
    device = pending.device
    plan = draft_plan(tree, str(device))
    tokens = torch.empty(tree.size, dtype=torch.int64, device=device)
    tokens[0] = pending[0, -1]
    logits = feed_pending(draft, cache, pending, root_pos)
    forwards = 1
    qs: list[torch.Tensor] | None = None if sampling.greedy else []
    for level in plan.levels:
        if level.depth > 0:
            ids = tokens[level.nodes][None]
            positions = torch.full_like(ids, root_pos + level.depth)
            logits = forward_tree(draft, ids, positions, level.mask, cache)[0]
            forwards += 1
        pick, q = pick_children(logits, level.k, sampling, generator)
        if qs is not None:
            qs.append(q)
        first, end = level.children
        tokens[first:end] = pick[level.rows, level.cols]
    return DraftedTree(tokens, qs, forwards)
