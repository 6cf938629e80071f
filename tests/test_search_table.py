"""``treeopt search`` names the rank table it used: the pooled rank row, every depth row, or
the reliable depth rows only; the two tables of one profile (which give different trees) never
print the same header."""

from pathlib import Path

from treeopt.cli import main
from treeopt.profile import Profile
from treeopt.profile.model import describe_table, reliable_table

ROOT = Path(__file__).resolve().parent.parent


def header(capsys, *argv) -> str:
    assert main([str(a) for a in argv]) == 0
    return capsys.readouterr().out.splitlines()[0]


def test_shipped_ngram_profile_headers_differ(tmp_path, capsys):
    prof = ROOT / "profiles" / "smollm2-ngram-cpu.json"
    default = header(capsys, "search", "--profile", prof, "--out", tmp_path / "a.pt")
    pooled = header(capsys, "search", "--profile", prof, "--no-depth-aware", "--out",
                    tmp_path / "b.pt")
    assert default != pooled
    assert default.endswith("depth-aware profile (the depth-0 row of 5; deeper rows have "
                            "fewer than 50 steps and reuse row 0)")
    assert pooled.endswith("rank profile (one row pooled over all depths; --no-depth-aware)")
    assert len(reliable_table(Profile.load(prof))) == 1


def test_describe_table_by_hand():
    flat = Profile([0.6, 0.1])
    assert describe_table(flat) == "rank profile (one row, no per-depth rows)"
    # three depth rows: 80, 60 and 10 steps (counts + none)
    deep = Profile.from_counts([90, 20], 40, depth_counts=[[50, 10], [30, 10], [5, 0]],
                               depth_none=[20, 20, 5])
    assert describe_table(deep) == ("depth-aware profile (depth rows 0..1 of 3; deeper rows "
                                    "have fewer than 50 steps and reuse row 1)")
    assert describe_table(deep, min_samples=10) == "depth-aware profile (3 depth rows)"
    assert describe_table(deep, min_samples=100) == (
        "rank profile (one row pooled over all depths: no depth row has 100 steps)")
    assert describe_table(deep, depth_aware=False).startswith("rank profile (one row pooled")
