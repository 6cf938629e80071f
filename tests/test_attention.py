"""Tree attention through the public transformers API: one tree forward equals running every
root-to-node chain alone, for Llama, Qwen2 and GPT-2 with sdpa, eager and treeopt's grouped
sdpa attention; cache compaction keeps exactly the accepted path; level-by-level drafting
sees the right context; the grouped attention computes transformers' sdpa attention."""

import pytest
import torch

from treeopt.decode.attention import (
    GROUPED_SDPA,
    CacheError,
    attention_in_use,
    check_cache,
    forward_tree,
    group_query_heads,
    grouped_sdpa_attention,
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
    if impl == GROUPED_SDPA:
        assert group_query_heads(m) == (arch != "gpt2")  # GPT-2 has no grouped heads
    else:
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
@pytest.mark.parametrize("impl", ["sdpa", "eager", GROUPED_SDPA])
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
@pytest.mark.parametrize("impl", ["sdpa", GROUPED_SDPA])
def test_compacted_cache_equals_path_cache(arch, impl):
    m = model(arch, impl)
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


class _Layer(torch.nn.Module):
    def __init__(self, groups):
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


def _repeat_kv_reference(query, key, value, mask, groups, scale):
    """What transformers' sdpa computes for several query tokens: keys and values copied
    once per query head sharing them."""
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask,
                                                           scale=scale)
    return out.transpose(1, 2)


@pytest.mark.parametrize("groups,kv_heads,q,batch", [(3, 3, 5, 1), (6, 2, 16, 1), (2, 1, 2, 2),
                                                     (4, 2, 1, 1)])
@pytest.mark.parametrize("kind", ["additive", "bool"])
def test_grouped_attention_equals_repeated_keys(groups, kv_heads, q, batch, kind):
    """Head h = g * groups + r reads key/value head g (transformers' repeat_kv order): a
    mistake in the stacking order pairs queries with another head's keys and fails here."""
    g = torch.Generator().manual_seed(groups * 100 + q)
    past, dim = 11, 8
    heads = kv_heads * groups
    query = torch.randn(batch, heads, q, dim, generator=g)
    key = torch.randn(batch, kv_heads, past + q, dim, generator=g)
    value = torch.randn(batch, kv_heads, past + q, dim, generator=g)
    tree = torch.rand(q, q, generator=g) < 0.5
    tree = tree.tril() | torch.eye(q, dtype=torch.bool)
    mask = tree_attention_mask(tree, past, torch.float32)
    if kind == "bool":
        mask = mask == 0
    got, weights = grouped_sdpa_attention(_Layer(groups), query, key, value, mask, scaling=0.3)
    ref = _repeat_kv_reference(query, key, value, mask, groups, 0.3)
    assert weights is None and got.shape == (batch, q, heads, dim)
    assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()


def test_grouped_attention_is_used_only_where_there_are_grouped_heads():
    llama = tiny_causal_lm("llama", num_heads=4, num_kv_heads=2)
    assert attention_in_use(llama) == "sdpa"
    assert group_query_heads(llama) and attention_in_use(llama) == GROUPED_SDPA
    assert group_query_heads(llama)  # idempotent
    full = tiny_causal_lm("llama", num_heads=4, num_kv_heads=4)  # one query head per kv head
    assert not group_query_heads(full) and attention_in_use(full) == "sdpa"
    eager = tiny_causal_lm("llama")
    eager.set_attn_implementation("eager")
    assert not group_query_heads(eager) and attention_in_use(eager) == "eager"


def test_grouped_model_serves_transformers_generate_with_prompt_lookup():
    """Hugging Face's own decoding (the prompt-lookup reference of ``eval``) runs on a model
    treeopt loaded, so it must work with the grouped attention and give the same tokens."""
    stock = tiny_causal_lm("qwen2", seed=4)
    grouped = tiny_causal_lm("qwen2", seed=4)
    assert group_query_heads(grouped)
    ids = torch.tensor([list(range(5, 13)) + list(range(5, 12))])  # lookup finds a copy
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
              min_new_tokens=12, pad_token_id=1, prompt_lookup_num_tokens=3)
    a = stock.generate(ids, **kw)
    b = grouped.generate(ids, **kw)
    assert a.tolist() == b.tolist()
