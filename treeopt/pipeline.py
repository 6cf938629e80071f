"""The pipeline as library calls: profile a pair, search its tree, save it.

    import treeopt

    found = treeopt.search_tree("profiles/sequoia-reference-l40-7b.json", out="best.pt")
    print(found.tree.size, found.expected_tokens, found.prediction.speedup)

    run = treeopt.tune("smollm2", "early-exit:4", "spec_bench", out_dir="runs/ee4")
    print(run.tree, run.prediction.tokens_per_s, run.files)

``treeopt search`` and ``treeopt tune`` are these functions with argument parsing before and
printing after; ``treeopt search --method optuna`` is :func:`optuna_tree`. The same steps
give the same tree whichever way they are run: one rank table per profile
(:func:`rank_table`), one draft-cost default (``DEFAULT_DRAFT_COST``, "per-level": what
treeopt's engine runs), one level limit default and one rule for the sizes the
hardware-aware sweep considers (``treeopt.search.hardware.default_max_size``).

Units. Sizes count NODES, root included (a tree of n nodes drafts n - 1 tokens). Limits on
height are given either as ``max_levels`` (levels, root included: Sequoia's ``max_depth``,
what the DP counts) or as ``max_depth`` (edges, like ``Tree.depth`` and shape strings such as
``dp:64x8``), never both; :func:`level_limit` converts, once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from treeopt.errors import TreeoptError
from treeopt.limits import MAX_TREE_LEVELS, check_nodes
from treeopt.search.hardware import DEFAULT_DRAFT_COST, DEFAULT_MAX_LEVELS, DRAFT_COSTS
from treeopt.tree import Tree

# Acceptance profiling defaults by device (smaller samples without a GPU).
CPU_PROMPTS, GPU_PROMPTS = 8, 40
CPU_NEW_TOKENS, GPU_NEW_TOKENS = 32, 128
# Latency profiling defaults by device: sizes interleaved, 10 timed runs per point on CPU too
# (a stable median needs them).
CPU_LATENCY = dict(tokens=(1, 2, 4, 8, 16, 32), context=128, repeats=10, warmup=2)
GPU_LATENCY = dict(tokens=(1, 2, 4, 8, 16, 32, 64, 128), context=256, repeats=10, warmup=3)
# Per-depth acceptance rows ``tune`` measures by default (depths in edges below the root).
TUNE_ACCEPTANCE_DEPTH = 4


class PipelineError(TreeoptError, ValueError):
    """A pipeline request that cannot be run as given; the one-line message says what to
    change."""


# ---------------------------------------------------------------------------- shared rules
def level_limit(max_levels: int | None = None, max_depth: int | None = None) -> int:
    """The DP's level limit (root counted) from ``max_levels`` or ``max_depth`` (edges; one
    level fewer); ``DEFAULT_MAX_LEVELS`` when neither is given."""
    from treeopt.search.dp import levels_for_depth

    if max_levels is not None and max_depth is not None:
        raise PipelineError(f"give the height limit once: max_levels={max_levels} (root "
                            f"counted) or max_depth={max_depth} (edges), not both")
    if max_depth is not None:
        if max_depth < 0:
            raise PipelineError(f"max_depth counts edges below the root: at least 0, got "
                                f"{max_depth}")
        levels = levels_for_depth(max_depth)
    else:
        levels = DEFAULT_MAX_LEVELS if max_levels is None else max_levels
    if levels < 1:
        raise PipelineError(f"max_levels counts levels with the root: at least 1, got {levels}")
    if levels > MAX_TREE_LEVELS:
        raise PipelineError(f"the height limit ({levels} levels, depth {levels - 1}) exceeds "
                            f"the limit of {MAX_TREE_LEVELS} levels (MAX_TREE_NODES)")
    return int(levels)


def rank_table(profile, depth_aware: bool = True) -> list[list[float]]:
    """The rank table every search, prediction and comparison uses for ``profile``: its
    per-depth rows that were measured on enough steps (``reliable_table``), or with
    ``depth_aware=False`` its single rank row."""
    if not depth_aware:
        return profile.table(depth_aware=False)
    from treeopt.profile.acceptance import reliable_table

    return reliable_table(profile)


def load_profile(profile):
    """A ``Profile`` from a Profile or a path (.json, or Sequoia's acceptance vector .pt)."""
    if isinstance(profile, (str, os.PathLike)):
        from treeopt.profile import Profile

        return Profile.load(profile)
    return profile


def _check_cost(draft_cost: str) -> None:
    if draft_cost not in DRAFT_COSTS:
        raise PipelineError(f"unknown draft cost model {draft_cost!r}; use one of "
                            f"{', '.join(DRAFT_COSTS)}")


# ---------------------------------------------------------------------------- search
@dataclass
class SearchResult:
    """A searched tree and how it was found.

    ``expected_tokens``: F(tree) under ``rank_table`` (tokens per target forward, bonus
    included). ``prediction``: step time, tokens/s and speed-up (``None`` without a latency
    table). ``choice``: the hardware-aware choice with its candidates (``None`` for a fixed
    budget). ``table``: the DP's F*(m, l) for every size m <= ``max_size`` and level limit
    l <= ``max_levels``. ``max_size``: the budget, or the largest size the sweep considered.
    ``notes``: one-line warnings (falling latency curves, extrapolated costs). ``meta``: what
    the growmap records. ``path``: the saved growmap, if any. ``optuna``: the study's result
    (:func:`optuna_tree` only). ``treeset``: with a latency table measured at several
    contexts and no fixed budget, one tree per context bucket (``treeopt.treeset.TreeSet``;
    ``tree`` is then its first bucket's, the choice at the smallest context), else None."""

    tree: Tree
    expected_tokens: float
    prediction: Any
    choice: Any
    table: Any
    rank_table: list
    profile: Any
    mode: str
    max_size: int
    max_levels: int
    draft_cost: str
    notes: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    path: Path | None = None
    optuna: Any = None
    treeset: Any = None

    def save(self, path: str | os.PathLike) -> Path:
        """Write the tree as a growmap (.pt, Sequoia-compatible, or .json) with ``meta``."""
        from treeopt.growmap import save_growmap

        self.path = save_growmap(self.tree, path, self.meta)
        return self.path


def search_tree(profile, *, budget: int | None = None, at_most: bool = False,
                max_levels: int | None = None, max_depth: int | None = None,
                max_size: int | None = None, draft_cost: str = DEFAULT_DRAFT_COST,
                depth_aware: bool = True, measured_sizes_only: bool = False,
                out: str | os.PathLike | None = None,
                picture: str | os.PathLike | None = None,
                context: int | None = None) -> SearchResult:
    """The exact DP's best tree for ``profile`` (a Profile or a profile file).

    With ``budget``: the best tree of exactly ``budget`` nodes (at most, with ``at_most``).
    Without: the hardware-aware choice of size and level limit from the profile's latency
    table (``treeopt.search.hardware.choose``), over every size up to ``max_size`` (default:
    the largest measured latency point, clamped to ``MAX_TREE_NODES``), or only the measured
    sizes with ``measured_sizes_only``. Height: ``max_levels`` (root counted) or
    ``max_depth`` (edges); default ``DEFAULT_MAX_LEVELS`` levels. ``out`` saves the growmap,
    ``picture`` draws it (.png/.svg/.pdf/.dot).

    Latency measured at several contexts (``treeopt.search.hardware``): ``context`` prices
    every cost at that many cached tokens (interpolated between measured contexts); without
    it the hardware-aware choice is made at every measured context and ``treeset`` holds one
    tree per context bucket (``choose_per_context``; save it with
    ``treeopt.treeset.save_treeset``), ``tree`` being the smallest context's."""
    from treeopt.profile.latency import contexts_of
    from treeopt.search.dp import solve
    from treeopt.search.hardware import (choose, curve_notes, default_max_size,
                                         empty_step_rate, predict)

    _check_cost(draft_cost)
    levels = level_limit(max_levels, max_depth)
    prof = load_profile(profile)
    table_p = rank_table(prof, depth_aware)
    latency = prof.latency
    empty = empty_step_rate(prof)
    choice = None
    if budget is not None:
        if measured_sizes_only:
            raise PipelineError("measured_sizes_only chooses the size from the latency table; "
                                "it does not apply to a fixed budget")
        check_nodes(budget, "budget", PipelineError)
        if budget < 1:
            raise PipelineError(f"budget must be at least 1 node (the root), got {budget}")
        sweep = budget
        dp = solve(table_p, budget, levels)
        size = dp.best_size(budget, levels) if at_most else budget
        tree = dp.tree(size, levels)
        expected = dp.value(size, levels)
        mode = "fixed budget"
    else:
        if latency is None:
            where = f"{profile} has" if isinstance(profile, (str, os.PathLike)) else \
                "the profile has"
            raise PipelineError(f"{where} no latency table: give a fixed budget (--budget N) "
                                "or add latency to the profile (treeopt profile latency)")
        if max_size is not None:
            check_nodes(max_size, "max_size", PipelineError)
            if max_size < 1:
                raise PipelineError(f"max_size must be at least 1, got {max_size}")
        sweep = max_size or default_max_size(latency)
        dp = solve(table_p, sweep, levels)
        choice = choose(table_p, latency, sweep, levels, draft_cost, table=dp, empty_rate=empty,
                        measured_only=measured_sizes_only, context=context)
        tree, expected = choice.tree, choice.expected_tokens
        mode = "hardware-aware"
    pred = predict(tree, table_p, latency, draft_cost, empty, context) \
        if latency is not None else None
    notes = list(choice.notes) if choice is not None else (
        curve_notes(latency, tree, draft_cost) if latency is not None else [])
    treeset = None
    if choice is not None and context is None and len(contexts_of(latency)) > 1:
        from treeopt.search.hardware import choose_per_context
        from treeopt.treeset import from_choices

        per = choose_per_context(table_p, latency, sweep, levels, draft_cost, table=dp,
                                 empty_rate=empty, measured_only=measured_sizes_only)
        set_meta = {"method": "dp", "mode": "hardware-aware per context",
                    "draft_cost": draft_cost, "max_size": sweep, "max_levels": levels,
                    "measured_sizes_only": bool(measured_sizes_only),
                    "depth_aware": len(table_p) > 1}
        if isinstance(profile, (str, os.PathLike)):
            set_meta["profile"] = str(profile)
        treeset = from_choices(per, set_meta)

    meta: dict = {"method": "dp", "mode": mode, "expected_tokens": expected,
                  "size": tree.size, "depth": tree.depth, "max_levels": levels,
                  "depth_aware": len(table_p) > 1}
    if isinstance(profile, (str, os.PathLike)):
        meta["profile"] = str(profile)
    if budget is not None:
        meta.update(budget=budget, at_most=bool(at_most))
    else:
        meta.update(max_size=sweep, measured_sizes_only=bool(measured_sizes_only))
    if pred is not None:
        meta.update(draft_cost=draft_cost, predicted_step_ms=pred.step_ms,
                    predicted_tokens_per_s=pred.tokens_per_s, predicted_speedup=pred.speedup)
    if latency is not None and (context is not None or len(contexts_of(latency)) > 1):
        meta["context"] = context if context is not None else latency.context
    result = SearchResult(tree=tree, expected_tokens=expected, prediction=pred, choice=choice,
                          table=dp, rank_table=table_p, profile=prof, mode=mode,
                          max_size=sweep, max_levels=levels, draft_cost=draft_cost,
                          notes=notes, meta=meta, treeset=treeset)
    if out is not None:
        result.save(out)
    if picture is not None:
        from treeopt.viz import draw_tree

        draw_tree(tree, picture, profile=table_p)
    return result


# ---------------------------------------------------------------------------- optuna
OPTUNA_OBJECTIVES = ("model", "replay", "engine")
# The Optuna search's size limit when neither a budget, a max_size nor a latency table says.
OPTUNA_MAX_SIZE = 64


def optuna_size_limit(profile, budget: int | None = None, max_size: int | None = None) -> int:
    """The Optuna search's size limit: ``budget``, else ``max_size``, else the largest
    measured latency point (clamped to ``MAX_TREE_NODES``), else ``OPTUNA_MAX_SIZE``."""
    from treeopt.search.hardware import default_max_size

    latency = load_profile(profile).latency
    return budget or max_size or (default_max_size(latency) if latency is not None
                                  else OPTUNA_MAX_SIZE)


def optuna_tree(profile, *, objective: str = "model", metric: str | None = None,
                budget: int | None = None, max_size: int | None = None,
                max_levels: int | None = None, max_depth: int | None = None,
                draft_cost: str = DEFAULT_DRAFT_COST, depth_aware: bool = True,
                trials: int | None = None, timeout: float | None = None,
                study_name: str = "treeopt", storage: str | None = None, seed: int = 0,
                worker: str | None = None, target: str | None = None, draft: str | None = None,
                dataset: str = "spec_bench", prompts: int = 8, max_new_tokens: int = 64,
                temperature: float = 0.0, device: str = "auto", progress: bool = False,
                out: str | os.PathLike | None = None) -> SearchResult:
    """An Optuna search over trees (``treeopt.search.optuna_search``), seeded with the DP's
    trees and a chain, for objectives the DP cannot model.

    ``objective``: "model" (the profile's F, or predicted tokens/s with its latency),
    "replay" (recorded greedy traces of ``prompts`` held-out prompts of ``dataset``; needs
    ``target`` and ``draft``) or "engine" (measured decoding; the same). ``metric``: "tokens"
    or "speed" (default: speed when the profile has latency or with "engine"). Size limit:
    ``budget`` or ``max_size`` (default: the largest measured latency point, clamped, else
    64 nodes); height: ``max_levels`` or ``max_depth`` as in :func:`search_tree`.
    ``trials``: trials this process finishes, COMPLETE or PRUNED (a failed one is replaced);
    default 200 (20 for "engine"). ``storage``: an Optuna storage URL or an SQLite file path
    (checked before any work; ``None`` = in memory); a study with the same ``study_name``
    there is continued, and a trial left RUNNING by a killed worker is marked FAIL (its tree
    queued again) instead of being counted (``treeopt.search.optuna_search.run_search``)."""
    from treeopt.search.dp import solve
    from treeopt.search.hardware import choose, empty_step_rate, predict
    from treeopt.search.optuna_search import (EngineObjective, ModelObjective, ReplayObjective,
                                              fingerprint, record_traces, resolve_storage,
                                              run_search)
    from treeopt.shapes import chain

    if objective not in OPTUNA_OBJECTIVES:
        raise PipelineError(f"unknown objective {objective!r}; use one of "
                            f"{', '.join(OPTUNA_OBJECTIVES)}")
    _check_cost(draft_cost)
    levels = level_limit(max_levels, max_depth)
    url = resolve_storage(storage, storage) if storage is not None else None
    prof = load_profile(profile)
    table = rank_table(prof, depth_aware)
    latency = prof.latency
    empty = empty_step_rate(prof)
    for name, value in (("budget", budget), ("max_size", max_size)):
        if value is not None:
            check_nodes(value, name, PipelineError)
            if value < 1:
                raise PipelineError(f"{name} must be at least 1, got {value}")
    size_limit = optuna_size_limit(prof, budget, max_size)
    metric = metric or ("speed" if (latency is not None or objective == "engine") else "tokens")
    dp = solve(table, size_limit, levels)
    dp_tree = dp.tree(size_limit, levels, at_most=True)
    seeds, baseline = [dp_tree], dp_tree
    if latency is not None and not budget:
        hw = choose(table, latency, size_limit, levels, draft_cost, table=dp,
                    empty_rate=empty).tree
        seeds.insert(0, hw)
        if metric == "speed":
            baseline = hw
    seeds.append(chain(min(size_limit, levels)))
    settings = {"profile": fingerprint(table=table,
                                       latency=latency.to_dict() if latency else None),
                "metric": metric, "draft_cost": draft_cost}
    if objective == "model":
        scorer = ModelObjective(table, latency, metric, draft_cost, empty)
    else:
        if not target or not draft:
            raise PipelineError(f"the {objective} objective needs a target and a draft")
        from treeopt.decode.api import encode_prompts, eos_ids
        from treeopt.decode.models import load_pair, resolve_device

        pair = load_pair(target, draft, device=resolve_device(device))
        chosen = held_out_prompts(dataset, prof.meta, prompts, seed)
        ids = encode_prompts(pair.tokenizer, chosen, True)
        eos = eos_ids(pair.tokenizer, pair.target) if pair.tokenizer is not None else []
        settings.update(target=target, draft=draft, dataset=dataset,
                        prompts=[p.id for p in chosen], max_new_tokens=max_new_tokens,
                        temperature=temperature)
        if objective == "replay":
            traces = record_traces(pair.target, pair.drafter, ids, width=prof.width,
                                   max_new_tokens=max_new_tokens, temperature=temperature,
                                   seed=seed, eos_token_id=eos[0] if eos else None,
                                   progress=progress)
            scorer = ReplayObjective(traces, latency, metric, draft_cost)
        else:
            scorer = EngineObjective(pair.target, pair.drafter, ids,
                                     max_new_tokens=max_new_tokens, metric=metric,
                                     temperature=temperature, seed=seed,
                                     eos_token_id=eos or None)
    if trials is None:
        trials = 20 if objective == "engine" else 200
    found = run_search(scorer, width=prof.width, max_size=size_limit, levels=levels,
                       n_trials=trials, seeds=seeds, baseline=baseline, seed=seed,
                       study_name=study_name, storage=url, timeout=timeout, worker=worker,
                       settings=settings)
    tree = found.tree
    meta = found.meta()
    meta.update({"max_size": size_limit, "max_levels": levels, "draft_cost": draft_cost,
                 "size": tree.size, "depth": tree.depth,
                 "expected_tokens": tree.expected_tokens(table)})
    if isinstance(profile, (str, os.PathLike)):
        meta["profile"] = str(profile)
    pred = predict(tree, table, latency, draft_cost, empty) if latency is not None else None
    result = SearchResult(tree=tree, expected_tokens=meta["expected_tokens"], prediction=pred,
                          choice=None, table=dp, rank_table=table, profile=prof,
                          mode=f"optuna ({objective}, {metric})", max_size=size_limit,
                          max_levels=levels, draft_cost=draft_cost, meta=meta, optuna=found)
    if out is not None:
        result.save(out)
    return result


# ---------------------------------------------------------------------------- prompts
def held_out_prompts(dataset: str, profile_meta: dict, n: int, seed: int = 0,
                     categories: str | None = None):
    """``n`` prompts of ``dataset`` that a profile measured with the same dataset did not use
    (its selection is rebuilt from the settings in its meta), drawn with ``seed``."""
    from treeopt.evaluate.datasets import load_prompts, select

    every = load_prompts(dataset, categories=categories)
    meta = profile_meta or {}
    settings = meta.get("settings", {})
    used: set[str] = set()
    if settings.get("dataset") == str(dataset) and meta.get("prompts_total"):
        used = {p.id for p in load_prompts(dataset, categories=categories,
                                           n=meta["prompts_total"],
                                           seed=settings.get("seed", 0))}
    rest = [p for p in every if p.id not in used]
    return select(rest, n=n, seed=seed + 1, source=str(dataset))


def split_prompts(dataset: str, n_profile: int, n_eval: int, seed: int = 0,
                  categories: str | None = None):
    """Two disjoint prompt sets: (``n_profile`` to profile on, ``n_eval`` to evaluate on)."""
    from treeopt.evaluate.datasets import load_prompts, select

    first = load_prompts(dataset, categories=categories, n=n_profile, seed=seed)
    used = {p.id for p in first}
    rest = [p for p in load_prompts(dataset, categories=categories) if p.id not in used]
    return first, select(rest, n=n_eval, seed=seed + 1, source=str(dataset))


def load_prompt_set(prompts, n: int | None = None, seed: int = 0,
                    categories: str | Sequence[str] | None = None):
    """(prompts, name): a data set spec (a shipped name, a .jsonl/.txt file, ``hf:NAME``) is
    loaded and ``n`` prompts drawn with ``seed``; a list of strings, chat-message lists,
    token-id lists or ``Prompt`` objects is used as given (``n`` first ones). ``name`` is
    what a profile records as its data set (a fingerprint for a list)."""
    from treeopt.evaluate.datasets import Prompt, load_prompts, select

    if isinstance(prompts, (str, os.PathLike)):
        return load_prompts(prompts, categories=categories, n=n, seed=seed), str(prompts)
    items = []
    for i, p in enumerate(prompts):
        if isinstance(p, Prompt):
            items.append(p)
        elif isinstance(p, str):
            items.append(Prompt(str(i), "default", p))
        elif p and all(isinstance(t, int) for t in p):
            items.append(Prompt(str(i), "default", "", token_ids=tuple(int(t) for t in p)))
        else:
            raise PipelineError(f"prompt {i}: give text, token ids or Prompt objects")
    if not items:
        raise PipelineError("no prompts given")
    items = select(items, categories=categories, n=n, seed=seed, source="prompts")
    blob = json.dumps([[p.text, list(p.token_ids or ())] for p in items])
    return items, f"prompts:{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def acceptance_defaults(device, n_prompts: int | None, max_new_tokens: int | None
                        ) -> tuple[int, int, list[str]]:
    """(prompts, tokens per continuation, notes on the defaults used) for ``device``."""
    cpu = getattr(device, "type", str(device)) != "cuda"
    notes = []
    if n_prompts is None:
        n_prompts = CPU_PROMPTS if cpu else GPU_PROMPTS
        notes.append(f"{n_prompts} prompts")
    if max_new_tokens is None:
        max_new_tokens = CPU_NEW_TOKENS if cpu else GPU_NEW_TOKENS
        notes.append(f"{max_new_tokens} tokens per continuation")
    return n_prompts, max_new_tokens, notes


def latency_defaults(device, **given) -> tuple[dict, list[str]]:
    """Latency settings (tokens, context, repeats, warmup) with the unset ones filled by
    device; returns (settings, notes on the defaults used)."""
    defaults = GPU_LATENCY if getattr(device, "type", str(device)) == "cuda" else CPU_LATENCY
    out, notes = {}, []
    for key, value in defaults.items():
        if given.get(key) is None:
            many = isinstance(value, tuple)
            out[key] = list(value) if many else value
            notes.append(f"{key} {','.join(map(str, value)) if many else value}")
        else:
            out[key] = given[key]
    return out, notes


def tune_defaults(device, *, n_prompts: int | None = None, max_new_tokens: int | None = None,
                  tokens=None, context: int | None = None, repeats: int | None = None,
                  warmup: int | None = None) -> list[str]:
    """Notes on the device defaults :func:`tune` fills for the settings left unset (what it
    reports in ``TuneResult.defaults``), known before any model is loaded."""
    from treeopt.decode.models import resolve_device

    dev = resolve_device(device)
    *_, notes = acceptance_defaults(dev, n_prompts, max_new_tokens)
    _, more = latency_defaults(dev, tokens=tokens, context=context, repeats=repeats,
                               warmup=warmup)
    return notes + more


@contextmanager
def latency_progress(enabled: bool = True):
    """A progress bar on stderr per latency curve (target, then draft) while
    ``treeopt.profile.latency.measure_latency`` runs: one step per forward (warm-up and timed
    runs of every point: a size, or a (context, size) pair with several contexts), advanced
    between the timed calls so that it never runs inside a timing. Nothing when ``enabled``
    is false or the profiler has no timing loop to follow."""
    import treeopt.profile.latency as latency_mod

    loop = getattr(latency_mod, "_interleaved", None)
    if not enabled or loop is None:
        yield
        return
    from tqdm import tqdm

    curves = iter(("target", "draft"))

    def interleaved(calls, timer, repeats, warmup, after=None):
        bar = tqdm(total=len(calls) * (repeats + warmup), unit="run", dynamic_ncols=True,
                   desc=f"latency {next(curves, 'curve')} ({len(calls)} points)")

        def done(i):
            if after is not None:
                after(i)
            bar.update(1)

        try:
            return loop(calls, timer, repeats, warmup, after=done)
        finally:
            bar.close()

    latency_mod._interleaved = interleaved
    try:
        yield
    finally:
        latency_mod._interleaved = loop


def measure_acceptance(pair, prompts, run, *, out: str | os.PathLike | None = None,
                       resume: bool = False, save_every: int = 1, positions: int | None = None,
                       progress: bool = False):
    """Acceptance profile of ``pair`` (``treeopt.decode.models.Pair``) over ``prompts``
    (``Prompt`` objects or text) under ``run`` (an ``AcceptanceRun``); written to ``out``
    as it goes (``resume`` continues it). Prompts are encoded with the one prompt encoder
    (``treeopt.decode.api.encode_prompts``) and decoding stops at the first EOS id
    (``eos_ids``)."""
    from treeopt.decode.api import encode_prompts, eos_ids
    from treeopt.profile.acceptance import profile_acceptance

    if pair.drafter is None:
        raise PipelineError("acceptance profiling needs a draft (a drafter spec such as "
                            "early-exit:4 or ngram)")
    ids = encode_prompts(pair.tokenizer, prompts, run.chat_template)
    if run.continuation == "dataset":
        ids = [x for x in ids if len(x) >= 2]
    eos = eos_ids(pair.tokenizer, pair.target) if pair.tokenizer is not None else []
    return profile_acceptance(pair.target, pair.drafter, ids, run, out=out, resume=resume,
                              save_every=max(1, save_every), progress=progress,
                              eos_token_id=eos[0] if eos else None, max_positions=positions)


def latency_warnings(latency) -> list[str]:
    """One-line warnings about a measured latency table: noisy or falling points
    (``timing_warnings``) and CPU timings taken with OpenMP spin-waiting."""
    from treeopt.profile.latency import timing_warnings

    notes = timing_warnings(latency)
    meta = latency.meta or {}
    if meta.get("device_type") != "cuda" and meta.get("omp_wait_policy") is None \
            and meta.get("threads", 1) > 1:
        notes.append("OMP_WAIT_POLICY is unset in this process (torch was imported first): "
                     "OpenMP spin-waiting distorts CPU timings on a busy machine; set "
                     "OMP_WAIT_POLICY=PASSIVE or use --threads 1")
    return notes


# ---------------------------------------------------------------------------- tune
@dataclass
class TuneResult:
    """What :func:`tune` measured and chose.

    ``profile``: acceptance + latency (the file ``files["profile"]`` when written).
    ``search``: the DP's hardware-aware choice (:class:`SearchResult`). ``tree`` /
    ``prediction`` / ``method``: the tree kept (the DP's, or Optuna's when ``optuna_trials``
    found a faster one) and its prediction. ``defaults``: the device defaults used.
    ``warnings``: about the latency measurement (noisy or falling points, OpenMP settings).
    ``notes``: about the kept tree's costs (read beyond the measured sizes). ``files``: what was
    written (profile, growmap, growmap_json, picture, summary). ``seconds``: per stage."""

    profile: Any
    latency: Any
    search: SearchResult
    tree: Tree
    prediction: Any
    method: str
    device: str
    defaults: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    optuna_note: str | None = None
    files: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    treeset: Any = None  # one tree per context bucket, with ``contexts`` (else None)


def _load_pair(target, draft, tokenizer, device, dtype):
    from treeopt.decode.models import Pair, load_pair

    if isinstance(target, Pair):
        if draft is not None:
            raise PipelineError("give a Pair or target and draft, not both")
        return target
    if isinstance(target, (str, os.PathLike)):
        if not isinstance(draft, (str, os.PathLike)):
            raise PipelineError("a target given by name needs its draft by name (a drafter "
                                "spec such as early-exit:4 or ngram)")
        return load_pair(str(target), str(draft), dtype=dtype, device=device)
    from treeopt.decode.api import as_drafter

    drafter = as_drafter(draft, target, tokenizer)
    return Pair(target, getattr(drafter, "model", None), tokenizer, drafter=drafter)


def _name(x) -> str:
    return str(x) if isinstance(x, (str, os.PathLike)) else type(x).__name__


def tune(target, draft=None, prompts="spec_bench", *, out_dir: str | os.PathLike | None = None,
         resume: bool = False, tokenizer=None, n_prompts: int | None = None,
         categories: str | Sequence[str] | None = None, positions: int | None = None,
         max_new_tokens: int | None = None, temperature: float = 0.0, top_k: int = 0,
         top_p: float = 1.0, rule: str = "sequoia", width: int = 8,
         depth: int = TUNE_ACCEPTANCE_DEPTH, mode: str = "teacher-forced",
         continuation: str = "target", seed: int = 0, chat_template: bool = True,
         tokens: Sequence[int] | str | None = None, context: int | None = None,
         contexts: Sequence[int] | str | None = None,
         repeats: int | None = None, warmup: int | None = None, max_size: int | None = None,
         max_levels: int | None = None, max_depth: int | None = None,
         draft_cost: str = DEFAULT_DRAFT_COST, measured_sizes_only: bool = False,
         optuna_trials: int = 0, device: str = "auto", dtype: str = "auto",
         threads: int | None = None, progress: bool = False) -> TuneResult:
    """Profile a pair, choose its best tree on this machine, and (with ``out_dir``) save it.

    ``target``/``draft``: model and drafter specs (``"smollm2"``, ``"early-exit:4"``,
    ``"ngram"``, a folder, ...), a loaded ``Pair`` (no ``draft``), or a target model with a
    draft model or ``Drafter`` (then ``tokenizer=`` for text prompts). ``prompts``: a data
    set spec or a list of prompts (:func:`load_prompt_set`); ``n_prompts`` of them are used
    (default by device, as ``max_new_tokens``).

    Steps: acceptance profile (``width`` siblings, ``depth`` per-depth rows in edges;
    teacher-forced along the target's own continuations by default) -> latency profile
    (target tree forwards of ``tokens`` sizes and draft levels; unset settings by device) ->
    :func:`search_tree` with the hardware-aware choice (``max_size``, ``max_levels`` or
    ``max_depth``, ``draft_cost``, ``measured_sizes_only``) -> optionally ``optuna_trials``
    Optuna trials on predicted tokens/s, seeded with that tree. With ``out_dir``:
    ``profile.json`` (written as it is measured; ``resume`` continues an interrupted one),
    ``tree.pt`` (Sequoia-compatible growmap), ``tree.json``, ``tree.png`` and
    ``summary.json``. Searching ``profile.json`` again with the same limits gives the same
    tree. Ctrl-C keeps what was measured in ``profile.json``. ``summary.json`` is written
    atomically (``treeopt.limits.atomic_write``). ``progress``: progress bars on stderr for
    the acceptance prompts and the latency runs (:func:`latency_progress`); the defaults used
    are known before any work (:func:`tune_defaults`).

    ``contexts`` (several cached prefix lengths, e.g. ``[128, 512, 1024]`` or
    ``"128,512,1024"``, instead of the one ``context``): latency is timed at each, the tree
    is chosen at each and ``treeset`` holds one tree per context bucket
    (``treeopt.treeset``), written as ``treeset.json`` beside ``tree.pt`` (which holds the
    smallest context's tree); decoding with the set picks each prompt's tree by its
    length."""
    from treeopt.decode.models import resolve_device
    from treeopt.profile.acceptance import AcceptanceRun

    t0 = time.perf_counter()
    _check_cost(draft_cost)
    levels = level_limit(max_levels, max_depth)
    for name, value, low in (("n_prompts", n_prompts, 1), ("positions", positions, 1),
                             ("max_new_tokens", max_new_tokens, 1), ("context", context, 1),
                             ("repeats", repeats, 1), ("warmup", warmup, 0),
                             ("max_size", max_size, 1), ("optuna_trials", optuna_trials, 0),
                             ("threads", threads, 1)):
        if value is not None and value < low:
            raise PipelineError(f"{name} must be >= {low}, got {value}")
    if max_size is not None:
        check_nodes(max_size, "max_size", PipelineError)
    if isinstance(tokens, str):
        from treeopt.profile.latency import parse_tokens

        tokens = parse_tokens(tokens)
    if contexts is not None:
        from treeopt.profile.latency import parse_contexts

        contexts = parse_contexts(contexts if isinstance(contexts, str)
                                  else ",".join(str(int(c)) for c in contexts))
        if context is not None:
            raise PipelineError(f"give context={context} or contexts={contexts}, not both")
        context = contexts[0]
    out = Path(out_dir) if out_dir is not None else None
    profile_path = out / "profile.json" if out is not None else None
    if resume and profile_path is None:
        raise PipelineError("resume continues the profile in out_dir; give out_dir")
    if profile_path is not None and profile_path.exists() and not resume:
        raise PipelineError(f"{profile_path} exists; resume it (--resume) or choose another "
                            "output folder")
    dev = resolve_device(device)
    n_prompts, max_new_tokens, defaults = acceptance_defaults(dev, n_prompts, max_new_tokens)
    if isinstance(prompts, (str, os.PathLike)):
        # Draw order: the first k of a draw of n are the draw of k, so a resume that asks
        # for more prompts continues with new ones (as `treeopt profile acceptance` does).
        from treeopt.evaluate.datasets import select

        every, dataset_name = load_prompt_set(prompts, None, seed, categories)
        chosen = select(every, n=n_prompts, seed=seed, source=dataset_name, order="draw")
    else:
        chosen, dataset_name = load_prompt_set(prompts, n_prompts, seed, categories)
    run = AcceptanceRun(width=width, depth=depth, temperature=temperature, top_k=top_k,
                        top_p=top_p, rule=rule, mode=mode, continuation=continuation,
                        max_new_tokens=max_new_tokens, seed=seed, draft=_name(draft),
                        target=_name(target), dataset=dataset_name,
                        chat_template=chat_template)
    run.check()
    storage = None
    if optuna_trials > 0 and out is not None:
        from treeopt.search.optuna_search import resolve_storage

        storage = resolve_storage(None, out / "optuna.db")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)

    if threads is not None:
        import torch

        torch.set_num_threads(int(threads))
    pair = _load_pair(target, draft, tokenizer, dev, dtype)
    if pair.drafter is None:
        raise PipelineError("tune needs a draft (e.g. early-exit:4 or ngram)")
    profile = measure_acceptance(pair, chosen, run, out=profile_path, resume=resume,
                                 positions=positions, progress=progress)
    t_acc = time.perf_counter() - t0

    from treeopt.profile.latency import measure_latency, write_latency

    lat_settings, lat_notes = latency_defaults(dev, tokens=tokens, context=context,
                                               repeats=repeats, warmup=warmup)
    defaults += lat_notes
    with latency_progress(progress):
        latency = measure_latency(pair.target, pair.drafter, tokens=lat_settings["tokens"],
                                  context=lat_settings["context"],
                                  contexts=contexts,
                                  repeats=lat_settings["repeats"],
                                  warmup=lat_settings["warmup"],
                                  names={"target": _name(target), "draft": _name(draft)},
                                  out=profile_path)
    if profile_path is not None:
        from treeopt.profile import Profile

        write_latency(latency, profile_path)
        profile = Profile.load(profile_path)  # what `treeopt search` will read
    else:
        profile = dataclasses.replace(profile, latency=latency)
    t_lat = time.perf_counter() - t0 - t_acc
    warnings = latency_warnings(latency)

    found = search_tree(profile, max_size=max_size, max_levels=levels, draft_cost=draft_cost,
                        measured_sizes_only=measured_sizes_only)
    tree, pred, method = found.tree, found.prediction, "dp + hardware-aware"
    optuna_note = None
    if optuna_trials > 0:
        from treeopt.search.hardware import empty_step_rate, predict
        from treeopt.search.optuna_search import ModelObjective, run_search
        from treeopt.shapes import chain

        empty = empty_step_rate(profile)
        res = run_search(ModelObjective(found.rank_table, latency, "speed", draft_cost, empty),
                         width=profile.width, max_size=found.max_size, levels=levels,
                         n_trials=optuna_trials, seeds=[tree, chain(min(found.max_size, 4))],
                         baseline=tree, seed=seed, study_name="tune", storage=storage)
        optuna_note = (f"optuna ({res.trials} trials): best {res.value:.2f} tokens/s vs DP "
                       f"{res.baseline_value:.2f}")
        sizes = {int(t) for t in latency.target.tokens} | {1}
        if res.value > res.baseline_value and (not measured_sizes_only
                                               or res.tree.size in sizes):
            tree, method = res.tree, "optuna (seeded with the DP choice)"
            pred = predict(tree, found.rank_table, latency, draft_cost, empty)
        elif res.value > res.baseline_value:
            optuna_note += f" (its size {res.tree.size} was not timed: kept the DP choice)"
    from treeopt.search.hardware import curve_notes

    # extrapolation notes; a falling curve is among the timing warnings already
    notes = curve_notes(latency, tree, draft_cost, falls=False)

    meta = dict(found.meta)
    meta.update({"method": method, "target": _name(target), "draft": _name(draft),
                 "expected_tokens": pred.expected_tokens, "size": tree.size,
                 "depth": tree.depth, "predicted_step_ms": pred.step_ms,
                 "predicted_tokens_per_s": pred.tokens_per_s,
                 "predicted_speedup": pred.speedup, "depth_rows_used": len(found.rank_table),
                 "device": latency.meta.get("device")})
    if profile_path is not None:
        meta["profile"] = profile_path.name
    files: dict = {}
    seconds = {"acceptance": round(t_acc, 1), "latency": round(t_lat, 1)}
    summary = {"target": _name(target), "draft": _name(draft), "dataset": dataset_name,
               "device": latency.meta.get("device"), "defaults": defaults,
               "tree": {"size": tree.size, "depth": tree.depth, "width": tree.width,
                        "parents": tree.to_parents()},
               "prediction": pred.to_dict(), "method": method, "draft_cost": draft_cost,
               "max_levels": levels, "max_size": found.max_size,
               "measured_sizes_only": measured_sizes_only, "warnings": warnings + notes}
    if out is not None:
        from treeopt.growmap import save_growmap
        from treeopt.viz import draw_tree

        files["profile"] = profile_path
        files["growmap"] = save_growmap(tree, out / "tree.pt", meta)
        files["growmap_json"] = save_growmap(tree, out / "tree.json", meta)
        files["picture"] = draw_tree(tree, out / "tree.png", profile=found.rank_table,
                                     title=f"{_name(target)} + {_name(draft)}: n={tree.size}")
        files["summary"] = out / "summary.json"
        summary.update(profile=profile_path.name, growmap=files["growmap"].name)
    if found.treeset is not None:
        summary["treeset"] = found.treeset.to_dict()["buckets"]
        if out is not None:
            from treeopt.treeset import save_treeset

            files["treeset"] = save_treeset(found.treeset, out / "treeset.json")
            summary["treeset_file"] = files["treeset"].name
    if isinstance(draft, (str, os.PathLike)) and tree.size > 1:  # for `--draft auto:draft=`
        from treeopt.decode.models import cache_dir
        from treeopt.drafters.auto import remember_tune

        remember_tune(pair.target, str(draft), found.rank_table, pred, tree, cache_dir())
    seconds["total"] = round(time.perf_counter() - t0, 1)
    summary["seconds"] = seconds
    if out is not None:
        from treeopt import limits

        text = json.dumps(summary, indent=2) + "\n"
        limits.atomic_write(files["summary"], lambda fh: fh.write(text), binary=False)
    return TuneResult(profile=profile, latency=latency, search=found, tree=tree,
                      prediction=pred, method=method, device=str(latency.meta.get("device")),
                      defaults=defaults, warnings=warnings, notes=notes,
                      optuna_note=optuna_note,
                      files=files, seconds=seconds, summary=summary, treeset=found.treeset)
