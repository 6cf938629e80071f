"""Tiny random causal LMs built from a config in milliseconds, for tests and examples.

They exercise exactly the code paths real Hugging Face models do (same classes, caches and
attention), without weights to download.
"""

from __future__ import annotations

import torch

from treeopt.decode.engine import generate
from treeopt.decode.sampling import Sampling
from treeopt.drafters.model import ModelDrafter


def tiny_causal_lm(arch: str = "llama", *, vocab_size: int = 96, hidden_size: int = 32,
                   num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2,
                   max_positions: int = 512, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A randomly initialised ``*ForCausalLM`` of the given architecture.

    arch: ``"llama"``, ``"qwen2"`` or ``"gpt2"``. Weights depend only on ``seed``.
    """
    import transformers as tf

    common = dict(vocab_size=vocab_size, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    if arch == "llama":
        config = tf.LlamaConfig(hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                                num_hidden_layers=num_layers, num_attention_heads=num_heads,
                                num_key_value_heads=num_kv_heads,
                                max_position_embeddings=max_positions, **common)
        cls = tf.LlamaForCausalLM
    elif arch == "qwen2":
        config = tf.Qwen2Config(hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                                num_hidden_layers=num_layers, num_attention_heads=num_heads,
                                num_key_value_heads=num_kv_heads,
                                max_position_embeddings=max_positions, **common)
        cls = tf.Qwen2ForCausalLM
    elif arch == "gpt2":
        config = tf.GPT2Config(n_embd=hidden_size, n_layer=num_layers, n_head=num_heads,
                               n_positions=max_positions, **common)
        cls = tf.GPT2LMHeadModel
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; use llama, qwen2 or gpt2")
    torch.manual_seed(seed)
    model = cls(config).to(dtype)
    model.eval()
    return model


def tiny_pair(arch: str = "llama", *, vocab_size: int = 96, seed: int = 0, **kw):
    """(target, draft): a 2-layer target and a 1-layer draft sharing the vocabulary."""
    target = tiny_causal_lm(arch, vocab_size=vocab_size, num_layers=2, seed=seed, **kw)
    draft = tiny_causal_lm(arch, vocab_size=vocab_size, num_layers=1, seed=seed + 1, **kw)
    return target, draft


def decode(target, draft, tree, input_ids, *, max_new_tokens: int, temperature: float = 0.0,
           top_k: int = 0, top_p: float = 1.0, rule: str = "sequoia", seed: int | None = None,
           **kw):
    """Tests' shorthand for the engine with a draft model over a fixed tree: ``draft`` None
    (or ``tree`` None / size 1) decodes plainly. Returns the engine's ``Generation``."""

    drafter = None
    if draft is not None and tree is not None and tree.size > 1:
        drafter = ModelDrafter(draft, tree)
    return generate(target, drafter, input_ids, max_new_tokens=max_new_tokens,
                    sampling=Sampling(temperature, top_k, top_p, rule, seed), **kw)
