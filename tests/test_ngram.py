"""The n-gram index ranks continuations as documented (counted on paper and against a
brute-force rescan), the n-gram drafter fills tree shapes exactly, and decoding with it is
token-exact with the target's own greedy decoding."""

import random
from functools import lru_cache

import pytest
import torch
from helpers import cpu_budget

from treeopt.decode import drafter as drafter_mod
from treeopt.decode.drafter import DrafterError, build_drafter
from treeopt.decode.sampling import GREEDY
from treeopt.drafters.ngram import NgramDrafter, NgramIndex
from treeopt.tree import Tree

TEXT = [1, 2, 3, 9, 1, 2, 4, 1, 2, 3, 7, 1, 2]


def index_of(tokens, min_n=1, max_n=4):
    ix = NgramIndex(min_n, max_n)
    ix.extend(tokens)
    return ix


# ---------------------------------------------------------------------------- brute force
def brute_candidates(seq, context, k, min_n, max_n, fillers=None, floor=0):
    """The documented rule, by rescanning the whole sequence for every n."""
    ctx = tuple(context)[-max_n:]
    out = []
    for n in range(min(max_n, len(ctx)), min_n - 1, -1):
        key = ctx[len(ctx) - n:]
        seen = {}
        for i in range(max(n, floor + n), len(seq)):
            if tuple(seq[i - n:i]) == key:
                count = seen.get(seq[i], (0, -1))[0]
                seen[seq[i]] = (count + 1, i)
        ranked = sorted(seen, key=lambda t: (-seen[t][0], -seen[t][1]))
        for t in ranked + list((fillers or {}).get(key, ())):
            if t not in out and len(out) < k:
                out.append(t)
    return out


# ---------------------------------------------------------------------------- the index
def test_counts_decide_the_order():
    ix = index_of(TEXT, 1, 2)
    # (1, 2) was followed by 3 twice and by 4 once; (2,) the same; nothing else follows
    assert ix.candidates([1, 2], 4) == [3, 4]
    assert ix.candidates([7, 1, 2], 4) == [3, 4]
    assert ix.candidates([1, 2], 1) == [3]
    assert ix.candidates([1, 2], 0) == []
    assert len(ix) == len(TEXT) and ix.tokens == TEXT


def test_ties_go_to_the_most_recent():
    ix = index_of([1, 5, 1, 6], 1, 1)
    assert ix.candidates([1], 4) == [6, 5]
    ix.extend([1, 5])  # 5 now follows 1 twice
    assert ix.candidates([1], 4) == [5, 6]
    ix.extend([1, 8, 1, 8])  # 8 twice too, and more recent than 5
    assert ix.candidates([1], 4) == [8, 5, 6]


def test_longest_match_first_then_shorter_fills():
    # (2,) is followed by 4 twice and 3 once, but (1, 2) only by 3: the longer match leads
    ix = index_of([1, 2, 3, 9, 2, 4, 9, 2, 4], 1, 2)
    assert ix.candidates([1, 2], 2) == [3, 4]
    assert ix.candidates([7, 2], 2) == [4, 3]  # (7, 2) unseen: unigram ranking
    assert ix.candidates([9, 2], 3) == [4, 3]  # 4 from (9, 2), then 3 from (2,); 4 once
    assert ix.candidates([5, 6], 3) == []  # nothing matches
    assert ix.candidates([], 3) == []


def test_only_the_last_max_n_tokens_matter_and_min_n_is_respected():
    ix = index_of([1, 2, 3, 4, 1, 2, 3, 5, 7, 3, 6], 2, 3)
    assert ix.candidates([1, 2, 3], 4) == [5, 4]  # (1,2,3) -> 4, 5; recency first
    assert ix.candidates([99, 98, 1, 2, 3], 4) == [5, 4]
    assert ix.candidates([7, 3], 4) == [6]  # (7, 3) -> 6; unigram (3,) is below min_n
    assert ix.candidates([3], 4) == []  # shorter than min_n: no n-gram to match
    assert ix.candidates([8, 2, 3], 4) == [5, 4]  # (2, 3) matches


def test_filler_after_observed_continuations_of_the_same_length():
    ix = index_of(TEXT, 1, 2)
    ix.add_filler([9, 1, 2], [4, 8, 3, 8])  # records on (1, 2) and (2,)
    assert ix.candidates([1, 2], 5) == [3, 4, 8]  # observed 3, 4; filler adds only 8
    ix.add_filler([6, 2], [5, 6])  # the latest filler list replaces the older one on (2,)
    assert ix.candidates([1, 2], 5) == [3, 4, 8, 5, 6]  # (1,2): 3 4 | 8  then (2,): 5 6
    assert ix.candidates([6, 2], 5) == [5, 6, 3, 4]  # (6, 2)'s filler is a longer match
    assert ix.candidates([5, 5], 3) == []
    ix.add_filler([5, 5], [7])
    assert ix.candidates([5, 5], 3) == [7]  # a filler alone is a match
    ix.add_filler([], [7])  # no context: no n-gram to attach it to
    assert ix.candidates([11], 3) == []


def test_reset_and_validation():
    ix = index_of(TEXT, 1, 2)
    ix.add_filler([1, 2], [8])
    ix.reset()
    assert len(ix) == 0 and ix.candidates([1, 2], 4) == []
    for lo, hi in [(0, 2), (3, 2), (-1, 4)]:
        with pytest.raises(DrafterError) as err:
            NgramIndex(lo, hi)
        assert "\n" not in str(err.value)


def test_boundary_keeps_ngrams_inside_each_text():
    ix = index_of([1, 2, 3], 1, 2)
    ix.boundary()
    ix.extend([4, 5, 2, 3])
    assert ix.candidates([3], 4) == []  # 3 -> 4 would span the boundary
    assert ix.candidates([2, 3], 4) == []
    assert ix.candidates([5, 2], 4) == [3]
    assert ix.candidates([4], 4) == [5]


@pytest.mark.parametrize("min_n,max_n,vocab", [(1, 4, 3), (1, 3, 6), (2, 4, 4), (1, 1, 60),
                                                (3, 3, 2)])
def test_incremental_extend_equals_a_rescan(min_n, max_n, vocab):
    rng = random.Random(min_n * 100 + max_n * 10 + vocab)
    seq = [rng.randrange(vocab) for _ in range(600 if vocab > 30 else 160)]
    ix = NgramIndex(min_n, max_n)
    fillers = {}
    pos = 0
    while pos < len(seq):
        step = rng.choice([1, 1, 2, 5, 17])
        ix.extend(seq[pos:pos + step])
        pos = min(pos + step, len(seq))
        done = seq[:pos]
        for _ in range(4):  # queries between extends exercise the ranking cache
            start = rng.randrange(max(1, pos - 6), pos + 1) if pos else 0
            ctx = done[start:pos] + [rng.randrange(vocab) for _ in range(rng.randrange(2))]
            k = rng.choice([1, 2, 3, 8, 40])
            assert ix.candidates(ctx, k) == brute_candidates(done, ctx, k, min_n, max_n,
                                                             fillers), (ctx, k)
        if rng.random() < 0.2:
            ctx = done[-rng.randrange(1, 6):]
            fill = [rng.randrange(vocab) for _ in range(3)]
            ix.add_filler(ctx, fill)
            key = tuple(ctx)[-max_n:]
            for n in range(min_n, len(key) + 1):
                fillers[key[len(key) - n:]] = list(dict.fromkeys(fill))
    assert ix.tokens == seq
    scratch = index_of(seq, min_n, max_n)
    assert scratch._table == ix._table


def test_many_continuations_small_then_large_k():
    # 0 is followed by 51 distinct tokens (1..50, and 0 itself 16 times): asking for the top 2
    # first must not cap later asks
    seq = [t for i in range(1, 51) for t in (0, i, i if i % 3 else 0)]
    ix = index_of(seq, 1, 2)
    for k in (2, 5, 40, 60, 3):
        assert ix.candidates([0], k) == brute_candidates(seq, [0], k, 1, 2), k
    assert len(ix.candidates([0], 60)) == 51 and ix.candidates([0], 2) == [0, 50]


def test_candidates_are_fast():
    rng = random.Random(0)
    ix = index_of([rng.randrange(50) for _ in range(20000)], 1, 4)
    ctx = (3, 7, 3, 7)
    with cpu_budget(2000 * 500e-6):  # CPU time: a loaded machine cannot fail it
        for _ in range(2000):
            ix.candidates(ctx, 8)


# ---------------------------------------------------------------------------- the drafter
# committed text: (5, 6) -> 7 twice, 9 once; (6, 7) -> 8; (6, 9) -> 5; (6,) -> 7, 9
COMMITTED = [5, 6, 7, 8, 5, 6, 9, 5, 6, 7, 8, 5, 6]


def propose(shape, committed=COMMITTED, max_depth=8, **kw):
    d = NgramDrafter(shape, max_n=2, **kw)
    d.start(torch.tensor([committed]))
    p = d.propose(list(committed), max_depth, GREEDY)
    return list(p.tree.parents), p.tokens.tolist(), p


def test_drafter_fills_a_small_tree():
    parents, tokens, p = propose(Tree((-1, 0, 0, 1)))
    assert parents == [-1, 0, 0, 1] and tokens == [6, 7, 9, 8]
    assert p.q is None and p.forwards == 0 and p.tokens.dtype == torch.int64
    parents, tokens, _ = propose(Tree((-1, 0, 0, 1, 2)))
    assert parents == [-1, 0, 0, 1, 2] and tokens == [6, 7, 9, 8, 5]


def test_default_shape_is_a_chain_of_three():
    assert NgramDrafter().shape == Tree((-1, 0, 1, 2))
    d = NgramDrafter(Tree((-1, 0, 1)))
    assert d.k == 1 and d.wants_target_topk == 0
    d.start(torch.tensor([COMMITTED]))
    p = d.propose(COMMITTED, 8, GREEDY)
    # max_n=4: the 4-gram (7, 8, 5, 6) was followed by 9, though (5, 6) is followed by 7
    # more often; then (8, 5, 6, 9) -> 5
    assert list(p.tree.parents) == [-1, 0, 1] and p.tokens.tolist() == [6, 9, 5]


def test_max_depth_truncates():
    parents, tokens, _ = propose(Tree((-1, 0, 0, 1)), max_depth=1)
    assert parents == [-1, 0, 0] and tokens == [6, 7, 9]
    parents, tokens, _ = propose(Tree((-1, 0, 0, 1)), max_depth=0)
    assert parents == [-1] and tokens == [6]


def test_no_match_gives_the_root_alone():
    parents, tokens, p = propose(Tree((-1, 0, 0, 1)), committed=[1, 2, 3])
    assert parents == [-1] and tokens == [3] and p.drafted == 0


def test_nodes_without_candidates_are_dropped_and_the_rest_renumbered():
    # node 4 (second child of node 1) has no candidate: (6, 7) and (7,) are only followed by
    # 8; node 5 (the child of node 2, token 9) moves up to id 4
    shape = Tree((-1, 0, 0, 1, 1, 2))
    parents, tokens, _ = propose(shape)
    assert parents == [-1, 0, 0, 1, 2] and tokens == [6, 7, 9, 8, 5]
    # a root with 2 candidates drops the third child and its subtree
    parents, tokens, _ = propose(Tree((-1, 0, 0, 0, 1, 2, 3)), k=3)
    assert parents == [-1, 0, 0, 1, 2] and tokens == [6, 7, 9, 8, 5]


def test_k_limits_candidates_per_node():
    parents, tokens, _ = propose(Tree((-1, 0, 0, 1)), k=1)
    assert parents == [-1, 0, 1] and tokens == [6, 7, 8]


def test_propose_indexes_new_tokens_and_reindexes_a_new_text():
    d = NgramDrafter(Tree((-1, 0)), max_n=2)
    d.start(torch.tensor([[1, 2, 3]]))
    assert d.propose([1, 2, 3], 4, GREEDY).tree.size == 1
    # committed grew by tokens the drafter never saw through update: they are indexed
    p = d.propose([1, 2, 3, 4, 2, 3, 5, 2], 4, GREEDY)
    assert p.tokens.tolist() == [2, 3]
    assert len(d.index) == 8
    # an unrelated text without start: the old n-grams are forgotten
    p = d.propose([7, 7, 2], 4, GREEDY)
    assert p.tree.size == 1 and d.index.tokens == [7, 7, 2]
    # (2, 7) unseen; (7,) -> 7 and 2 once each, 2 the more recent
    assert d.propose([7, 7, 2, 7], 4, GREEDY).tokens.tolist() == [7, 2]
    # a longer text that does not extend the indexed one is reindexed too
    other = [8, 8, 8, 8, 8, 9]
    assert d.propose(other, 4, GREEDY).tree.size == 1
    assert d.index.tokens == other


def test_start_resets_unless_keep():
    for keep, expected in [(False, [9]), (True, [1, 9])]:
        d = NgramDrafter(Tree((-1, 0)), max_n=2, keep=keep)
        d.start(torch.tensor([[8, 1, 2, 3, 8]]))
        d.propose([8, 1, 2, 3, 8, 1, 4], 4, GREEDY)
        d.start(torch.tensor([[6, 8, 9, 5]]))
        cands = d.index.candidates([8], 3)
        assert cands == expected, keep
        # with keep the texts are separate: nothing links the first text's end to the second
        p = d.propose([6, 8, 9, 5, 4], 4, GREEDY)
        assert p.tree.size == 1


def test_update_records_target_topk_as_filler():
    prompt = [1, 2, 3, 1, 2]
    d = NgramDrafter(Tree((-1, 0, 1)), max_n=2, topk=2)
    assert d.wants_target_topk == 2
    d.start(torch.tensor([prompt]))
    p = d.propose(prompt, 4, GREEDY)
    assert p.tokens.tolist() == [2, 3, 1]
    # the target accepts node 1 (token 3), rejects node 2, bonus 7
    top = torch.tensor([[3, 8, 10], [7, 9, 10]])
    d.update([0, 1], prompt + [3, 7], top)
    # filler at the root's context (.., 1, 2) and at node 1's context (.., 2, 3)
    assert d.index._filler[(1, 2)] == (3, 8) and d.index._filler[(2,)] == (3, 8)
    assert d.index._filler[(2, 3)] == (7, 9) and d.index._filler[(3,)] == (7, 9)
    assert d.index.candidates([1, 2], 3) == [3, 8]
    p = d.propose(prompt + [3, 7], 4, GREEDY)
    assert p.tree.size == 1  # (3, 7) / (7,) were never followed by anything
    # without the remembered proposal (update straight after start) the positions are
    # derived from committed: the same fillers
    e = NgramDrafter(Tree((-1, 0, 1)), max_n=2, topk=2)
    e.start(torch.tensor([prompt]))
    e.update([0, 1], prompt + [3, 7], top)
    assert e.index._filler == d.index._filler
    # the engine may cut the bonus (token budget): the remembered proposal still places them
    f = NgramDrafter(Tree((-1, 0, 1)), max_n=2, topk=2)
    f.start(torch.tensor([prompt]))
    f.propose(prompt, 4, GREEDY)
    f.update([0, 1], prompt + [3], top)
    assert f.index._filler == d.index._filler
    # ... even when it cuts accepted tokens: both drafted tokens accepted, only one kept
    g = NgramDrafter(Tree((-1, 0, 1)), max_n=2, topk=1)
    g.start(torch.tensor([prompt]))
    g.propose(prompt, 4, GREEDY)
    g.update([0, 1, 2], prompt + [3], torch.tensor([[3], [1], [2]]))
    assert g.index._filler == {(1, 2): (3,), (2,): (3,), (2, 3): (1,), (3,): (1,),
                               (3, 1): (2,), (1,): (2,)}


def test_update_without_topk_is_a_no_op():
    d = NgramDrafter(max_n=2)
    d.start(torch.tensor([[1, 2, 3]]))
    d.update([0], [1, 2, 3, 4], torch.tensor([[4, 5]]))
    assert not d.index._filler


def test_proposals_live_on_the_prompts_device():
    d = NgramDrafter(device="meta")
    d.start(torch.tensor([COMMITTED]))
    assert d.propose(COMMITTED, 4, GREEDY).tokens.device.type == "cpu"
    assert d.propose(COMMITTED, 0, GREEDY).tokens.device.type == "cpu"


# ---------------------------------------------------------------------------- specs
def _factory(options, tree=None):
    return drafter_mod._REGISTRY["ngram"].factory(options, target=None, tokenizer=None,
                                                  tree=tree)


def test_spec_options():
    d = _factory("min=1,max=3,k=2,topk=4,keep=true")
    assert (d.min_n, d.max_n, d.k, d.topk, d.keep) == (1, 3, 2, 4, True)
    assert d.wants_target_topk == 4 and d.name == "ngram"
    d = _factory("")
    assert (d.min_n, d.max_n, d.k, d.topk, d.keep) == (1, 4, 1, 0, False)
    shape = Tree((-1, 0, 0, 1))
    d = _factory("", tree=shape)
    assert d.shape == shape and d.k == 2
    for bad in ["foo=1", "min=x", "min=3,max=2", "min=5", "k=0", "topk=-1", "keep=maybe", "k"]:
        with pytest.raises(DrafterError) as err:
            _factory(bad)
        assert "\n" not in str(err.value) and "ngram" in str(err.value), bad


def test_build_drafter_spec():
    d = build_drafter("ngram:min=1,max=3,k=2", target=None)
    assert isinstance(d, NgramDrafter) and (d.min_n, d.max_n, d.k) == (1, 3, 2)
    assert isinstance(build_drafter("ngram", target=None), NgramDrafter)
    with pytest.raises(DrafterError) as err:
        build_drafter("ngram:foo=1", target=None)
    assert "\n" not in str(err.value) and "foo" in str(err.value)


# ---------------------------------------------------------------------------- decoding
def sharpen(model, factor: float = 20.0):
    """Scale the final norm so the random model's greedy choices have wide margins."""
    inner = model.transformer.ln_f if hasattr(model, "transformer") else model.model.norm
    with torch.no_grad():
        inner.weight.mul_(factor)
    return model


@lru_cache(maxsize=None)
def target_model(arch):
    from treeopt.testing import tiny_causal_lm

    return sharpen(tiny_causal_lm(arch, seed=0))


SHAPES = {"chain2": Tree((-1, 0, 1)), "chain4": Tree((-1, 0, 1, 2, 3)),
          "tree": Tree((-1, 0, 0, 1, 1, 2, 3))}
# repeated patterns: random models fall into loops that the index picks up
PROMPTS = [[3, 14, 15, 92, 65] * 3, list(range(10, 27)) * 2, [5]]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_decoding_with_the_ngram_drafter_is_exact(arch):
    from treeopt.decode.engine import generate

    target = target_model(arch)
    for prompt in PROMPTS:
        ids = torch.tensor([prompt])
        ref = generate(target, None, ids, max_new_tokens=40).tokens
        assert len(ref) == 40
        for name, shape in SHAPES.items():
            for topk in (0, 3):
                drafter = NgramDrafter(shape, topk=topk)
                got = generate(target, drafter, ids, max_new_tokens=40)
                assert got.tokens == ref, (arch, prompt, name, topk)
                s = got.stats
                assert s.accepted_tokens > 0, (arch, prompt, name, topk)
                assert s.drafted_tokens > s.accepted_tokens  # some drafts were rejected too
                assert s.target_forwards < 40


def test_ngram_spec_decodes_exactly_and_keeps_its_index():
    from treeopt.decode.engine import generate

    target = target_model("llama")
    drafter = build_drafter("ngram:max=3,topk=2,keep=1", target=target,
                            tree=Tree((-1, 0, 0, 1)))
    for prompt in PROMPTS[:2]:
        ids = torch.tensor([prompt])
        ref = generate(target, None, ids, max_new_tokens=30).tokens
        got = generate(target, drafter, ids, max_new_tokens=30)
        assert got.tokens == ref and got.stats.accepted_tokens > 0
    assert len(drafter.index) >= len(PROMPTS[0]) + len(PROMPTS[1]) + 30


def test_reshaped_copies_follow_the_new_width_and_keep_their_own_index():
    base = NgramDrafter()  # chain: one candidate per node
    wide = base.reshaped(Tree((-1, 0, 0, 0)))
    assert base.k == 1 and wide.k == 3 and wide.index is not base.index
    text = [1, 2, 3, 1, 2, 4, 1, 2, 5, 1, 2]
    wide.start(torch.tensor([text]))
    assert wide.propose(text, 1, GREEDY).tokens.tolist() == [2, 5, 4, 3]
    assert len(base.index) == 0  # the original was not touched
    fixed = NgramDrafter(k=2).reshaped(Tree((-1, 0, 0, 0)))
    assert fixed.k == 2


def test_profiler_rank_counts_match_a_hand_count():
    """prompt 1 2 3 1 2 4, continuation 1 2 3 9, width 2:
    after ...4: nothing follows a 4 -> no candidate (rank 0, empty);
    after ...4 1: (1) was followed by 2 twice -> [2], the target's 2 is rank 1;
    after ...1 2: (1 2) was followed by 3 and by 4, once each, 4 more recently -> [4, 3],
    the target's 3 is rank 2; after ...1 2 3: (1 2 3) was followed by 1 -> [1], 9 is not
    a candidate (rank 0, not empty)."""
    from treeopt.profile.acceptance import candidate_ranks, count_ranks

    logits = torch.zeros(4, 16)  # greedy ranks do not read the target's logits
    ranks, empty = candidate_ranks(NgramDrafter(), [1, 2, 3, 1, 2, 4], [1, 2, 3, 9], logits, 2)
    assert ranks == [0, 1, 2, 0] and empty == [True, False, False, False]
    counts = count_ranks(ranks, width=2, depth=2, start=1)
    assert counts.counts == [1, 1] and counts.none_count == 1


def test_unknown_drafter_specs_give_one_line_errors(tmp_path):
    from treeopt.testing import tiny_causal_lm

    target = tiny_causal_lm("llama")
    with pytest.raises(DrafterError) as exc:
        build_drafter("ngramm:max=3", target=target)
    assert "unknown drafter 'ngramm'" in str(exc.value) and "ngram" in str(exc.value)
    assert "\n" not in str(exc.value)
    with pytest.raises(DrafterError) as exc:
        build_drafter(str(tmp_path / "no-such-model"), target=target)
    assert "is not a drafter" in str(exc.value) and "datastore:PATH" in str(exc.value)
