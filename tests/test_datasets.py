"""Prompt loading: shipped datasets, selection, user files and bad-file messages."""

import gzip
import json
import sys
from collections import Counter

import pytest

from treeopt.datasets import DatasetError, Prompt, load_prompts

MT_CATS = ["writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem",
           "humanities"]


def test_spec_bench_shipped():
    prompts = load_prompts("spec_bench")
    assert len(prompts) == 480
    counts = Counter(p.category for p in prompts)
    assert len(counts) == 13
    assert all(counts[c] == 10 for c in MT_CATS)
    for c in ("translation", "summarization", "qa", "math_reasoning", "rag"):
        assert counts[c] == 80
    assert len({p.id for p in prompts}) == 480
    assert all(p.turns == (p.text,) for p in prompts)


def test_mt_bench_is_spec_bench_first_80():
    mt = load_prompts("mt_bench")
    sb = load_prompts("spec_bench")
    assert len(mt) == 80
    assert [p.id for p in mt] == [p.id for p in sb[:80]]
    assert sorted(set(p.category for p in mt)) == sorted(MT_CATS)
    both = load_prompts("mt_bench", turns="both")
    assert all(len(p.turns) == 2 and p.turns[0] == p.text for p in both)
    assert both[0].text.startswith("Compose an engaging travel blog post")


def test_humaneval_shipped():
    prompts = load_prompts("humaneval")
    assert len(prompts) == 164
    assert prompts[0].id == "HumanEval/0" and "def has_close_elements" in prompts[0].text
    assert {p.category for p in prompts} == {"humaneval"}


def test_select_by_category_count_seed():
    two = load_prompts("spec_bench", categories=["qa", "math"])
    assert Counter(p.category for p in two) == {"qa": 80, "math": 10}
    assert load_prompts("spec_bench", categories="qa,math") == two
    a = load_prompts("spec_bench", categories=["qa", "math"], n=10, seed=3)
    b = load_prompts("spec_bench", categories=["qa", "math"], n=10, seed=3)
    c = load_prompts("spec_bench", categories=["qa", "math"], n=10, seed=4)
    assert a == b and a != c
    assert Counter(p.category for p in a) == {"qa": 5, "math": 5}  # stratified
    # Small category exhausted: leftovers go to the bigger one.
    d = load_prompts("spec_bench", categories=["qa", "math"], n=30, seed=0)
    assert Counter(p.category for p in d) == {"qa": 20, "math": 10}
    # Dataset order is kept.
    order = [p.id for p in two]
    assert [order.index(p.id) for p in d] == sorted(order.index(p.id) for p in d)
    all13 = load_prompts("spec_bench", n=26, seed=0)
    assert set(Counter(p.category for p in all13).values()) == {2}
    assert len(load_prompts("humaneval", n=1000)) == 164


def test_unknown_category():
    with pytest.raises(DatasetError, match="unknown category 'poetry'.*available: writing"):
        load_prompts("mt_bench", categories=["poetry"])


def test_user_fastchat_prompt_text_and_txt(tmp_path):
    fc = tmp_path / "q.jsonl"
    fc.write_text(json.dumps({"question_id": 7, "category": "a", "turns": ["hi", "more"]})
                  + "\n\n" + json.dumps({"question_id": 8, "turns": ["yo"]}) + "\n")
    got = load_prompts(fc, turns="both")
    assert got == [Prompt("7", "a", "hi", ("hi", "more")), Prompt("8", "q", "yo", ("yo",))]
    assert load_prompts(fc)[0].turns == ("hi",)
    pl = tmp_path / "p.jsonl"
    pl.write_text('{"prompt": "one"}\n{"text": "two", "id": "x"}\n')
    assert [(p.id, p.text, p.category) for p in load_prompts(pl)] == [("1", "one", "p"),
                                                                       ("x", "two", "p")]
    gz = tmp_path / "g.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as fh:
        fh.write('{"prompt": "zipped"}\n')
    assert load_prompts(gz)[0].text == "zipped"
    js = tmp_path / "l.json"
    js.write_text('[{"prompt": "a"}, "b"]')
    assert [p.text for p in load_prompts(js)] == ["a", "b"]
    txt = tmp_path / "lines.txt"
    txt.write_text("first prompt\n\n  second prompt  \n")
    assert [(p.id, p.text) for p in load_prompts(txt)] == [("1", "first prompt"),
                                                           ("3", "second prompt")]


class _WordTokenizer:
    def encode(self, text, add_special_tokens=False):
        return [len(w) for w in text.split()]

    def decode(self, ids):
        return " ".join("x" * i for i in ids)


def test_text_windows(tmp_path):
    txt = tmp_path / "corpus.txt"
    txt.write_text("abcdefghij" * 3 + "xyz")
    chars = load_prompts(txt, window=10)
    assert [p.text for p in chars] == ["abcdefghij"] * 3
    assert all(p.category == "corpus" for p in chars)
    txt.write_text("a bb ccc dddd e ff ggg")
    toks = load_prompts(txt, window=3, window_unit="tokens", tokenizer=_WordTokenizer())
    assert [p.token_ids for p in toks] == [(1, 2, 3), (4, 1, 2)]
    with pytest.raises(DatasetError, match="need a tokenizer"):
        load_prompts(txt, window=3, window_unit="tokens")
    with pytest.raises(DatasetError, match="fewer than one window"):
        load_prompts(txt, window=1000)


def _one_line(exc):
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("content,line,what", [
    (b'{"prompt": "ok"}\n{"prompt": "ok2"}\n{"question": "no field"}\n', 3, "no 'turns'"),
    (b'{"prompt": "ok"}\n{"prompt": "broken"\n', 2, "invalid JSON"),
    (b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n', 2, "not valid UTF-8"),
    (b'{"prompt": "ok"}\n{"turns": []}\n', 2, "'turns' must be"),
    (b'{"prompt": ""}\n', 1, "non-empty string"),
    (b'[1, 2]\n', 1, "expected a JSON object"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, content, line, what):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(DatasetError) as exc:
        load_prompts(path)
    msg = _one_line(exc)
    assert f"bad.jsonl:{line}:" in msg and what in msg


def test_bad_text_and_empty_files(tmp_path):
    txt = tmp_path / "bad.txt"
    txt.write_bytes(b"fine\nalso fine\n\xff\xfe broken\n")
    with pytest.raises(DatasetError) as exc:
        load_prompts(txt)
    assert "bad.txt:3: not valid UTF-8" in _one_line(exc)
    for name in ("empty.jsonl", "empty.txt", "empty.json"):
        path = tmp_path / name
        path.write_text("\n  \n" if name != "empty.json" else "")
        with pytest.raises(DatasetError) as exc:
            load_prompts(path)
        assert name in _one_line(exc) and "empty" in str(exc.value)
    js = tmp_path / "bad.json"
    js.write_text('[\n{"prompt": "a"},\n{"prompt": }\n]')
    with pytest.raises(DatasetError) as exc:
        load_prompts(js)
    assert "bad.json:3: invalid JSON" in _one_line(exc)
    with pytest.raises(DatasetError, match="no such file"):
        load_prompts(tmp_path / "missing.jsonl")
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"id": 1, "prompt": "a"}\n{"id": 1, "prompt": "b"}\n')
    with pytest.raises(DatasetError, match="appears twice"):
        load_prompts(dup)


def test_hf_without_package_or_network(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed
    with pytest.raises(DatasetError) as exc:
        load_prompts("hf:openai/openai_humaneval:test")
    assert "pip install datasets" in _one_line(exc)

    class _Offline:
        @staticmethod
        def load_dataset(name, split):
            raise ConnectionError(f"Couldn't reach '{name}' on the Hub (LocalEntryNotFound)\n"
                                  "trace line")

    monkeypatch.setitem(sys.modules, "datasets", _Offline)
    with pytest.raises(DatasetError) as exc:
        load_prompts("hf:some/name")
    assert "Couldn't reach" in _one_line(exc)

    class _Fake:
        @staticmethod
        def load_dataset(name, split):
            assert split == "test"
            return [{"question": "q1", "category": "c"}, {"prompt": "q2"}]

    monkeypatch.setitem(sys.modules, "datasets", _Fake)
    got = load_prompts("hf:org/set:test")
    assert [(p.text, p.category) for p in got] == [("q1", "c"), ("q2", "set")]


def test_bad_arguments():
    with pytest.raises(DatasetError, match="turns"):
        load_prompts("mt_bench", turns="all")
    with pytest.raises(DatasetError, match="at least 1"):
        load_prompts("mt_bench", n=0)
