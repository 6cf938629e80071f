"""CLI: profile acceptance/latency/merge, search --method optuna and tune on a tiny model folder."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import char_tokenizer

import treeopt
import treeopt.tuning
from treeopt.cli import main
from treeopt.growmap import load_growmap
from treeopt.models.machine import Machine
from treeopt.profile import Latency, LatencyCurve, Profile
from treeopt.profile.replay import Replay, ReplayChoice
from treeopt.search.api import SearchSettings
from treeopt.shapes import chain
from treeopt.testing import tiny_causal_lm
from treeopt.tuning import AcceptanceSettings

PROMPTS = ["The cat sat on", "Write a poem", "What is 2+2?", "Name three colours",
           "Explain gravity", "Say hi", "Count to five"]



@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune")
    model = tiny_causal_lm(num_layers=2, seed=11)
    model.save_pretrained(root / "tiny")
    char_tokenizer().save_pretrained(root / "tiny")
    data = root / "prompts.jsonl"
    data.write_text("".join(json.dumps({"id": f"p{i}", "category": "c", "text": t}) + "\n"
                            for i, t in enumerate(PROMPTS)))
    return root


def model_args(ws):
    return ["--target", str(ws / "tiny"), "--draft", "early-exit:1", "--device", "cpu",
            "--threads", "1"]


def test_profile_acceptance_cli_resume_and_latency(workspace, tmp_path, capsys):
    out = tmp_path / "acc.json"
    args = ["profile", "acceptance", *model_args(workspace), "--dataset",
            str(workspace / "prompts.jsonl"), "--prompts", "3", "--max-new-tokens", "6",
            "--width", "3", "--depth", "2", "--out", str(out), "--quiet"]
    assert main(args) == 0
    first = Profile.load(out)
    assert first.meta["prompts_done"] == 3 and first.meta["settings"]["width"] == 3
    assert sum(first.counts) + first.none_count == 3 * 5  # token 0 of each comes from prefill
    assert main(args) == 2  # would overwrite a resumable profile
    assert "--resume" in capsys.readouterr().err
    assert main(args + ["--resume"]) == 0
    assert Profile.load(out).counts == first.counts

    assert main(["profile", "latency", *model_args(workspace), "--tokens", "1,2,4",
                 "--context", "8", "--repeats", "2", "--warmup", "0", "--out", str(out)]) == 0
    both = Profile.load(out)
    assert both.counts == first.counts and both.latency.target.tokens == [1, 2, 4]
    assert both.latency.draft is not None and both.latency.meta["target"].endswith("tiny")


def test_search_optuna_replay_cli(workspace, tmp_path, capsys):
    prof = tmp_path / "p.json"
    Profile.from_counts([30, 10, 5], 55, meta={}).save(prof)
    out = tmp_path / "g.json"
    assert main(["search", "--method", "optuna", "--objective", "replay", "--profile", str(prof),
                 "--budget", "6", "--max-levels", "4", "--trials", "6",
                 "--target", str(workspace / "tiny"), "--draft", "early-exit:1",
                 "--device", "cpu", "--dataset", str(workspace / "prompts.jsonl"),
                 "--prompts", "2", "--max-new-tokens", "8", "--out", str(out)]) == 0
    tree, meta = load_growmap(out)
    assert meta["objective"] == "replay" and meta["score"] >= meta["dp_score"]
    assert tree.size <= 6 and tree.depth <= 3 and meta["max_levels"] == 4
    assert "dp:" in capsys.readouterr().out


def test_tune_end_to_end(workspace, tmp_path, capsys):
    out_dir = tmp_path / "run"
    assert main(["tune", *model_args(workspace), "--dataset", str(workspace / "prompts.jsonl"),
                 "--prompts", "2", "--max-new-tokens", "6", "--width", "3", "--depth", "2",
                 "--tokens", "1,2,4", "--context", "8", "--repeats", "1", "--warmup", "0",
                 "--max-levels", "4", "--optuna-trials", "3", "--out-dir", str(out_dir),
                 "--quiet", "--this-drafter-only"]) == 0  # the DP's choice for the draft
    text = capsys.readouterr().out
    assert "best tree" in text and "predicted step" in text
    tree, meta = load_growmap(out_dir / "tree.pt")
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["tree"]["size"] == tree.size <= 4
    assert (out_dir / "tree.png").stat().st_size > 0
    prof = Profile.load(out_dir / "profile.json")
    assert prof.latency is not None and prof.counts is not None
    from treeopt.profile.model import reliable_table

    assert meta["expected_tokens"] == pytest.approx(tree.expected_tokens(reliable_table(prof)))
    assert meta["max_levels"] == 4 and meta["depth"] == tree.depth <= 3
    assert "limit 4 levels = depth 3" in text
    # the prefill of the tune prompts was timed (target and draft) and kept in the profile;
    # the whole-generation prediction is the per-step one carried over those prefills
    from treeopt.search.hardware import end_to_end, prefill_costs

    timed = prof.latency.meta["prefill"]
    assert len(timed["prompt_tokens"]) == 2 and min(timed["target_ms"]) > 0
    assert min(timed["draft_ms"]) > 0  # the early exit prefills its own cache
    pred, whole = summary["prediction"], summary["prediction"]["whole"]
    drafts = tree.size > 1  # a one-node tree is plain decoding: no drafter starts
    assert whole["new_tokens"] == 6 and (whole["draft_prefill_ms"] > 0) == drafts
    lengths = timed["prompt_tokens"]  # both tune prompts were timed
    assert whole["speedup"] == pytest.approx(end_to_end(
        pred["speedup"], pred["plain_ms"], prefill_costs(prof.latency),
        [(n, 6) for n in lengths], draft=drafts))
    assert "whole generations, prefill included" in text


def test_search_on_the_profile_tune_wrote_picks_tunes_tree(workspace, tmp_path, capsys):
    """The same steps give the same tree: ``tune`` used the per-level draft cost while
    ``search`` and ``compare`` defaulted to Sequoia's (and another rank table)."""
    out_dir = tmp_path / "run"
    # the DP's tree for the draft given (not a copy drafter replayed faster)
    assert main(tune_args(workspace, out_dir, "--max-size", "4", "--this-drafter-only")) == 0
    tuned, meta = load_growmap(out_dir / "tree.pt")
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["draft_cost"] == meta["draft_cost"] == "per-level"
    text = capsys.readouterr().out
    assert "draft cost per-level" in text
    for flags in (["--max-levels", "4"], ["--max-depth", "3"]):
        searched = tmp_path / f"s{flags[0]}.pt"
        assert main(["search", "--profile", str(out_dir / "profile.json"), "--max-size", "4",
                     *flags, "--out", str(searched)]) == 0
        tree, smeta = load_growmap(searched)
        assert tree == tuned
        assert smeta["expected_tokens"] == pytest.approx(meta["expected_tokens"], abs=1e-12)
        assert smeta["predicted_tokens_per_s"] == pytest.approx(meta["predicted_tokens_per_s"])
    import treeopt

    again = treeopt.search_tree(out_dir / "profile.json",
                                search=SearchSettings(max_levels=4, max_size=4))
    assert again.tree == tuned
    # compare prices it the same way too
    capsys.readouterr()
    assert main(["compare", "--profile", str(out_dir / "profile.json"),
                 str(out_dir / "tree.pt")]) == 0
    row = capsys.readouterr().out.splitlines()[2].split()
    assert float(row[3]) == pytest.approx(meta["expected_tokens"], abs=5e-5)
    assert float(row[5]) == pytest.approx(meta["predicted_tokens_per_s"], abs=0.05)


def test_tune_in_python(workspace, tmp_path, monkeypatch):
    """``treeopt.tune`` runs the whole pipeline without the CLI; the size derived from a
    latency table is clamped to the tree-size cap (the user did not type it)."""
    import treeopt
    import treeopt.pipeline
    import treeopt.tuning
    from treeopt.limits import MAX_TREE_NODES
    from treeopt.profile import Latency, LatencyCurve

    far = Latency(LatencyCurve([1, 2, 10**7], [10.0, 11.0, 1e6]), LatencyCurve([1], [1.0]),
                  context=8, meta={"device_type": "cpu", "threads": 1, "device": "cpu"})
    monkeypatch.setattr(treeopt.tuning, "measure_latency", lambda *a, **k: far)
    run = treeopt.tune(str(workspace / "tiny"), "early-exit:1", PROMPTS[:2],
                       acceptance=AcceptanceSettings(prompts=2, max_new_tokens=6, width=3, depth=2),
                       search=SearchSettings(max_levels=3),
                       machine=Machine(device="cpu", threads=1))
    assert run.files == {} and run.search.max_size == MAX_TREE_NODES
    assert run.search.max_levels == 3 and run.tree.depth <= 2
    assert run.profile.latency is far and run.summary["draft_cost"] == "per-level"
    # the tree (or what replayed faster) is predicted by its replay along the tune prompts;
    # the replays time drafting as decoding does, so which one wins is the machine's to say
    chosen = run.summary["replay"]["chosen"]
    replayed = run.summary["replay"]["candidates"][chosen]
    assert run.prediction.expected_tokens == pytest.approx(replayed["tokens_per_step"],
                                                           abs=1e-4)
    if chosen == "tuned tree":  # the DP's tree for the profile, priced by its replay
        dp = treeopt.search_tree(run.profile, search=SearchSettings(max_levels=3)).tree
        assert run.tree == dp and run.draft_spec is None
        assert run.method == "dp + hardware-aware, priced by replay"
    else:  # another drafter replayed faster: its shape and its spec, within the 3 levels
        assert run.tree == run.replay.tree and run.method == f"replay ({chosen})"
        assert run.draft_spec == run.replay.options["spec"]
    with pytest.raises(treeopt.pipeline.PipelineError, match="max_size = 5000 exceeds"):
        treeopt.tune(str(workspace / "tiny"), "early-exit:1", PROMPTS[:2],
                     search=SearchSettings(max_size=5000))
    with pytest.raises(treeopt.pipeline.PipelineError, match="not both"):
        treeopt.tune(str(workspace / "tiny"), "early-exit:1", PROMPTS[:2],
                     search=SearchSettings(max_levels=3, max_depth=2))
    out_dir = tmp_path / "py"
    done = treeopt.tune(str(workspace / "tiny"), "early-exit:1", PROMPTS[:2], out_dir=out_dir,
                        acceptance=AcceptanceSettings(prompts=2, max_new_tokens=6, width=3,
                                                      depth=2),
                        search=SearchSettings(max_levels=3),
                        machine=Machine(device="cpu", threads=1))
    assert set(done.files) == {"profile", "growmap", "growmap_json", "picture", "summary"}
    assert load_growmap(done.files["growmap"])[0] == done.tree
    with pytest.raises(treeopt.pipeline.PipelineError, match="exists"):
        treeopt.tune(str(workspace / "tiny"), "early-exit:1", PROMPTS[:2], out_dir=out_dir)


def tune_args(ws, out_dir, *extra):
    return ["tune", *model_args(ws), "--dataset", str(ws / "prompts.jsonl"), "--prompts", "3",
            "--max-new-tokens", "6", "--width", "3", "--depth", "2", "--tokens", "1,2,4",
            "--context", "8", "--repeats", "1", "--warmup", "0", "--max-levels", "4",
            "--out-dir", str(out_dir), "--quiet", *extra]


def test_tune_ctrl_c_says_where_the_profile_is_and_how_to_resume(workspace, tmp_path,
                                                                 monkeypatch, capsys):
    import treeopt.profile.acceptance as acceptance

    real = acceptance.measure_prompt
    calls = []

    def interrupt_on_second(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(acceptance, "measure_prompt", interrupt_on_second)
    out_dir = tmp_path / "run"
    assert main(tune_args(workspace, out_dir)) == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("treeopt tune: interrupted")
    assert str(out_dir / "profile.json") in err and "--resume" in err
    assert Profile.load(out_dir / "profile.json").meta["prompts_done"] == 1
    monkeypatch.setattr(acceptance, "measure_prompt", real)
    assert main(tune_args(workspace, out_dir, "--resume")) == 0
    assert Profile.load(out_dir / "profile.json").meta["prompts_done"] == 3


def test_tune_measured_sizes_only(workspace, tmp_path, capsys, monkeypatch):
    """Only timed sizes: the other drafters, which draft steps of any size, are not replayed
    beside a draft model's tree (whose answer could otherwise be a self-sizing drafter)."""
    def no_replay(*a, **k):
        raise AssertionError("replayed other drafters under --measured-sizes-only")

    monkeypatch.setattr(treeopt.tuning, "replay_others", no_replay)
    out_dir = tmp_path / "m"
    assert main(tune_args(workspace, out_dir, "--max-size", "7", "--measured-sizes-only")) == 0
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["measured_sizes_only"] is True and summary["tree"]["size"] in (1, 2, 4)
    assert isinstance(summary["warnings"], list)
    _, meta = load_growmap(out_dir / "tree.pt")
    assert meta["measured_sizes_only"] is True
    latency_meta = Profile.load(out_dir / "profile.json").latency.meta
    assert {"threads", "omp_wait_policy", "kernels"} <= set(latency_meta)


def test_profile_latency_warns_about_noisy_and_falling_points(monkeypatch, tmp_path, capsys):
    import types

    import torch

    import treeopt.cli.profile as cli_profile
    from treeopt.profile import Latency, LatencyCurve

    fake = Latency(LatencyCurve([1, 2, 4], [10.0, 30.0, 12.0], [1.0, 12.0, 1.0]),
                   context=8, meta={"device_type": "cpu", "threads": 1})
    monkeypatch.setattr(cli_profile, "load_models",
                        lambda args: (types.SimpleNamespace(target=None, drafter=None),
                                      torch.device("cpu")))
    monkeypatch.setattr(cli_profile, "measure_latency", lambda *a, **k: fake)
    assert main(["profile", "latency", "--target", "x", "--out", str(tmp_path / "l.json")]) == 0
    err = capsys.readouterr().err
    assert "IQR exceeds 25% of the median at 2" in err and "falls" in err
    assert "--threads 1" in err and "--repeats" in err


def _subparser(parser, *names):
    for name in names:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


def test_help_texts_match_the_code():
    from treeopt.cli import build_parser
    from treeopt.cli.tune import CPU_LATENCY

    parser = build_parser()
    tune = _subparser(parser, "tune")
    text = " ".join(tune.format_help().split())
    assert tune.get_default("depth") == 4 and "acceptance row (default 4)" in text
    assert f"default {CPU_LATENCY['repeats']} on CPU" in text and CPU_LATENCY["repeats"] >= 10
    assert "--measured-sizes-only" in text
    prof, acc, lat = (_subparser(parser, "profile"), _subparser(parser, "profile", "acceptance"),
                      _subparser(parser, "profile", "latency"))
    assert len({prof.description, acc.description, lat.description}) == 3
    assert "sibling rank" in acc.description and "--repeats" in lat.description
    for bench in ("attention", "verify"):
        sub = _subparser(parser, "bench", bench)
        undocumented = [a.dest for a in sub._actions if not a.help]
        assert undocumented == [], (bench, undocumented)
    gen = _subparser(parser, "generate")
    assert any("--threads" in a.option_strings for a in gen._actions)


def test_tune_writes_summary_atomically(workspace, tmp_path, monkeypatch):
    """``summary.json`` went through ``Path.write_text``: an interruption could leave it
    truncated. It is written with ``treeopt.limits.atomic_write`` like every other output."""
    import treeopt
    import treeopt.limits as limits
    import treeopt.tuning
    from treeopt.profile import Latency, LatencyCurve

    fake = Latency(LatencyCurve([1, 2, 4], [10.0, 11.0, 12.0]), LatencyCurve([1, 4], [1.0, 1.2]),
                   context=8, meta={"device_type": "cpu", "threads": 1, "device": "cpu"})
    monkeypatch.setattr(treeopt.tuning, "measure_latency", lambda *a, **k: fake)
    real, written = limits.atomic_write, []

    def spy(path, write, **kw):
        written.append(Path(path).name)
        return real(path, write, **kw)

    monkeypatch.setattr(limits, "atomic_write", spy)
    run = treeopt.tune(str(workspace / "tiny"), "early-exit:1", PROMPTS[:2], out_dir=tmp_path,
                       acceptance=AcceptanceSettings(prompts=2, max_new_tokens=6, width=3, depth=2),
                       search=SearchSettings(max_levels=3),
                       machine=Machine(device="cpu", threads=1))
    assert "summary.json" in written
    assert json.loads(run.files["summary"].read_text()) == run.summary
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_tune_prints_defaults_first_and_shows_latency_progress(workspace, tmp_path,
                                                               monkeypatch, capsys):
    """The "defaults on cpu" line came only after a minute or more of profiling, and the
    latency phase showed nothing while it ran: the line now comes before profiling starts
    and the latency phase has a progress bar on stderr (silenced by --quiet)."""
    import treeopt.tuning as pipeline

    real = pipeline.measure_acceptance
    seen = []

    def acceptance(*args, **kw):
        seen.append(capsys.readouterr().out)  # printed before profiling started
        return real(*args, **kw)

    monkeypatch.setattr(pipeline, "measure_acceptance", acceptance)
    args = ["tune", *model_args(workspace), "--dataset", str(workspace / "prompts.jsonl"),
            "--prompts", "2", "--max-new-tokens", "6", "--width", "3", "--depth", "2",
            "--tokens", "1,2,4", "--context", "8", "--repeats", "1", "--max-levels", "4"]
    assert main(args + ["--out-dir", str(tmp_path / "a")]) == 0
    assert "defaults on cpu" in seen[0] and "warmup 2" in seen[0]
    captured = capsys.readouterr()
    assert "defaults on" not in captured.out  # said once, at the start
    assert "latency target" in captured.err and "latency draft" in captured.err
    assert main(args + ["--out-dir", str(tmp_path / "b"), "--quiet"]) == 0
    assert "defaults on cpu" in seen[1]
    err = capsys.readouterr().err
    assert "latency target" not in err and "latency draft" not in err


def test_a_resumed_tune_keeps_only_a_finished_latency_of_the_same_settings(tmp_path):
    """A resumed tune chooses from the costs the interrupted one measured when that
    measurement finished with the same settings, device, dtype and threads; anything else
    (interrupted, other repeats or sizes, no prefill times, another thread count) is
    measured again."""
    import torch

    from treeopt.profile import Latency, LatencyCurve
    from treeopt.profile.latency import device_name, write_latency
    from treeopt.testing import tiny_causal_lm
    from treeopt.tuning import finished_latency

    target = tiny_causal_lm("llama")
    meta = {"repeats": 3, "warmup": 1, "threads": torch.get_num_threads(),
            "dtype": "float32", "device": device_name(torch.device("cpu")),
            "prefill": {"prompt_tokens": [9], "target_ms": [1.0], "draft_ms": [0.1]}}
    settings = {"tokens": [1, 2, 4], "context": 8, "repeats": 3, "warmup": 1}
    path = tmp_path / "profile.json"

    def kept(**changes):
        lat = Latency(LatencyCurve([1, 2, 4], [1.0, 1.2, 1.5]), LatencyCurve([1], [0.1]), 8,
                      {k: v for k, v in {**meta, **changes}.items() if v is not None})
        write_latency(lat, path)
        return finished_latency(path, target, settings, None)

    assert kept() is not None and kept().target.ms == [1.0, 1.2, 1.5]
    assert kept(partial={"target_repeats": 1, "of": 3}) is None
    assert kept(repeats=5) is None and kept(prefill=None) is None
    assert kept(threads=torch.get_num_threads() + 1) is None and kept(dtype="bfloat16") is None
    assert finished_latency(path, target, {**settings, "tokens": [1, 2]}, None) is None
    assert finished_latency(path, target, settings, [8, 64]) is None  # other contexts
    assert finished_latency(tmp_path / "missing.json", target, settings, None) is None


def test_plain_decoding_is_predicted_without_the_drafts_prefill(workspace, monkeypatch):
    """When no tree pays (a draft forward costs more than a target one), tune answers plain
    decoding, which starts no drafter: its whole-generation prediction is 1.00x, with no
    draft prefill charged (as a user saw 0.94x on SmolLM2's early exit before)."""
    import treeopt
    import treeopt.tuning
    from treeopt.profile import Latency, LatencyCurve

    dear = Latency(LatencyCurve([1, 2, 4], [10.0, 11.0, 12.0]), LatencyCurve([1], [1000.0]),
                   context=8, meta={"device_type": "cpu", "threads": 1, "device": "cpu"})
    monkeypatch.setattr(treeopt.tuning, "measure_latency", lambda *a, **k: dear)
    run = treeopt.tune(str(workspace / "tiny"), "early-exit:1", PROMPTS[:2],
                       acceptance=AcceptanceSettings(prompts=2, max_new_tokens=6, width=3,
                                                     depth=2),
                       search=SearchSettings(other_drafters=False),
                       machine=Machine(device="cpu", threads=1))
    assert run.tree.size == 1 and run.prediction.speedup == pytest.approx(1.0)
    whole = run.summary["prediction"]["whole"]
    assert min(dear.meta["prefill"]["draft_ms"]) > 0  # the early exit's start was timed
    assert whole["draft_prefill_ms"] == 0.0 and whole["speedup"] == pytest.approx(1.0)


@pytest.mark.parametrize("winner", ["tuned tree", "--draft auto:draft=(early-exit:1)"])
def test_a_draft_model_tune_answers_auto_only_when_it_replays_faster_than_the_tree(
        workspace, monkeypatch, winner):
    """For a draft model tune replays the tuned tree beside ``auto:draft=`` (and the copy
    drafters): the tree stays the answer when its replay is the fastest; otherwise tune
    answers the faster one's spec, predicts its replay, and (``auto`` running the draft)
    charges the draft's prefill."""
    lat = Latency(LatencyCurve([1, 2, 4], [10.0, 10.5, 11.0]), LatencyCurve([1], [1.0]),
                  context=8, meta={"device_type": "cpu", "threads": 1, "device": "cpu"})
    monkeypatch.setattr(treeopt.tuning, "measure_latency", lambda *a, **k: lat)
    seen = {}

    def fake_replay_others(pair, prompts, run, found, latency, search, tree=None, spec=None):
        seen.update(tree=tree, spec=spec)
        slow = Replay([2, 2], [1, 2], [1.0, 1.0]).predict(lambda n: 10.0)
        fast = Replay([3, 3], [3, 3], [1.0, 1.0]).predict(lambda n: 10.0)
        preds = {"tuned tree": slow, "--draft auto:draft=(early-exit:1)": slow}
        preds[winner] = fast
        auto = SimpleNamespace(model_drafter=object(), shape=None)
        return ReplayChoice(winner, auto if winner != "tuned tree" else pair.drafter,
                            chain(draft_tokens=2), fast, predictions=preds,
                            options={} if winner == "tuned tree" else
                            {"spec": winner.removeprefix("--draft ")})

    monkeypatch.setattr(treeopt.tuning, "replay_others", fake_replay_others)
    run = treeopt.tune(str(workspace / "tiny"), "early-exit:1", PROMPTS[:2],
                       acceptance=AcceptanceSettings(prompts=2, max_new_tokens=6, width=3,
                                                     depth=2),
                       machine=Machine(device="cpu", threads=1))
    assert seen["spec"] == "early-exit:1" and seen["tree"] is not None
    assert run.summary["replay"]["chosen"] == winner
    # the answer is predicted by its replay (the tree too: it timed drafting as decoding)
    assert run.prediction.speedup == pytest.approx(3.0 * 10 / 11)
    if winner == "tuned tree":
        assert run.draft_spec is None and run.tree == seen["tree"]
        assert run.method.endswith("priced by replay")
        assert run.summary["prediction"]["speedup"] == pytest.approx(3.0 * 10 / 11)
    else:
        assert run.draft_spec == "auto:draft=(early-exit:1)" and run.tree.depth == 2
        assert run.summary["prediction"]["whole"]["draft_prefill_ms"] > 0
