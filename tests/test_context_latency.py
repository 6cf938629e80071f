"""Latency that depends on the context length: multi-context tables (measured, written,
read, interpolated), the hardware-aware choice per context, tree sets, and the per-prompt
choice of a tree set's tree in ``treeopt.generate``, ``treeopt eval`` and ``treeopt generate``
(greedy output still equal to plain decoding)."""

from __future__ import annotations

import json
import types

import pytest
import torch

import treeopt.profile.latency as latency_mod
from treeopt.cli import main
from treeopt.profile import Latency, LatencyCurve, Profile
from treeopt.profile.latency import (
    load_latency,
    measure_latency,
    parse_contexts,
    timing_warnings,
    with_contexts,
    write_latency,
)
from treeopt.profile.model import LatencyError, contexts_of, latencies_by_context
from treeopt.search.hardware import (
    MonotoneCurve,
    choose,
    choose_per_context,
    latency_at,
    predict,
)
from treeopt.shapes import chain
from treeopt.testing import tiny_causal_lm, tiny_pair
from treeopt.tree import Tree
from treeopt.treeset import (
    Bucket,
    TreeSet,
    TreeSetError,
    decode_context,
    from_choices,
    is_treeset_file,
    load_treeset,
    save_treeset,
)

KARY = Tree((-1, 0, 0, 1, 1, 2, 2))  # 7 nodes, two children per node, depth 2
P = [0.9, 0.05]  # rank profile of the hand-made cases
CPU = {"device_type": "cpu", "threads": 1, "device": "cpu"}


def two_contexts(long_target=(10.0, 10.5, 40.0)) -> Latency:
    """Contexts 16 and 64: a flat target at 16; at 64 a target whose forwards of more than
    2 tokens get much dearer. A flat 1 ms draft at both."""
    draft = LatencyCurve([1, 4], [1.0, 1.0])
    short = Latency(LatencyCurve([1, 2, 4], [10.0, 10.0, 10.0]), draft, 16)
    long = Latency(LatencyCurve([1, 2, 4], list(long_target)), draft, 64)
    return with_contexts([long, short], dict(CPU))


# ---------------------------------------------------------------- measuring and files
def test_multi_context_measure_is_interleaved_and_writes_one_loadable_file(tmp_path,
                                                                           monkeypatch):
    import treeopt.decode.attention as attention

    target, draft = tiny_pair()
    order = []
    real = attention.forward_tree

    def spy(model, ids, pos, mask, cache):
        if model is target:
            order.append((int(pos.min()), ids.shape[1]))  # (context, tokens)
        return real(model, ids, pos, mask, cache)

    monkeypatch.setattr(latency_mod, "forward_tree", spy)
    path = tmp_path / "p.json"
    Profile.from_counts([5, 3], 2, meta={"kind": "acceptance"}).save(path)
    lat = measure_latency(target, draft, tokens=[1, 2, 4], draft_tokens=[1, 2],
                          contexts=[64, 16, 64], repeats=2, warmup=1, out=path)
    # every round times every (context, size) pair once, contexts ascending
    assert order == [(16, 1), (16, 2), (16, 4), (64, 1), (64, 2), (64, 4)] * 3
    assert contexts_of(lat) == [16, 64] and lat.context == 16
    assert "partial" not in lat.meta

    loaded = Profile.load(path)  # the acceptance part is kept, the old keys are context 16's
    assert loaded.counts == [5, 3] and loaded.latency.context == 16
    assert loaded.latency.target.tokens == [1, 2, 4]
    tables = latencies_by_context(loaded.latency)
    assert [t.context for t in tables] == [16, 64]
    assert all(t.draft.tokens == [1, 2] and len(t.target.spread_ms) == 3 for t in tables)
    assert tables[0].target == lat.target and tables[1].target != lat.target
    assert load_latency(path) == loaded.latency
    # a profile rewritten by code that knows nothing of contexts keeps them (they live in meta)
    loaded.save(tmp_path / "copy.json")
    assert contexts_of(Profile.load(tmp_path / "copy.json").latency) == [16, 64]


def test_single_context_tables_are_unchanged_and_old_files_load(tmp_path):
    target, _ = tiny_pair()
    one = measure_latency(target, None, tokens=[1, 2], context=8, repeats=1, warmup=0)
    assert "curves_by_context" not in one.meta and contexts_of(one) == [8]
    old = tmp_path / "old.json"  # a file in the single-context format, written by hand
    old.write_text(json.dumps({"format": "treeopt-profile", "version": 1, "meta": {},
                               "acceptance": {"p": P},
                               "latency": {"context": 128, "meta": {},
                                           "target": {"tokens": [1, 2, 4],
                                                      "ms": [10.0, 10.5, 40.0]},
                                           "draft": {"tokens": [1], "ms": [1.0]}}}))
    lat = load_latency(old)
    assert contexts_of(lat) == [128] and latencies_by_context(lat) == [lat]
    assert latency_at(lat, 5000) is lat  # one context prices every context
    base = choose(P, lat, 4, 4)
    assert choose(P, lat, 4, 4, context=5000).tree == base.tree == chain(2)
    assert predict(chain(4), P, lat, context=3).step_ms == predict(chain(4), P, lat).step_ms


def test_malformed_context_lists_are_one_line_errors(tmp_path):
    good = two_contexts()
    entries = good.meta["curves_by_context"]
    cases = {
        "increasing order": [entries[1], entries[0]],
        "differs from the table's own": [entries[1]],
        "unknown field": [dict(entries[0], extra=1), entries[1]],
        "every context needs a draft": [entries[0], {k: v for k, v in entries[1].items()
                                                     if k != "draft"}],
        "non-empty list": [],
    }
    for needle, value in cases.items():
        bad = Latency(good.target, good.draft, good.context,
                      dict(good.meta, curves_by_context=value))
        with pytest.raises(LatencyError, match=needle) as exc:
            latencies_by_context(bad)
        assert "\n" not in str(exc.value)
        with pytest.raises(LatencyError):
            write_latency(bad, tmp_path / "never.json")
    assert not (tmp_path / "never.json").exists()


def test_contexts_beyond_the_window_are_refused_before_timing(monkeypatch):
    import treeopt.decode.attention as attention

    calls = []
    real = attention.forward_tree
    monkeypatch.setattr(latency_mod, "forward_tree",
                        lambda *a: calls.append(1) or real(*a))
    target, _ = tiny_pair(max_positions=64)
    with pytest.raises(LatencyError, match="context 62 \\+ 4 tokens exceeds the model's 64 "
                                           "positions; lower --contexts"):
        measure_latency(target, None, tokens=[1, 4], contexts=[16, 62], repeats=1, warmup=0)
    # the draft model's window counts too, and is checked before the target is timed
    target = tiny_causal_lm(max_positions=512)
    draft = tiny_causal_lm(num_layers=1, max_positions=32, seed=1)
    with pytest.raises(LatencyError, match="exceeds the model's 32 positions"):
        measure_latency(target, draft, tokens=[1, 2], contexts=[16, 40], repeats=1, warmup=0)
    assert calls == []


def test_an_interrupted_run_keeps_every_finished_round(tmp_path, monkeypatch):
    """An exception in the timer after the first round (in the second round, after the
    first context's sizes): the file holds both contexts measured once, marked partial."""
    import treeopt.profile.latency as latency_mod

    target, draft = tiny_pair()
    real = latency_mod._Timer.__call__
    seen = []

    def timer(self, fn):
        seen.append(1)
        if len(seen) == limit:
            raise KeyboardInterrupt
        return real(self, fn)

    monkeypatch.setattr(latency_mod._Timer, "__call__", timer)
    path = tmp_path / "lat.json"
    limit = 4 + 2 + 1  # round 1: 2 contexts x 2 sizes; round 2: context 16 done, then stop
    with pytest.raises(KeyboardInterrupt):
        measure_latency(target, draft, tokens=[1, 2], contexts=[16, 64], repeats=3, warmup=0,
                        out=path)
    kept = load_latency(path)
    assert [t.context for t in latencies_by_context(kept)] == [16, 64]
    assert kept.draft is None and all(t.target.tokens == [1, 2]
                                      for t in latencies_by_context(kept))
    assert kept.meta["partial"] == {"target_repeats": 1, "draft_repeats": 0, "of": 3}
    assert any("interrupted" in w and "1 of 3" in w for w in timing_warnings(kept))

    # interrupted in the draft phase: the target is complete, the draft has its first round
    seen.clear()
    limit = 3 * 4 + 4 + 1
    with pytest.raises(KeyboardInterrupt):
        measure_latency(target, draft, tokens=[1, 2], contexts=[16, 64], repeats=3, warmup=0,
                        out=path)
    kept = load_latency(path)
    assert kept.meta["partial"] == {"target_repeats": 3, "draft_repeats": 1, "of": 3}
    assert all(t.draft.tokens == [1, 2] for t in latencies_by_context(kept))

    # the command says where the rounds are kept
    monkeypatch.setattr(latency_mod._Timer, "__call__", real)
    import treeopt.cli.profile as cli_profile

    monkeypatch.setattr(cli_profile, "load_models",
                        lambda args: (types.SimpleNamespace(target=target, drafter=None),
                                      torch.device("cpu")))

    def stop(*a, **k):
        raise KeyboardInterrupt

    (tmp_path / "cli.json").write_text(path.read_text())
    monkeypatch.setattr(cli_profile, "measure_latency", stop)
    rc = main(["profile", "latency", "--target", "x", "--contexts", "16,64",
               "--out", str(tmp_path / "cli.json")])
    assert rc == 130


def test_bad_contexts_are_one_line_errors(tmp_path, capsys, monkeypatch):
    assert parse_contexts("1024,128, 512,128") == [128, 512, 1024]
    for spec, needle in (("128,x", "comma-separated"), ("0,128", ">= 1"), (",", ">= 1")):
        with pytest.raises(LatencyError, match=needle) as exc:
            parse_contexts(spec)
        assert str(exc.value).startswith(f"--contexts {spec!r}")
    import treeopt.cli.profile as cli_profile

    target = tiny_causal_lm(max_positions=64)
    monkeypatch.setattr(cli_profile, "load_models",
                        lambda args: (types.SimpleNamespace(target=target, drafter=None),
                                      torch.device("cpu")))
    out = str(tmp_path / "l.json")
    for extra in (["--contexts", "16,x"], ["--contexts", "-4"],
                  ["--contexts", "16,60", "--tokens", "1,8"]):
        assert main(["profile", "latency", "--target", "x", "--out", out, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--contexts" in err[0], (extra, err)
    with pytest.raises(SystemExit):  # --context and --contexts exclude each other
        main(["profile", "latency", "--target", "x", "--out", out, "--context", "8",
              "--contexts", "16,32"])
    assert not (tmp_path / "l.json").exists()


def test_profile_latency_command_with_contexts(tmp_path, capsys, monkeypatch):
    import treeopt.cli.profile as cli_profile

    target = tiny_causal_lm()
    monkeypatch.setattr(cli_profile, "load_models",
                        lambda args: (types.SimpleNamespace(target=target, drafter=None),
                                      torch.device("cpu")))
    out = tmp_path / "l.json"
    args = ["profile", "latency", "--target", "x", "--contexts", "16,8", "--tokens", "1,2",
            "--repeats", "2", "--warmup", "0", "--dtypes", "none", "--out", str(out)]
    capsys.readouterr()
    assert main(args) == 0
    printed, err = capsys.readouterr()
    assert "latency target (4 points)" in err  # 2 contexts x 2 sizes per round
    assert "contexts 8, 16" in printed and "target at 8:" in printed \
        and "target at 16:" in printed
    assert contexts_of(load_latency(out)) == [8, 16]
    assert main(args + ["--quiet"]) == 0
    assert "latency target" not in capsys.readouterr().err


# ---------------------------------------------------------------- pricing by context
def test_interpolation_between_contexts_hand_checked():
    lat = two_contexts()
    mid = latency_at(lat, 40)  # w = (40 - 16) / (64 - 16) = 0.5
    env = MonotoneCurve(mid.target)
    assert [env(n) for n in (1, 2, 3, 4)] == pytest.approx([10.0, 10.25, 17.625, 25.0])
    assert latency_at(lat, 16).target.ms == [10.0, 10.0, 10.0]
    assert latency_at(lat, 64).target.ms == [10.0, 10.5, 40.0]
    # clamped at the ends: never extrapolated in the context
    assert latency_at(lat, 1).target == latency_at(lat, 16).target
    assert latency_at(lat, 10**6).target == latency_at(lat, 64).target
    # at 28: w = 0.25; chain:4 costs 3 draft levels of 1 ms + verify(4) = 10 + 30 w
    pred = predict(chain(4), P, lat, context=28)
    assert pred.verify_ms == pytest.approx(17.5) and pred.draft_ms == pytest.approx(3.0)
    assert pred.plain_ms == pytest.approx(10.0)
    # what is interpolated is the envelope: a dip at context 64 is priced at its envelope
    dip = two_contexts(long_target=(10.0, 12.0, 11.0))
    assert MonotoneCurve(latency_at(dip, 40).target)(4) == pytest.approx((10.0 + 12.0) / 2)


def test_choice_per_context_short_big_tree_long_chain2():
    """Short context: flat target, so chain:4 (F = 3.439, 13 ms) beats chain:3 (2.71, 12) and
    chain:2 (1.9, 11). Long context: verifying 4 tokens costs 40 ms, so chain:2 (11.5 ms)
    wins. Between them ms/token is linear in the context; they cross at w = 13.129 / 55.2805."""
    lat = two_contexts()
    assert choose(P, lat, 4, 4, context=16).tree == chain(4)
    assert choose(P, lat, 4, 4, context=64).tree == chain(2)
    assert choose(P, lat, 4, 4).tree == chain(4)  # no context: the first one's, as before
    far = choose(P, lat, 4, 4, context=5000)
    assert far.tree == chain(2) and far.context == 5000
    assert any("outside the measured contexts 16..64" in n for n in far.notes)

    f4, f2 = 1 + 0.9 + 0.81 + 0.729, 1.9
    w = (11 * f4 - 13 * f2) / (30 * f2 - 0.5 * f4)  # (13 + 30w) / f4 = (11 + 0.5w) / f2
    cross = 16 + 48 * w  # 27.4
    per = choose_per_context(P, lat, 4, 4)
    assert [(c.start, c.end, c.context, c.choice.tree) for c in per] == [
        (0, int(cross) + 1, 16, chain(4)), (int(cross) + 1, None, 64, chain(2))]
    assert per[0].choice.speedup == pytest.approx(10 * f4 / 13)
    assert per[1].choice.speedup == pytest.approx(10 * f2 / 11.5)
    # the boundary is where the two are predicted equally fast
    for c, faster in ((int(cross), chain(4)), (int(cross) + 1, chain(2))):
        a, b = (predict(t, P, lat, context=c) for t in (chain(4), chain(2)))
        best = chain(4) if a.step_ms / a.expected_tokens < b.step_ms / b.expected_tokens \
            else chain(2)
        assert best == faster


# ---------------------------------------------------------------- tree sets
def test_tree_set_round_trip_and_errors(tmp_path):
    ts = from_choices(choose_per_context(P, two_contexts(), 4, 4), {"profile": "hand"})
    path = save_treeset(ts, tmp_path / "ts.json")
    assert is_treeset_file(path) and not is_treeset_file(tmp_path / "missing.json")
    back = load_treeset(path)
    assert back == ts and back.trees == [chain(4), chain(2)]
    assert [b.context for b in back.buckets] == [16, 64] and back.meta == {"profile": "hand"}
    assert back.buckets[1].info["predicted_speedup"] == pytest.approx(10 * 1.9 / 11.5,
                                                                      abs=1e-6)
    assert back.index_for(0) == 0 and back.index_for(27) == 0 and back.index_for(28) == 1
    assert decode_context(20, 16) == 28 and back.pick(20, 16) == (1, chain(2))
    assert back.pick(19, 16) == (0, chain(4)) and back.span(0) == "0..27"
    doc = json.loads(path.read_text())
    assert doc["format"] == "treeopt-treeset" and doc["buckets"][0]["parents"] == [-1, 0, 1, 2]

    def broken(edit, needle):
        d = json.loads(path.read_text())
        edit(d)
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(d))
        with pytest.raises(TreeSetError, match=needle) as exc:
            load_treeset(bad)
        assert "\n" not in str(exc.value) and str(bad) in str(exc.value)

    broken(lambda d: d["buckets"][1].update(from_context=0), "must increase")
    broken(lambda d: d["buckets"][0].update(from_context=3), "start at context 0")
    broken(lambda d: d["buckets"][0].update(parents=[-1, 0, 2]), "bad 'parents'")
    broken(lambda d: d["buckets"][0].update(size=9), "'size' = 9 but its tree has size 4")
    broken(lambda d: d["buckets"][0].update(parents=[-1] + [0] * 5000), "exceed the limit")
    broken(lambda d: d.update(buckets=[]), "non-empty list")
    broken(lambda d: d.update(rule="prompt tokens"), "picks buckets by")
    profile = tmp_path / "profile.json"
    Profile.from_counts([5, 3], 2).save(profile)
    with pytest.raises(TreeSetError, match="refusing to overwrite"):
        save_treeset(ts, profile)
    with pytest.raises(TreeSetError):
        TreeSet((Bucket(0, chain(2)), Bucket(0, chain(3))))


def test_search_writes_a_tree_set_and_reports_every_context(tmp_path, capsys):
    profile = tmp_path / "p.json"
    Profile(P, latency=two_contexts()).save(profile)
    out = tmp_path / "set.json"
    assert main(["search", "--profile", str(profile), "--max-size", "4", "--max-levels", "4",
                 "--out", str(out)]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "tree set (2 context ranges" in text and f"treeset: {out}" in text
    assert "contexts 0..27 (chosen at context 16): size 4, depth 3" in text
    assert "contexts 28+ (chosen at context 64): size 2, depth 1" in text
    assert load_treeset(out).trees == [chain(4), chain(2)]
    # one context asked for: one growmap, priced there
    from treeopt.growmap import load_growmap

    assert main(["search", "--profile", str(profile), "--max-size", "4", "--max-levels", "4",
                 "--context", "64", "--out", str(tmp_path / "g.pt")]) == 0
    tree, meta = load_growmap(tmp_path / "g.pt")
    assert tree == chain(2) and meta["context"] == 64
    # a growmap path cannot take a tree set
    assert main(["search", "--profile", str(profile), "--max-size", "4",
                 "--out", str(tmp_path / "x.pt")]) == 2
    assert "written as .json" in capsys.readouterr().err


# ---------------------------------------------------------------- decoding with a tree set
SET = TreeSet((Bucket(0, KARY), Bucket(20, chain(2))))  # decode context = prompt + new // 2


def _plain(target, ids, n):
    from treeopt.decode.engine import generate

    return generate(target, None, torch.tensor([ids]), max_new_tokens=n).tokens


def test_eval_picks_each_prompts_tree_and_stays_exact(tmp_path):
    from treeopt.decode.engine import generate
    from treeopt.evaluate.methods import drafter_method, tree_method
    from treeopt.evaluate.runner import EvalConfig, run_eval

    target, draft = tiny_pair()
    path = save_treeset(SET, tmp_path / "set.json")
    short, long = list(range(3, 8)), list(range(10, 40))  # 5 + 4 -> range 0; 30 + 4 -> 1
    used = []

    def spy(target, drafter, input_ids, **kw):
        gen = generate(target, drafter, input_ids, **kw)
        if drafter is not None:
            used.append((input_ids.shape[1], drafter.shape, gen.tokens))
        return gen

    methods = [tree_method(str(path)), drafter_method(f"early-exit:1@{path}")]
    assert methods[0].name == f"treeset:{path}" and methods[1].treeset == SET
    assert methods[0].to_dict()["treeset"] == SET.to_dict()
    res = run_eval(target, draft, [short, long], methods, generate=spy, progress=False,
                   config=EvalConfig(max_new_tokens=8, warmup=False), profile=Profile(P))
    rows = res.rows
    for name in (m.name for m in methods):
        mine = rows[rows["method"] == name].sort_values("prompt_tokens")
        assert list(mine["tree_bucket"]) == [0, 1] and list(mine["tree_nodes"]) == [7, 2]
        assert list(mine["exactness"]) == ["equal", "equal"]
    assert sorted((n, shape) for n, shape, _ in used) == [(5, KARY), (5, KARY),
                                                          (30, chain(2)), (30, chain(2))]
    for n, _, tokens in used:  # token-equal to plain decoding
        assert tokens == _plain(target, short if n == 5 else long, 8)
    tree_rows = rows[rows["method"] == methods[0].name].sort_values("prompt_tokens")
    assert list(tree_rows["expected_tokens_per_step"]) == pytest.approx(
        [KARY.expected_tokens(P), chain(2).expected_tokens(P)])


def test_generate_picks_the_tree_by_prompt_length_and_equals_plain(tmp_path):
    from helpers import tiny_tokenizer

    import treeopt
    from treeopt.models.loading import early_exit_draft

    target = tiny_causal_lm(num_layers=3, seed=7)
    tok = tiny_tokenizer()
    path = save_treeset(SET, tmp_path / "set.json")
    for words, size in ((3, 7), (30, 2)):
        prompt = " ".join(f"w{5 + i}" for i in range(words))
        text, stats = treeopt.generate(prompt, target=target, draft=early_exit_draft(target, 1),
                                       tokenizer=tok, tree=str(path), max_new_tokens=8,
                                       chat_template=False)
        plain, _ = treeopt.generate(prompt, target=target, tokenizer=tok, max_new_tokens=8,
                                    chat_template=False)
        assert text == plain
        # the steps verified that tree (the last ones may trim it to the tokens still due)
        assert stats.steps[0].nodes == size == max(s.nodes for s in stats.steps)


def test_cli_generate_with_a_tree_set(tmp_path, capsys):
    from helpers import tiny_tokenizer, without_notices

    target = tiny_causal_lm(num_layers=3, seed=7)
    folder = tmp_path / "tiny"
    target.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    path = save_treeset(SET, tmp_path / "set.json")
    prompt = " ".join(f"w{5 + i}" for i in range(30))
    capsys.readouterr()
    assert main(["generate", "--target", str(folder), "--draft", "early-exit:1", "--growmap",
                 str(path), "--prompt", prompt, "--max-new-tokens", "6",
                 "--no-chat-template", "--stats-json", "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    lines = without_notices(err).strip().splitlines()
    assert lines[0].startswith("tree set: 30 prompt tokens + 6 // 2 new tokens -> contexts 20+")
    stats = json.loads(lines[-1])
    assert stats["tree_bucket"] == 1 and stats["tree_nodes"] == 2
    expect = _plain(target, list(range(5, 35)), 6)
    assert out == tiny_tokenizer().decode(expect, skip_special_tokens=True) + "\n"


def test_tune_with_contexts_writes_a_tree_set(tmp_path, capsys):
    from helpers import char_tokenizer

    folder = tmp_path / "tiny"
    tiny_causal_lm(num_layers=2, seed=11).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"id": f"p{i}", "category": "c", "text": t}) + "\n"
                            for i, t in enumerate(["The cat sat on", "Say hi"])))
    out = tmp_path / "run"
    args = ["tune", "--target", str(folder), "--draft", "early-exit:1", "--device", "cpu",
            "--threads", "1", "--dataset", str(data), "--prompts", "2", "--max-new-tokens", "6",
            "--width", "3", "--depth", "2", "--tokens", "1,2,4", "--repeats", "1",
            "--warmup", "0", "--max-levels", "4", "--out-dir", str(out), "--quiet"]
    capsys.readouterr()
    assert main(args + ["--context", "8", "--contexts", "8,16"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(args + ["--contexts", "16,8"]) == 0
    text = capsys.readouterr().out
    assert "contexts 8, 16" in text and "tree set (2 context ranges" in text
    ts = load_treeset(out / "treeset.json")
    assert [b.context for b in ts.buckets] == [8, 16] and ts.buckets[0].start == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [b["context"] for b in summary["treeset"]] == [8, 16]
    assert summary["treeset_file"] == "treeset.json"
    latency = Profile.load(out / "profile.json").latency
    assert contexts_of(latency) == [8, 16] and "partial" not in latency.meta
    # tree.pt holds the smallest context's choice, as a single-context reader would make it
    from treeopt.growmap import load_growmap

    assert load_growmap(out / "tree.pt")[0] == ts.trees[0]


def test_a_tree_set_is_not_taken_for_a_growmap(tmp_path):
    from treeopt.growmap import GrowmapError, load_growmap

    path = save_treeset(SET, tmp_path / "set.json")
    with pytest.raises(GrowmapError, match="a tree set .* not a growmap") as exc:
        load_growmap(path)
    assert "\n" not in str(exc.value)
