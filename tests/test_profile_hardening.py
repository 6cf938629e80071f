"""Acceptance profiling, hardened: resume only continues the very prompts it measured, merge
pools only profiles of one pair and setting, the model window is respected, profile files
never replace files of another kind and get ordinary permissions."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from treeopt.cli import main
from treeopt.datasets import Prompt, load_prompts, select
from treeopt.decode.sampling import Sampling
from treeopt.profile import Profile, ProfileError
from treeopt.profile.acceptance import AcceptanceError, AcceptanceRun, profile_acceptance
from treeopt.testing import tiny_causal_lm, tiny_pair

PROMPTS = [[5, 6, 7, 8], [10, 20, 30], [40, 41, 42, 43, 44], [1, 2, 3], [60, 61], [70, 9, 9]]
TEXTS = ["The cat sat on", "Write a poem", "What is 2+2?", "Name three colours",
         "Explain gravity", "Say hi", "Count to five", "Add one and two", "Spell dog"]


def one_line(text: str) -> bool:
    return "\n" not in str(text).strip()


def cli_error(err: str) -> str:
    """The command's one error line (model loading may print progress bars before it)."""
    lines = [line for line in err.splitlines() if line.startswith("treeopt ")]
    assert len(lines) == 1, err
    return lines[0]


# ---------------------------------------------------------------- 1. prefix-stable selection
def test_draw_order_is_prefix_stable_and_draws_the_same_set():
    every = load_prompts("spec_bench")
    for seed in (0, 3):
        full = select(every, n=len(every), seed=seed, order="draw")
        assert sorted(p.id for p in full) == sorted(p.id for p in every)
        for n in (1, 5, 8, 13, 16, 40, 479):
            drawn = select(every, n=n, seed=seed, order="draw")
            assert drawn == full[:n]
            assert {p.id for p in drawn} == {p.id for p in select(every, n=n, seed=seed)}
    # the default keeps dataset order (callers depending on it are unchanged)
    picked = select(every, n=16, seed=0)
    assert picked == sorted(picked, key=every.index)
    with pytest.raises(ValueError, match="order"):
        select(every, n=4, order="random")


def test_resume_refuses_prompts_that_are_not_the_ones_measured(tmp_path):
    target, draft = tiny_pair(seed=1)
    run = AcceptanceRun(width=3, depth=2, max_new_tokens=6)
    out = tmp_path / "r.json"
    profile_acceptance(target, draft, PROMPTS[:3], run, out=out)
    changed = [PROMPTS[0], PROMPTS[3], *PROMPTS[2:]]
    with pytest.raises(AcceptanceError) as exc:
        profile_acceptance(target, draft, changed, run, out=out, resume=True)
    assert one_line(exc.value) and "prompt 2" in str(exc.value)
    assert Profile.load(out).meta["prompts_done"] == 3  # untouched
    # the same first prompts, more after them: continues and equals one run
    resumed = profile_acceptance(target, draft, PROMPTS, run, out=out, resume=True)
    whole = profile_acceptance(target, draft, PROMPTS, run)
    assert resumed.counts == whole.counts and resumed.depth_counts == whole.depth_counts


def test_resume_refuses_a_file_without_a_prompt_record(tmp_path):
    target, draft = tiny_pair(seed=1)
    run = AcceptanceRun(width=3, depth=2, max_new_tokens=6)
    out = tmp_path / "r.json"
    profile_acceptance(target, draft, PROMPTS[:2], run, out=out)
    doc = json.loads(out.read_text())
    del doc["meta"]["prompt_hashes"]
    out.write_text(json.dumps(doc))
    with pytest.raises(AcceptanceError) as exc:
        profile_acceptance(target, draft, PROMPTS, run, out=out, resume=True)
    assert one_line(exc.value) and "which prompts" in str(exc.value)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from helpers import char_tokenizer

    root = tmp_path_factory.mktemp("hardening")
    tiny_causal_lm(num_layers=2, seed=11).save_pretrained(root / "tiny")
    char_tokenizer().save_pretrained(root / "tiny")
    data = root / "prompts.jsonl"
    data.write_text("".join(json.dumps({"id": f"p{i}", "category": "abc"[i % 3], "text": t})
                            + "\n" for i, t in enumerate(TEXTS)))
    return root


def acceptance_args(ws, out, *extra):
    return ["profile", "acceptance", "--target", str(ws / "tiny"), "--draft", "early-exit:1",
            "--device", "cpu", "--threads", "1", "--dataset", str(ws / "prompts.jsonl"),
            "--max-new-tokens", "6", "--width", "3", "--depth", "2", "--out", str(out),
            "--quiet", *extra]


def test_cli_resume_with_more_prompts_counts_each_prompt_once(workspace, tmp_path):
    part, whole = tmp_path / "part.json", tmp_path / "whole.json"
    assert main(acceptance_args(workspace, part, "--prompts", "2")) == 0
    assert main(acceptance_args(workspace, part, "--prompts", "7", "--resume")) == 0
    assert main(acceptance_args(workspace, whole, "--prompts", "7")) == 0
    a, b = Profile.load(part), Profile.load(whole)
    assert a.meta["prompts_done"] == 7
    assert a.counts == b.counts and a.none_count == b.none_count
    assert a.depth_counts == b.depth_counts
    assert a.meta["prompt_hashes"] == b.meta["prompt_hashes"]


def test_cli_resume_with_another_seed_is_refused(workspace, tmp_path, capsys):
    out = tmp_path / "p.json"
    assert main(acceptance_args(workspace, out, "--prompts", "3")) == 0
    before = out.read_text()
    assert main(acceptance_args(workspace, out, "--prompts", "5", "--categories", "b,c",
                                "--resume")) == 2
    err = cli_error(capsys.readouterr().err)
    assert "prompt" in err
    assert out.read_text() == before


# ---------------------------------------------------------------- 2. merge
def _measured(temperature=0.0, seed=0, width=3, depth=2, target="t", draft="d",
              mode="teacher-forced", continuation="target", prompts=PROMPTS[:2]):
    pair = tiny_pair(seed=1)
    run = AcceptanceRun(width=width, depth=depth, max_new_tokens=6, seed=seed, target=target,
                        draft=draft, mode=mode, continuation=continuation,
                        sampling=Sampling(temperature=temperature))
    return profile_acceptance(*pair, prompts, run)


@pytest.mark.parametrize("change, key", [
    ({"target": "other"}, "target"), ({"draft": "other"}, "draft"),
    ({"temperature": 0.7}, "temperature"), ({"continuation": "dataset"}, "continuation"),
    ({"mode": "online"}, "mode"), ({"depth": 3}, "depth"),
])
def test_merge_refuses_profiles_of_another_pair_or_setting(change, key):
    a = _measured()
    b = _measured(**change, prompts=PROMPTS[2:4])
    with pytest.raises(ProfileError) as exc:
        a.merge(b)
    assert one_line(exc.value) and key in str(exc.value)


def test_merge_refuses_other_sampling_rules_and_keeps_settings_for_the_next_merge():
    a, b = _measured(temperature=1.0), _measured(temperature=1.0, prompts=PROMPTS[2:4])
    ab = a.merge(b)
    assert ab.meta["settings"]["target"] == "t"
    c = _measured(temperature=1.0, draft="other", prompts=PROMPTS[4:])
    with pytest.raises(ProfileError, match="draft"):
        ab.merge(c)
    for key, value in (("top_k", 5), ("top_p", 0.9), ("rule", "specinfer")):
        d = dict(b.meta)
        d["settings"] = {**b.meta["settings"], key: value}
        with pytest.raises(ProfileError, match=key):
            a.merge(Profile.from_counts(b.counts, b.none_count, meta=d))


def test_greedy_profiles_merge_whatever_their_unused_sampling_settings():
    a, b = _measured(), _measured(prompts=PROMPTS[2:4])
    meta = dict(b.meta)
    meta["settings"] = {**b.meta["settings"], "top_k": 5, "rule": "specinfer"}
    merged = a.merge(Profile.from_counts(b.counts, b.none_count, meta=meta))
    assert sum(merged.counts) == sum(a.counts) + sum(b.counts)
    with pytest.raises(ProfileError, match="does not record its settings"):
        a.merge(Profile.from_counts(b.counts, b.none_count))


def test_merge_refuses_the_same_measurement_twice(tmp_path, capsys):
    a = _measured()
    b = _measured(prompts=PROMPTS[2:4])
    with pytest.raises(ProfileError) as exc:
        a.merge(a)
    assert one_line(exc.value) and "same" in str(exc.value)
    a.save(tmp_path / "a.json")
    b.save(tmp_path / "b.json")
    shutil.copy(tmp_path / "a.json", tmp_path / "copy.json")
    out = tmp_path / "m.json"
    assert main(["profile", "merge", str(tmp_path / "a.json"), str(tmp_path / "a.json"),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert one_line(err) and "twice" in err
    assert main(["profile", "merge", str(tmp_path / "a.json"), str(tmp_path / "copy.json"),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert one_line(err) and "same" in err
    assert not out.exists()
    assert main(["profile", "merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"),
                 "--out", str(out)]) == 0


def test_cli_merge_names_the_setting_that_differs(tmp_path, capsys):
    _measured().save(tmp_path / "a.json")
    _measured(temperature=1.0, prompts=PROMPTS[2:4]).save(tmp_path / "b.json")
    assert main(["profile", "merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"),
                 "--out", str(tmp_path / "m.json")]) == 2
    err = capsys.readouterr().err
    assert one_line(err) and "temperature" in err


# ---------------------------------------------------------------- 3. model window
LONG = [int(t) for t in (list(range(2, 90)) + list(range(2, 30)))]  # 116 tokens


@pytest.mark.parametrize("mode", ["teacher-forced", "online"])
def test_gpt2_window_left_truncates_prompts_instead_of_crashing(mode, capsys):
    target = tiny_causal_lm("gpt2", max_positions=64, seed=0)
    draft = tiny_causal_lm("gpt2", max_positions=64, seed=1)
    run = AcceptanceRun(width=2, depth=2, max_new_tokens=10, mode=mode)
    prof = profile_acceptance(target, draft, [LONG, [5, 6, 7]], run)
    err = capsys.readouterr().err
    assert "1 prompt" in err and "window" in err
    w = prof.meta["window"]
    assert w["limit"] == 64 and w["prompts_cut"] == 1 and w["prompt_tokens_cut"] == 116 - 54


def test_llama_window_cuts_exactly_what_does_not_fit(capsys):
    """A Llama model's weights do not depend on its window (rotary positions), so the
    profile of a long prompt under a 64-token window must equal the profile of its last
    tokens measured with a wide window: nothing past position 63 is measured."""
    narrow = tiny_causal_lm("llama", max_positions=64, seed=0)
    narrow_d = tiny_causal_lm("llama", max_positions=64, seed=1)
    wide = tiny_causal_lm("llama", max_positions=512, seed=0)
    wide_d = tiny_causal_lm("llama", max_positions=512, seed=1)
    run = AcceptanceRun(width=3, depth=2, max_new_tokens=12)
    got = profile_acceptance(narrow, narrow_d, [LONG], run)
    want = profile_acceptance(wide, wide_d, [LONG[-(64 - 12):]], run)
    assert got.counts == want.counts and got.depth_counts == want.depth_counts
    assert "window" in capsys.readouterr().err
    # a continuation longer than the window is capped (half the window) and said so
    long_run = AcceptanceRun(width=3, depth=2, max_new_tokens=100)
    prof = profile_acceptance(narrow, narrow_d, [[5, 6, 7]], long_run)
    assert sum(prof.counts) + prof.none_count == 32 - 1
    assert prof.meta["window"]["max_new_tokens"] == 32
    assert prof.meta["settings"]["max_new_tokens"] == 100
    assert "32" in capsys.readouterr().err
    # dataset continuation: the text itself is cut to the window
    ds = AcceptanceRun(width=3, depth=2, max_new_tokens=8, continuation="dataset")
    prof = profile_acceptance(narrow, narrow_d, [LONG], ds)
    assert sum(prof.counts) + prof.none_count == 64 - 1


def test_prompts_that_fit_are_measured_without_a_window_note(capsys):
    target, draft = tiny_pair(seed=0)
    prof = profile_acceptance(target, draft, PROMPTS[:2], AcceptanceRun(width=2, depth=2,
                                                                         max_new_tokens=6))
    assert "window" not in capsys.readouterr().err
    assert prof.meta.get("window", {}).get("prompts_cut", 0) == 0


# ---------------------------------------------------------------- 4. files
def _growmap(path):
    from treeopt.growmap import save_growmap
    from treeopt.shapes import chain

    save_growmap(chain(4), path)
    return path.read_bytes()


def test_profiler_refuses_to_overwrite_a_growmap(tmp_path):
    target, draft = tiny_pair(seed=0)
    run = AcceptanceRun(width=2, depth=2, max_new_tokens=6)
    for name, content in (("tree.json", None), ("results.json", b'{"format": "treeopt-eval"}'),
                          ("list.json", b"[1, 2, 3]\n"), ("notes.json", b"hello\n")):
        path = tmp_path / name
        before = _growmap(path) if content is None else content
        path.write_bytes(before)
        with pytest.raises((AcceptanceError, ProfileError)) as exc:
            profile_acceptance(target, draft, PROMPTS[:2], run, out=path)
        assert one_line(exc.value) and "refusing to overwrite" in str(exc.value)
        assert path.read_bytes() == before


def test_cli_acceptance_and_merge_refuse_to_overwrite_a_growmap(workspace, tmp_path, capsys):
    tree = tmp_path / "tree.json"
    before = _growmap(tree)
    assert main(acceptance_args(workspace, tree, "--prompts", "2")) == 2
    err = cli_error(capsys.readouterr().err)
    assert "refusing to overwrite" in err
    assert tree.read_bytes() == before
    _measured().save(tmp_path / "a.json")
    _measured(prompts=PROMPTS[2:4]).save(tmp_path / "b.json")
    assert main(["profile", "merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"),
                 "--out", str(tree)]) == 2
    err = capsys.readouterr().err
    assert one_line(err) and "refusing to overwrite" in err
    assert tree.read_bytes() == before


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_profile_files_get_ordinary_permissions(tmp_path, umask):
    old = os.umask(umask)
    try:
        want = 0o666 & ~umask
        target, draft = tiny_pair(seed=1)
        run = AcceptanceRun(width=3, depth=2, max_new_tokens=6, target="t", draft="d")
        out = tmp_path / "profile.json"
        profile_acceptance(target, draft, PROMPTS[:2], run, out=out)
        assert out.stat().st_mode & 0o777 == want
        profile_acceptance(target, draft, PROMPTS[:3], run, out=out, resume=True)
        assert out.stat().st_mode & 0o777 == want
        _measured(prompts=PROMPTS[3:5]).save(tmp_path / "b.json")
        assert main(["profile", "merge", str(out), str(tmp_path / "b.json"), "--out",
                     str(tmp_path / "m.json")]) == 0
        for name in ("b.json", "m.json"):
            assert (tmp_path / name).stat().st_mode & 0o777 == want
        tmp = list(tmp_path.glob(".*.tmp"))
        assert not tmp
    finally:
        os.umask(old)


def test_prompt_objects_keep_working_with_select_defaults():
    items = [Prompt(str(i), "abc"[i % 3], t) for i, t in enumerate(TEXTS)]
    assert [p.id for p in select(items, n=4, seed=0)] == \
        sorted([p.id for p in select(items, n=4, seed=0, order="draw")], key=int)
