"""Every benchmark script under scripts/ runs on tiny models in seconds, in-process, so none of
them can rot: each is loaded from its file and its ``main(argv)`` called with tiny settings.
They print figures; the checks here are about structure (rows, exactness columns, exit codes,
files), never about timings."""

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from helpers import tiny_tokenizer

from treeopt.testing import tiny_causal_lm

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def load_script(name: str):
    """The script ``scripts/<name>.py`` as a module (its ``__main__`` block does not run)."""
    spec = importlib.util.spec_from_file_location(f"script_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _restore_process_state(tmp_path, monkeypatch):
    """Scripts set torch threads and transformers' verbosity and progress bars for the
    process; each must put them back. The model cache goes to a temporary folder, the hub
    stays offline."""
    from transformers.utils import logging as hf_logging

    monkeypatch.setenv("TREEOPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    state = (torch.get_num_threads(), hf_logging.get_verbosity(),
             hf_logging.is_progress_bar_enabled())
    yield
    assert (torch.get_num_threads(), hf_logging.get_verbosity(),
            hf_logging.is_progress_bar_enabled()) == state


def table_rows(out: str, first: str, width: int | None = None) -> dict[str, list[str]]:
    """Whitespace-split rows of the printed table whose header starts with ``first``, by
    their first cell: the lines after the header with ``width`` cells (default: as many as
    the header)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == [first])
    width = width or len(lines[start].split())
    rows = {}
    for line in lines[start + 1:]:
        cells = line.split()
        if len(cells) != width:
            break
        rows[cells[0]] = cells
    return rows


def test_bench_dp_tiny(capsys):
    assert load_script("bench_dp").main(["--tiny", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines()
            if re.fullmatch(r"\s*8\s+[46]\s+(16|32)\s.*", line)]
    assert {tuple(r[:3]) for r in rows} >= {("8", "4", "32"), ("8", "6", "32"), ("8", "6", "16")}
    assert "depth-aware, 4 rows" in out
    assert "(inf same)" in out and "DIFFER" not in out  # reference port equals the DP


def test_bench_attention_tiny(tmp_path, capsys):
    assert load_script("bench_attention").main(["--tiny", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "branches/tree" in out
    assert (tmp_path / "attention.csv").stat().st_size > 0
    assert (tmp_path / "attention.png").stat().st_size > 0


ENGINE_ARGS = ["--tiny", "--n", "2", "--calib", "2", "--max-new-tokens", "8",
               "--hf-prompt-lookup", "2", "--threads", "1"]


def test_bench_engine_tiny(tmp_path, capsys):
    out_file = tmp_path / "engine.json"
    assert load_script("bench_engine").main(ENGINE_ARGS + ["--out", str(out_file)]) == 0
    out = capsys.readouterr().out
    assert "greedy profile p[1..8] (measured on 2 calibration prompts)" in out
    rows = table_rows(out, "method")
    assert list(rows) == ["ar", "chain:4", "dp:8x5", "dp:16x5", "hf-greedy", "hf-assisted",
                          "hf-pld:2"]
    for name, cells in rows.items():
        assert cells[2] == "16" and cells[-1] == "2/2", name  # 2 prompts x 8 tokens, lossless
    doc = json.loads(out_file.read_text())
    res = {r["method"]: r for r in doc["results"]}
    engine = ["ar", "chain:4", "dp:8x5", "dp:16x5"]
    for name in engine:  # the hook-measured overhead per step, engine rows only
        assert 0 <= res[name]["overhead_pct"] <= 100, name
        assert res[name]["engine"] and res[name]["expected_tokens_per_step"] >= 1
    assert all(res[n]["overhead_pct"] is None for n in ("hf-greedy", "hf-assisted"))
    assert res["ar"]["tokens_per_step"] == 1.0 and res["chain:4"]["size"] == 4
    assert res["hf-greedy"]["tokens_per_step"] == 1.0
    assert doc["meta"]["profile_source"] == "measured on 2 calibration prompts"


def test_bench_engine_exit_code_flags_a_lossy_engine(monkeypatch, capsys):
    """An engine row whose output differs from plain decoding fails the script."""
    import treeopt.decode.engine as engine

    real = engine.generate

    def lossy(target, drafter, input_ids, **kw):
        gen = real(target, drafter, input_ids, **kw)
        if drafter is not None:
            gen.tokens[-1] = (gen.tokens[-1] + 1) % 96
        return gen

    monkeypatch.setattr(engine, "generate", lossy)
    assert load_script("bench_engine").main(ENGINE_ARGS + ["--no-hf"]) == 1
    captured = capsys.readouterr()
    assert "NOT LOSSLESS: chain:4 differs from ar" in captured.err


def test_bench_prediction_tiny(capsys):
    args = ["--tiny", "--profile-prompts", "3", "--eval-prompts", "2", "--max-new-tokens", "10",
            "--sizes", "4,8", "--depth", "3"]
    assert load_script("bench_prediction").main(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("pair tiny + tiny; profile on 3 prompts")
    rows = table_rows(out, "size", width=11)
    assert len(rows) == 2
    for cells in rows.values():
        size, f_depth, measured, error = int(cells[0]), float(cells[2]), float(cells[5]), \
            float(cells[7].rstrip("%"))
        assert size <= 8 and f_depth >= 1 and measured >= 1
        assert error == pytest.approx(100 * (f_depth - measured) / measured, abs=0.11)
    assert "error = (F depth-aware - measured) / measured" in out


@pytest.fixture
def folder(tmp_path):
    """A saved tiny model with its (word-level) tokenizer: what a model spec names."""
    path = tmp_path / "tiny-target"
    tiny_causal_lm("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_bench_engine_on_a_saved_tiny_model(folder, capsys):
    """The real-model path: load_pair, Spec-Bench prompts through the tokenizer, an
    early-exit draft (HF's assistant_early_exit row)."""
    args = ["--target", str(folder), "--draft", "early-exit:1", "--n", "2", "--calib", "2",
            "--max-new-tokens", "6", "--max-prompt-tokens", "24", "--threads", "1",
            "--dp-sizes", "6"]
    assert load_script("bench_engine").main(args) == 0
    out = capsys.readouterr().out
    rows = table_rows(out, "method")
    assert list(rows) == ["ar", "chain:4", "dp:6x5", "hf-greedy", "hf-assisted",
                          "hf-assisted-model"]
    assert all(cells[-1] == "2/2" for cells in rows.values())
    assert "prompt tokens median 24" in out


def test_bench_prediction_on_a_saved_tiny_model(folder, capsys):
    args = ["--target", str(folder), "--draft", "early-exit:1", "--profile-prompts", "2",
            "--eval-prompts", "2", "--max-new-tokens", "6", "--sizes", "4", "--device", "cpu"]
    assert load_script("bench_prediction").main(args) == 0
    out = capsys.readouterr().out
    assert "early-exit:1; profile on 2 prompts" in out
    assert len(table_rows(out, "size", width=11)) == 1


def test_bench_drafters_on_a_saved_tiny_model(folder, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the shipped tuned growmap is found from anywhere
    out = tmp_path / "bench"
    rc = load_script("bench_drafters").main(["--target", str(folder), "--per-category", "1",
                                             "--max-new-tokens", "6", "--threads", "1",
                                             "--temperatures", "0,0.7", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "datastore corpus:" in text and "categories >= HF best" in text
    assert "== greedy (temperature 0)" in text
    assert "== temperature 0.7, rule traversal, seed per prompt fixed" in text
    sampled = json.loads((out / "eval-T0.7-traversal" / "results.json").read_text())
    assert sampled["settings"]["config"]["temperature"] == 0.7 and \
        sampled["settings"]["config"]["rule"] == "traversal"
    assert {r["method"] for r in sampled["summary"]} >= {"ar", "ngram@chain:3"}
    summary = json.loads((out / "eval" / "results.json").read_text())["summary"]
    methods = {r["method"] for r in summary}
    assert {"ar", "ngram@chain:3", "ngram@chain:4", "ngram@chain:6", "hf-pld:2"} <= methods
    assert any(re.search(r"ngram@.*smollm2-ngram-cpu\.pt$", m) for m in methods)
    assert any(m.startswith("datastore:") for m in methods)
    every = [r for r in summary if r["category"] == "all"]
    assert len(every) == len(methods)
    assert all(r["matches_ar"] == "13/13" for r in every)


def test_bench_real_pair_on_a_saved_tiny_pair(folder, tmp_path, capsys):
    """Tune every draft variant on held-out HumanEval prompts, then eval HumanEval and a
    Spec-Bench category with HF assisted generation, chains and the tuned trees."""
    draft = tmp_path / "tiny-draft"
    tiny_causal_lm("llama", seed=1).save_pretrained(draft)
    tiny_tokenizer().save_pretrained(draft)
    out = tmp_path / "bench"
    args = ["--target", str(folder), "--draft", str(draft), "--variants", "fp32,int8",
            "--humaneval", "2", "--categories", "translation", "--per-category", "1",
            "--chains", "1,2", "--tune-prompts", "2", "--tune-tokens", "6", "--max-size", "4",
            "--latency-tokens", "1,2,4", "--repeats", "1", "--max-new-tokens", "6",
            "--threads", "1", "--temperatures", "0,1.0", "--out", str(out)]
    assert load_script("bench_real_pair").main(args) == 0
    text = capsys.readouterr().out
    assert "== humaneval: speed-up over plain decoding" in text
    assert "== humaneval, temperature 1, rule traversal: speed-up over plain decoding " \
           "(tokens/step; sampled, outputs not compared)" in text
    for label in ("humaneval", "spec_bench"):
        doc = json.loads((out / f"eval-{label}-T1-traversal" / "results.json").read_text())
        assert doc["settings"]["config"]["temperature"] == 1.0 and \
            doc["settings"]["config"]["rule"] == "traversal"
    assert "pass@1 (samples passed / scored): ar 0/2" in text  # tiny models write no code
    assert re.search(r"fp32 +predicted .* tok/s .*, measured .* tok/s", text)
    assert re.search(r"whole generations, prefill included: predicted [0-9.]+x \(6 tokens "
                     r"after [0-9]+\), measured", text)
    for label, n in (("humaneval", 2), ("spec_bench", 1)):
        summary = json.loads((out / f"eval-{label}" / "results.json").read_text())["summary"]
        cats = {r["category"] for r in summary}
        overall = "all" if "all" in cats else cats.pop()  # one category: no "all" rows
        every = {r["method"]: r for r in summary if r["category"] == overall}
        assert {"ar", "chain:2", "chain:3", "hf-assisted"} <= set(every)
        assert sum(m.endswith("tune-fp32/tree.pt") for m in every) == 1
        assert sum("quant=int8@" in m for m in every) == 2  # tuned tree and the chain
        assert all(r["matches_ar"] == f"{n}/{n}" for r in every.values())
    assert (out / "tune-int8" / "summary.json").exists()


def test_bench_rules_tiny(capsys):
    args = ["--tiny", "--profile-prompts", "3", "--eval-prompts", "2", "--max-new-tokens", "10",
            "--sizes", "6", "--chain", "4", "--depth", "3", "--temperatures", "1.0",
            "--threads", "1"]
    assert load_script("bench_rules").main(args) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith(" 1.0 ")]
    assert {(r[1], r[4]) for r in rows} >= {("chain:4", "sequoia"), ("chain:4", "traversal"),
                                           ("chain:4", "block")}
    for r in rows:
        assert float(r[5]) >= 1.0  # tokens per step
        if r[4] == "sequoia":
            assert r[9] == "0.00%"  # the gain of sequoia over itself
    chain = {r[4]: r for r in rows if r[1] == "chain:4"}
    assert chain["block"][5] == chain["traversal"][5]  # the same rule on a chain


def test_bench_rules_cost_only(capsys):
    args = ["--cost-only", "64", "--cost-tree", "kary:2x2", "--cost-tree", "chain:4",
            "--threads", "1"]
    assert load_script("bench_rules").main(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("kary:2x2: 7 nodes, depth 2, vocabulary 64")
    assert "traversal" in out[0] and "block" not in out[0] and "block" in out[1]


def test_bench_adaptive_tiny(tmp_path, capsys):
    """Per-step choice time by budget, then every adaptive method on a tiny pair, interleaved
    with plain decoding and the static DP tree, outputs checked against plain decoding."""
    args = ["--tiny", "--budgets", "8,64", "--out", str(tmp_path), "--n", "2", "--calib", "2",
            "--max-new-tokens", "8", "--threads", "1"]
    assert load_script("bench_adaptive").main(args) == 0
    out = capsys.readouterr().out
    assert "dynamic-dp" in out and "2/2" in out and "FAILURE" not in out


def test_bench_choice_on_a_saved_tiny_model(folder, tmp_path, capsys):
    """Tune on 2 prompts, measure the tuned tree, auto and the grid on 2 others, in two
    dtypes: regret and prediction error per category, the plain speed of each dtype."""
    out = tmp_path / "choice"
    args = ["--target", str(folder), "--draft", "ngram", "--dtypes", "float32,bfloat16",
            "--tune-prompts", "2", "--eval-prompts", "2", "--tune-tokens", "6",
            "--max-new-tokens", "6", "--chains", "2,16", "--dp-sizes", "8",
            "--latency-tokens", "1,2,4", "--latency-repeats", "1", "--threads", "1",
            "--out", str(out)]
    assert load_script("bench_choice").main(args) == 0
    text = capsys.readouterr().out
    assert "float32: regret tuned" in text and "bfloat16: regret tuned" in text
    data = json.loads((out / "choice.json").read_text())
    table = data["table"]
    assert {r["dtype"] for r in table} == {"float32", "bfloat16"}
    for r in table:
        assert r["regret_tuned"] >= -1e-9 and r["regret_auto"] >= -1e-9
        assert r["best"] >= r["tuned"] and r["best"] >= r["auto"]
        assert r["plain_tokens_per_s"] > 0 and r["predicted_tuned"] > 0
        assert r["tuned_method"].startswith("replay (")  # ngram: chosen by greedy replay
    assert [r["dtype"] for r in data["dtypes"]] == ["float32", "bfloat16"]
    assert sum(r["auto_dtype_pick"] for r in data["dtypes"]) == 1
    held = {r["dtype"]: r for r in data["held_out_replay"]}
    # the replay along the held-out plain outputs takes the steps the measured run took
    # (float32: greedy-exact), whatever the timings
    assert held["float32"]["prompts"] >= 1 and held["float32"]["tokens_per_step_replayed"] == \
        pytest.approx(held["float32"]["tokens_per_step_measured"])
    assert "held-out prompts" in text
    # every method's steps priced with the tune's curve, per dtype
    priced = {r["dtype"]: r for r in data["priced_steps"]}
    assert set(priced) == {"float32", "bfloat16"} and "priced with tune's latency" in text
    for r in priced.values():
        assert r["best_priced"] >= max(r["tuned_priced"], r["auto_priced"]) > 0
        assert r["regret_tuned_priced"] >= 0 and r["regret_auto_priced"] >= 0
    # the replay's own pick had it tuned on the held-out prompts: the predictor's share of
    # the regret, apart from the split's
    for r in held.values():
        assert r["held_out_pick"] in {"tuned", "chain:3", "chain:17", "dp:8"}
        assert r["model_regret"] >= -1e-9
        assert r["held_out_best_measured"] >= r["held_out_pick_measured"]
    assert "replayed on the held-out prompts it would pick" in text


def test_bench_choice_with_a_draft_model(folder, tmp_path, capsys):
    """A model drafter (an early exit): the grid is predicted by the DP even when tune
    answered with a copy drafter replayed faster (the draft model itself cannot replay).
    With --repeats 2 every measured generation runs twice (forked drafters, a model's too)."""
    out = tmp_path / "choice"
    args = ["--target", str(folder), "--draft", "early-exit:1", "--tune-prompts", "2",
            "--eval-prompts", "2", "--tune-tokens", "6", "--max-new-tokens", "6", "--chains",
            "2", "--dp-sizes", "8", "--hf-prompt-lookup", "", "--latency-tokens", "1,2,4",
            "--latency-repeats", "1", "--threads", "1", "--out", str(out), "--repeats", "2"]
    assert load_script("bench_choice").main(args) == 0
    data = json.loads((out / "choice.json").read_text())
    table = data["table"]
    assert all(r["predicted_tuned"] > 0 and r["regret_tuned"] >= -1e-9 for r in table)
    assert "float32: regret tuned" in capsys.readouterr().out
    run = json.loads((out / "float32-t0" / "eval" / "run.json").read_text())
    assert "auto:draft=(early-exit:1)" in json.dumps(run["methods"])
    assert any(r["method"] == "auto" for r in data["rows"]["float32"])
    rows = [json.loads(r) for r in (out / "float32-t0" / "eval" / "rows.jsonl").open()]
    assert rows and all(len(r["repeat_seconds"]) == 2
                        and r["seconds"] == min(r["repeat_seconds"]) for r in rows)


def test_a_grid_method_that_is_tunes_choice_is_measured_once():
    """When tune answers ``--draft auto`` (or a chain of the grid), the grid's ``auto`` (that
    chain) is the same configuration: measured once, as the tuned method, and read from it,
    so two timings of one configuration never show up as regret."""
    from treeopt.evaluate.choice import ChoiceRun, choice_table, grid_methods, same_as_tuned
    from treeopt.evaluate.methods import Method, chain_method
    from treeopt.shapes import chain

    auto = Method("tuned", None, "drafter", "tune's choice: auto", "auto")
    methods, same = same_as_tuned(grid_methods(None, (2, 4), (), (3,), auto))
    assert same == ["auto"] and [m.name for m in methods] == ["ar", "tuned", "chain:3",
                                                              "chain:5", "hf-pld:3"]
    tree = Method("tuned", chain(draft_tokens=4), "tree", "the tree tune chose")
    methods, same = same_as_tuned(grid_methods(None, (2, 4), (), (), tree))
    assert same == ["chain:5"] and "auto" in [m.name for m in methods]
    assert same_as_tuned([chain_method(2)]) == ([chain_method(2)], [])
    # a pair with a draft model: auto has it among its candidates, as a user runs it
    with_draft = {m.name: m for m in grid_methods(None, (), (), (), auto,
                                                   "model:d,quant=int8")}
    assert with_draft["auto"].drafter == "auto:draft=(model:d,quant=int8)"
    assert same_as_tuned(list(with_draft.values()))[1] == []  # not tune's copies-only auto
    import pandas as pd

    summary = pd.DataFrame({"method": ["ar", "tuned", "chain:3"], "category": ["c"] * 3,
                            "speedup": [1.0, 1.3, 1.2], "tokens_per_s": [10.0, 13.0, 12.0]})
    run = ChoiceRun("float32", summary, {"tuned": 1.25}, 5, 4, {1: 100.0},
                    same_as_tuned=["auto"])
    row = choice_table(run).iloc[0]
    assert row["auto"] == row["tuned"] == 1.3 and row["regret_auto"] == 0.0


def test_bench_choice_sampled_tunes_and_measures_at_each_temperature(folder, tmp_path,
                                                                     capsys):
    """A sampled run is its own tune (acceptance at that temperature, no replay) and its own
    measurement verified by the rule; a chain-only rule with branching DP trees is refused in
    one line before any work."""
    out = tmp_path / "choice"
    args = ["--target", str(folder), "--draft", "ngram", "--temperatures", "0.7",
            "--rule", "traversal", "--tune-prompts", "2", "--eval-prompts", "2",
            "--tune-tokens", "6", "--max-new-tokens", "6", "--chains", "2", "--dp-sizes", "8",
            "--hf-prompt-lookup", "", "--latency-tokens", "1,2,4", "--latency-repeats", "1",
            "--threads", "1", "--out", str(out)]
    assert load_script("bench_choice").main(args) == 0
    text = capsys.readouterr().out
    assert "float32 T=0.7 (traversal): regret tuned" in text
    data = json.loads((out / "choice.json").read_text())
    assert data["settings"]["temperatures"] == [0.7] and data["settings"]["rule"] == "traversal"
    for r in data["table"]:
        assert r["temperature"] == 0.7 and r["rule"] == "traversal"
        assert r["regret_tuned"] >= -1e-9 and r["predicted_tuned"] > 0
        assert not r["tuned_method"].startswith("replay (")  # no replay when sampling
    assert data["held_out_replay"] == [] and list(data["rows"]) == ["float32-t0.7"]
    bad = args[:-2] + ["--rule", "block"]
    assert load_script("bench_choice").main(bad) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "verifies chains" in err[0] and "--dp-sizes" in err[0]


def _drift_max(out: str) -> dict[str, float]:
    return {line.split(":")[0].strip(): float(line.split("max ")[1].split()[0])
            for line in out.splitlines() if " max " in line}


def test_bench_ties_tiny(capsys):
    """The measurement behind the tie tolerances: float32 drifts far below its 1e-4
    tolerance; bfloat16 drifts, and never beyond its measured 2**-3."""
    from treeopt.evaluate.exactness import REL_TOLERANCE

    common = ["--tiny", "-n", "3", "--max-new-tokens", "16", "--chunks", "2,5", "--threads",
              "1"]
    assert load_script("bench_ties").main(common + ["--dtype", "float32"]) == 0
    fp32 = _drift_max(capsys.readouterr().out)
    assert set(fp32) == {"chunk 2", "chunk 5", "recomputed"}
    assert max(fp32.values()) < REL_TOLERANCE["float32"] / 10
    assert load_script("bench_ties").main(common + ["--dtype", "bfloat16"]) == 0
    bf16 = _drift_max(capsys.readouterr().out)
    assert max(bf16.values()) > max(fp32.values())
    assert max(bf16.values()) < REL_TOLERANCE["bfloat16"]


def test_choice_tables_of_a_single_category_data_set():
    """HumanEval has one category, so eval's summary has no "all" rows: its rows are the
    overall ones (regret and the dtype table must still come out)."""
    import pandas as pd

    from treeopt.evaluate.choice import ChoiceRun, choice_table, dtype_table

    summary = pd.DataFrame({"method": ["ar", "tuned", "auto", "chain:5"],
                            "category": ["coding"] * 4, "speedup": [1.0, 1.5, 1.2, 1.6],
                            "tokens_per_s": [4.0, 6.0, 4.8, 6.4]})
    run = ChoiceRun("bfloat16", summary, {"ar": 1.0, "tuned": 1.35}, 9, 8, {1: 250.0})
    table = choice_table(run)
    every = table[table["category"] == "all"].iloc[0]
    assert every["regret_tuned"] == pytest.approx(1.6 / 1.5 - 1)
    assert every["prediction_error_tuned"] == pytest.approx(1.35 / 1.5 - 1)
    dt = dtype_table([run]).iloc[0]
    assert dt["best_method"] == "chain:5" and dt["plain_tokens_per_s"] == 4.0


def test_choice_predictions_are_of_whole_generations():
    """Eval's speed-up includes the prefill, so the prediction it is compared with does too:
    per category, the per-step prediction carried over that category's plain generations
    with tune's prefill costs; the draft's prefill only for methods that run the draft. By
    hand (see test_hardware): 2 + 1 ms per prompt token, a 10 ms plain step, a 100-token
    prompt and 11 new tokens: 2x per step is 300 / 350 whole; 1.5x without the draft is
    300 / (200 + 100 / 1.5)."""
    import pandas as pd

    from treeopt.evaluate.choice import ChoiceRun, choice_table
    from treeopt.search.hardware import PrefillCost

    summary = pd.DataFrame({"method": ["ar", "tuned", "auto"], "category": ["coding"] * 3,
                            "speedup": [1.0, 0.8, 1.2], "tokens_per_s": [4.0, 3.2, 4.8]})
    rows = pd.DataFrame({"method": ["ar", "tuned", "auto"], "category": ["coding"] * 3,
                         "prompt_tokens": [100] * 3, "new_tokens": [11] * 3})
    run = ChoiceRun("float32", summary, {"ar": 1.0, "tuned": 2.0, "auto": 1.5}, 5, 4,
                    {1: 10.0}, rows=rows, prefill=PrefillCost(2.0, 1.0), plain_ms=10.0,
                    no_draft_prefill=["auto"])
    every = choice_table(run)
    row = every[every["category"] == "all"].iloc[0]
    assert row["predicted_tuned_per_step"] == 2.0
    assert row["predicted_tuned"] == pytest.approx(300 / 350)
    assert row["prediction_error_tuned"] == pytest.approx(300 / 350 / 0.8 - 1)
    auto = 300 / (200 + 100 / 1.5)
    errors = [300 / 350 / 0.8 - 1, auto / 1.2 - 1]
    assert row["prediction_error_grid_max"] == pytest.approx(max(errors, key=abs))
    # without tune's prefill costs (an older tune) the per-step prediction is compared
    bare = ChoiceRun("float32", summary, {"ar": 1.0, "tuned": 2.0}, 5, 4, {1: 10.0}, rows=rows)
    assert choice_table(bare).iloc[0]["predicted_tuned"] == 2.0


def test_priced_steps_by_hand():
    """Every method's recorded steps priced with tune's curve (envelope: T(1) = 10, T(2) =
    14, T(4) = 12 -> 14) plus its measured drafting: plain decoding 4 tokens in 4 one-node
    steps = 40 ms; tuned 4 tokens in two 4-node steps = 28 ms; auto 4 tokens in a plain step
    and a 4-node one with 2 ms of drafting = 26 ms; chain:2 the same as tuned (same config);
    Hugging Face's rows (no steps) are left out."""
    import pandas as pd

    from treeopt.evaluate.choice import ChoiceRun, priced_steps

    rows = pd.DataFrame({
        "method": ["ar", "tuned", "auto", "hf-pld-2"], "category": ["qa"] * 4,
        "nodes_per_step": [[1, 1, 1, 1], [4, 4], [1, 4], None], "steps": [4, 2, 2, 3],
        "new_tokens": [4, 4, 4, 4], "draft_s": [0.0, 0.0, 0.002, 0.0]})
    run = ChoiceRun("float32", None, {}, 5, 4, {1: 10.0, 2: 14.0, 4: 12.0}, rows=rows,
                    same_as_tuned=["chain:2"])
    got = priced_steps(run)
    assert got["tuned_priced"] == pytest.approx(40 / 28)
    assert got["auto_priced"] == pytest.approx(40 / 26)
    assert got["best_priced_method"] == "auto" and got["regret_auto_priced"] == 0.0
    assert got["regret_tuned_priced"] == pytest.approx((40 / 26) / (40 / 28) - 1)
    assert priced_steps(ChoiceRun("float32", None, {}, 5, 4, {1: 10.0})) is None


def test_bench_choice_resumes_an_interrupted_run(folder, tmp_path, monkeypatch, capsys):
    """With --out nothing measured is lost: a run interrupted during its eval continues with
    --resume, keeping the tune's latency measurement (so it chooses as before) and the
    finished prompts' rows; another run's folder or other options are refused in one line."""
    import treeopt.evaluate.choice as choice_mod
    import treeopt.tuning as tuning_mod

    out = tmp_path / "choice"
    args = ["--target", str(folder), "--draft", "ngram", "--tune-prompts", "2",
            "--eval-prompts", "2", "--tune-tokens", "6", "--max-new-tokens", "6", "--chains",
            "2", "--dp-sizes", "8", "--hf-prompt-lookup", "", "--latency-tokens", "1,2,4",
            "--latency-repeats", "1", "--threads", "1", "--out", str(out)]
    real_eval = choice_mod.run_eval

    def interrupted(target, draft, prompts, methods, **kw):
        real_eval(target, draft, prompts[:1], methods, **kw)  # the first prompt finishes
        raise KeyboardInterrupt

    monkeypatch.setattr(choice_mod, "run_eval", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_script("bench_choice").main(args)
    rows = out / "float32-t0" / "eval" / "rows.jsonl"
    first = rows.read_text().splitlines()
    assert first and (out / "float32-t0" / "tune" / "summary.json").exists()
    tuned_before = json.loads((out / "float32-t0" / "tune" / "summary.json").read_text())
    monkeypatch.setattr(choice_mod, "run_eval", real_eval)

    assert load_script("bench_choice").main(args) == 2  # not without --resume
    assert "already holds a bench_choice run" in capsys.readouterr().err

    def never(*a, **k):
        raise AssertionError("the finished latency measurement is measured again")

    monkeypatch.setattr(tuning_mod, "measure_latency", never)
    assert load_script("bench_choice").main(args + ["--resume"]) == 0
    assert "float32: regret tuned" in capsys.readouterr().out
    after = rows.read_text().splitlines()
    assert len({json.loads(r)["prompt_key"] for r in first}) == 1
    assert len({json.loads(r)["prompt_key"] for r in after}) == 2  # the second one added
    tuned_after = json.loads((out / "float32-t0" / "tune" / "summary.json").read_text())
    aside = out / "float32-t0" / "eval-before-1" / "rows.jsonl"
    if (tuned_after["method"], tuned_after["tree"]) == (tuned_before["method"],
                                                         tuned_before["tree"]):
        assert after[:len(first)] == first and not aside.exists()  # kept, not re-measured
    else:  # on a tiny model configurations of equal yield tie; a flip keeps the rows aside
        assert aside.read_text().splitlines() == first
    assert len(json.loads((out / "choice.json").read_text())["rows"]["float32"]) > 0
    # a resumed tune that chooses otherwise (replay times proposals: a near tie can flip)
    # cannot continue the earlier choice's eval: kept aside, measured anew, said
    summary = out / "float32-t0" / "tune" / "summary.json"
    summary.write_text(json.dumps({**tuned_after, "method": "an earlier choice"}))
    before = sorted(p.name for p in (out / "float32-t0").iterdir())
    assert load_script("bench_choice").main(args + ["--resume"]) == 0
    kept = sorted(set(p.name for p in (out / "float32-t0").iterdir()) - set(before))
    assert len(kept) == 1 and kept[0].startswith("eval-before-")
    assert f"kept in {kept[0]} and measured anew" in capsys.readouterr().err
    assert (out / "float32-t0" / kept[0] / "rows.jsonl").read_text().splitlines() == after

    recorded = json.loads((out / "bench.json").read_text())
    del recorded["settings"]["repeats"]  # a run recorded before --repeats existed resumes
    (out / "bench.json").write_text(json.dumps(recorded))
    assert load_script("bench_choice").main(args + ["--resume"]) == 0
    capsys.readouterr()
    assert load_script("bench_choice").main(args + ["--resume", "--repeats", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other settings (repeats)" in err[0]
    assert load_script("bench_choice").main(args + ["--repeats", "0", "--out",
                                                    str(tmp_path / "x")]) == 2
    assert "repeats must be a whole number" in capsys.readouterr().err

    other = [a if a != "6" else "7" for a in args] + ["--resume"]
    assert load_script("bench_choice").main(other) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other settings" in err[0] and "max_new_tokens" in err[0]


def test_regret_has_a_bootstrap_interval_over_prompts():
    """Regret against the best method measured, with a paired bootstrap interval over the
    prompts: the tuned method 10 % slower on every prompt gives exactly 10 %; a regret made
    of one prompt's noise has an interval reaching below zero."""
    import pandas as pd

    from treeopt.evaluate.choice import ChoiceRun, choice_table

    def run_of(tuned_secs):
        rows = []
        for i, t in enumerate(tuned_secs):
            for method, secs in (("ar", 2.0), ("tuned", t), ("chain:5", 1.0)):
                rows.append({"method": method, "category": "c", "prompt_key": f"p{i}",
                             "seconds": secs, "new_tokens": 10, "prompt_tokens": 5})
        rows = pd.DataFrame(rows)
        total = rows.groupby("method")["seconds"].sum()
        summary = pd.DataFrame({"method": ["ar", "tuned", "chain:5"], "category": ["c"] * 3,
                                "speedup": [1.0, total["ar"] / total["tuned"],
                                            total["ar"] / total["chain:5"]],
                                "tokens_per_s": [5.0, 5.0, 10.0]})
        return ChoiceRun("float32", summary, {"tuned": 1.5}, 5, 4, {1: 10.0}, rows=rows)

    row = choice_table(run_of([1.1] * 4)).iloc[0]
    assert row["regret_tuned"] == pytest.approx(0.1)
    assert row["regret_tuned_ci95_low"] == pytest.approx(0.1)
    assert row["regret_tuned_ci95_high"] == pytest.approx(0.1)
    noisy = choice_table(run_of([0.9, 0.95, 1.0, 1.6])).iloc[0]
    assert noisy["regret_tuned"] > 0 and noisy["regret_tuned_ci95_low"] < 0
    assert noisy["regret_tuned_ci95_high"] > noisy["regret_tuned"]
