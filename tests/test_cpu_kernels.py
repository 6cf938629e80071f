"""oneDNN packed linear layers: same logits up to rounding, the same greedy output, shared
modules stay shared, and models that cannot be packed are left alone."""

import copy

import pytest
import torch

from treeopt.decode.engine import generate
from treeopt.drafters.model import ModelDrafter
from treeopt.drafters.ngram import NgramDrafter
from treeopt.models.cpu_kernels import (
    PackedLinear,
    apply_kernels,
    available,
    kernels_in_use,
    pack_linear_layers,
)
from treeopt.models.loading import early_exit_draft
from treeopt.testing import tiny_causal_lm
from treeopt.tree import Tree

pytestmark = pytest.mark.skipif(not available(), reason="this torch build has no oneDNN")


def sharp(arch="llama", **kw):
    m = tiny_causal_lm(arch, **kw)
    inner = m.transformer.ln_f if hasattr(m, "transformer") else m.model.norm
    with torch.no_grad():
        inner.weight.mul_(20.0)
    return m


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_packed_logits_equal_up_to_rounding(arch):
    base = sharp(arch)
    packed = copy.deepcopy(base)
    n = pack_linear_layers(packed)
    linears = sum(type(m) is torch.nn.Linear for m in base.modules())
    assert n == linears > 0 and kernels_in_use(packed) == "onednn"
    assert not any(type(m) is torch.nn.Linear for m in packed.modules())
    x = torch.randint(0, 96, (1, 30))
    with torch.inference_mode():
        a, b = base(input_ids=x).logits, packed(input_ids=x).logits
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_packed_greedy_decoding_equals_unpacked_and_stays_exact():
    base = sharp("llama")
    packed = copy.deepcopy(base)
    pack_linear_layers(packed)
    prompt = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6]])
    ref = generate(base, None, prompt, max_new_tokens=30).tokens
    assert generate(packed, None, prompt, max_new_tokens=30).tokens == ref
    got = generate(packed, NgramDrafter(Tree((-1, 0, 1, 2))), prompt, max_new_tokens=30)
    assert got.tokens == ref and got.stats.target_forwards < 29


def test_early_exit_after_packing_shares_the_packed_layers():
    target = sharp("llama", num_layers=2)
    pack_linear_layers(target)
    draft = early_exit_draft(target, 1)
    assert draft.lm_head is target.lm_head and isinstance(draft.lm_head, PackedLinear)
    prompt = torch.tensor([[3, 14, 15, 92, 65]])
    ref = generate(target, None, prompt, max_new_tokens=20).tokens
    assert generate(target, ModelDrafter(draft, Tree((-1, 0, 0, 1))), prompt,
                    max_new_tokens=20).tokens == ref


def test_tied_weights_and_vocabulary_checks_still_see_the_weight():
    model = tiny_causal_lm("llama")
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    pack_linear_layers(model)
    assert model.get_output_embeddings().weight is model.model.embed_tokens.weight
    assert model.get_output_embeddings().weight.shape[0] == 96


def test_models_that_cannot_be_packed_are_left_alone():
    bf16 = tiny_causal_lm("llama", dtype=torch.bfloat16)
    assert pack_linear_layers(bf16) == 0 and kernels_in_use(bf16) == "default"
    model = tiny_causal_lm("llama")
    assert apply_kernels(model, "default") == "default" and kernels_in_use(model) == "default"
    with pytest.raises(ValueError, match="unknown CPU kernels"):
        apply_kernels(model, "fast")
