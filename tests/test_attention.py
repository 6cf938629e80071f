"""Tree attention through the public transformers API: one tree forward equals running every
root-to-node chain alone, for Llama, Qwen2 and GPT-2 with sdpa and eager attention; cache
compaction keeps exactly the accepted path; level-by-level drafting sees the right context."""

import pytest
import torch

from treeopt.decode.attention import (
    CacheError,
    check_cache,
    forward_tree,
    keep_tokens,
    new_cache,
    run_model,
    tree_attention_mask,
)
from treeopt.drafters.grow import draft_tree
from treeopt.testing import tiny_causal_lm
from treeopt.tree import Tree

TREE = Tree.from_parents([-1, 0, 0, 0, 1, 1, 2, 4, 4, 7])


def model(arch, impl):
    m = tiny_causal_lm(arch, seed=3)
    m.set_attn_implementation(impl)
    return m


def chain_logits(m, ids: list[int]) -> torch.Tensor:
    """(V,) last-position logits of a plain forward without cache."""
    return m(input_ids=torch.tensor([ids])).logits[0, -1]


def test_mask_values_and_shape():
    tree_mask = torch.tensor([[True, False], [True, True]])
    mask = tree_attention_mask(tree_mask, 3, torch.float16)
    assert mask.shape == (1, 1, 2, 5) and mask.dtype == torch.float16
    lo = torch.finfo(torch.float16).min
    assert mask[0, 0].tolist() == [[0, 0, 0, 0, lo], [0, 0, 0, 0, 0]]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_tree_logits_equal_chain_logits(arch, impl):
    m = model(arch, impl)
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(2, 96, (7,), generator=g).tolist()
    tokens = torch.randint(2, 96, (TREE.size,), generator=g)
    tokens[0] = prefix[-1]
    buf = TREE.buffers()
    with torch.inference_mode():
        cache = new_cache(m)
        run_model(m, torch.tensor([prefix[:-1]]), cache)
        root_pos = len(prefix) - 1
        logits = forward_tree(m, tokens[None], (buf.depth + root_pos)[None], buf.mask, cache)[0]
        assert cache.get_seq_length() == root_pos + TREE.size
        for v in range(TREE.size):
            ref = chain_logits(m, prefix[:-1] + tokens[list(TREE.path_to(v))].tolist())
            err = (logits[v] - ref).abs().max().item()
            assert err <= 1e-4, (v, err)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_compacted_cache_equals_path_cache(arch):
    m = model(arch, "sdpa")
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(2, 96, (5,), generator=g)
    tokens = torch.randint(2, 96, (TREE.size,), generator=g)
    buf = TREE.buffers()
    path = list(TREE.path_to(8))
    with torch.inference_mode():
        cache = new_cache(m)
        run_model(m, prefix[None], cache)
        forward_tree(m, tokens[None], (buf.depth + 5)[None], buf.mask, cache)
        keep_tokens(cache, 5, torch.tensor(path))
        ref = new_cache(m)
        run_model(m, torch.cat([prefix, tokens[path]])[None], ref)
    assert cache.get_seq_length() == 5 + len(path)
    for a, b in zip(cache.layers, ref.layers):
        assert torch.allclose(a.keys, b.keys, atol=1e-5)
        assert torch.allclose(a.values, b.values, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_level_by_level_drafting_matches_chains(arch):
    """draft_tree with a model as its own draft: every node's children are that model's top-k
    after the root-to-node chain, so level attention over the cached earlier levels is right."""
    m = model(arch, "eager")
    prompt = [5, 17, 42, 9]
    with torch.inference_mode():
        cache = new_cache(m)
        run_model(m, torch.tensor([prompt[:2]]), cache)
        drafted = draft_tree(m, cache, torch.tensor([prompt[2:]]), len(prompt) - 1, TREE)
        toks = drafted.tokens.tolist()
        assert toks[0] == prompt[-1] and drafted.forwards == TREE.depth
        for v in range(TREE.size):
            kids = TREE.children[v]
            if kids:
                ref = chain_logits(m, prompt[:-1] + [toks[u] for u in TREE.path_to(v)])
                assert [toks[c] for c in kids] == ref.topk(len(kids)).indices.tolist()


def test_sliding_window_cache_is_refused():
    import transformers as tf

    config = tf.MistralConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                              num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                              sliding_window=4)
    m = tf.MistralForCausalLM(config).eval()
    cache = new_cache(m)
    with torch.inference_mode():
        run_model(m, torch.tensor([[1, 2, 3]]), cache)
    with pytest.raises(CacheError):
        check_cache(cache)
