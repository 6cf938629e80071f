"""CLI: show, compare and shapes through treeopt.cli.main."""

import json
from pathlib import Path

import pytest
import torch

from treeopt.cli import main
from treeopt.growmap import load_growmap, save_growmap
from treeopt.profile import Latency, LatencyCurve, Profile
from treeopt.shapes import PRESETS, independent_chains, kary
from treeopt.tree import Tree

EXAMPLE = Tree.from_successors([[1, 2, 3], [4, 5], [6], [], [7], [], [], []])
PROFILES = Path(__file__).resolve().parent.parent / "profiles"


@pytest.fixture
def profile_path(tmp_path):
    return Profile([0.6, 0.1, 0.05]).save(tmp_path / "p.json")


@pytest.fixture
def latency_profile_path(tmp_path):
    lat = Latency(LatencyCurve([1, 8, 64], [10.0, 12.0, 20.0]), LatencyCurve([1], [1.0]))
    return Profile([0.6, 0.1, 0.05], latency=lat).save(tmp_path / "lat.json")


# ------------------------------------------------------------------ show
def test_show_summary_and_formats(tmp_path, profile_path, capsys):
    g = save_growmap(EXAMPLE, tmp_path / "g.pt")
    assert main(["show", str(g), "--profile", str(profile_path)]) == 0
    assert capsys.readouterr().out.strip() == (
        "g.pt: size 8, depth 3, width 3, 4 leaves, F = 2.4460 tokens/step")
    assert main(["show", str(g), "--format", "choices"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert json.loads(out[1]) == [[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0]]
    assert main(["show", str(g), "--format", "parents"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[1]) == [-1, 0, 0, 0, 1, 1, 2, 4]
    assert main(["show", str(g), "--format", "successors"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[1]) == EXAMPLE.to_successors()
    assert main(["show", str(g), "--format", "paths", "--profile", str(profile_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 + 8
    assert lines[-1].split() == ["7", "3", "[0,", "0,", "0]", "0.216000"]


def test_show_draws(tmp_path, profile_path, capsys):
    g = save_growmap(EXAMPLE, tmp_path / "g.json")
    for name in ("t.png", "t.dot"):
        assert main(["show", str(g), "--out", str(tmp_path / name), "--profile",
                     str(profile_path), "--title", "mine"]) == 0
        assert (tmp_path / name).exists()
    assert (tmp_path / "t.dot").read_text().count("->") == 7
    assert main(["show", "kary:2x2", "--out", str(tmp_path / "k.svg")]) == 0
    assert "<svg" in (tmp_path / "k.svg").read_text()


def test_show_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    assert main(["show", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.pt" in err and err.startswith("treeopt show: error:")
    assert main(["show", "greedy:8"]) == 2
    assert "needs an acceptance profile" in capsys.readouterr().err
    assert main(["show", "chain:4", "--out", str(tmp_path / "x.gif")]) == 2
    assert ".png, .svg, .pdf or .dot" in capsys.readouterr().err


# ------------------------------------------------------------------ compare
def test_compare_table(profile_path, capsys):
    assert main(["compare", "--profile", str(profile_path), "chain:4", "kary:2x2",
                 "chains:2x3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["shape", "size", "depth", "tokens/step"]
    rows = {line.split()[0]: line.split()[1:] for line in out[2:5]}
    assert rows["chain:4"] == ["4", "3", "2.1760"]       # 1 + .6 + .36 + .216
    assert rows["kary:2x2"] == ["7", "2", "2.1900"]      # 1 + .7 + .49
    assert rows["chains:2x3"] == ["7", "3", "2.3720"]    # 1 + .7 * (1 + .6 + .36)
    assert "no latency table" in out[-1]


def test_compare_with_latency(latency_profile_path, capsys):
    pytest.importorskip("treeopt.search.hardware")
    assert main(["compare", "--profile", str(latency_profile_path), "chain:4"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["shape", "size", "depth", "tokens/step", "step", "ms",
                              "tokens/s", "speed-up"]
    # default draft cost, per-level (what the engine runs): the 3 levels with children each
    # feed 1 node, 3 * t_draft(1); step = 3 * 1 + t_target(4) = 3 + (10 + 2 * 3/7) = 13.857 ms
    step = 3 + 10 + 2 * 3 / 7
    assert out[2].split() == ["chain:4", "4", "3", "2.1760", f"{step:.2f}",
                              f"{1000 * 2.176 / step:.1f}", f"{10 * 2.176 / step:.2f}x"]
    # Sequoia's: step = (depth + 1) * t_draft(1) + t_target(4) = 4 * 1 + (10 + 2 * 3/7)
    assert main(["compare", "--profile", str(latency_profile_path), "chain:4",
                 "--draft-cost", "sequoia"]) == 0
    out = capsys.readouterr().out.splitlines()
    step = 4 + 10 + 2 * 3 / 7
    assert out[2].split() == ["chain:4", "4", "3", "2.1760", f"{step:.2f}",
                              f"{1000 * 2.176 / step:.1f}", f"{10 * 2.176 / step:.2f}x"]


def test_compare_defaults_and_plot(latency_profile_path, tmp_path, capsys):
    pytest.importorskip("treeopt.search.dp")
    assert main(["compare", "--profile", str(latency_profile_path), "--plot",
                 str(tmp_path / "f.png"), "--max-size", "64", "--max-levels", "6"]) == 0
    out = capsys.readouterr().out
    assert "mc_sim_7b_63" in out and "dp:64" in out
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_shipped_profile(capsys):
    assert main(["compare", "--profile", str(PROFILES / "sequoia-reference.json"),
                 "mc_sim_7b_63"]) == 0
    assert "mc_sim_7b_63" in capsys.readouterr().out


def test_compare_errors(profile_path, tmp_path, capsys):
    assert main(["compare", "--profile", str(profile_path), "nonsense"]) == 2
    assert "unknown shape 'nonsense'" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text(json.dumps({"format": "treeopt-profile", "version": 1,
                                                   "acceptance": {"p": [0.9, 0.3]}}))
    assert main(["compare", "--profile", str(tmp_path / "bad.json"), "chain:2"]) == 2
    err = capsys.readouterr().err
    assert "bad.json" in err and "sums to" in err and err.count("\n") == 1


# ------------------------------------------------------------------ shapes
def test_shapes_writes_growmaps(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["shapes", "mc_sim_7b_63", "chains:4x8", "kary:2x3"]) == 0
    tree, meta = load_growmap(tmp_path / "growmaps" / "mc_sim_7b_63.pt")
    assert tree == PRESETS["mc_sim_7b_63"].tree()
    assert meta["shape"] == "mc_sim_7b_63" and meta["source"].startswith("Medusa")
    assert load_growmap(tmp_path / "growmaps" / "chains-4x8.pt")[0] == independent_chains(4, 8)
    assert load_growmap(tmp_path / "growmaps" / "kary-2x3.pt")[0] == kary(2, 3)
    # Sequoia reads it with a plain torch.load
    g = torch.load(tmp_path / "growmaps" / "kary-2x3.pt")
    assert g["size"] == 15 and g["mask"].dtype == torch.int64
    assert len(capsys.readouterr().out.splitlines()) == 3


def test_shapes_out_and_profile(tmp_path, profile_path, capsys):
    out = tmp_path / "sub" / "g.json"
    assert main(["shapes", "greedy:8", "--profile", str(profile_path), "--out", str(out)]) == 0
    tree, meta = load_growmap(out)
    assert tree.size == 8
    assert meta["expected_tokens"] == pytest.approx(tree.expected_tokens([0.6, 0.1, 0.05]))
    assert meta["profile"] == "p.json"
    assert "F = " in capsys.readouterr().out


def test_shapes_list_and_errors(tmp_path, capsys):
    assert main(["shapes", "--list"]) == 0
    assert "mc_sim_7b_63: size 64" in capsys.readouterr().out
    assert main(["shapes"]) == 2
    assert main(["shapes", "chain:2", "chain:3", "--out", str(tmp_path / "x.pt")]) == 2
    assert "--out takes a single NAME" in capsys.readouterr().err
    assert main(["shapes", "chain:2", "--out", str(tmp_path / "x.txt")]) == 2
    assert "unknown growmap extension" in capsys.readouterr().err


def test_help_texts(capsys):
    for cmd in ("show", "compare", "shapes"):
        with pytest.raises(SystemExit) as info:
            main([cmd, "--help"])
        assert info.value.code == 0
        assert "examples:" in capsys.readouterr().out
