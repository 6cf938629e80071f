"""Optuna search: parameterisation, never worse than the DP, replay == engine, shared storage."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from treeopt.profile import Latency, LatencyCurve
from treeopt.search.dp import solve
from treeopt.search.hardware import choose
from treeopt.search.optuna_search import (
    ModelObjective,
    OptunaSearchError,
    OptunaSettings,
    ReplayObjective,
    build_tree,
    record_traces,
    replay_steps,
    replay_tokens_per_step,
    run_search,
    tree_params,
)
from treeopt.shapes import chain, kary
from treeopt.testing import tiny_pair
from treeopt.tree import Tree

P = [0.6, 0.1, 0.05, 0.03]


def test_parameters_rebuild_every_dp_tree():
    dp = solve(P, 24, 6)
    for n in (1, 2, 5, 13, 24):
        for levels in (2, 4, 6):
            tree = dp.tree(n, levels, at_most=True)
            params = tree_params(tree, 4, levels)
            assert build_tree(lambda name, w: params[name], 4, 24, levels) == tree
    hand = Tree((-1, 0, 0, 1, 1, 2, 3))
    params = tree_params(hand, 4, 4)
    assert params == {"c": 2, "c_1": 2, "c_2": 1, "c_1_1": 1, "c_1_2": 0, "c_2_1": 0}
    # the size budget clips: asking for 4 children everywhere gives a BFS-filled tree
    assert build_tree(lambda name, w: w, 4, 7, 3).parents == (-1, 0, 0, 0, 0, 1, 1)


def test_replay_steps_by_hand():
    tree = Tree((-1, 0, 0, 1))  # root -> ranks 1, 2; rank-1 child -> rank 1
    # token 0 from the prefill; step at 1: rank 2 accepted (leaf) + bonus -> next at 3
    # step at 3: rank 1, rank 1 -> depth 2 reached + bonus at 5 -> next at 6: rank 3 fails
    ranks = [0, 2, 9, 1, 1, 0, 3, 1]
    assert replay_steps(tree, ranks) == [2, 3, 1, 1]
    assert replay_tokens_per_step(tree, ranks) == pytest.approx(7 / 4)
    assert replay_steps(chain(5), [0, 1, 1, 1]) == [3]  # cut by the end of the trace


def test_model_objective_never_worse_than_dp(tmp_path):
    levels, size = 5, 16
    dp_tree = solve(P, size, levels).tree(size, levels, at_most=True)
    res = run_search(ModelObjective([P]), width=4, max_size=size, levels=levels,
                     seeds=[dp_tree, chain(levels)],
                     optuna_settings=OptunaSettings(trials=15,
                                                    storage=f"sqlite:///{tmp_path / 's.db'}",
                                                    study_name="m"))
    assert res.value >= res.baseline_value - 1e-12
    assert res.baseline_value == pytest.approx(solve(P, size, levels).value(size, levels, True))
    assert res.tree.expected_tokens([P]) == pytest.approx(res.value)
    # continuing the study adds trials; other settings are refused
    again = run_search(ModelObjective([P]), width=4, max_size=size, levels=levels, seeds=[dp_tree],
                       optuna_settings=OptunaSettings(trials=5,
                                                      storage=f"sqlite:///{tmp_path / 's.db'}",
                                                      study_name="m"))
    assert again.trials == res.trials + 5 and again.value >= res.value
    with pytest.raises(OptunaSearchError, match="other settings"):
        run_search(ModelObjective([P]), width=4, max_size=size + 1, levels=levels, seeds=[dp_tree],
                   optuna_settings=OptunaSettings(trials=1,
                                                  storage=f"sqlite:///{tmp_path / 's.db'}",
                                                  study_name="m"))


def test_speed_objective_beats_or_ties_hardware_choice():
    # a verify cost that is not monotone: 9 tokens are cheaper than 8
    lat = Latency(LatencyCurve([1, 4, 8, 9, 16], [10.0, 11.0, 20.0, 12.0, 30.0]),
                  LatencyCurve([1, 16], [1.0, 1.5]))
    hw = choose([P], lat, 16, 6)
    res = run_search(ModelObjective([P], lat, "speed"), width=4, max_size=16, levels=6,
                     seeds=[hw.tree], optuna_settings=OptunaSettings(trials=20))
    assert res.baseline_value == pytest.approx(hw.tokens_per_s)
    assert res.value >= hw.tokens_per_s - 1e-9


def test_replay_objective_equals_engine_tokens_per_step():
    import torch

    from treeopt.testing import decode

    target, draft = tiny_pair(seed=5)
    prompts = [[3, 14, 15, 92], [65, 35, 89], [79, 32, 38, 46, 26]]
    traces = record_traces(target, draft, prompts, width=3, max_new_tokens=24)
    for tree in (Tree((-1, 0, 0, 1, 1, 3)), kary(3, 2)):
        for ids, trace in zip(prompts, traces):
            gen = decode(target, draft, tree, torch.tensor([ids]), max_new_tokens=24)
            assert len(trace) == len(gen.tokens)
            assert replay_steps(tree, trace) == [s.tokens for s in gen.stats.steps]
            assert replay_tokens_per_step(tree, trace) == pytest.approx(
                gen.stats.tokens_per_step)


def test_replay_search_prunes_and_keeps_best_complete():
    import random

    rng = random.Random(0)
    traces = [[rng.choice([0, 1, 1, 1, 2, 3]) for _ in range(60)] for _ in range(12)]
    base = chain(3)
    res = run_search(ReplayObjective(traces), width=3, max_size=12, levels=5, seeds=[base],
                     optuna_settings=OptunaSettings(trials=25))
    assert res.value >= res.baseline_value
    assert sum(res.per_instance) / len(res.per_instance) == pytest.approx(res.value)
    assert res.complete + res.pruned == res.trials


WORKER = textwrap.dedent("""
    import sys
    from treeopt.search.optuna_search import ModelObjective, OptunaSettings, run_search
    from treeopt.shapes import chain
    run_search(ModelObjective([[0.6, 0.1, 0.05, 0.03]]), width=4, max_size=10, levels=4,
               seeds=[chain(4)],
               optuna_settings=OptunaSettings(trials=6, storage=sys.argv[1], study_name="shared",
                                              seed=int(sys.argv[2]), worker=sys.argv[3]))
""")


def test_two_workers_share_one_sqlite_study(tmp_path):
    import optuna

    url = f"sqlite:///{tmp_path / 'shared.db'}"
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, url, str(i), name])
             for i, name in enumerate(["a", "b"])]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    study = optuna.load_study(study_name="shared", storage=url)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 12
    assert {t.user_attrs.get("worker") for t in study.trials} == {"a", "b"}


HANGING_WORKER = textwrap.dedent("""
    import sys, time
    from treeopt.search.optuna_search import OptunaSettings, run_search
    from treeopt.shapes import chain

    class Hang:
        name, instances, metric = "hang", 1, "tokens"

        def score(self, tree, index):
            time.sleep(3600)  # killed while its trial runs

    run_search(Hang(), width=4, max_size=10, levels=4, seeds=[chain(4)],
               optuna_settings=OptunaSettings(trials=5, storage=sys.argv[1], study_name="killed",
                                              heartbeat_interval=1, grace_period=2))
""")


class _Tokens:
    """F of a fixed rank profile; the first ``nan`` trees scored give NaN (a FAIL trial)."""

    name, instances, metric = "hang", 1, "tokens"

    def __init__(self, nan: int = 0):
        self.nan = nan

    def score(self, tree, index):
        if self.nan > 0:
            self.nan -= 1
            return float("nan")
        return tree.expected_tokens([P])


def test_killed_worker_trial_fails_and_is_not_counted(tmp_path):
    """A worker killed mid-trial left it RUNNING for ever, counted among the study's trials;
    with heartbeats the next worker marks it FAIL (and retries its tree)."""
    import time

    import optuna

    url = f"sqlite:///{tmp_path / 'killed.db'}"
    proc = subprocess.Popen([sys.executable, "-c", HANGING_WORKER, url])
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline
            try:
                study = optuna.load_study(study_name="killed", storage=url)
                if any(t.state == optuna.trial.TrialState.RUNNING for t in study.trials):
                    break
            except Exception:  # the worker has not created the study yet
                pass
            time.sleep(0.2)
        time.sleep(1.5)  # its heartbeat is recorded
    finally:
        proc.kill()
        proc.wait(timeout=30)
    time.sleep(3)  # past the grace period
    res = run_search(_Tokens(), width=4, max_size=10, levels=4, seeds=[chain(4)],
                     optuna_settings=OptunaSettings(trials=3, storage=url, study_name="killed",
                                                    heartbeat_interval=1, grace_period=2))
    trials = optuna.load_study(study_name="killed", storage=url).trials
    states = [t.state for t in trials]
    assert states[0] == optuna.trial.TrialState.FAIL
    assert optuna.trial.TrialState.RUNNING not in states
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 3 and res.trials == 3 == res.complete + res.pruned
    assert res.failed == 1
    # the killed trial's tree (the seed chain) was run again
    assert any(t.user_attrs.get("parents") == list(chain(4).to_parents()) for t in complete)


def test_failed_trials_do_not_count_toward_the_requested_number(tmp_path):
    res = run_search(_Tokens(nan=1), width=4, max_size=10, levels=4, seeds=[chain(4)],
                     optuna_settings=OptunaSettings(trials=4,
                                                    storage=f"sqlite:///{tmp_path / 'nan.db'}",
                                                    study_name="nan"))
    assert res.complete + res.pruned == res.trials == 4 and res.failed == 1
    memory = run_search(_Tokens(nan=2), width=4, max_size=10, levels=4, seeds=[chain(4)],
                        optuna_settings=OptunaSettings(trials=3))
    assert memory.trials == 3 and memory.failed == 2


def test_a_seed_another_worker_finished_first_does_not_stop_the_search(monkeypatch):
    """Two workers on one SQLite study can pop the same enqueued seed (no row locks there);
    the one that reports second gets UpdateFinishedTrialError from Optuna. The search goes
    on with its remaining trials instead of failing."""
    import optuna

    real = optuna.study.Study.optimize
    calls = []

    def optimize(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise optuna.exceptions.UpdateFinishedTrialError("Trial#0 has already finished")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(optuna.study.Study, "optimize", optimize)
    res = run_search(ModelObjective([[0.6, 0.1, 0.05, 0.03]]), width=4, max_size=10, levels=4,
                     seeds=[chain(4)], optuna_settings=OptunaSettings(trials=6))
    assert len(calls) == 2 and res.complete == 6
