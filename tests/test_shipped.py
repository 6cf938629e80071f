"""Every shipped growmap's recorded prediction is what ``treeopt compare`` prints for it under
its shipped profile, and ``treeopt search`` on that profile makes the shipped tree again
(so a shipped figure can always be reproduced with the current code)."""

from pathlib import Path

import pytest

from treeopt.cli import main
from treeopt.growmap import load_growmap

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted((ROOT / "growmaps").glob("*.pt"))


def shipped_profile(path: Path, meta: dict) -> Path:
    """The profile a shipped growmap was made from: its recorded path when that is in the
    repository, else the profile of the same name."""
    recorded = ROOT / str(meta.get("profile", ""))
    return recorded if recorded.is_file() else ROOT / "profiles" / f"{path.stem}.json"


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_recorded_prediction_is_what_compare_prints(path, capsys):
    tree, meta = load_growmap(path)
    profile = shipped_profile(path, meta)
    assert profile.is_file(), path
    assert main(["compare", "--profile", str(profile), str(path)]) == 0
    header, _, row = capsys.readouterr().out.splitlines()
    assert header.split() == ["shape", "size", "depth", "tokens/step", "step", "ms",
                              "tokens/s", "speed-up"]
    cells = row.split()
    assert cells[:3] == [path.name, str(tree.size), str(tree.depth)]
    assert cells[3] == f"{meta['expected_tokens']:.4f}"
    assert cells[4] == f"{meta['predicted_step_ms']:.2f}"
    assert cells[6] == f"{meta['predicted_speedup']:.2f}x"
    assert meta["size"] == tree.size and meta["depth"] == tree.depth


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_search_makes_the_shipped_tree_again(path, tmp_path, capsys):
    tree, meta = load_growmap(path)
    out = tmp_path / "again.pt"
    argv = ["search", "--profile", str(shipped_profile(path, meta)), "--out", str(out)]
    for key, flag in (("max_size", "--max-size"), ("max_levels", "--max-levels")):
        if meta.get(key) is not None:
            argv += [flag, str(meta[key])]
    assert main(argv) == 0
    capsys.readouterr()
    again, again_meta = load_growmap(out)
    assert again == tree
    assert again_meta["predicted_speedup"] == pytest.approx(meta["predicted_speedup"], rel=1e-12)
