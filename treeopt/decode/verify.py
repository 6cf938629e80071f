"""Verification: the target scores every node of a proposal in one forward, a lossless rule
chooses the accepted path, and the target's KV cache keeps only that path."""

from __future__ import annotations

from typing import Sequence

import torch

from treeopt.decode.attention import compact, forward_tree
from treeopt.decode.drafter import Proposal
from treeopt.decode.sampling import (
    Sampling,
    check_rule_shape,
    verify_candidates,
    verify_children,
    verify_greedy,
)
from treeopt.decode.traversal import TREE_RULES, verify_tree_rule
from treeopt.errors import TreeoptError
from treeopt.tree import Tree, TreeBuffers, build_buffers


class DecodeError(TreeoptError, ValueError):
    """Bad input to generate (shapes, lengths, mismatched models), or a target whose logits
    are NaN in greedy decoding."""



def proposal_buffers(proposal: Proposal, device: torch.device | str) -> TreeBuffers:
    """Verification buffers of a proposal's tree: cached for fixed shapes, built fresh
    (vectorised) for per-step trees."""
    if proposal.fixed_shape:
        return proposal.tree.buffers(device)
    return build_buffers(proposal.tree, str(device))


def verify_tree(target, cache, proposal: Proposal, root_pos: int) -> torch.Tensor:
    """One target forward over all nodes of ``proposal``.

    cache holds the ``root_pos`` committed tokens before the root; the tree tokens (size,)
    (node 0 = root) sit at positions root_pos + depth, each seeing the prefix and its
    ancestors. Returns logits (size, V); afterwards the cache holds root_pos + size tokens.
    """
    tree, tokens = proposal.tree, proposal.tokens
    buffers = proposal_buffers(proposal, tokens.device)
    chain = tree.width <= 1
    positions = (buffers.depth + root_pos)[None]
    return forward_tree(target, tokens[None], positions, None if chain else buffers.mask,
                        cache)[0]


def greedy_choice(logits: torch.Tensor, where: str) -> torch.Tensor:
    """The target's argmax of each row of ``logits`` (..., V), refusing NaN logits.

    ``argmax`` of a row holding a NaN returns a NaN's index (torch propagates NaN through
    max reductions), so checking the chosen values finds every NaN row at the cost of one
    value per row, not a pass over (rows, V). Without this check greedy decoding would
    silently emit that index as a token. Raises ``DecodeError`` naming ``where``."""
    best = logits.argmax(-1)
    picked = logits.gather(-1, best.unsqueeze(-1))
    if bool(torch.isnan(picked).any()):
        raise DecodeError(f"the target produced NaN logits at {where}; use float32 or check "
                          "the model")
    return best


def accept_greedy(logits: torch.Tensor, tokens: Sequence[int], tree: Tree, *,
                  where: str = "a verification step") -> tuple[list[int], list[int], int]:
    """Greedy walk: from the root, follow the child whose token is the target's argmax.

    logits: (size, V); tokens: tree tokens as ints. Returns (path node ids from the root,
    sibling ranks along it, bonus token = the target's argmax at the last path node).
    Raises ``DecodeError`` when the logits hold NaN (``where`` says which step).
    """
    best = greedy_choice(logits, where).tolist()
    path, ranks, v = [0], [], 0
    while True:
        kids = tree.children[v]
        i, tok = verify_greedy(best[v], [tokens[c] for c in kids])
        if i is None:
            return path, ranks, tok
        v = kids[i]
        path.append(v)
        ranks.append(i + 1)


def accept_stochastic(logits: torch.Tensor, tokens: Sequence[int], proposal: Proposal,
                      sampling: Sampling, generator: torch.Generator | None
                      ) -> tuple[list[int], list[int], int]:
    """Stochastic walk: at every node P comes from the target's logits there; children with
    a draft distribution Q (``proposal.q_at``) are verified by ``sampling.rule``
    (``verify_children``), children without one as point masses (``verify_candidates``).
    The sequence-level rules ("traversal", "block") verify the whole tree at once
    (:mod:`treeopt.decode.traversal`), with Q = 1 for point-mass children.
    Returns (path, ranks, bonus token)."""
    tree = proposal.tree
    if sampling.rule in TREE_RULES:
        return verify_tree_rule(sampling.rule, tree, tokens,
                                lambda v: sampling.probs(logits[v]),
                                lambda v: _on(proposal.q_at(v), logits.device), generator,
                                logits.device)
    path, ranks, v = [0], [], 0
    while True:
        kids = tree.children[v]
        p = sampling.probs(logits[v])
        children = [tokens[c] for c in kids]
        q = proposal.q_at(v) if kids else None
        if q is None:
            i, tok = verify_candidates(p, children, generator)
        else:
            i, tok = verify_children(p, q, children, sampling.rule, generator)
        if i is None:
            return path, ranks, tok
        v = kids[i]
        path.append(v)
        ranks.append(i + 1)


def _on(q: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return q if q is None or q.device == device else q.to(device)


def accept(logits: torch.Tensor, proposal: Proposal, sampling: Sampling,
           generator: torch.Generator | None, *, where: str = "a verification step"
           ) -> tuple[list[int], list[int], int]:
    """Pick the accepted path: greedy when ``sampling`` is greedy, else the stochastic rule.
    logits: (size, V). Returns (path node ids from the root, sibling ranks along it, bonus
    token). NaN logits raise ``DecodeError`` (greedy, naming ``where``) or ``SamplingError``
    (stochastic, from the sampling rules). A chain-only rule ("block") refuses a branching
    tree with a one-line ``SamplingError``, greedy or not."""
    check_rule_shape(sampling.rule, proposal.tree)
    tokens = proposal.tokens.tolist()
    if sampling.greedy:
        return accept_greedy(logits, tokens, proposal.tree, where=where)
    return accept_stochastic(logits, tokens, proposal, sampling, generator)


def keep(cache, root_pos: int, path: Sequence[int], tree: Tree) -> None:
    """Keep only the accepted path of the verified tree in the target cache: before, it
    holds root_pos prefix tokens + all tree nodes; after, the prefix + the path. A size-1
    tree (plain decoding step) leaves it untouched."""
    if tree.size > 1:
        compact(cache, root_pos, path)
