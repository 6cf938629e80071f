"""Sequence-level verification rules: Traversal Verification (trees) and Block Verification
(chains). Both are lossless; Block Verification is optimal for one drafted block, Traversal
Verification reduces to it on a chain (on trees it is not proven to beat token-level rules,
though it did in every case measured).

Notation. Node v of the drafted tree holds token x_v; P_v is the target's processed
distribution after the path root..v, Q_v the draft distribution v's children were drawn from
(without replacement: the k-th child from Q_v with the earlier children removed,
renormalised). A drafter without distributions proposes point masses: the k-th child c has
Q = δ_{x_c} (probability 1 for its own token).

**Block Verification** (Sun, Mendlovic, Leviathan et al., "Block Verification Accelerates
Speculative Decoding", arXiv 2403.10444, ICLR 2025), for a chain X_1..X_γ under the root X_0:

    p_0 = 1,   p_i = min(1, p_{i-1} · P_{i-1}(x_i) / Q_{i-1}(x_i))
    r_i = Σ_y max(p_i · P_i(y) − Q_i(y), 0)                      (i < γ)
    h_i = r_i / (r_i + 1 − p_i)  for 1 <= i < γ,   h_γ = p_γ
    τ   = the largest i in 1..γ with η_i <= h_i (η_i ~ U(0, 1) independent), else 0
    output X_1..X_τ, then Y ~ P_γ if τ = γ, else Y ~ max(p_τ · P_τ − Q_τ, 0) / r_τ.

The paper proves the output follows the target exactly and that no valid verifier of one
drafted block accepts more tokens in expectation (so it is never below the token-level rule).

**Traversal Verification** (Weng, Hu et al., "Traversal Verification for Speculative Tree
Decoding", arXiv 2505.12398, NeurIPS 2025) generalises it to trees. Every node carries a
sequence-level weight a_v (the chance its whole root-to-v path is kept), starting at a_root = 1
and set when v is reached from its parent u as

    a_v = min(1, a_u · P_u(x_v) / Q_u(x_v)).

The tree is traversed depth first, children in rank order (the order they were drawn), and a
node is tested only when it is a leaf of what remains, i.e. after all its children were
tested and deleted (leaf to root). A leaf v is accepted with probability a_v: the path
root..v is output, then Y ~ P_v (the current, possibly residual, P_v). Otherwise v is deleted
and its parent u is updated with r = Σ_y max(a_u · P_u(y) − Q_u(y), 0):

    P_u ← max(a_u · P_u − Q_u, 0) / r,   a_u ← r / (r + 1 − a_u),   Q_u ← Q_u without x_v

(renormalised; for a point mass Q_u = δ_{x_v}: r = a_u (1 − P_u(x_v)), P_u ← P_u without
x_v). The root is never deleted: once all its children are gone it is accepted with Y ~ P_root.
On a chain this is exactly Block Verification (the h_i above are the updated a_u); on a
one-level tree the root's weight stays 1, so it makes Sequoia's decisions.

Why it is lossless (our derivation; the paper gives its own proof). Claim: for a node v with
weight a, current target P and any drafted subtree below it (children drawn from the
current Q), the traversal of that subtree accepts with probability a, and given acceptance
its output (followed by the target's own sampling) has the target's distribution starting
from P. A leaf does this by construction. With a first child c ~ Q: c = x and its subtree
accepted has probability Q(x) · min(1, aP(x)/Q(x)) = min(aP(x), Q(x)) (induction on c's
subtree); c rejected has probability Σ_x max(Q(x) − aP(x), 0) = 1 − a + r, after which the
state (a', P') = (r / (r + 1 − a), max(aP − Q, 0) / r) does not depend on x, and by
induction on the remaining children the rest accepts with first token y with probability
a' · P'(y); in total min(aP(y), Q(y)) + max(aP(y) − Q(y), 0) = a · P(y). At the root a = 1.

Both rules read only scalars P_u(x_v), Q_u(x_v) until a node is deleted; each deletion costs
a few passes over the vocabulary. Randomness comes from a ``source`` (``GeneratorSource`` in
decoding) so tests can enumerate every outcome with its exact probability.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from treeopt.decode.sampling import RESIDUAL_EPS, SamplingError, check_rule_shape, sample
from treeopt.tree import Tree

#: (V,) processed target distribution at node v.
TargetRows = Callable[[int], torch.Tensor]
#: (V,) draft distribution node v's children were drawn from, or None (point masses).
DraftRows = Callable[[int], "torch.Tensor | None"]


class GeneratorSource:
    """The rules' randomness from a torch generator: one uniform per node (each node is
    tested at most once) and inverse-CDF draws for the bonus token."""

    def __init__(self, size: int, generator: torch.Generator | None,
                 device: torch.device | str = "cpu"):
        self.u = torch.rand(size, generator=generator, device=device).tolist()
        self.generator = generator

    def accept(self, node: int, prob: float) -> bool:
        """True with probability ``prob`` (the test of ``node``)."""
        return self.u[node] < prob

    def draw(self, probs: torch.Tensor) -> int:
        """One token from ``probs`` (V,) (need not be normalised)."""
        return int(sample(probs[None], 1, self.generator))


def _residual(a: float, p: torch.Tensor, pm: float, q: torch.Tensor | None, qm: float, x: int
              ) -> tuple[torch.Tensor, float, float]:
    """The residual max(a·P − Q, 0) of P = p / pm and Q = q / qm (Q = δ_x when ``q`` is
    None), unnormalised: (tensor, its mass, r) where r = Σ max(a·P − Q, 0); the normalised
    residual is tensor / mass. Rows are never modified in place. When r is numerical noise
    (P == Q) P is kept."""
    if q is None:  # max(a P − δ_x, 0) = a P without x (a P(x) <= 1)
        px = float(p[x])
        r = a * (pm - px) / pm
        if (pm - px) / pm <= RESIDUAL_EPS:
            return p, pm, r
        out = p.clone()
        out[x] = 0.0
        return out, pm - px, r
    res = p.mul(a / pm).sub_(q, alpha=1.0 / qm).clamp_min_(0.0)
    r = float(res.sum())
    if r <= RESIDUAL_EPS:
        return p, pm, r
    return res, r, r


def _after_rejection(a: float, r: float) -> float:
    """The parent's new weight r / (r + 1 − a) after a child's deletion."""
    d = r + 1.0 - a
    return r / d if d > 0 else 1.0


class _Node:
    """A tested node's current target and draft rows, kept unnormalised: P = p / pm,
    Q = q / qm (q None: point masses). ``own_q``: q is our copy (a removal may write it)."""

    __slots__ = ("p", "pm", "q", "qm", "own_q")

    def __init__(self, p: torch.Tensor, q: torch.Tensor | None):
        self.p, self.pm, self.q, self.qm, self.own_q = p, 1.0, q, 1.0, False

    def remove(self, x: int) -> None:
        """Q without x (the distribution the next sibling was drawn from)."""
        if self.q is None:
            return
        qx = float(self.q[x])
        if not self.own_q:
            self.q, self.own_q = self.q.clone(), True
        self.q[x] = 0.0
        self.qm -= qx

    def q_of(self, x: int) -> float:
        """Current Q(x): 1 for a point mass, 0 once Q is exhausted."""
        if self.q is None:
            return 1.0
        if self.qm <= RESIDUAL_EPS:
            return 0.0
        return float(self.q[x]) / self.qm


def traversal_verify(tree: Tree, tokens: Sequence[int], target: TargetRows, draft: DraftRows,
                     source) -> tuple[list[int], list[int], int]:
    """Traversal Verification of one drafted tree (see the module docstring).

    tokens: the tree's tokens (node 0 = root); ``target(v)``: (V,) processed target probs at
    node v; ``draft(v)``: (V,) draft probs v's children were drawn from, or None for point
    masses; ``source``: ``accept(node, prob) -> bool`` and ``draw(probs) -> token``.
    Returns (accepted path node ids from the root, their sibling ranks, bonus token).
    Children whose current draft probability is 0 (fillers) are skipped. Rows are read, never
    written: each deletion costs a few passes over the vocabulary at the parent.
    """
    children = tree.children
    weight = [0.0] * tree.size
    weight[0] = 1.0
    nodes: dict[int, _Node] = {}
    nxt = [0] * tree.size
    stack = [0]
    while True:
        v = stack[-1]
        kids = children[v]
        if nxt[v] < len(kids):
            c = kids[nxt[v]]
            nxt[v] += 1
            if v not in nodes:
                nodes[v] = _Node(target(v), draft(v))
            node, x = nodes[v], tokens[c]
            qx = node.q_of(x)
            if qx <= 0:
                continue
            weight[c] = min(1.0, weight[v] * float(node.p[x]) / node.pm / qx)
            stack.append(c)
            continue
        if v == 0 or source.accept(v, weight[v]):
            p = nodes[v].p if v in nodes else target(v)
            return list(stack), [tree.ranks[u] for u in stack[1:]], source.draw(p)
        stack.pop()
        u, x = stack[-1], tokens[v]
        node = nodes[u]
        node.p, node.pm, r = _residual(weight[u], node.p, node.pm, node.q, node.qm, x)
        weight[u] = _after_rejection(weight[u], r)
        node.remove(x)


def block_verify(tree: Tree, tokens: Sequence[int], target: TargetRows, draft: DraftRows,
                 source) -> tuple[list[int], list[int], int]:
    """Block Verification of a chain (the paper's Algorithm, see the module docstring): the
    weights p_i forward, the stopping probabilities h_i, then τ = the deepest i whose test
    passes (tested from the leaf up, which is the largest i with η_i <= h_i). Same arguments
    and return as :func:`traversal_verify`; a branching tree raises SamplingError."""
    check_rule_shape("block", tree)
    chain = [0]
    while tree.children[chain[-1]]:
        chain.append(tree.children[chain[-1]][0])
    p_rows = [target(v) for v in chain[:-1]]
    q_rows = [draft(v) for v in chain[:-1]]
    weights = [1.0]
    for i, v in enumerate(chain[1:]):
        q = q_rows[i]
        qx = 1.0 if q is None else float(q[tokens[v]])
        if qx <= 0:  # a child that cannot have been drawn: the block ends before it
            chain = chain[:i + 1]
            break
        weights.append(min(1.0, weights[-1] * float(p_rows[i][tokens[v]]) / qx))
    gamma = len(chain) - 1
    for i in range(gamma, 0, -1):
        if i == gamma:
            h = weights[i]
        else:
            _, _, r = _residual(weights[i], p_rows[i], 1.0, q_rows[i], 1.0, tokens[chain[i + 1]])
            h = _after_rejection(weights[i], r)
        if source.accept(chain[i], h):
            tau = i
            break
    else:
        tau = 0
    if tau == gamma:
        bonus = source.draw(p_rows[tau] if tau < len(p_rows) else target(chain[tau]))
    else:
        res, _, _ = _residual(weights[tau], p_rows[tau], 1.0, q_rows[tau], 1.0,
                              tokens[chain[tau + 1]])
        bonus = source.draw(res)
    path = chain[:tau + 1]
    return path, [1] * tau, bonus


#: The sequence-level rules by name.
TREE_RULES = {"traversal": traversal_verify, "block": block_verify}


def verify_tree_rule(rule: str, tree: Tree, tokens: Sequence[int], target: TargetRows,
                     draft: DraftRows, generator: torch.Generator | None,
                     device: torch.device | str = "cpu") -> tuple[list[int], list[int], int]:
    """Run the sequence-level ``rule`` ("traversal" or "block") with randomness from
    ``generator``. Returns (path, ranks, bonus)."""
    if rule not in TREE_RULES:
        raise SamplingError(f"{rule!r} is not a sequence-level rule; use {', '.join(TREE_RULES)}")
    return TREE_RULES[rule](tree, tokens, target, draft,
                            GeneratorSource(tree.size, generator, device))
