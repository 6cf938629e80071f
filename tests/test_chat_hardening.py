"""A chat session survives any line (issue 19, item 3): binary garbage, over-long /tree and
/draft arguments and a broken datastore are refused with one message each, and the session
goes on with its history intact."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from helpers import chat_process, tiny_tokenizer

from treeopt.chat import ChatSession
from treeopt.testing import tiny_causal_lm

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ("{% for m in messages %}<s> {{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}w3{% endif %}")


@pytest.fixture(autouse=True)
def _offline(tmp_path, monkeypatch):
    monkeypatch.setenv("TREEOPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def tok():
    t = tiny_tokenizer()
    t.chat_template = TEMPLATE
    return t


def one_line_error(reply: str) -> bool:
    return reply.startswith("error: ") and "\n" not in reply


def _broken_datastore(tmp_path):
    path = tmp_path / "broken.npz"
    path.write_bytes(b"PK\x03\x04" + os.urandom(300))
    return path


def test_library_refuses_bad_lines_and_keeps_the_history(tok, tmp_path):
    target = tiny_causal_lm("llama", num_layers=3, seed=7)
    s = ChatSession(target, tok, draft="none", max_new_tokens=3)
    s.answer("w5 w6")
    history = list(s.history)
    for line in ("/tree " + "x" * 300, "/draft " + "y" * 300, "/tree " + "/a" * 200,
                 f"/draft datastore:{_broken_datastore(tmp_path)}",
                 f"/draft bigram:{tmp_path}", "/draft datastore:" + "z" * 5000):
        reply = s.command(line)
        assert one_line_error(reply), (line[:40], reply[:200])
        assert len(reply) < 600
    with pytest.raises(Exception) as e:  # a prompt that is not text: one ChatError line
        s.answer("w5 \udcff\udcfe w6")
    assert type(e.value).__name__ == "ChatError" and "\n" not in str(e.value)
    assert s.history == history


def test_cli_session_survives_garbage_long_arguments_and_broken_files(tmp_path, tok):
    model = tiny_causal_lm("llama", num_layers=2, seed=5)
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    broken = _broken_datastore(tmp_path)
    proc = chat_process(folder, "--draft", "none", "--max-new-tokens", "3")
    script = (b"w5 w6\n" + bytes(range(128, 256)) + b"\x00\xff\xfe garbage\n"
              + b"/tree " + b"t" * 300 + b"\n" + b"/draft " + b"d" * 300 + b"\n"
              + b"/draft datastore:" + str(broken).encode() + b"\n"
              + b"x" * (1 << 20) + b"\n" + b"/length 2\nw7\n")
    out, err = proc.communicate(script, timeout=300)
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    assert b"Traceback" not in err
    lines = out.decode(errors="replace").splitlines()
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) >= 4 and all(len(ln) < 600 for ln in errors), errors
    assert lines[-2] == "length 2: at most 2 new tokens per answer"
    assert re.fullmatch(r"(w\d+ ?){1,2}", lines[-1]), lines[-1]  # the session went on
