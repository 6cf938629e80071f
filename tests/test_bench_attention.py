"""Tree attention benchmark: tree result == per-branch result, files written."""

import pandas as pd
import pytest
import torch

from treeopt.bench.attention import (
    BenchError,
    bench_attention,
    bench_tree,
    bench_verify,
    branch_masks,
    check_against_branches,
    make_case,
    run_branches,
    run_tree,
)
from treeopt.cli import main
from treeopt.testing import tiny_causal_lm


def test_bench_tree_shapes():
    assert bench_tree(7, "binary").to_parents() == [-1, 0, 0, 1, 1, 2, 2]
    assert bench_tree(5, "chain").depth == 4 and bench_tree(5, "star").width == 4
    assert bench_tree(4, "ternary").to_parents() == [-1, 0, 0, 0]
    with pytest.raises(BenchError):
        bench_tree(4, "bushy")


@pytest.mark.parametrize("shape", ["binary", "ternary", "chain"])
def test_tree_attention_equals_branches(shape):
    tree = bench_tree(11, shape)
    case = make_case(tree, batch=2, context=5, heads=2, head_dim=8, dtype=torch.float64,
                     device=torch.device("cpu"))
    ref = run_branches(case, branch_masks(case))
    # Brute force for one leaf: softmax over prefix + path, by hand.
    leaf = tree.leaves[-1]
    path = list(tree.path_to(leaf))
    q = case.q_tree[:, :, path]
    cols = list(range(5)) + [5 + i for i in path]
    k, v = case.k_all[:, :, cols], case.v_all[:, :, cols]
    scores = q @ k.transpose(-1, -2) / 8 ** 0.5
    causal = torch.ones(len(path), len(cols), dtype=torch.bool).tril(5)
    by_hand = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v
    assert torch.allclose(ref[-1], by_hand, atol=1e-12)
    for additive in (False, True):
        assert check_against_branches(case, run_tree(case, additive), ref) < 1e-12
    bad = run_tree(case).clone()
    bad[:, :, tree.leaves[0]] += 1e-2
    with pytest.raises(AssertionError, match="differs from the per-branch"):
        check_against_branches(case, bad, ref)


def test_bench_attention_tiny_run_and_cli(tmp_path, capsys):
    rows, notes = bench_attention([1, 2], [4], [3, 6], heads=2, head_dim=4, repeats=2,
                                  warmup=1)
    df = pd.DataFrame(rows)
    assert len(df) == 2 * 2 * 3  # (batch x sizes) x (tree_bool, tree_additive, branches)
    assert set(df["method"]) == {"tree_bool", "tree_additive", "branches"}
    assert (df["max_abs_err"] < 1e-5).all() and (df["median_ms"] > 0).all()
    assert (df["q75_ms"] >= df["q25_ms"]).all()
    assert df[df["method"] == "branches"]["calls"].tolist() == [2, 3, 2, 3]
    assert any("tree_flex skipped" in n and "CUDA" in n for n in notes)
    rc = main(["bench", "attention", "--batch", "1", "--context", "8", "--tree-sizes", "4",
               "--heads", "2", "--head-dim", "4", "--repeats", "2", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0 and "branches/tree" in out and "tree_flex skipped" in out
    assert (tmp_path / "attention.png").stat().st_size > 0
    assert len(pd.read_csv(tmp_path / "attention.csv")) == 3


def test_bench_verify_tiny_model():
    model = tiny_causal_lm()
    rows = bench_verify(model, [4, 1], context=8, repeats=2, warmup=1)
    assert [r["tree_size"] for r in rows] == [1, 4]
    assert all(r["median_ms"] > 0 and r["iqr_ms"] >= 0 for r in rows)
