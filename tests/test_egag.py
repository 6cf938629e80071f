"""EGAG, entropy-adaptive draft length: chains and trees stop where the draft's entropy is
high, the acceptance average moves the budget, greedy outputs equal plain decoding (tiny
Llama and Qwen2, SmolLM2 in the slow tests), sampling stays lossless (chi-square), and the
options are validated with one-line errors."""

from __future__ import annotations

from functools import lru_cache

import pytest
import torch
from helpers import Sharpened
from lossless import exact_joint, pair_pvalues, peaked_lm

from treeopt.decode.drafter import DrafterError, build_drafter, parse_options
from treeopt.decode.engine import generate
from treeopt.decode.sampling import GREEDY, Sampling
from treeopt.drafters.egag import EgagDrafter, check_gammas, normalised_entropy
from treeopt.shapes import chain, kary
from treeopt.testing import tiny_causal_lm
from treeopt.tree import Tree

REPEAT = [list(range(3, 12)) * 3 + [3, 4], [5, 9, 7, 5, 9, 7, 5, 9, 2, 5, 9]]



@lru_cache(maxsize=None)
def llama():
    return tiny_causal_lm("llama", vocab_size=96, num_layers=3, seed=0)


@lru_cache(maxsize=None)
def qwen():
    return tiny_causal_lm("qwen2", vocab_size=96, num_layers=3, seed=4)


def greedy_chain(model, ids: list[int], n: int) -> list[int]:
    """The model's own greedy continuation (no cache), n tokens."""
    out = []
    with torch.inference_mode():
        for _ in range(n):
            out.append(int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax()))
    return out


# ---------------------------------------------------------------------------- the rule
def test_normalised_entropy_bounds():
    probs = torch.tensor([[1.0, 0, 0, 0], [0.25, 0.25, 0.25, 0.25], [0.5, 0.5, 0, 0]])
    assert normalised_entropy(probs).tolist() == pytest.approx([0.0, 1.0, 0.5])


def test_rule_is_egag_gamma_at_each_position_and_the_average_moves_the_budget():
    d = EgagDrafter(llama(), gamma_min=1, gamma_max=6, ema=0.5)
    assert d.budget == 6  # a = 1 at the start: EGAG's gamma_max
    # floor((1 - h) * 6) >= depth + 1; depth < gamma_min always grows.
    assert d.expands(0, 0.99) and d.expands(3, 1 / 3) and not d.expands(4, 1 / 3 + 1e-6)
    assert d.expands(5, 0.0) and not d.expands(6, 0.0)
    d.observe(0, 6)      # nothing accepted of 6: a = 0.5
    assert d.acceptance == pytest.approx(0.5) and d.budget == pytest.approx(4.0)
    d.observe(3, 3)      # all of a chain of 3: a = 0.75
    assert d.acceptance == pytest.approx(0.75) and d.budget == pytest.approx(5.0)
    d.observe(0, 0)      # a step that drafted nothing says nothing
    assert d.acceptance == pytest.approx(0.75)
    for _ in range(60):
        d.observe(0, 4)
    assert d.budget == pytest.approx(2.0)  # never below gamma_min + 1
    assert d.expands(1, 0.0) and not d.expands(2, 0.0)
    flat = EgagDrafter(llama(), gamma_min=0, gamma_max=4, ema=0.9, threshold=0.3)
    assert flat.expands(0, 0.3) and not flat.expands(0, 0.31) and flat.expands(3, 0.0)


def _propose(drafter, prompt, committed, max_depth=10):
    with torch.inference_mode():
        drafter.start(torch.tensor([prompt]))
        return drafter.propose(committed, max_depth, GREEDY)


def test_chain_stops_after_a_token_whose_draft_entropy_is_high():
    inner = llama()
    prompt = REPEAT[0]
    first = greedy_chain(inner, prompt, 1)[0]
    ref = greedy_chain(inner, prompt + [first], 6)  # the draft's chain after ``first``
    committed = prompt + [first]
    tried = 0
    for stop in (1, 2, 3):
        if ref[stop - 1] in ref[:stop - 1] or ref[stop - 1] == first:
            continue  # the unsure token must first appear at the stop
        tried += 1
        drafter = EgagDrafter(Sharpened(inner, {ref[stop - 1]}), gamma_min=1, gamma_max=6)
        prop = _propose(drafter, prompt, committed)
        assert prop.tree == chain(stop + 1)
        assert prop.tokens.tolist() == [first] + ref[:stop]
        assert prop.forwards == stop + 1  # the stopping node was fed to learn its entropy
    assert tried >= 2
    # Confident everywhere: gamma_max tokens, the last one never fed; the engine's depth
    # limit cuts as well.
    drafter = EgagDrafter(Sharpened(inner), gamma_min=1, gamma_max=5)
    prop = _propose(drafter, prompt, committed)
    assert prop.tokens.tolist() == [first] + ref[:5] and prop.forwards == 5
    assert _propose(drafter, prompt, committed, max_depth=2).tree == chain(3)
    # gamma_min tokens whatever the entropy; 0 allows an empty proposal.
    unsure_all = set(range(96))
    drafter = EgagDrafter(Sharpened(inner, unsure_all), gamma_min=2, gamma_max=5)
    assert _propose(drafter, prompt, committed).tree == chain(3)
    drafter = EgagDrafter(Sharpened(inner, unsure_all), gamma_min=0, gamma_max=5)
    prop = _propose(drafter, prompt, committed)
    assert prop.tree.size == 1 and prop.forwards == 1
    # A low average acceptance shortens the confident chain: a = 0.5 gives G = 4.
    drafter = EgagDrafter(Sharpened(inner), gamma_min=1, gamma_max=6, ema=0.5)
    with torch.inference_mode():
        drafter.start(torch.tensor([prompt]))
        drafter.observe(0, 6)
        assert drafter.propose(committed, 10, GREEDY).tree == chain(5)


def test_tree_branches_stop_separately():
    """kary:2x3: a branch through an unsure token stops there, its sibling goes on."""
    inner = llama()
    prompt = REPEAT[1]
    committed = prompt + greedy_chain(inner, prompt, 1)
    with torch.inference_mode():
        top2 = inner(input_ids=torch.tensor([committed])).logits[0, -1].topk(2).indices.tolist()
    unsure = {top2[0]}
    drafter = EgagDrafter(Sharpened(inner, unsure), kary(2, 3), gamma_min=1, gamma_max=3)
    prop = _propose(drafter, prompt, committed)
    tree, tokens = prop.tree, prop.tokens.tolist()
    assert tokens[1:3] == top2 and tree.children[1] == () and len(tree.children[2]) == 2
    for v in range(1, tree.size):
        grows = tree.depths[v] < 3 and tokens[v] not in unsure
        assert len(tree.children[v]) == (2 if grows else 0)
    assert tree.depth == 3


def test_update_keeps_the_draft_cache_consistent_and_greedy_equals_plain():
    """Hand-made entropies that vary (unsure after a few tokens): shapes vary from step to
    step, and the output is plain greedy decoding's."""
    target = llama()
    draft = Sharpened(tiny_causal_lm("llama", vocab_size=96, num_layers=1, seed=9),
                      unsure=range(0, 96, 3))
    for shape in (None, kary(2, 2)):
        for prompt in REPEAT:
            ids = torch.tensor([prompt])
            ref = generate(target, None, ids, max_new_tokens=30).tokens
            got = generate(target, EgagDrafter(draft, shape, gamma_min=1, gamma_max=4), ids,
                           max_new_tokens=30)
            assert got.tokens == ref
            assert len({s.nodes for s in got.stats.steps}) > 1


# ---------------------------------------------------------------------------- greedy exactness
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("spec", [
    "egag:draft=early-exit:1",
    "egag:draft=early-exit:2,gamma_min=0,gamma_max=4,ema=0.5",
    "egag:draft=early-exit:2,gamma_max=3,tree=kary:2x3,threshold=0.999",
    "egag:draft=early-exit:1,gamma_min=2,tree=(specinfer:3,2,1)",
])
def test_greedy_equals_plain_decoding(arch, spec):
    target = llama() if arch == "llama" else qwen()
    drafter = build_drafter(spec, target=target)
    for prompt in REPEAT:
        ids = torch.tensor([prompt])
        ref = generate(target, None, ids, max_new_tokens=25).tokens
        got = generate(target, drafter, ids, max_new_tokens=25)
        assert got.tokens == ref
        assert got.stats.draft_forwards >= sum(s.nodes > 1 for s in got.stats.steps)


# ---------------------------------------------------------------------------- sampling
V = 8
NEW = 4
PROMPT = torch.tensor([[2, 3, 4, 5, 2, 3]])


@lru_cache(maxsize=None)
def pair():
    return peaked_lm(0, V), peaked_lm(1, V)


@lru_cache(maxsize=None)
def exact(temperature: float) -> torch.Tensor:
    """(V,) * NEW joint probability of the first NEW tokens, by enumeration."""
    return exact_joint(pair()[0], PROMPT, NEW, temperature)


pvalues = pair_pvalues


def run_many(drafter, n: int, temperature: float = 1.0, rule: str = "sequoia"):
    target = pair()[0]
    runs = [generate(target, drafter, PROMPT, max_new_tokens=NEW,
                     sampling=Sampling(temperature, rule=rule, seed=s)) for s in range(n)]
    return torch.tensor([g.tokens for g in runs]), [s.nodes for g in runs for s in g.stats.steps]


@pytest.mark.parametrize("shape,rule", [(None, "sequoia"), (kary(2, 2), "specinfer")])
def test_sampling_with_entropy_stops_is_lossless(shape, rule):
    drafter = EgagDrafter(pair()[1], shape, gamma_min=0, gamma_max=3, ema=0.6, threshold=0.25)
    samples, sizes = run_many(drafter, 300, 1.0, rule)
    assert len(set(sizes)) >= 3  # the shapes really vary (root alone included)
    assert min(pvalues(samples, exact(1.0))) > 1e-3


def test_a_stop_that_peeks_at_the_target_fails_the_same_test():
    """Negative control: the same drafter, but its proposal is kept only where the drafted
    token is the *target's* favourite (information from the verifier). The draft is the
    target itself, so every proposal is accepted: the favourite is produced with
    probability P(a) (2 - P(a)) instead of P(a), and the test sees it."""

    class Peeking(EgagDrafter):
        def propose(self, committed, max_depth, sampling, generator=None):
            prop = super().propose(committed, max_depth, sampling, generator)
            if prop.tree.size > 1:
                with torch.inference_mode():
                    logits = pair()[0](input_ids=torch.tensor([list(committed)])).logits
                if int(prop.tokens[1]) != int(logits[0, -1].argmax()):
                    prop.tree, prop.tokens = Tree((-1,)), prop.tokens[:1]
            return prop

    drafter = Peeking(pair()[0], None, gamma_min=1, gamma_max=1, ema=0.5)
    samples, _ = run_many(drafter, 300, temperature=3.0)
    assert min(pvalues(samples, exact(3.0))) < 1e-6


# ---------------------------------------------------------------------------- validation
@pytest.mark.parametrize("options,words", [
    ("gamma_min=4,gamma_max=2", "gamma_min=4 is above gamma_max=2"),
    ("gamma_min=-1", "gamma_min=-1 must be >= 0"),
    ("gamma_max=0", "gamma_max=0 must be in 1.."),
    ("ema=1", "ema=1.0 must be in (0, 1)"),
    ("ema=0", "ema=0.0 must be in (0, 1)"),
    ("ema=nan", "ema=nan must be in (0, 1)"),
    ("threshold=1.5", "threshold=1.5 must be in (0, 1]"),
    ("gamma_min=x", "gamma_min='x' must be of type int"),
    ("gama_max=3", "bad option 'gama_max=3'"),
    ("draft=ngram", "draft=ngram is not a draft model"),
    ("tree=kary:2", "tree=kary:2"),
    ("tree=(kary:2x2", "unclosed '('"),
])
def test_bad_options_are_one_line_errors(options, words):
    with pytest.raises(DrafterError) as info:
        build_drafter(f"egag:draft=early-exit:1,{options}", target=llama())
    text = str(info.value)
    assert words in text and "\n" not in text


def test_tree_given_twice_is_refused_and_defaults():
    with pytest.raises(DrafterError, match="given twice"):
        build_drafter("egag:draft=early-exit:1,tree=kary:2x2", target=llama(), tree=chain(3))
    d = build_drafter("egag:draft=early-exit:1", target=llama())
    assert (d.gamma_min, d.gamma_max, d.ema, d.threshold) == (1, 6, 0.9, None)
    assert d.shape == chain(7)
    d = build_drafter("egag:draft=early-exit:1,gamma_min=8", target=llama())
    assert d.gamma_max == 8  # the default gamma_max follows a larger gamma_min
    assert build_drafter("egag:draft=early-exit:1", target=llama(), tree=kary(2, 2)).shape \
        == kary(2, 2)
    check_gammas(0, 1, 0.5, 1.0)


def test_parse_options_with_parentheses():
    allowed = {"first": str, "then": str, "k": int}
    assert parse_options("first=(ngram:max=3,k=8),then=early-exit:4", allowed, "fallback") \
        == {"first": "ngram:max=3,k=8", "then": "early-exit:4"}
    assert parse_options("first=((a,b)), k=(3)", allowed, "x") == {"first": "a,b", "k": 3}
    assert parse_options("first=(a)(b)", allowed, "x") == {"first": "(a)(b)"}
    assert parse_options("first=f(a,b),k=2", allowed, "x") == {"first": "f(a,b)", "k": 2}
    assert parse_options("min=1,max=4,k=8", {"min": int, "max": int, "k": int}, "ngram") \
        == {"min": 1, "max": 4, "k": 8}
    for bad in ("first=(a", "first=a)", "first=(a)),k=1"):
        with pytest.raises(DrafterError) as info:
            parse_options(bad, allowed, "x")
        assert "unbalanced" in str(info.value) or "unclosed" in str(info.value)


# ---------------------------------------------------------------------------- real weights
@pytest.mark.slow
def test_smollm2_greedy_equals_plain():
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    from treeopt.api import encode_prompt, load_pair
    from treeopt.datasets import load_prompts
    from treeopt.models.loading import ModelError

    try:
        pair_ = load_pair("smollm2", None, device="cpu")
    except ModelError as exc:
        pytest.skip(str(exc))
    prompts = [encode_prompt(pair_.tokenizer, p.text)[:, -200:]
               for p in load_prompts("spec_bench", n=2, seed=3)]
    for spec in ("egag:draft=early-exit:6,gamma_max=5",
                 "egag:draft=early-exit:6,gamma_max=3,tree=kary:2x3,threshold=0.5"):
        drafter = build_drafter(spec, target=pair_.target)
        for ids in prompts:
            ref = generate(pair_.target, None, ids, max_new_tokens=24).tokens
            assert generate(pair_.target, drafter, ids, max_new_tokens=24).tokens == ref
