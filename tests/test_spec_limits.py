"""Drafter specs with limits (issue 19, item 2): hostile specs are refused in one line that
names the limit, in linear time, never with a RecursionError; error messages quote hostile
input cut to a readable length."""

import time

import pytest

from treeopt.decode.drafter import (
    MAX_SPEC_CHARS,
    MAX_SPEC_DEPTH,
    DrafterError,
    build_drafter,
    parse_options,
    split_options,
    unwrap,
)
from treeopt.limits import MAX_QUOTE, quote


def _error(spec) -> str:
    with pytest.raises(DrafterError) as e:
        build_drafter(spec, target=None)
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 600, msg[:300]
    return msg


def test_deep_parentheses_are_refused_quickly_naming_the_limit():
    spec = "fallback:first=" + "(" * 20_000 + "ngram" + ")" * 20_000 + ",then=ngram"
    t0 = time.perf_counter()
    msg = _error(spec)
    assert time.perf_counter() - t0 < 5  # was 66 s (quadratic unwrap)
    assert "characters" in msg or "nested" in msg


def test_nesting_past_the_depth_limit_is_one_line():
    deep = "ngram"
    for _ in range(MAX_SPEC_DEPTH + 1):
        deep = f"fallback:first=({deep}),then=ngram"
    assert len(deep) < MAX_SPEC_CHARS
    assert "nested" in _error(deep) and str(MAX_SPEC_DEPTH) in _error(deep)


def test_cascades_nested_without_parentheses_never_recurse_past_the_limit():
    spec = "fallback:first=" * 1500 + "ngram"
    msg = _error(spec)  # was a RecursionError traceback
    assert "nested" in msg or "characters" in msg
    short = "fallback:first=" * (MAX_SPEC_DEPTH + 1) + "ngram"
    assert "nested" in _error(short)


def test_a_few_levels_still_work():
    spec = "fallback:first=(fallback:first=(ngram:max=3),then=ngram),then=ngram"
    assert build_drafter(spec, target=None) is not None
    assert unwrap("((ngram:k=2))") == "ngram:k=2"
    assert unwrap("(a),(b)") == "(a),(b)"


def test_long_specs_are_refused_and_quoted_short():
    msg = _error("ngram:" + "k=1," * 30_000)
    assert str(MAX_SPEC_CHARS) in msg
    with pytest.raises(DrafterError) as e:
        parse_options("x" * 3000, {"k": int}, "ngram")
    assert len(str(e.value)) < 400
    with pytest.raises(DrafterError) as e:
        split_options("(" * 50 + "a", "ngram")
    assert len(str(e.value)) < 400
    assert len(_error("nosuchdrafter:" + "y" * 3000)) < 400


def test_quote_cuts_and_says_the_length():
    text = quote("z" * 100_000)
    assert len(text) < MAX_QUOTE + 40 and "100000 characters" in text
    assert quote("short") == "'short'"
    assert "10^" in quote(10 ** 5000)


def test_cli_cuts_any_error_line(capsys):
    from treeopt.cli import MAX_ERROR_LINE, main

    for name in ("q" * 3000, "q" * 200 + ".json"):  # a file name too long; a missing file
        assert main(["show", name]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and len(err) <= 400, len(err)
    from treeopt.errors import TreeoptError, one_line

    assert len(one_line(TreeoptError("y" * 100_000), MAX_ERROR_LINE)) <= MAX_ERROR_LINE
