"""A model name that is not a folder, a known name or a cached hub id fails at once, with
the closest known name, and never reaches Hugging Face's download retries."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import transformers

from treeopt.models.loading import ModelError, known_names, load_model, resolve_spec

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    """Online mode, an empty HF cache, and any download or connection is a test failure
    unless a test allows it."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("TREEOPT_CACHE", str(tmp_path / "cache"))
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))

    def refused(*a, **k):
        raise AssertionError("a model load went past the name check")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refused)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refused)


def one_line(info) -> str:
    text = str(info.value)
    assert text and "\n" not in text
    return text


@pytest.mark.parametrize("typed, meant", [("smolm2", "smollm2"), ("SmolLM-2", "smollm2"),
                                          ("qwen2.5-coder-1.5", "qwen2.5-coder-1.5b"),
                                          ("qwen-coder-0.5b", "qwen2.5-coder-0.5b")])
def test_a_mistyped_name_suggests_the_known_one_without_the_network(typed, meant, monkeypatch):
    def connect(*a, **k):
        raise AssertionError("a name without org/ is never looked up on the hub")

    monkeypatch.setattr(socket, "create_connection", connect)
    with pytest.raises(ModelError) as info:
        load_model(typed, device="cpu")
    text = one_line(info)
    assert f"did you mean {meant!r}?" in text and "not a known name" in text
    assert "smollm2" in known_names()


def test_a_name_like_nothing_known_gets_no_suggestion():
    with pytest.raises(ModelError) as info:
        resolve_spec("zzzz")
    assert "did you mean" not in one_line(info)


def test_an_uncached_hub_id_fails_at_once_when_the_hub_is_unreachable(monkeypatch):
    calls = []

    def connect(address, timeout=None):
        calls.append((address, timeout))
        raise OSError("unreachable")

    monkeypatch.setattr(socket, "create_connection", connect)
    with pytest.raises(ModelError) as info:
        load_model("HuggingFaceTB/SmolLM2-135M", device="cpu")
    assert "hub cannot be reached" in one_line(info)
    assert calls == [(("huggingface.co", 443), 3.0)]  # one short try, no retries
    monkeypatch.setenv("HF_ENDPOINT", "http://mirror.example:8080")
    with pytest.raises(ModelError):
        resolve_spec("org/model")
    assert calls[-1][0] == ("mirror.example", 8080)


def test_offline_mode_refuses_before_any_connection(monkeypatch):
    monkeypatch.setattr(socket, "create_connection",
                        lambda *a, **k: pytest.fail("offline mode must not connect"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError) as info:
        resolve_spec("treeopt-test-org/not-cached")
    assert "offline" in one_line(info)


def test_cached_and_reachable_hub_ids_go_on_to_loading(monkeypatch, tmp_path):
    import huggingface_hub.constants as hub

    snap = Path(hub.HF_HUB_CACHE) / "models--some-org--cached" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("abc")
    monkeypatch.setattr(socket, "create_connection",
                        lambda *a, **k: pytest.fail("a cached id needs no connection"))
    assert resolve_spec("some-org/cached") == "some-org/cached"

    class Open:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: Open())
    assert resolve_spec("other-org/online") == "other-org/online"


def test_the_command_fails_in_one_line(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_WAIT_POLICY="PASSIVE",
               HF_HUB_CACHE=str(tmp_path / "hub"), TREEOPT_CACHE=str(tmp_path / "c"))
    env.pop("HF_HUB_OFFLINE", None)
    done = subprocess.run([sys.executable, "-m", "treeopt", "generate", "--target", "smolm2",
                           "--prompt", "hi"], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "treeopt generate: error: model 'smolm2' is not a known name (smollm2, "
        "qwen2.5-coder-1.5b, qwen2.5-coder-0.5b, qwen2.5-coder), a folder, a .gguf file or a "
        "cached Hugging Face id (org/name); did you mean 'smollm2'?"]
    assert "Retrying" not in done.stderr
