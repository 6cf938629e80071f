"""The ``suffix`` drafter: trie counts against naive counting on random strings, the
SuffixDecoding expansion by hand, greedy decoding token-exact with plain decoding on tiny
models (every option, the global trie, per-step sizes from a copy table), chi-square
losslessness with sampling (and a broken rule failing the same test), the cache file, specs."""

import json
import random

import pytest
import torch
from helpers import NEW, PROMPT, pair
from lossless import exact_joint, pair_pvalues

import treeopt.decode.verify as verify_module
from treeopt.decode.drafter import DrafterError, build_drafter
from treeopt.decode.engine import generate
from treeopt.decode.sampling import GREEDY, Sampling, sample
from treeopt.drafters.suffix import (
    Draft,
    SuffixCache,
    SuffixDrafter,
    SuffixTrie,
    distinct_matches,
    expand_path,
    expand_tree,
    naive_count,
)
from treeopt.tree import Tree


def all_nodes(trie):
    """(substring, count) of every live node."""
    out, stack = [], [(0, ())]
    while stack:
        u, pat = stack.pop()
        if u:
            out.append((pat, trie.count[u]))
        for t, c in (trie.kids[u] or {}).items():
            stack.append((c, pat + (t,)))
    return out


@pytest.mark.parametrize("seed", range(12))
def test_counts_equal_a_naive_count_on_random_strings(seed):
    rng = random.Random(seed)
    depth = rng.randint(2, 7)
    vocab = rng.randint(2, 5)
    trie = SuffixTrie(depth)
    docs = []
    for _ in range(rng.randint(1, 5)):
        doc = [rng.randrange(vocab) for _ in range(rng.randint(1, 60))]
        docs.append(doc)
        trie.begin()
        i = 0
        while i < len(doc):  # appended in random pieces, as decoding commits tokens
            j = i + rng.randint(1, 5)
            trie.append(doc[i:j])
            i = j
    if len(docs) > 1:
        trie.remove(docs[0])
        docs = docs[1:]
    nodes = all_nodes(trie)
    for pat, count in nodes:
        assert len(pat) <= depth and count == naive_count(docs, pat) > 0
    # every substring up to the depth is a node
    want = {tuple(d[i:i + k]) for d in docs for k in range(1, depth + 1)
            for i in range(len(d) - k + 1)}
    assert {p for p, _ in nodes} == want
    assert trie.count[0] == sum(map(len, docs))
    for pat in list(want)[:20]:
        assert trie.find(pat) > 0


@pytest.mark.parametrize("seed", range(8))
def test_extended_matches_equal_the_walk_from_the_root(seed):
    """``extended`` (one step down from each match) gives what ``matches`` finds walking
    every suffix from the root, token by token along random contexts."""
    rng = random.Random(seed)
    depth, vocab = rng.randint(2, 8), rng.randint(2, 4)
    trie = SuffixTrie(depth)
    for _ in range(rng.randint(1, 4)):
        trie.add([rng.randrange(vocab) for _ in range(rng.randint(1, 80))])
    for _ in range(20):
        context = [rng.randrange(vocab) for _ in range(rng.randint(0, 12))]
        m = trie.matches(context)
        for t in [rng.randrange(vocab + 1) for _ in range(10)]:  # vocab: never seen
            context.append(t)
            m = trie.extended(m, t)
            assert m == trie.matches(context)


@pytest.mark.parametrize("seed", range(4))
def test_shape_fill_equals_ranking_after_every_path(seed):
    """Filling a shape extends each path's matches from its parent's: every node's
    candidates are :meth:`ranked_after` the committed text plus the path (walked afresh)."""
    rng = random.Random(seed)
    d = SuffixDrafter(Tree((-1, 0, 0, 1, 1, 2, 3, 5, 6)), depth=6,
                      cache=SuffixCache(depth=6, max_tokens=10_000))
    d.cache.add([rng.randrange(4) for _ in range(200)], save=False)
    prompt = [rng.randrange(4) for _ in range(40)]
    d.start(torch.tensor([prompt]))
    committed = prompt + [rng.randrange(4) for _ in range(5)]
    prop = d.propose(committed, 8, GREEDY)
    tree, toks = prop.tree, prop.tokens.tolist()
    assert tree.size > 3
    paths = [()]
    for v in range(1, tree.size):
        paths.append(paths[tree.parents[v]] + (toks[v],))
        want, _ = d.ranked_after(tuple(committed[-5:]) + paths[tree.parents[v]])
        assert toks[v] == want[tree.ranks[v] - 1]


DOC = [1, 2, 3, 1, 2, 4, 1, 2, 3, 1, 2]


def test_matches_keep_the_longest_of_each_count():
    trie = SuffixTrie(8)
    trie.append(DOC)
    m = trie.open_matches()
    assert [p for p, _ in m] == [1, 2, 3, 4, 5, 6, 7]
    assert [trie.count[u] for _, u in m] == [4, 4, 2, 2, 2, 1, 1]
    assert [p for p, _ in distinct_matches(trie, m)] == [2, 5]
    assert trie.matches(DOC) == m  # walking from the root finds the same nodes


def test_tree_and_path_expansion_by_hand():
    trie = SuffixTrie(8)
    trie.append(DOC)
    u2 = trie.find([1, 2])
    d = expand_tree(trie, u2, Draft(2, 2, 0), 4, 0.1)
    # [1,2] -> 3 (2/4), 4 (1/4); 3 -> 1 -> 2 (each 2/2); then 4 (.25) before the 1/2 below
    assert d.parents == [-1, 0, 1, 2, 0] and d.tokens == [2, 3, 1, 2, 4]
    assert d.probs == pytest.approx([1, 0.5, 0.5, 0.5, 0.25])
    assert d.score == pytest.approx(1.75)
    assert [f.match for f in d.features[1:]] == [2, 3, 4, 2]
    assert [f.rank for f in d.features[1:]] == [1, 1, 1, 2]
    p = expand_path(trie, u2, Draft(2, 2, 0), 4, 0.1)
    assert p.parents == [-1, 0, 1, 2, 3] and p.tokens == [2, 3, 1, 2, 4]
    assert expand_tree(trie, u2, Draft(2, 2, 0), 4, 0.3).tokens == [2, 3, 1, 2]
    # from the 5-token match: 4 (1/2), 1, 2, then the depth bound (8) ends the branch
    u5 = trie.find(DOC[-5:])
    assert expand_tree(trie, u5, Draft(2, 5, 0), 10, 0.1).tokens == [2, 4, 1, 2]


def test_alpha_rule_picks_the_best_score():
    d = SuffixDrafter(cache=None, alpha=1.0, max_tokens=16, depth=8)
    prop = d.propose(DOC, 20, GREEDY)
    # p=2 may draft 2 tokens (3, 1: score 1.0); p=5 may draft 5 (4, 1, 2: score 1.5)
    assert prop.tree.parents == (-1, 0, 1, 2) and prop.tokens.tolist() == [2, 4, 1, 2]
    d2 = SuffixDrafter(cache=None, alpha=0.5, max_tokens=16, depth=8)
    # p=2: 1 token (score .5); p=5: 2 tokens (4, 1: score 1.0)
    assert d2.propose(DOC, 20, GREEDY).tokens.tolist() == [2, 4, 1]
    assert d.propose(DOC, 2, GREEDY).tokens.tolist() == [2, 4, 1]  # max_depth cuts


def sharp(arch="llama", seed=0):
    from treeopt.testing import tiny_causal_lm

    m = tiny_causal_lm(arch, seed=seed)
    with torch.no_grad():
        if arch == "gpt2":
            m.transformer.ln_f.weight.mul_(8)
        else:
            m.model.norm.weight.mul_(8)
    return m


PROMPTS = [[3, 14, 15, 92, 65] * 3, list(range(10, 27)) * 2, [5], [7, 8, 9, 7, 8]]


def copy_profile(tmp_path, target):
    """A profile JSON with a latency curve and a copy table measured online on the tiny
    target (what `treeopt tune --draft suffix` writes)."""
    from treeopt.profile.copy import online_table, write_copy_table

    path = tmp_path / "profile.json"
    path.write_text(json.dumps({"format": "treeopt-profile", "version": 1, "meta": {},
                                "latency": {"target": {"tokens": [1, 2, 4, 8, 16],
                                                       "ms": [50, 55, 80, 100, 110]}}}))
    drafter = build_drafter("suffix:global=0", target=target)
    write_copy_table(online_table(target, drafter, PROMPTS[:2], max_new_tokens=30), path)
    return path


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_decoding_is_exact_with_every_option(arch, tmp_path):
    target = sharp(arch)
    table = copy_profile(tmp_path, target)
    specs = ["suffix", "suffix:mode=path", "suffix:alpha=2.5,offset=1,max=24",
             "suffix:min_prob=0,depth=8", "suffix:global=0", f"suffix:table={table}",
             f"suffix:len=auto,table={table},mode=path"]
    for spec in specs:
        drafter = build_drafter(spec, target=target)
        accepted = 0
        for prompt in PROMPTS:  # one drafter over all prompts: the global trie fills
            ids = torch.tensor([prompt])
            ref = generate(target, None, ids, max_new_tokens=40).tokens
            got = generate(target, drafter, ids, max_new_tokens=40)
            assert got.tokens == ref, (arch, spec, prompt)
            accepted += got.stats.accepted_tokens
        assert accepted > 0, spec
    fixed = build_drafter("suffix", target=target, tree=Tree((-1, 0, 0, 1, 2)))
    for prompt in PROMPTS:
        ids = torch.tensor([prompt])
        assert generate(target, fixed, ids, max_new_tokens=30).tokens == \
            generate(target, None, ids, max_new_tokens=30).tokens


def test_global_trie_learns_earlier_outputs_and_persists(tmp_path):
    target = sharp()
    f = tmp_path / "cache.json"
    d = build_drafter(f"suffix:file={f}", target=target)
    ids = torch.tensor([[40, 41, 42]])
    first = generate(target, d, ids, max_new_tokens=30)
    d.finish()  # the output joins the global trie and the file
    assert d.cache.tokens == 30 and f.exists()
    again = build_drafter(f"suffix:file={f}", target=target)  # a new process, same file
    second = generate(target, again, ids, max_new_tokens=30)
    assert second.tokens == first.tokens
    assert second.stats.accepted_tokens > first.stats.accepted_tokens
    assert second.stats.target_forwards < first.stats.target_forwards


def test_global_trie_is_bounded():
    cache = SuffixCache(6, 50)
    rng = random.Random(1)
    docs = [[rng.randrange(4) for _ in range(20)] for _ in range(10)]
    for doc in docs:
        cache.add(doc, save=False)
    assert cache.tokens <= 50 and len(cache.docs) == 2
    kept = list(cache.docs)
    for pat, count in all_nodes(cache.trie):
        assert count == naive_count(kept, pat)


@pytest.mark.parametrize("content,match", [
    ("{", "JSON"),
    (json.dumps({"format": "other"}), "not a treeopt-suffix-cache"),
    (json.dumps({"format": "treeopt-suffix-cache", "version": 1, "docs": [[1, -2]]}),
     "token ids"),
    (json.dumps({"format": "treeopt-suffix-cache", "version": 1, "docs": [[1000]]}),
     "token ids"),
    (json.dumps({"format": "treeopt-suffix-cache", "version": 1, "vocab_size": 7,
                 "docs": []}), "vocabulary"),
])
def test_bad_cache_files_give_one_line_errors(tmp_path, content, match):
    f = tmp_path / "c.json"
    f.write_text(content)
    with pytest.raises(DrafterError, match=match) as exc:
        build_drafter(f"suffix:file={f}", target=sharp())
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("spec,match", [
    ("suffix:len=auto", "table="),
    ("suffix:len=fast", "auto or alpha"),
    ("suffix:mode=wide", "tree or path"),
    ("suffix:depth=1", "depth"),
    ("suffix:global=-1", "global"),
    ("suffix:global=0,file=x.json", "global > 0"),
    ("suffix:bogus=1", "bad option"),
    ("suffix:table=/nonexistent.json", "no such file"),
])
def test_bad_specs_give_one_line_errors(spec, match):
    with pytest.raises(DrafterError, match=match):
        build_drafter(spec, target=None)


def test_a_table_without_latency_is_refused(tmp_path):
    from treeopt.profile.copytable import CopyTable

    f = tmp_path / "t.json"
    f.write_text(json.dumps(CopyTable().to_dict()))
    with pytest.raises(DrafterError, match="latency"):
        build_drafter(f"suffix:table={f}", target=None)


# ---------------------------------------------------------------------------- sampling
def broken_candidates(p, children, generator=None):
    """Accepts x_i with its target probability but never removes rejected candidates: the
    bonus then over-produces them (the negative control of the point-mass rule)."""
    u = torch.rand(len(children), generator=generator)
    for i, x in enumerate(children):
        if float(u[i]) < float(p[x]):
            return i, int(x)
    return None, int(sample(p[None].float(), 1, generator))


def suffix_samples(n):
    target = pair()[0]
    out = []
    for s in range(n):
        # a fresh request trie per sample; the prompt repeats so that matches exist
        d = SuffixDrafter(cache=None, min_prob=0.0, max_tokens=4)
        ids = torch.cat([PROMPT, PROMPT, PROMPT], 1)
        out.append(generate(target, d, ids, max_new_tokens=NEW,
                            sampling=Sampling(1.0, seed=s)).tokens)
    return torch.tensor(out)


def exact_after_repeat():
    return exact_joint(pair()[0], torch.cat([PROMPT, PROMPT, PROMPT], 1), NEW, 1.0)


def test_sampling_with_suffix_drafts_is_lossless():
    samples = suffix_samples(1000)
    assert min(pair_pvalues(samples, exact_after_repeat())) > 1e-3


def test_broken_rule_fails_the_same_test(monkeypatch):
    monkeypatch.setattr(verify_module, "verify_candidates", broken_candidates)
    samples = suffix_samples(400)
    assert min(pair_pvalues(samples, exact_after_repeat())) < 1e-6


# ---------------------------------------------------------------------------- real weights
@pytest.mark.slow
def test_smollm2_greedy_is_exact():
    pytest.importorskip("gguf")
    from treeopt.api import encode_prompt, load_pair
    from treeopt.datasets import load_prompts
    from treeopt.models.loading import ModelError

    try:
        pair = load_pair("smollm2", None, device="cpu")
    except ModelError as exc:
        pytest.skip(str(exc))
    drafter = build_drafter("suffix", target=pair.target)
    for p in load_prompts("spec_bench", n=3, seed=2):
        ids = encode_prompt(pair.tokenizer, p.text)[:, -256:]
        ref = generate(pair.target, None, ids, max_new_tokens=32).tokens
        got = generate(pair.target, drafter, ids, max_new_tokens=32)
        assert got.tokens == ref


def test_eval_methods_and_the_warmup_never_share_a_global_trie():
    """In an eval run every method decodes as it would alone: the grid methods reshaped from
    one suffix drafter get global tries of their own (forked), and the warm-up's few tokens
    of the first prompt reach no trie (they would hand the first answer to the drafter)."""
    from treeopt.evaluate.methods import chain_method
    from treeopt.evaluate.runner import EvalConfig, run_eval

    target = sharp()
    prompts = [(40, 41, 42, 43, 40, 41), (7, 8, 9, 7, 8)]
    shapes = {"chain:3": 2, "chain:6": 5}
    res = run_eval(target, build_drafter("suffix", target=target), prompts,
                   [chain_method(k) for k in shapes.values()],
                   config=EvalConfig(max_new_tokens=24, warmup=True), progress=False)
    for name, k in shapes.items():
        alone = build_drafter("suffix", target=target, tree=Tree(tuple(range(-1, k))))
        want = [generate(target, alone, torch.tensor([p]), max_new_tokens=24).stats.num_steps
                for p in prompts]
        got = list(res.rows[res.rows["method"] == name]["steps"])  # in prompt order
        assert got == want, name
    base = build_drafter("suffix", target=target)
    base.cache.add([1, 2, 3, 1, 2, 3])
    twin = base.forked()
    twin.cache.add([9, 9, 9])
    assert base.cache.tokens == 6 and twin.cache.tokens == 9 and twin.cache.path is None


def test_eval_repeats_keep_the_fastest_run_and_decode_from_one_state():
    """``repeats``: every generation runs that often from the same drafter state (the extra
    runs on forks, so the global trie sees each answer once, as with one run), and the row
    keeps the fastest run's times. A generate that sleeps on the last run of each triple makes
    the fastest run a fork's; without forks the repeats would copy their own answers (fewer
    steps) and the trie would hold every answer three times."""
    import time

    from treeopt.evaluate.errors import EvalError
    from treeopt.evaluate.methods import chain_method
    from treeopt.evaluate.runner import EvalConfig, run_eval

    target = sharp()
    prompts = [(40, 41, 42, 43, 40, 41), (7, 8, 9, 7, 8)]
    calls = []

    def slow_last(*args, **kw):
        calls.append(1)
        if len(calls) % 3 == 0:
            time.sleep(0.05)
        return generate(*args, **kw)

    runs = {}
    for repeats, gen in ((1, None), (3, slow_last)):
        drafter = build_drafter("suffix", target=target)
        runs[repeats] = (run_eval(target, drafter, prompts, [chain_method(4)], generate=gen,
                                  config=EvalConfig(max_new_tokens=24, warmup=False,
                                                    repeats=repeats), progress=False),
                         drafter)
    one, three = runs[1][0].rows, runs[3][0].rows
    assert list(three["steps"]) == list(one["steps"])
    assert [list(t) for t in three["output_ids"]] == [list(t) for t in one["output_ids"]]
    assert runs[3][1].cache.tokens == runs[1][1].cache.tokens  # each answer added once
    assert "repeat_seconds" not in one
    for _, row in three.iterrows():
        every = row["repeat_seconds"]
        assert len(every) == 3 and row["seconds"] == min(every) < every[-1]
        assert row["tokens_per_s"] == pytest.approx(row["new_tokens"] / row["seconds"])
    with pytest.raises(EvalError, match="repeats must be"):
        run_eval(target, None, prompts, [], config=EvalConfig(repeats=0), progress=False)
