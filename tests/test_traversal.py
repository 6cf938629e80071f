"""Traversal and Block Verification are lossless, shown exactly: on tiny vocabularies every
draft a drafter can propose and every decision the rule can take are enumerated with their
probabilities, and the resulting joint distribution of the first tokens equals the target's
to rounding. Deliberately broken variants of each rule fail the same comparison; a
hand-computable chain shows the sequence-level gain over the token-level rule."""

from __future__ import annotations

import itertools

import pytest
import torch
from lossless import drafts, lm, outcomes

import treeopt.decode.traversal as tv
from treeopt.decode.sampling import SamplingError, check_rule_shape
from treeopt.tree import Tree

# A branching tree of depth 3 and a chain of 4 drafted tokens.
TREE = Tree.from_parents([-1, 0, 0, 1, 1, 3])
CHAIN = Tree.from_parents([-1, 0, 1, 2, 3])
# A wider, deeper tree (depth 4) for deterministic candidates (one draft per context).
BIG = Tree.from_parents([-1, 0, 0, 0, 1, 1, 2, 4, 4, 7])
PROMPT = (1,)
L = 4  # tokens of the joint compared (more than a step can produce on TREE)


def rule_joint(rule, tree: Tree, p, q, mode: str) -> dict:
    """Exact joint of the first L tokens: every draft, every rule outcome, then the target's
    own sampling up to L tokens."""
    joint: dict = {}

    def extend(prob, seq):
        if len(seq) >= L:
            key = tuple(seq[:L])
            joint[key] = joint.get(key, 0.0) + prob
            return
        dist = p(PROMPT + tuple(seq))
        for x in range(len(dist)):
            if dist[x] > 0:
                extend(prob * float(dist[x]), seq + [x])

    for w_draft, tokens in drafts(tree, q, mode):
        ctx = {0: PROMPT}
        for v in range(1, tree.size):
            ctx[v] = ctx[tree.parents[v]] + (tokens[v],)

        def run(src, tokens=tokens, ctx=ctx):
            return rule(tree, tokens, lambda v: p(ctx[v]),
                        (lambda v: None) if mode == "point" else (lambda v: q(ctx[v])), src)

        for w, (path, ranks, bonus) in outcomes(run):
            assert ranks == [tree.ranks[v] for v in path[1:]]
            extend(w_draft * w, [tokens[v] for v in path[1:]] + [bonus])
    return joint


def target_joint(p) -> dict:
    vocab = len(p(PROMPT))
    out = {}
    for seq in itertools.product(range(vocab), repeat=L):
        w = 1.0
        for i, x in enumerate(seq):
            w *= float(p(PROMPT + seq[:i])[x])
        if w > 0:
            out[seq] = w
    return out


def distance(a: dict, b: dict) -> float:
    return max(abs(a.get(k, 0.0) - b.get(k, 0.0)) for k in set(a) | set(b))


CASES = [  # (rule, tree, mode, vocab, target top-k / top-p, draft top-k)
    ("traversal", TREE, "sample", 3, {}, {}),
    ("traversal", TREE, "sample", 4, {"top_k": 2}, {"top_p": 0.8}),  # supports differ
    ("traversal", BIG, "point", 4, {}, {}),
    ("traversal", CHAIN, "sample", 3, {}, {}),
    ("block", CHAIN, "sample", 3, {}, {}),
    ("block", CHAIN, "sample", 4, {"top_p": 0.7}, {"top_k": 2}),
    ("block", CHAIN, "point", 4, {}, {}),
]


@pytest.mark.parametrize("rule,tree,mode,vocab,pk,qk", CASES)
def test_rule_gives_the_exact_target_joint(rule, tree, mode, vocab, pk, qk):
    p, q = lm(0, vocab, **pk), lm(1, vocab, **qk)
    got = rule_joint(tv.TREE_RULES[rule], tree, p, q, mode)
    assert sum(got.values()) == pytest.approx(1.0, abs=1e-9)
    assert distance(got, target_joint(p)) < 1e-9


BUGS = {
    # the parent's weight is not updated after a child's deletion (h_i = p_i in Block)
    "weight kept": lambda mp: mp.setattr(tv, "_after_rejection", lambda a, r: a),
    # the residual ignores the sequence weight: max(P - Q, 0) instead of max(a P - Q, 0)
    "residual unweighted": lambda mp: mp.setattr(
        tv, "_residual", (lambda f: lambda a, *rest: f(1.0, *rest))(tv._residual)),
}


@pytest.mark.parametrize("bug", sorted(BUGS))
@pytest.mark.parametrize("rule,tree,mode,vocab", [
    ("traversal", TREE, "sample", 3), ("traversal", BIG, "point", 4),
    ("block", CHAIN, "sample", 3), ("block", CHAIN, "point", 4)])
def test_broken_rules_fail_the_same_comparison(monkeypatch, bug, rule, tree, mode, vocab):
    BUGS[bug](monkeypatch)
    p = lm(0, vocab)
    q = p if mode == "point" else lm(1, vocab)  # point masses on the target's top tokens
    got = rule_joint(tv.TREE_RULES[rule], tree, p, q, mode)
    assert distance(got, target_joint(p)) > 1e-3


def test_traversal_on_a_chain_is_block_verification():
    p, q = lm(2, 3), lm(3, 3)
    for _, tokens in drafts(CHAIN, q, "sample")[:20]:
        ctx = {0: PROMPT}
        for v in range(1, CHAIN.size):
            ctx[v] = ctx[v - 1] + (tokens[v],)
        res = {}
        for rule in ("traversal", "block"):
            dist: dict = {}
            for w, (path, _, bonus) in outcomes(
                    lambda src, rule=rule: tv.TREE_RULES[rule](
                        CHAIN, tokens, lambda v: p(ctx[v]), lambda v: q(ctx[v]), src)):
                dist[(len(path), bonus)] = dist.get((len(path), bonus), 0.0) + w
            res[rule] = dist
        assert distance(res["traversal"], res["block"]) < 1e-12


def test_sequence_level_acceptance_by_hand():
    """The papers' example: the first token's ratio P/Q is 1/2, the second's 4/3. Token by
    token both are kept with probability 1/2 * 1 = 1/2; Block and Traversal keep both with
    min(1, 1/2 * 4/3) = 2/3."""
    rows = {0: torch.tensor([0.25, 0.75, 0.0], dtype=torch.float64),
            1: torch.tensor([0.4, 0.6, 0.0], dtype=torch.float64),
            2: torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)}
    drafted = {0: torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64),
               1: torch.tensor([0.3, 0.2, 0.5], dtype=torch.float64)}
    chain = Tree.from_parents([-1, 0, 1])
    for rule in ("traversal", "block"):
        full = sum(w for w, (path, _, _) in outcomes(
            lambda src, rule=rule: tv.TREE_RULES[rule](chain, [2, 0, 0], rows.__getitem__,
                                                       drafted.__getitem__, src))
            if len(path) == 3)
        assert full == pytest.approx(2 / 3, abs=1e-12)


def test_one_level_tree_decides_as_sequoia():
    """On the root's children alone the root's weight stays 1: each child is accepted with
    min(1, P/Q) after the earlier ones were rejected, as in Sequoia's rule."""
    p = torch.tensor([0.1, 0.5, 0.4], dtype=torch.float64)
    q = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    star = Tree.from_parents([-1, 0, 0])
    tokens = [2, 0, 1]
    accepted = {}
    for w, (path, _, bonus) in outcomes(lambda src: tv.traversal_verify(
            star, tokens, lambda v: p, lambda v: q if v == 0 else None, src)):
        if len(path) > 1:
            accepted[tokens[path[1]]] = accepted.get(tokens[path[1]], 0.0) + w
    # child 0 (token 0): accepted with min(1, .1/.6) = 1/6. Then P' = (0, .2, .3)/.5 =
    # (0, .4, .6) and Q' = (0, .75, .25): child 1 (token 1) accepted with min(1, .4/.75).
    assert accepted[0] == pytest.approx(1 / 6)
    assert accepted[1] == pytest.approx(5 / 6 * 8 / 15)


def test_block_refuses_a_branching_tree_in_one_line():
    with pytest.raises(SamplingError, match="verifies chains") as err:
        check_rule_shape("block", TREE)
    assert "\n" not in str(err.value)
    check_rule_shape("block", CHAIN)
    check_rule_shape("traversal", TREE)
    with pytest.raises(SamplingError, match="verifies chains"):
        tv.block_verify(TREE, [0] * TREE.size, None, None, None)
