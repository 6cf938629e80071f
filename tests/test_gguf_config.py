"""Folders converted from GGUF hold plain safetensors: their config.json must not keep the
GGUF ``quantization_config`` (transformers 5.25 with ``kernels`` then treats them as packed
GGUF checkpoints). New conversions write clean configs; old cache folders are fixed on
load; other folders are left alone."""

import json
from pathlib import Path

import pytest
import torch

import treeopt.models.loading as models
from treeopt.models.loading import clean_config, load_model
from treeopt.testing import tiny_causal_lm

GGUF_QUANT = {"dequantize": False, "gguf_file": "m.gguf", "quant_method": "gguf"}


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TREEOPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def with_quant(folder: Path, quant: dict) -> None:
    path = folder / "config.json"
    doc = json.loads(path.read_text())
    doc["quantization_config"] = quant
    path.write_text(json.dumps(doc))


def test_an_old_cache_folder_is_fixed_on_load(tmp_path):
    fake = tmp_path / "m.gguf"
    fake.write_bytes(b"GGUF not read: the cached conversion is used")
    folder = models._gguf_cache_folder(fake)
    model = tiny_causal_lm("llama", num_layers=2, seed=1)
    model.save_pretrained(folder)
    with_quant(folder, GGUF_QUANT)
    before = json.loads((folder / "config.json").read_text())
    loaded = load_model(fake, dtype="bfloat16", device="cpu")
    after = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in after
    assert after == {k: v for k, v in before.items() if k != "quantization_config"}
    assert getattr(loaded.config, "quantization_config", None) is None
    assert loaded.dtype == torch.bfloat16
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        want = model.to(torch.bfloat16)(ids).logits
        got = loaded(ids).logits
    assert torch.equal(got, want)  # the same plain weights
    assert not clean_config(folder)  # nothing left to do


def test_other_folders_are_left_alone(tmp_path):
    model = tiny_causal_lm("llama", num_layers=1, seed=2)
    still_gguf = tmp_path / "still-gguf"
    model.save_pretrained(still_gguf)
    with_quant(still_gguf, GGUF_QUANT)
    (still_gguf / "m.gguf").write_bytes(b"GGUF")
    other = tmp_path / "bnb"
    model.save_pretrained(other)
    with_quant(other, {"quant_method": "bitsandbytes", "load_in_8bit": True})
    plain = tmp_path / "plain"
    model.save_pretrained(plain)
    for folder in (still_gguf, other, plain, tmp_path / "missing"):
        text = (folder / "config.json").read_text() if folder.exists() else None
        assert not clean_config(folder)
        if text is not None:
            assert (folder / "config.json").read_text() == text


@pytest.mark.slow
def test_smollm2_conversion_writes_a_clean_config():
    """A fresh conversion of the real GGUF (about 30 s; TREEOPT_SLOW=1)."""
    folder = models.convert_gguf(models.smollm2_gguf_path())
    doc = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in doc and doc["model_type"] == "llama"
    model = load_model("smollm2", dtype="bfloat16", device="cpu")
    assert getattr(model.config, "quantization_config", None) is None
