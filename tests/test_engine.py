"""Greedy tree decoding is token-exact with the target's own greedy decoding, for any tree
shape, architecture and attention implementation; limits, EOS, streaming and statistics."""

import copy
from functools import lru_cache

import pytest
import torch

from treeopt.decode import DecodeError
from treeopt.decode.attention import (
    GROUPED_SDPA,
    CacheError,
    group_query_heads,
    new_cache,
    run_model,
)
from treeopt.testing import decode, tiny_causal_lm
from treeopt.tree import Tree

AR = Tree.from_parents([-1])
CHAIN = Tree.from_parents([-1, 0, 1, 2, 3])
BUSHY = Tree.from_parents([-1, 0, 0, 0, 1, 1, 2, 4, 4, 7])
WIDE = Tree.from_parents([-1, 0, 0, 0, 0, 1, 1, 2, 3, 5, 6, 9])
TREES = {"ar": AR, "chain": CHAIN, "bushy": BUSHY, "wide": WIDE}


def sharpen(model, factor: float = 20.0):
    """Scale the final norm so the random model has peaked, context-dependent predictions
    (wide argmax margins, and a perturbed copy agrees with it often)."""
    inner = model.transformer.ln_f if hasattr(model, "transformer") else model.model.norm
    with torch.no_grad():
        inner.weight.mul_(factor)
    return model


@lru_cache(maxsize=None)
def models(arch: str, impl: str = "sdpa", max_positions: int = 512):
    """(target, perturbed-copy draft, unrelated draft) for one architecture."""
    target = sharpen(tiny_causal_lm(arch, seed=0, max_positions=max_positions))
    close = copy.deepcopy(target)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in close.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.003)
    other = sharpen(tiny_causal_lm(arch, seed=1, num_layers=1, max_positions=max_positions))
    for m in (target, close, other):
        if impl == GROUPED_SDPA:
            group_query_heads(m)
        else:
            m.set_attn_implementation(impl)
    return target, close, other


def reference(model, prompt: list[int], n: int) -> list[int]:
    """The target's own greedy decoding: full forward without cache for every token."""
    seq, out = list(prompt), []
    with torch.inference_mode():
        for _ in range(n):
            out.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
            seq.append(out[-1])
    return out


PROMPTS = [[5], [3, 14, 15, 92, 65], list(range(10, 27))]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("impl", ["sdpa", "eager", GROUPED_SDPA])
def test_greedy_tree_decoding_is_exact(arch, impl):
    target, close, other = models(arch, impl)
    for prompt in PROMPTS:
        ref = reference(target, prompt, 24)
        ids = torch.tensor([prompt])
        for name, tree in TREES.items():
            for draft in (close, other):
                got = decode(target, draft, tree, ids, max_new_tokens=24)
                assert got.tokens == ref, (arch, impl, prompt, name)


def test_close_draft_is_accepted_often():
    target, close, _ = models("llama")
    got = decode(target, close, BUSHY, torch.tensor([PROMPTS[1]]), max_new_tokens=40)
    assert got.stats.acceptance_rate > 0.2 and got.stats.tokens_per_step > 2


def test_long_generation_across_many_compactions():
    target, close, other = models("llama")
    prompt = PROMPTS[1]
    ref = reference(target, prompt, 300)
    for draft, tree in [(close, WIDE), (other, BUSHY), (close, CHAIN)]:
        got = decode(target, draft, tree, torch.tensor([prompt]), max_new_tokens=300)
        assert got.tokens == ref
        assert len(got.stats.steps) == got.stats.target_forwards > 50


def test_draft_of_another_architecture():
    target = models("qwen2")[0]
    draft = models("gpt2")[2]
    ref = reference(target, PROMPTS[1], 30)
    got = decode(target, draft, BUSHY, torch.tensor([PROMPTS[1]]), max_new_tokens=30)
    assert got.tokens == ref


def test_matches_transformers_generate():
    target, close, _ = models("llama")
    ids = torch.tensor([PROMPTS[2]])
    hf = target.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=20, min_new_tokens=20, pad_token_id=1)[0, ids.shape[1]:]
    assert decode(target, close, WIDE, ids, max_new_tokens=20).tokens == hf.tolist()


def test_self_draft_accepts_whole_top1_path_every_step():
    target = models("llama")[0]
    got = decode(target, target, CHAIN, torch.tensor([PROMPTS[1]]), max_new_tokens=21)
    s = got.stats
    assert len(got.tokens) == s.generated_tokens == 21
    assert [(st.accepted, st.ranks, st.tokens) for st in s.steps] == [(4, [1, 1, 1, 1], 5)] * 4
    assert s.target_forwards == 4 and s.draft_forwards == 16
    assert s.drafted_tokens == 16 and s.accepted_tokens == 16
    assert s.tokens_per_step == 5.0 and s.acceptance_rate == 1.0
    got = decode(target, target, BUSHY, torch.tensor([PROMPTS[1]]), max_new_tokens=11)
    assert [(st.accepted, st.ranks) for st in got.stats.steps] == [(4, [1, 1, 1, 1])] * 2
    assert got.stats.drafted_tokens == 18 and got.stats.acceptance_rate == 8 / 18


def test_autoregressive_stats_and_timings():
    target = models("llama")[0]
    got = decode(target, None, BUSHY, torch.tensor([PROMPTS[0]]), max_new_tokens=10)
    s = got.stats
    assert s.target_forwards == 9 and s.tokens_per_step == 1.0 and s.drafted_tokens == 0
    assert s.acceptance_rate == 0.0 and s.draft_forwards == 0 and s.stop_reason == "max_new_tokens"
    assert s.total_s >= s.prefill_s + s.draft_s + s.verify_s - 1e-9 and s.other_s >= 0
    d = s.to_dict()
    assert d["tokens_per_step"] == 1.0 and len(d["steps"]) == 9


def test_max_new_tokens_is_exact():
    target = models("llama")[0]
    ref = reference(target, PROMPTS[1], 12)
    for n in range(0, 13):
        got = decode(target, target, WIDE, torch.tensor([PROMPTS[1]]), max_new_tokens=n)
        assert got.tokens == ref[:n]
        assert got.stats.generated_tokens == n


def test_eos_stops_inside_an_accepted_path():
    target = models("llama")[0]
    ref = reference(target, PROMPTS[1], 30)
    k = next(i for i in range(5, 30) if ref[i] not in ref[:i])
    got = decode(target, target, CHAIN, torch.tensor([PROMPTS[1]]), max_new_tokens=30,
                   eos_token_id=ref[k])
    assert got.tokens == ref[:k + 1] and got.stats.stop_reason == "eos"
    got = decode(target, None, None, torch.tensor([PROMPTS[1]]), max_new_tokens=30,
                   eos_token_id=[999, ref[0]])
    assert got.tokens == ref[:1]


def test_streaming_callback_receives_every_token_once():
    target, close, _ = models("llama")
    chunks = []
    got = decode(target, close, BUSHY, torch.tensor([PROMPTS[1]]), max_new_tokens=25,
                   on_tokens=chunks.append)
    assert sum(chunks, []) == got.tokens
    assert [len(c) for c in chunks] == [1] + [s.tokens for s in got.stats.steps]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_context_window_shrinks_the_tree_then_stops(arch):
    target, close, _ = models(arch, "sdpa", 40)
    prompt = list(range(10, 20))
    ref = reference(target, prompt, 31)
    got = decode(target, close, WIDE, torch.tensor([prompt]), max_new_tokens=100)
    assert got.tokens == ref and got.stats.stop_reason == "context"
    with pytest.raises(DecodeError):
        decode(target, close, WIDE, torch.tensor([list(range(2, 43))]), max_new_tokens=5)


def test_bad_inputs_raise_clear_errors():
    target = models("llama")[0]
    small = tiny_causal_lm("llama", vocab_size=50)
    with pytest.raises(DecodeError, match="vocabulary"):
        decode(target, small, CHAIN, torch.tensor([[1, 2]]), max_new_tokens=3)
    with pytest.raises(DecodeError, match="shape"):
        decode(target, None, None, torch.tensor([1, 2]), max_new_tokens=3)
    with pytest.raises(ValueError, match="temperature"):
        decode(target, None, None, torch.tensor([[1, 2]]), max_new_tokens=3, temperature=-1)


def test_sliding_window_models_decode_autoregressively_only():
    import transformers as tf

    config = tf.MistralConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              sliding_window=6)
    torch.manual_seed(0)
    model = sharpen(tf.MistralForCausalLM(config).eval())
    prompt = PROMPTS[2]
    got = decode(model, None, None, torch.tensor([prompt]), max_new_tokens=12)
    assert got.tokens == reference(model, prompt, 12)
    with pytest.raises(CacheError):
        decode(model, model, CHAIN, torch.tensor([prompt]), max_new_tokens=12)


def assert_cache_holds(model, cache, ids: list[int]):
    """The cache's keys/values equal those of a fresh forward over ``ids``."""
    fresh = new_cache(model)
    with torch.inference_mode():
        run_model(model, torch.tensor([ids]), fresh)
    assert cache.get_seq_length() == len(ids)
    for a, b in zip(cache.layers, fresh.layers):
        assert torch.allclose(a.keys, b.keys, atol=1e-4)
        assert torch.allclose(a.values, b.values, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_caches_hold_exactly_the_committed_tokens(arch, temperature, monkeypatch):
    """Before every draft pass the draft cache holds the committed tokens not in ``pending``;
    before every verification the target cache holds all committed tokens but the root."""
    import treeopt.decode.engine as engine
    import treeopt.drafters.model as model_drafter

    target, close, _ = models(arch)
    prompt = PROMPTS[1]
    streamed: list[int] = []
    checks = {"draft": 0, "verify": 0}
    real_draft, real_verify = model_drafter.draft_tree, engine.verify_tree

    def draft_tree(draft, cache, pending, root_pos, tree, **kw):
        committed = prompt + streamed
        p = pending.shape[1]
        assert root_pos == len(committed) - 1 and pending[0].tolist() == committed[-p:]
        assert_cache_holds(draft, cache, committed[:-p])
        checks["draft"] += 1
        return real_draft(draft, cache, pending, root_pos, tree, **kw)

    def verify_tree(model, cache, proposal, root_pos):
        assert_cache_holds(model, cache, (prompt + streamed)[:-1])
        checks["verify"] += 1
        return real_verify(model, cache, proposal, root_pos)

    monkeypatch.setattr(model_drafter, "draft_tree", draft_tree)
    monkeypatch.setattr(engine, "verify_tree", verify_tree)
    got = decode(target, close, WIDE, torch.tensor([prompt]), max_new_tokens=40,
                 temperature=temperature, seed=0, on_tokens=streamed.extend)
    assert got.tokens == streamed and checks["verify"] > 5 and checks["draft"] > 5
    assert any(s.accepted > 0 for s in got.stats.steps)


def _nan_after(model, calls: int, row: int | None = None, column: int = 7):
    """Forward hook: from the ``calls``-th forward on, one logit of every row (or of row
    ``row``) is NaN; the rest stay finite, so only a check of the chosen values finds it."""
    seen = [0]

    def hook(module, args, output):
        seen[0] += 1
        if seen[0] > calls:
            logits = output.logits.clone()
            logits[0, slice(None) if row is None else row, column] = float("nan")
            output.logits = logits
        return output

    return model.register_forward_hook(hook)


@pytest.mark.parametrize("tree", ["ar", "bushy"])
def test_nan_logits_in_greedy_decoding_raise(tree):
    """argmax of a row holding a NaN is the NaN's index: greedy decoding would emit it as a
    token. The prefill and every verification step refuse NaN logits with one line."""
    target = copy.deepcopy(models("llama")[0])
    close = models("llama")[1]
    ids = torch.tensor([PROMPTS[1]])
    handle = _nan_after(target, 0)
    with pytest.raises(DecodeError) as exc:
        decode(target, close, TREES[tree], ids, max_new_tokens=8)
    handle.remove()
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("the target produced NaN logits at the last "
                                              "prompt position (4, prefill)")
    assert msg.endswith("; use float32 or check the model")
    # Finite prefill, NaN in one row of the third verification forward.
    handle = _nan_after(target, 3, row=-1)
    with pytest.raises(DecodeError, match=r"NaN logits at verification step 3 \(tree rooted "
                                          r"at position \d+\); use float32"):
        decode(target, close, TREES[tree], ids, max_new_tokens=30)
    handle.remove()
    assert decode(target, close, TREES[tree], ids, max_new_tokens=8).tokens == \
        reference(target, PROMPTS[1], 8)


def test_greedy_choice_finds_a_nan_anywhere_in_a_row():
    from treeopt.decode.verify import greedy_choice

    logits = torch.randn(5, 1000)
    assert greedy_choice(logits, "x").tolist() == logits.argmax(-1).tolist()
    for col in (0, 499, 999):
        bad = logits.clone()
        bad[3, col] = float("nan")
        with pytest.raises(DecodeError, match="NaN logits at here;"):
            greedy_choice(bad, "here")
        with pytest.raises(DecodeError):
            greedy_choice(bad.half(), "here")
