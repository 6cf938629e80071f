"""What a verification rule gains on real drafts: expected accepted tokens per step of every
rule on the same drafted trees, and each rule's own cost, measured inside real decoding.

At every step of a decoding run (driven by one rule; every rule is lossless, so the contexts
follow the target's distribution whichever drives), the drafted tree and the target's
distributions at its nodes are fixed; given them, the expected number of accepted draft tokens
of each rule is computed exactly (:func:`expected_accepted`), not sampled. Averaged over
steps, this compares the rules on identical drafts (a paired comparison: the difference has
far less variance than separate sampled runs). The same step's ``accept`` is also timed once
per rule, beside the step's draft and verify time.

Exact expectation per rule, given the drafted tree:

- token level (sequoia, specinfer): walking from the root, child c_j of node v is accepted
  with probability reach_j · α_j, α_j = min(1, P(x_j)/Q(x_j)) with P, Q the residual and
  reduced distributions after the earlier siblings were rejected (reach_j = Π_{i<j}(1 − α_i));
  E(v) = Σ_j reach_j α_j (1 + E(c_j)).
- traversal and block: the nodes are tested in a fixed order (the rule's traversal) and each
  test's probability depends only on the rejections before it, so node v is the accepted one
  with probability a_v · Π_{w tested before v}(1 − a_w); E = Σ_v that · depth(v).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from treeopt.decode.drafter import Drafter, Proposal
from treeopt.decode.engine import commit, prefill, propose
from treeopt.decode.sampling import WITH_REPLACEMENT, Sampling, check_rule_shape, draw_children
from treeopt.decode.traversal import TREE_RULES, _Node, _residual
from treeopt.decode.verify import accept, keep, verify_tree
from treeopt.tree import Tree


class _Recorder:
    """A rule's randomness that rejects every test and records (node, probability)."""

    def __init__(self):
        self.tests: list[tuple[int, float]] = []

    def accept(self, node: int, prob: float) -> bool:
        self.tests.append((node, min(1.0, max(0.0, float(prob)))))
        return False

    def draw(self, probs: torch.Tensor) -> int:
        return 0


def _token_level(rule: str, tree: Tree, tokens: Sequence[int], target, draft, v: int = 0
                 ) -> float:
    """Expected accepted tokens below node v under a token-level rule (module docstring)."""
    kids = tree.children[v]
    if not kids:
        return 0.0
    node = _Node(target(v), draft(v))
    reach, total = 1.0, 0.0
    for c in kids:
        x = tokens[c]
        qx = node.q_of(x)
        if qx <= 0:
            continue
        alpha = min(1.0, float(node.p[x]) / node.pm / qx)
        if alpha > 0:
            total += reach * alpha * (1.0 + _token_level(rule, tree, tokens, target, draft, c))
        reach *= 1.0 - alpha
        if reach <= 0:
            break
        node.p, node.pm, _ = _residual(1.0, node.p, node.pm, node.q, node.qm, x)
        if rule not in WITH_REPLACEMENT:
            node.remove(x)
    return total


def expected_accepted(rule: str, tree: Tree, tokens: Sequence[int], target, draft) -> float:
    """Exact expected number of accepted draft tokens of ``rule`` on one drafted tree.

    tokens: the tree's tokens; ``target(v)``: (V,) processed target probs at node v;
    ``draft(v)``: (V,) draft probs v's children were drawn from, or None (point masses)."""
    check_rule_shape(rule, tree)
    if rule not in TREE_RULES:
        return _token_level(rule, tree, tokens, target, draft)
    rec = _Recorder()
    TREE_RULES[rule](tree, tokens, target, draft, rec)
    depths, survive, total = tree.depths, 1.0, 0.0
    for node, a in rec.tests:
        total += survive * a * depths[node]
        survive *= 1.0 - a
    return total


@dataclass
class RuleStats:
    """Per rule over all measured steps: expected accepted tokens per step (exact given each
    step's draft), and the rule's own time per step (``accept`` on that step's logits)."""

    rule: str
    expected: list[float] = field(default_factory=list)
    accept_s: list[float] = field(default_factory=list)

    @property
    def tokens_per_step(self) -> float:
        """Expected tokens per step: accepted draft tokens + the bonus."""
        return 1.0 + sum(self.expected) / max(1, len(self.expected))

    def standard_error(self) -> float:
        return _se(self.expected)

    def gain_over(self, other: "RuleStats") -> tuple[float, float]:
        """(mean, standard error) of the per-step difference of expected accepted tokens
        against ``other`` measured on the same steps."""
        diff = [a - b for a, b in zip(self.expected, other.expected)]
        return sum(diff) / max(1, len(diff)), _se(diff)


@dataclass
class RuleRun:
    """``measure_rules``'s result: per-rule stats and the steps' draft and verify times."""

    rules: dict[str, RuleStats]
    tokens: list[list[int]] = field(default_factory=list)  # generated, per prompt
    draft_s: list[float] = field(default_factory=list)
    verify_s: list[float] = field(default_factory=list)
    steps: int = 0

    @property
    def step_ms(self) -> float:
        """Median draft + verify milliseconds per step (the rule's own time excluded; medians,
        as a shared CPU's preemptions inflate means)."""
        return 1000.0 * _median([d + v for d, v in zip(self.draft_s, self.verify_s)])

    def rule_ms(self, rule: str) -> float:
        """Median milliseconds per step of ``rule``'s ``accept``."""
        return 1000.0 * _median(self.rules[rule].accept_s)


def _median(xs: Sequence[float]) -> float:
    xs = sorted(xs)
    if not xs:
        return math.nan
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else 0.5 * (xs[mid - 1] + xs[mid])


def _se(xs: Sequence[float]) -> float:
    n = len(xs)
    if n < 2:
        return math.nan
    m = sum(xs) / n
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n)


def measure_rules(target, drafter: Drafter, prompts: Sequence[Sequence[int]],
                  rules: Sequence[str], *, temperature: float, top_k: int = 0,
                  top_p: float = 1.0, max_new_tokens: int = 48, seed: int = 0,
                  eos_token_id: int | Sequence[int] | None = None) -> RuleRun:
    """Decode each prompt with ``drafter`` under ``rules[0]`` (sampled at ``temperature``,
    seed ``seed + prompt index``) and, at every step, compute every rule's exact expected
    accepted tokens on that step's drafted tree and time every rule's ``accept`` on it.
    prompts: token id lists. A chain-only rule with a branching tree raises SamplingError."""
    if not rules:
        raise ValueError("give at least one rule")
    drive = Sampling(temperature, top_k, top_p, rules[0], seed)
    others = {r: Sampling(temperature, top_k, top_p, r, seed) for r in rules}
    if drafter.shape is not None:
        for r in rules:
            check_rule_shape(r, drafter.shape)
    eos = frozenset([] if eos_token_id is None else
                    [eos_token_id] if isinstance(eos_token_id, int) else eos_token_id)
    device = next(target.parameters()).device
    run = RuleRun({r: RuleStats(r) for r in rules})
    with torch.inference_mode():
        for i, ids in enumerate(prompts):
            gen = torch.Generator(device=device).manual_seed(seed + i)
            side = torch.Generator(device=device).manual_seed(seed + 7919 * (i + 1))
            input_ids = torch.tensor([list(ids)], dtype=torch.int64, device=device)
            cache, first = prefill(target, drafter, input_ids, drive, gen)
            committed = list(ids) + [first]
            out = 1
            while out < max_new_tokens and first not in eos:  # the engine's loop, unchanged
                root_pos = len(committed) - 1
                t0 = time.perf_counter()
                proposal = propose(drafter, committed, max_new_tokens - out - 1, drive, gen,
                                   device)
                t1 = time.perf_counter()
                logits = verify_tree(target, cache, proposal, root_pos)
                t2 = time.perf_counter()
                run.draft_s.append(t1 - t0)
                run.verify_s.append(t2 - t1)
                run.steps += 1
                tokens = proposal.tokens.tolist()
                rows: dict[int, torch.Tensor] = {}

                def target_row(v, rows=rows, logits=logits):
                    if v not in rows:
                        rows[v] = drive.probs(logits[v])
                    return rows[v]

                for r in rules:
                    run.rules[r].expected.append(expected_accepted(
                        r, proposal.tree, tokens, target_row, proposal.q_at))
                    if r != rules[0]:
                        t = time.perf_counter()
                        accept(logits, proposal, others[r], side)
                        run.rules[r].accept_s.append(time.perf_counter() - t)
                t = time.perf_counter()
                path, _, bonus = accept(logits, proposal, drive, gen)
                run.rules[rules[0]].accept_s.append(time.perf_counter() - t)
                keep(cache, root_pos, path, proposal.tree)
                new, hit = commit(proposal, path, bonus, max_new_tokens - out, eos)
                committed += new
                out += len(new)
                drafter.update(path, committed)
                if hit:
                    break
            run.tokens.append(committed[len(ids):])
    return run


def time_rules(tree: Tree, rules: Sequence[str], *, vocab: int, repeats: int = 40,
               temperature: float = 1.0, seed: int = 0) -> dict[str, float]:
    """Minimum milliseconds of ``accept`` per rule on one synthetic step: random target and
    draft logits over ``vocab`` tokens at every node of ``tree``, children drawn from the draft
    (weakly related distributions: nearly every node is rejected, the rules' worst case).
    The minimum over ``repeats`` runs is the cost without a busy machine's preemptions."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(tree.size, vocab, generator=g) * 3
    sampling = Sampling(temperature)
    q_all = sampling.probs(logits + torch.randn(tree.size, vocab, generator=g) * 3)
    tokens = [0] * tree.size
    q_rows, q_row = [], [-1] * tree.size
    for d, level in enumerate(tree.levels):
        inner = [v for v in level if tree.children[v]]
        q_rows.append(q_all[inner] if inner else q_all[:0])
        for j, v in enumerate(inner):
            q_row[v] = j
            kids = draw_children(q_all[v:v + 1], len(tree.children[v]), False, g)[0].tolist()
            for c, x in zip(tree.children[v], kids):
                tokens[c] = x
    proposal = Proposal(tree, torch.tensor(tokens), q_rows, q_row)
    out = {}
    for rule in rules:
        s = Sampling(temperature, rule=rule)
        best = math.inf
        for k in range(repeats):
            gen = torch.Generator().manual_seed(k)
            t = time.perf_counter()
            accept(logits, proposal, s, gen)
            best = min(best, time.perf_counter() - t)
        out[rule] = 1000.0 * best
    return out
