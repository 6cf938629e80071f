"""Engine exports (vLLM, SGLang, EAGLE-2) and the engine tree families.

Round trips of vLLM's speculative_token_tree for hand-made and shipped trees, the literal of a
tree computed by hand, vLLM's own drafting plan (child_drafts_per_level, transcribed) against
the uniform-per-level check, EAGLE/SGLang knobs of hand-made trees, EAGLE-2's topK_genrate
(transcribed with torch.topk) against the static family member, and both family searches
against brute force over every member for small budgets; then the commands."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from treeopt.cli import main
from treeopt.errors import TreeoptError
from treeopt.export import (
    ENGINES,
    FORMATS,
    ExportError,
    export_tree,
    from_eagle,
    from_sglang,
    from_vllm,
    read_settings,
    to_eagle,
    to_sglang,
    to_vllm,
    topk_shape,
    vllm_config,
    vllm_literal,
)
from treeopt.growmap import load_growmap, save_growmap
from treeopt.search.dp import solve
from treeopt.search.family import (
    TOPK,
    UNIFORM,
    FamilyError,
    best_uniform,
    search_family,
    topk_members,
    topk_tree,
    uniform_expansion,
    uniform_tree,
)
from treeopt.shapes import PRESETS, chain, specinfer
from treeopt.tree import Tree

# Sequoia's shipped vector, first 10 ranks: not monotone (rank 9 above rank 8)
SEQUOIA = [.63418, .10795, .05697, .02249, .01949, .01499, .0045, .003, .01199, .0045]
FALLING = [.6, .1, .05, .03, .02, .015, .01, .008]
STAR4 = Tree((-1, 0, 0, 0))
ROOT = Path(__file__).resolve().parent.parent


def all_trees(max_size: int):
    """Every tree (breadth-first parent array) of 1..max_size nodes."""
    for n in range(1, max_size + 1):
        def grow(parents):
            if len(parents) == n:
                yield Tree(tuple(parents))
                return
            lo = max(parents[-1], 0) if len(parents) > 1 else 0
            for p in range(lo, len(parents)):
                yield from grow(parents + [p])
        yield from grow([-1])


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and text
    return text


# ---------------------------------------------------------------------------- vLLM
def test_vllm_literal_of_a_hand_computed_tree():
    tree = Tree((-1, 0, 0, 1))  # root -> {1, 2}; 1 -> {3}
    assert to_vllm(tree, any_shape=True) == [(0,), (1,), (0, 0)]
    assert vllm_literal(to_vllm(tree, any_shape=True)) == "[(0,), (1,), (0, 0)]"
    uniform = specinfer([2, 1])  # root -> {1, 2}; 1 -> {3}; 2 -> {4}
    config = vllm_config(uniform, method="eagle3", model="draft-dir")
    assert config == {"method": "eagle3", "model": "draft-dir", "num_speculative_tokens": 4,
                      "speculative_token_tree": "[(0,), (1,), (0, 0), (1, 0)]"}


@pytest.mark.parametrize("tree", [chain(1 + 5), STAR4, specinfer([3, 2, 1]),
                                  PRESETS["mc_sim_7b_63"].tree(),
                                  PRESETS["sequoia-example-8"].tree()],
                         ids=["chain", "star", "specinfer", "mc_sim_7b_63", "sequoia-8"])
def test_vllm_round_trip(tree):
    paths = to_vllm(tree, any_shape=True)
    assert from_vllm(paths) == tree
    assert from_vllm(vllm_literal(paths)) == tree
    assert from_vllm(list(reversed(paths))) == tree  # vLLM sorts; so do we
    assert from_vllm(json.loads(json.dumps(vllm_config(tree, any_shape=True)))) == tree


@pytest.mark.parametrize("name", ["sequoia-l40-7b.pt", "smollm2-ngram-cpu.pt"])
def test_vllm_round_trip_of_shipped_growmaps(name, tmp_path):
    tree, _ = load_growmap(ROOT / "growmaps" / name)
    for fmt in FORMATS:
        text = export_tree(tree, "vllm", fmt, any_shape=True).text
        assert read_settings("vllm", text) == tree
        (tmp_path / "s.txt").write_text(text)
        assert read_settings("vllm", str(tmp_path / "s.txt")) == tree
    back = tmp_path / "back.pt"
    save_growmap(from_vllm(to_vllm(tree, any_shape=True)), back)
    assert load_growmap(back)[0] == tree


def vllm_drafted_paths(choices):
    """vLLM's EAGLE drafting plan, transcribed from ``EagleProposer.__init__`` /
    ``propose_tree``: per level, every node of the level above gets the top
    ``num_drafts[l] // num_drafts[l - 1]`` children, in order."""
    choices = sorted(choices, key=lambda t: (len(t), t))
    depth = len(choices[-1])
    num = [0] * depth
    for c in choices:
        num[len(c) - 1] += 1
    child = [num[0]] + [num[l] // num[l - 1] for l in range(1, depth)]
    out, level = [], [()]
    for l in range(depth):
        level = [p + (r,) for p in level for r in range(child[l])]
        out += level
    return out


def test_uniform_check_matches_vllms_drafting_plan():
    """to_vllm accepts a tree exactly when vLLM's drafter drafts that very tree."""
    checked = 0
    for tree in all_trees(8):
        if tree.size < 2:
            continue
        paths = to_vllm(tree, any_shape=True)
        drafts_it = vllm_drafted_paths(paths) == paths
        assert (uniform_expansion(tree) is not None) == drafts_it
        if drafts_it:
            assert to_vllm(tree) == paths
        else:
            with pytest.raises(ExportError, match="same number of children"):
                to_vllm(tree)
        checked += 1
    assert checked > 400


@pytest.mark.parametrize("bad, message", [
    ("[(0,), (0,)]", "twice"),
    ("[(0,), (0, 1)]", "sibling rank 0"),
    ("[(1,)]", "sibling rank 0"),
    ("[(0, 0)]", "no parent"),
    ("[(0,), (-1,)]", "negative"),
    ("[(0,), ()]", "non-empty tuple"),
    ("[(0,), (True,)]", "non-empty tuple"),
    ("[(0,), (0.5,)]", "non-empty tuple"),
    ("[]", "empty"),
    ("{'speculative_token_tree': '[(0,), (1,)]', 'num_speculative_tokens': 3}", "equal"),
    ("{'method': 'eagle'}", "no 'speculative_token_tree'"),
    ("not a tree (", "neither a file"),
    ("42", "list of rank tuples"),
])
def test_vllm_refusals(bad, message):
    with pytest.raises(ExportError, match=message) as info:
        read_settings("vllm", bad)
    one_line(info.value)


def test_vllm_refuses_root_only_and_oversized():
    with pytest.raises(ExportError, match="drafts nothing") as info:
        to_vllm(Tree((-1,)))
    one_line(info.value)
    with pytest.raises(ExportError, match="at most 4095"):
        from_vllm([(i,) for i in range(5000)])
    with pytest.raises(ExportError, match="has rank about 10"):
        from_vllm([(0,), (0, 10 ** 5000)])


# ---------------------------------------------------------------------------- EAGLE / SGLang
def test_knobs_of_hand_made_trees():
    cases = [  # tree, top_k, depth (edges), size
        (chain(5), 1, 4, 5),
        (STAR4, 3, 1, 4),
        (specinfer([2, 2]), 2, 2, 7),
        (specinfer([2, 2, 1]), 4, 3, 11),  # 4 nodes of depth 2 each expanded: the beam needs 4
        (Tree((-1, 0, 0, 1, 1, 1)), 3, 2, 6),  # the root has 2 children, node 1 has 3
    ]
    for tree, k, depth, size in cases:
        assert topk_shape(tree) == k
        knobs, exact, notes = to_sglang(tree)
        assert knobs == {"speculative_num_steps": depth, "speculative_eagle_topk": k,
                         "speculative_num_draft_tokens": size}
        assert not exact and notes[0].startswith("approximate")
        knobs, _, _ = to_eagle(tree)
        assert knobs == {"total_token": size, "depth": depth - 1, "top_k": k}
    # SGLang with topk 1 drafts a chain: num_draft_tokens = num_steps + 1
    knobs, exact, _ = to_sglang(chain(5), FALLING)
    assert exact and knobs["speculative_num_draft_tokens"] == knobs["speculative_num_steps"] + 1


def test_knobs_exact_equivalent_or_approximate_under_a_profile():
    p = [.6, .2, .1]
    # top_k 2, 2 steps, 5 nodes keep (0,), (1,), (0, 0) and one of the tied (0, 1) / (1, 0)
    # (both .12): the first created, (0, 1)
    assert topk_tree(p, 2, 2, 5) == Tree.from_paths([(0,), (1,), (0, 0), (0, 1)])
    knobs, exact, notes = to_sglang(Tree.from_paths([(0,), (1,), (0, 0), (0, 1)]), p)
    assert exact and notes[0].startswith("exact") and knobs["speculative_eagle_topk"] == 2
    out = export_tree(specinfer([2, 1]), "sglang", profile=p)  # (1, 0) instead: same F
    assert not out.exact and out.match == "equivalent"
    out = export_tree(Tree.from_paths([(0,), (1,), (1, 0)]), "eagle", profile=p)
    # the knobs keep (0,), (0, 0), (1,): F 1 + .6 + .36 + .2; this tree 1 + .6 + .2 + .12
    assert out.match == "approximate" and "F 2.160000 against this tree's 1.920000" in \
        out.notes[0]
    assert export_tree(STAR4, "vllm").match == "exact"


def test_knobs_need_a_profile_to_be_read_back():
    with pytest.raises(ExportError, match="give an acceptance profile") as info:
        from_sglang({"speculative_num_steps": 3, "speculative_eagle_topk": 2,
                     "speculative_num_draft_tokens": 6})
    one_line(info.value)
    with pytest.raises(ExportError, match="lack top_k"):
        from_eagle({"total_token": 6, "depth": 2}, FALLING)
    with pytest.raises(ExportError, match="fewer than the 9 drafted tokens"):
        from_eagle({"total_token": 10, "depth": 0, "top_k": 3}, FALLING)
    with pytest.raises(ExportError, match="drafts nothing"):
        to_eagle(Tree((-1,)))


def eagle_topk_generate(p, top_k: int, depth: int, total_token: int) -> Tree:
    """EAGLE-2's ``topK_genrate`` (SafeAILab/EAGLE, eagle/model/cnets.py) transcribed, with
    the draft's log-probability of rank r at a node of depth d replaced by log p[d][r]:
    level 1 = the root's top_k; ``depth`` rounds expand the top_k best (cumulative score) of
    the last level with their top_k children; the total_token - 1 best candidates are kept."""
    rows = [list(r) for r in (p if isinstance(p[0], list) else [p])]

    def logp(d, r):
        row = rows[min(d, len(rows) - 1)]
        return math.log(row[r]) if r < len(row) else -math.inf

    paths = [(r,) for r in range(top_k)]
    scores = [logp(0, r) for r in range(top_k)]
    frontier = list(range(top_k))
    for _ in range(depth):
        new_paths, new_scores = [], []
        for i in frontier:
            for r in range(top_k):
                new_paths.append(paths[i] + (r,))
                new_scores.append(scores[i] + logp(len(paths[i]), r))
        best = torch.topk(torch.tensor(new_scores, dtype=torch.float64), top_k).indices.tolist()
        frontier = [len(paths) + i for i in best]
        paths += new_paths
        scores += new_scores
    keep = torch.topk(torch.tensor(scores, dtype=torch.float64), total_token - 1).indices
    return Tree.from_paths([paths[i] for i in keep.tolist()])


def falling_profile(rng, width: int) -> list[float]:
    """Random rank acceptances, strictly falling, sum < 1 (no ties in path products)."""
    x = np.sort(rng.uniform(0.01, 1.0, width))[::-1]
    return list(x / x.sum() * rng.uniform(0.5, 0.95))


def test_static_member_is_eagles_topk_generate():
    """Exact equality with one random row per parent depth (paths that permute the same ranks
    then score differently: no ties); with one row for all depths such paths tie, and any of
    them may be kept, so the kept scores (hence F) must agree."""
    rng = np.random.default_rng(0)
    for trial in range(60):
        k = int(rng.integers(1, 5))
        width = int(rng.integers(k, k + 4))  # no rank past the profile: no zero scores
        flat = trial % 2 == 1
        p = falling_profile(rng, width) if flat else [falling_profile(rng, width)
                                                      for _ in range(4)]
        depth = int(rng.integers(0, 4))
        total = int(rng.integers(2, k + depth * k * k + 2))
        want = eagle_topk_generate(p, k, depth, total)
        got = topk_tree(p, k, depth + 1, total)
        if flat:
            assert sorted(got.path_probs(p)) == pytest.approx(sorted(want.path_probs(p)))
            continue
        assert got == want
        assert from_eagle({"total_token": total, "depth": depth, "top_k": k}, p) == want
        assert from_sglang({"speculative_num_steps": depth + 1, "speculative_eagle_topk": k,
                            "speculative_num_draft_tokens": total}, p) == want


def reference_member(p, k, steps, nodes):
    """The static member by its definition, literally: score = product of the running-min
    profile along the path; keep the nodes - 1 best (score, shallower, created first)."""
    rows = [list(r) for r in (p if isinstance(p[0], list) else [p])]

    def row(d, envelope):
        r = rows[min(d, len(rows) - 1)]
        r = [r[i] if i < len(r) else 0.0 for i in range(k)]
        return [min(r[: i + 1]) for i in range(k)] if envelope else r

    cands = []  # (path, score, created)
    level = [((), 1.0)]
    for d in range(steps):
        if d:
            level = sorted(level, key=lambda c: (-c[1], c[2]))[:k]
            level = [(c[0], c[1]) for c in level]
        new = []
        for path, score in level:
            for r in range(k):
                new.append((path + (r,), score * row(d, True)[r], len(cands) + len(new)))
        cands += new
        level = new
    kept = sorted(cands, key=lambda c: (-c[1], len(c[0]), c[2]))[: nodes - 1]
    return Tree.from_paths([c[0] for c in kept])


@pytest.mark.parametrize("p", [SEQUOIA, FALLING, [[.5, .3, .1], [.7, .1], [.2, .2, .2, .1]],
                               [.03, .05, .026, .037]],
                         ids=["sequoia", "falling", "depth-aware", "rank2-above-rank1"])
def test_topk_family_against_brute_force(p):
    for nodes in range(2, 11):
        for levels in (3, 5, nodes):
            brute = {}
            for k in range(1, nodes):
                for steps in range(1, levels):
                    if k + (steps - 1) * k * k < nodes - 1:
                        continue
                    tree = reference_member(p, k, steps, nodes)
                    assert tree.size == nodes and tree.depth <= steps
                    assert topk_tree(p, k, steps, nodes) == tree
                    brute[(k, steps)] = tree.expected_tokens(p)
            listed = list(topk_members(p, nodes, levels - 1))
            for k, steps, value in listed:
                assert value == pytest.approx(brute[(k, steps)], abs=1e-12)
            if not brute:
                assert not listed
                continue
            found = search_family(p, TOPK, nodes, levels)
            assert found.expected_tokens == pytest.approx(max(brute.values()), abs=1e-12)
            assert found.tree.expected_tokens(p) == pytest.approx(found.expected_tokens)
            assert found.tree == topk_tree(p, found.params["top_k"], found.params["steps"],
                                           nodes)
            dp = solve(p, nodes, levels)
            assert found.optimum == pytest.approx(dp.value(nodes, levels, at_most=True))
            assert found.expected_tokens <= found.optimum + 1e-12


def test_topk_family_reaches_the_optimum_for_falling_profiles():
    """For a profile falling with the rank the optimum is the top path probabilities, which a
    wide enough beam holds: the family best costs nothing (the reference F*(64, 12))."""
    found = search_family(FALLING, TOPK, 64, 12)
    assert found.optimum == pytest.approx(3.47534, abs=1e-5)
    assert found.expected_tokens == pytest.approx(found.optimum, abs=1e-12)
    assert found.loss == pytest.approx(0.0, abs=1e-12)


def uniform_expansions(budget: int, levels: int):
    out = [[]]

    def grow(prefix, size, width):
        for c in range(1, budget):
            if size + width * c > budget or len(prefix) + 2 > levels:
                break
            out.append(prefix + [c])
            grow(prefix + [c], size + width * c, width * c)
    grow([], 1, 1)
    return out


@pytest.mark.parametrize("p", [SEQUOIA, FALLING, [[.5, .3, .1], [.7, .1], [.2, .2, .2, .1]],
                               [.03, .05, .026, 0.0]],
                         ids=["sequoia", "falling", "depth-aware", "zeros"])
def test_uniform_family_against_brute_force(p):
    members = [(uniform_tree(e), e) for e in uniform_expansions(40, 12)]
    scored = [(t.size, t.depth, t.expected_tokens(p)) for t, _ in members]
    for budget in range(1, 41):
        for levels in (1, 2, 4, 12):
            best = max(f for size, depth, f in scored if size <= budget and depth < levels)
            value, expansion = best_uniform(p, budget, levels)
            tree = uniform_tree(expansion)
            assert value == pytest.approx(best, abs=1e-12)
            assert tree.expected_tokens(p) == pytest.approx(value, abs=1e-12)
            assert tree.size <= budget and tree.depth <= levels - 1
            assert uniform_expansion(tree) == expansion
    found = search_family(SEQUOIA, UNIFORM, 64, 12)
    assert found.tree == specinfer(found.params["expansion"])
    assert 0 < found.loss < 0.5  # vLLM's family costs F on this profile
    assert to_vllm(found.tree)  # and vLLM takes its best member as it is


def test_family_round_trips_through_the_engines():
    found = search_family(SEQUOIA, TOPK, 24, 8)
    for engine in ("sglang", "eagle"):
        for fmt in FORMATS:
            out = export_tree(found.tree, engine, fmt, profile=SEQUOIA)
            assert out.exact, out.notes
            assert read_settings(engine, out.text, profile=SEQUOIA) == found.tree
    knobs, exact, _ = to_sglang(found.tree, SEQUOIA)
    assert exact and knobs["speculative_eagle_topk"] == found.params["top_k"]


def test_family_refusals():
    with pytest.raises(FamilyError, match="unknown tree family"):
        search_family(FALLING, "kary", 16, 4)
    with pytest.raises(FamilyError, match=">= 2"):
        search_family(FALLING, TOPK, 1, 4)
    with pytest.raises(FamilyError, match="fewer than the 9"):
        topk_tree(FALLING, 2, 2, 10)
    with pytest.raises(FamilyError, match="sum to at most 1|exclusive"):
        topk_tree([.9, .5], 2, 2, 4)


# ---------------------------------------------------------------------------- commands
def run(argv, capsys):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_search_family_then_export(tmp_path, capsys):
    profile = tmp_path / "p.json"
    from treeopt.profile import Profile

    Profile(p=list(SEQUOIA)).save(profile)
    grow = tmp_path / "topk.pt"
    code, out, _ = run(["search", "--profile", profile, "--budget", 24, "--max-levels", 8,
                        "--family", "topk-per-level", "--out", grow], capsys)
    assert code == 0
    found = search_family(SEQUOIA, TOPK, 24, 8)
    assert f"{found.expected_tokens:.6f} (family best)" in out
    assert f"{found.optimum:.6f}" in out and "restriction costs" in out
    assert f"treeopt export {grow} --engine sglang" in out
    tree, meta = load_growmap(grow)
    assert tree == found.tree and meta["top_k"] == found.params["top_k"]

    code, out, err = run(["export", grow, "--engine", "sglang"], capsys)
    assert code == 0 and "(approximate)" in err
    assert out.split() == ["--speculative-algorithm", "EAGLE", "--speculative-num-steps",
                           str(tree.depth), "--speculative-eagle-topk", str(meta["top_k"]),
                           "--speculative-num-draft-tokens", "24"]
    code, out, err = run(["export", grow, "--engine", "eagle", "--format", "json",
                          "--profile", profile], capsys)
    assert code == 0 and "(exact)" in err
    assert json.loads(out) == {"total_token": 24, "depth": tree.depth - 1,
                               "top_k": meta["top_k"]}

    knobs = tmp_path / "knobs.json"
    knobs.write_text(out)
    back = tmp_path / "back.json"
    code, out, _ = run(["export", "--from", "eagle", knobs, "--profile", profile,
                        "--out", back], capsys)
    assert code == 0 and load_growmap(back)[0] == tree

    uni = tmp_path / "uni.pt"
    code, out, _ = run(["search", "--profile", profile, "--budget", 24, "--engine", "vllm",
                        "--out", uni], capsys)
    assert code == 0 and "uniform-per-level" in out
    code, out, _ = run(["export", uni, "--engine", "vllm", "--format", "python"], capsys)
    assert code == 0 and out.startswith("speculative_config = {")
    assert read_settings("vllm", out) == load_growmap(uni)[0]


def test_cli_export_and_import(tmp_path, capsys):
    code, out, _ = run(["export", "specinfer:2,1", "--engine", "vllm", "--format", "cli"], capsys)
    assert code == 0
    assert out.strip() == ("--speculative-config '{\"method\": \"eagle\", "
                           "\"num_speculative_tokens\": 4, \"speculative_token_tree\": "
                           "\"[(0,), (1,), (0, 0), (1, 0)]\"}'")
    dest = tmp_path / "t.pt"
    code, out, _ = run(["export", "--from", "vllm", "[(0,), (1,), (0, 0)]", "--out", dest],
                       capsys)
    assert code == 0 and load_growmap(dest)[0] == Tree((-1, 0, 0, 1))
    settings = tmp_path / "vllm.json"
    code, out, _ = run(["export", dest, "--engine", "vllm", "--any-shape", "--out", settings],
                       capsys)
    assert code == 0 and json.loads(settings.read_text())["num_speculative_tokens"] == 3

    for argv, message in [
        (["export", dest, "--engine", "vllm"], "same number of children"),
        (["export", dest], "give --engine"),
        (["export", "--from", "vllm", "[(0,)]"], "give --out"),
        (["export", "--from", "sglang", '{"speculative_num_steps": 2, "speculative_eagle_topk":'
          ' 2, "speculative_num_draft_tokens": 4}', "--out", tmp_path / "x.pt"], "profile"),
        (["export", dest, "--engine", "vllm", "--any-shape", "--out", dest], "also an input"),
        (["search", "--profile", ROOT / "profiles" / "sequoia-reference.json", "--family",
          "topk-per-level"], "--budget"),
    ]:
        code, out, err = run(argv, capsys)
        assert code == 2, argv
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert load_growmap(dest)[0] == Tree((-1, 0, 0, 1))  # refused writes left it alone


def test_every_engine_and_format_reads_back(capsys):
    tree = specinfer([2, 2])
    for engine in ENGINES:
        for fmt in FORMATS:
            out = export_tree(tree, engine, fmt, profile=FALLING)
            back = read_settings(engine, out.text, profile=FALLING)
            assert back.size == tree.size and back.depth == tree.depth
            if engine == "vllm" or out.exact:
                assert back == tree
    with pytest.raises(TreeoptError):
        export_tree(tree, "tensorrt")
