"""treeopt eval, hardened: one writer per results folder, resume checked against the run it
continues, files replaced atomically, over-long prompts, multi-turn resume, the spread of the
speed-ups with flags, plain CSVs, growmap labels and the recorded threading settings."""

import fcntl
import json
import math
import os
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from helpers import CharTokenizer

from treeopt.cli import build_parser, main
from treeopt.datasets import Prompt
from treeopt.decode.engine import generate as real_generate
from treeopt.decode.sampling import Sampling
from treeopt.evaluate.methods import AR, chain_method, tree_method
from treeopt.evaluate.results import (
    METRICS,
    format_summary,
    load_results,
    summarise,
    write_results,
)
from treeopt.evaluate.runner import EvalConfig, EvalError, run_eval
from treeopt.testing import tiny_pair

CFG = EvalConfig(max_new_tokens=4, warmup=False)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return tiny_pair()


def _prompts(n=2):
    cats = ["alpha", "alpha", "beta", "beta"]
    return [Prompt(str(i), cats[i % 4], f"p{i}", token_ids=tuple(range(3 + i, 11 + 2 * i)))
            for i in range(n)]


def _one_line(text):
    return len(text.strip().splitlines()) == 1


@pytest.fixture()
def cli(models, tmp_path, monkeypatch):
    """`treeopt eval` with the tiny pair; returns (run(args) -> (rc, err), loads list)."""
    import treeopt.cli.eval as cli_eval

    target, draft = models
    loads = []

    def loader(args):
        loads.append(args.target)
        return SimpleNamespace(target=target, draft=draft, tokenizer=CharTokenizer())

    monkeypatch.setattr(cli_eval, "load_pair_for", loader)
    data = tmp_path / "q.jsonl"
    data.write_text("\n".join(json.dumps({"id": i, "category": "x", "prompt": f"say {w}"})
                              for i, w in enumerate(["one", "two"])))

    def run(*extra):
        return main(["eval", "--dataset", str(data), "--chain", "2", "--max-new-tokens", "4",
                     "--no-progress", "--no-warmup", "--no-report", *extra])

    return SimpleNamespace(run=run, loads=loads, data=data)


# ---------------------------------------------------------------------------- 1. mixing
def test_a_second_run_on_a_busy_folder_is_refused(models, tmp_path):
    """While a run writes to a folder, neither a fresh run nor a resume may write there."""
    target, draft = models
    errors = []

    def nested(*a, **kw):
        if not errors:
            for resume in (False, True):
                try:
                    run_eval(target, draft, _prompts(1), [chain_method(2)], config=CFG,
                             out_dir=tmp_path, resume=resume, progress=False)
                    errors.append(None)
                except EvalError as exc:
                    errors.append(str(exc))
        return real_generate(*a, **kw)

    res = run_eval(target, draft, _prompts(2), [chain_method(2)], config=CFG,
                   out_dir=tmp_path, progress=False, generate=nested)
    assert len(errors) == 2 and all(e is not None for e in errors), errors
    assert all("in use" in e and str(tmp_path) in e and _one_line(e) for e in errors)
    # Only the first run's rows: 2 prompts x 2 methods, each once.
    assert len((tmp_path / "rows.jsonl").read_text().splitlines()) == 4
    assert len(res.rows) == 4


def test_the_lock_is_released_after_a_failed_run(models, tmp_path):
    target, draft = models

    def boom(*a, **kw):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        run_eval(target, draft, _prompts(2), [chain_method(2)], config=CFG, out_dir=tmp_path,
                 progress=False, generate=boom)
    with open(tmp_path / ".lock", "a") as fh:  # free again: this lock is not refused
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fh, fcntl.LOCK_UN)
    res = run_eval(target, draft, _prompts(2), [chain_method(2)], config=CFG,
                   out_dir=tmp_path, resume=True, progress=False)
    assert len(res.rows) == 4


def test_cli_refuses_a_locked_folder(cli, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        rc = cli.run("--out", str(out))
    err = capsys.readouterr().err
    assert rc == 2 and "in use" in err and str(out) in err and _one_line(err), err
    assert not (out / "rows.jsonl").exists() and not (out / "run.json").exists()


def test_resume_refuses_changed_target_draft_dataset_prompts_and_sampling(models, tmp_path):
    target, draft = models
    meta = {"target": "tiny-target", "draft": "tiny-draft", "dataset": "q.jsonl"}
    run_eval(target, draft, _prompts(2), [chain_method(2)], config=CFG, out_dir=tmp_path,
             progress=False, meta=meta)
    run = json.loads((tmp_path / "run.json").read_text())
    assert (run["target"], run["draft"], run["dataset"]) == ("tiny-target", "tiny-draft",
                                                             "q.jsonl")
    assert list(run["prompts"]) == ["alpha/0", "alpha/1"]
    assert run["config"]["temperature"] == 0.0 and run["config"]["top_p"] == 1.0
    before = {n: (tmp_path / n).read_text() for n in ("rows.jsonl", "run.json")}
    changed_prompt = [Prompt("0", "alpha", "p0", token_ids=(9, 9, 9)), _prompts(2)[1]]
    cases = [
        ({"meta": {**meta, "target": "other"}}, "target model differs"),
        ({"meta": {**meta, "draft": "ngram"}}, "drafter .*differs"),
        ({"meta": {**meta, "dataset": "spec_bench"}}, "dataset differs"),
        ({"config": EvalConfig(max_new_tokens=4, warmup=False, sampling=Sampling(temperature=0.7))},
         "temperature differs"),
        ({"config": EvalConfig(max_new_tokens=4, warmup=False, sampling=Sampling(top_k=5))}, "top_k differs"),
        ({"config": EvalConfig(max_new_tokens=5, warmup=False)}, "max_new_tokens differs"),
        ({"prompts": _prompts(4)[1:3]}, "prompt selection differs"),
        ({"prompts": changed_prompt}, "content of prompt 'alpha/0'"),
    ]
    for change, words in cases:
        kw = {"config": CFG, "meta": meta, "prompts": _prompts(2), **change}
        with pytest.raises(EvalError, match=words) as exc:
            run_eval(target, draft, kw.pop("prompts"), [chain_method(2)], out_dir=tmp_path,
                     resume=True, progress=False, **kw)
        assert _one_line(str(exc.value)) and "cannot resume" in str(exc.value)
    assert {n: (tmp_path / n).read_text() for n in before} == before


def test_resume_without_meta_compares_the_model_objects(models, tmp_path):
    target, draft = models
    run_eval(target, draft, _prompts(2), [chain_method(2)], config=CFG, out_dir=tmp_path,
             progress=False)
    with pytest.raises(EvalError, match="drafter .*differs"):
        run_eval(target, target, _prompts(2), [chain_method(2)], config=CFG,
                 out_dir=tmp_path, resume=True, progress=False)
    with pytest.raises(EvalError, match="target model differs"):
        run_eval(draft, draft, _prompts(2), [chain_method(2)], config=CFG,
                 out_dir=tmp_path, resume=True, progress=False)
    res = run_eval(target, draft, _prompts(2), [chain_method(2)], config=CFG,
                   out_dir=tmp_path, resume=True, progress=False)
    assert len(res.rows) == 4


def test_cli_resume_refuses_another_dataset(cli, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.run("--out", str(out)) == 0
    other = tmp_path / "other.jsonl"
    other.write_text(cli.data.read_text())
    capsys.readouterr()
    rc = main(["eval", "--dataset", str(other), "--chain", "2", "--max-new-tokens", "4",
               "--no-progress", "--no-warmup", "--no-report", "--out", str(out), "--resume"])
    err = capsys.readouterr().err
    assert rc == 2 and "dataset differs" in err and _one_line(err), err


def test_rows_are_unique_by_prompt_turn_method_when_read_back(models, tmp_path):
    target, draft = models
    run_eval(target, draft, _prompts(2), [chain_method(2)], config=CFG, out_dir=tmp_path,
             progress=False)
    rows_file = tmp_path / "rows.jsonl"
    text = rows_file.read_text()
    rows_file.write_text(text + text)  # what a second writer's copy would leave
    calls = []

    def counting(*a, **kw):
        calls.append(1)
        return real_generate(*a, **kw)

    res = run_eval(target, draft, _prompts(2), [chain_method(2)], config=CFG,
                   out_dir=tmp_path, resume=True, progress=False, generate=counting)
    assert calls == []
    assert len(res.rows) == 4
    assert res.rows.groupby(["prompt_key", "turn", "method"]).size().max() == 1
    assert res.summary.set_index("method").loc[AR, "new_tokens"] == 8
    assert len(rows_file.read_text().splitlines()) == 4


# ---------------------------------------------------------------------------- 2. long prompts
def _long_prompts():
    return [Prompt("short", "c", "s", token_ids=tuple(range(3, 13))),                # 10
            Prompt("long", "c", "l", token_ids=tuple(3 + i % 90 for i in range(50))),  # 50
            Prompt("edge", "c", "e", token_ids=tuple(range(3, 39)))]                  # 36


def test_long_prompts_are_cut_from_the_left_to_fit_the_window(tmp_path, capsys):
    """Window 40, 8 new tokens: prompts keep their last 32 tokens; none aborts the run."""
    target, draft = tiny_pair(max_positions=40)
    seen = []

    def recording(target, drafter, input_ids, **kw):
        seen.append(tuple(input_ids[0].tolist()))
        return real_generate(target, drafter, input_ids, **kw)

    prompts = _long_prompts()
    cfg = EvalConfig(max_new_tokens=8, warmup=False)
    res = run_eval(target, draft, prompts, [chain_method(2)], config=cfg, out_dir=tmp_path,
                   progress=False, generate=recording)
    err = capsys.readouterr().err
    assert "2 of 3 prompts" in err and "window (40 tokens)" in err, err
    assert "22 tokens in all" in err  # 18 + 4
    rows = res.rows.set_index(["prompt_id", "method"])
    assert rows.loc[("long", AR), "prompt_tokens"] == 32
    assert rows.loc[("long", AR), "truncated_tokens"] == 18
    assert rows.loc[("edge", "chain:3"), "truncated_tokens"] == 4
    assert rows.loc[("short", AR), "truncated_tokens"] == 0
    assert (res.rows["new_tokens"] == 8).all() and res.failures == []
    assert prompts[1].token_ids[-32:] in seen  # a left cut: the end of the prompt stays
    assert res.meta["long_prompts"]["prompts_over"] == 2
    assert res.meta["long_prompts"]["window"] == 40
    # A resume of that run has nothing left to do and keeps every row.
    res = run_eval(target, draft, prompts, [chain_method(2)], config=cfg, out_dir=tmp_path,
                   resume=True, progress=False)
    assert len(res.rows) == 6


def test_long_prompts_can_be_skipped(tmp_path, capsys):
    target, draft = tiny_pair(max_positions=40)
    cfg = EvalConfig(max_new_tokens=8, warmup=False, long_prompts="skip")
    res = run_eval(target, draft, _long_prompts(), [chain_method(2)], config=cfg,
                   progress=False)
    err = capsys.readouterr().err
    assert "2 of 3 prompts" in err and "skipped" in err
    assert set(res.rows["prompt_id"]) == {"short"}
    assert res.meta["long_prompts"]["skipped"] == ["c/long", "c/edge"]
    out = tmp_path / "none"
    with pytest.raises(EvalError, match="every prompt is longer"):
        run_eval(target, draft, _long_prompts()[1:], [chain_method(2)], config=cfg,
                 out_dir=out, progress=False)
    assert not out.exists()
    with pytest.raises(EvalError, match="long_prompts"):
        run_eval(target, draft, _long_prompts(), [chain_method(2)], progress=False,
                 config=EvalConfig(long_prompts="drop"))


def test_a_later_turn_that_outgrows_the_window_is_cut(capsys):
    target, draft = tiny_pair(max_positions=40)
    prompts = [Prompt("q", "w", "hello there", ("hello there", "and some more words here"))]
    res = run_eval(target, draft, prompts, [chain_method(2)], tokenizer=CharTokenizer(),
                   config=EvalConfig(max_new_tokens=8, warmup=False), progress=False)
    ar = res.rows[res.rows["method"] == AR].set_index("turn")
    # turn 2 = 11 prompt tokens + 8 generated + 24 new = 43 > 32: 11 cut.
    assert ar.loc[1, "truncated_tokens"] == 0
    assert ar.loc[2, "prompt_tokens"] == 32 and ar.loc[2, "truncated_tokens"] == 11
    assert (res.rows["new_tokens"] == 8).all() and res.failures == []
    assert "1 later turn(s)" in capsys.readouterr().err


# ---------------------------------------------------------------------------- 3. files
FILES = ("results.json", "summary.csv", "per_prompt.csv", "run.json", "rows.jsonl")


def _stray(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith(".") and p.name != ".lock"]


def test_result_files_are_replaced_atomically(models, tmp_path, monkeypatch):
    target, draft = models
    res = run_eval(target, draft, _prompts(2), [chain_method(2)], config=CFG,
                   out_dir=tmp_path, progress=False)
    before = {n: (tmp_path / n).read_bytes() for n in FILES}

    # A crash while the new versions are written (here: the final rename fails) leaves the
    # previous files whole.
    def no_space(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(OSError):
        write_results(tmp_path, res.rows, res.summary, res.meta)
    with pytest.raises(OSError):
        run_eval(target, draft, _prompts(2), [chain_method(2)], config=CFG,
                 out_dir=tmp_path, resume=True, progress=False)
    monkeypatch.undo()
    assert {n: (tmp_path / n).read_bytes() for n in FILES} == before
    assert _stray(tmp_path) == []

    # A failure while the CSV text is produced never truncates the old file either.
    def broken(self, *a, **kw):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(pd.DataFrame, "to_csv", broken)
    with pytest.raises(OSError):
        write_results(tmp_path, res.rows, res.summary, res.meta)
    monkeypatch.undo()
    assert {n: (tmp_path / n).read_bytes() for n in FILES} == before
    assert _stray(tmp_path) == []


def test_resume_without_run_json_keeps_the_rows(models, tmp_path):
    target, draft = models
    run_eval(target, draft, _prompts(2), [chain_method(2)], config=CFG, out_dir=tmp_path,
             progress=False)
    (tmp_path / "run.json").unlink()
    rows = (tmp_path / "rows.jsonl").read_text()
    with pytest.raises(EvalError, match="run.json is missing") as exc:
        run_eval(target, draft, _prompts(2), [chain_method(2)], config=CFG,
                 out_dir=tmp_path, resume=True, progress=False)
    assert _one_line(str(exc.value))
    assert (tmp_path / "rows.jsonl").read_text() == rows and rows
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(EvalError, match="unreadable"):
        run_eval(target, draft, _prompts(2), [chain_method(2)], config=CFG,
                 out_dir=tmp_path, resume=True, progress=False)
    assert (tmp_path / "rows.jsonl").read_text() == rows


def test_cli_out_naming_a_file_is_one_line(cli, tmp_path, capsys):
    path = tmp_path / "results.txt"
    path.write_text("keep me")
    rc = cli.run("--out", str(path))
    err = capsys.readouterr().err
    assert rc == 2 and "not a folder" in err and str(path) in err and _one_line(err), err
    assert path.read_text() == "keep me"
    assert cli.loads == []  # refused before any model is loaded


def test_cli_checks_sampling_before_any_file(cli, tmp_path, capsys):
    out = tmp_path / "new"
    rc = cli.run("--temperature", "0.8", "--top-p", "0", "--out", str(out))
    err = capsys.readouterr().err
    assert rc == 2 and "top_p" in err and _one_line(err), err
    assert not out.exists() and cli.loads == []
    # Nor may a bad setting touch an existing run.
    assert cli.run("--out", str(out)) == 0
    before = {n: (out / n).read_bytes() for n in FILES}
    capsys.readouterr()
    rc = cli.run("--temperature", "-1", "--out", str(out), "--resume")
    assert rc == 2 and _one_line(capsys.readouterr().err)
    assert {n: (out / n).read_bytes() for n in FILES} == before


# ---------------------------------------------------------------------------- 4. turns
def test_resume_reruns_a_prompt_with_a_missing_turn(models, tmp_path):
    target, draft = models
    tok = CharTokenizer()
    prompts = [Prompt("q1", "w", "hello there", ("hello there", "and more")),
               Prompt("q2", "w", "good day", ("good day", "tell me more"))]
    run_eval(target, draft, prompts, [chain_method(2)], tokenizer=tok, config=CFG,
             out_dir=tmp_path, progress=False)
    rows_file = tmp_path / "rows.jsonl"
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    assert len(rows) == 8
    kept = [r for r in rows if not (r["prompt_id"] == "q1" and r["turn"] == 2
                                    and r["method"] == "chain:3")]
    rows_file.write_text("".join(json.dumps(r) + "\n" for r in kept))
    calls = []

    def counting(target, drafter, input_ids, **kw):
        calls.append(input_ids.shape[1])
        return real_generate(target, drafter, input_ids, **kw)

    res = run_eval(target, draft, prompts, [chain_method(2)], tokenizer=tok, config=CFG,
                   out_dir=tmp_path, resume=True, progress=False, generate=counting)
    assert len(calls) == 4  # q1 again: 2 methods x 2 turns; q2 was complete
    assert len(res.rows) == 8
    got = set(zip(res.rows["prompt_id"], res.rows["turn"], res.rows["method"]))
    assert got == {(p, t, m) for p in ("q1", "q2") for t in (1, 2) for m in (AR, "chain:3")}
    assert len(rows_file.read_text().splitlines()) == 8
    assert res.failures == []


# ---------------------------------------------------------------------------- 5. spread
def _timed_rows(spec, method="chain:4"):
    """spec: (prompt, category, ar seconds, method seconds, accepted) per prompt; 10 new
    tokens each."""
    rows = []
    for key, cat, ar_s, m_s, acc in spec:
        rows.append({"method": AR, "category": cat, "prompt_key": key, "new_tokens": 10,
                     "seconds": ar_s, "target_forwards": 9, "step_tokens": 9, "drafted": 0,
                     "accepted": 0, "steps": 9})
        rows.append({"method": method, "category": cat, "prompt_key": key, "new_tokens": 10,
                     "seconds": m_s, "target_forwards": 9 - min(acc, 4),
                     "step_tokens": 9, "drafted": 27, "accepted": acc, "steps": 9})
    return pd.DataFrame(rows)


def test_one_prompt_with_nothing_accepted_is_flagged():
    """The report that started this: chain:4 at 3.28x with 0 % acceptance, one prompt."""
    s = summarise(_timed_rows([("c/0", "c", 3.28, 1.0, 0)])).set_index("method")
    assert s.loc["chain:4", "speedup"] == pytest.approx(3.28)
    assert s.loc["chain:4", "speedup_median"] == pytest.approx(3.28)
    assert math.isnan(s.loc["chain:4", "speedup_ci95_low"])
    assert s.loc["chain:4", "flag"] == "no-accepted;one-prompt"
    assert s.loc[AR, "flag"] == "" and s.loc[AR, "speedup_median"] == pytest.approx(1.0)
    table = format_summary(s.reset_index())
    assert "no-accepted;one-prompt" in table and "median" in table and "ci95" in table
    assert "no-accepted" in METRICS["flag"] and "noise" in METRICS["flag"]
    assert "bootstrap" in METRICS["speedup_ci95_low"]


def test_speedup_spread_hand_made():
    # Per-prompt speed-ups 0.5, 2.0, 0.9, 1.5 (ar 1 s each): median 1.2; pooled
    # 4 / (2 + 0.5 + 1/0.9 + 1/1.5); the interval contains 1.
    spec = [(f"c/{i}", "c", 1.0, 1.0 / x, 3) for i, x in enumerate([0.5, 2.0, 0.9, 1.5])]
    s = summarise(_timed_rows(spec)).set_index("method").loc["chain:4"]
    pooled = 4 / (2 + 0.5 + 1 / 0.9 + 1 / 1.5)
    assert s["speedup"] == pytest.approx(pooled)
    assert s["speedup_median"] == pytest.approx(1.2)
    assert 0.5 <= s["speedup_ci95_low"] < 1 < s["speedup_ci95_high"] <= 2.0
    assert s["flag"] == "ci-spans-1"
    # Seeded: the same rows give the same interval.
    again = summarise(_timed_rows(spec)).set_index("method").loc["chain:4"]
    assert again["speedup_ci95_low"] == s["speedup_ci95_low"]
    assert again["speedup_ci95_high"] == s["speedup_ci95_high"]
    # Clearly faster on every prompt: a tight interval around the figure, no flag.
    spec = [(f"c/{i}", "c", 1.0, 1.0 / x, 3)
            for i, x in enumerate([1.9, 2.0, 2.1, 2.0, 1.95, 2.05])]
    s = summarise(_timed_rows(spec)).set_index("method").loc["chain:4"]
    assert 1.9 <= s["speedup_ci95_low"] <= s["speedup"] <= s["speedup_ci95_high"] <= 2.1
    assert s["flag"] == ""
    # Every prompt alike: every resample gives the same ratio.
    spec = [(f"c/{i}", "c", 1.5, 1.0, 2) for i in range(3)]
    s = summarise(_timed_rows(spec)).set_index("method").loc["chain:4"]
    assert s["speedup_ci95_low"] == pytest.approx(1.5)
    assert s["speedup_ci95_high"] == pytest.approx(1.5)


def test_spread_per_category_and_all():
    spec = [("a/0", "a", 1.0, 0.5, 3), ("a/1", "a", 1.0, 0.5, 3),
            ("b/0", "b", 1.0, 2.0, 1), ("b/1", "b", 1.0, 2.0, 1)]
    s = summarise(_timed_rows(spec)).set_index(["method", "category"])
    assert s.loc[("chain:4", "a"), "speedup_median"] == pytest.approx(2.0)
    assert s.loc[("chain:4", "b"), "speedup_median"] == pytest.approx(0.5)
    assert s.loc[("chain:4", "all"), "speedup_median"] == pytest.approx(1.25)
    assert s.loc[("chain:4", "all"), "flag"] == "ci-spans-1"
    assert s.loc[("chain:4", "a"), "flag"] == ""


# ---------------------------------------------------------------------------- 6. plain CSV
def test_csv_files_are_plain_and_definitions_sit_beside_them(models, tmp_path):
    target, draft = models
    res = run_eval(target, draft, _prompts(2), [chain_method(2)], config=CFG,
                   out_dir=tmp_path, progress=False)
    s = pd.read_csv(tmp_path / "summary.csv")
    assert list(s.columns[:3]) == ["method", "category", "prompts"]
    for col in ("speedup_median", "speedup_ci95_low", "speedup_ci95_high", "flag"):
        assert col in s.columns
    assert list(s["method"]) == [AR, "chain:3"]
    p = pd.read_csv(tmp_path / "per_prompt.csv")
    assert len(p) == len(res.rows) and "prompt_key" in p.columns
    assert "truncated_tokens" in p.columns
    defs = json.loads((tmp_path / "metrics.json").read_text())
    assert defs["metrics"]["tokens_per_s"] == METRICS["tokens_per_s"]
    assert "never prompt tokens" in defs["metrics"]["tokens_per_s"]
    assert set(defs["files"]) == {"summary.csv", "per_prompt.csv"}
    assert load_results(tmp_path)["metrics"] == METRICS
    from treeopt.evaluate.report import write_report

    md = write_report(tmp_path, tmp_path / "report", trees=False).read_text()
    assert "speedup_median" in md and "torch threads" in md


# ---------------------------------------------------------------------------- 7. labels
def test_growmap_methods_are_named_by_metadata_or_path(models, tmp_path):
    from treeopt.cli.eval import build_methods
    from treeopt.growmap import save_growmap
    from treeopt.shapes import from_name

    a, b, c = tmp_path / "a" / "tree.pt", tmp_path / "b" / "tree.pt", tmp_path / "c" / "t.json"
    for path in (a, b, c):
        path.parent.mkdir()
    save_growmap(from_name("chain:3"), a, meta={"name": "tuned-qa"})
    save_growmap(from_name("kary:2x2"), b, meta={"method": "dp"})
    save_growmap(from_name("kary:2x1"), c, meta={"name": "tuned-qa"})
    assert tree_method(str(a)).name == "tree:tuned-qa"
    assert tree_method(str(b)).name == f"tree:{b}"

    def names(*trees):
        args = build_parser().parse_args(
            ["eval", "--out", "x"] + [x for t in trees for x in ("--tree", str(t))])
        return [m.name for m in build_methods(args, None)]

    # Two tuned trees saved under the same file name no longer collide.
    assert names(a, b) == [AR, "tree:tuned-qa", f"tree:{b}"]
    # Two growmaps whose metadata records the same name fall back to their paths.
    assert names(a, b, c) == [AR, f"tree:{a}", f"tree:{b}", f"tree:{c}"]
    # The same file twice is refused, naming where it came from.
    target, draft = models
    with pytest.raises(EvalError, match="listed twice"):
        run_eval(target, draft, _prompts(1), [tree_method(str(b)), tree_method(str(b))],
                 progress=False)


# ---------------------------------------------------------------------------- 8. threading
def test_threading_settings_are_recorded(models, tmp_path):
    from treeopt.models.cpu_kernels import kernels_in_use

    target, draft = models
    res = run_eval(target, draft, _prompts(2), [chain_method(2)], config=CFG,
                   out_dir=tmp_path, progress=False)
    run = json.loads((tmp_path / "run.json").read_text())
    doc = load_results(tmp_path)
    for t in (run["threading"], doc["threading"], res.meta["threading"]):
        # one schema with latency profiles (treeopt.models.machine.threading_settings)
        assert t["threads"] == torch.get_num_threads()
        assert t["interop_threads"] == torch.get_num_interop_threads()
        assert t["omp_wait_policy"] == os.environ.get("OMP_WAIT_POLICY")
        assert t["kernels"] == kernels_in_use(target)
        assert t["dtype"] == "float32" and t["machine"]["cpu"]  # what the timings ran on
