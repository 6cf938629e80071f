"""Adaptive drafters in treeopt eval, the report and the acceptance profiler: every
registered adaptive drafter is an eval method (nested specs with ':', '@' and parentheses
included), rows and summary carry the tree sizes and depths actually used, the report draws
their histograms and compares adaptive and static trees by budget, and `treeopt profile
acceptance` profiles them."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from helpers import Sharpened, serve_pair

from treeopt.decode.drafter import register_drafter
from treeopt.decode.engine import generate
from treeopt.decode.sampling import Sampling
from treeopt.drafters.egag import EgagDrafter
from treeopt.evaluate.methods import AR, chain_method, drafter_method
from treeopt.evaluate.report import adaptive_methods, budget_tables, write_report
from treeopt.evaluate.results import format_summary, summarise
from treeopt.evaluate.runner import EvalConfig, run_eval
from treeopt.models.loading import early_exit_draft
from treeopt.shapes import chain, kary
from treeopt.testing import tiny_causal_lm

N = 16
PROMPTS = [tuple(range(3, 10)) * 3 + (3,), (5, 9, 7, 5, 9, 7, 5, 9, 2, 5, 9, 7)]


@register_drafter("test-sharp-egag", "tests only: EGAG over a hand-made draft whose entropy is "
                                     "high after every third token id")
def _sharp(options, *, target, tokenizer, tree):
    return EgagDrafter(Sharpened(early_exit_draft(target, 1), range(0, 96, 3)), tree,
                       gamma_min=1, gamma_max=4)


@pytest.fixture(scope="module")
def target():
    return tiny_causal_lm("llama", vocab_size=96, num_layers=3, seed=0)


ADAPTIVE = ["test-sharp-egag",
            "egag:draft=early-exit:1,gamma_min=0,threshold=0.9999@kary:2x2",
            "fallback:first=(ngram:max=3,k=2),then=early-exit:1",
            "horizontal:model=early-exit:1,levels=2,deep=(ngram:max=2)@kary:2x2",
            "vertical:draft=early-exit:2,helper=ngram@chain:4"]


@pytest.fixture(scope="module")
def run(target, tmp_path_factory):
    out = tmp_path_factory.mktemp("adaptive")
    methods = [chain_method(3)] + [drafter_method(s) for s in ADAPTIVE]
    res = run_eval(target, "early-exit:1", [list(p) for p in PROMPTS], methods,
                   config=EvalConfig(max_new_tokens=N, warmup=False), out_dir=out,
                   progress=False)
    return res, out


def test_every_adaptive_method_runs_and_equals_plain_decoding(run):
    res, _ = run
    assert res.failures == []
    assert set(res.rows["method"]) == {AR, "chain:4", *ADAPTIVE}
    assert res.rows["matches_ar"].all() and (res.rows["new_tokens"] == N).all()


def test_rows_and_summary_carry_tree_sizes(run, target):
    res, out = run
    rows = res.rows.set_index(["method", "prompt_key"])
    for r in res.rows.to_dict("records"):
        assert len(r["nodes_per_step"]) == len(r["depth_per_step"]) == r["steps"]
        assert r["mean_nodes"] == pytest.approx(sum(r["nodes_per_step"]) / r["steps"])
        assert r["mean_depth"] == pytest.approx(sum(r["depth_per_step"]) / r["steps"])
    assert (rows.loc[AR, "mean_nodes"] == 1.0).all() and (rows.loc[AR, "mean_depth"] == 0).all()
    # The per-step sizes are the engine's own.
    gen = generate(target, None, torch.tensor([PROMPTS[0]]), max_new_tokens=N)
    assert rows.loc[(AR, "default/0"), "nodes_per_step"] == [s.nodes for s in gen.stats.steps]
    # The summary pools per verification step (rows weighted by their forwards).
    s = res.summary.set_index("method")
    sizes = [n for lst in res.rows[res.rows["method"] == "chain:4"]["nodes_per_step"]
             for n in lst]
    assert s.loc["chain:4", "mean_nodes"] == pytest.approx(sum(sizes) / len(sizes))
    assert s.loc[AR, "mean_nodes"] == 1.0
    assert "nodes/step" in format_summary(res.summary)
    # results.json keeps the lists, per_prompt.csv the means only; its summary agrees.
    doc = json.loads((out / "results.json").read_text())
    assert all(isinstance(r["nodes_per_step"], list) for r in doc["rows"])
    csv = pd.read_csv(out / "per_prompt.csv")
    assert "nodes_per_step" not in csv.columns and "mean_nodes" in csv.columns
    again = summarise(csv).set_index(["method", "category"])
    assert again.loc[("chain:4", "default"), "mean_nodes"] == pytest.approx(
        s.loc["chain:4", "mean_nodes"])
    assert "mean_nodes" in doc["metrics"]


def test_adaptive_methods_are_told_from_fixed_trees_cut_at_the_end(run):
    res, out = run
    doc = json.loads((out / "results.json").read_text())
    names = [AR, "chain:4", *ADAPTIVE]
    found = adaptive_methods(doc["rows"], names, N)
    # chain:4 is cut near the end of each turn only: static. The hand-made EGAG, the n-gram
    # fallback and the n-gram levels of the horizontal cascade change the tree every step;
    # vertical drafts the draft model's chain of fixed length, like chain:4.
    assert "chain:4" not in found and "vertical:draft=early-exit:2,helper=ngram@chain:4" \
        not in found
    for name in ("test-sharp-egag", "fallback:first=(ngram:max=3,k=2),then=early-exit:1",
                 "horizontal:model=early-exit:1,levels=2,deep=(ngram:max=2)@kary:2x2"):
        assert name in found
    # Without the cut taken into account, chain:4 would look adaptive.
    cut = {n for r in doc["rows"] if r["method"] == "chain:4" for n in r["nodes_per_step"]}
    assert len(cut) > 1


def test_report_draws_tree_sizes_and_compares_budgets(run):
    res, out = run
    page = write_report(out, out / "report", trees=False)
    md = page.read_text()
    assert (out / "report" / "tree_sizes.png").stat().st_size > 0
    assert "Tree sizes and depths used" in md and "tree_sizes.png" in md
    assert "## Adaptive vs static trees" in md
    doc = json.loads((out / "results.json").read_text())
    [(cat, recs)] = budget_tables(doc)
    assert cat == "default" and recs[0]["method"] == AR
    by = {r["method"]: r for r in recs}
    assert by["chain:4"]["trees"] == "static" and by["test-sharp-egag"]["trees"] == "adaptive"
    budgets = [r["mean_nodes"] for r in recs[1:]]
    assert budgets == sorted(budgets)
    s = res.summary.set_index("method")
    assert by["test-sharp-egag"]["tokens_per_step"] == pytest.approx(
        s.loc["test-sharp-egag", "tokens_per_step"])
    html = (out / "report" / "report.html").read_text()
    assert "Adaptive vs static trees" in html and "tree_sizes.png" in html


def test_report_of_results_without_tree_sizes(tmp_path):
    """Older results (no per-step sizes): no histogram, no budget table, no error."""
    from helpers import eval_results

    res = eval_results(tmp_path / "old")
    md = write_report(res, tmp_path / "rep", trees=False).read_text()
    assert "Adaptive vs static" not in md and not (tmp_path / "rep" / "tree_sizes.png").exists()


def test_method_names_with_nested_specs():
    m = drafter_method("fallback:first=(ngram:max=3,k=8),then=early-exit:4@chain:3")
    assert m.drafter == "fallback:first=(ngram:max=3,k=8),then=early-exit:4"
    assert m.tree == chain(3) and m.name.endswith("@chain:3")
    m = drafter_method("fallback:first=(datastore:corpus@v2.npz),then=early-exit:4")
    assert m.drafter == m.name and m.tree is None
    m = drafter_method("horizontal:model=(egag:tree=kary:2x1),deep=ngram@kary:2x3")
    assert m.drafter == "horizontal:model=(egag:tree=kary:2x1),deep=ngram"
    assert m.tree == kary(2, 3)


def test_cli_eval_with_adaptive_drafters(target, tmp_path, monkeypatch, capsys):
    from treeopt.cli import main

    serve_pair(monkeypatch, target, None, drafter=None)
    data = tmp_path / "q.txt"
    data.write_text("say one one one\nsay two two two\n")
    out = tmp_path / "run"
    rc = main(["eval", "--dataset", str(data), "--draft", "none", "--drafter",
               "egag:draft=early-exit:1,gamma_max=3", "--drafter",
               "fallback:first=(ngram:max=3,k=2),then=early-exit:1@chain:3",
               "--max-new-tokens", "6", "--out", str(out), "--no-progress", "--no-warmup",
               "--wide"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "egag:draft=early-exit:1,gamma_max=3" in captured.out and "nodes/step" in captured.out
    assert (out / "report" / "report.md").exists()


@pytest.mark.parametrize("spec", ["egag:draft=early-exit:1,gamma_max=3",
                                  "fallback:first=(ngram:max=3),then=early-exit:1",
                                  "horizontal:model=early-exit:1,levels=2,deep=ngram",
                                  "vertical:draft=early-exit:2,helper=ngram"])
def test_acceptance_profile_of_adaptive_drafters(target, spec):
    """Teacher-forced and online profiles run; greedy teacher-forced ranks of a cascade are
    those of the proposals it makes (the model's top-k where the n-gram index is silent)."""
    from treeopt.decode.drafter import build_drafter
    from treeopt.profile.acceptance import AcceptanceRun, profile_acceptance

    drafter = build_drafter(spec, target=target)
    prompts = [list(p) for p in PROMPTS]
    for mode, continuation in (("teacher-forced", "target"), ("teacher-forced", "dataset"),
                               ("online", "target")):
        for temperature in (0.0, 1.0):
            prof = profile_acceptance(target, drafter, prompts,
                                      AcceptanceRun(width=2, depth=2, mode=mode,
                                                    continuation=continuation, max_new_tokens=10,
                                                    sampling=Sampling(temperature=temperature)))
            assert prof.meta["positions"] > 0 and 0 <= sum(prof.p) <= 1


def test_stochastic_profile_of_a_fallback_uses_the_model_rule(target):
    """Where the model drafts, sampling verification uses its Q (as decoding does), not the
    point-mass rule: with the target as its own draft every such sibling is accepted (the
    point-mass rule would accept about P(x), near 1/96 for this tiny model)."""
    from treeopt.decode.drafter import Drafter, root_only
    from treeopt.drafters.cascade import FallbackDrafter
    from treeopt.drafters.model import ModelDrafter
    from treeopt.profile.acceptance import AcceptanceRun, profile_acceptance

    class Never(Drafter):
        name = "never"
        shape = chain(2)

        def propose(self, committed, max_depth, sampling, generator=None):
            return root_only(committed)

    drafter = FallbackDrafter(Never(), ModelDrafter(target))
    prof = profile_acceptance(target, drafter, [list(PROMPTS[1])],
                              AcceptanceRun(width=1, depth=1, max_new_tokens=12,
                                            sampling=Sampling(temperature=1.0)))
    assert prof.meta["positions"] >= 10 and prof.p[0] > 0.99
