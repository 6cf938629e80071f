"""oneDNN packed linear layers: same logits up to rounding, the same greedy output, shared
modules stay shared, and models that cannot be packed are left alone; few-row forwards
computed streamed, and the measured, cached choice of which."""

import copy
import json

import pytest
import torch

from treeopt.decode.engine import generate
from treeopt.drafters.model import ModelDrafter
from treeopt.drafters.ngram import NgramDrafter
from treeopt.models import dtype as dt
from treeopt.models import kernel_choice
from treeopt.models.cpu_kernels import (
    PACK_ROWS,
    PackedLinear,
    apply_kernels,
    available,
    kernels_in_use,
    pack_linear_layers,
    rows_text,
    stream_rows,
)
from treeopt.models.dtype import remeasured
from treeopt.models.kernel_choice import (
    choice_file,
    choose_streamed_rows,
    decide,
    time_kernels,
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


@pytest.mark.parametrize("pack_rows", [1, 16, 64])
def test_any_packing_layout_computes_every_row_count(pack_rows):
    """The packed layout is oneDNN's choice for ``pack_rows``-row inputs, a speed matter
    only: fewer, as many and more rows than it was laid out for give ``nn.Linear``'s result
    (float32 rounding apart); the default layout is ``PACK_ROWS`` rows, and the model-wide
    packing passes the layout on to every layer."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(40, 72)
    packed = PackedLinear(linear, pack_rows)
    unit = "row" if pack_rows == 1 else "rows"
    assert packed.pack_rows == pack_rows
    assert repr(packed).endswith(f"oneDNN packed for {pack_rows} {unit})")
    with torch.inference_mode():
        for rows in (1, 2, 3, 5, 8, 15, 16, 17, 40):
            x = torch.randn(rows, 40)
            assert torch.allclose(packed(x), linear(x), atol=1e-5), (pack_rows, rows)
    assert PackedLinear(linear).pack_rows == PACK_ROWS
    model = tiny_causal_lm("llama")
    pack_linear_layers(model, pack_rows=pack_rows)
    assert {m.pack_rows for m in model.modules() if isinstance(m, PackedLinear)} == {pack_rows}


# ---------------------------------------------------------------- streamed rows
@pytest.mark.parametrize("bias", [True, False])
def test_streamed_rows_compute_the_same_linear(bias):
    """``weight @ x.T`` for the row counts in ``streamed`` (padded with zero rows where
    mapped to more), oneDNN for the others: all the same linear map as ``nn.Linear``
    (float32 rounding apart), for 2-D and 3-D inputs."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(24, 40, bias=bias)
    packed = PackedLinear(linear)
    packed.streamed = {2: 2, 3: 4, 5: 8}
    with torch.inference_mode():
        for rows in (1, 2, 3, 4, 5, 16):
            for shape in ((rows, 24), (1, rows, 24)):
                x = torch.randn(*shape)
                got, ref = packed(x), linear(x)
                assert got.shape == ref.shape and got.is_contiguous()
                assert torch.allclose(got, ref, atol=1e-5), (rows, shape)
    assert "streamed rows 2,3:4,5:8" in repr(packed)


def test_rows_text_and_kernels_in_use_name_the_streamed_rows():
    assert rows_text({2, 3, 4, 6, 8}) == "2-4,6,8" and rows_text({16}) == "16"
    assert rows_text({2: 2, 3: 4, 4: 4, 5: 5, 7: 8}) == "2,3:4,4-5,7:8"
    model = tiny_causal_lm("llama")
    pack_linear_layers(model)
    assert stream_rows(model, {2, 3, 4, 12}) == sum(isinstance(m, PackedLinear)
                                                    for m in model.modules())
    assert kernels_in_use(model) == "onednn,streamed=2-4,12"
    stream_rows(model, {3: 4})
    assert kernels_in_use(model) == "onednn,streamed=3:4"
    stream_rows(model, ())
    assert kernels_in_use(model) == "onednn"
    with pytest.raises(ValueError, match="at least itself"):
        stream_rows(model, {4: 3})


def test_greedy_tree_decoding_with_every_few_row_forward_streamed_is_exact():
    base = sharp("qwen2")
    packed = copy.deepcopy(base)
    pack_linear_layers(packed)
    stream_rows(packed, range(2, 17))
    prompt = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6]])
    ref = generate(base, None, prompt, max_new_tokens=30).tokens
    assert generate(packed, None, prompt, max_new_tokens=30).tokens == ref
    for tree in (Tree((-1, 0, 1, 2, 3, 4)), Tree((-1, 0, 0, 1, 1, 2, 3))):
        got = generate(packed, NgramDrafter(tree), prompt, max_new_tokens=30)
        assert got.tokens == ref and got.stats.target_forwards < 29


# ---------------------------------------------------------------- the measured choice
def test_decide_by_hand():
    onednn = {2: 100.0, 3: 100.0, 4: 110.0, 6: 120.0, 8: 130.0, 12: 140.0, 16: 150.0}
    streamed = {2: 85.0, 3: 105.0, 4: 85.0, 6: 125.0, 8: 120.0, 12: 200.0, 16: 160.0}
    # 2: 85 < 90 (10 % below; equal to four rows' 85, the fewer rows win); 3: four rows (85)
    # beat three (105) and oneDNN's 100 by > 10 %; 4: 85 < 99; 5: the cheapest streamed
    # count >= 5 is 8 (120) against oneDNN's 115 interpolated; 8: 120 is 7.7 % below 130,
    # inside the margin
    assert decide(onednn, streamed) == {2: 2, 3: 4, 4: 4}
    assert decide(onednn, streamed, margin=0.0) == {2: 2, 3: 4, 4: 4, 7: 8, 8: 8}
    assert decide({4: 100.0}, {4: 50.0}) == {2: 4, 3: 4, 4: 4}
    assert decide({2: 100.0}, {2: 90.0}) == {}  # exactly the margin: not enough
    assert decide({}, {}) == {}


@pytest.fixture
def timed(monkeypatch):
    """time_kernels replaced by fixed medians (streamed faster at 2-4 only); counts calls."""
    calls = []

    def fake(model, *a, **k):
        calls.append(model)
        onednn = {n: 100.0 for n in kernel_choice.ROWS}
        return onednn, {n: (70.0 if n <= 4 else 110.0) for n in kernel_choice.ROWS}

    monkeypatch.setattr(kernel_choice, "time_kernels", fake)
    return calls


def test_choice_is_measured_once_then_cached(tmp_path, timed):
    model = tiny_causal_lm("llama")
    pack_linear_layers(model)
    rows = {2: 2, 3: 3, 4: 4}
    assert choose_streamed_rows(model, tmp_path) == rows
    assert kernels_in_use(model) == "onednn,streamed=2-4" and len(timed) == 1
    other = tiny_causal_lm("llama")
    pack_linear_layers(other)
    assert choose_streamed_rows(other, tmp_path) == rows and len(timed) == 1
    assert kernels_in_use(other) == "onednn,streamed=2-4"
    with remeasured():  # --remeasure: timed again, once
        choose_streamed_rows(other, tmp_path)
        choose_streamed_rows(other, tmp_path)
    assert len(timed) == 2
    path, _ = choice_file(model, tmp_path)
    data = json.loads(path.read_text())
    data["streamed_rows"] = {"2": 2}  # not what its own timings decide: measured again
    path.write_text(json.dumps(data))
    assert choose_streamed_rows(model, tmp_path) == rows and len(timed) == 3
    path.write_text("{not json")
    assert choose_streamed_rows(model, tmp_path) == rows and len(timed) == 4
    assert choose_streamed_rows(model, tmp_path, measure=False) == rows


def test_unpacked_or_unmeasured_models_stream_nothing(tmp_path, timed):
    bf16 = tiny_causal_lm("llama", dtype=torch.bfloat16)
    assert choose_streamed_rows(bf16, tmp_path) == {} and not timed
    model = tiny_causal_lm("llama")
    pack_linear_layers(model)
    assert choose_streamed_rows(model, tmp_path, measure=False) == {} and not timed
    assert kernels_in_use(model) == "onednn"


def test_time_kernels_times_both_kernels_and_leaves_none_streamed():
    model = tiny_causal_lm("llama")
    pack_linear_layers(model)
    onednn, streamed = time_kernels(model, rows=(2, 4), repeats=2)
    assert set(onednn) == set(streamed) == {2, 4}
    assert all(v > 0 for v in [*onednn.values(), *streamed.values()])
    assert kernels_in_use(model) == "onednn"


def test_load_model_streams_the_measured_rows_unless_told_not_to(tmp_path, timed, monkeypatch):
    from treeopt.models.loading import load_model

    monkeypatch.setenv("TREEOPT_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "tiny"
    tiny_causal_lm("llama").save_pretrained(folder)
    assert kernels_in_use(load_model(folder, device="cpu")) == "onednn,streamed=2-4"
    assert kernels_in_use(load_model(folder, device="cpu", kernels="onednn")) == "onednn"
    monkeypatch.setenv("TREEOPT_CPU_KERNELS", "onednn")
    assert kernels_in_use(load_model(folder, device="cpu")) == "onednn"
    assert len(timed) == 1


def test_a_choice_at_the_margin_is_decided_as_written_and_stays_cached(tmp_path, monkeypatch):
    """Timings are cached rounded to 4 decimals and a cached choice is valid only if they
    decide alike: a streamed time just under the margin before rounding and on it after
    must not make the cached file invalid at every load."""
    calls = []

    def fake(model, *a, **k):
        calls.append(model)
        onednn = {n: 100.0 for n in kernel_choice.ROWS}
        return onednn, {n: 100.0 * (1 - kernel_choice.MARGIN) - 4e-5 for n in kernel_choice.ROWS}

    monkeypatch.setattr(kernel_choice, "time_kernels", fake)
    model = tiny_causal_lm("llama")
    pack_linear_layers(model)
    first = choose_streamed_rows(model, tmp_path)
    assert choose_streamed_rows(model, tmp_path) == first and len(calls) == 1


def test_the_curve_is_timed_on_both_sides_of_every_kernel_switch(tmp_path, monkeypatch):
    """Between two timed sizes every row count runs on one kernel: with 2 and 4 rows
    streamed (3 padded to 4) and 5+ on oneDNN, 5 is timed too (it used to be priced halfway
    between 4 streamed and 6 on oneDNN); with 2 and 4 streamed and 3 on oneDNN, 3 and 5."""
    model = tiny_causal_lm(num_layers=1)
    assert dt.routed_sizes(model) == dt.SIZES  # nothing packed
    pack_linear_layers(model)
    assert dt.routed_sizes(model) == dt.SIZES  # packed, nothing streamed
    stream_rows(model, {2: 2, 3: 4, 4: 4})
    assert dt.routed_sizes(model) == (1, 2, 3, 4, 5, 6, 8, 12, 16)
    stream_rows(model, {2: 2, 4: 4})
    assert dt.routed_sizes(model) == (1, 2, 3, 4, 5, 6, 8, 12, 16)
    stream_rows(model, {6: 8, 7: 8, 8: 8})
    assert dt.routed_sizes(model) == (1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 16)
    assert dt.routed_sizes(model, (1, 2, 4)) == (1, 2, 4)  # nothing switches below 4
    timed = []
    monkeypatch.setattr(dt, "time_forwards",
                        lambda m, sizes, **kw: timed.append(tuple(sizes)) or
                        {n: 10.0 + n for n in sizes})
    stream_rows(model, {2: 2, 3: 4, 4: 4})
    assert set(dt.latency_curve(model, tmp_path)) == {1, 2, 3, 4, 5, 6, 8, 12, 16}
    assert timed == [(1, 2, 3, 4, 5, 6, 8, 12, 16)]
