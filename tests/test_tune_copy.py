"""`treeopt tune --draft ngram|suffix` writes a copy-acceptance table into profile.json and
names the drafter spec that sizes each step from it; that spec decodes exactly."""

import json

import pytest
import torch
from helpers import char_tokenizer

from treeopt.cli import main
from treeopt.profile.copytable import CopyTable
from treeopt.testing import tiny_causal_lm

PROMPTS = ["The cat sat on", "Write a poem", "What is 2+2?", "Say hi"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny model folder with a character tokenizer, and a prompt file."""
    root = tmp_path_factory.mktemp("tune-copy")
    tiny_causal_lm(num_layers=2, seed=11).save_pretrained(root / "tiny")
    char_tokenizer().save_pretrained(root / "tiny")
    (root / "prompts.jsonl").write_text("".join(
        json.dumps({"id": f"p{i}", "category": "c", "text": t}) + "\n"
        for i, t in enumerate(PROMPTS)))
    return root


@pytest.mark.parametrize("draft", ["ngram", "suffix"])
def test_tune_writes_a_copy_table_that_decodes_exactly(workspace, tmp_path, capsys, draft,
                                                       monkeypatch):
    """... and a greedy ``tune --draft suffix`` caches its table for ``auto``'s suffix
    candidate to start from (``ngram``'s is not cached: ``auto`` estimates its n-gram
    candidates without features)."""
    from transformers import AutoModelForCausalLM

    from treeopt.decode.drafter import build_drafter
    from treeopt.decode.engine import generate
    from treeopt.drafters.auto import read_copy_table

    monkeypatch.setenv("TREEOPT_CACHE", str(tmp_path / "cache"))

    out = tmp_path / "run"
    assert main(["tune", "--target", str(workspace / "tiny"), "--draft", draft, "--device",
                 "cpu", "--threads", "1", "--dataset", str(workspace / "prompts.jsonl"),
                 "--prompts", "2", "--max-new-tokens", "12", "--width", "2", "--depth", "2",
                 "--tokens", "1,2,4", "--context", "8", "--repeats", "1", "--warmup", "0",
                 "--out-dir", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    spec = f"{draft}:len=auto,table={out / 'profile.json'}"
    assert spec in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["copy"]["draft_spec"] == spec and summary["copy"]["trials"] > 0
    table = CopyTable.load(out / "profile.json")
    assert table.total_trials == summary["copy"]["trials"] and table.mode == "online"
    target = AutoModelForCausalLM.from_pretrained(workspace / "tiny")
    drafter = build_drafter(spec, target=target)
    ids = torch.tensor([[40, 41, 42, 40, 41, 42, 40]])
    assert generate(target, drafter, ids, max_new_tokens=20).tokens == \
        generate(target, None, ids, max_new_tokens=20).tokens
    cached = read_copy_table(target, draft, tmp_path / "cache")
    if draft == "suffix":
        assert (cached.trials == table.trials).all() and \
            (cached.accepted == table.accepted).all()
        assert (build_drafter("auto", target=target).tables["suffix"].trials
                == table.trials).all()
    else:
        assert cached is None


@pytest.mark.parametrize("mode", ["online", "teacher-forced"])
def test_profile_copy_cli_writes_and_merges(workspace, tmp_path, capsys, mode):
    out = tmp_path / "copy.json"
    args = ["profile", "copy", "--target", str(workspace / "tiny"), "--draft", "suffix",
            "--device", "cpu", "--threads", "1", "--dataset", str(workspace / "prompts.jsonl"),
            "--prompts", "2", "--max-new-tokens", "10", "--mode", mode, "--max-tokens", "8",
            "--out", str(out)]
    assert main(args) == 0
    first = CopyTable.load(out)
    assert first.mode == mode and "copy table" in capsys.readouterr().out
    assert main(args + ["--merge"]) == 0
    assert CopyTable.load(out).total_trials == 2 * first.total_trials
    assert main(args[:-2] + ["--out", str(tmp_path / "x.pt")]) == 2
    assert ".json" in capsys.readouterr().err


def test_tune_profiles_long_prompts_as_decoding_keeps_them(tmp_path, monkeypatch):
    """A prompt longer than 512 tokens: tune profiles, times and replays it as eval decodes
    it, cut only to the model window minus the new tokens (it was cut to its last 512
    tokens, so a copy drafter tuned on a long article saw half of what it copies from)."""
    import treeopt.profile.acceptance as acc
    from treeopt.api import encode_prompts, prompt_room
    from treeopt.profile.latency import LatencySettings
    from treeopt.tuning import AcceptanceSettings, tune

    target = tiny_causal_lm(num_layers=1, seed=11, max_positions=1024)
    tok = char_tokenizer()
    long_text = "".join(chr(33 + (i * 7) % 90) for i in range(700))
    assert len(encode_prompts(tok, [long_text], True, None)[0]) == 700 > 512
    assert prompt_room(12, target) == 1024 - 12 and prompt_room(12, object()) is None
    seen = []
    real = acc.target_continuation

    def spy(model, prompt_ids, *a, **kw):
        seen.append(len(prompt_ids))
        return real(model, prompt_ids, *a, **kw)

    monkeypatch.setattr(acc, "target_continuation", spy)
    tune(target, "ngram", prompts=[long_text], tokenizer=tok, out_dir=tmp_path / "t",
         acceptance=AcceptanceSettings(prompts=1, max_new_tokens=12),
         latency=LatencySettings(tokens=[1, 2, 4], context=8, repeats=1, warmup=0))
    want = len(encode_prompts(tok, [long_text], True, None)[0])
    assert seen and set(seen) == {want}  # whole: it fits 1024 - 12
