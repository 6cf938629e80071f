"""`--dtype auto`: the dtype chosen from a latency table by hand-computable scores, the
supported dtypes by CPU flags, and the per-(model, machine) cache: measured once, reused,
measured again when damaged or foreign, pinned by $TREEOPT_AUTO_DTYPE."""

import json
import re

import pytest

from treeopt.cli import show_notices
from treeopt.models import dtype as dt
from treeopt.testing import tiny_causal_lm

FP32 = {1: 50.0, 2: 60.0, 4: 90.0, 8: 100.0}
BF16 = {1: 52.0, 2: 53.0, 4: 55.0, 8: 60.0}


def test_choose_by_one_plus_four_token_time():
    # scores: float32 50 + 90 = 140, bfloat16 52 + 55 = 107
    assert dt.score(FP32) == 140.0 and dt.score(BF16) == 107.0
    assert dt.choose_dtype({"float32": FP32, "bfloat16": BF16}) == "bfloat16"
    slow_bf16 = {1: 80.0, 4: 100.0}  # 180 > 140
    assert dt.choose_dtype({"float32": FP32, "bfloat16": slow_bf16}) == "float32"


def test_ties_within_two_percent_go_to_float32():
    near = {1: 50.0, 4: 88.0}  # 138: float32's 140 is within 2 % of it
    assert dt.choose_dtype({"bfloat16": near, "float32": FP32}) == "float32"
    clear = {1: 50.0, 4: 86.0}  # 136: 140 > 136 * 1.02 = 138.72
    assert dt.choose_dtype({"bfloat16": clear, "float32": FP32}) == "bfloat16"


def test_interpolation_between_and_beyond_measured_sizes():
    curve = {1: 10.0, 4: 40.0, 8: 48.0}
    assert dt.interpolate(curve, 2) == 20.0
    assert dt.interpolate(curve, 6) == 44.0
    assert dt.interpolate(curve, 16) == 96.0  # 48 * 16 / 8
    assert dt.score({1: 10.0, 8: 80.0}) == 10.0 + 40.0


@pytest.mark.parametrize("bad", [{}, {2: 5.0}, {1: 0.0}, {1: float("nan")}, {1: 5.0, 0: 3.0},
                                 {1: "fast"}])
def test_unusable_tables_are_refused(bad):
    with pytest.raises(dt.DtypeError):
        dt.choose_dtype({"float32": bad})
    with pytest.raises(dt.DtypeError):
        dt.choose_dtype({})


def test_supported_dtypes_follow_the_cpu_flags():
    assert dt.supported_dtypes("cpu", frozenset({"avx2", "avx512f"})) == ["float32"]
    assert dt.supported_dtypes("cpu", frozenset({"avx512_bf16"})) == ["float32", "bfloat16"]
    assert dt.supported_dtypes("cpu", frozenset({"amx_bf16", "amx_tile"})) == \
        ["float32", "bfloat16"]


def test_time_forwards_gives_every_size():
    model = tiny_causal_lm(num_layers=1)
    curve = dt.time_forwards(model, sizes=(1, 2, 4), context=16, repeats=1, warmup=0)
    assert sorted(curve) == [1, 2, 4] and all(v > 0 for v in curve.values())


class Loader:
    def __init__(self):
        self.loads = []

    def __call__(self, name):
        self.loads.append(name)
        import torch

        return tiny_causal_lm(num_layers=1, dtype=getattr(torch, name))


def test_auto_dtype_measures_once_then_reads_the_cache(tmp_path, monkeypatch):
    monkeypatch.delenv(dt.ENV_PIN, raising=False)
    load = Loader()
    choice, tables = dt.auto_dtype("tiny", load, "cpu", tmp_path, ["float32", "bfloat16"])
    assert load.loads == ["float32", "bfloat16"]
    assert choice == dt.choose_dtype(tables) and set(tables) == {"float32", "bfloat16"}
    again, tables2 = dt.auto_dtype("tiny", load, "cpu", tmp_path, ["float32", "bfloat16"])
    assert load.loads == ["float32", "bfloat16"]  # no new load: cached
    assert again == choice and tables2 == {k: {n: round(v, 4) for n, v in c.items()}
                                           for k, c in tables.items()}
    # another model is measured for itself
    dt.auto_dtype("other", load, "cpu", tmp_path, ["float32", "bfloat16"])
    assert len(load.loads) == 4


def test_damaged_or_forged_cache_is_measured_again(tmp_path, monkeypatch):
    monkeypatch.delenv(dt.ENV_PIN, raising=False)
    load = Loader()
    choice, _ = dt.auto_dtype("tiny", load, "cpu", tmp_path, ["float32", "bfloat16"])
    (path,) = (tmp_path / "dtype").glob("*.json")
    data = json.loads(path.read_text())
    # a choice that its own table contradicts is not believed
    data["choice"] = "bfloat16" if choice == "float32" else "float32"
    path.write_text(json.dumps(data))
    # (the models are loaded again, but their curves are read from the cache: same choice)
    assert dt.auto_dtype("tiny", load, "cpu", tmp_path, ["float32", "bfloat16"])[0] == choice
    assert json.loads(path.read_text())["choice"] == choice  # rewritten
    path.write_text("{not json")
    stale = sorted((tmp_path / "latency").glob("*.json"))
    for f in stale:
        f.write_text(json.dumps({"version": 1, "identity": {}, "ms": {"1": -1}}))
    dt.auto_dtype("tiny", load, "cpu", tmp_path, ["float32", "bfloat16"])
    for f in stale:  # both curves measured again
        assert json.loads(f.read_text())["ms"]["1"] > 0
    assert json.loads(path.read_text())["choice"] in ("float32", "bfloat16")


def test_environment_pins_and_single_dtype_devices_never_load(tmp_path, monkeypatch):
    load = Loader()
    monkeypatch.setenv(dt.ENV_PIN, "bfloat16")
    assert dt.auto_dtype("tiny", load, "cpu", tmp_path)[0] == "bfloat16"
    monkeypatch.delenv(dt.ENV_PIN)
    assert dt.auto_dtype("tiny", load, "cpu", tmp_path, ["float32"])[0] == "float32"
    assert load.loads == []


def test_load_model_auto_uses_the_measured_choice(tmp_path, monkeypatch):
    import torch

    from treeopt.models.loading import load_model

    folder = tmp_path / "m"
    tiny_causal_lm(num_layers=1).save_pretrained(folder)
    monkeypatch.setenv("TREEOPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(dt, "supported_dtypes", lambda device: ["float32", "bfloat16"])
    monkeypatch.setattr(dt, "choose_dtype", lambda tables: "bfloat16")
    monkeypatch.delenv(dt.ENV_PIN, raising=False)
    model = load_model(str(folder), dtype="auto", device="cpu")
    assert model.dtype == torch.bfloat16
    assert load_model(str(folder), dtype="float32", device="cpu").dtype == torch.float32


# ---------------------------------------------------------------------------- CLI reports
def model_args(ws):
    return ["--target", str(ws / "tiny"), "--draft", "early-exit:1", "--device", "cpu",
            "--threads", "1"]


def test_tune_and_profile_latency_report_every_dtype(tmp_path, capsys, monkeypatch):
    from helpers import char_tokenizer

    from treeopt.cli import main

    monkeypatch.setenv("TREEOPT_CACHE", str(tmp_path / "cache"))
    workspace = tmp_path / "ws"
    tiny_causal_lm(num_layers=2, seed=11).save_pretrained(workspace / "tiny")
    char_tokenizer().save_pretrained(workspace / "tiny")
    (workspace / "prompts.jsonl").write_text("".join(
        json.dumps({"id": f"p{i}", "category": "c", "text": t}) + "\n"
        for i, t in enumerate(["the cat sat on the mat. the cat", "one two one two one"])))
    assert main(["tune", *model_args(workspace), "--dataset", str(workspace / "prompts.jsonl"),
                 "--prompts", "2", "--max-new-tokens", "6", "--width", "2", "--depth", "2",
                 "--tokens", "1,2,4", "--context", "8", "--repeats", "1", "--warmup", "0",
                 "--dtype", "float32", "--dtypes", "float32,bfloat16",
                 "--out-dir", str(tmp_path / "run"), "--quiet"]) == 0
    text = capsys.readouterr().out
    lines = [x.strip() for x in text.splitlines()]
    assert any(x.startswith("float32: plain ") and "predicted" in x for x in lines)
    assert any(x.startswith("bfloat16: plain ") and "over plain bfloat16" in x for x in lines)
    # this machine's dtypes decide whether the comparison is complete enough to be cached
    assert re.search(r"fastest predicted speculative decoding: (float32|bfloat16)", text)
    assert main(["profile", "latency", *model_args(workspace), "--tokens", "1,2",
                 "--context", "8", "--repeats", "1", "--warmup", "0", "--dtype", "float32",
                 "--dtypes", "float32,bfloat16", "--out", str(tmp_path / "l.json")]) == 0
    text = capsys.readouterr().out
    assert "float32: plain" in text and "bfloat16: plain" in text
    assert re.search(r"--dtype auto picks (float32|bfloat16) on this machine by plain", text)


def test_a_dtype_the_model_cannot_run_is_not_a_candidate(tmp_path, monkeypatch):
    monkeypatch.delenv(dt.ENV_PIN, raising=False)

    def load(name):
        if name == "bfloat16":
            raise RuntimeError("\"addmm_impl_cpu_\" not implemented for 'BFloat16'")
        return tiny_causal_lm(num_layers=1)

    choice, tables = dt.auto_dtype("m", load, "cpu", tmp_path, ["float32", "bfloat16"])
    assert choice == "float32" and list(tables) == ["float32"]

    def never(name):
        raise AssertionError("the cached choice is read, nothing loaded")

    assert dt.auto_dtype("m", never, "cpu", tmp_path, ["float32", "bfloat16"])[0] == "float32"


def test_choose_by_rate_by_hand():
    assert dt.choose_by_rate({"float32": 10.0, "bfloat16": 12.0}) == "bfloat16"
    assert dt.choose_by_rate({"float32": 12.0, "bfloat16": 10.0}) == "float32"
    # within 2 % of float32's rate: float32, the reference dtype
    assert dt.choose_by_rate({"bfloat16": 10.15, "float32": 10.0}) == "float32"
    assert dt.choose_by_rate({"bfloat16": 10.3, "float32": 10.0}) == "bfloat16"
    assert dt.choose_by_rate({"bfloat16": 3.0}) == "bfloat16"
    for bad in ({}, {"float32": 0.0}, {"float32": float("nan")}, {"float32": True}):
        with pytest.raises(dt.DtypeError):
            dt.choose_by_rate(bad)


def test_tunes_speculative_choice_overrides_the_plain_measurement(tmp_path, monkeypatch):
    # plain forwards tie (float32 wins), but tune predicted bfloat16's best speculative
    # configuration 20 % faster: --dtype auto must then mean bfloat16, read without a load
    monkeypatch.delenv(dt.ENV_PIN, raising=False)
    monkeypatch.setattr(dt, "supported_dtypes", lambda device, flags=None: ["float32",
                                                                           "bfloat16"])
    load = Loader()
    assert dt.auto_dtype("m", load, "cpu", tmp_path)[0] in ("float32", "bfloat16")
    measured = list(load.loads)
    kept = dt.remember_speculative_choice("m", {"float32": 15.0, "bfloat16": 18.0},
                                          draft="ngram", device="cpu", folder=tmp_path)
    assert kept == "bfloat16"
    assert dt.auto_dtype("m", load, "cpu", tmp_path) == ("bfloat16", {})
    assert load.loads == measured  # read from the cache, nothing loaded
    (path,) = (tmp_path / "dtype").glob("*.json")
    data = json.loads(path.read_text())
    assert data["basis"] == "speculative" and data["draft"] == "ngram"
    # a choice its own rates contradict is not believed: measured again by plain forwards
    data["choice"] = "float32"
    path.write_text(json.dumps(data))
    assert dt.auto_dtype("m", load, "cpu", tmp_path)[1] != {}
    assert len(load.loads) == len(measured) + 2
    # a comparison without every supported dtype replaces nothing
    before = path.read_text()
    assert dt.remember_speculative_choice("m", {"bfloat16": 30.0}, draft="ngram",
                                          device="cpu", folder=tmp_path) is None
    assert path.read_text() == before


# ------------------------------------------------------------------ noisy and stale curves
def test_a_larger_size_clearly_cheaper_than_a_smaller_one_is_noise():
    assert dt.consistent({1: 10.0, 2: 9.5, 4: 12.0})  # a 5 % dip: within DIP
    assert dt.consistent({1: 10.0, 2: 10.0, 4: 9.1})
    assert not dt.consistent({1: 10.0, 2: 8.9})
    # the curve once cached under load: one token at 298 ms, two at 90
    assert not dt.consistent({1: 298.0, 2: 90.0, 4: 95.0})
    assert not dt.consistent({1: 80.0, 2: 120.0, 4: 90.0, 8: 130.0})  # 4 dips below 2


def test_a_noisy_curve_is_timed_again_keeping_each_sizes_lower_median(monkeypatch):
    timings = iter([{1: 298.0, 2: 90.0, 4: 95.0}, {1: 87.0, 2: 92.0, 4: 91.0}])
    monkeypatch.setattr(dt, "time_forwards", lambda model, sizes, **kw: next(timings))
    assert dt.steady_forwards(None, (1, 2, 4)) == {1: 87.0, 2: 90.0, 4: 91.0}
    calls = []

    def always_noisy(model, sizes, **kw):
        calls.append(1)
        return {1: 100.0 - len(calls), 2: 50.0}

    monkeypatch.setattr(dt, "time_forwards", always_noisy)
    assert dt.steady_forwards(None, (1, 2), retries=2) == {1: 97.0, 2: 50.0}
    assert len(calls) == 3  # bounded: once, then at most ``retries`` more
    calls.clear()
    monkeypatch.setattr(dt, "time_forwards",
                        lambda model, sizes, **kw: calls.append(1) or {1: 5.0, 2: 6.0})
    dt.steady_forwards(None, (1, 2))
    assert len(calls) == 1  # a consistent curve is timed once


def test_remeasured_re_times_each_cached_curve_once_and_replaces_the_file(tmp_path,
                                                                          monkeypatch):
    model = tiny_causal_lm(num_layers=1)
    times = []

    def timing(m, sizes, **kw):
        times.append(1)
        return {n: 1.0 + n + len(times) for n in sizes}

    monkeypatch.setattr(dt, "time_forwards", timing)
    first = dt.latency_curve(model, tmp_path)
    (path,) = (tmp_path / "latency").glob("*.json")
    assert dt.latency_curve(model, tmp_path) == first and len(times) == 1  # cached
    with dt.remeasured():
        fresh = dt.latency_curve(model, tmp_path)
        assert fresh != first and len(times) == 2
        assert dt.latency_curve(model, tmp_path) == fresh and len(times) == 2  # once each
        assert dt.latency_curve(model, tmp_path, measure=False) == fresh
    assert dt.latency_curve(model, tmp_path) == fresh and len(times) == 2  # the new file
    assert json.loads(path.read_text())["ms"]["1"] == fresh[1]
    with dt.remeasured():  # another block times again
        dt.latency_curve(model, tmp_path)
    assert len(times) == 3


def test_a_measurement_says_so_once_on_stderr_and_a_cached_read_is_silent(tmp_path, monkeypatch,
                                                                          capsys):
    """A first use on a new machine times forwards for a while: the command line says so
    (``treeopt: timing ...`` on stderr, via the library's log), once per measurement."""
    show_notices()
    show_notices()  # installed once: one line per notice
    model = tiny_causal_lm(num_layers=1)
    monkeypatch.setattr(dt, "time_forwards", lambda m, sizes, **kw: {n: 1.0 + n for n in sizes})
    dt.latency_curve(model, tmp_path)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("treeopt: timing ")
    assert err[0].endswith(f"later runs on this machine read them from {tmp_path / 'latency'}")
    dt.latency_curve(model, tmp_path)
    assert capsys.readouterr().err == ""
