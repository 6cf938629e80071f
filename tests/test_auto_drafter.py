"""The ``auto`` drafter: its statistics against hand counts, its per-step length rule against
brute force, greedy output equal to plain decoding whatever it chooses, sampled output
chi-square-lossless (with a negative control that peeks at the target), decisions
deterministic from a given latency cache, and plain decoding where speculation cannot pay."""

import itertools
import json
from dataclasses import replace
from functools import lru_cache

import pytest
import torch
from lossless import exact_joint, pair_pvalues, peaked_lm

from treeopt.decode.drafter import Drafter, DrafterError, Proposal, build_drafter, registered
from treeopt.decode.engine import generate
from treeopt.decode.sampling import Sampling
from treeopt.drafters import auto as auto_mod
from treeopt.drafters.auto import (
    COPY_CANDIDATES,
    STALE,
    STALE_STEPS,
    AutoDrafter,
    MatchStats,
    at_context,
    best_chain,
    bucket,
    candidate_specs,
    chain_expected,
    copy_features,
)
from treeopt.drafters.model import ModelDrafter
from treeopt.models.dtype import interpolate
from treeopt.profile.copytable import CopyTable, Features, cell
from treeopt.shapes import chain, kary
from treeopt.testing import tiny_causal_lm
from treeopt.tree import Tree

FREE = {1: 10.0, 17: 10.0}  # verifying 16 tokens costs what one does
DEAR = {1: 10.0, 2: 100.0, 17: 1000.0}  # any drafted token costs 10x a step
SOFT = {1: 10.0, 2: 11.0, 4: 13.0, 8: 20.0, 16: 40.0}


def copies(target, cap=16):
    return [(n, build_drafter(s, target=target, tree=chain(draft_tokens=cap)))
            for n, s in COPY_CANDIDATES]


@lru_cache(maxsize=None)
def tiny():
    return tiny_causal_lm(vocab_size=16, num_layers=1, seed=3)


PROMPTS = [[3, 4, 5, 6, 7] * 4 + [3, 4], [9, 1, 2, 9, 1, 2, 9, 8, 7, 9, 1], [5] * 12,
           list(range(2, 15)) * 2]


# ---------------------------------------------------------------------------- pieces
def test_buckets():
    assert [bucket(a) for a in (1, 2, 3, 4, 5, 8, 9, 16, 17)] == [0, 1, 2, 2, 3, 3, 4, 4, 5]


@pytest.mark.parametrize("seed", range(4))
def test_rates_equal_the_pooled_counts_summed_afresh(seed):
    """``rate`` reads running sums; they equal the three-level shrinkage computed from the
    per-key counts alone, exactly (the same integers: decisions are unchanged)."""
    import random
    rng = random.Random(seed)
    st = MatchStats()
    keys = [(s, b) for s in (auto_mod.FRESH, auto_mod.MISSED, auto_mod.ON_COPY)
            for b in range(4)]
    for _ in range(300):
        st.add(rng.choice(keys[:rng.randint(1, len(keys))]), rng.randint(1, 6),
               rng.random() < 0.6)

    def pool(ks, d, towards, prior=2.0):
        return (sum(st.hits[k][d] for k in ks) + prior * towards) / \
            (sum(st.tries[k][d] for k in ks) + prior)

    for key in keys:
        for d in range(1, 8):
            pooled = pool(list(st.tries), d, auto_mod.PRIOR_MEAN)
            same = [k for k in st.tries if k[0] == key[0]]
            state = pool(same, d, pooled) if same else pooled
            want = pool([key], d, state) if key in st.tries else state
            assert st.rate(key, d, prior=2.0) == want


def test_depth_statistics_by_hand():
    st = MatchStats()
    on, missed = auto_mod.ON_COPY, auto_mod.MISSED
    assert st.rate((on, 0), 1, prior=2) == auto_mod.PRIOR_MEAN == 0.5  # no evidence: the guess
    # (on a copy, bucket 2): four proposals reached depth 1, three accepted it; two of those
    # reached depth 2 and one accepted it; (on a copy, bucket 0): one proposal, missed at
    # depth 1; (missed, bucket 2): two proposals, both missed at depth 1
    for hit in (True, True, True, False):
        st.add((on, 2), 1, hit)
    st.add((on, 2), 2, True)
    st.add((on, 2), 2, False)
    st.add((on, 0), 1, False)
    st.add((missed, 2), 1, False)
    st.add((missed, 2), 1, False)
    # pooled depth 1: (3 hits + 2 * 0.5) / (7 tries + 2) = 4/9; depth 2: (1 + 1) / (2 + 2)
    pooled1, pooled2 = 4 / 9, 2 / 4
    on1 = (3 + 2 * pooled1) / (5 + 2)  # the state's depth 1 over its two buckets
    on2 = (1 + 2 * pooled2) / (2 + 2)
    missed1 = (0 + 2 * pooled1) / (2 + 2)
    assert st.rate((on, 2), 1, prior=2) == pytest.approx((3 + 2 * on1) / (4 + 2))
    assert st.rate((on, 0), 1, prior=2) == pytest.approx((0 + 2 * on1) / (1 + 2))
    assert st.rate((missed, 2), 1, prior=2) == pytest.approx((0 + 2 * missed1) / (2 + 2))
    assert st.rate((on, 2), 2, prior=2) == pytest.approx((1 + 2 * on2) / (2 + 2))
    assert st.rate((on, 0), 2, prior=2) == pytest.approx(on2)  # never reached depth 2
    assert st.rate((missed, 2), 2, prior=2) == pytest.approx(pooled2)  # state never there
    assert st.rate((on, 2), 3, prior=2) == pytest.approx(0.5)  # nothing at depth 3 anywhere
    assert st.rate((on, 3), 1, prior=2) == pytest.approx(on1)  # an unseen bucket: its state
    assert st.rate((auto_mod.FRESH, 1), 1, prior=2) == pytest.approx(pooled1)  # unseen state
    r1, r2, r3 = st.rate((on, 2), 1, 2), st.rate((on, 2), 2, 2), st.rate((on, 2), 3, 2)
    e = st.expected((on, 2), 3, prior=2)
    assert e == pytest.approx([0, r1, r1 + r1 * r2, r1 + r1 * r2 + r1 * r2 * r3])


class Scripted(Drafter):
    """A copy candidate that proposes the chains it is given, one per step."""

    name = "scripted"
    shape = None

    def __init__(self, chains):
        self.chains = list(chains)

    def start(self, prompt_ids):
        pass

    def propose(self, committed, max_depth, sampling, generator=None):
        tokens = self.chains.pop(0)[:max_depth]
        return Proposal(chain(draft_tokens=len(tokens)), torch.tensor(
            [int(committed[-1])] + tokens), fixed_shape=False)

    def update(self, path, committed, target_topk=None):
        pass


def count_up_step(a, text):
    """One greedy step of ``a`` where the target's text counts up (1, 2, 3, ...): the
    accepted path, then the bonus token. Returns the new text and the key of the proposal
    made at this step's root (None when the candidate offered nothing)."""
    root = len(text) - 1
    prop = a.propose(text, 16, Sampling())
    keys = [p[1] for p in a._pending if p[2] == root]
    drafted = prop.tokens.tolist()[1:]
    ok = 0
    while ok < len(drafted) and drafted[ok] == text[-1] + 1 + ok:
        ok += 1
    new = text + [text[-1] + 1 + j for j in range(ok + 1)]
    a.update(list(range(ok + 1)), new)
    return new, (keys[0] if keys else None)


def test_the_state_is_what_the_previous_proposal_says_of_the_text():
    a = AutoDrafter([("c", Scripted([[2, 3, 9], [], [6, 7], [9, 10, 99], [12]]))], FREE)
    text, keys = [1], []
    for _ in range(5):
        text, key = count_up_step(a, text)
        keys.append(key)
    assert text == list(range(1, 14))
    assert keys == [(auto_mod.FRESH, bucket(3)),  # the request's first step
                    None,  # offered nothing
                    (auto_mod.FRESH, bucket(2)),  # the step before offered nothing
                    (auto_mod.ON_COPY, bucket(3)),  # [6, 7] matched 6 and 7
                    (auto_mod.MISSED, bucket(1))]  # [9, 10, 99] missed at 11
    assert a.stats["c"].tries[(auto_mod.ON_COPY, bucket(3))][1:4] == [1, 1, 1]
    assert a.stats["c"].hits[(auto_mod.ON_COPY, bucket(3))][1:4] == [1, 1, 0]
    a.start(torch.tensor([[1]]))
    assert a._state("c", text) == auto_mod.FRESH  # a new request starts afresh


class Featured(Scripted):
    """A scripted candidate that reports its tokens' copy features, as ``suffix`` does: the
    d-th drafted token matched d + 2 tokens, estimated probability 0.8, rank 1."""

    name = "featured"

    def propose(self, committed, max_depth, sampling, generator=None):
        prop = super().propose(committed, max_depth, sampling, generator)
        n = prop.tree.size
        self.last_draft = (list(prop.tree.parents),
                           [None] + [Features(1, d + 2, 0.8) for d in range(1, n)])
        return prop


def test_copy_features_only_of_the_chain_just_proposed():
    c = Featured([[4, 5, 6]])
    assert copy_features(c, 3) is None  # nothing proposed yet
    c.propose([1, 2, 3], 16, Sampling())
    assert copy_features(c, 3) == [Features(1, 3, 0.8), Features(1, 4, 0.8),
                                   Features(1, 5, 0.8)]
    assert copy_features(c, 2) is None  # not the proposal offered
    c.last_draft = ([-1, 0, 0, 1], [None] * 1 + [Features(1, 3, 0.8)] * 3)
    assert copy_features(c, 3) is None  # a tree, not a chain
    assert copy_features(Scripted([[1]]), 1) is None  # reports none


def test_a_featured_candidate_counts_each_token_in_its_cell_and_is_not_scaled():
    """Counts by hand: the text counts up; [2, 3, 9] hits depths 1 and 2 and misses 3;
    [5, 6] then hits both. No (state, bucket) counts and no winner's scale for it: what it
    was expected to deliver is the table's chain estimate itself."""
    a = AutoDrafter([("c", Featured([[2, 3, 9], [5, 6]]))], FREE)
    text = [1]
    text, _ = count_up_step(a, text)
    f = [Features(1, d + 2, 0.8) for d in range(1, 4)]
    after_one = CopyTable()  # the counts of step 1, by hand
    for key, hit in (((1, 4, 3, 1), True), ((1, 4, 4, 2), True), ((1, 4, 4, 3), False)):
        after_one.add(key, hit)
    assert (a.tables["c"].trials == after_one.trials).all()
    assert (a.tables["c"].accepted == after_one.accepted).all()
    assert a.calibration("c") != 1.0  # 2 tokens accepted of 7/8 expected...
    text, _ = count_up_step(a, text)
    assert text == list(range(1, 8))
    # ...yet step 2's 2 tokens were expected as the table said, unscaled
    assert a.realized["c"] == [4.0, pytest.approx(0.875 + chain_expected(after_one, f[:2])[2])]
    assert chain_expected(after_one, f[:2])[1] == after_one.rate(cell(f[0], 1))
    t = a.tables["c"]  # depth d's cell: match d + 2 (buckets 3 -> 3; 4, 5 -> 4)
    assert [(int(t.trials[0, 4, m, d - 1]), int(t.accepted[0, 4, m, d - 1]))
            for d, m in ((1, 3), (2, 4), (3, 4))] == [(2, 2), (2, 2), (1, 0)]
    assert int(t.trials.sum()) == 5 and a.stats["c"].tries == {}


def test_a_featured_candidate_drafts_where_its_cells_say_copies_are_accepted():
    """Verifying 2 tokens costs 1.6 times one: with nothing known (a(cell) = 1/2) a 1-token
    draft does not pay; with its cell's count saying 0.98, it does."""
    dear = {1: 10.0, 2: 16.0, 17: 16.0}
    fresh = AutoDrafter([("c", Featured([[2]]))], dear, max_draft=1)
    assert fresh.propose([1], 16, Sampling()).tree.size == 1
    known = AutoDrafter([("c", Featured([[2]]))], dear, max_draft=1)
    known.tables["c"] = CopyTable()
    for _ in range(400):
        known.tables["c"].add((1, 4, 3, 1), True)
    known.realized["c"] = [0.0, 100.0]  # a record that would scale MatchStats' estimates
    assert known.calibration("c") < 0.05  # to nothing does not scale the table's
    assert known.propose([1], 16, Sampling()).tree.size == 2


def test_a_candidate_that_delivers_less_than_expected_is_scaled_down():
    a = AutoDrafter([("c", Scripted([[5, 6, 7, 8]] * 3))], FREE)
    assert a.calibration("c") == 1.0  # no steps of its own yet
    text = [1]
    for _ in range(3):
        text, _ = count_up_step(a, text)  # the target disagrees with every drafted token
    assert a.steps == {"c": 3}  # verification is free: it drafts all 4 tokens each time
    got, expected = a.realized["c"]
    # by hand (prior 2): step 1 knows nothing, rates 1/2: 1/2 + 1/4 + 1/8 + 1/16; step 2
    # (missed) has depth 1 at the pool (0 + 1) / (1 + 2) = 1/3, deeper at 1/2; step 3 has
    # the pool (0 + 1) / (2 + 2) = 1/4, the missed state (0 + 2/4) / (1 + 2) = 1/6, the
    # key (0 + 2/6) / (1 + 2) = 1/9
    want = 0.9375 + (1 / 3) * 1.875 + (1 / 9) * 1.875
    assert got == 0 and expected == pytest.approx(want)
    assert a.calibration("c") == pytest.approx(4.0 / (want + 4.0))


def test_envelope_never_prices_a_dip_below_a_smaller_size():
    # the measured SmolLM2 bfloat16 curve of the development machine: 3 tokens "cheaper"
    # than 1, 16 cheaper than 12
    curve = {1: 68.8, 2: 68.9, 3: 67.9, 4: 72.6, 12: 96.0, 16: 92.1}
    env = auto_mod.envelope(curve)
    assert env == {1: 68.8, 2: 68.9, 3: 68.9, 4: 72.6, 12: 96.0, 16: 96.0}
    # with no evidence of acceptance, nothing is drafted however the curve dips
    a = AutoDrafter([], {1: 10.0, 3: 9.0, 5: 12.0})
    assert best_chain([0.0, 0.0, 0.0], 2, a.curve)[0] == 0


def test_best_chain_hand_case():
    curve = {1: 10.0, 2: 11.0, 3: 30.0}
    # plain 1/10; k=1: 1.8/11 = .1636; k=2: 2.0/30 = .0667
    assert best_chain([0, 0.8, 1.0], 2, curve) == (1, pytest.approx(1.8 / 11))
    assert best_chain([0, 0.05, 0.06], 2, curve)[0] == 0  # 1.05/11 < 1/10: plain


@pytest.mark.parametrize("seed", range(20))
def test_best_chain_against_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 7, (1,), generator=g))
    rates = torch.rand(n, generator=g).tolist()
    exp = [0.0]
    p = 1.0
    for r in rates:
        p *= r
        exp.append(exp[-1] + p)
    times = sorted((torch.rand(n + 1, generator=g) * 50 + 5).tolist())
    curve = {i + 1: t for i, t in enumerate(times)}
    extra = float(torch.rand(1, generator=g)) * 3
    k, rate = best_chain(exp, n, curve, lambda k: k * extra)
    every = [(1 / curve[1], 0)] + [((1 + exp[j]) / (curve[j + 1] + j * extra), j)
                                   for j in range(1, n + 1)]
    best = max(r for r, _ in every)
    assert rate == pytest.approx(best)
    assert k == min(j for r, j in every if r >= best - 1e-12)


# ---------------------------------------------------------------------------- greedy
@pytest.mark.parametrize("curve", [FREE, SOFT, DEAR])
def test_greedy_output_equals_plain_decoding(curve):
    target = tiny()
    a = AutoDrafter(copies(target), curve)
    for p in PROMPTS + PROMPTS:  # the second round drafts with what the first taught it
        ids = torch.tensor([p])
        for new in (1, 7, 40):
            ref = generate(target, None, ids, max_new_tokens=new).tokens
            got = generate(target, a, ids, max_new_tokens=new)
            assert got.tokens == ref
            assert got.stats.choice.startswith("auto: ")
    if curve is DEAR:
        assert a.run_steps.keys() == {"plain"}  # never pays: never drafts
    if curve is FREE:
        assert set(a.run_steps) - {"plain"}  # free verification: it drafts


def test_curves_at_a_context_by_hand():
    short = {1: 100.0, 2: 110.0, 16: 150.0}
    long = {1: 110.0, 2: 140.0, 16: 250.0}
    contexts = (128, 1024)
    assert at_context(short, long, contexts, 64) == short  # below the short context
    assert at_context(short, long, contexts, 128) == short
    assert at_context(short, long, contexts, 576) == {1: 105.0, 2: 125.0, 16: 200.0}  # halfway
    assert at_context(short, long, contexts, 1920) == {1: 120.0, 2: 170.0, 16: 350.0}  # beyond
    assert at_context(short, None, contexts, 4096) == short
    # a size timed cheaper after the long context than after the short one: noise, not cheaper
    assert at_context(short, {1: 90.0, 2: 140.0, 16: 250.0}, contexts, 1024)[1] == 100.0
    # sizes the long curve lacks are read from it by interpolation
    assert at_context({1: 10.0, 8: 20.0}, {1: 10.0, 16: 50.0}, contexts, 1024)[8] == \
        pytest.approx(10.0 + 40.0 * 7 / 15)


def test_steps_are_priced_at_their_context():
    """Verification that is free after a short context and dear after a long one: ``auto``
    drafts on a short prompt and stays plain on a long one, output equal to plain decoding
    either way."""
    target = tiny()
    a = AutoDrafter(copies(target), FREE, long_curve=DEAR, contexts=(128, 496))
    assert a.curve_at(100) == a.curve and a.curve_at(496)[2] == pytest.approx(100.0)
    assert a.curve_at(312)[2] == pytest.approx(55.0)  # halfway (at the sizes of both curves)
    short, long = PROMPTS[0], PROMPTS[0] * 20  # 22 and 440 tokens, both repeating
    for prompt, drafts in ((short, True), (long, False)):
        ids = torch.tensor([prompt])
        ref = generate(target, None, ids, max_new_tokens=30).tokens
        got = generate(target, a, ids, max_new_tokens=30)
        assert got.tokens == ref
        assert (set(a.steps) != {"plain"}) == drafts, (len(prompt), a.steps)


def test_greedy_with_a_draft_model_and_eos():
    target = tiny()
    draft = tiny_causal_lm(vocab_size=16, num_layers=1, seed=4)
    for explore in (3, 10 ** 6):
        a = AutoDrafter(copies(target), SOFT, model=ModelDrafter(draft, chain(9)),
                        draft_curve={1: 1.0}, explore=explore)
        for p in PROMPTS:
            ids = torch.tensor([p])
            ref = generate(target, None, ids, max_new_tokens=30, eos_token_id=[4, 7]).tokens
            got = generate(target, a, ids, max_new_tokens=30, eos_token_id=[4, 7])
            assert got.tokens == ref
        assert a.run_steps.get("model", 0) >= min(explore, 3)


def test_decisions_are_deterministic_from_the_same_curves():
    target = tiny()
    runs = []
    for _ in range(2):
        a = AutoDrafter(copies(target), SOFT)
        steps = []
        for p in PROMPTS * 2:
            g = generate(target, a, torch.tensor([p]), max_new_tokens=40)
            steps.append(([s.nodes for s in g.stats.steps], g.stats.choice))
        runs.append(steps)
    assert runs[0] == runs[1]
    assert any(n > 1 for nodes, _ in runs[0] for n in nodes)


def test_a_fork_decodes_the_next_prompt_as_the_drafter_itself_would():
    """``forked`` after a generation: the fork has the statistics and every copy's global
    trie as the drafter will have them at its next request (the last output included, which
    a suffix drafter adds only when the next request starts), so eval's repeated runs of a
    prompt all decode alike; what the fork decodes never reaches the drafter."""
    target = tiny()
    a = AutoDrafter(copies(target) + [("suffix", build_drafter("suffix", target=target,
                                                               tree=chain(draft_tokens=16)))],
                    SOFT)
    for p in PROMPTS[:2]:
        generate(target, a, torch.tensor([p]), max_new_tokens=40)
    nxt = torch.tensor([PROMPTS[0][:7]])
    twin, snap = a.forked(), a.forked()
    got = generate(target, twin, nxt, max_new_tokens=40)
    generate(target, twin, nxt, max_new_tokens=40)  # the twin learns; a must not
    want = generate(target, a, nxt, max_new_tokens=40)
    assert [s.nodes for s in got.stats.steps] == [s.nodes for s in want.stats.steps]
    assert got.stats.choice == want.stats.choice
    tries = [(d.cache, f.cache) for (_, d), (_, f) in zip(a.copies, snap.copies)
             if getattr(d, "cache", None) is not None]
    assert tries and all(list(x.docs) == list(y.docs) and len(x.docs) == 2
                         for x, y in tries)  # both outputs: the second one's was pending


def test_the_factory_measures_once_and_decides_alike_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TREEOPT_CACHE", str(tmp_path))
    target = tiny()
    calls = []
    real = auto_mod.latency_curve

    def counting(model, folder, **kw):
        calls.append(folder)
        return real(model, folder, **kw)

    monkeypatch.setattr(auto_mod, "latency_curve", counting)
    a = build_drafter("auto", target=target)
    assert len(calls) == 2  # after CONTEXT and after LONG_CONTEXT (the tiny window's end)
    files = {("context" in json.loads(p.read_text())["identity"]): p
             for p in (tmp_path / "latency").glob("*.json")}
    # hand-written curves in the cache decide for both drafters built from them
    for long, path in files.items():
        data = json.loads(path.read_text())
        data["ms"] = {str(k): v * (1.5 if long else 1.0) for k, v in SOFT.items()}
        path.write_text(json.dumps(data))
    first, second = build_drafter("auto", target=target), build_drafter("auto", target=target)
    assert first.curve == second.curve == SOFT and a.curve != SOFT
    assert first.long_curve == second.long_curve == {k: 1.5 * v for k, v in SOFT.items()}
    assert first.contexts == (128, 512 - 16)  # the long curve: at the tiny window's end
    out = []
    for d in (first, second):
        out.append([[s.nodes for s in generate(target, d, torch.tensor([p]),
                                               max_new_tokens=30).stats.steps]
                    for p in PROMPTS * 2])
    assert out[0] == out[1]
    assert len(list((tmp_path / "latency").glob("*.json"))) == 2


# ---------------------------------------------------------------------------- options
def test_registered_and_candidates_follow_the_registry(monkeypatch):
    assert "auto" in registered()
    names = [n for n, _ in candidate_specs()]
    assert names[:3] == ["ngram", "ngram2", "ngram3"]
    monkeypatch.setitem(auto_mod.registered.__globals__["_REGISTRY"], "suffix", object())
    assert [n for n, _ in candidate_specs()][-1] == "suffix"


@pytest.mark.parametrize("options,words", [("max=0", "max must be in 1..16"),
                                           ("max=17", "max must be in 1..16"),
                                           ("margin=2", "margin must be in [0, 1]"),
                                           ("draft=ngram", "is not a draft model"),
                                           ("depth=3", "bad option 'depth=3'")])
def test_bad_options_are_one_line_errors(options, words, tmp_path, monkeypatch):
    monkeypatch.setenv("TREEOPT_CACHE", str(tmp_path))
    with pytest.raises(DrafterError, match=words.replace("[", r"\[").replace("]", r"\]")
                       .replace(".", r"\.")):
        build_drafter(f"auto:{options}", target=tiny())


def test_reshaped_caps_chains_and_refuses_trees():
    a = AutoDrafter(copies(tiny()), FREE)
    b = a.reshaped(chain(5))
    assert b.max_draft == 4 and b.stats is not a.stats
    with pytest.raises(DrafterError, match="drafts chains"):
        a.reshaped(kary(2, 2))
    target = tiny()
    for p in PROMPTS:
        g = generate(target, b, torch.tensor([p]), max_new_tokens=30)
        assert max(s.depth for s in g.stats.steps) <= 4


# ---------------------------------------------------------------------------- sampling
V, NEW = 8, 4
PROMPT = torch.tensor([[2, 3, 4, 5, 2, 3, 4, 5, 2, 3]])


@lru_cache(maxsize=None)
def sampling_pair():
    return peaked_lm(0, V), peaked_lm(1, V)


@lru_cache(maxsize=None)
def exact(temperature: float):
    return exact_joint(sampling_pair()[0], PROMPT, NEW, temperature)


def run_many(drafter, n, temperature=1.0, rule="sequoia"):
    target = sampling_pair()[0]
    runs = [generate(target, drafter, PROMPT, max_new_tokens=NEW,
                     sampling=Sampling(temperature, rule=rule, seed=s)) for s in range(n)]
    return torch.tensor([g.tokens for g in runs]), [s.nodes for g in runs
                                                    for s in g.stats.steps]


@pytest.mark.parametrize("with_model,rule", [(False, "sequoia"), (True, "sequoia"),
                                             (True, "specinfer")])
def test_sampling_is_lossless(with_model, rule):
    target, draft = sampling_pair()
    model = ModelDrafter(draft, chain(9)) if with_model else None
    a = AutoDrafter(copies(target), FREE, model=model, draft_curve={1: 0.1},
                    explore=10 ** 6 if with_model else 8)
    samples, sizes = run_many(a, 300, 1.0, rule)
    assert len(set(sizes)) >= 2  # it drafts on some steps and not on others
    assert min(pair_pvalues(samples, exact(1.0))) > 1e-3


def test_a_choice_that_peeks_at_the_target_fails_the_same_test():
    """Negative control: drafting only where the first drafted token is the target's argmax
    (information from the verifier) biases the output towards that token; the test sees it."""
    target = sampling_pair()[0]

    class Peeking(AutoDrafter):
        def propose(self, committed, max_depth, sampling, generator=None):
            prop = super().propose(committed, max_depth, sampling, generator)
            if prop.tree.size > 1:
                with torch.inference_mode():
                    best = int(target(input_ids=torch.tensor([list(committed)])).logits[0, -1]
                               .argmax())
                if int(prop.tokens[1]) != best:
                    prop = Proposal(Tree((-1,)), prop.tokens[:1])
                    self._used = None
            return prop

    from treeopt.decode.drafter import Proposal

    a = Peeking(copies(target), FREE, model=ModelDrafter(target, chain(2)),
                draft_curve={1: 0.1}, explore=10 ** 6, max_draft=1)
    samples, _ = run_many(a, 300, temperature=3.0)
    assert min(pair_pvalues(samples, exact(3.0))) < 1e-6


def test_interpolated_costs_are_what_the_rule_reads():
    assert interpolate(SOFT, 3) == 12.0 and interpolate(SOFT, 17) == pytest.approx(42.5)
    assert list(itertools.islice(iter(SOFT), 1)) == [1]


def test_a_cached_tune_result_replaces_exploration(tmp_path):
    """The tune result for (target, draft, machine, dtype) is read back exactly; a damaged or
    foreign one is ignored; with one, the draft model's acceptance starts from it."""
    from types import SimpleNamespace

    target = tiny()
    pred = SimpleNamespace(speedup=1.4)
    auto_mod.remember_tune(target, "early-exit:1", [[0.9, 0.05], [0.6, 0.1]], pred, chain(3),
                           tmp_path)
    got = auto_mod.read_tuned(target, "early-exit:1", tmp_path)
    assert got == {"p1_by_depth": [0.9, 0.6], "predicted_speedup": 1.4}
    assert auto_mod.read_tuned(target, "early-exit:2", tmp_path) is None
    (path,) = (tmp_path / "tuned").glob("*.json")
    data = json.loads(path.read_text())
    data["p1_by_depth"] = [1.5]
    path.write_text(json.dumps(data))
    assert auto_mod.read_tuned(target, "early-exit:1", tmp_path) is None
    a = AutoDrafter(copies(target), SOFT, model=ModelDrafter(tiny(), chain(9)),
                    draft_curve={1: 1.0}, model_prior=[0.9, 0.6])
    assert a.explore == 0
    k, rate = a._model_rate(3, a.curve)
    # rates 0.9, 0.6, 0.6 (the last depth repeats): E = .9, .9 + .54, .9 + .54 + .324
    exp = [0, 0.9, 1.44, 1.764]
    assert (k, rate) == best_chain(exp, 3, SOFT, lambda k: k * 1.0)
    # chains 2 deep accepted every time (8 tries at depths 1 and 2, prior weight 8): depth 3,
    # never reached, keeps depth 2's ratio to the prior, (8 + 8 * .6) / 16 / .6, not .6
    assert a.prior_weight == 8
    a.model_tries[1:3], a.model_hits[1:3] = [8, 8], [8, 8]
    r1, r2 = (8 + 7.2) / 16, (8 + 4.8) / 16
    r3 = min(1.0, 0.6 * r2 / 0.6)
    exp = [0, r1, r1 + r1 * r2, r1 + r1 * r2 + r1 * r2 * r3]
    assert a._model_rate(3, a.curve) == best_chain(exp, 3, SOFT, lambda k: k * 1.0)


def test_a_draft_model_that_cannot_pay_never_runs_its_prefill():
    """With a tune prior under which no chain of the model beats plain decoding by the
    margin, no step would choose the model (its statistics change on its own steps only):
    ``auto`` drops it before its prefill, decoding as before; a prior that pays keeps it."""
    target = tiny()
    starts = []

    class Counting(ModelDrafter):
        def start(self, prompt_ids):
            starts.append(len(prompt_ids[0]))
            super().start(prompt_ids)

    # SOFT: T(1) = 10, T(2) = 11, T(3) = 12 ms; a draft level 1 ms. p1 = 0.1 everywhere:
    # a 1-chain (1 + .1) / 12 = 0.092, a 2-chain (1 + .1 + .01) / 14 = 0.079 < 1.03 / 10
    for prior, pays in (([0.1], False), ([0.9, 0.9], True)):
        starts.clear()
        a = AutoDrafter(copies(target), SOFT, model=Counting(tiny_causal_lm(
            vocab_size=16, num_layers=1, seed=4), chain(9)), draft_curve={1: 1.0},
            model_prior=prior)
        assert a._model_pays() is pays
        for p in PROMPTS[:2]:
            ids = torch.tensor([p])
            ref = generate(target, None, ids, max_new_tokens=20).tokens
            assert generate(target, a, ids, max_new_tokens=20).tokens == ref
        assert a.model_dropped is not pays and ("dropped" in a.choice()) is not pays
        assert starts == ([len(p) for p in PROMPTS[:2]] if pays else [])
        assert (a.run_steps.get("model", 0) > 0) is pays


def test_the_suffix_candidate_starts_from_a_cached_tune_copy_table(tmp_path, monkeypatch):
    """A copy table cached for (target, drafter name, machine, dtype) reads back exactly; a
    damaged, foreign or oversized file reads as nothing. ``auto`` built from the cache starts
    its suffix candidate's counts there (a copy: the cached table is not counted into) and
    says so; where verifying 2 tokens costs 1.6 times one, a table whose cells say copies
    are accepted makes it draft from the very first step (from nothing, one half per cell,
    it does not), greedy-exact. A private copy for a replay starts from nothing (a tune's
    table was measured on the prompts it replays)."""
    from treeopt.profile.replay import private

    monkeypatch.setenv("TREEOPT_CACHE", str(tmp_path))
    target = tiny()
    table = CopyTable()
    table.trials[0], table.accepted[0] = 50, 50  # every rank-1 cell: 50 of 50 accepted
    path = auto_mod.remember_copy_table(target, "suffix", table, tmp_path)
    got = auto_mod.read_copy_table(target, "suffix", tmp_path)
    assert (got.trials == table.trials).all() and (got.accepted == table.accepted).all()
    assert auto_mod.read_copy_table(target, "ngram", tmp_path) is None
    assert auto_mod.read_copy_table(tiny_causal_lm(vocab_size=16, num_layers=2, seed=3),
                                    "suffix", tmp_path) is None  # another target
    built = build_drafter("auto", target=target)
    assert built.tables["suffix"] is not built.start_tables["suffix"]
    assert (built.tables["suffix"].trials == table.trials).all()
    assert set(built.tables) == {"suffix"}
    ids = torch.tensor([PROMPTS[0]])
    assert generate(target, built, ids, max_new_tokens=20).tokens == \
        generate(target, None, ids, max_new_tokens=20).tokens
    assert f"suffix from tune's copy table ({7 * 12 * 64 * 50} trials)" in built.choice()
    assert (auto_mod.read_copy_table(target, "suffix", tmp_path).trials == 50 * (
        table.trials > 0)).all()  # the cache itself never counted into
    assert (built.reshaped(None).tables["suffix"].trials == table.trials).all()
    mine = private(built)
    assert mine.tables == {} and mine.start_tables == {}
    dear = {1: 10.0, 2: 16.0, 17: 160.0}

    def first_step(tables):
        a = AutoDrafter([("suffix", build_drafter("suffix", target=target, tree=chain(16)))],
                        dear, tables=tables)
        a.start(ids)
        return a.propose(PROMPTS[0], 16, Sampling()).tree.size

    assert first_step(None) == 1 and first_step({"suffix": table}) > 1
    monkeypatch.setattr(auto_mod, "MAX_TABLE_BYTES", 100)
    assert auto_mod.read_copy_table(target, "suffix", tmp_path) is None
    monkeypatch.undo()
    path.write_text(path.read_text()[:-40])
    assert auto_mod.read_copy_table(target, "suffix", tmp_path) is None
    data = json.loads(json.dumps({"version": 1, "identity": {}, "copy": table.to_dict()}))
    path.write_text(json.dumps(data))
    assert auto_mod.read_copy_table(target, "suffix", tmp_path) is None


def test_a_corpus_candidate_drafts_what_the_text_so_far_does_not_hold(tmp_path, monkeypatch):
    """``auto:datastore=PATH`` adds the corpus as one more copy candidate: on a prompt whose
    continuation the corpus holds (the target's own, from another run) and the prompt does
    not, it drafts from the corpus, accepts more tokens per step than ``auto`` without it
    and decodes greedy-exact; the store is loaded once and shared by reshaped and forked
    copies and by a replay's private one; a missing file or an empty path is a one-line
    error."""
    from treeopt.drafters.datastore import Datastore
    from treeopt.errors import TreeoptError
    from treeopt.profile.replay import private

    monkeypatch.setenv("TREEOPT_CACHE", str(tmp_path))
    target = tiny()
    prompt = list(range(2, 15))  # no token repeats: the copy candidates find nothing in it
    ref = generate(target, None, torch.tensor([prompt]), max_new_tokens=30).tokens
    store = Datastore.from_token_lists([prompt + ref, [1, 1, 2]], max_n=4)
    path = store.save(tmp_path / "store.npz")
    built = build_drafter(f"auto:datastore={path}", target=target)
    names = [n for n, _ in built.copies]
    assert names[-1] == auto_mod.DATASTORE and names[:-1] == [n for n, _ in candidate_specs()]
    corpus = dict(built.copies)["datastore"]
    assert corpus.shape == chain(draft_tokens=16)
    for other in (built.reshaped(chain(5)), built.forked(), private(built)):
        assert dict(other.copies)["datastore"].store is corpus.store
    assert dict(built.reshaped(chain(5)).copies)["datastore"].shape == chain(draft_tokens=4)

    def decode(drafter):
        a = AutoDrafter(copies(target) + drafter, FREE)
        out = generate(target, a, torch.tensor([prompt]), max_new_tokens=30)
        assert out.tokens == ref
        return a, out.stats.tokens_per_step

    with_corpus, rate = decode([("datastore", corpus.reshaped(chain(draft_tokens=16)))])
    without, rate0 = decode([])
    assert with_corpus.steps.get("datastore", 0) > 0 and "datastore" in with_corpus.choice()
    assert rate > rate0
    with pytest.raises(TreeoptError, match="missing.npz"):
        build_drafter(f"auto:datastore={tmp_path / 'missing.npz'}", target=target)
    with pytest.raises(DrafterError, match="datastore= needs a file"):
        build_drafter("auto:datastore=", target=target)


def test_tune_of_a_pair_remembers_its_draft_for_auto(tmp_path):
    """``tune`` given a Pair (as bench_choice calls it) caches the draft's acceptance under
    the pair's draft spec, as it does for a spec, so ``auto:draft=SPEC`` starts from it
    (bench_choice's auto started from one half per level); plain decoding caches nothing."""
    from types import SimpleNamespace
    from unittest import mock

    from treeopt.api import Pair
    from treeopt.tuning import remember_for_auto

    target = tiny()
    pair = Pair(target, None, None, "tiny", "early-exit:1", None)
    pred = SimpleNamespace(speedup=1.3)
    with mock.patch("treeopt.tuning.cache_dir", return_value=tmp_path):
        assert remember_for_auto(pair, None, [[0.8], [0.7]], pred, chain(1)) is None
        assert auto_mod.read_tuned(target, "early-exit:1", tmp_path) is None
        assert remember_for_auto(pair, None, [[0.8], [0.7]], pred, chain(3)) is not None
        assert remember_for_auto(replace(pair, draft_spec=None), "ngram", [[0.5]], pred,
                                 chain(3)) is not None
    got = auto_mod.read_tuned(target, "early-exit:1", tmp_path)
    assert got == {"p1_by_depth": [0.8, 0.7], "predicted_speedup": 1.3}
    assert auto_mod.read_tuned(target, "ngram", tmp_path)["p1_by_depth"] == [0.5]


# ---------------------------------------------------------------------------- stale curves
def test_stale_needs_enough_steps_far_off_either_way():
    a = AutoDrafter(copies(tiny()), SOFT)
    cases = [([100.0, 10.0, STALE_STEPS - 1], None),  # too few steps
             ([19.0, 10.0, STALE_STEPS], None), ([5.5, 10.0, STALE_STEPS], None),
             ([21.0, 10.0, STALE_STEPS], 2.1), ([4.0, 10.0, STALE_STEPS], 0.4)]
    for timed, want in cases:
        a.timed = timed
        got = a.stale()
        assert got == pytest.approx(want) if want is not None else got is None, timed


def test_decoding_far_off_the_cached_curve_says_so_and_decides_alike():
    target = tiny()
    slow = {n: 1000.0 * ms for n, ms in SOFT.items()}  # a curve 1000x what tiny steps take
    steps, lines = [], []
    for _ in range(2):
        a = AutoDrafter(copies(target), slow)
        gens = [generate(target, a, torch.tensor([p]), max_new_tokens=30) for p in PROMPTS]
        steps.append([[s.nodes for s in g.stats.steps] for g in gens])
        lines.append(gens[-1].stats.choice)
        assert a.timed[2] == sum(len(g.stats.steps) for g in gens) >= STALE_STEPS
        assert a.stale() is not None and a.stale() < 1.0 / STALE
    assert steps[0] == steps[1]  # the timing never changes a decision
    assert all("--remeasure" in line for line in lines)
    # a fork carries the run's timing on
    assert a.forked().timed == a.timed
