"""Issue 18's smaller items: eval validates its folder and prompts before anything heavy and
names --resume after Ctrl-C; generate/chat --help list every built-in drafter; help texts
print the node cap as a number; JSON errors say "starting at column N" once."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from treeopt.cli import build_parser, main
from treeopt.limits import MAX_TREE_NODES

ROOT = Path(__file__).resolve().parent.parent


def help_text(*command: str) -> str:
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args([*command, "--help"])
    return ""


def capture_help(capsys, *command: str) -> str:
    help_text(*command)
    return capsys.readouterr().out


def test_eval_refuses_a_used_folder_and_a_bad_dataset_before_loading(tmp_path, capsys,
                                                                      monkeypatch):
    import treeopt.cli.eval as cli_eval

    monkeypatch.setattr(cli_eval, "load_pair_for",
                        lambda args: pytest.fail("models loaded before the checks"))
    used = tmp_path / "run"
    used.mkdir()
    (used / "rows.jsonl").write_text('{"method": "ar"}\n')
    data = tmp_path / "q.txt"
    data.write_text("say one\n")
    rc = main(["eval", "--dataset", str(data), "--chain", "2", "--out", str(used)])
    err = capsys.readouterr().err
    assert rc == 2 and "already holds results; pass --resume" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "prompt": "fine"}\n{"id": 2, "prompt": "  "}\n')
    rc = main(["eval", "--dataset", str(bad), "--chain", "2", "--out", str(tmp_path / "new")])
    err = capsys.readouterr().err
    assert rc == 2 and "must be a non-empty string" in err
    assert not (tmp_path / "new").exists()


def test_eval_checks_come_before_transformers_is_imported(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "prompt": ""}\n')
    code = ("import sys\nfrom treeopt.cli import main\n"
            f"rc = main(['eval', '--dataset', {str(bad)!r}, '--chain', '2', '--out', "
            f"{str(tmp_path / 'run')!r}])\n"
            "print(rc, 'transformers' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    assert done.stdout.split() == ["2", "False"], done.stderr


def test_eval_interrupted_names_resume(tmp_path, capsys, monkeypatch):
    from types import SimpleNamespace

    import treeopt.cli.eval as cli_eval

    monkeypatch.setattr(cli_eval, "load_pair_for",
                        lambda args: SimpleNamespace(target=None, draft=None, tokenizer=None))

    def interrupted(*a, out_dir=None, **k):
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_eval, "run_eval", interrupted)
    data = tmp_path / "q.txt"
    data.write_text("say one\n")
    out = tmp_path / "run"
    rc = main(["eval", "--dataset", str(data), "--chain", "2", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 130
    assert err.strip() == (f"treeopt eval: interrupted; every finished prompt is kept in {out}; "
                           "run the same command with --resume to continue from it")


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_draft_help_lists_every_built_in_drafter(command, capsys):
    from treeopt.decode.drafter import registered

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    (draft,) = [a for a in sub.choices[command]._actions if a.dest == "draft"]
    text = draft.help
    builtin = [name for name, entry in registered().items()
               if entry.factory.__module__.startswith("treeopt.drafters.")]
    assert len(builtin) >= 11
    for name in builtin:
        assert f"'{name}" in text or f"{name}:" in text or name == "model", name


def test_help_texts_print_the_node_cap_as_a_number(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, child in sub.choices.items():
        text = child.format_help()
        nested = [a for a in child._actions if a.dest in ("what", "bench", "action")
                  and getattr(a, "choices", None)]
        for action in nested:
            text += "".join(c.format_help() for c in action.choices.values())
        assert "MAX_TREE_NODES" not in text, name
    for command in (["search"], ["tune"], ["shapes"]):
        assert str(MAX_TREE_NODES) in capture_help(capsys, *command)


def test_json_errors_name_the_column_once(tmp_path):
    from treeopt.datasets import DatasetError, load_prompts

    bad = tmp_path / "q.jsonl"
    bad.write_text('{"prompt": "unterminated}\n')
    with pytest.raises(DatasetError) as info:
        load_prompts(str(bad))
    assert "Unterminated string starting at column 12" in str(info.value)
    assert "at at" not in str(info.value)
    listed = tmp_path / "q.json"
    listed.write_text('[{"prompt": "x"}, {"prompt": "y}]')
    with pytest.raises(DatasetError) as info:
        load_prompts(str(listed))
    assert "starting at column" in str(info.value) and "at at" not in str(info.value)
