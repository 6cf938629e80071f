"""The exact per-draft expectation of each rule (``treeopt.evaluate.rule_gain``) agrees with
the enumerated outcomes of the rule (traversal, block) and with sampling (sequoia); the paired
measurement decodes exactly what the engine decodes."""

import pytest
import torch
from helpers import PROMPT, pair
from lossless import drafts, lm, outcomes

import treeopt.decode.traversal as tv
from treeopt.decode.engine import generate
from treeopt.decode.sampling import Sampling, verify_children
from treeopt.drafters.model import ModelDrafter
from treeopt.evaluate.rule_gain import expected_accepted, measure_rules
from treeopt.tree import Tree

TREE = Tree.from_parents([-1, 0, 0, 1, 1, 3])
CHAIN = Tree.from_parents([-1, 0, 1, 2, 3])


def contexts(tree, tokens):
    ctx = {0: (1,)}
    for v in range(1, tree.size):
        ctx[v] = ctx[tree.parents[v]] + (tokens[v],)
    return ctx


@pytest.mark.parametrize("rule,tree", [("traversal", TREE), ("block", CHAIN),
                                       ("traversal", CHAIN)])
def test_expectation_equals_the_enumerated_outcomes(rule, tree):
    p, q = lm(0, 3), lm(1, 3)
    for _, tokens in drafts(tree, q, "sample")[::7]:
        ctx = contexts(tree, tokens)
        target, draft = (lambda v: p(ctx[v])), (lambda v: q(ctx[v]))
        enumerated = sum(w * (len(path) - 1) for w, (path, _, _) in outcomes(
            lambda src: tv.TREE_RULES[rule](tree, tokens, target, draft, src)))
        assert expected_accepted(rule, tree, tokens, target, draft) == pytest.approx(
            enumerated, abs=1e-12)


def test_token_level_expectation_matches_sampling():
    p, q = lm(0, 3), lm(1, 3)
    _, tokens = drafts(TREE, q, "sample")[5]
    ctx = contexts(TREE, tokens)
    g = torch.Generator().manual_seed(0)
    n, total = 6_000, 0
    for _ in range(n):
        v = 0
        while TREE.children[v]:
            kids = TREE.children[v]
            i, _ = verify_children(p(ctx[v]), q(ctx[v]), [tokens[c] for c in kids],
                                   "sequoia", g)
            if i is None:
                break
            v = kids[i]
            total += 1
    exact = expected_accepted("sequoia", TREE, tokens, lambda v: p(ctx[v]),
                              lambda v: q(ctx[v]))
    assert total / n == pytest.approx(exact, abs=0.04)  # SE about 0.01


def test_hand_chain_gain():
    """The papers' example (ratios 1/2 then 4/3): token level expects 1/2 * 2 = 1 accepted
    token; block 2 * 2/3 + 1 * (1/3 * 1/6) = 25/18 (h_1 = r_1 / (r_1 + 1 - p_1) = .1 / .6)."""
    rows = {0: torch.tensor([0.25, 0.75, 0.0], dtype=torch.float64),
            1: torch.tensor([0.4, 0.6, 0.0], dtype=torch.float64)}
    drafted = {0: torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64),
               1: torch.tensor([0.3, 0.2, 0.5], dtype=torch.float64)}
    chain = Tree.from_parents([-1, 0, 1])
    args = (chain, [2, 0, 0], rows.__getitem__, drafted.__getitem__)
    assert expected_accepted("sequoia", *args) == pytest.approx(1.0)
    assert expected_accepted("block", *args) == pytest.approx(25 / 18)
    assert expected_accepted("traversal", *args) == pytest.approx(25 / 18)


def test_measurement_decodes_what_the_engine_decodes():
    target, draft = pair()
    tree = TREE
    prompts = [PROMPT[0].tolist(), [1, 2, 5, 6]]
    run = measure_rules(target, ModelDrafter(draft, tree), prompts, ["traversal", "sequoia"],
                        temperature=1.0, max_new_tokens=12, seed=3)
    for i, ids in enumerate(prompts):
        gen = generate(target, ModelDrafter(draft, tree), torch.tensor([ids]),
                       max_new_tokens=12, sampling=Sampling(1.0, rule="traversal", seed=3 + i))
        assert run.tokens[i] == gen.tokens
    assert run.steps == len(run.rules["sequoia"].expected) == len(run.draft_s) > 0
    assert all(0 <= e <= tree.depth for r in run.rules.values() for e in r.expected)
    assert run.rule_ms("traversal") > 0 and run.step_ms > 0
