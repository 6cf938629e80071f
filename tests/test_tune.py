"""CLI: profile acceptance/latency/merge, search --method optuna and tune on a tiny model folder."""

from __future__ import annotations

import json

import pytest

from treeopt.cli import main
from treeopt.growmap import load_growmap
from treeopt.profile import Profile
from treeopt.testing import tiny_causal_lm

PROMPTS = ["The cat sat on", "Write a poem", "What is 2+2?", "Name three colours",
           "Explain gravity", "Say hi", "Count to five"]


def char_tokenizer():
    """A 96-symbol character tokenizer matching ``tiny_causal_lm``'s vocabulary."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1, **{chr(32 + i): i + 2 for i in range(94)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="</s>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="</s>")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune")
    model = tiny_causal_lm(num_layers=2, seed=11)
    model.save_pretrained(root / "tiny")
    char_tokenizer().save_pretrained(root / "tiny")
    data = root / "prompts.jsonl"
    data.write_text("".join(json.dumps({"id": f"p{i}", "category": "c", "text": t}) + "\n"
                            for i, t in enumerate(PROMPTS)))
    return root


def model_args(ws):
    return ["--target", str(ws / "tiny"), "--draft", "early-exit:1", "--device", "cpu",
            "--threads", "1"]


def test_profile_acceptance_cli_resume_and_latency(workspace, tmp_path, capsys):
    out = tmp_path / "acc.json"
    args = ["profile", "acceptance", *model_args(workspace), "--dataset",
            str(workspace / "prompts.jsonl"), "--prompts", "3", "--max-new-tokens", "6",
            "--width", "3", "--depth", "2", "--out", str(out), "--quiet"]
    assert main(args) == 0
    first = Profile.load(out)
    assert first.meta["prompts_done"] == 3 and first.meta["settings"]["width"] == 3
    assert sum(first.counts) + first.none_count == 3 * 5  # token 0 of each comes from prefill
    assert main(args) == 2  # would overwrite a resumable profile
    assert "--resume" in capsys.readouterr().err
    assert main(args + ["--resume"]) == 0
    assert Profile.load(out).counts == first.counts

    assert main(["profile", "latency", *model_args(workspace), "--tokens", "1,2,4",
                 "--context", "8", "--repeats", "2", "--warmup", "0", "--out", str(out)]) == 0
    both = Profile.load(out)
    assert both.counts == first.counts and both.latency.target.tokens == [1, 2, 4]
    assert both.latency.draft is not None and both.latency.meta["target"].endswith("tiny")


def test_search_optuna_replay_cli(workspace, tmp_path, capsys):
    prof = tmp_path / "p.json"
    Profile.from_counts([30, 10, 5], 55, meta={}).save(prof)
    out = tmp_path / "g.json"
    assert main(["search", "--method", "optuna", "--objective", "replay", "--profile", str(prof),
                 "--budget", "6", "--max-depth", "4", "--trials", "6",
                 "--target", str(workspace / "tiny"), "--draft", "early-exit:1",
                 "--device", "cpu", "--dataset", str(workspace / "prompts.jsonl"),
                 "--prompts", "2", "--max-new-tokens", "8", "--out", str(out)]) == 0
    tree, meta = load_growmap(out)
    assert meta["objective"] == "replay" and meta["score"] >= meta["dp_score"]
    assert tree.size <= 6
    assert "dp:" in capsys.readouterr().out


def test_tune_end_to_end(workspace, tmp_path, capsys):
    out_dir = tmp_path / "run"
    assert main(["tune", *model_args(workspace), "--dataset", str(workspace / "prompts.jsonl"),
                 "--prompts", "2", "--max-new-tokens", "6", "--width", "3", "--depth", "2",
                 "--tokens", "1,2,4", "--context", "8", "--repeats", "1", "--warmup", "0",
                 "--max-depth", "4", "--optuna-trials", "3", "--out-dir", str(out_dir),
                 "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "best tree" in text and "predicted step" in text
    tree, meta = load_growmap(out_dir / "tree.pt")
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["tree"]["size"] == tree.size <= 4
    assert (out_dir / "tree.png").stat().st_size > 0
    prof = Profile.load(out_dir / "profile.json")
    assert prof.latency is not None and prof.counts is not None
    from treeopt.profile.acceptance import reliable_table

    assert meta["expected_tokens"] == pytest.approx(tree.expected_tokens(reliable_table(prof)))
