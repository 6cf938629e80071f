"""One meaning per word, one default, one pipeline: regression tests for the defects of the
"One meaning per word" issue (units of depth, the draft-cost default, the pipeline living in
``cli/``, duplicated helpers) and the library calls that replace the CLI-only pipeline."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

import treeopt
from treeopt.cli import build_parser, main
from treeopt.growmap import load_growmap
from treeopt.limits import MAX_TREE_NODES
from treeopt.profile import Latency, LatencyCurve, Profile
from treeopt.search.api import (
    PipelineError,
    SearchSettings,
    level_limit,
    optuna_size_limit,
    search_tree,
)
from treeopt.search.dp import solve
from treeopt.search.hardware import (
    DEFAULT_DRAFT_COST,
    DEFAULT_MAX_LEVELS,
    choose,
    default_max_size,
    monotone,
    predict,
    step_cost,
)
from treeopt.shapes import chain
from treeopt.tree import Tree

ROOT = Path(__file__).resolve().parent.parent
L40 = ROOT / "profiles" / "sequoia-reference-l40-7b.json"
P = [.6, .1, .05, .03, .02, .015, .01, .008]
LAT = Latency(LatencyCurve([1, 2, 4, 8, 16, 32], [25.4, 26.8, 28.2, 27.1, 26.8, 27.6]),
              LatencyCurve([1, 2, 4, 8, 16, 32], [0.28, 0.24, 0.24, 0.25, 0.27, 0.31]))


# ------------------------------------------------------------------ 1. units of depth
def test_search_prints_the_users_limit_not_the_chosen_levels(capsys, tmp_path):
    """The README example printed "depth 7 edges (8 levels; limit 8)" for a limit of 12."""
    assert main(["search", "--profile", str(L40), "--max-levels", "12",
                 "--out", str(tmp_path / "g.pt")]) == 0
    out = capsys.readouterr().out
    tree, meta = load_growmap(tmp_path / "g.pt")
    assert tree.depth + 1 < 12  # the limit does not bind here: the bug showed the choice
    assert (f"depth {tree.depth} edges ({tree.depth + 1} levels; limit 12 levels = depth 11)"
            in out.splitlines()[0])
    assert meta["max_levels"] == 12 and meta["depth"] == tree.depth
    assert "depth_convention" not in meta and "tree_depth" not in meta
    # the candidates table names both units in its header, levels and depth per row
    header = next(line for line in out.splitlines() if line.startswith("candidates"))
    assert "levels depth" in header


def test_max_depth_counts_edges_and_max_levels_counts_the_root(tmp_path, capsys):
    prof = Profile([0.9]).save(tmp_path / "p.json")  # one rank: the best tree is a chain
    for flags, depth in ((["--max-levels", "4"], 3), (["--max-depth", "4"], 4)):
        out = tmp_path / f"g{depth}.json"
        assert main(["search", "--profile", str(prof), "--budget", "9", "--at-most", *flags,
                     "--out", str(out)]) == 0
        assert load_growmap(out)[0] == chain(depth + 1)
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(["search", "--profile", str(prof), "--budget", "9", "--max-levels", "4",
              "--max-depth", "3"])
    assert info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(PipelineError, match="not both"):
        level_limit(max_levels=4, max_depth=3)
    assert level_limit() == DEFAULT_MAX_LEVELS == 12 and level_limit(max_depth=0) == 1


def test_choice_names_levels_levels_and_depth_edges():
    choice = choose(P, LAT, 32, 8)
    assert not hasattr(choice, "depth")
    assert choice.tree.depth == choice.levels - 1
    assert predict(choice.tree, P, LAT).depth == choice.tree.depth  # Prediction: edges
    for c in choice.candidates:
        assert c["depth"] <= c["levels"] - 1 and "tree_depth" not in c


def test_height_flags_read_the_same_everywhere():
    parser = build_parser()
    for path in (["search"], ["tune"], ["compare"]):
        sub = _subparser(parser, *path)
        text = " ".join(sub.format_help().split())
        assert "--max-levels L" in text and "--max-depth D" in text, path
        assert "LEVELS, ROOT COUNTED" in text and "EDGES below the root" in text, path


# ------------------------------------------------------------------ 2. one draft-cost default
def test_one_draft_cost_default_everywhere():
    """``tune`` defaulted to per-level while ``search`` and ``compare`` used Sequoia's."""
    import treeopt.pipeline as pipeline
    from treeopt.search import hardware, optuna_search

    assert DEFAULT_DRAFT_COST == "per-level"
    parser = build_parser()
    for path in (["search"], ["tune"], ["compare"]):
        assert _subparser(parser, *path).get_default("draft_cost") == DEFAULT_DRAFT_COST, path
    functions = [hardware.draft_ms, hardware.step_cost, hardware.predict, hardware.choose,
                 hardware.curve_notes, optuna_search.ModelObjective,
                 optuna_search.ReplayObjective]
    # search_tree, optuna_tree and tune take it in their one settings object
    from treeopt.search.api import SearchSettings

    assert SearchSettings().draft_cost == DEFAULT_DRAFT_COST
    for fn in (pipeline.search_tree, pipeline.optuna_tree, pipeline.tune):
        assert "search" in inspect.signature(fn).parameters, fn
    for fn in functions:
        assert inspect.signature(fn).parameters["draft_cost"].default == DEFAULT_DRAFT_COST, fn
    # and the constant is defined once: no module repeats the literal as a default
    for path in list((ROOT / "treeopt").rglob("*.py")):
        text = path.read_text()
        assert not re.search(r"draft_cost[^=\n]*=\s*\"(sequoia|per-level)\"", text), path


def test_search_on_a_profile_picks_what_the_library_picks(tmp_path, capsys):
    path = Profile(P, latency=LAT).save(tmp_path / "p.json")
    assert main(["search", "--profile", str(path), "--out", str(tmp_path / "g.pt")]) == 0
    assert "draft cost per-level" in capsys.readouterr().out
    tree, meta = load_growmap(tmp_path / "g.pt")
    assert tree == choose(P, LAT, 32, 12).tree == search_tree(path).tree
    assert meta["draft_cost"] == "per-level"


# ------------------------------------------------------------------ 3. the pipeline as a library
def test_search_tree_fixed_budget(tmp_path):
    found = search_tree(Profile(P), budget=40, out=tmp_path / "t.json",
                        search=SearchSettings(max_depth=5))
    table = solve(P, 40, 6)
    assert found.tree == table.tree(40, 6) and found.expected_tokens == table.value(40, 6)
    assert found.prediction is None and found.choice is None and found.max_levels == 6
    tree, meta = load_growmap(tmp_path / "t.json")
    assert tree == found.tree and found.path == tmp_path / "t.json"
    assert meta["budget"] == 40 and meta["max_levels"] == 6 and meta["depth"] == tree.depth
    at_most = search_tree(Profile(P), budget=40, at_most=True, search=SearchSettings(max_levels=6))
    assert at_most.tree == table.tree(40, 6, at_most=True)
    with pytest.raises(PipelineError, match="no latency table"):
        search_tree(Profile(P))
    with pytest.raises(PipelineError, match="fixed budget"):
        search_tree(Profile(P, latency=LAT), budget=8,
                    search=SearchSettings(measured_sizes_only=True))


def test_search_tree_hardware_aware(tmp_path):
    prof = Profile(P, latency=LAT)
    found = search_tree(prof, picture=tmp_path / "t.dot", search=SearchSettings(max_levels=8))
    choice = choose(P, LAT, 32, 8)
    assert found.tree == choice.tree and found.choice.levels == choice.levels
    assert found.prediction == predict(choice.tree, P, LAT)
    assert found.max_size == 32 and found.meta["predicted_speedup"] == found.prediction.speedup
    assert (tmp_path / "t.dot").is_file()
    sequoia = search_tree(prof, search=SearchSettings(max_levels=8, draft_cost="sequoia"))
    assert sequoia.tree == choose(P, LAT, 32, 8, "sequoia").tree
    assert sequoia.meta["draft_cost"] == "sequoia"
    only = search_tree(prof, search=SearchSettings(max_size=20, measured_sizes_only=True))
    assert only.tree.size in {1, 2, 4, 8, 16} and only.meta["measured_sizes_only"]
    assert treeopt.search_tree is search_tree


def test_search_does_not_import_the_cli_and_guards_are_gone():
    code = ("import sys, treeopt.pipeline, treeopt.search.optuna_search, treeopt.shapes, "
            "treeopt.api\n"
            "print(sorted(m for m in sys.modules if m.startswith('treeopt.cli')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "[]"
    library = [*(ROOT / "treeopt" / "search").glob("*.py"), ROOT / "treeopt" / "pipeline.py",
               ROOT / "treeopt" / "shapes.py", ROOT / "treeopt" / "api.py",
               ROOT / "treeopt" / "search" / "api.py", ROOT / "treeopt" / "tuning.py"]
    for path in library + sorted((ROOT / "treeopt" / "cli").glob("*.py")):
        text = path.read_text()
        if path in library:
            assert "treeopt.cli" not in text, path
        assert "find_spec" not in text and "ModuleNotFoundError" not in text, path
        assert "COMMAND_MODULES" not in text, path


def test_every_command_is_registered():
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    assert list(action.choices) == ["search", "show", "compare", "shapes", "generate", "chat",
                                    "profile", "tune", "eval", "report", "bench", "datastore",
                                    "models", "export"]


# ------------------------------------------------------------------ 4. one helper each
def test_chains_are_built_in_one_place():
    from treeopt import api
    from treeopt.drafters import model as model_drafter
    from treeopt.drafters.model import DEFAULT_CHAIN, ModelDrafter
    from treeopt.evaluate.methods import chain_method
    from treeopt.shapes import ShapeError, from_name

    assert chain(4) == chain(nodes=4) == chain(draft_tokens=3) == from_name("chain:4")
    assert chain(4).size == 4 and chain(4).depth == 3
    assert ModelDrafter(None).shape == chain(draft_tokens=DEFAULT_CHAIN)
    assert chain_method(3).tree == chain(draft_tokens=3) and chain_method(3).name == "chain:4"
    assert not hasattr(model_drafter, "chain_tree") and not hasattr(api, "chain_tree")
    for bad in (dict(), dict(nodes=3, draft_tokens=2)):
        with pytest.raises(ShapeError, match="nodes or in draft_tokens"):
            chain(**bad)
    with pytest.raises(ShapeError, match="chain draft tokens"):
        chain(draft_tokens=-1)


def test_prompts_are_encoded_by_the_one_encoder():
    from helpers import tiny_tokenizer

    from treeopt.api import encode_prompt, encode_prompts
    from treeopt.datasets import Prompt

    tok = tiny_tokenizer()
    tok.chat_template = ("{% for m in messages %}<s> {{ m['content'] }} {% endfor %}"
                         "{% if add_generation_prompt %}w3{% endif %}")
    prompts = [Prompt("a", "c", "w5 w6"), "w7 w8 w9", Prompt("b", "c", "", token_ids=(4, 5))]
    ids = encode_prompts(tok, prompts, True, max_tokens=3)
    assert ids[0] == encode_prompt(tok, "w5 w6")[0].tolist()[-3:] == [5, 6, 3]
    assert ids[1] == encode_prompt(tok, "w7 w8 w9")[0].tolist()[-3:]
    assert ids[2] == [4, 5]
    import treeopt.cli.profile as cli_profile

    # no second copy in the CLI: what it uses is the library's one encoder
    assert getattr(cli_profile, "encode_prompts", encode_prompts) is encode_prompts


# ------------------------------------------------------------------ 5. leftovers
def test_latency_derived_sizes_are_clamped_to_the_cap(tmp_path):
    far = Latency(LatencyCurve([1, 8, 10**7], [10.0, 12.0, 1e6]), LatencyCurve([1], [1.0]))
    assert default_max_size(far) == MAX_TREE_NODES
    assert default_max_size(None) == 128 and default_max_size(LAT) == 32
    prof = Profile(P, latency=far)
    assert optuna_size_limit(prof) == MAX_TREE_NODES  # was 10**7: the DP refused it
    assert optuna_size_limit(Profile(P)) == 64 and optuna_size_limit(prof, budget=9) == 9


def test_optuna_cli_clamps_the_latency_derived_size(tmp_path, capsys):
    far = Latency(LatencyCurve([1, 8, 10**7], [10.0, 12.0, 1e6]), LatencyCurve([1], [1.0]))
    path = Profile([0.6, 0.1], latency=far).save(tmp_path / "p.json")
    out = tmp_path / "g.json"
    assert main(["search", "--method", "optuna", "--profile", str(path), "--max-levels", "3",
                 "--trials", "2", "--out", str(out)]) == 0
    tree, meta = load_growmap(out)
    assert meta["max_size"] == MAX_TREE_NODES and meta["max_levels"] == 3
    assert "limit 3 levels" in capsys.readouterr().out


def test_replay_prices_steps_with_the_envelope_as_predict_does():
    from treeopt.search.optuna_search import ReplayObjective

    falling = Latency(LatencyCurve([1, 2, 4], [10.0, 30.0, 12.0]), LatencyCurve([1], [1.0]))
    trace = [0, 1, 1, 1, 2, 0, 1, 1, 1, 1, 3, 1]
    replay = ReplayObjective([trace], falling, "speed")
    tree = Tree((-1, 0, 0, 1))
    from treeopt.search.optuna_search import replay_tokens_per_step

    tau = replay_tokens_per_step(tree, trace)
    step = step_cost(tree, falling).step_ms
    assert step == pytest.approx(predict(tree, [P], falling).step_ms)
    assert monotone(falling.target)(4) == 30.0 > falling.target(4)  # the raw curve says 12
    assert replay.score(tree, 0) == pytest.approx(1000.0 * tau / step)


def test_search_prints_notes_and_takes_measured_sizes_only(tmp_path, capsys):
    falling = Latency(LatencyCurve([1, 2, 4, 8], [10.0, 30.0, 12.0, 31.0]),
                      LatencyCurve([1], [0.5]))
    path = Profile(P, latency=falling).save(tmp_path / "p.json")
    assert main(["search", "--profile", str(path), "--max-size", "20",
                 "--out", str(tmp_path / "a.pt")]) == 0
    out = capsys.readouterr().out
    assert "note: the target latency curve falls" in out
    assert main(["search", "--profile", str(path), "--max-size", "20", "--measured-sizes-only",
                 "--out", str(tmp_path / "b.pt")]) == 0
    out = capsys.readouterr().out
    tree, meta = load_growmap(tmp_path / "b.pt")
    assert tree.size in {1, 2, 4, 8} and meta["measured_sizes_only"] is True
    assert "measured sizes, levels 1..12" in out.splitlines()[0]
    sizes = [int(line.split()[0]) for line in out.splitlines()
             if re.match(r"^\s+\d+\s+\d+\s+\d+\s", line)]
    assert sizes and set(sizes) <= {1, 2, 4, 8}
    assert main(["search", "--profile", str(path), "--budget", "8",
                 "--measured-sizes-only"]) == 2
    assert "--measured-sizes-only" in capsys.readouterr().err


def _subparser(parser, *names):
    import argparse

    for name in names:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser
