"""Cheaper drafts stay lossless: int8 drafts, reduced-vocabulary draft heads and both keep
greedy output token-exact with plain decoding (tiny Llama and Qwen2, chains and trees, built
directly and through drafter specs), sampling keeps the target's distribution (chi-square),
the restricted head's logits are exact, the target is never touched, and bad options fail in
one line."""

import argparse
import json
from functools import lru_cache

import pytest
import torch
from helpers import tiny_tokenizer
from lossless import exact_joint, pair_pvalues, peaked_lm

from treeopt.cli import UserError, main
from treeopt.cli.args import draft_spec_with_variant
from treeopt.decode.drafter import DrafterError, build_drafter
from treeopt.decode.engine import generate
from treeopt.decode.sampling import Sampling
from treeopt.decode.verify import DecodeError
from treeopt.drafters.model import ModelDrafter
from treeopt.errors import TreeoptError
from treeopt.models import variants as cd
from treeopt.models.cpu_kernels import PackedLinear, pack_linear_layers
from treeopt.models.loading import ModelError, check_vocab, lm_head_rows
from treeopt.models.variants import (
    DraftVariant,
    RestrictedHead,
    add_variant,
    frequent_tokens,
    is_quantized,
    proposable_tokens,
    quantize_int8,
    restrict_vocab,
    split_model_options,
)
from treeopt.testing import tiny_causal_lm
from treeopt.tree import Tree

VOCAB = 64
PROMPT = torch.tensor([[5, 9, 3, 17, 22, 8]])
CHAIN = Tree.from_parents([-1, 0, 1, 2, 3])                    # chain of 4 drafted tokens
TREE = Tree.from_parents([-1, 0, 0, 0, 1, 1, 2, 4, 4, 7])      # widths 3, 2, 2, 1


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TREEOPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def target_model(arch: str, packed: bool = False, **kw):
    m = tiny_causal_lm(arch, vocab_size=VOCAB, hidden_size=32, num_layers=3, seed=3, **kw)
    m.requires_grad_(False)
    if packed:
        assert pack_linear_layers(m) > 0
    return m


def plain(target, n: int = 24) -> list[int]:
    return generate(target, None, PROMPT, max_new_tokens=n).tokens


def snapshot(model):
    """Everything that must stay as it was: tensors, module types and attributes."""
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(n, type(m), sorted(vars(m))) for n, m in model.named_modules()])


def assert_unchanged(model, snap, logits):
    state, modules = snap
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)
    assert [(n, type(m), sorted(vars(m))) for n, m in model.named_modules()] == modules
    with torch.inference_mode():
        assert torch.equal(model(input_ids=PROMPT).logits, logits)


class Recording(ModelDrafter):
    """A ModelDrafter that keeps every token it proposes."""

    proposed: list[int]

    def propose(self, committed, max_depth, sampling, generator=None):
        proposal = super().propose(committed, max_depth, sampling, generator)
        self.proposed = getattr(self, "proposed", []) + proposal.tokens[1:].tolist()
        return proposal


# ---------------------------------------------------------------- greedy exactness
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("packed", [False, True])
def test_int8_and_reduced_vocab_drafts_equal_plain_decoding(arch, packed):
    target = target_model(arch, packed)
    want = plain(target)
    # A subset holding most of what the target generates, so drafts get accepted.
    subset = sorted(set(want[::2]) | set(range(0, VOCAB, 3)))
    variants = {"int8": quantize_int8(target),
                "vocab": restrict_vocab(target, subset),
                "both": quantize_int8(restrict_vocab(target, subset))}
    assert is_quantized(variants["int8"]) and not is_quantized(target)
    for name, draft in variants.items():
        for shape in (CHAIN, TREE):
            drafter = Recording(draft, shape)
            got = generate(target, drafter, PROMPT, max_new_tokens=24)
            assert got.tokens == want, (name, shape.size)
            assert got.stats.accepted_tokens > 0, (name, shape.size)
            if name != "int8":
                assert set(drafter.proposed) <= set(subset), name


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_spec_drafters_equal_plain_decoding(arch, tmp_path):
    target = target_model(arch, packed=True)
    snap = snapshot(target)
    with torch.inference_mode():
        logits = target(input_ids=PROMPT).logits
    want = plain(target)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(f"w{t}" for t in want + want) + "\nw40 w41 w42\n")
    folder = tmp_path / "draft,v1"  # a comma in the model path
    draft = tiny_causal_lm(arch, vocab_size=VOCAB, hidden_size=32, num_layers=1, seed=4)
    draft.save_pretrained(folder)
    tok = tiny_tokenizer(VOCAB)
    specs = ["early-exit:2,quant=int8", f"early-exit:2,vocab=30,vocab_corpus={corpus}",
             f"early-exit:1,quant=int8,vocab=30,vocab_corpus={corpus}",
             f"model:{folder},quant=int8", f"{folder},vocab=24,vocab_corpus={corpus}"]
    for spec in specs:
        for shape in (CHAIN, TREE):
            drafter = build_drafter(spec, target=target, tokenizer=tok, tree=shape)
            got = generate(target, drafter, PROMPT, max_new_tokens=24)
            assert got.tokens == want, (spec, shape.size)
            if "early-exit" in spec:
                assert got.stats.accepted_tokens > 0, spec
    early = build_drafter("early-exit:2,quant=int8,vocab=30", target=target, tokenizer=tok)
    assert is_quantized(early.model) and proposable_tokens(early.model) == 30
    assert_unchanged(target, snap, logits)


# ---------------------------------------------------------------- the restricted head
@pytest.mark.parametrize("packed", [False, True])
def test_restricted_head_logits_and_tied_embedding(packed):
    m = tiny_causal_lm("llama", vocab_size=VOCAB, hidden_size=32, num_layers=2, seed=5)
    m.config.tie_word_embeddings = True
    m.lm_head.weight = m.model.embed_tokens.weight  # tied, as SmolLM2
    if packed:
        pack_linear_layers(m)
    emb = m.model.embed_tokens.weight.clone()
    subset = [63, 0, 7, 7, 12, 40]
    r = restrict_vocab(m, subset)
    head = r.get_output_embeddings()
    assert isinstance(head, RestrictedHead) and head.proposable == 5
    assert isinstance(head.proj, PackedLinear) == packed
    assert m.get_output_embeddings() is not head  # the original model keeps its head
    assert r.model.embed_tokens.weight is m.model.embed_tokens.weight
    assert torch.equal(m.model.embed_tokens.weight, emb)
    assert lm_head_rows(r) == VOCAB
    with torch.inference_mode():
        full = m(input_ids=PROMPT).logits
        got = r(input_ids=PROMPT).logits
    inside = torch.tensor(sorted(set(subset)))
    outside = torch.tensor([t for t in range(VOCAB) if t not in set(subset)])
    assert got.shape == full.shape
    assert torch.isneginf(got[..., outside]).all()
    torch.testing.assert_close(got[..., inside], full[..., inside], rtol=1e-5, atol=1e-5)
    with pytest.raises(DrafterError, match="already restricted"):
        restrict_vocab(r, [1, 2])
    with pytest.raises(DrafterError, match="before quantising"):
        restrict_vocab(quantize_int8(m), [1, 2])
    with pytest.raises(DrafterError, match="outside the draft's vocabulary"):
        restrict_vocab(m, [3, VOCAB])


def test_draft_too_narrow_for_the_tree_is_refused():
    target = target_model("llama")
    drafter = ModelDrafter(restrict_vocab(target, [4, 5]), TREE)  # TREE has width 3
    with pytest.raises(DecodeError, match="tree width 3 exceeds the draft's token subset"):
        generate(target, drafter, PROMPT, max_new_tokens=4)


# ---------------------------------------------------------------- sampling is lossless
V8, NEW = 8, 3
P8 = torch.tensor([[2, 3, 4]])
SUBSET = [0, 2, 3, 5, 6]


def small(seed: int):
    return peaked_lm(seed, V8)


@lru_cache(maxsize=None)
def exact(temperature: float) -> torch.Tensor:
    """(V8,) * NEW joint probability of the first NEW generated tokens, by enumeration."""
    return exact_joint(small(0), P8, NEW, temperature)


@pytest.mark.parametrize("rule,shape,quant", [("sequoia", Tree.from_parents([-1, 0, 0, 1]),
                                               False),
                                              ("specinfer", Tree.from_parents([-1, 0, 1]),
                                               True)])
def test_sampling_with_reduced_vocab_draft_is_lossless(rule, shape, quant):
    target = small(0)
    draft = restrict_vocab(small(1), SUBSET)
    if quant:
        draft = quantize_int8(draft)
    drafter = Recording(draft, shape)
    samples = torch.tensor([
        generate(target, drafter, P8, max_new_tokens=NEW,
                 sampling=Sampling(0.8, 0, 1.0, rule, seed)).tokens for seed in range(500)])
    assert set(drafter.proposed) <= set(SUBSET)
    outside = torch.tensor([t not in SUBSET for t in range(V8)])
    assert outside[samples].any()  # tokens the draft cannot propose are still generated
    assert min(pair_pvalues(samples, exact(0.8))) > 1e-3


# ---------------------------------------------------------------- int8 details
def test_check_vocab_and_drafter_check_on_a_quantised_head():
    target = target_model("llama", packed=True)
    q = quantize_int8(target)
    head = q.get_output_embeddings()
    assert callable(head.weight)  # the shape of the crash: weight is a method here
    assert lm_head_rows(q) == VOCAB
    check_vocab(target, q)
    ModelDrafter(q, TREE).check(target)
    other = quantize_int8(tiny_causal_lm("llama", vocab_size=VOCAB + 8, hidden_size=32))
    with pytest.raises(ModelError, match=f"{VOCAB + 8} vs {VOCAB}"):
        check_vocab(target, other)
    with pytest.raises(DecodeError, match="vocabulary"):
        ModelDrafter(other, TREE).check(target)


def test_packing_and_quantising_leave_each_other_alone():
    m = target_model("qwen2", packed=True)
    q = quantize_int8(m)
    assert not any(isinstance(x, (PackedLinear, torch.nn.Linear)) for x in q.modules())
    assert any(isinstance(x, PackedLinear) for x in m.modules())  # the original stays packed
    assert pack_linear_layers(q) == 0  # nothing float left to pack
    with torch.inference_mode():
        a, b = m(input_ids=PROMPT).logits, q(input_ids=PROMPT).logits
    assert (a - b).abs().max() < 0.05 * a.abs().max()  # int8 rounding, not garbage


def test_int8_drafts_serve_a_bfloat16_target_exactly(tmp_path):
    """A bfloat16 target with int8 drafts (an early exit of it, and a draft model loaded in
    float32 for quantisation): greedy output equals the target's own in bfloat16, the drafts
    accept, and the target keeps its bfloat16 weights, none shared with the draft's copies."""
    target = tiny_causal_lm("llama", vocab_size=VOCAB, hidden_size=32, num_layers=3, seed=3,
                            dtype=torch.bfloat16)
    target.requires_grad_(False)
    snap = snapshot(target)
    with torch.inference_mode():
        logits = target(input_ids=PROMPT).logits
    want = plain(target)
    folder = tmp_path / "draft"
    tiny_causal_lm("llama", vocab_size=VOCAB, hidden_size=32, num_layers=1,
                   seed=4).save_pretrained(folder)
    for spec in ("early-exit:2,quant=int8", f"model:{folder},quant=int8"):
        for shape in (CHAIN, TREE):
            drafter = build_drafter(spec, target=target, tree=shape)
            assert is_quantized(drafter.model)
            assert all(p.dtype == torch.float32 for p in drafter.model.parameters())
            got = generate(target, drafter, PROMPT, max_new_tokens=24)
            assert got.tokens == want, (spec, shape.size)
            if "early-exit" in spec:
                assert got.stats.accepted_tokens > 0
    assert all(p.dtype == torch.bfloat16 for p in target.parameters())
    assert_unchanged(target, snap, logits)
    q = quantize_int8(target)  # from float32 copies of the weights
    assert q.get_input_embeddings().weight.dtype == torch.float32


def test_early_exit_variants_never_touch_the_target():
    target = target_model("llama", packed=True)
    snap = snapshot(target)
    with torch.inference_mode():
        logits = target(input_ids=PROMPT).logits
    tok = tiny_tokenizer(VOCAB)
    drafter = build_drafter("early-exit:3,quant=int8,vocab=20", target=target, tokenizer=tok,
                            tree=TREE)
    generate(target, drafter, PROMPT, max_new_tokens=8)
    assert is_quantized(drafter.model)
    assert type(target.lm_head) is PackedLinear
    assert_unchanged(target, snap, logits)


# ---------------------------------------------------------------- frequencies
def test_frequent_tokens_counts_keeps_specials_and_caches(tmp_path, monkeypatch):
    tok = tiny_tokenizer(VOCAB)  # ids 0..2: <s>, </s>, <unk> (special)
    texts = ["w9 w9 w9 w7", "w7 w9 w5 w30", "w5 w7"]  # w9: 4, w7: 3, w5: 2, w30: 1
    got = frequent_tokens(tok, texts, 6, always=[40])
    assert got == [0, 1, 2, 40, 9, 7]
    assert frequent_tokens(tok, texts, 8) == [0, 1, 2, 9, 7, 5, 30, 3]  # unseen: id order
    assert frequent_tokens(tok, texts, 2) == [0, 1, 2]  # specials always kept
    files = sorted((tmp_path / "cache" / "token-maps").glob("*.json"))
    assert len(files) == 3
    assert json.loads(files[0].read_text())["format"] == "treeopt-frequent-tokens"

    def no_counting(*a, **k):
        raise AssertionError("counted again instead of reading the cache")

    monkeypatch.setattr(cd, "count_tokens", no_counting)
    assert frequent_tokens(tok, texts, 6, always=[40]) == got
    with pytest.raises(AssertionError, match="counted again"):
        frequent_tokens(tok, texts + ["w8"], 6, always=[40])  # another corpus, another key


# ---------------------------------------------------------------- spec options
def test_model_spec_options_split():
    assert split_model_options("smollm2") == ("smollm2", DraftVariant())
    assert split_model_options("org/name,quant=int8, vocab=100") == (
        "org/name", DraftVariant("int8", 100))
    assert split_model_options("a,b,vocab=3,vocab_corpus=c.txt") == (
        "a,b", DraftVariant(vocab=3, vocab_corpus="c.txt"))
    assert DraftVariant("INT8", 7).options() == "quant=int8,vocab=7"
    assert add_variant("early-exit:4", DraftVariant("int8")) == "early-exit:4,quant=int8"
    assert add_variant("smollm2", DraftVariant(vocab=5)) == "smollm2,vocab=5"
    assert add_variant("ngram", DraftVariant()) == "ngram"


@pytest.mark.parametrize("spec,message", [
    ("early-exit:2,quant=int4", "quant='int4' is not supported"),
    ("early-exit:2,vocab=0", "vocab=0 must be >= 1"),
    ("early-exit:2,vocab=ten", "vocab='ten' must be of type int"),
    ("early-exit:2,bits=8", "bad option 'bits=8'"),
    ("early-exit:2,quant=int8,quant=none", "quant= is given twice"),
    ("early-exit:2,vocab_corpus=x.txt", "needs vocab=N"),
    ("early-exit:x,quant=int8", "takes a layer count"),
    (f"early-exit:2,vocab={VOCAB + 1}", f"exceeds the draft's vocabulary of {VOCAB}"),
    ("model:somewhere/x,quant=int3", "quant='int3'"),
])
def test_bad_options_fail_in_one_line(spec, message):
    target = target_model("llama")
    with pytest.raises(DrafterError) as err:
        build_drafter(spec, target=target, tokenizer=tiny_tokenizer(VOCAB))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_vocab_needs_a_tokenizer_and_full_vocab_keeps_the_head():
    target = target_model("llama")
    with pytest.raises(DrafterError, match="needs the target's tokenizer"):
        build_drafter("early-exit:2,vocab=10", target=target, tokenizer=None)
    drafter = build_drafter(f"early-exit:2,vocab={VOCAB}", target=target, tokenizer=None)
    assert not isinstance(drafter.model.get_output_embeddings(), RestrictedHead)


# ---------------------------------------------------------------- command line
def test_cli_flags_append_options():
    def spec(draft, quant="none", vocab=None, corpus=None):
        return draft_spec_with_variant(argparse.Namespace(draft=draft, draft_quant=quant,
                                                          draft_vocab=vocab,
                                                          draft_vocab_corpus=corpus))

    assert spec("early-exit:4") == "early-exit:4"
    assert spec("early-exit:4", "int8") == "early-exit:4,quant=int8"
    assert spec("model:X", "int8", 100, "c.txt") == \
        "model:X,quant=int8,vocab=100,vocab_corpus=c.txt"
    for bad, message in ((("ngram", "int8"), "model-free drafter"),
                         (("none", "int8"), "not plain decoding"),
                         (("early-exit:4", "none", 0), "vocab=0"),
                         (("early-exit:4,quant=int8", "int8"), "given twice")):
        with pytest.raises(UserError, match=message) as err:
            spec(*bad)
        assert "\n" not in str(err.value) and isinstance(err.value, TreeoptError)


def test_generate_with_draft_flags_equals_plain(tmp_path, capsys):
    target = target_model("llama")
    folder = tmp_path / "target"
    target.save_pretrained(folder)
    tiny_tokenizer(VOCAB).save_pretrained(folder)
    common = ["generate", "--target", str(folder), "--prompt", "w5 w9 w3 w17", "--threads",
              "1", "--max-new-tokens", "12", "--no-chat-template", "--stats-json"]
    assert main(common + ["--draft", "none"]) == 0
    want = capsys.readouterr().out
    assert main(common + ["--draft", "early-exit:2", "--draft-quant", "int8", "--draft-vocab",
                          "32", "--growmap", "kary:2x2"]) == 0
    out, err = capsys.readouterr()
    assert out == want
    assert json.loads(err.strip().splitlines()[-1])["draft"] == \
        "early-exit:2,quant=int8,vocab=32"
    assert main(common + ["--draft", "ngram", "--draft-quant", "int8"]) == 2
    assert "model-free drafter" in capsys.readouterr().err


def test_bench_script_tiny(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "bench_cheap_drafts.py"
    spec = importlib.util.spec_from_file_location("bench_cheap_drafts", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    assert module.main(["--tiny", "--threads", "1"]) == 0
    assert torch.get_num_threads() == threads
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()}
    assert {"fp32", "int8", "vocab=64", "int8+vocab=64"} <= rows.keys()
    assert rows["vocab=64"][1] == "64" and rows["fp32"][1] == "256"
    assert all(0 <= float(rows[k][-1]) <= 1 for k in ("fp32", "int8", "vocab=64"))
