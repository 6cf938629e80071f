"""Per-step sizes in the copy drafters: the n-gram index's features by hand, the renumbering
of a kept part, and ``ngram:len=auto`` token-exact with plain greedy decoding."""

import json

import pytest
import torch

from treeopt.decode.drafter import DrafterError, build_drafter
from treeopt.decode.engine import generate
from treeopt.drafters.copylen import StepSizer, bfs_subtree
from treeopt.drafters.ngram import NgramIndex
from treeopt.profile.copytable import CopyTable, Features


def test_ngram_features_by_hand():
    idx = NgramIndex(1, 3)
    idx.extend([1, 2, 3, 1, 2, 4, 1, 2, 3, 5, 2, 6])
    toks, feats = idx.candidates_with_features([1, 2], 4)
    # after (1, 2): 3 twice, 4 once (n = 2, total 3); then after (2,): 6 once (total 4)
    assert toks == [3, 4, 6]
    assert feats == [Features(1, 2, 2 / 3), Features(2, 2, 1 / 3), Features(3, 1, 1 / 4)]
    assert idx.candidates_with_features([9], 3) == ([], [])


def test_kept_nodes_are_renumbered_breadth_first():
    # candidate: 0 -> 1, 2 ; 1 -> 3 ; 2 -> 4 ; keep 0, 2, 4, 1
    tree, old = bfs_subtree([-1, 0, 0, 1, 2], [0, 1, 2, 1, 1], [0, 1, 2, 4])
    assert tree.parents == (-1, 0, 0, 2) and old == [0, 1, 2, 4]
    tree, old = bfs_subtree([-1, 0, 0, 1, 2], [0, 2, 1, 1, 1], [0, 1, 2])  # rank order
    assert old == [0, 2, 1]


def sizer_file(tmp_path, ms):
    t = CopyTable()
    for d in range(1, 20):  # long copies are accepted 90 % of the time
        for i in range(10):
            t.add((1, 6, 4, d), i < 9)
    doc = {"format": "treeopt-profile", "version": 1, "meta": {}, "copy": t.to_dict(),
           "latency": {"target": {"tokens": [1, 2, 4, 8, 16], "ms": ms}}}
    p = tmp_path / "p.json"
    p.write_text(json.dumps(doc))
    return p


def test_sizer_follows_the_latency_curve(tmp_path):
    chain = list(range(-1, 12))
    feats = [None] + [Features(1, 4, 1.0)] * 12
    flat = StepSizer.from_files(sizer_file(tmp_path, [50, 50, 50, 50, 50]), None, 13, "t")
    assert len(flat.choose(chain, feats).nodes) == 13  # free verification: everything
    steep = StepSizer.from_files(sizer_file(tmp_path, [50, 100, 200, 400, 800]), None, 13, "t")
    assert len(steep.choose(chain, feats).nodes) == 1  # each token doubles the cost: none


def test_ngram_len_auto_is_exact(tmp_path):
    from treeopt.testing import tiny_causal_lm

    target = tiny_causal_lm("llama", seed=0)
    with torch.no_grad():
        target.model.norm.weight.mul_(8)
    p = sizer_file(tmp_path, [50, 55, 60, 80, 100])
    drafter = build_drafter(f"ngram:table={p}", target=target)
    assert drafter.sizer is not None and drafter.shape.size == 17
    depths = set()
    for prompt in ([3, 14, 15, 92, 65] * 3, list(range(10, 27)) * 2, [5]):
        ids = torch.tensor([prompt])
        ref = generate(target, None, ids, max_new_tokens=40).tokens
        got = generate(target, drafter, ids, max_new_tokens=40)
        assert got.tokens == ref
        depths |= {s.depth for s in got.stats.steps}
    assert len(depths) > 2  # the size changes from step to step
    with pytest.raises(DrafterError, match="len=auto goes with table"):
        build_drafter("ngram:len=auto", target=target)
