"""Optuna search over tree shapes, for objectives the exact DP cannot model.

The DP is exact for "expected tokens per step under a rank (or depth-rank) profile" and, with
Sequoia's draft cost, for predicted time. It is not exact for measured end-to-end cost,
position-dependent acceptance, per-level draft costs or non-monotone verify costs; there,
trees are searched with Optuna, seeded with the DP tree and the chain.

Parameterisation ("children per rank path"). Every node is named by its rank path from the
root (``c`` = the root, ``c_1_2`` = the 2nd child of the root's 1st child). Nodes are visited
breadth-first; each node above the depth limit gets an integer parameter ``0..W`` = its
number of children (the children are its draft's top choices, ranks 1..k), clipped to the
nodes left in the size budget; parameters of nodes that do not exist are never asked for
(define-by-run). Every tree of at most ``max_size`` nodes, at most ``levels`` levels and at
most W children per node has exactly one parameter set, so the space covers all the DP's
trees, and ``tree_params`` turns any tree into the parameters that rebuild it (used to
enqueue the DP tree and the chain).

Objectives (all maximised, one value per instance reported with ``trial.report``):

- ``model``: the profile's expected tokens per step F(tree) (``metric="tokens"``), or
  predicted tokens/s 1000·F / (draft_ms + verify_ms) from the profile's latency
  (``metric="speed"``, ``treeopt.search.hardware.predict``). The DP tree is enqueued, so the
  result is never worse than the DP's.
- ``replay``: recorded traces replace the models. For each held-out prompt the target's
  greedy continuation and, at each position, the rank of the target's token in the draft's
  top-W list are recorded once (``record_traces``); a tree's accepted length at a step is then
  computable with no model (walk the tree, follow the child whose rank equals the recorded
  rank). Per prompt: measured tokens per step (equal to the engine's, greedy), or that times
  the predicted step rate with ``metric="speed"``. Pruned with ``WilcoxonPruner``.
- ``engine``: run the decoding engine on calibration prompts; per prompt measured tokens/s
  (``metric="speed"``) or tokens per step. Slow and exact. Pruned with ``WilcoxonPruner``.

Storage: any Optuna storage URL; a plain path means an SQLite file. Re-running with the same
study name and storage continues the study (``load_if_exists``); several processes pointing
at one storage share the study. The sampler is ``TPESampler(seed=...)``.

Killed workers. A database storage records a heartbeat of every running trial
(``HEARTBEAT_INTERVAL``); a trial whose heartbeat is older than ``GRACE_PERIOD`` (its worker
was killed) is marked FAIL by the next worker, when it starts and before each of its trials
(``optuna.storages.fail_stale_trials``), and its tree is queued once more. Only COMPLETE (and
PRUNED) trials count: toward the trials a process was asked to run (a trial that fails, e.g.
on a NaN score, is replaced) and in the counts a result reports.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from treeopt.api import as_drafter
from treeopt.decode.engine import generate
from treeopt.decode.sampling import Sampling
from treeopt.errors import TreeoptError
from treeopt.profile.acceptance import prompt_generator, teacher_forced_ranks
from treeopt.search.hardware import DEFAULT_DRAFT_COST, predict, step_cost
from treeopt.tree import Tree

OBJECTIVES = ("model", "replay", "engine")
METRICS = ("tokens", "speed")
# Heartbeats of running trials in a database storage (seconds): every HEARTBEAT_INTERVAL; a
# RUNNING trial silent for GRACE_PERIOD is a killed worker's (generous: a live worker may wait
# up to two minutes for an SQLite lock).
HEARTBEAT_INTERVAL = 30
GRACE_PERIOD = 300
# Times a killed worker's trial is queued again (its tree may be what killed the worker).
STALE_RETRIES = 1


class OptunaSearchError(TreeoptError, ValueError):
    """Bad Optuna-search input; the one-line message says what to change."""


# ---------------------------------------------------------------------------- parameterisation
def param_name(path: Sequence[int]) -> str:
    """``()`` -> ``"c"``, ``(1, 2)`` -> ``"c_1_2"`` (1-based sibling ranks from the root)."""
    return "c" + "".join(f"_{r}" for r in path)


def build_tree(suggest: Callable[[str, int], int], width: int, max_size: int,
               levels: int) -> Tree:
    """Tree from children counts: ``suggest(name, width)`` gives the number of children
    (0..width) of the node named ``name``, asked breadth-first, only for nodes that exist,
    sit above the level limit (``levels`` counts the root) and fit the size budget."""
    parents = [-1]
    queue = deque([((), 0)])
    while queue:
        path, node = queue.popleft()
        room = max_size - len(parents)
        if len(path) + 1 >= levels or room <= 0:
            continue
        k = min(int(suggest(param_name(path), width)), room, width)
        for r in range(1, k + 1):
            queue.append((path + (r,), len(parents)))
            parents.append(node)
    return Tree(tuple(parents))


def tree_from_trial(trial, width: int, max_size: int, levels: int) -> Tree:
    return build_tree(lambda name, w: trial.suggest_int(name, 0, w), width, max_size, levels)


def tree_params(tree: Tree, width: int | None = None, levels: int | None = None) -> dict:
    """The parameters ``build_tree`` needs to rebuild ``tree`` (children per rank path)."""
    levels = tree.depth + 1 if levels is None else levels
    paths = [()] + tree.to_paths()
    out = {}
    for node, path in enumerate(paths):
        path = tuple(r + 1 for r in path)
        if len(path) + 1 < levels:
            k = len(tree.children[node])
            out[param_name(path)] = k if width is None else min(k, width)
    return out


# ---------------------------------------------------------------------------- replay
def replay_steps(tree: Tree, ranks: Sequence[int], start: int = 1) -> list[int]:
    """Tokens each decoding step commits when ``tree`` is verified greedily along a recorded
    trace. ``ranks[t]``: rank of the target's token t in the draft's top-W list there (0 = not
    in it); token 0 comes from the prefill, so steps start at ``start`` = 1. A step at t walks
    the tree following the child whose rank is ranks[t + depth], commits the accepted tokens
    plus the bonus, and is cut at the end of the trace (as the engine cuts at
    ``max_new_tokens``)."""
    n = len(ranks)
    kids = tree.children
    out = []
    t = start
    while t < n:
        node, m = 0, 0
        while t + m < n:
            r = ranks[t + m]
            if r < 1 or r > len(kids[node]):
                break
            node = kids[node][r - 1]
            m += 1
        out.append(min(m + 1, n - t))
        t += m + 1
    return out


def replay_tokens_per_step(tree: Tree, ranks: Sequence[int], start: int = 1) -> float:
    """Tokens per verification step along one trace (the engine's ``tokens_per_step``)."""
    steps = replay_steps(tree, ranks, start)
    return sum(steps) / len(steps) if steps else 0.0


def record_traces(target, draft, prompts: Sequence[Sequence[int]], *, width: int,
                  max_new_tokens: int, temperature: float = 0.0, seed: int = 0,
                  eos_token_id: int | None = None, progress: bool = False) -> list[list[int]]:
    """Per prompt, the rank of each target continuation token among the draft's top-W
    (greedy; at temperature > 0 the stochastic rank along a sampled continuation, an
    approximation). Returns one list of ranks (0 = none) per prompt, token 0 included."""

    traces = []
    items = prompts
    if progress:
        from tqdm import tqdm

        items = tqdm(prompts, desc="replay traces", unit="prompt", dynamic_ncols=True)
    for i, ids in enumerate(items):
        ranks, _ = teacher_forced_ranks(target, draft, ids, width=width,
                                        max_new_tokens=max_new_tokens, temperature=temperature,
                                        generator=prompt_generator(seed, i),
                                        eos_token_id=eos_token_id)
        traces.append(ranks)
    return traces


# ---------------------------------------------------------------------------- objectives
class ModelObjective:
    """F(tree) from the profile, or predicted tokens/s with its latency (one instance)."""

    name = "model"

    def __init__(self, table, latency=None, metric: str = "tokens",
                 draft_cost: str = DEFAULT_DRAFT_COST, empty_rate: float = 0.0):
        if metric == "speed" and latency is None:
            raise OptunaSearchError("metric 'speed' needs a profile with latency; profile "
                                    "latency first or use --metric tokens")
        self.table, self.latency, self.metric, self.draft_cost = table, latency, metric, draft_cost
        self.empty_rate = empty_rate  # steps that propose nothing (model-free drafters)
        self.instances = 1

    def score(self, tree: Tree, index: int) -> float:
        if self.metric == "tokens":
            return tree.expected_tokens(self.table)

        return predict(tree, self.table, self.latency, self.draft_cost,
                       self.empty_rate).tokens_per_s


class ReplayObjective:
    """Measured tokens per step on recorded traces (times the predicted step rate with
    ``metric="speed"``: the step priced by ``treeopt.search.hardware.step_cost``, the same
    envelope-based cost the hardware-aware choice and every prediction use), one instance per
    held-out prompt."""

    name = "replay"
    cheap = True

    def __init__(self, traces: Sequence[Sequence[int]], latency=None, metric: str = "tokens",
                 draft_cost: str = DEFAULT_DRAFT_COST, start: int = 1):
        if metric == "speed" and latency is None:
            raise OptunaSearchError("metric 'speed' needs a latency profile; profile latency "
                                    "first or use --metric tokens")
        self.traces = [list(t) for t in traces if len(t) > start]
        if not self.traces:
            raise OptunaSearchError("no replay traces with at least two tokens; give more "
                                    "prompts or more --max-new-tokens")
        self.latency, self.metric, self.draft_cost, self.start = latency, metric, draft_cost, start
        self.instances = len(self.traces)

    def score(self, tree: Tree, index: int) -> float:
        tau = replay_tokens_per_step(tree, self.traces[index], self.start)
        if self.metric == "tokens":
            return tau

        return 1000.0 * tau / step_cost(tree, self.latency, self.draft_cost).step_ms


class EngineObjective:
    """The engine on calibration prompts: measured tokens/s (``metric="speed"``) or tokens
    per step, one instance per prompt."""

    name = "engine"

    def __init__(self, target, draft, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                 metric: str = "speed", temperature: float = 0.0, seed: int = 0,
                 eos_token_id=None, rule: str = "sequoia"):
        import torch

        self.target, self.metric = target, metric
        self.drafter = as_drafter(draft, target)  # a draft model or any Drafter
        self.prompts = [torch.tensor([list(p)], dtype=torch.long) for p in prompts]
        if not self.prompts:
            raise OptunaSearchError("the engine objective needs calibration prompts")
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.rule = rule
        self.eos_token_id = eos_token_id
        self.seed = seed
        self.instances = len(self.prompts)
        self.score(Tree((-1, 0)), 0)  # warm-up: first calls pay one-off allocation costs

    def score(self, tree: Tree, index: int) -> float:
        drafter = self.drafter.reshaped(tree) if tree.size > 1 else None
        gen = generate(self.target, drafter, self.prompts[index],
                       max_new_tokens=self.max_new_tokens,
                       sampling=Sampling(self.temperature, rule=self.rule,
                                         seed=self.seed + index),
                       eos_token_id=self.eos_token_id)
        if self.metric == "tokens":
            return gen.stats.tokens_per_step
        return gen.stats.generated_tokens / max(gen.stats.total_s, 1e-9)


# ---------------------------------------------------------------------------- the study
@dataclass
class OptunaResult:
    """Best tree found and the baseline (DP) tree, scored by the same objective.

    ``trials``: the study's finished trials (COMPLETE or PRUNED; ``complete`` of them ran in
    full, ``pruned`` were stopped early). ``failed``: the study's FAIL trials, not counted
    (killed workers' trials, NaN scores). ``stale``: numbers of the killed workers' trials
    this process marked FAIL."""

    tree: Tree
    value: float
    baseline: Tree
    baseline_value: float
    objective: str
    metric: str
    study_name: str
    storage: str | None
    trials: int
    complete: int
    pruned: int
    per_instance: list[float] = field(default_factory=list)
    failed: int = 0
    stale: list[int] = field(default_factory=list)

    def meta(self) -> dict:
        return {"method": "optuna", "objective": self.objective, "metric": self.metric,
                "score": self.value, "dp_score": self.baseline_value,
                "dp_tree": self.baseline.to_parents(), "study": self.study_name,
                "trials": self.trials, "complete": self.complete, "pruned": self.pruned,
                "failed": self.failed}


def resolve_storage(storage: str | None, default: str | os.PathLike) -> str:
    """An Optuna storage URL: ``storage`` as given when it has a scheme (``sqlite:///...``,
    ``postgresql://...``), a plain path as an SQLite file, ``None`` as ``default``'s file.

    Checked up front (OptunaSearchError, one line) rather than after Optuna's retries: an
    SQLite path that is a folder or an existing file that is not an SQLite database, a URL
    that is malformed, whose scheme no SQLAlchemy dialect handles, or whose database driver
    is not installed."""
    target = str(storage) if storage else str(default)

    def check_sqlite_file(path: Path) -> None:
        if path.is_dir():
            raise OptunaSearchError(f"Optuna storage {target!r} is a folder; give an SQLite "
                                    f"file path (e.g. {path / 'study.db'}) or a database URL")
        if path.is_file() and path.stat().st_size > 0:
            try:
                with open(path, "rb") as f:
                    header = f.read(16)
            except OSError as exc:
                raise OptunaSearchError(f"Optuna storage {target!r} cannot be read: "
                                        f"{exc.strerror}") from None
            if header != b"SQLite format 3\x00":
                raise OptunaSearchError(f"Optuna storage {target!r} exists and is not an SQLite "
                                        "database; give a new file name or an existing study's "
                                        "database")
        for parent in path.parents:
            if parent.exists():
                if not parent.is_dir():
                    raise OptunaSearchError(f"Optuna storage {target!r}: {parent} is a file, "
                                            "not a folder")
                break

    if "://" not in target:
        path = Path(target)
        check_sqlite_file(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"
    scheme = target.split("://", 1)[0]
    try:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError, NoSuchModuleError
    except ImportError:  # no Optuna either: the search reports that itself
        return target
    try:
        url = make_url(target)
        dialect = url.get_dialect()
    except (ArgumentError, NoSuchModuleError, ValueError):
        raise OptunaSearchError(f"Optuna storage {target!r}: unknown or malformed database URL "
                                f"(scheme {scheme!r}); use sqlite:///PATH, postgresql://... or "
                                "mysql://..., or a plain file path") from None
    if url.get_backend_name() == "sqlite":
        database = url.database or ""
        if database and database != ":memory:" and not database.startswith("file:"):
            check_sqlite_file(Path(database))
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        return target
    try:
        importer = getattr(dialect, "import_dbapi", None) or getattr(dialect, "dbapi")
        importer()
    except ImportError as exc:
        raise OptunaSearchError(f"Optuna storage {target!r}: the database driver for "
                                f"{url.drivername!r} is not installed ({exc})") from None
    return target


def _storage(url: str | None, heartbeat_interval: int = HEARTBEAT_INTERVAL,
             grace_period: int = GRACE_PERIOD, on_stale: Callable | None = None):
    """Optuna storage for ``url`` (None = in memory). A database storage records heartbeats
    (a killed worker's RUNNING trial is failed once silent for ``grace_period`` seconds and
    queued again ``STALE_RETRIES`` times; ``on_stale(study, trial)`` is told). SQLite files
    wait for locks, and the first-time schema creation is retried when another worker creates
    it at the same time."""
    import inspect
    import time

    import optuna

    if url is None:
        return None
    storages = optuna.storages
    retry_cls = getattr(storages, "RetryHeartbeatStaleTrialCallback", None) or \
        storages.RetryFailedTrialCallback
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = retry_cls(max_retry=STALE_RETRIES)

    def stale(study, trial) -> None:
        retry(study, trial)
        if on_stale is not None:
            on_stale(study, trial)

    params = inspect.signature(storages.RDBStorage).parameters
    callback_arg = ("heartbeat_stale_trial_callback"
                    if "heartbeat_stale_trial_callback" in params else "failed_trial_callback")
    kwargs = {"heartbeat_interval": int(heartbeat_interval), "grace_period": int(grace_period),
              callback_arg: stale}
    if url.startswith("sqlite:"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 120}}
    for attempt in range(5):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return storages.RDBStorage(url, **kwargs)
        except Exception:  # a concurrent worker created the schema first
            if attempt == 4 or not url.startswith("sqlite:"):
                raise
            time.sleep(0.5 * (attempt + 1))


def fingerprint(**settings) -> str:
    blob = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _mean(xs: Sequence[float]) -> float:
    return math.fsum(xs) / len(xs)


@dataclass(frozen=True)
class OptunaSettings:
    """How an Optuna study runs: the one settings object of :func:`run_search` and
    ``treeopt.search.api.optuna_tree``. ``trials``: trials this process finishes (None: the
    caller's default); ``timeout`` seconds; ``study_name`` and ``storage`` (an Optuna URL or
    None for in memory) name a study to create or continue; ``seed`` seeds the TPE sampler;
    ``worker`` is recorded on each trial; ``pruning`` enables the Wilcoxon pruner; a killed
    worker's trial, silent for ``grace_period`` seconds (heartbeats every
    ``heartbeat_interval``), is failed and its tree queued again."""

    trials: int | None = None
    timeout: float | None = None
    study_name: str = "treeopt"
    storage: str | None = None
    seed: int = 0
    worker: str | None = None
    pruning: bool = True
    heartbeat_interval: int = HEARTBEAT_INTERVAL
    grace_period: int = GRACE_PERIOD


def run_search(objective, *, width: int, max_size: int, levels: int,
               optuna_settings: OptunaSettings,
               seeds: Sequence[Tree] = (), baseline: Tree | None = None,
               settings: dict | None = None) -> OptunaResult:
    """Run (or continue) a study maximising ``objective`` over trees.

    ``objective`` has ``instances`` and ``score(tree, index) -> float``; a trial's value is
    the mean over instances, each reported with ``trial.report(value, step=index)`` (in a
    per-trial shuffled order) and pruned by ``WilcoxonPruner`` when ``pruning`` and there are
    several instances. ``seeds`` are enqueued (skipped when already in the study);
    ``baseline`` (default: the first seed) is scored beside the best. ``settings`` is stored
    with a new study and must match when an existing one is continued. ``storage``: an
    Optuna storage URL (see ``resolve_storage``) or None for an in-memory study.

    ``optuna_settings.trials``: trials this process finishes (COMPLETE or PRUNED; a trial
    that fails is replaced); the rest of it (:class:`OptunaSettings`) names the study. A killed
    worker's trial, silent for ``grace_period`` seconds (heartbeats every
    ``heartbeat_interval``), is marked FAIL here and its tree queued once more."""
    how = optuna_settings
    n_trials, seed, study_name = how.trials or 0, how.seed, how.study_name
    storage, timeout, worker, pruning = how.storage, how.timeout, how.worker, how.pruning
    heartbeat_interval, grace_period = how.heartbeat_interval, how.grace_period
    import time

    import numpy as np
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if max_size < 1 or levels < 1 or width < 1:
        raise OptunaSearchError(f"max size {max_size}, levels {levels} and width {width} must "
                                "all be >= 1")
    seeds = [t for t in seeds if t.size <= max_size and t.depth < levels]
    if baseline is None:
        if not seeds:
            raise OptunaSearchError("give a baseline tree or seeds to compare against")
        baseline = seeds[0]
    multi = objective.instances > 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        pruner = optuna.pruners.WilcoxonPruner(p_threshold=0.1) if multi and pruning \
            else optuna.pruners.NopPruner()
    sampler = optuna.samplers.TPESampler(seed=seed)
    stale: list[int] = []
    store = _storage(storage, heartbeat_interval, grace_period,
                     on_stale=lambda study, trial: stale.append(trial.number))
    study = optuna.create_study(study_name=study_name, storage=store,
                                sampler=sampler, pruner=pruner, direction="maximize",
                                load_if_exists=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # killed workers' trials, before counting
    want = fingerprint(width=width, max_size=max_size, levels=levels,
                       objective=getattr(objective, "name", "?"), **(settings or {}))
    have = study.user_attrs.get("fingerprint")
    if have is None:
        study.set_user_attr("fingerprint", want)
        study.set_user_attr("settings", {"width": width, "max_size": max_size, "levels": levels,
                                         "objective": getattr(objective, "name", "?"),
                                         **(settings or {})})
    elif have != want:
        raise OptunaSearchError(f"study {study_name!r} in this storage was made with other "
                                "settings (profile, limits or objective); pass a new "
                                "--study-name or --storage")
    for tree in seeds:
        study.enqueue_trial(tree_params(tree, width, levels), skip_if_exists=True)

    cache: dict[tuple[Tree, int], float] = {}

    def score(tree: Tree, i: int) -> float:
        if (tree, i) in cache:
            return cache[(tree, i)]
        value = float(objective.score(tree, i))
        if math.isfinite(value):  # a NaN fails its trial; scoring it again may work
            cache[(tree, i)] = value
        return value

    def trial_objective(trial) -> float:
        tree = tree_from_trial(trial, width, max_size, levels)
        trial.set_user_attr("parents", tree.to_parents())
        if worker is not None:
            trial.set_user_attr("worker", worker)
        if not multi:
            return score(tree, 0)
        n = objective.instances
        order = np.random.default_rng(trial.number).permutation(n)
        seen = all((tree, i) in cache for i in range(n))  # a repeat: nothing left to save
        checks = set(range(1, n + 1))
        if getattr(objective, "cheap", False):
            # scoring is far cheaper than the test (scipy falls back to a permutation test
            # on ties): test twice per trial
            checks = {max(1, n // 2), max(1, (3 * n) // 4)}
        values = []
        for i in order:
            values.append(score(tree, int(i)))
            trial.report(values[-1], int(i))
            if not seen and len(values) in checks and trial.should_prune():
                # Optuna's recommended use of this pruner: return the partial mean (TPE learns
                # from it); the flag keeps such trials out of the "best" below.
                trial.set_user_attr("pruned", True)
                return _mean(values)
        return _mean(values)

    State = optuna.trial.TrialState
    counted = (State.COMPLETE, State.PRUNED)
    finished = [0]  # trials this process finished (COMPLETE or PRUNED)

    def count(study, trial) -> None:
        if trial.state in counted:
            finished[0] += 1

    if n_trials > 0 or timeout:
        end = None if not timeout else time.monotonic() + timeout
        while True:
            left = None if end is None else end - time.monotonic()
            if left is not None and left <= 0:
                break
            want = n_trials - finished[0] if n_trials > 0 else None
            before = finished[0]
            try:
                study.optimize(trial_objective, n_trials=want, timeout=left,
                               gc_after_trial=False, callbacks=[count])
            except optuna.exceptions.UpdateFinishedTrialError:
                # another worker ran the same enqueued seed and finished it first (SQLite has
                # no row locks, so two workers can pop one waiting trial): go on with the rest
                continue
            # done, or a round whose every trial failed (no point in repeating it)
            if want is None or finished[0] >= n_trials or finished[0] == before:
                break

    trials = study.trials
    done = [t for t in trials if t.state == State.COMPLETE]
    full = [t for t in done if not t.user_attrs.get("pruned") and "parents" in t.user_attrs]
    if not full:
        raise OptunaSearchError("the study has no complete trial yet; run more --trials")
    best = max(full, key=lambda t: (t.value, -t.number))
    best_tree = Tree(tuple(best.user_attrs["parents"]))
    per = [score(best_tree, i) for i in range(objective.instances)]
    base_value = _mean([score(baseline, i) for i in range(objective.instances)])
    return OptunaResult(tree=best_tree, value=float(best.value), baseline=baseline,
                        baseline_value=base_value, objective=getattr(objective, "name", "?"),
                        metric=getattr(objective, "metric", "?"), study_name=study_name,
                        storage=storage,
                        trials=sum(t.state in counted for t in trials), complete=len(full),
                        pruned=len(done) - len(full) + sum(t.state == State.PRUNED
                                                           for t in trials),
                        per_instance=per, failed=sum(t.state == State.FAIL for t in trials),
                        stale=stale)
