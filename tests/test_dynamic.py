"""Dynamic per-step trees (treeopt.drafters.dynamic): greedy outputs equal plain decoding token
for token (tiny Llama and Qwen2, several budgets and depths, budget 1 and depth 1), the drafted
tokens equal the draft's own choices at every node (tree mask, positions and cache after
compaction), the kept set is parent-closed and equals a brute-force top-budget, the per-step
DP equals a brute force over every parent-closed subset, sampling stays lossless (chi-square,
Sequoia and SpecInfer rules; a broken rule and a token-dependent choice fail), and spec
errors are one line."""

import json
from functools import lru_cache

import numpy as np
import pytest
import torch
from helpers import NEW, PROMPT, exact, pair
from lossless import pair_pvalues as pvalues

from treeopt.decode.drafter import DrafterError, build_drafter
from treeopt.decode.engine import generate
from treeopt.decode.sampling import Sampling, draw_children, verify_children, verify_children_batch
from treeopt.drafters.dynamic import (
    DynamicDrafter,
    Expansion,
    best_nodes,
    best_size,
    choose,
    renumber,
)
from treeopt.profile.calibration import from_samples
from treeopt.profile.model import Latency, LatencyCurve
from treeopt.testing import tiny_causal_lm
from treeopt.tree import Tree

IDS = torch.tensor([[2, 5, 7, 9, 11]])


def one_line(exc) -> str:
    msg = str(exc.value)
    assert msg and "\n" not in msg
    return msg


@lru_cache(maxsize=None)
def models(arch: str):
    """(target, draft): a peaked 3-layer target and a 1-layer draft that agrees with it part
    of the time (the target's own first layer, final norm and head)."""
    from treeopt.models.loading import early_exit_draft

    target = tiny_causal_lm(arch, vocab_size=64, hidden_size=32, num_layers=3, seed=4)
    with torch.no_grad():
        target.model.norm.weight.mul_(6.0)
    return target, early_exit_draft(target, 1)


def calibration(latency: bool):
    conf = np.linspace(0.0, 1.0, 200)
    lat = Latency(LatencyCurve([1, 2, 4, 8, 16, 32], [10.0, 10.5, 11.0, 14.0, 20.0, 30.0]),
                  LatencyCurve([1, 4, 16], [2.0, 2.5, 4.0])) if latency else None
    return from_samples(conf, conf ** 0.5 > 0.5, bins=5, latency=lat)


# ---------------------------------------------------------------------------- greedy
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("budget,depth,topk", [(1, 3, 2), (2, 4, 1), (6, 1, 4), (8, 3, 3),
                                                (20, 5, 4), (40, 6, 8)])
def test_dynamic_greedy_equals_plain(arch, budget, depth, topk):
    target, draft = models(arch)
    ref = generate(target, None, IDS, max_new_tokens=40).tokens
    got = generate(target, DynamicDrafter(draft, budget=budget, depth=depth, topk=topk), IDS,
                   max_new_tokens=40)
    assert got.tokens == ref
    steps = got.stats.steps
    assert all(1 <= s.nodes <= budget and s.depth <= depth for s in steps)
    if budget == 1:
        assert got.stats.draft_forwards == 0 and all(s.nodes == 1 for s in steps)
    else:
        assert got.stats.accepted_tokens > 0  # the draft agrees sometimes: paths were kept


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("latency", [False, True])
def test_dynamic_dp_greedy_equals_plain(arch, latency):
    target, draft = models(arch)
    ref = generate(target, None, IDS, max_new_tokens=40).tokens
    drafter = DynamicDrafter(draft, budget=24, depth=4, topk=4,
                             calibration=calibration(latency))
    got = generate(target, drafter, IDS, max_new_tokens=40)
    assert got.tokens == ref
    sizes = [s.nodes for s in got.stats.steps]
    assert max(sizes) <= 24
    if not latency:
        assert sizes[0] == 24  # a fixed budget: every node the expansion offers, up to 24


def test_dynamic_dp_never_drafts_when_no_tree_can_pay():
    """Verifying n tokens costs 10 n ms and a draft forward 2 ms: even a tree whose every node
    is accepted commits n tokens in 10 n + 2 ms or more, slower than plain decoding's 10 ms a
    token, so no step can pay and none drafts (not even the prompt is fed to the draft). The
    same calibration with flat verification costs pays, and drafts."""
    conf = np.linspace(0.0, 1.0, 200)
    dear = Latency(LatencyCurve([1, 2, 4, 8], [10.0, 20.0, 40.0, 80.0]),
                   LatencyCurve([1, 4], [2.0, 2.5]))
    flat = Latency(LatencyCurve([1, 2, 4, 8], [10.0, 10.0, 10.5, 11.0]),
                   LatencyCurve([1, 4], [2.0, 2.5]))
    target, draft = models("llama")
    ref = generate(target, None, IDS, max_new_tokens=20).tokens
    never = DynamicDrafter(draft, budget=8, depth=3, topk=2,
                           calibration=from_samples(conf, conf > 0.5, bins=5, latency=dear))
    assert never.calibration.acceptance(np.array([1.0]))[0] == 1.0
    assert never.never_pays and never.cache is None
    got = generate(target, never, IDS, max_new_tokens=20)
    assert got.tokens == ref and never.cache is None
    assert got.stats.draft_forwards == 0 and all(s.nodes == 1 for s in got.stats.steps)
    pays = DynamicDrafter(draft, budget=8, depth=3, topk=2,
                          calibration=from_samples(conf, conf ** 0.5 > 0.5, bins=5,
                                                   latency=flat))
    assert not pays.never_pays
    got = generate(target, pays, IDS, max_new_tokens=20)
    assert got.tokens == ref and got.stats.draft_forwards > 0


def test_self_draft_accepts_every_level():
    """With the target as its own draft the top-1 chain is always accepted: every step
    accepts `depth` tokens only if the draft cache holds the right context after each
    compaction (non-contiguous: siblings were fed at every level)."""
    target = pair()[0]  # peaked: the top-1 chain has the highest values
    got = generate(target, DynamicDrafter(target, budget=12, depth=3, topk=3), PROMPT,
                   max_new_tokens=41)
    assert [s.accepted for s in got.stats.steps] == [3] * 10
    assert all(s.nodes == 12 for s in got.stats.steps)


def draft_choices(draft, context: list[int], k: int) -> list[int]:
    with torch.no_grad():
        logits = draft(input_ids=torch.tensor([context])).logits[0, -1]
    return logits.topk(k).indices.tolist()


def test_tree_tokens_are_the_drafts_own_choices_after_compaction():
    """Every drafted node is its parent's rank-th top token of the draft run without a cache
    on the node's path; checked on the first step and after an update that keeps a path
    through non-first children."""
    target, draft = models("qwen2")
    drafter = DynamicDrafter(draft, budget=40, depth=3, topk=3)  # keeps all 22 candidates
    drafter.start(IDS)
    committed = IDS[0].tolist() + [3]  # the prompt and the token prefill chose
    for step in range(3):
        prop = drafter.propose(committed, 3, Sampling())
        tree, tokens = prop.tree, prop.tokens.tolist()
        assert prop.fixed_shape is False and prop.q is None
        assert tree.size == 22 and tree.depth == 3
        for v in range(1, tree.size):
            path = [tokens[u] for u in tree.path_to(v)[1:-1]]
            kids = draft_choices(draft, committed + path, tree.ranks[v])
            assert tokens[v] == kids[tree.ranks[v] - 1]
        # accept the deepest node's path (not the first-child chain), then a bonus token
        leaf = max(range(tree.size), key=lambda v: (tree.depths[v], tree.ranks[v]))
        path = list(tree.path_to(leaf))
        committed = committed + [tokens[v] for v in path[1:]] + [step + 3]
        drafter.update(path, committed)


# ---------------------------------------------------------------------------- choice
def random_candidates(rng, n: int, width: int = 3):
    """A breadth-first candidate tree of n nodes and path values from factors in [0, 1]
    (some repeated, so that ties occur)."""
    parents = [-1]
    frontier, nxt = [0], []
    while len(parents) < n:
        if not frontier:
            frontier, nxt = nxt, []
        p = frontier.pop(0)
        for _ in range(rng.integers(1, width + 1)):
            if len(parents) < n:
                nxt.append(len(parents))
                parents.append(p)
    factors = rng.choice([0.0, 0.25, 0.5, 0.5, 0.8, 1.0, rng.random()], size=n)
    values = np.ones(n)
    for v in range(1, n):
        values[v] = values[parents[v]] * factors[v]
    return np.array(parents), values


def closed_subsets(parents):
    n = len(parents)
    for bits in range(1 << (n - 1)):
        s = [0] + [v for v in range(1, n) if bits >> (v - 1) & 1]
        if all(parents[v] in s for v in s[1:]):
            yield s


def test_kept_set_is_parent_closed_top_budget():
    rng = np.random.default_rng(0)
    for trial in range(200):
        parents, values = random_candidates(rng, int(rng.integers(1, 40)))
        for budget in (1, 2, 5, 17, 64):
            kept = best_nodes(values, budget)
            brute = sorted(range(len(values)), key=lambda v: (-values[v], v))[:budget]
            assert kept.tolist() == sorted(brute)
            assert all(parents[v] in set(kept.tolist()) for v in kept[1:])
            tree = Tree(tuple(renumber(parents, kept).tolist()))  # a valid BFS tree
            assert tree.size == len(kept)


def test_per_step_dp_equals_brute_force_over_parent_closed_subsets():
    rng = np.random.default_rng(1)
    for trial in range(60):
        n = int(rng.integers(1, 11))
        parents, values = random_candidates(rng, n)
        budget = int(rng.integers(1, n + 2))
        cost = 10.0 + np.cumsum(rng.random(budget) * rng.choice([0.1, 3.0, 8.0], budget))
        kept = choose(values, budget, cost)
        got = values[kept].sum() / cost[len(kept) - 1]
        best = max(values[s].sum() / cost[len(s) - 1]
                   for s in closed_subsets(parents) if len(s) <= budget)
        assert got == pytest.approx(best, rel=1e-12)
        assert all(parents[v] in set(kept.tolist()) for v in kept[1:])
        fixed = choose(values, budget)
        m = min(budget, n)
        assert values[fixed].sum() == pytest.approx(
            max(values[s].sum() for s in closed_subsets(parents) if len(s) == m))


def test_stopping_rule_takes_the_first_local_maximum():
    values = np.array([1.0, 0.5, 0.45, 0.4, 0.4])
    cost = np.array([10.0, 11.0, 17.0, 17.5, 30.0])
    ratios = np.cumsum(values) / cost  # .100 .136 .115 .134 .092: a dip, a lower rise
    assert best_size(values, cost) == int(np.argmax(ratios)) + 1 == 2
    assert best_size(values, cost, stopping=True) == 2
    cost = np.array([10.0, 11.0, 17.0, 17.1, 17.2])
    ratios = np.cumsum(values) / cost  # .100 .136 .115 .137 .157
    assert best_size(values, cost) == int(np.argmax(ratios)) + 1 == 5
    assert best_size(values, cost, stopping=True) == 2
    assert best_size(values, None) == 5


def expand(budget: int, depth: int, topk: int, seed: int):
    """Grow an Expansion whose edge factors depend only on each node's rank path."""
    tree = Expansion(depth, topk, budget, torch.tensor(0))
    paths = {0: ()}
    ids = np.zeros(1, dtype=np.int64)
    for d in range(depth):
        if d > 0:
            ids = tree.frontier(d)
            if ids.size == 0:
                break
            tree.feed(ids)
        factors = np.array([[np.random.default_rng(hash((seed,) + paths[int(v)] + (r,))
                                                   % 2**32).random() for r in range(topk)]
                            for v in ids])
        factors = -np.sort(-factors, axis=1)  # by rank, as the draft's sorted probabilities
        start = tree.n
        tree.add_children(ids, torch.zeros(len(ids), topk, dtype=torch.int64), factors, False)
        for i, v in enumerate(np.repeat(ids, topk)):
            paths[start + i] = paths[int(v)] + (i % topk,)
    return tree, paths


@pytest.mark.parametrize("seed", range(5))
def test_feeding_only_nodes_that_can_matter_changes_nothing(seed):
    """The frontier skips nodes that cannot have a kept child; the kept set (as rank paths)
    equals the one of an expansion that feeds every top-k node."""
    for budget in (3, 9, 30):
        tree, paths = expand(budget, 4, 3, seed)
        full, full_paths = expand(10**6, 4, 3, seed)
        kept = {paths[int(v)] for v in tree.select(budget)}
        assert kept == {full_paths[int(v)] for v in full.select(budget)}
        assert tree.n_fed <= full.n_fed


# ---------------------------------------------------------------------------- sampling
class OwnProbability(DynamicDrafter):
    """Broken on purpose: values a sampled child by the probability of the token drawn (so
    whether it is kept depends on the draw itself)."""

    def confidence(self, logits, q, children):
        return super().confidence(logits, q, children) if q is None else q.gather(1, children)


def sample_tokens(drafter, rule, temperature, top_p, n):
    target = pair()[0]
    return torch.tensor([generate(target, drafter, PROMPT, max_new_tokens=NEW,
                                  sampling=Sampling(temperature, 0, top_p, rule, s)).tokens
                         for s in range(n)])


@pytest.mark.parametrize("rule,temperature,top_p", [("sequoia", 1.0, 1.0),
                                                    ("specinfer", 0.7, 0.9)])
def test_dynamic_sampling_is_lossless(rule, temperature, top_p):
    drafter = DynamicDrafter(pair()[1], budget=6, depth=3, topk=3)
    samples = sample_tokens(drafter, rule, temperature, top_p, 600)
    assert min(pvalues(samples, exact(temperature, top_p))) > 1e-3


def test_dynamic_dp_sampling_is_lossless():
    drafter = DynamicDrafter(pair()[1], budget=8, depth=3, topk=3,
                             calibration=calibration(True))
    samples = sample_tokens(drafter, "sequoia", 1.0, 1.0, 400)
    assert min(pvalues(samples, exact(1.0, 1.0))) > 1e-3


def test_broken_rule_fails_the_dynamic_test(monkeypatch):
    import treeopt.decode.verify as verify_module

    def keep_q(p, q, children, rule, generator):
        return verify_children(p, q, children, "specinfer", generator)

    monkeypatch.setattr(verify_module, "verify_children", keep_q)
    drafter = DynamicDrafter(pair()[1], budget=6, depth=3, topk=3)
    samples = sample_tokens(drafter, "sequoia", 1.0, 1.0, 300)
    assert min(pvalues(samples, exact(1.0, 1.0))) < 1e-6


def test_choosing_a_child_by_its_own_drawn_probability_is_biased():
    """Why values use the confidence of a child's rank: keeping the best of k drawn
    children by the drawn token's own Q changes the output distribution, keeping the first
    drawn one does not (one node, many rows at once, exact P)."""
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    q = torch.tensor([0.55, 0.25, 0.15, 0.05])
    rows = 200_000
    kids = draw_children(q.expand(rows, 4), 3, False, g)
    by_rank = kids[:, :1]
    by_own = kids.gather(1, q[kids].argmax(1, keepdim=True))
    from scipy.stats import chisquare

    for pick, ok in ((by_rank, True), (by_own, False)):
        _, tok = verify_children_batch(p.expand(rows, 4), q.expand(rows, 4), pick, "sequoia", g)
        obs = torch.bincount(tok, minlength=4).double()
        pv = chisquare(obs.numpy(), (p.double() / p.double().sum() * obs.sum()).numpy()).pvalue
        assert (pv > 1e-3) if ok else (pv < 1e-12)


def test_sampling_proposal_carries_the_q_children_were_drawn_from():
    target, draft = pair()
    drafter = DynamicDrafter(draft, budget=8, depth=3, topk=3)
    drafter.start(PROMPT)
    sampling = Sampling(0.8, 0, 1.0, "sequoia", 0)
    committed = PROMPT[0].tolist() + [5]
    prop = drafter.propose(committed, 3, sampling, sampling.generator())
    tree, tokens = prop.tree, prop.tokens.tolist()
    assert prop.q is not None and len(prop.q) == tree.depth
    for v in range(tree.size):
        if not tree.children[v]:
            assert prop.q_row[v] == -1
            continue
        q = prop.q_at(v)
        path = [tokens[u] for u in tree.path_to(v)[1:]]
        with torch.no_grad():
            logits = draft(input_ids=torch.tensor([committed + path])).logits[0, -1]
        assert torch.allclose(q, sampling.probs(logits), atol=1e-5)
        kids = [tokens[c] for c in tree.children[v]]
        assert all(q[k] > 0 for k in kids)
        if sampling.rule == "sequoia":
            assert len(set(kids)) == len(kids)  # drawn without replacement


# ---------------------------------------------------------------------------- specs
def test_specs_build_and_reject_shapes():
    target = models("llama")[0]
    d = build_drafter("dynamic:draft=early-exit:1,budget=5,depth=2,topk=2", target=target)
    assert isinstance(d, DynamicDrafter) and d.shape is None and d.name == "dynamic"
    assert (d.budget, d.depth, d.topk) == (5, 2, 2)
    assert len(d.model.model.layers) == 1
    with pytest.raises(DrafterError) as exc:
        d.reshaped(Tree((-1, 0)))
    assert "chooses its own tree" in one_line(exc)
    ref = generate(target, None, IDS, max_new_tokens=12).tokens
    assert generate(target, d, IDS, max_new_tokens=12).tokens == ref


def test_dynamic_dp_spec_reads_the_calibration(tmp_path):
    target = models("llama")[0]
    path = calibration(True).save(tmp_path / "cal.json")
    d = build_drafter(f"dynamic-dp:draft=early-exit:2,budget=9,profile={path}", target=target)
    assert d.name == "dynamic-dp" and d.calibration is not None
    assert d.verify_ms.shape == (9,) and d.verify_ms[0] == 10.0
    ref = generate(target, None, IDS, max_new_tokens=12).tokens
    assert generate(target, d, IDS, max_new_tokens=12).tokens == ref


@pytest.mark.parametrize("spec,words", [
    ("dynamic:budget=0", "budget must be an integer >= 1"),
    ("dynamic:depth=0", "depth must be an integer >= 1"),
    ("dynamic:topk=0", "topk must be an integer >= 1"),
    ("dynamic:budget=x", "must be of type int"),
    ("dynamic:width=3", "bad option"),
    ("dynamic:profile=a.json", "bad option"),
    ("dynamic:budget=99999", "exceeds the limit"),
    ("dynamic:draft=ngram", "not a draft model"),
    ("dynamic-dp:draft=early-exit:1", "needs profile=PATH"),
    ("dynamic-dp:draft=early-exit:1,profile=MISSING", "no such calibration file"),
    ("dynamic-dp:draft=early-exit:1,profile=PROFILE", "not a calibration"),
])
def test_spec_errors_are_one_line(tmp_path, spec, words):
    target = models("llama")[0]
    profile = tmp_path / "p.json"
    profile.write_text(json.dumps({"format": "treeopt-profile", "version": 1,
                                   "acceptance": {"p": [0.5]}}))
    spec = spec.replace("MISSING", str(tmp_path / "none.json")).replace("PROFILE", str(profile))
    with pytest.raises(DrafterError) as exc:
        build_drafter(spec, target=target)
    assert words in one_line(exc)


def test_shape_and_topk_beyond_vocabulary_are_refused():
    from treeopt.decode.verify import DecodeError

    target = models("llama")[0]
    with pytest.raises(DrafterError) as exc:
        build_drafter("dynamic:draft=early-exit:1", target=target, tree=Tree((-1, 0)))
    assert "drop the @SHAPE" in one_line(exc)
    with pytest.raises(DecodeError) as exc:
        generate(target, build_drafter("dynamic:draft=early-exit:1,topk=65", target=target),
                 IDS, max_new_tokens=4)
    assert "exceeds the vocabulary" in one_line(exc)


# ---------------------------------------------------------------------------- real weights
@pytest.mark.slow
def test_real_smollm2_greedy_equals_plain(tmp_path):
    """SmolLM2-135M-Instruct with its early-exit:4 draft: dynamic and dynamic-dp (calibrated
    here on other Spec-Bench prompts) equal plain greedy decoding on held-out prompts."""
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    from treeopt.api import encode_prompt, load_pair
    from treeopt.datasets import load_prompts, select
    from treeopt.models.loading import ModelError
    from treeopt.profile.calibrate import calibrate_pair

    try:
        pair = load_pair("smollm2", "early-exit:4", device="cpu")
    except ModelError as exc:
        pytest.skip(str(exc))
    drawn = select(load_prompts("spec_bench"), n=5, seed=3, order="draw")
    lat = Latency(LatencyCurve([1, 4, 16, 64], [52.0, 85.0, 111.0, 172.0]),
                  LatencyCurve([1, 4, 16], [13.0, 21.0, 28.0]))
    path = calibrate_pair(pair, drawn[:3], topk=4, max_new_tokens=24,
                          latency=lat).save(tmp_path / "cal.json")
    specs = ["dynamic:draft=early-exit:4,budget=12,depth=4,topk=4",
             f"dynamic-dp:draft=early-exit:4,budget=16,depth=5,topk=4,profile={path}"]
    for p in drawn[3:]:
        ids = encode_prompt(pair.tokenizer, p.text)[:, -256:]
        ref = generate(pair.target, None, ids, max_new_tokens=24).tokens
        for spec in specs:
            drafter = build_drafter(spec, target=pair.target, tokenizer=pair.tokenizer)
            got = generate(pair.target, drafter, ids, max_new_tokens=24)
            assert got.tokens == ref, spec
