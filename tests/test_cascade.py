"""Cascades (CS-Drafting): fallback, horizontal and vertical drafters built from others.
Greedy outputs equal plain decoding (tiny Llama and Qwen2), the model drafter's cache stays
right when other drafters draft some steps, the vertical cascade reproduces the draft's own
chain in fewer draft forwards, sampling stays lossless (chi-square) and bad specs are
one-line errors."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest
import torch
from lossless import exact_joint, pair_pvalues, peaked_lm

from treeopt.decode.drafter import DrafterError, build_drafter
from treeopt.decode.engine import generate
from treeopt.decode.sampling import GREEDY, Sampling
from treeopt.drafters.cascade import FallbackDrafter, HorizontalDrafter, VerticalDrafter
from treeopt.drafters.datastore import BigramDrafter
from treeopt.drafters.model import ModelDrafter
from treeopt.drafters.ngram import NgramDrafter
from treeopt.models.loading import early_exit_draft
from treeopt.shapes import chain, kary
from treeopt.testing import tiny_causal_lm

REPEAT = [list(range(3, 12)) * 3 + [3, 4], [5, 9, 7, 5, 9, 7, 5, 9, 2, 5, 9, 7, 5]]


@lru_cache(maxsize=None)
def model(arch: str = "llama", layers: int = 3, seed: int = 0):
    return tiny_causal_lm(arch, vocab_size=96, num_layers=layers, seed=seed)


def greedy_chain(m, ids: list[int], n: int) -> list[int]:
    """The model's own greedy continuation computed from scratch (no cache)."""
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(n):
            out.append(int(m(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax()))
    return out


# ---------------------------------------------------------------------------- greedy
SPECS = [
    "fallback:first=(ngram:max=3,k=2),then=early-exit:1",
    "fallback:first=ngram,then=(egag:draft=early-exit:2,gamma_max=3)",
    "horizontal:model=early-exit:2,levels=2,deep=ngram",
    "horizontal:model=(egag:draft=early-exit:1,threshold=1),levels=3,deep=(ngram:max=2)",
    "vertical:draft=early-exit:2,helper=ngram",
    "fallback:first=(vertical:draft=early-exit:1,helper=(ngram:max=3)),then=ngram",
]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("spec", SPECS)
def test_greedy_equals_plain_decoding(arch, spec):
    target = model(arch, 3, 0 if arch == "llama" else 4)
    for tree in (None, kary(2, 3)) if spec.startswith("horizontal") else (None,):
        drafter = build_drafter(spec, target=target, tree=tree)
        for prompt in REPEAT:
            ids = torch.tensor([prompt])
            ref = generate(target, None, ids, max_new_tokens=30).tokens
            got = generate(target, drafter, ids, max_new_tokens=30)
            assert got.tokens == ref, (spec, tree)


def test_fallback_uses_both_and_the_model_cache_survives_skipped_steps():
    """Steps drafted by the n-gram index leave the model drafter's cache behind; every
    proposal it makes later is still the draft model's own greedy chain, computed here
    from scratch."""
    target, draft = model(), model("llama", 1, 7)
    seen: list[tuple[list[int], list[int]]] = []

    class Spy(ModelDrafter):
        def propose(self, committed, max_depth, sampling, generator=None):
            prop = super().propose(committed, max_depth, sampling, generator)
            seen.append((list(committed), prop.tokens.tolist()))
            return prop

    drafter = FallbackDrafter(NgramDrafter(chain(4), max_n=3), Spy(draft, chain(4)))
    for prompt in REPEAT:
        seen.clear()
        ids = torch.tensor([prompt])
        ref = generate(target, None, ids, max_new_tokens=40).tokens
        got = generate(target, drafter, ids, max_new_tokens=40)
        assert got.tokens == ref
        assert drafter.used_first > 0 and drafter.used_then > 0
        assert len(seen) == drafter.used_then
        for committed, tokens in seen:
            assert tokens[0] == committed[-1]
            assert tokens[1:] == greedy_chain(draft, committed, len(tokens) - 1)
        # Model forwards are counted only on the steps the model drafted.
        assert got.stats.draft_forwards == sum(len(t) - 1 for _, t in seen)


def test_horizontal_fills_deep_levels_from_the_statistical_drafter():
    """Model children at depth 1 (levels=2), then a hand-made bigram table below them:
    token t is followed by t + 1, then t + 2."""
    target = model()
    table = np.array([[(t + 1) % 96, (t + 2) % 96] for t in range(96)], dtype=np.int32)
    head = ModelDrafter(early_exit_draft(target, 2), kary(2, 1))
    drafter = HorizontalDrafter(head, BigramDrafter(table), 2, kary(2, 3))
    assert drafter.model_drafter.shape == kary(2, 1) and drafter.deep.shape == kary(2, 3)
    ids = torch.tensor([REPEAT[0]])
    got = generate(target, drafter, ids, max_new_tokens=30)
    assert got.tokens == generate(target, None, ids, max_new_tokens=30).tokens
    steps = got.stats.steps
    assert max(s.depth for s in steps) == 3 and max(s.nodes for s in steps) == 15
    # One draft forward per step: the model drafts depth 1 only (its children are leaves).
    assert got.stats.draft_forwards == sum(1 for s in steps if s.nodes > 1)
    with torch.inference_mode():
        drafter.start(ids)
        committed = REPEAT[0] + [5]
        prop = drafter.propose(committed, 10, GREEDY)
    tree, tokens = prop.tree, prop.tokens.tolist()
    assert tree == kary(2, 3) and prop.forwards == 1
    with torch.inference_mode():
        top2 = early_exit_draft(target, 2)(input_ids=torch.tensor([committed])) \
            .logits[0, -1].topk(2).indices.tolist()
    assert tokens[1:3] == top2
    for v in range(3, tree.size):
        assert tokens[v] == (tokens[tree.parents[v]] + tree.ranks[v]) % 96
    # Near the end of the budget only the model's levels remain.
    with torch.inference_mode():
        drafter.start(ids)
        assert drafter.propose(committed, 1, GREEDY).tree == kary(2, 1)


def test_path_candidates_are_what_propose_fills():
    """The statistical drafters' ``path_candidates`` give exactly the candidates their own
    ``propose`` fills a shape with (so cascades draft what they would)."""
    from treeopt.decode.drafter import proposal_from_paths
    from treeopt.drafters.datastore import Datastore, DatastoreDrafter

    store = Datastore.from_token_lists([[3, 4, 5, 6, 3, 4, 7], [5, 6, 3, 4, 5, 9]], max_n=3)
    table = np.array([[(t * 7 + 1) % 96, (t * 7 + 2) % 96] for t in range(96)], dtype=np.int32)
    committed = [3, 4, 5, 6, 8, 3, 4, 5, 6, 3, 4]
    for drafter in (NgramDrafter(kary(2, 3), max_n=3), DatastoreDrafter(store, kary(2, 3)),
                    BigramDrafter(table, kary(2, 3))):
        drafter.start(torch.tensor([committed[:5]]))
        own = drafter.propose(committed, 10, GREEDY)
        again = proposal_from_paths(committed, drafter.path_candidates(committed), kary(2, 3),
                                    10)
        assert own.tree == again.tree and own.tokens.tolist() == again.tokens.tolist()
        assert own.tree.size > 3, type(drafter).__name__


def test_vertical_is_the_draft_chain_in_fewer_forwards():
    target = model()
    draft = early_exit_draft(target, 2)  # its chains fall into the loops n-grams catch
    plain = ModelDrafter(draft, chain(5))
    vertical = VerticalDrafter(draft, NgramDrafter(max_n=3), chain(5))
    for prompt in REPEAT:
        ids = torch.tensor([prompt])
        a = generate(target, plain, ids, max_new_tokens=40)
        b = generate(target, vertical, ids, max_new_tokens=40)
        assert a.tokens == b.tokens == generate(target, None, ids, max_new_tokens=40).tokens
        # Same proposals (the draft's greedy chain), so the same steps...
        assert [(s.accepted, s.nodes) for s in a.stats.steps] == \
            [(s.accepted, s.nodes) for s in b.stats.steps]
        # ... in fewer draft forwards once the helper's guesses are kept.
        assert vertical.helper_tokens > 0
        assert b.stats.draft_forwards == a.stats.draft_forwards - vertical.helper_tokens
    # Per proposal: the draft's own chain, from scratch.
    with torch.inference_mode():
        vertical.start(torch.tensor([REPEAT[0]]))
        committed = REPEAT[0] + [4]
        prop = vertical.propose(committed, 10, GREEDY)
    assert prop.tokens.tolist() == [4] + greedy_chain(draft, committed, 4)
    # A wider shape is drafted level by level as by a plain model drafter.
    wide = vertical.reshaped(kary(2, 2))
    got = generate(target, wide, torch.tensor([REPEAT[1]]), max_new_tokens=20)
    assert got.tokens == generate(target, None, torch.tensor([REPEAT[1]]),
                                  max_new_tokens=20).tokens
    assert 7 in {s.nodes for s in got.stats.steps}


def test_reshaped_copies_reshape_their_parts():
    target = model()
    fb = build_drafter("fallback:first=ngram,then=early-exit:1", target=target)
    wide = fb.reshaped(kary(3, 1))
    assert wide.first.shape == wide.then.shape == kary(3, 1) and fb.then.shape == chain(5)
    hz = build_drafter("horizontal:model=early-exit:1,levels=3,deep=ngram", target=target,
                       tree=kary(2, 4))
    assert hz.reshaped(chain(6)).model_drafter.shape == chain(3)
    assert hz.reshaped(chain(6)).deep.shape == chain(6)


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize("spec,words", [
    ("horizontal:deep=early-exit:1,model=early-exit:1", "deep=early-exit:1 is not a "
                                                        "statistical drafter"),
    ("horizontal:model=ngram,levels=2", "model=ngram is not a draft model"),
    ("horizontal:model=early-exit:1,levels=1", "levels=1 must be >= 2"),
    ("horizontal:model=early-exit:1,levels=5", "levels=5 leaves no level for deep="),
    ("vertical:draft=early-exit:1,helper=early-exit:1", "helper=early-exit:1 is not a "
                                                        "statistical drafter"),
    ("vertical:draft=ngram", "draft=ngram is not a draft model"),
    ("fallback:first=(ngram:max=3", "unclosed '('"),
    ("fallback:first=nosuch:3,then=early-exit:1", "first=nosuch:3: unknown drafter"),
    ("fallback:first=none", "first= needs a drafter"),
    ("fallback:first=(ngram:max=0),then=early-exit:1", "first=ngram:max=0"),
    ("fallback:second=ngram", "bad option 'second=ngram'"),
])
def test_bad_specs_are_one_line_errors(spec, words):
    with pytest.raises(DrafterError) as info:
        build_drafter(spec, target=model())
    assert words in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------------------- sampling
V = 8
NEW = 4
PROMPT = torch.tensor([[2, 3, 4, 5, 2, 3, 4, 5, 2, 3]])


@lru_cache(maxsize=None)
def pair():
    return peaked_lm(0, V, sharpness=12.0), peaked_lm(1, V, sharpness=12.0)


@lru_cache(maxsize=None)
def exact() -> torch.Tensor:
    """(V,) * NEW joint probability of the first NEW tokens (temperature 1)."""
    return exact_joint(pair()[0], PROMPT, NEW)


def pvalues(samples: torch.Tensor) -> list[float]:
    return pair_pvalues(samples, exact())


def run_many(drafter, n: int, rule: str = "sequoia", after=None):
    target = pair()[0]
    out = []
    for seed in range(n):
        out.append(generate(target, drafter, PROMPT, max_new_tokens=NEW,
                            sampling=Sampling(1.0, rule=rule, seed=seed)))
        if after is not None:
            after(drafter)
    return torch.tensor([g.tokens for g in out]), [st for g in out for st in g.stats.steps]


def test_sampling_fallback_is_lossless():
    drafter = FallbackDrafter(NgramDrafter(chain(3), max_n=2), ModelDrafter(pair()[1], chain(3)))
    used = []
    samples, _ = run_many(drafter, 300, after=lambda d: used.append((d.used_first, d.used_then)))
    assert sum(u[0] for u in used) > 100 and sum(u[1] for u in used) > 100
    assert min(pvalues(samples)) > 1e-3


def test_sampling_horizontal_is_lossless():
    """Model rows carry Q, the n-gram children below them are point masses."""
    drafter = HorizontalDrafter(ModelDrafter(pair()[1]), NgramDrafter(kary(2, 2), max_n=2), 2,
                                kary(2, 2))
    samples, steps = run_many(drafter, 300, "specinfer")
    assert max(s.depth for s in steps) == 2
    assert min(pvalues(samples)) > 1e-3


def test_a_fallback_choice_that_peeks_at_the_target_fails_the_same_test():
    """Negative control: the model's proposal is used only where its token is the target's
    favourite (information from the verifier), else the n-gram's. The draft is the target
    itself, so its proposals are always accepted and the favourite comes out too often."""

    class Peeking(FallbackDrafter):
        def propose(self, committed, max_depth, sampling, generator=None):
            prop = self.first.propose(committed, max_depth, sampling, generator)
            with torch.inference_mode():
                best = int(pair()[0](input_ids=torch.tensor([list(committed)])).logits[0, -1]
                           .argmax())
            if prop.tree.size > 1 and int(prop.tokens[1]) == best:
                self._used = self.first
                return prop
            self.first.update([0], committed)  # its proposal is dropped: keep its cache right
            self._used = self.then
            return self.then.propose(committed, max_depth, sampling, generator)

        def update(self, path, committed, target_topk=None):
            used, self._used = self._used, None
            used.update(path, committed)

    drafter = Peeking(ModelDrafter(pair()[0], chain(2)), NgramDrafter(chain(2), max_n=2))
    samples, _ = run_many(drafter, 300)
    assert min(pvalues(samples)) < 1e-6


def test_sampling_vertical_draws_the_draft_chain_and_is_lossless():
    drafter = VerticalDrafter(pair()[0], NgramDrafter(max_n=2), chain(3))
    kept = []
    samples, _ = run_many(drafter, 400, after=lambda d: kept.append(d.helper_tokens))
    assert sum(kept) > 20
    assert min(pvalues(samples)) > 1e-3


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
               for p in load_prompts("spec_bench", n=2, seed=5)]
    for spec, tree in (("fallback:first=(ngram:max=3),then=early-exit:6", None),
                       ("horizontal:model=early-exit:6,levels=2,deep=ngram", kary(2, 3)),
                       ("vertical:draft=early-exit:6,helper=ngram", chain(5))):
        drafter = build_drafter(spec, target=pair_.target, tree=tree)
        for ids in prompts:
            ref = generate(pair_.target, None, ids, max_new_tokens=24).tokens
            assert generate(pair_.target, drafter, ids, max_new_tokens=24).tokens == ref, spec
