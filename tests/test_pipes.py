"""Output into a pipe whose reader stops early (``treeopt ... | head -1``): the command stops
quietly with status 0, no traceback, no "Exception ignored" at exit, as Unix tools do."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import tiny_tokenizer

from treeopt.testing import tiny_causal_lm

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "profiles" / "sequoia-reference-l40-7b.json"
ENV = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
TREEOPT = f"{sys.executable} -m treeopt"


def quiet(stderr: str) -> bool:
    return not any(w in stderr for w in ("Traceback", "BrokenPipe", "Exception ignored"))


def into_closed_pipe(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """Run ``treeopt ARGS`` with stdout a pipe whose reader has already gone: the first
    write fails with EPIPE, deterministically (a real ``| head`` races with the writer)."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run([sys.executable, "-m", "treeopt", *args], stdout=write,
                              stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=ENV,
                              timeout=300)
    finally:
        os.close(write)


@pytest.mark.skipif(os.name != "posix", reason="needs a POSIX shell and head")
def test_compare_into_head_as_the_user_typed_it(tmp_path):
    shell = f"set -o pipefail; {TREEOPT} compare --profile {PROFILE} | head -1"
    done = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, cwd=tmp_path,
                          env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr
    assert quiet(done.stderr), done.stderr
    assert done.stdout.split()[:3] == ["shape", "size", "depth"]
    assert len(done.stdout.splitlines()) == 1


@pytest.mark.parametrize("args", [
    ["compare", "--profile", str(PROFILE)],
    ["shapes", "--list"],
    ["models", "list"],
    ["search", "--profile", str(PROFILE), "--out", "s.pt"],
    ["show", str(ROOT / "growmaps" / "sequoia-l40-7b.pt"), "--format", "paths"],
], ids=["compare", "shapes", "models", "search", "show"])
def test_commands_stop_quietly_when_the_reader_has_gone(args, tmp_path):
    done = into_closed_pipe(args, tmp_path)
    assert done.returncode == 0, done.stderr
    assert quiet(done.stderr), done.stderr


def tiny_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "tiny"
    tiny_causal_lm("llama", num_layers=2, seed=3).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_generate_stops_streaming_quietly(tmp_path):
    done = into_closed_pipe(["generate", "--target", str(tiny_folder(tmp_path)), "--draft",
                             "none", "--prompt", "w5 w6 w7", "--no-chat-template",
                             "--max-new-tokens", "30", "--device", "cpu", "--threads", "1"],
                            tmp_path)
    assert done.returncode == 0, done.stderr
    assert quiet(done.stderr), done.stderr
    # it stopped at the first write: no statistics of a finished decode follow
    assert "tokens per step" not in done.stderr


def test_chat_on_a_pipe_stops_quietly(tmp_path):
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "treeopt", "chat", "--target", str(tiny_folder(tmp_path)),
             "--draft", "none", "--no-chat-template", "--max-new-tokens", "20", "--threads",
             "1"], input="w5 w6\nw7 w8\n", stdout=write, stderr=subprocess.PIPE, text=True,
            cwd=tmp_path, env=ENV, timeout=300)
    finally:
        os.close(write)
    assert done.returncode == 0, done.stderr
    assert quiet(done.stderr), done.stderr
