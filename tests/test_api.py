"""The text API (``treeopt.api.generate``) and ``treeopt generate``, on tiny random
models with a word-level tokenizer built offline."""

from __future__ import annotations

import io
import json
import sys

import pytest
import torch
from helpers import tiny_tokenizer, without_notices

from treeopt.api import GenerateError, Pair, encode_prompt, generate
from treeopt.cli import main as cli_main
from treeopt.decode.sampling import Sampling
from treeopt.models import kernel_choice
from treeopt.models.dtype import SIZES
from treeopt.models.loading import ModelError, early_exit_draft, eos_ids
from treeopt.shapes import chain, resolve_tree
from treeopt.testing import tiny_causal_lm
from treeopt.tree import Tree

TEMPLATE = ("{% for m in messages %}<s> {{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}w3{% endif %}")
KARY = Tree((-1, 0, 0, 1, 1, 2, 2))  # two children per node, depth 2
MIXED = Tree((-1, 0, 0, 0, 1, 1, 2, 4))


@pytest.fixture(autouse=True)
def _offline(tmp_path, monkeypatch):
    monkeypatch.setenv("TREEOPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def target():
    return tiny_causal_lm("llama", num_layers=3, seed=7)


@pytest.fixture
def tok():
    return tiny_tokenizer()


def greedy_reference(model, ids: torch.Tensor, n: int, eos: set[int]) -> list[int]:
    """Plain greedy decoding by full recomputation: the definition the engine must match."""
    ids = ids.clone()
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            t = int(model(ids).logits[0, -1].argmax())
            out.append(t)
            ids = torch.cat([ids, torch.tensor([[t]])], dim=1)
            if t in eos:
                break
    return out


# ---------------------------------------------------------------- prompts and trees
def test_encode_prompt_with_and_without_template(tok):
    raw = encode_prompt(tok, "w5 w6 w7")
    assert raw.tolist() == [[5, 6, 7]] and raw.dtype == torch.int64
    tok.chat_template = TEMPLATE
    assert encode_prompt(tok, "w5 w6").tolist() == [[0, 5, 6, 3]]
    assert encode_prompt(tok, "w5 w6", chat_template=False).tolist() == [[5, 6]]
    messages = [{"role": "user", "content": "w9"}, {"role": "assistant", "content": "w8"}]
    assert encode_prompt(tok, messages).tolist() == [[0, 9, 0, 8, 3]]
    with pytest.raises(GenerateError):
        encode_prompt(tok, "", chat_template=False)


def test_resolve_tree(tmp_path):
    assert resolve_tree(None) is None
    assert resolve_tree(KARY) is KARY
    assert resolve_tree("chain:3") == Tree((-1, 0, 1)) == chain(draft_tokens=2)
    from treeopt.growmap import save_growmap

    path = tmp_path / "g.json"
    save_growmap(MIXED, path)
    assert resolve_tree(str(path)) == MIXED


def test_eos_ids_merges_tokenizer_and_model(tok, target):
    target.generation_config.eos_token_id = [1, 9]
    assert eos_ids(tok, target) == [1, 9]


# ---------------------------------------------------------------- greedy exactness
@pytest.mark.parametrize("tree", [None, chain(draft_tokens=3), KARY, MIXED])
@pytest.mark.parametrize("draft_kind", ["early-exit", "separate"])
def test_greedy_text_equals_target_greedy(target, tok, tree, draft_kind):
    draft = early_exit_draft(target, 1) if draft_kind == "early-exit" else \
        tiny_causal_lm("llama", num_layers=1, seed=11)
    ids = encode_prompt(tok, "w5 w17 w40 w6")
    expect = greedy_reference(target, ids, 24, {1})
    pieces: list[str] = []
    text, stats = generate("w5 w17 w40 w6", target=target, draft=draft, tokenizer=tok, tree=tree,
                           max_new_tokens=24, on_text=pieces.append)
    assert text == tok.decode(expect, skip_special_tokens=True)
    assert "".join(pieces) == text
    assert stats.generated_tokens == len(expect)
    if tree is not None and tree.size > 1:
        assert stats.drafted_tokens > 0


def test_default_tree_is_a_chain_and_ar_without_draft(target, tok):
    draft = early_exit_draft(target, 2)
    _, spec = generate("w5 w6", target=target, draft=draft, tokenizer=tok, max_new_tokens=12)
    _, chained = generate("w5 w6", target=target, draft=draft, tokenizer=tok, max_new_tokens=12,
                          tree=chain(draft_tokens=4))
    assert spec.drafted_tokens > 0 and spec.steps == chained.steps
    assert spec.drafted_tokens == chained.drafted_tokens
    assert all(set(s.ranks) <= {1} for s in spec.steps)
    _, ar = generate("w5 w6", target=target, tokenizer=tok, max_new_tokens=12)
    assert ar.drafted_tokens == 0 and ar.tokens_per_step == 1.0


def test_chat_template_is_applied(target, tok):
    tok.chat_template = TEMPLATE
    expect = greedy_reference(target, torch.tensor([[0, 5, 6, 3]]), 10, {1})
    text, _ = generate("w5 w6", target=target, draft=early_exit_draft(target, 1), tokenizer=tok,
                       tree=KARY, max_new_tokens=10)
    assert text == tok.decode(expect, skip_special_tokens=True)
    plain = greedy_reference(target, torch.tensor([[5, 6]]), 10, {1})
    text, _ = generate("w5 w6", target=target, tokenizer=tok, max_new_tokens=10,
                       chat_template=False)
    assert text == tok.decode(plain, skip_special_tokens=True)


def test_stops_at_the_tokenizers_eos(target):
    ids = torch.tensor([[5, 17, 40]])
    free = greedy_reference(target, ids, 16, set())
    stop = next(i for i, t in enumerate(free) if t > 2 and t not in free[:i] and i >= 2)
    tok = tiny_tokenizer()
    tok.eos_token = f"w{free[stop]}"
    target.generation_config.eos_token_id = None
    text, stats = generate("w5 w17 w40", target=target, draft=early_exit_draft(target, 1),
                           tokenizer=tok, tree=KARY, max_new_tokens=16)
    assert stats.generated_tokens == stop + 1
    assert text == tok.decode(free[:stop + 1], skip_special_tokens=True)


def test_specs_and_pairs(tmp_path, target, tok):
    folder = tmp_path / "m"
    target.save_pretrained(folder)
    tok.save_pretrained(folder)
    expect = greedy_reference(target, torch.tensor([[5, 6]]), 8, {1})
    text, _ = generate("w5 w6", target=str(folder), draft="early-exit:2", growmap="kary:2x2",
                       max_new_tokens=8)
    assert text == tok.decode(expect, skip_special_tokens=True)
    pair = Pair(target, early_exit_draft(target, 1), tok)
    assert generate("w5 w6", pair=pair, tree=MIXED, max_new_tokens=8)[0] == text
    assert generate("w5 w6", target=target, draft="early-exit:1", tokenizer=tok,
                    max_new_tokens=8)[0] == text


def test_seeded_sampling_is_reproducible(target, tok):
    kw = dict(target=target, draft=early_exit_draft(target, 1), tokenizer=tok, tree=KARY,
              max_new_tokens=16, sampling=Sampling(temperature=0.9, top_p=0.95, seed=3))
    a, b = generate("w5 w6", **kw)[0], generate("w5 w6", **kw)[0]
    assert a == b


def test_argument_errors(target, tok):
    with pytest.raises(GenerateError, match="tokenizer"):
        generate("w5", target=target)
    with pytest.raises(GenerateError, match="pair"):
        generate("w5", pair=Pair(target, None, tok), target=target)
    with pytest.raises(GenerateError):
        generate("w5")
    with pytest.raises(GenerateError, match="tree"):
        generate("w5", target=target, tokenizer=tok, tree=KARY, growmap="chain:3")
    with pytest.raises(ModelError, match="vocabularies differ"):
        generate("w5", target=target, draft=tiny_causal_lm(vocab_size=64), tokenizer=tok)
    with pytest.raises(GenerateError, match="max_new_tokens"):
        generate("w5", target=target, tokenizer=tok, max_new_tokens=0)


# ---------------------------------------------------------------- CLI
@pytest.fixture
def folder(tmp_path, target, tok):
    path = tmp_path / "tiny"
    target.save_pretrained(path)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(path)
    return path


def test_cli_generate_streams_text_and_stats(folder, target, tok, capsys):
    rc = cli_main(["generate", "--target", str(folder), "--draft", "early-exit:1",
                   "--growmap", "kary:2x2", "--prompt", "w5 w6", "--max-new-tokens", "10",
                   "--device", "cpu"])
    out, err = capsys.readouterr()
    assert rc == 0
    expect = greedy_reference(target, torch.tensor([[0, 5, 6, 3]]), 10, {1})
    assert out == tok.decode(expect, skip_special_tokens=True) + "\n"
    for key in ("tokens per step", "acceptance rate", "tokens/s", "verify"):
        assert key in err


def test_cli_generate_ar_json_stats_and_prompt_file(folder, target, tok, tmp_path, capsys):
    prompt = tmp_path / "p.txt"
    prompt.write_text("w5 w6")
    rc = cli_main(["generate", "--target", str(folder), "--draft", "none", "--prompt-file",
                   str(prompt), "--max-new-tokens", "6", "--no-chat-template", "--stats-json"])
    out, err = capsys.readouterr()
    assert rc == 0
    expect = greedy_reference(target, torch.tensor([[5, 6]]), 6, {1})
    assert out == tok.decode(expect, skip_special_tokens=True) + "\n"
    stats = json.loads(err.strip().splitlines()[-1])
    assert stats["generated_tokens"] == len(expect) and stats["tokens_per_step"] == 1.0
    assert stats["drafted_tokens"] == 0


def test_cli_generate_reads_stdin(folder, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("w5 w6"))
    assert cli_main(["generate", "--target", str(folder), "--max-new-tokens", "4",
                     "--draft", "early-exit:2"]) == 0
    assert capsys.readouterr().out.strip()


def test_cli_generate_errors_are_one_line(folder, tmp_path, capsys):
    cases = [
        ["--prompt-file", str(tmp_path / "missing.txt")],
        ["--prompt", "w5", "--growmap", str(tmp_path / "none.pt")],
        ["--prompt", "w5", "--draft", "early-exit:9"],
        ["--prompt", "w5", "--max-new-tokens", "0"],
        ["--prompt", "   "],
        ["--prompt", "w5", "--draft", "early-exit:1", "--growmap", "kary:2x2", "--rule",
         "block", "--temperature", "1"],  # block verifies chains only
    ]
    for extra in cases:
        rc = cli_main(["generate", "--target", str(folder)] + extra)
        err = without_notices(capsys.readouterr().err)
        assert rc == 2, extra
        assert len(err.strip().splitlines()) == 1 and "error" in err, (extra, err)


def test_cli_remeasure_replaces_the_cached_curve_auto_prices_with(folder, tmp_path,
                                                                  monkeypatch, capsys):
    monkeypatch.setenv("TREEOPT_CACHE", str(tmp_path / "cache"))
    # --remeasure re-times the kernel choice too; fixed timings keep it (and with it the
    # curve's cache file) the same
    monkeypatch.setattr(kernel_choice, "time_kernels",
                        lambda model: ({n: 1.0 for n in kernel_choice.ROWS},) * 2)
    args = ["generate", "--target", str(folder), "--prompt", "w5 w6", "--max-new-tokens", "4",
            "--device", "cpu", "--dtype", "float32"]
    assert cli_main(args) == 0  # the default drafter, auto, times and caches the curve
    (path,) = [p for p in (tmp_path / "cache" / "latency").glob("*.json")  # the short context's
               if "context" not in json.loads(p.read_text())["identity"]]
    data = json.loads(path.read_text())
    data["ms"] = {"1": 298000.0, "2": 90000.0}  # cached while the machine was busy
    path.write_text(json.dumps(data))
    assert cli_main(args) == 0
    assert json.loads(path.read_text())["ms"]["1"] == 298000.0  # read, not re-timed
    assert cli_main(args + ["--remeasure"]) == 0
    again = json.loads(path.read_text())["ms"]
    assert again["1"] < 1000.0 and set(again) == {str(n) for n in SIZES}
    capsys.readouterr()
