"""treeopt eval with any drafter and Hugging Face's reference methods (prompt lookup,
assisted generation), on tiny random llamas."""

import math

import pytest
import torch
from helpers import serve_pair

from treeopt.decode.drafter import Drafter, proposal_from_paths, register_drafter
from treeopt.decode.engine import generate as engine_generate
from treeopt.decode.sampling import Sampling
from treeopt.evaluate.methods import (
    AR,
    Method,
    ar_method,
    chain_method,
    dp_method,
    drafter_method,
    tree_method,
)
from treeopt.evaluate.reference import hf_assisted, hf_prompt_lookup
from treeopt.evaluate.runner import EvalConfig, EvalError, run_eval
from treeopt.testing import tiny_pair
from treeopt.tree import Tree

N = 9  # new tokens per prompt
CHAIN3 = Tree.from_parents([-1, 0, 1])

# prompt tuple -> plain greedy continuation, filled by the fixture; factory calls counted.
CONTINUATIONS: dict[tuple, list[int]] = {}
BUILDS: list[str] = []


class OracleDrafter(Drafter):
    """Proposes the target's own greedy continuation (precomputed), one candidate per
    node: every drafted token is accepted."""

    name = "test-oracle"

    def __init__(self, shape: Tree | None = None):
        self.shape = shape if shape is not None else Tree((-1, 0))
        self.prompt: tuple = ()
        self.device = torch.device("cpu")

    def start(self, prompt_ids):
        self.prompt = tuple(prompt_ids[0].tolist())
        self.device = prompt_ids.device

    def propose(self, committed, max_depth, sampling, generator=None):
        future = CONTINUATIONS[self.prompt][len(committed) - len(self.prompt):]
        return proposal_from_paths(committed, lambda path: future[len(path):len(path) + 1],
                                   self.shape, max_depth, self.device)


@register_drafter("test-oracle", "tests only: the target's own greedy continuation")
def _oracle(options, *, target, tokenizer, tree):
    BUILDS.append(options)
    return OracleDrafter(tree)


def _prompts():
    # Repetitive token ids, so prompt lookup and n-grams find matches.
    return [tuple(range(3 + i, 10 + i)) * 2 + (3 + i,) for i in range(3)]


@pytest.fixture(scope="module")
def models():
    target, draft = tiny_pair()
    for p in _prompts():
        CONTINUATIONS[p] = engine_generate(target, None, torch.tensor([p]),
                                           max_new_tokens=N + 4).tokens
    return target, draft


@pytest.fixture(scope="module")
def mixed_run(models):
    target, draft = models
    BUILDS.clear()
    methods = [chain_method(2), drafter_method("test-oracle@chain:3"),
               drafter_method("test-oracle"), drafter_method("ngram@chain:3"),
               hf_prompt_lookup(2)]
    res = run_eval(target, draft, _prompts(), methods,
                   config=EvalConfig(max_new_tokens=N, warmup=False), progress=False)
    return res


def test_every_method_matches_plain_decoding(mixed_run):
    res = mixed_run
    names = [AR, "chain:3", "test-oracle@chain:3", "test-oracle", "ngram@chain:3", "hf-pld:2"]
    assert res.failures == []
    assert set(res.rows["method"]) == set(names)
    assert res.rows["matches_ar"].all()
    assert (res.rows["new_tokens"] == N).all()          # the HF method too
    assert res.rows["tokens_per_step"].notna().all()
    s = res.summary.set_index("method")
    assert list(s.index) == names
    assert (s["matches_ar"] == "3/3").all()
    # Oracle drafts are always accepted: 8 tokens after the prefill token, in steps of
    # 3, 3, 2 (chain of 2 drafted) or 2, 2, 2, 2 (the drafter's own 1-token chain).
    assert s.loc["test-oracle@chain:3", "tokens_per_step"] == pytest.approx(8 / 3)
    assert s.loc["test-oracle@chain:3", "acceptance_rate"] == pytest.approx(1.0)
    assert s.loc["test-oracle", "tokens_per_step"] == pytest.approx(2.0)
    assert s.loc[AR, "tokens_per_step"] == pytest.approx(1.0)
    # Each drafter is built once per run, not per prompt.
    assert sorted(BUILDS) == ["", ""]


def test_hf_row_counts_and_time_split(mixed_run):
    rows = mixed_run.rows.set_index("method")
    hf = mixed_run.rows[mixed_run.rows["method"] == "hf-pld:2"]
    # forwards counted by the hook, minus the prefill one; tokens per step measured.
    assert (hf["target_forwards"] >= 1).all() and (hf["target_forwards"] <= N - 1).all()
    assert (hf["step_tokens"] == N - 1).all()
    assert (hf["tokens_per_step"] >= 1.0).all()
    assert (hf["accepted"] == N - hf["target_forwards"] - 1).all()
    assert (hf["drafted"] >= hf["accepted"]).all()
    assert hf["draft_s"].isna().all() and (hf["verify_s"] > 0).all()
    assert (rows.loc[AR, "prefill_s"] > 0).all() and (rows.loc[AR, "other_s"] >= 0).all()
    s = mixed_run.summary.set_index("method")
    for col in ("prefill_ms", "draft_ms_per_step", "verify_ms_per_step", "other_ms_per_step"):
        assert col in s.columns
        assert s.loc["chain:3", col] >= 0
    assert math.isnan(s.loc["hf-pld:2", "draft_ms_per_step"])
    assert s.loc["hf-pld:2", "verify_ms_per_step"] > 0


@pytest.mark.parametrize("draft", ["model", "early-exit:1"])
def test_hf_assisted_matches(models, draft):
    target, draft_model = models
    res = run_eval(target, draft_model if draft == "model" else draft, _prompts()[:2],
                   [chain_method(2), hf_assisted()],
                   config=EvalConfig(max_new_tokens=N, warmup=False), progress=False)
    assert res.failures == [] and res.rows["matches_ar"].all()
    assert (res.rows["new_tokens"] == N).all()
    hf = res.rows[res.rows["method"] == "hf-assisted"]
    assert (hf["draft_s"] > 0).all() and (hf["target_forwards"] >= 1).all()


def test_hf_ignores_eos_unless_asked(models, monkeypatch):
    """The target's generation config would stop Hugging Face at its EOS; with stop_at_eos
    off it must still generate exactly max_new_tokens (equal to plain decoding)."""
    target, _ = models
    prompt = _prompts()[0]
    eos = CONTINUATIONS[prompt][2]
    stop = CONTINUATIONS[prompt].index(eos) + 1
    monkeypatch.setattr(target.generation_config, "eos_token_id", eos)
    res = run_eval(target, None, [prompt], [hf_prompt_lookup(2)],
                   config=EvalConfig(max_new_tokens=N, warmup=False), progress=False)
    assert list(res.rows["new_tokens"]) == [N, N] and res.rows["matches_ar"].all()
    monkeypatch.setattr(target.config, "eos_token_id", eos)
    res = run_eval(target, None, [prompt], [hf_prompt_lookup(2)],
                   config=EvalConfig(max_new_tokens=N, stop_at_eos=True, warmup=False),
                   progress=False)
    assert list(res.rows["new_tokens"]) == [stop, stop] and res.rows["matches_ar"].all()


def test_sampling_runs_hf_methods(models):
    target, draft = models
    cfg = EvalConfig(max_new_tokens=6, seed=2, warmup=False,
                     sampling=Sampling(temperature=0.8, top_p=0.9))
    res = run_eval(target, draft, _prompts()[:1], [hf_prompt_lookup(3), hf_assisted()],
                   config=cfg, progress=False)
    assert (res.rows["new_tokens"] == 6).all() and res.rows["matches_ar"].isna().all()


def test_method_errors(models):
    target, draft = models
    with pytest.raises(EvalError, match="hf-assisted needs a draft model"):
        run_eval(target, "ngram", _prompts(), [hf_assisted()], progress=False)
    with pytest.raises(EvalError, match="hf-assisted needs a draft model"):
        run_eval(target, None, _prompts(), [hf_assisted()], progress=False)
    with pytest.raises(EvalError, match="1 <= K <= 2"):
        run_eval(target, None, _prompts(), [hf_assisted(early_exit=3)], progress=False)
    with pytest.raises(EvalError, match="need a draft model"):
        run_eval(target, None, _prompts(), [chain_method(2)], progress=False)
    # A drafter spec method needs no default drafter.
    res = run_eval(target, None, _prompts()[:1], [drafter_method("test-oracle@chain:3")],
                   config=EvalConfig(max_new_tokens=4, warmup=False), progress=False)
    assert res.failures == []
    with pytest.raises(EvalError, match="shape after '@'"):
        drafter_method("ngram@")
    with pytest.raises(EvalError, match="plain decoding always runs"):
        drafter_method("none")
    with pytest.raises(EvalError, match="at least 1"):
        hf_prompt_lookup(0)


def test_method_dict_round_trip():
    methods = [ar_method(), chain_method(3), tree_method("kary:2x2"),
               dp_method([0.6, 0.2, 0.1], 8, 3), drafter_method("ngram"),
               drafter_method("ngram:max=3@kary:2x1"),
               drafter_method("datastore:store.npz@chain:4"), hf_prompt_lookup(4),
               hf_assisted(), hf_assisted(early_exit=3)]
    for m in methods:
        assert Method.from_dict(m.to_dict()) == m
    # Files written before methods had a drafter still load (and compare equal on resume).
    old = {"name": "chain:4", "kind": "chain", "source": "s", "parents": [-1, 0, 1, 2]}
    assert Method.from_dict(old).drafter is None
    assert Method.from_dict(old).to_dict() == old
    d = drafter_method("datastore:store.npz@chain:4")
    assert (d.drafter, d.kind, d.tree) == ("datastore:store.npz", "drafter",
                                           tree_method("chain:4").tree)


def test_cli_builds_methods():
    from treeopt.cli import build_parser
    from treeopt.cli.eval import build_methods

    args = build_parser().parse_args([
        "eval", "--out", "x", "--draft", "early-exit:2", "--chain", "2", "--drafter",
        "ngram@chain:3", "--drafter", "ngram:max=3@kary:2x1", "--hf-prompt-lookup", "2,3",
        "--hf-assisted"])
    methods = build_methods(args, None)
    by_name = {m.name: m for m in methods}
    assert list(by_name) == [AR, "chain:3", "ngram@chain:3", "ngram:max=3@kary:2x1",
                             "hf-pld:2", "hf-pld:3", "hf-assisted"]
    m = by_name["ngram@chain:3"]
    assert (m.kind, m.drafter, m.tree) == ("drafter", "ngram", CHAIN3)
    assert by_name["ngram:max=3@kary:2x1"].tree == tree_method("kary:2x1").tree
    assert by_name["hf-assisted"].drafter == "early-exit:2"
    assert by_name["hf-pld:3"].drafter == "pld:3"
    args = build_parser().parse_args(["eval", "--out", "x", "--draft", "some/model",
                                      "--hf-assisted"])
    assert build_methods(args, None)[-1] == hf_assisted()


def test_cli_eval_with_drafters(models, tmp_path, monkeypatch, capsys):
    from treeopt.cli import main

    serve_pair(monkeypatch, *models, drafter=None)
    data = tmp_path / "q.txt"
    data.write_text("say one one one\nsay two two two\n")
    out = tmp_path / "run"
    rc = main(["eval", "--dataset", str(data), "--draft", "tiny", "--chain", "2",
               "--drafter", "ngram@chain:3",
               "--hf-prompt-lookup", "2", "--hf-assisted", "--max-new-tokens", "6", "--out",
               str(out), "--no-progress", "--no-warmup", "--no-report", "--wide"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    for name in ("ngram@chain:3", "hf-pld:2", "hf-assisted", "verify_ms/step", "2/2"):
        assert name in captured.out
