"""treeopt report: plots and page from a hand-built results document."""

import json
import math

import pandas as pd
import pytest
from helpers import KARY, eval_results

from treeopt.cli import main
from treeopt.evaluate.methods import Method
from treeopt.evaluate.report import ReportError, depth_rank_table, write_report
from treeopt.evaluate.results import summarise
from treeopt.tree import Tree


def test_depth_rank_table_hand_computed(tmp_path):
    doc = json.loads((eval_results(tmp_path) / "results.json").read_text())
    table = depth_rank_table(doc["rows"], Method("kary", KARY))
    # Depth 1: 8 steps reach the root; ranks accepted: 1,2,-,1 twice -> 4/8 rank 1, 2/8 rank 2.
    # Depth 2: reached when accepted >= 1: 6 steps; rank 2 twice, rank 1 twice.
    assert table == [[4 / 8, 2 / 8], [2 / 6, 2 / 6]]
    wide = Tree.from_parents([-1, 0, 0, 0, 1])  # depth 2 has only rank 1
    t = depth_rank_table(doc["rows"], Method("kary", wide))
    assert math.isnan(t[1][1]) and math.isnan(t[1][2])


def test_report_writes_files_and_flags_failures(tmp_path):
    res = eval_results(tmp_path / "run", mismatch=True)
    page = write_report(res, tmp_path / "rep", profile=[0.6, 0.2])
    out = tmp_path / "rep"
    for name in ("speedup.png", "tokens_per_step.png", "accepted_hist.png",
                 "acceptance_heatmap.png", "expected_vs_measured.png", "report.html",
                 "trees/kary.png"):
        assert (out / name).stat().st_size > 0, name
    md = page.read_text()
    assert "GREEDY EXACTNESS FAILED for 1 output(s)" in md
    assert "kary differs from ar on prompt b/1 turn 1 at new token 3" in md
    assert "never prompt tokens" in md and "![" in md
    assert f"expected {KARY.expected_tokens([0.6, 0.2]):.3f}" in md


def test_report_cli_and_errors(tmp_path, capsys):
    res = eval_results(tmp_path / "run")
    assert main(["report", str(res / "results.json"), "--out", str(tmp_path / "r"),
                 "--no-trees"]) == 0
    md = (tmp_path / "r" / "report.md").read_text()
    assert "FAILED" not in md and "pass --profile" in md
    assert not (tmp_path / "r" / "trees").exists()
    assert main(["report", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert "no results file" in capsys.readouterr().err
    with pytest.raises(ReportError):
        write_report({"summary": []}, tmp_path / "y")


def test_report_shows_acceptance_as_a_percentage_like_the_terminal(tmp_path):
    from treeopt.evaluate.results import format_summary

    res = eval_results(tmp_path / "run")
    page = write_report(res, tmp_path / "rep", trees=False)
    md, page_html = page.read_text(), (tmp_path / "rep" / "report.html").read_text()
    rate = 5 / 24  # kary: 2 + 1 + 0 + 2 accepted of 4 steps x 6 drafted, per prompt
    assert f"{rate:.1%}" in format_summary(summarise(pd.read_csv(res / "per_prompt.csv")))
    kary = [line for line in md.splitlines() if line.startswith("| kary | all")]
    assert len(kary) == 1 and f"| {rate:.1%} |" in kary[0]
    assert f"{rate:.3g}" not in kary[0]
    assert f"{rate:.1%}" in page_html


def test_report_lists_ties_apart_from_failures(tmp_path):
    res = eval_results(tmp_path / "run", mismatch=True)
    doc = json.loads((res / "results.json").read_text())
    for r in doc["rows"]:
        if r["matches_ar"] is False:
            r.update(exactness="tie", tie_gap=0.0019, tie_tolerance=0.0028)
    page = write_report(doc, tmp_path / "rep", trees=False)
    md = page.read_text()
    assert "FAILED" not in md
    assert "1 greedy output(s) differ from plain decoding only at a numerical tie" in md
    assert ("kary differs from ar on prompt b/1 turn 1 at a numerical tie at new token 3 "
            "(best logits 0.0019 apart, tolerance 0.0028)") in md
    assert "numerical tie" in (tmp_path / "rep" / "report.html").read_text()
