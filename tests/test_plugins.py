"""Third-party drafter plugins fail in one line (issue 19, item 5): a ``TREEOPT_DRAFTERS``
module or an entry point that raises anything, or never returns, is disabled with one
warning naming it and its error, and treeopt's own drafters keep working."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REGISTER = "from treeopt.decode.drafter import register_drafter\n"


def _plugins(folder: Path) -> None:
    (folder / "plug_raise.py").write_text("raise RuntimeError('boom in plugin')\n")
    (folder / "plug_partial.py").write_text(
        REGISTER + "register_drafter('halfway', 'x')(lambda *a, **k: None)\n"
        "register_drafter('ngram', 'hijacked')(lambda *a, **k: None)\n"
        "raise ValueError('half registered')\n")
    (folder / "plug_exit.py").write_text("import sys\nsys.exit(3)\n")
    (folder / "plug_hang.py").write_text("import time\nwhile True:\n    time.sleep(0.05)\n")
    (folder / "plug_good.py").write_text(
        REGISTER + "register_drafter('goodone', 'a working plugin')(lambda *a, **k: None)\n")
    (folder / "plug_ep.py").write_text("raise KeyError('entry point failure')\n")
    dist = folder / "fakeplug-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fakeplug\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[treeopt.drafters]\nbroken = plug_ep\nmissing = no_such_module_xyz\n")


def test_failing_plugins_disable_themselves_in_one_line(tmp_path):
    _plugins(tmp_path)
    code = textwrap.dedent("""
        from treeopt.decode.drafter import FAILED_PLUGINS, build_drafter, registered
        names = registered()
        print("NAMES", sorted(names))
        print("NGRAM", names["ngram"].description[:20])
        print("BUILT", type(build_drafter("ngram", target=None)).__name__)
        print("FAILED", len(FAILED_PLUGINS))
    """)
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{tmp_path}",
               TREEOPT_DRAFTERS="plug_raise, plug_partial, plug_exit, plug_hang, "
                                "no_such_plugin_xyz, plug_good",
               TREEOPT_PLUGIN_TIMEOUT_S="2")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    out = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    assert "'goodone'" in out["NAMES"] and "'halfway'" not in out["NAMES"]
    assert "hijacked" not in out["NGRAM"]  # the failed plugin's registrations are undone
    assert out["BUILT"] == "NgramDrafter" and out["FAILED"] == "7"
    warnings = [ln for ln in proc.stderr.splitlines() if "drafter plugin" in ln]
    assert len(warnings) == 7, proc.stderr
    for name, why in [("plug_raise", "boom in plugin"), ("plug_partial", "half registered"),
                      ("plug_exit", "SystemExit"), ("plug_hang", "within 2 s"),
                      ("no_such_plugin_xyz", "ModuleNotFoundError"),
                      ("broken", "entry point failure"), ("missing", "ModuleNotFoundError")]:
        assert any(name in w and why in w for w in warnings), (name, warnings)
