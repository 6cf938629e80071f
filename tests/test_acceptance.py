"""Acceptance profiler: counts on cases whose acceptance is known by construction."""

from __future__ import annotations

import json

import pytest
import torch

from treeopt.decode.sampling import Sampling
from treeopt.profile import Profile
from treeopt.profile.acceptance import (
    AcceptanceError,
    AcceptanceRun,
    RankCounts,
    count_ranks,
    greedy_ranks,
    profile_acceptance,
    stochastic_ranks,
    teacher_forced_ranks,
    walk_steps,
)
from treeopt.testing import tiny_causal_lm, tiny_pair


def test_greedy_ranks_by_hand():
    # target argmax per row: 2, 0, 3; draft order per row: [2,1,...], [1,3,0,..], [0,1,2,3]
    target = torch.tensor([[0., 1., 5., 2.], [9., 1., 0., 0.], [0., 0., 0., 4.]])
    draft = torch.tensor([[0., 3., 4., 1.], [2., 5., 0., 3.], [4., 3., 2., 1.]])
    assert greedy_ranks(target, draft, 4) == [1, 3, 4]
    assert greedy_ranks(target, draft, 2) == [1, 0, 0]


def test_walk_steps_by_hand():
    ranks = [9, 1, 2, 0, 3, 1, 1, 1, 0, 2]
    # start at 1: accept 1,2 then none at 3 (bonus) -> next step at 4: accept 3,1,1 (depth 3
    # reached, bonus at 7) -> step at 8: none -> step at 9: accept 2, text ends.
    assert walk_steps(ranks, depth=3, start=1) == [[1, 2], [3, 1, 1], [], [2]]
    assert walk_steps([0, 0], depth=2) == [[], []]


def test_count_ranks_by_hand():
    c = count_ranks([1, 2, 0, 1, 1, 1, 0, 2], width=2, depth=2)
    # flat: every position
    assert c.counts == [4, 2] and c.none_count == 2
    # steps: [1,2] (depth reached) | [1,1] (depth reached, bonus at 5) | [] at 6 | [2] cut
    assert c.depth_counts == [[2, 1], [1, 1]]
    assert c.depth_none == [1, 0]  # the cut last step counts no "none"


def sequoia_exact(p, q, width):
    """P(rank k accepted) for Sequoia's rule by enumerating every ordered draw without
    replacement (independent of the implementation under test)."""
    out = [0.0] * width

    def rec(p, q, k, prob):
        if k == width or prob == 0:
            return
        for x in range(len(q)):
            if q[x] <= 0:
                continue
            px = prob * q[x]
            acc = min(1.0, p[x] / q[x])
            out[k] += px * acc
            res = [max(a - b, 0.0) for a, b in zip(p, q)]
            m = sum(res)
            p2 = [r / m for r in res] if m > 1e-12 else list(p)
            q2 = list(q)
            q2[x] = 0.0
            s = sum(q2)
            if s <= 0:
                continue
            q2 = [v / s for v in q2]
            rec(p2, q2, k + 1, px * (1 - acc))

    rec(list(p), list(q), 0, 1.0)
    return out


def test_stochastic_ranks_match_enumeration_within_ci():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    q = torch.tensor([0.1, 0.2, 0.3, 0.4])
    exact = sequoia_exact(p.tolist(), q.tolist(), 3)
    # rank 1: sum min(p, q) = 1 - TV
    assert exact[0] == pytest.approx(float(torch.minimum(p, q).sum()))
    n = 20000
    ranks = stochastic_ranks(p.expand(n, 4), q.expand(n, 4), 3,
                             generator=torch.Generator().manual_seed(0))
    counts = RankCounts(3, 1)
    counts.add_positions(ranks)
    prof = Profile.from_counts(counts.counts, counts.none_count)
    for k, (lo, hi) in enumerate(prof.ci95()):
        assert lo <= exact[k] <= hi, (k, lo, exact[k], hi)
    assert sum(exact) < 1  # rank 4 never drafted at width 3


def test_identical_models_accept_rank_one():
    model = tiny_causal_lm(seed=3)
    prompt = [5, 17, 33, 2, 40]
    ranks, start = teacher_forced_ranks(model, model, prompt, width=4, max_new_tokens=12)
    assert start == 1 and len(ranks) == 12 and set(ranks) == {1}
    ranks, _ = teacher_forced_ranks(model, model, prompt, width=4, max_new_tokens=12,
                                    temperature=1.0, generator=torch.Generator().manual_seed(1))
    assert set(ranks) == {1}  # P == Q: min(1, P/Q) = 1, the first sample is always accepted
    ranks, start = teacher_forced_ranks(model, model, prompt, width=2, continuation="dataset")
    assert start == 0 and ranks == [1] * 4


def test_dataset_continuation_uses_the_text():
    target, draft = tiny_pair(seed=4)
    prompt = [3, 9, 27, 81, 50, 20]
    ranks, _ = teacher_forced_ranks(target, draft, prompt, width=96, continuation="dataset")
    # width = vocabulary: every target argmax is somewhere in the draft's list
    assert 0 not in ranks and len(ranks) == 5
    with torch.no_grad():
        t = target(input_ids=torch.tensor([prompt])).logits[0, :-1]
        d = draft(input_ids=torch.tensor([prompt])).logits[0, :-1]
    order = d.argsort(dim=-1, descending=True)
    want = [int((order[i] == t[i].argmax()).nonzero()) + 1 for i in range(5)]
    assert ranks == want


PROMPTS = [[5, 6, 7, 8], [10, 20, 30], [40, 41, 42, 43, 44], [1, 2, 3], [60, 61], [70, 9, 9]]


def test_profile_writes_counts_and_intervals(tmp_path):
    target, draft = tiny_pair(seed=0)
    run = AcceptanceRun(width=4, depth=3, max_new_tokens=10, sampling=Sampling(temperature=0.0))
    out = tmp_path / "p.json"
    prof = profile_acceptance(target, draft, PROMPTS[:3], run, out=out)
    saved = Profile.load(out)
    assert saved.counts == prof.counts and sum(saved.counts) + saved.none_count == 27
    assert saved.meta["prompts_done"] == 3
    assert saved.meta["ci95"]["p"]["samples"] == 27  # position 0 comes from the prefill
    assert len(saved.meta["ci95"]["p"]["ci95"]) == 4
    # by-depth counts are sums of per-prompt counts, and depth 0 counts one step each
    steps = sum(saved.depth_counts[0]) + saved.depth_none[0]
    assert steps == saved.meta["steps"] and steps >= 3


def test_merge_adds_counts(tmp_path):
    target, draft = tiny_pair(seed=0)
    run = AcceptanceRun(width=3, depth=2, max_new_tokens=8)
    a = profile_acceptance(target, draft, PROMPTS[:2], run)
    b = profile_acceptance(target, draft, PROMPTS[2:4], run)
    both = profile_acceptance(target, draft, PROMPTS[:2] + PROMPTS[2:4], run)
    merged = a.merge(b)
    # prompt indices differ between runs, but greedy runs draw no random numbers
    assert merged.counts == both.counts and merged.none_count == both.none_count
    assert merged.depth_counts == both.depth_counts

    from treeopt.cli import main

    a.save(tmp_path / "a.json")
    b.save(tmp_path / "b.json")
    assert main(["profile", "merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"),
                 "--out", str(tmp_path / "c.json")]) == 0
    c = Profile.load(tmp_path / "c.json")
    assert c.counts == both.counts and "ci95" in c.meta


def test_reliable_table_drops_thin_rows():
    from treeopt.profile.model import reliable_table

    c = RankCounts(2, 3)
    c.counts, c.none_count = [50, 10], 40
    c.depth_counts, c.depth_none = [[30, 10], [12, 3], [0, 0]], [60, 5, 4]
    prof = c.to_profile()
    assert len(prof.by_depth) == 3
    assert reliable_table(prof, 21) == [[0.3, 0.1]]  # depth 1 has 20 samples
    assert reliable_table(prof, 4) == [[0.3, 0.1], [0.6, 0.15], [0.0, 0.0]]
    assert reliable_table(prof, 1000) == [[0.5, 0.1]]


def test_resume_after_interrupt_equals_one_run(tmp_path):
    target, draft = tiny_pair(seed=1)
    run = AcceptanceRun(width=3, depth=3, max_new_tokens=8, seed=7,
                        sampling=Sampling(temperature=1.0))
    whole = profile_acceptance(target, draft, PROMPTS, run)
    out = tmp_path / "r.json"

    def stop(index, counts):
        if index == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        profile_acceptance(target, draft, PROMPTS, run, out=out, save_every=100, on_prompt=stop)
    part = Profile.load(out)
    assert part.meta["prompts_done"] == 3
    assert sum(part.counts) + part.none_count < sum(whole.counts) + whole.none_count
    resumed = profile_acceptance(target, draft, PROMPTS, run, out=out, resume=True)
    assert resumed.counts == whole.counts and resumed.none_count == whole.none_count
    assert resumed.depth_counts == whole.depth_counts and resumed.depth_none == whole.depth_none
    assert Profile.load(out).meta["prompts_done"] == len(PROMPTS)

    other = AcceptanceRun(width=3, depth=3, max_new_tokens=8, seed=7,
                          sampling=Sampling(temperature=0.5))
    with pytest.raises(AcceptanceError, match="temperature"):
        profile_acceptance(target, draft, PROMPTS, other, out=out, resume=True)


@pytest.mark.parametrize("key, value, needle", [
    ("prompts_done", 1e400, "meta.prompts_done = inf must be an integer"),
    ("prompts_done", "3", "meta.prompts_done = '3' must be an integer"),
    ("no_candidate", -1, "meta.no_candidate = -1 must be >= 0"),
    ("seconds", "soon", "meta.seconds = 'soon' must be a number of seconds"),
    ("settings", [1, 2], "meta.settings is not a JSON object"),
])
def test_resume_refuses_damaged_meta_with_one_line(tmp_path, key, value, needle):
    target, draft = tiny_pair(seed=1)
    run = AcceptanceRun(width=2, depth=2, max_new_tokens=6)
    out = tmp_path / "r.json"
    profile_acceptance(target, draft, PROMPTS[:2], run, out=out)
    doc = json.loads(out.read_text())
    doc["meta"][key] = value
    out.write_text(json.dumps(doc))
    with pytest.raises(AcceptanceError) as exc:
        profile_acceptance(target, draft, PROMPTS, run, out=out, resume=True)
    assert "\n" not in str(exc.value) and needle in str(exc.value)


def test_writing_over_unreadable_json_replaces_it(tmp_path):
    """The writer keeps the latency section of an existing profile; a file it cannot read
    (nested too deeply for the parser) has nothing to keep and is replaced, no traceback."""
    from treeopt.profile.acceptance import write_atomic

    out = tmp_path / "p.json"
    out.write_text("[" * 100_000 + "]" * 100_000)
    write_atomic(Profile.from_counts([3, 1], 1), out)
    assert Profile.load(out).counts == [3, 1]


def test_traces_receive_the_per_position_ranks():
    target, draft = tiny_pair(seed=2)
    run = AcceptanceRun(width=3, depth=3, max_new_tokens=10)
    traces = []
    prof = profile_acceptance(target, draft, PROMPTS[:3], run, traces=traces)
    assert traces == [teacher_forced_ranks(target, draft, p, width=3, max_new_tokens=10)[0]
                      for p in PROMPTS[:3]]
    assert sum(len(t) - 1 for t in traces) == prof.meta["positions"]  # walks start at 1


def test_teacher_forced_greedy_equals_online_engine():
    """Greedy along the target's own continuation walks exactly decoding's path."""
    from treeopt.profile.acceptance import online_steps

    target, draft = tiny_pair(seed=2)
    for prompt in PROMPTS[:3]:
        ranks, start = teacher_forced_ranks(target, draft, prompt, width=3, max_new_tokens=20)
        steps, complete = online_steps(target, draft, prompt, width=3, depth=3,
                                       max_new_tokens=20)
        assert walk_steps(ranks, 3, start) == steps
        assert all(complete[:-1])


def test_teacher_forced_runs_the_draft_as_decoding_does():
    """A dynamically quantized (int8) draft scales activations per forward, so one forward over
    the whole continuation predicts differently from decoding's one token per level; the
    profiler runs the draft token by token, and its greedy walk is decoding's exactly (with
    the whole-sequence forward 2 of these 16 walks differed)."""
    from treeopt.models.variants import DraftVariant, apply_variant
    from treeopt.profile.acceptance import online_steps

    prompts = [[1, 5, 9, 13, 2, 7], [3, 3, 8, 1], [10, 20, 30, 40, 50, 60, 70, 80], [4, 2]]
    for seed in range(4):
        target, draft = tiny_pair(seed=seed)
        int8 = apply_variant(draft, DraftVariant(quant="int8"))
        for prompt in prompts:
            ranks, start = teacher_forced_ranks(target, int8, prompt, width=3,
                                                max_new_tokens=20)
            steps, _ = online_steps(target, int8, prompt, width=3, depth=3, max_new_tokens=20)
            assert walk_steps(ranks, 3, start) == steps


def test_online_profile_counts_steps():
    target, draft = tiny_pair(seed=2)
    run = AcceptanceRun(width=2, depth=2, max_new_tokens=12, mode="online")
    prof = profile_acceptance(target, draft, PROMPTS[:2], run)
    assert prof.counts == prof.depth_counts[0]
    assert prof.meta["steps"] == sum(prof.counts) + prof.none_count


def test_bad_settings_are_one_line_errors():
    with pytest.raises(AcceptanceError, match="mode"):
        AcceptanceRun(mode="sideways").check()
    with pytest.raises(AcceptanceError, match="online mode"):
        from treeopt.profile.acceptance import online_steps

        model = tiny_causal_lm()
        online_steps(model, model, [1, 2], width=8, depth=5)
    assert json.dumps(AcceptanceRun().meta())
