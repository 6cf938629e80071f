"""Help texts: every option says what it does and its default; required options show no
"default: None"; user-facing wording only; one default per shared option."""

from __future__ import annotations

import argparse

import pytest

from treeopt.cli import build_parser


def _parsers(parser, name="treeopt"):
    """(name, parser) for the top-level parser and every (nested) sub-command."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, child in action.choices.items():
                yield from _parsers(child, f"{name} {sub}")


def _help(parser) -> str:
    return " ".join(parser.format_help().split())


def _command(name: str):
    parser = build_parser()
    for part in name.split():
        parser = next(a for a in parser._actions
                      if isinstance(a, argparse._SubParsersAction)).choices[part]
    return parser


ALL = [name for name, _ in _parsers(build_parser())]
# Commands whose files belong to others; each line here is a known defect left to them.
@pytest.mark.parametrize("name", ALL)
def test_no_help_shows_default_none(name):
    text = _help(_command(name.removeprefix("treeopt").strip()) if name != "treeopt"
                 else build_parser())
    assert "default: None" not in text, name


def test_every_subcommand_was_scanned():
    assert {"treeopt eval", "treeopt tune", "treeopt search", "treeopt generate",
            "treeopt profile acceptance", "treeopt bench verify"} <= set(ALL)


def _option_help(parser, flag: str) -> str:
    """The formatted help of one option (what ``--help`` prints beside it)."""
    action = next(a for a in parser._actions if flag in a.option_strings)
    formatter = parser._get_formatter()
    return " ".join(formatter._expand_help(action).split()) if action.help else ""


def test_eval_options_have_help_with_defaults():
    eval_ = _command("eval")
    expected = {"--max-new-tokens": "128", "--top-k": "0", "--top-p": "1.0",
                "--rule": "sequoia", "--dtype": "auto", "--window-unit": "tokens",
                "--no-chat-template": "chat template", "--temperature": "0",
                "--dataset": "spec_bench"}
    for flag, default in expected.items():
        text = _option_help(eval_, flag)
        assert "default" in text and default in text.split("default", 1)[1], (flag, text)
    undocumented = [a.dest for a in eval_._actions if not a.help]
    assert undocumented == []
    assert "required" in _option_help(eval_, "--out")
    temperature = _option_help(eval_, "--temperature")
    assert "1e-5" in temperature and "rejected" in temperature
    assert "(default: False)" not in _help(eval_)  # a flag's default says what it means


def test_dataset_default_is_the_same_everywhere():
    defaults = {}
    for name in ("eval", "tune", "profile acceptance", "search"):
        parser = _command(name)
        action = next(a for a in parser._actions if "--dataset" in a.option_strings)
        defaults[name] = action.default
        assert "spec_bench" in _help(parser).split("--dataset", 2)[-1][:400], name
    assert set(defaults.values()) == {"spec_bench"}, defaults


def test_no_internal_wording_in_help():
    for name in ("search", "tune", "eval", "generate"):
        text = _help(_command(name))
        for internal in ("when that module is installed", "``", "this command parses",
                         "treeopt.pipeline", "treeopt.search.", "treeopt.limits"):
            assert internal not in text, (name, internal)
