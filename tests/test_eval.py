"""treeopt eval: the interleaved runner on tiny random models, metrics, resume, CLI."""

import json
import math

import pandas as pd
import pytest
import torch
from helpers import CharTokenizer, serve_pair

from treeopt.datasets import Prompt
from treeopt.decode.sampling import Sampling
from treeopt.evaluate.methods import AR, Method, chain_method, tree_method
from treeopt.evaluate.results import METRICS, load_results, summarise
from treeopt.evaluate.runner import EvalConfig, EvalError, run_eval
from treeopt.testing import tiny_pair
from treeopt.tree import Tree

KARY = Tree.from_parents([-1, 0, 0, 1, 1, 2, 2])      # 2-ary, depth 2: 6 drafted, 3 levels
WIDE = Tree.from_parents([-1, 0, 0, 0, 1, 1, 4])      # widths 3, 2, 1; depth 3


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return tiny_pair()


def _prompts():
    cats = ["alpha", "alpha", "beta", "beta"]
    return [Prompt(str(i), c, f"p{i}", token_ids=tuple(range(3 + i, 11 + 2 * i)))
            for i, c in enumerate(cats)]


@pytest.fixture(scope="module")
def greedy_run(models, tmp_path_factory):
    target, draft = models
    out = tmp_path_factory.mktemp("eval")
    methods = [chain_method(3), Method("kary", KARY), Method("wide", WIDE)]
    res = run_eval(target, draft, _prompts(), methods,
                   config=EvalConfig(max_new_tokens=8, warmup=False), out_dir=out,
                   progress=False, profile=[0.6, 0.2, 0.1])
    return res, out


def test_greedy_matches_ar_and_writes_files(greedy_run):
    res, out = greedy_run
    assert res.failures == []
    rows = res.rows
    assert set(rows["method"]) == {AR, "chain:4", "kary", "wide"}
    assert rows["matches_ar"].all()
    # Every method generates exactly max_new_tokens (no EOS stop by default).
    assert (rows["new_tokens"] == 8).all()
    # Interleaved in a rotating order: prompt i starts with method i mod 4.
    first = rows[rows["position"] == 0].drop_duplicates("prompt_key")
    assert list(first["method"]) == [AR, "chain:4", "kary", "wide"]
    s = res.summary.set_index(["method", "category"])
    assert set(s.index.get_level_values("category")) == {"alpha", "beta", "all"}
    assert s.loc[(AR, "all"), "speedup"] == pytest.approx(1.0)
    assert s.loc[(AR, "all"), "tokens_per_step"] == pytest.approx(1.0)
    assert math.isnan(s.loc[(AR, "all"), "acceptance_rate"])
    assert (s["matches_ar"] != "-").all()
    assert s.loc[("kary", "all"), "matches_ar"] == "4/4"
    assert s.loc[("kary", "all"), "expected_tokens_per_step"] == pytest.approx(
        KARY.expected_tokens([0.6, 0.2, 0.1]))
    for name in ("summary.csv", "per_prompt.csv", "results.json", "rows.jsonl", "run.json",
                 "metrics.json"):
        assert (out / name).stat().st_size > 0
    csv = pd.read_csv(out / "summary.csv", comment="#")
    assert list(csv["method"].unique()) == [AR, "chain:4", "kary", "wide"]
    # The definitions sit beside the CSV files (metrics.json) so that they stay plain CSV.
    definitions = json.loads((out / "metrics.json").read_text())["metrics"]
    assert "tokens_per_s" in definitions and "never prompt tokens" in definitions["tokens_per_s"]
    doc = load_results(out)
    assert doc["metrics"] == METRICS
    assert len(doc["rows"]) == 16 and doc["rows"][0]["accepted_per_step"] is not None


def test_self_draft_hand_computed(models):
    """Draft = target: every greedy draft is accepted at rank 1, so tokens per step is
    depth + 1 exactly: 13 new tokens = 1 from prefill + 12 from steps."""
    target, _ = models
    res = run_eval(target, target, _prompts()[:2], [chain_method(3), Method("kary", KARY)],
                   config=EvalConfig(max_new_tokens=13, warmup=False), progress=False)
    s = res.summary.set_index("method")
    assert s.loc["chain:4", "tokens_per_step"] == pytest.approx(4.0)   # 12 / 3 steps
    assert s.loc["chain:4", "acceptance_rate"] == pytest.approx(1.0)   # 9 / 9
    assert s.loc["chain:4", "mean_accepted"] == pytest.approx(3.0)
    assert s.loc["kary", "tokens_per_step"] == pytest.approx(3.0)      # 12 / 4 steps
    assert s.loc["kary", "acceptance_rate"] == pytest.approx(8 / 24)
    rows = res.rows[res.rows["method"] == "kary"]
    assert all(r == [[1, 1]] * 4 for r in rows["ranks_per_step"])
    assert res.failures == []


def test_tokens_per_second_counts_generated_tokens_only():
    """Hand-made rows: long prompts and many characters must not change tokens/s."""
    rows = pd.DataFrame([
        {"method": AR, "category": "c", "prompt_key": "c/0", "prompt_tokens": 5000,
         "new_tokens": 100, "seconds": 4.0, "target_forwards": 99, "step_tokens": 99,
         "drafted": 0, "accepted": 0, "steps": 99, "text_chars": 450},
        {"method": "chain:3", "category": "c", "prompt_key": "c/0", "prompt_tokens": 5000,
         "new_tokens": 100, "seconds": 2.0, "target_forwards": 33, "step_tokens": 99,
         "drafted": 66, "accepted": 66, "steps": 33, "text_chars": 450},
        {"method": AR, "category": "c", "prompt_key": "c/1", "prompt_tokens": 7,
         "new_tokens": 50, "seconds": 1.0, "target_forwards": 49, "step_tokens": 49,
         "drafted": 0, "accepted": 0, "steps": 49, "text_chars": 9000},
        {"method": "chain:3", "category": "c", "prompt_key": "c/1", "prompt_tokens": 7,
         "new_tokens": 50, "seconds": 1.5, "target_forwards": 25, "step_tokens": 49,
         "drafted": 50, "accepted": 24, "steps": 25, "text_chars": 9000},
    ])
    s = summarise(rows).set_index("method")
    assert s.loc[AR, "tokens_per_s"] == pytest.approx(150 / 5.0)
    assert s.loc["chain:3", "tokens_per_s"] == pytest.approx(150 / 3.5)
    assert s.loc["chain:3", "speedup"] == pytest.approx(5.0 / 3.5)
    assert s.loc["chain:3", "tokens_per_step"] == pytest.approx(148 / 58)
    assert s.loc["chain:3", "acceptance_rate"] == pytest.approx(90 / 116)
    assert s.loc["chain:3", "mean_accepted"] == pytest.approx(90 / 58)
    assert s.loc[AR, "tokens_per_step"] == pytest.approx(1.0)


def test_tokens_per_second_in_run_rows(greedy_run):
    res, _ = greedy_run
    r = res.rows
    assert (r["tokens_per_s"] == r["new_tokens"] / r["seconds"]).all()
    assert (r["new_tokens"] == 8).all() and (r["prompt_tokens"] != 8).any()


def test_resume_skips_finished_prompts(models, tmp_path):
    target, draft = models
    calls = []

    from treeopt.decode.engine import generate as real

    def counting(*a, **kw):
        calls.append(a[2][0].tolist())
        return real(*a, **kw)

    prompts = _prompts()
    methods = [chain_method(2)]
    cfg = EvalConfig(max_new_tokens=5, warmup=False)
    run_eval(target, draft, prompts[:2], methods, config=cfg, out_dir=tmp_path,
             progress=False, generate=counting)
    assert len(calls) == 4
    # Simulate an interruption in prompt 3: one finished method row plus a cut line.
    with open(tmp_path / "rows.jsonl", "a") as fh:
        fh.write(json.dumps({"prompt_key": "beta/2", "method": AR}) + "\n{\"prompt_ke")
    with pytest.raises(EvalError, match="--resume"):
        run_eval(target, draft, prompts, methods, config=cfg, out_dir=tmp_path,
                 progress=False)
    calls.clear()
    res = run_eval(target, draft, prompts, methods, config=cfg, out_dir=tmp_path,
                   resume=True, progress=False, generate=counting)
    assert sorted(map(tuple, calls)) == sorted([prompts[2].token_ids] * 2
                                               + [prompts[3].token_ids] * 2)
    assert len(res.rows) == 8 and res.rows["prompt_key"].nunique() == 4
    assert len((tmp_path / "rows.jsonl").read_text().splitlines()) == 8
    with pytest.raises(EvalError, match="differ"):
        run_eval(target, draft, prompts, [chain_method(3)], config=cfg, out_dir=tmp_path,
                 resume=True, progress=False)


def test_sampling_and_failure_reporting(models):
    target, draft = models
    res = run_eval(target, draft, _prompts()[:2], [Method("kary", KARY)],
                   config=EvalConfig(max_new_tokens=6, seed=3, warmup=False,
                                     sampling=Sampling(temperature=0.8, top_p=0.9)),
                   progress=False)
    assert res.rows["matches_ar"].isna().all()
    assert (res.summary["matches_ar"] == "-").all()
    assert (res.rows["new_tokens"] == 6).all()

    from treeopt.decode.engine import generate as real

    def broken(target, drafter, input_ids, **kw):
        gen = real(target, drafter, input_ids, **kw)
        if drafter is not None:
            gen.tokens[2] = (gen.tokens[2] + 1) % 96
        return gen

    res = run_eval(target, draft, _prompts()[:1], [Method("kary", KARY)],
                   config=EvalConfig(max_new_tokens=6, warmup=False), progress=False,
                   generate=broken)
    assert res.failures == ["kary differs from ar on prompt alpha/0 turn 1 at new token 2"]
    assert res.summary.set_index("method").loc["kary", "matches_ar"] == "0/1"



def test_text_prompts_multi_turn(models):
    target, draft = models
    prompts = [Prompt("q1", "writing", "hello there", ("hello there", "and more"))]
    res = run_eval(target, draft, prompts, [chain_method(2)], tokenizer=CharTokenizer(),
                   config=EvalConfig(max_new_tokens=4, warmup=False), progress=False)
    assert list(res.rows["turn"]) == [1, 2, 1, 2]
    t1, t2 = res.rows[res.rows["method"] == AR]["prompt_tokens"]
    assert t1 == 11 and t2 == 11 + 4 + 8
    assert res.failures == []


def test_method_errors(models):
    target, draft = models
    with pytest.raises(EvalError, match="listed twice"):
        run_eval(target, draft, _prompts(), [chain_method(3), tree_method("chain:4")],
                 progress=False)
    with pytest.raises(EvalError, match="need a draft"):
        run_eval(target, None, _prompts(), [chain_method(3)], progress=False)
    with pytest.raises(EvalError, match="at least 1"):
        chain_method(0)
    assert tree_method("kary:2x2").tree == KARY


def _serve_four_prompts(models, tmp_path, monkeypatch):
    """The tiny pair served to `treeopt eval`, and a data file of 4 prompts in 2 categories."""
    serve_pair(monkeypatch, *models)
    data = tmp_path / "q.jsonl"
    data.write_text("\n".join(json.dumps({"id": i, "category": c, "prompt": f"say {w}"})
                              for i, (c, w) in enumerate([("x", "one"), ("x", "two"),
                                                          ("y", "three"), ("y", "four")])))
    return data


def test_cli_eval_end_to_end(models, tmp_path, monkeypatch, capsys):
    """`treeopt eval` with the model loader swapped for the tiny pair and a text file."""
    from treeopt.cli import main

    data = _serve_four_prompts(models, tmp_path, monkeypatch)
    out = tmp_path / "run"
    rc = main(["eval", "--dataset", str(data), "--chain", "2", "--tree", "kary:2x2",
               "--tree", "chains:2x2", "--max-new-tokens", "6", "--out", str(out),
               "--no-progress", "--no-warmup"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "chain:3" in captured.out and "kary:2x2" in captured.out and "4/4" in captured.out
    for name in ("speedup.png", "tokens_per_step.png", "accepted_hist.png", "report.md",
                 "report.html"):
        assert (out / "report" / name).stat().st_size > 0
    rc = main(["eval", "--dataset", str(data), "--chain", "2", "--max-new-tokens", "6",
               "--out", str(out), "--no-progress"])
    assert rc == 2 and "--resume" in capsys.readouterr().err
    rc = main(["eval", "--dataset", str(tmp_path / "nope.jsonl"), "--chain", "2", "--out",
               str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "no such file" in err and len(err.strip().splitlines()) == 1


def test_cli_prints_a_compact_table_unless_wide(models, tmp_path, monkeypatch, capsys):
    """The default table is narrow (method, speed-up and interval, tokens/step, equal[,
    flags]); --wide prints every summary column; summary.csv has them all either way."""
    from treeopt.cli import main
    from treeopt.evaluate.table import compact_rows, format_compact

    data = _serve_four_prompts(models, tmp_path, monkeypatch)
    argv = ["eval", "--dataset", str(data), "--chain", "2", "--tree", "kary:2x2",
            "--max-new-tokens", "6", "--no-progress", "--no-warmup", "--no-report"]
    assert main(argv + ["--out", str(tmp_path / "a")]) == 0
    compact = capsys.readouterr().out.splitlines()
    assert compact[0].split()[:5] == ["method", "category", "speed-up", "(95%", "CI)"]
    assert max(len(line) for line in compact) <= 100
    assert len(compact) == 1 + 3 * 3  # 3 methods x (x, y, all)
    assert main(argv + ["--out", str(tmp_path / "b"), "--wide"]) == 0
    wide = capsys.readouterr().out.splitlines()
    assert "acceptance_rate" in wide[0] and "verify_ms/step" in wide[0]
    assert max(len(line) for line in wide) > max(len(line) for line in compact)
    csv = pd.read_csv(tmp_path / "a" / "summary.csv", comment="#")
    assert {"acceptance_rate", "verify_ms_per_step", "speedup_ci95_low"} <= set(csv.columns)
    # the cells, by hand
    summary = pd.DataFrame([
        {"method": "plain", "category": "all", "speedup": 1.0, "speedup_ci95_low": 1.0,
         "speedup_ci95_high": 1.0, "tokens_per_step": 1.0, "matches_ar": "-", "flag": ""},
        {"method": "chain:3", "category": "all", "speedup": 1.234, "speedup_ci95_low": 1.1,
         "speedup_ci95_high": float("nan"), "tokens_per_step": 2.5, "matches_ar": "4/4",
         "flag": "noisy"}])
    assert compact_rows(summary) == [["plain", "all", "1.00x (1.00-1.00)", "1.00", "-", "-"],
                                     ["chain:3", "all", "1.23x", "2.50", "4/4", "noisy"]]
    assert format_compact(summary).splitlines() == [
        "method   speed-up (95% CI)  tokens/step  equal  flags",
        "plain    1.00x (1.00-1.00)         1.00  -      -",
        "chain:3              1.23x         2.50  4/4    noisy"]
