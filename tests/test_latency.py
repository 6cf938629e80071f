"""Latency profiler: valid profiles from tiny models, merged into existing files."""

from __future__ import annotations

import json

import pytest
import torch

from treeopt.profile import Profile
from treeopt.profile.latency import (
    bushy_tree,
    load_latency,
    measure_latency,
    parse_tokens,
    quartiles,
    time_prefill,
    time_tree_forwards,
    write_latency,
)
from treeopt.profile.model import LatencyError, steady_medians, steady_samples
from treeopt.testing import tiny_pair


def test_parse_tokens_and_quartiles():
    assert parse_tokens("8,1,2,2") == [1, 2, 8]
    with pytest.raises(LatencyError, match="comma-separated"):
        parse_tokens("1,two")
    with pytest.raises(LatencyError, match=">= 1"):
        parse_tokens("0,1")
    assert quartiles([3.0]) == (3.0, 3.0, 3.0)
    assert quartiles([1.0, 2.0, 3.0, 4.0, 5.0]) == (2.0, 3.0, 4.0)


def test_bushy_tree_is_a_valid_bfs_tree():
    t = bushy_tree(7)
    assert t.size == 7 and t.depth == 2 and t.width == 2
    assert bushy_tree(1).size == 1


def test_timing_leaves_the_cache_as_it_found_it():
    target, _ = tiny_pair()
    samples = time_tree_forwards(target, [1, 3], context=8, repeats=3, warmup=1)
    assert [len(s) for s in samples] == [3, 3] and all(x > 0 for s in samples for x in s)


def test_forwards_are_timed_in_inference_mode_like_the_engine():
    # the engine decodes under torch.inference_mode; timing under no_grad alone prices every
    # forward a few % dearer, a level offset that biased predicted speed-ups low
    target, _ = tiny_pair()
    modes = []
    hook = target.register_forward_hook(
        lambda *_: modes.append(torch.is_inference_mode_enabled()))
    try:
        time_tree_forwards(target, [1, 2], context=8, repeats=2, warmup=1)
    finally:
        hook.remove()
    assert modes and all(modes)


def test_latency_profile_is_valid_and_merges(tmp_path):
    torch.set_num_threads(1)
    target, draft = tiny_pair()
    lat = measure_latency(target, draft, tokens=[1, 2, 4], draft_tokens=[1, 2], context=16,
                          repeats=3, warmup=1, names={"target": "tiny"})
    assert lat.target.tokens == [1, 2, 4] and len(lat.target.spread_ms) == 3
    assert lat.draft.tokens == [1, 2]
    for key in ("device", "dtype", "torch", "transformers", "treeopt", "repeats", "warmup"):
        assert key in lat.meta
    assert lat.meta["dtype"] == "float32" and lat.meta["target"] == "tiny"

    # latency-only file, then into an existing acceptance profile
    only = write_latency(lat, tmp_path / "lat.json")
    assert load_latency(only).target.ms == lat.target.ms
    acc = Profile.from_counts([5, 3], 2, meta={"kind": "acceptance"})
    acc.save(tmp_path / "p.json")
    write_latency(lat, tmp_path / "p.json")
    both = Profile.load(tmp_path / "p.json")
    assert both.counts == [5, 3] and both.latency.target.tokens == [1, 2, 4]
    assert both.latency.context == 16

    (tmp_path / "bad.json").write_text(json.dumps({"x": 1}))
    with pytest.raises(LatencyError, match="not a treeopt profile"):
        write_latency(lat, tmp_path / "bad.json")


def test_context_beyond_window_is_an_error():
    target, _ = tiny_pair(max_positions=32)
    with pytest.raises(LatencyError, match="positions"):
        time_tree_forwards(target, [8], context=30, repeats=1, warmup=0)


def test_sizes_are_interleaved_across_repeats(monkeypatch):
    """Each round times every size once, so drift hits every size alike."""
    import treeopt.decode.attention as attention
    import treeopt.profile.latency as latency_mod

    target, _ = tiny_pair()
    order = []
    real = attention.forward_tree

    def spy(model, ids, pos, mask, cache):
        order.append(ids.shape[1])
        return real(model, ids, pos, mask, cache)

    monkeypatch.setattr(latency_mod, "forward_tree", spy)
    samples = time_tree_forwards(target, [1, 3, 2], context=8, repeats=3, warmup=1)
    assert order == [1, 3, 2] * 4
    assert [len(s) for s in samples] == [3, 3, 3]


def test_model_free_proposals_are_interleaved_too():
    from treeopt.profile.latency import time_proposals

    order = []

    class Level:
        def __init__(self, q):
            self.q = q

        def start(self, ids):
            pass

        def propose(self, text, depth, sampling):
            order.append(self.q)

    class Drafter:
        def reshaped(self, tree):
            return Level(tree.size - 1)

    samples = time_proposals(Drafter(), [2, 4], vocab=50, context=40, repeats=2, warmup=1)
    assert order == [2, 4] * 3 and [len(s) for s in samples] == [2, 2]


def test_meta_records_the_threading_settings(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    target, draft = tiny_pair()
    lat = measure_latency(target, draft, tokens=[1, 2], context=8, repeats=1, warmup=0)
    assert lat.meta["threads"] == torch.get_num_threads()
    assert lat.meta["omp_wait_policy"] == "PASSIVE"
    assert lat.meta["kernels"] in ("default", "onednn")
    assert lat.meta["draft_kernels"] in ("default", "onednn")
    assert "interop_threads" in lat.meta
    assert lat.meta["dtype"] == "float32" and lat.meta["machine"]["cpu"]  # named beside it
    monkeypatch.delenv("OMP_WAIT_POLICY")
    assert measure_latency(target, None, tokens=[1], context=8, repeats=1,
                           warmup=0).meta["omp_wait_policy"] is None


def test_timing_warnings_flag_noise_and_falling_curves():
    from treeopt.profile import Latency, LatencyCurve
    from treeopt.profile.latency import timing_warnings

    clean = Latency(LatencyCurve([1, 2, 4], [10.0, 11.0, 13.0], [0.5, 0.4, 1.0]),
                    LatencyCurve([1, 2], [1.0, 1.1], [0.1, 0.1]), meta={"device_type": "cpu"})
    assert timing_warnings(clean) == []
    noisy = Latency(LatencyCurve([1, 2, 4], [10.0, 11.0, 13.0], [0.5, 4.0, 1.0]),
                    meta={"device_type": "cpu"})
    (line,) = timing_warnings(noisy)
    assert "target" in line and "IQR" in line and "2 tokens (IQR 4.00 of 11.00 ms)" in line
    assert "--repeats" in line and "--threads 1" in line
    falling = Latency(LatencyCurve([1, 2, 4, 8, 16], [10.0, 30.0, 12.0, 14.0, 13.0]),
                      meta={"device_type": "cpu"})
    (line,) = timing_warnings(falling)
    assert "falls" in line and "30.00 ms at 2" in line and "12.00 ms at 4" in line
    # a 3 % dip is noise, not a fall
    assert timing_warnings(Latency(LatencyCurve([1, 2], [10.0, 9.7]))) == []


@pytest.mark.parametrize("text, needle", [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"format": "treeopt-profile", "latency": ' + "9" * 5000 + "}", "not valid JSON"),
    ("{not json", "not valid JSON"),
])
def test_broken_json_files_are_one_line_errors(tmp_path, text, needle):
    """Deep nesting (RecursionError in the parser) and integers Python refuses to convert are
    the module's one-line LatencyError, on reading and when --out already exists."""
    from treeopt.profile import Latency, LatencyCurve

    path = tmp_path / "lat.json"
    path.write_text(text)
    with pytest.raises(LatencyError) as exc:
        load_latency(path)
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(f"{path}: not a readable JSON profile")
    assert needle in msg
    lat = Latency(target=LatencyCurve(tokens=[1, 2], ms=[1.0, 1.5]), context=8)
    with pytest.raises(LatencyError) as exc:
        write_latency(lat, path)
    msg = str(exc.value)
    assert "\n" not in msg and needle in msg and msg.endswith("choose another --out")
    assert path.read_text() == text  # left as it was


def test_prefill_is_timed_on_the_longest_prompts_with_a_forked_drafter():
    """The target's forward over each prompt and the drafter's start, timed separately, the
    longest prompts first; the drafter itself never starts (a fork does), and without a
    drafter the draft's times are zeros."""
    from treeopt.decode.drafter import Drafter

    class Counting(Drafter):
        name = "counting"
        shape = None

        def __init__(self):
            self.started = 0

        def start(self, prompt_ids):
            self.started += 1

    target, _ = tiny_pair()
    drafter = Counting()
    prompts = [[1, 2, 3], list(range(1, 21)), [], list(range(1, 11)), [5, 6]]
    got = time_prefill(target, drafter, prompts, warmup=1, most=3)
    assert got["prompt_tokens"] == [20, 10, 3]
    assert all(ms > 0 for ms in got["target_ms"]) and all(ms >= 0 for ms in got["draft_ms"])
    assert drafter.started == 0
    plain = time_prefill(target, None, prompts, warmup=0, most=1)
    assert plain["prompt_tokens"] == [20] and plain["draft_ms"] == [0.0]
    with pytest.raises(LatencyError, match="no prompt"):
        time_prefill(target, None, [[]])



def test_a_slow_phase_across_rounds_cancels_in_the_steady_medians():
    # 1, 2 and 16 tokens (10, 14, 20 ms on a quiet machine), 5 interleaved rounds; the
    # machine runs at half speed from the 16-token call of round 1 to the end of round 3:
    # the 16-token call is slow in 3 rounds of 5, the others in 2
    quiet = [10.0, 14.0, 20.0]
    slow = {(2, 1), (0, 2), (1, 2), (2, 2), (0, 3), (1, 3), (2, 3)}
    samples = [[quiet[i] * (2.0 if (i, r) in slow else 1.0) for r in range(5)]
               for i in range(3)]
    assert [sorted(s)[2] for s in samples] == [10.0, 14.0, 40.0]  # per-call medians: 4x
    assert steady_medians(samples) == pytest.approx(quiet)  # per round: 1.4x and 2x
    steady = steady_samples(samples)
    assert steady[0] == samples[0]  # the first call keeps its own samples and spread
    assert steady[2] == pytest.approx([20.0, 40.0, 20.0, 20.0, 20.0])  # round 1: 40 / 10
    # nothing to normalise by: the samples as they are
    assert steady_samples([[3.0, 1.0]]) == [[3.0, 1.0]]
    assert steady_samples([[0.0, 1.0], [2.0, 2.0]]) == [[0.0, 1.0], [2.0, 2.0]]
    # rounds beyond the shortest call dropped; the level is the first call's median, 1.5
    assert steady_samples([[1.0, 2.0, 9.0], [3.0, 4.0]]) == [[1.0, 2.0], [4.5, 3.0]]
