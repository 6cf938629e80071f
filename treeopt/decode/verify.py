"""Verification: the target scores every tree node in one forward, the accepted path is
chosen by a lossless rule, and both KV caches are compacted to that path."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from treeopt.decode.attention import crop_to, forward_tree, keep_tokens
from treeopt.decode.draft import DraftedTree, draft_plan
from treeopt.decode.sampling import logits_to_probs, verify_children, verify_greedy
from treeopt.tree import Tree, TreeBuffers


def verify_tree(target, cache, tokens: torch.Tensor, root_pos: int, tree: Tree,
                buffers: TreeBuffers) -> torch.Tensor:
    """One target forward over all tree nodes.

    cache holds the ``root_pos`` committed tokens before the root; tokens: (size,) int64 tree
    tokens (node 0 = root) at positions root_pos + depth, each seeing the prefix and its
    ancestors. Returns logits (size, V); afterwards the cache holds root_pos + size tokens.
    """
    chain = tree.width <= 1
    positions = (buffers.depth + root_pos)[None]
    return forward_tree(target, tokens[None], positions, None if chain else buffers.mask,
                        cache)[0]


def accept_greedy(logits: torch.Tensor, tokens: Sequence[int], tree: Tree
                  ) -> tuple[list[int], list[int], int]:
    """Greedy walk: from the root, follow the child whose token is the target's argmax.

    logits: (size, V); tokens: tree tokens as ints. Returns (path node ids from the root,
    sibling ranks along it, bonus token = the target's argmax at the last path node).
    """
    best = logits.argmax(-1).tolist()
    path, ranks, v = [0], [], 0
    while True:
        kids = tree.children[v]
        i, tok = verify_greedy(best[v], [tokens[c] for c in kids])
        if i is None:
            return path, ranks, tok
        v = kids[i]
        path.append(v)
        ranks.append(i + 1)


def accept_stochastic(logits: torch.Tensor, tokens: Sequence[int], tree: Tree,
                      q_at: Callable[[int], torch.Tensor], *, temperature: float, top_k: int,
                      top_p: float, rule: str, generator: torch.Generator | None
                      ) -> tuple[list[int], list[int], int]:
    """Stochastic walk with ``verify_children`` at every node (P from the target's logits at
    that node, Q = ``q_at(node)`` (V,) from drafting). Returns (path, ranks, bonus token)."""
    path, ranks, v = [0], [], 0
    while True:
        kids = tree.children[v]
        p = logits_to_probs(logits[v], temperature, top_k, top_p)
        q = q_at(v) if kids else None
        i, tok = verify_children(p, q, [tokens[c] for c in kids], rule, generator)
        if i is None:
            return path, ranks, tok
        v = kids[i]
        path.append(v)
        ranks.append(i + 1)


def compact(cache, start: int, keep: Sequence[int]) -> None:
    """Keep cache positions [0, start) and start + keep (increasing offsets), drop the rest.
    A contiguous keep (0, 1, ..., m-1) is a plain crop."""
    m = len(keep)
    if m == 0 or keep[-1] == m - 1:
        crop_to(cache, start + m)
    else:
        device = cache.layers[0].keys.device
        keep_tokens(cache, start, torch.tensor(keep, dtype=torch.int64, device=device))


def accept(logits: torch.Tensor, tokens: Sequence[int], tree: Tree,
           drafted: DraftedTree | None, *, temperature: float, top_k: int, top_p: float,
           rule: str, generator: torch.Generator | None) -> tuple[list[int], list[int], int]:
    """Pick the accepted path: greedy when temperature is 0, else the stochastic ``rule``
    with each expanded node's recorded draft distribution. logits: (size, V).
    Returns (path node ids from the root, sibling ranks along it, bonus token)."""
    if temperature == 0:
        return accept_greedy(logits, tokens, tree)
    qs = drafted.q if drafted is not None else None
    row = draft_plan(tree, str(logits.device)).row
    depths = tree.depths
    return accept_stochastic(logits, tokens, tree, lambda v: qs[depths[v]][row[v]],
                             temperature=temperature, top_k=top_k, top_p=top_p, rule=rule,
                             generator=generator)


def update_caches(target_cache, draft_cache, root_pos: int, path: Sequence[int],
                  tree: Tree) -> int:
    """Keep only the accepted path's entries in both caches.

    Before: the target cache holds root_pos prefix tokens + all tree nodes; the draft cache
    (None when nothing was drafted) holds root_pos + 1 committed tokens (root included) + the
    expanded nodes of depth >= 1 in ``DraftPlan.fed_index`` order. After: the target cache holds
    the prefix + the path; the draft cache the committed tokens + the path nodes it expanded
    (a prefix of path[1:]: all of it, or all but an accepted leaf).
    Returns how many path nodes after the root the draft cache kept. A size-1 tree
    (autoregressive step) leaves both caches untouched.
    """
    if tree.size == 1:
        return 0
    compact(target_cache, root_pos, path)
    if draft_cache is None:
        return 0
    fed_index = draft_plan(tree, str(draft_cache.layers[0].keys.device)).fed_index
    fed = [fed_index[v] for v in path[1:] if fed_index[v] >= 0]
    compact(draft_cache, root_pos + 1, fed)
    return len(fed)
