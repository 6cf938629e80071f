"""Greedy replay of model-free drafters (``treeopt.profile.replay``): its steps equal the
engine's, step by step, for fixed shapes, SuffixDecoding's own rule and per-step lengths; its
prediction by hand; the choice among candidates; and ``tune`` choosing by it."""

import json
import shlex
from functools import lru_cache
from types import SimpleNamespace

import pytest
import torch

from treeopt.cli import main as cli_main
from treeopt.cli.tune import replay_lines
from treeopt.decode.drafter import Drafter, DrafterError, build_drafter, respec
from treeopt.decode.engine import generate
from treeopt.drafters import auto as auto_mod
from treeopt.drafters.auto import AutoDrafter, candidate_specs
from treeopt.drafters.datastore import Datastore
from treeopt.drafters.model import ModelDrafter
from treeopt.growmap import load_growmap
from treeopt.profile import acceptance
from treeopt.profile.acceptance import greedy_continuation, target_continuation
from treeopt.profile.copy import len_auto_spec, measuring_copy, sizing_copy
from treeopt.profile.copytable import CopyTable
from treeopt.profile.model import Latency, LatencyCurve
from treeopt.profile.replay import (
    Replay,
    ReplayChoice,
    ReplayError,
    choose_replayed,
    continuations,
    preferred,
    private,
    replay,
    replayable,
)
from treeopt.search.api import SearchSettings
from treeopt.shapes import chain
from treeopt.testing import tiny_causal_lm
from treeopt.tree import Tree
from treeopt.tuning import (
    ADAPTIVE_MARGIN,
    SUFFIX_ALPHAS,
    TUNED_TREE,
    decode_args,
    model_candidates,
    other_drafters,
    replay_candidates,
    replay_others,
)

PROMPTS = [[40, 41, 42, 43, 40, 41, 42, 43, 40, 41], [7, 8, 9, 7, 8, 9, 7, 8],
           [3, 60, 61, 3, 60, 62, 3, 60]]


@pytest.fixture(scope="module")
def target():
    model = tiny_causal_lm("llama", seed=0)
    with torch.no_grad():
        model.model.norm.weight.mul_(8)  # peaked: greedy choices far from ties
    return model.float().eval()


def engine_steps(target, drafter, prompts, n):
    nodes, tokens = [], []
    for ids in prompts:
        g = generate(target, drafter, torch.tensor([ids]), max_new_tokens=n)
        nodes += [s.nodes for s in g.stats.steps]
        tokens += [s.tokens for s in g.stats.steps]
    return nodes, tokens


def half_table():
    t = CopyTable()
    for d in range(1, 20):
        for i in range(10):
            t.add((1, 6, 4, d), i < 8)
    return t


@pytest.mark.parametrize("spec,shape", [("ngram", chain(draft_tokens=4)),
                                        ("ngram", Tree((-1, 0, 0, 1, 2, 3))),
                                        ("ngram:min=2,max=4", chain(draft_tokens=8)),
                                        ("suffix", None), ("suffix:mode=path", None),
                                        ("suffix", chain(draft_tokens=3)),
                                        ("auto", None), ("auto:max=3", None)])
def test_replay_steps_equal_the_engines(target, spec, shape):
    n = 24
    conts = continuations(target, PROMPTS, n)
    drafter = build_drafter(spec, target=target, tree=shape)
    got = replay(private(drafter), PROMPTS, conts)
    nodes, tokens = engine_steps(target, private(drafter), PROMPTS, n)
    assert (got.nodes, got.tokens) == (nodes, tokens)
    assert sum(got.tokens) == sum(len(c) - 1 for c in conts)  # every token but the prefill's
    assert max(got.tokens) > 1  # the copies were accepted somewhere: not a vacuous check


@pytest.mark.parametrize("spec", ["ngram", "suffix"])
def test_replay_of_per_step_lengths_equals_the_engines(target, spec):
    curve = lambda n: 10.0 + 0.5 * n  # noqa: E731 (cheap verification: long copies pay)
    drafter = sizing_copy(build_drafter(spec, target=target), half_table(), curve, 8)
    conts = continuations(target, PROMPTS, 20)
    got = replay(private(drafter), PROMPTS, conts)
    assert (got.nodes, got.tokens) == engine_steps(target, private(drafter), PROMPTS, 20)
    assert max(got.nodes) <= 9 and len(set(got.nodes)) > 1  # sized per step, up to 8 drafted


def test_prediction_by_hand():
    r = Replay(nodes=[3, 1, 5], tokens=[3, 1, 2], draft_ms=[0.5, 0.5, 0.5])
    p = r.predict(lambda n: 10.0 + n)
    # verify (13 + 11 + 15) / 3 = 13, draft 0.5: 2 tokens per 13.5 ms; plain 11 ms a token
    assert p.expected_tokens == pytest.approx(2.0) and p.step_ms == pytest.approx(13.5)
    assert p.tokens_per_s == pytest.approx(2000 / 13.5)
    assert p.speedup == pytest.approx(11 * 2 / 13.5) and p.size == 5
    with pytest.raises(ReplayError):
        Replay().predict(lambda n: 1.0)


def test_choose_replayed_keeps_the_fastest_and_names_what_it_skipped(target):
    conts = continuations(target, PROMPTS, 16)
    drafter = build_drafter("ngram", target=target)
    lat = Latency(LatencyCurve([1, 2, 4, 8, 16], [10, 10.5, 11, 12, 14]))

    def broken():
        raise DrafterError("drafter 'x': cannot")

    cands = [(f"chain:{k + 1}", lambda k=k: private(drafter, chain(draft_tokens=k),
                                                    sized=False), chain(draft_tokens=k))
             for k in (1, 2, 4, 8)] + [("broken", broken, None)]
    best = choose_replayed(cands, PROMPTS, conts, lat)
    assert set(best.predictions) == {"chain:2", "chain:3", "chain:5", "chain:9"}
    assert best.skipped == {"broken": "drafter 'x': cannot"}
    assert best.prediction.tokens_per_s == max(p.tokens_per_s
                                               for p in best.predictions.values())
    assert best.label in best.predictions and best.tree.size == int(best.label[6:])
    # a preferred candidate is kept unless another replays more than the margin faster
    rates = {k: p.tokens_per_s for k, p in best.predictions.items()}
    slowest = min(rates, key=rates.get)
    assert slowest != best.label
    assert max(rates.values()) > 1.05 * rates[slowest]  # (drafting times are measured)
    kept = choose_replayed(cands, PROMPTS, conts, lat, prefer=["broken", slowest],
                           margin=1.0)
    assert kept.label == slowest and kept.tree.size == int(slowest[6:])
    assert kept.drafter.shape.size == int(slowest[6:]) and kept.prefer == [slowest]
    assert kept.prediction is kept.predictions[slowest]
    strict = choose_replayed(cands, PROMPTS, conts, lat, prefer=[slowest], margin=0.0)
    assert strict.label == best.label


def test_tune_says_when_the_margin_kept_auto():
    fast, slow = (Replay([3], [n], [0.0]).predict(lambda k: 10.0) for n in (3, 2))
    rc = ReplayChoice("--draft auto", None, None, slow, margin=0.03,
                      predictions={"--draft auto": slow, "chain:3": fast})
    assert "chain:3 3.00x" in replay_lines(rc)
    assert replay_lines(rc).endswith("; kept --draft auto: auto stays unless another replays "
                                     "more than 3% faster")
    rc.label = "chain:3"
    assert "kept" not in replay_lines(rc)


def test_preferred_by_hand():
    rates = {"chain:9": 10.0, "tree": 10.0, "auto": 9.8, "auto:max=4": 9.0}
    assert preferred(rates) == "chain:9"  # ties: the first listed
    assert preferred(rates, ["auto", "auto:max=4"], 0.03) == "auto"  # 10 <= 1.03 * 9.8
    assert preferred(rates, ["auto:max=4"], 0.03) == "chain:9"  # 10 > 1.03 * 9
    assert preferred(rates, ["auto"], 0.0) == "chain:9"
    assert preferred(rates, ["auto"], 0.02) == "chain:9"  # 10 > 9.8 x 1.02 = 9.996
    assert preferred(rates, ["auto"], 0.0205) == "auto"  # 10 <= 10.0009
    assert preferred({"auto": 3.0, "x": 2.0}, ["auto"], 0.0) == "auto"


def test_replayed_steps_repriced_under_another_curve():
    """Another dtype's curve changes which replayed configuration is fastest, not the steps."""
    replays = {"short": Replay([2, 2], [2, 1], [0.0, 0.0]),
               "long": Replay([9, 9], [4, 1], [0.0, 0.0])}
    rc = ReplayChoice("short", None, None, None, replays=replays,
                      shapes={"short": chain(draft_tokens=1), "long": chain(draft_tokens=8)})
    flat = Latency(LatencyCurve([1, 16], [10.0, 10.0]))  # 2.5 vs 1.5 tokens per 10 ms
    steep = Latency(LatencyCurve([1, 2, 9, 16], [10.0, 20.0, 90.0, 160.0]))
    label, pred = rc.best_under(flat)
    assert label == "long" and pred.tokens_per_s == pytest.approx(250.0) and pred.depth == 8
    label, pred = rc.best_under(steep)  # 1.5 per 20 ms vs 2.5 per 90 ms
    assert label == "short" and pred.tokens_per_s == pytest.approx(75.0)
    rc.prefer, rc.margin = ["short"], 0.7  # 150 tokens/s x 1.7 >= 250: kept
    assert rc.best_under(flat)[0] == "short"
    rc.margin = 0.6  # 240 < 250
    assert rc.best_under(flat)[0] == "long"


def test_drafters_that_need_the_target_are_not_replayed(target):
    topk = build_drafter("ngram:topk=2", target=target)
    assert "top-k" in replayable(topk)
    assert "top-k" in replayable(topk, models=True)  # never: it learns from the target
    model = build_drafter("early-exit:1", target=target)
    assert "model" in replayable(model)
    assert replayable(model, models=True) is None  # only where a model may run
    with pytest.raises(ReplayError, match="cannot replay"):
        replay(model, PROMPTS, [[1, 2]] * 3)


@lru_cache(maxsize=None)
def draft_model():
    model = tiny_causal_lm("llama", seed=1)
    with torch.no_grad():
        model.model.norm.weight.mul_(8)
    return model.float().eval()


def auto_with_model(target, curve):
    copies = [(n, build_drafter(s, target=target, tree=chain(draft_tokens=8)))
              for n, s in candidate_specs()]
    return AutoDrafter(copies, curve, model=ModelDrafter(draft_model(), chain(draft_tokens=8)),
                       draft_curve={1: 2.0, 2: 2.0}, explore=3)


@pytest.mark.parametrize("which", ["early-exit chain", "model tree", "auto with a model"])
def test_drafters_that_run_a_model_replay_as_they_decode(target, which):
    """At temperature 0 a drafter with a model of its own proposes from the committed text
    alone: replaying it along the target's continuations gives the engine's steps."""
    if which == "early-exit chain":
        drafter = build_drafter("early-exit:1", target=target, tree=chain(draft_tokens=3))
    elif which == "model tree":
        drafter = ModelDrafter(draft_model(), Tree((-1, 0, 0, 1, 2, 3)))
    else:
        drafter = auto_with_model(target, {1: 10.0, 17: 10.5})
    n = 24
    conts = continuations(target, PROMPTS, n)
    got = replay(private(drafter), PROMPTS, conts, models=True)
    nodes, tokens = engine_steps(target, private(drafter), PROMPTS, n)
    assert (got.nodes, got.tokens) == (nodes, tokens)
    assert sum(got.tokens) == sum(len(c) - 1 for c in conts)
    assert max(got.nodes) > 1  # it drafted


def test_tune_replays_the_draft_models_tree_beside_auto_with_the_model(target, monkeypatch):
    """For a draft model, tune replays its tuned tree, ``auto`` with the model (from the
    acceptance just measured) and the copy drafters alike, and keeps another only when it
    replays faster than the tree (like for like: both timed the model's drafting)."""
    monkeypatch.setattr(auto_mod, "latency_curve",
                        lambda model, folder, **kw: {1: 10.0, 17: 10.5})
    pair = SimpleNamespace(drafter=ModelDrafter(draft_model(), chain(draft_tokens=4)),
                           target=target, tokenizer=None)
    prompts = [SimpleNamespace(token_ids=p) for p in PROMPTS]
    lat = Latency(target=LatencyCurve(tokens=[1, 2, 4, 8, 16], ms=[10.0, 10.5, 11, 12, 14]),
                  draft=None, context=8, meta={})
    run = SimpleNamespace(max_new_tokens=16, chat_template=False)
    found = SimpleNamespace(max_size=17, rank_table=[[0.9, 0.05], [0.8], [0.7], [0.6]])
    tree = chain(draft_tokens=4)
    assert model_candidates(pair, tree, found.rank_table, None) == []  # no spec to decode
    cands = model_candidates(pair, tree, found.rank_table, "model:tiny")
    assert [c[0] for c in cands] == [TUNED_TREE, "--draft auto:draft=(model:tiny)"]
    made = cands[1][1]()
    assert made.model_prior == [0.9, 0.8, 0.7, 0.6] and made.model is draft_model()
    got = replay_others(pair, prompts, run, found, lat, SearchSettings(), tree, "model:tiny")
    assert set(got.predictions) == {TUNED_TREE, "--draft auto:draft=(model:tiny)",
                                    "--draft auto", "--draft suffix", "--draft ngram"}
    autos = ["--draft auto:draft=(model:tiny)", "--draft auto"]
    assert got.prefer == autos and got.margin == ADAPTIVE_MARGIN
    rates = {k: p.tokens_per_s for k, p in got.predictions.items()}
    best = max(rates, key=rates.get)
    top_auto = max(autos, key=rates.get)
    assert got.label == (top_auto if rates[best] <= 1.03 * rates[top_auto] else best)
    assert got.options == ({} if best == TUNED_TREE else
                           {"spec": best.removeprefix("--draft ")})
    # an early exit drafts a fixed shape too; a drafter sizing its own tree has no tuned tree
    dyn = SimpleNamespace(drafter=SimpleNamespace(model=draft_model(), shape=None,
                                                  name="dynamic"), target=target)
    assert model_candidates(dyn, tree, found.rank_table, "dynamic") == []


def test_a_private_copy_never_writes_the_suffix_file_nor_records(target, tmp_path):
    path = tmp_path / "suffix.json"
    drafter = build_drafter(f"suffix:global=4096,file={path}", target=target)
    drafter.recorder = CopyTable()
    copy = private(drafter)
    replay(copy, PROMPTS, continuations(target, PROMPTS, 12))
    assert not path.exists() and drafter.recorder.total_trials == 0
    assert copy.cache is not drafter.cache and drafter.cache.tokens == 0 < copy.cache.tokens


def test_suffix_candidates_include_its_alphas_and_their_specs(target):
    """``tune`` replays SuffixDecoding's own budget at several alpha, with the spec of each."""

    drafter = build_drafter("suffix:max=24", target=target)
    cands = replay_candidates(drafter, chain(draft_tokens=2), 6, half_table(),
                              lambda n: 10.0 + n, "p.json", [[0.6, 0.2], [0.5, 0.1]], 8)
    opts = {c[0]: c[3] for c in cands}
    assert [k for k in opts if k.startswith("alpha=")] == [f"alpha={a:g}" for a in SUFFIX_ALPHAS]
    assert respec("suffix:max=24", **opts["alpha=2"]) == "suffix:max=24,alpha=2.0"
    assert respec("suffix:max=24", **opts["len=auto"]) == "suffix:max=6,len=auto,table=p.json"
    assert respec("suffix:max=24", **opts["chain:4"]) == "suffix:max=24"
    made = {c[0]: c[1]() for c in cands}
    assert made["alpha=4"].alpha == 4.0 and made["alpha=4"].sizer is None
    assert made["len=auto"].max_tokens == 6 and made["chain:7"].shape.size == 7
    assert "chain:8" not in made and "dp:16x6" not in made  # at most 8 nodes, depth 6
    assert made["dp:8x6"].shape.size == 8 and made["dp:8x6"].shape.depth <= 6


def test_a_replay_never_sees_outputs_the_drafter_indexed_before(target):
    """``tune`` profiles the same prompts before it replays them: a suffix drafter's global
    trie then holds their continuations. The replay (and the copy-table measurement) start
    from an empty trie, as a fresh run does, so they predict what decoding will do."""

    conts = continuations(target, PROMPTS, 16)
    used = build_drafter("suffix:global=4096", target=target)
    for ids in PROMPTS + PROMPTS:  # the prompts decoded (and indexed) already
        generate(target, used, torch.tensor([ids]), max_new_tokens=16)
    assert used.cache.tokens > 0
    fresh = build_drafter("suffix:global=4096", target=target)
    a, b = replay(private(used), PROMPTS, conts), replay(private(fresh), PROMPTS, conts)
    assert (a.nodes, a.tokens) == (b.nodes, b.tokens)
    assert measuring_copy(used, 8, CopyTable()).cache.tokens == 0


def test_len_auto_spec_keeps_the_given_options():
    assert len_auto_spec("ngram", "p.json") == "ngram:len=auto,table=p.json"
    assert len_auto_spec("suffix:max=24,len=alpha", "p.json", max=8) == \
        "suffix:max=8,len=auto,table=p.json"
    assert len_auto_spec("ngram:min=2,table=old.json", "p.json") == \
        "ngram:min=2,len=auto,table=p.json"


def test_greedy_continuations_are_computed_once_per_model():
    model = tiny_causal_lm("llama", seed=3).float().eval()
    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        tokens, _ = target_continuation(model, PROMPTS[0], 9)
        n = len(calls)
        assert greedy_continuation(model, PROMPTS[0], 9) == tokens and len(calls) == n
        assert greedy_continuation(model, PROMPTS[0], 5) == tokens[:5] and len(calls) > n
        other = tiny_causal_lm("llama", seed=4).float().eval()  # another model: its own
        assert acceptance._SEEN.get(other) is None
    finally:
        hook.remove()


def test_tune_chooses_by_replay_and_its_decode_args_are_exact(tmp_path, capsys, monkeypatch):
    """``tune --draft ngram``: every replayed candidate is in the summary, the kept one is
    the fastest replayed, and decoding with the summary's ``decode`` arguments is exact; the
    replay reuses the acceptance profile's greedy continuations (one per prompt)."""
    from helpers import char_tokenizer

    computed = []
    real = acceptance.target_continuation

    def counted(*args, **kw):
        computed.append(kw.get("temperature", 0.0))
        return real(*args, **kw)

    monkeypatch.setattr(acceptance, "target_continuation", counted)

    folder = tmp_path / "tiny"
    model = tiny_causal_lm(num_layers=2, seed=11)
    model.save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"id": f"p{i}", "category": "c", "text": t}) + "\n"
                            for i, t in enumerate(["ab ab ab ab ab", "the cat, the cat, the",
                                                   "xyz xyz"])))
    out = tmp_path / "run"
    assert cli_main(["tune", "--target", str(folder), "--draft", "ngram", "--device", "cpu",
                 "--threads", "1", "--dtype", "float32", "--dataset", str(data),
                 "--prompts", "3", "--max-new-tokens", "16", "--width", "2", "--depth", "2",
                 "--tokens", "1,2,4,8,16", "--context", "8", "--repeats", "1", "--warmup", "0",
                 "--max-depth", "6", "--out-dir", str(out), "--quiet",
                 "--dtypes", "float32,bfloat16"]) == 0
    text = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    cands = summary["replay"]["candidates"]
    assert {"chain:2", "chain:7", "len=auto"} <= set(cands) and "chain:8" not in cands
    # tune's rule: the fastest replayed, unless auto replays within ADAPTIVE_MARGIN of it
    rates = {k: c["tokens_per_s"] for k, c in cands.items()}
    fastest = max(rates, key=rates.get)
    auto = [k for k in rates if k.startswith("--draft auto")]
    best = preferred(rates, auto, ADAPTIVE_MARGIN)
    assert best == fastest or rates[fastest] <= (1 + ADAPTIVE_MARGIN) * rates[best]
    assert summary["replay"]["chosen"] == best and summary["method"] == f"replay ({best})"
    assert summary["prediction"]["tokens_per_s"] == pytest.approx(cands[best]["tokens_per_s"],
                                                                  rel=1e-3)
    assert "greedy replay" in text and f"decode with: {summary['decode']}" in text
    assert "per dtype (same replayed steps;" in text and "bfloat16: plain" in text
    # the other model-free drafters were replayed too, capped by the height limit
    assert {"--draft auto:max=6", "--draft suffix:max=6"} <= set(cands)
    assert len(computed) == 3  # the 3 tune prompts, profiled and replayed along once each
    args = shlex.split(summary["decode"])
    tree = load_growmap(args[args.index("--tree") + 1])[0] if "--tree" in args else None
    target = model.float().eval()
    drafter = build_drafter(args[1], target=target, tree=tree)
    ids = torch.tensor([[40, 41, 42, 40, 41, 42, 40]])
    assert generate(target, drafter, ids, max_new_tokens=20).tokens == \
        generate(target, None, ids, max_new_tokens=20).tokens


def test_other_drafters_and_their_decode_spec(target, tmp_path):
    """tune replays auto and the copy drafter it does not tune beside the one it tunes
    (capped by a height limit); choosing one answers with that drafter's spec; an ``auto``
    replay starts from fresh statistics and empty global tries of its own."""
    pair = SimpleNamespace(drafter=build_drafter("ngram", target=target), target=target,
                           tokenizer=None)
    assert [s for s, _ in other_drafters(pair)] == ["auto", "suffix"]
    assert [s for s, _ in other_drafters(pair, 6)] == ["auto:max=6", "suffix:max=6"]
    pair.drafter = build_drafter("suffix", target=target)
    others = other_drafters(pair)
    assert [s for s, _ in others] == ["auto", "ngram"]
    cands = replay_candidates(pair.drafter, chain(draft_tokens=2), 6, None,
                              lambda n: 10.0 + n, others=others)
    opts = {c[0]: c[3] for c in cands}
    assert opts["--draft auto"] == {"spec": "auto"} and opts["--draft ngram"] == {"spec": "ngram"}
    auto = others[0][1]
    conts = continuations(target, PROMPTS, 12)
    first = replay(private(auto), PROMPTS, conts)
    again = private(auto)
    tries = [(c.cache, o.cache) for (_, c), (_, o) in zip(again.copies, auto.copies)
             if getattr(c, "cache", None) is not None]
    assert again.stats is not auto.stats and tries  # the suffix candidate has one
    assert all(mine.tokens == 0 and mine is not theirs for mine, theirs in tries)
    second = replay(again, PROMPTS, conts)
    assert (first.nodes, first.tokens) == (second.nodes, second.tokens)
    # forked (what eval's methods and warm-up use): statistics copied, then independent
    twin = again.forked()
    assert twin.stats["ngram"].tries == again.stats["ngram"].tries != {}
    twin.stats["ngram"].add((0, 0), 1, True)
    assert twin.stats["ngram"].tries != again.stats["ngram"].tries


def test_tuning_a_datastore_replays_auto_with_that_corpus(target, tmp_path):
    """``tune --draft datastore:PATH`` replays ``auto:datastore=(PATH)`` (its decode spec),
    whose candidates include that corpus; a datastore given as an object (no spec) replays
    ``auto`` over the copies alone."""
    path = Datastore.from_token_lists([[40, 41, 42, 43] * 3], max_n=3).save(
        tmp_path / "a store.npz")
    spec = f"datastore:{path}"
    pair = SimpleNamespace(drafter=build_drafter(spec, target=target), target=target,
                           tokenizer=None, draft_spec=spec)
    others = dict(other_drafters(pair))
    assert list(others) == [f"auto:datastore=({path})", "suffix", "ngram"]
    auto = others[f"auto:datastore=({path})"]
    assert [n for n, _ in auto.copies][-1] == "datastore"
    assert list(dict(other_drafters(pair, 6))) == [f"auto:datastore=({path}),max=6",
                                                   "suffix:max=6", "ngram"]
    pair.draft_spec = None
    assert list(dict(other_drafters(pair)))[0] == "auto"
    # tune's "decode with:" line pastes into a shell as it is: parentheses and spaces quoted
    spec = f"auto:datastore=({path})"
    assert shlex.split(decode_args(spec)) == ["--draft", spec]
    assert shlex.split(decode_args(spec, tmp_path / "t x.pt")) == \
        ["--draft", spec, "--tree", str(tmp_path / "t x.pt")]
    assert decode_args("ngram:min=2", "runs/tree.pt") == "--draft ngram:min=2 --tree runs/tree.pt"


def test_a_draft_model_is_weighed_against_the_copy_drafters(target):
    """A drafter that runs a model cannot be replayed; tune then replays the model-free
    drafters along the same continuations and keeps the fastest of them when it beats the
    DP's prediction for the draft model (an early exit that never pays, say)."""
    prompts = [SimpleNamespace(token_ids=p) for p in PROMPTS]
    pair = SimpleNamespace(drafter=build_drafter("early-exit:1", target=target), target=target,
                           tokenizer=None)
    assert replayable(pair.drafter) is not None  # a model: not replayable itself
    lat = Latency(target=LatencyCurve(tokens=[1, 2, 4, 8, 16], ms=[10.0, 10.5, 11, 12, 14]),
                  draft=None, context=8, meta={})
    run = SimpleNamespace(max_new_tokens=16, chat_template=False)
    got = replay_others(pair, prompts, run, SimpleNamespace(max_size=17), lat, SearchSettings())
    assert set(got.predictions) == {"--draft auto", "--draft suffix", "--draft ngram"}
    assert got.options == {"spec": got.label.removeprefix("--draft ")}
    assert isinstance(got.drafter, Drafter) and got.prediction.speedup > 1  # copies pay here
    capped = replay_others(pair, prompts, run, SimpleNamespace(max_size=16), lat,
                           SearchSettings(max_depth=3))
    assert "--draft auto:max=3" in capped.predictions


def test_a_height_limit_caps_auto_with_the_model(target):
    pair = SimpleNamespace(drafter=ModelDrafter(draft_model(), chain(draft_tokens=2)),
                           target=target, tokenizer=None)
    cands = model_candidates(pair, chain(draft_tokens=2), [[0.9], [0.8]], "model:tiny", 2)
    assert cands[1][0] == "--draft auto:draft=(model:tiny),max=2"
    assert cands[1][3] == {"spec": "auto:draft=(model:tiny),max=2"}
