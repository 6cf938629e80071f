"""Exports to the engines as they are now: UMbreLLa's growmap JSON and TensorRT-LLM's
eagle_choices (exact for any tree), TensorRT-LLM's dynamic tree (labelled as SGLang's), chain
settings for current vLLM and llama.cpp, the vLLM tree export's version range, and labels
that never contradict their notes."""

import json
from pathlib import Path

import pytest

from treeopt.cli import main
from treeopt.export import (
    DEFAULT_FORMAT,
    ENGINE_FORMATS,
    EXPORT_ENGINES,
    VLLM_TREE_VERSIONS,
    ExportError,
    chain_settings,
    export_tree,
    from_trtllm,
    read_settings,
    to_sglang,
    to_umbrella,
    to_vllm,
    trtllm_config,
)
from treeopt.growmap import load_growmap
from treeopt.shapes import PRESETS, chain, specinfer
from treeopt.tree import Tree

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted((ROOT / "growmaps").glob("*.pt"))
FALLING = [.6, .1, .05, .03, .02, .015, .01, .008]
# DESIGN's size-8 example: roots [[0],[1,2,3],[4,5,6],[7]]
EXAMPLE = Tree.from_successors([[1, 2, 3], [4, 5], [6], [], [7], [], [], []])
TREES = [chain(2), chain(6), Tree((-1, 0, 0, 1)), specinfer([3, 2, 1]), EXAMPLE,
         PRESETS["mc_sim_7b_63"].tree()]
CURRENT_EXACT = ("umbrella",)  # engines whose current release takes any tree exactly


def umbrella_drafting_plan(growmap: dict) -> list[list[int]]:
    """UMbreLLa's StaticSpeculationEngine.build_tree, transcribed on ids: level by level, node
    j of roots[i] gets branches[i][j] children, its top-ranked tokens, numbered consecutively
    after the nodes drafted so far. Returns the Successors this plan fills."""
    successors = [[] for _ in range(growmap["size"])]
    next_id = 1
    for level, branch in zip(growmap["roots"], growmap["branches"]):
        for node, count in zip(level, branch):
            successors[node] = list(range(next_id, next_id + count))
            next_id += count
    return successors


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_every_shipped_growmap_exports_exactly_to_a_current_engine(path, tmp_path):
    tree, _ = load_growmap(path)
    exact = []
    for engine in EXPORT_ENGINES:
        try:
            out = export_tree(tree, engine)
        except ExportError:
            continue
        if out.exact:
            exact.append(engine)
            assert read_settings(engine, out.text) == tree
            (tmp_path / f"{engine}.txt").write_text(out.text)
            assert read_settings(engine, str(tmp_path / f"{engine}.txt")) == tree
    assert set(CURRENT_EXACT) & set(exact), exact
    assert "tensorrt-llm" in exact


@pytest.mark.parametrize("tree", TREES + [load_growmap(p)[0] for p in SHIPPED])
def test_umbrella_json_round_trips_and_is_what_umbrella_drafts(tree):
    out = export_tree(tree, "umbrella")
    doc = json.loads(out.text)
    assert out.exact and out.match == "exact"
    for key in ("roots", "branches", "Successors", "mask", "depth", "size"):
        assert doc[key] == to_umbrella(tree)[key]
    assert doc["size"] == tree.size and len(doc["mask"]) == tree.size
    assert umbrella_drafting_plan(doc) == doc["Successors"]
    assert read_settings("umbrella", out.text) == tree


def test_umbrella_json_of_the_design_example():
    doc = json.loads(export_tree(EXAMPLE, "umbrella").text)
    assert doc["roots"] == [[0], [1, 2, 3], [4, 5, 6], [7]]
    assert doc["branches"] == [[3], [2, 1, 0], [1, 0, 0], [0]]
    assert doc["depth"] == [0, 1, 1, 1, 2, 2, 2, 3]
    assert doc["mask"][7] == [1, 1, 0, 0, 1, 0, 0, 1]  # 7's ancestors: 4, 1, 0


@pytest.mark.parametrize("tree", TREES + [load_growmap(p)[0] for p in SHIPPED])
def test_trtllm_eagle_choices_round_trip_in_every_format(tree, tmp_path):
    for fmt in ENGINE_FORMATS["tensorrt-llm"]:
        out = export_tree(tree, "tensorrt-llm", fmt)
        assert out.exact and out.match == "exact"
        assert read_settings("tensorrt-llm", out.text) == tree
    assert DEFAULT_FORMAT["tensorrt-llm"] == "yaml"


def test_trtllm_settings_of_a_hand_computed_tree():
    config, exact, _ = trtllm_config(Tree((-1, 0, 0, 1)), model="draft-dir")
    assert exact and config == {"decoding_type": "Eagle3", "speculative_model": "draft-dir",
                                "max_draft_len": 2, "max_total_draft_tokens": 3,
                                "eagle_choices": [[0], [1], [0, 0]],
                                "eagle3_one_model": False}
    text = export_tree(Tree((-1, 0, 0, 1)), "tensorrt-llm").text
    assert text.splitlines() == ["speculative_config:", '  decoding_type: "Eagle3"',
                                 "  max_draft_len: 2", "  max_total_draft_tokens: 3",
                                 "  eagle_choices: [[0], [1], [0, 0]]",
                                 "  eagle3_one_model: false"]
    hand = ("# extra_llm_api_options.yml\nspeculative_config:\n  decoding_type: Eagle3  # 3\n"
            "  max_draft_len: 2\n  eagle_choices: [[0], [1], [0, 0]]\n"
            "disable_overlap_scheduler: true\n")
    assert read_settings("tensorrt-llm", hand) == Tree((-1, 0, 0, 1))
    with pytest.raises(ExportError, match="max_total_draft_tokens = 5"):
        from_trtllm({"eagle_choices": [[0], [1]], "max_total_draft_tokens": 5})
    with pytest.raises(ExportError, match="twice"):
        read_settings("tensorrt-llm", "speculative_config:\n  eagle_choices: [[0], [0]]")
    with pytest.raises(ExportError, match="neither eagle_choices nor use_dynamic_tree"):
        read_settings("tensorrt-llm", '{"decoding_type": "Eagle3"}')


@pytest.mark.parametrize("tree", [chain(5), Tree((-1, 0, 0, 0)), specinfer([2, 2]),
                                  specinfer([2, 1]), Tree.from_paths([(0,), (1,), (1, 0)])])
def test_trtllm_dynamic_knobs_are_labelled_as_sglangs(tree):
    p = [.6, .2, .1]
    for profile in (None, p):
        out = export_tree(tree, "tensorrt-llm", "json", profile=profile, dynamic=True)
        knobs, exact, notes = to_sglang(tree, profile)
        assert out.exact == exact and out.notes == notes
        assert out.settings["dynamic_tree_max_topK"] == knobs["speculative_eagle_topk"]
        assert out.settings["max_draft_len"] == knobs["speculative_num_steps"]
        assert out.settings["max_total_draft_tokens"] == knobs["speculative_num_draft_tokens"] - 1
        assert out.settings["use_dynamic_tree"] is True and "eagle_choices" not in out.settings
        if profile is not None:
            back = read_settings("tensorrt-llm", out.text, profile=profile)
            assert back.size == tree.size and back.depth == tree.depth
            if exact:
                assert back == tree
    with pytest.raises(ExportError, match="give an acceptance profile"):
        read_settings("tensorrt-llm", json.dumps(export_tree(
            chain(5), "tensorrt-llm", "json", dynamic=True).settings))


def test_vllm_tree_export_states_its_version_range(capsys):
    out = export_tree(specinfer([2, 1]), "vllm")
    assert out.versions == VLLM_TREE_VERSIONS
    assert "0.10.1 to 0.20.x" in VLLM_TREE_VERSIONS and "#20401" in VLLM_TREE_VERSIONS \
        and "#42121" in VLLM_TREE_VERSIONS
    assert export_tree(specinfer([2, 1]), "vllm", "python").text.startswith(
        f"# {VLLM_TREE_VERSIONS}\n")
    assert main(["export", "specinfer:2,1", "--engine", "vllm"]) == 0
    err = capsys.readouterr().err
    assert f"engine versions: {VLLM_TREE_VERSIONS}" in err


def test_vllm_and_llama_cpp_chains():
    settings, exact, _ = chain_settings(chain(5), "vllm", draft="ngram:min=2,max=3")
    assert exact and settings == {"method": "ngram", "prompt_lookup_min": 2,
                                  "prompt_lookup_max": 3, "num_speculative_tokens": 4}
    settings, exact, _ = chain_settings(chain(4), "vllm", draft="ngram")
    assert settings["prompt_lookup_min"] == 1 and settings["prompt_lookup_max"] == 4
    settings, exact, _ = chain_settings(chain(4), "vllm", draft="path/to/draft")
    assert exact and settings == {"method": "draft_model", "model": "path/to/draft",
                                  "num_speculative_tokens": 3}
    settings, exact, notes = chain_settings(chain(9), "vllm", method="suffix")
    assert not exact and notes[0].startswith("approximate") and \
        settings == {"method": "suffix", "num_speculative_tokens": 8}
    out = export_tree(chain(4), "vllm", draft="ngram:max=2")
    assert out.exact and "speculative_token_tree" not in out.text
    assert "current" in out.versions
    assert read_settings("vllm", out.text) == chain(4)
    out = export_tree(chain(4), "llama.cpp", model="draft.gguf")
    assert out.exact and out.text == ("--model-draft draft.gguf --draft-max 3 --draft-min 0 "
                                      "--draft-p-min 0.0")
    assert read_settings("llama.cpp", out.text) == chain(4)
    out = export_tree(chain(7), "llama.cpp", draft="ngram:min=2,max=3")
    assert not out.exact and out.settings == {
        "spec_type": "ngram-simple", "spec_ngram_simple_size_n": 3,
        "spec_ngram_simple_size_m": 6, "draft_max": 6}
    assert read_settings("llama.cpp", out.text) == chain(7)
    with pytest.raises(ExportError, match="chains only; this tree has a node with 2 children"):
        export_tree(Tree((-1, 0, 0)), "llama.cpp")
    assert chain_settings(chain(3), "vllm", draft="none")[0] == {
        "method": "eagle", "num_speculative_tokens": 2}
    for spec in ("early-exit:4", "egag:draft=x", "dynamic"):
        with pytest.raises(ExportError, match="no counterpart"):
            export_tree(chain(4), "vllm", draft=spec)
    with pytest.raises(ExportError, match="not a chain"):
        export_tree(specinfer([2, 1]), "vllm", draft="ngram")
    with pytest.raises(ExportError, match="min <= max"):
        export_tree(chain(4), "vllm", draft="ngram:min=5,max=2")


def test_labels_never_contradict_their_notes():
    for tree in TREES:
        for engine in EXPORT_ENGINES:
            for kw in ({}, {"any_shape": True}, {"profile": FALLING}):
                try:
                    out = export_tree(tree, engine, **kw)
                except ExportError:
                    continue
                first = out.notes[0].split(":", 1)[0]
                assert first.split()[0] == out.match, (engine, tree, out.notes)
                assert out.exact == (out.match == "exact")


def test_refusals_say_child_and_children():
    with pytest.raises(ExportError) as info:
        to_vllm(Tree((-1, 0, 0, 1)))
    assert "node 1 has 1 child and node 2 has 0 children" in str(info.value)


def test_cli_writes_the_new_engines(tmp_path, capsys):
    grow = ROOT / "growmaps" / "sequoia-l40-7b.pt"
    out = tmp_path / "tree.json"
    assert main(["export", str(grow), "--engine", "umbrella", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "-> umbrella (exact)" in text and "note: exact:" in text
    assert read_settings("umbrella", str(out)) == load_growmap(grow)[0]
    back = tmp_path / "back.pt"
    assert main(["export", "--from", "umbrella", str(out), "--out", str(back)]) == 0
    assert load_growmap(back)[0] == load_growmap(grow)[0]
    capsys.readouterr()
    assert main(["export", "chain:4", "--engine", "vllm", "--draft", "ngram:min=2,max=4"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {"method": "ngram", "prompt_lookup_min": 2,
                                        "prompt_lookup_max": 4, "num_speculative_tokens": 3}
    assert "-> vllm (exact)" in captured.err
    assert main(["export", "chain:4", "--engine", "llama.cpp", "--format", "json"]) == 2
    assert "llama.cpp settings are written as cli" in capsys.readouterr().err
