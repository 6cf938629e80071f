"""The search as library calls: load a profile, find its best tree (the exact DP with the
hardware-aware choice, or an Optuna search), save it.

    import treeopt

    found = treeopt.search_tree("profiles/sequoia-reference-l40-7b.json", out="best.pt")
    print(found.tree.size, found.expected_tokens, found.prediction.speedup)

``treeopt search`` is these functions with argument parsing before and printing after;
``treeopt search --method optuna`` is :func:`optuna_tree`. The same steps give the same tree
whichever way they are run (``treeopt.tuning`` calls :func:`search_tree` too): one rank table
per profile (:func:`rank_table`), one draft-cost default (``DEFAULT_DRAFT_COST``,
"per-level": what treeopt's engine runs), one level limit default and one rule for the sizes
the hardware-aware sweep considers (``treeopt.search.hardware.default_max_size``).

Units. Sizes count NODES, root included (a tree of n nodes drafts n - 1 tokens). Limits on
height are given either as ``max_levels`` (levels, root included: Sequoia's ``max_depth``,
what the DP counts) or as ``max_depth`` (edges, like ``Tree.depth`` and shape strings such as
``dp:64x8``), never both; :func:`level_limit` converts, once.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from treeopt.api import encode_prompts, load_pair
from treeopt.datasets import held_out_prompts
from treeopt.errors import TreeoptError
from treeopt.growmap import save_growmap
from treeopt.limits import MAX_TREE_LEVELS, check_nodes
from treeopt.models.loading import eos_ids, resolve_device
from treeopt.profile import Profile
from treeopt.profile.model import contexts_of, reliable_table
from treeopt.search.dp import levels_for_depth, solve
from treeopt.search.hardware import (
    DEFAULT_DRAFT_COST,
    DEFAULT_MAX_LEVELS,
    check_cost,
    choose,
    choose_per_context,
    curve_notes,
    default_max_size,
    empty_step_rate,
    predict,
)
from treeopt.search.optuna_search import (
    EngineObjective,
    ModelObjective,
    OptunaSettings,
    ReplayObjective,
    fingerprint,
    record_traces,
    resolve_storage,
    run_search,
)
from treeopt.shapes import chain
from treeopt.tree import Tree
from treeopt.treeset import from_choices
from treeopt.viz import draw_tree


class PipelineError(TreeoptError, ValueError):
    """A pipeline request that cannot be run as given; the one-line message says what to
    change."""


# ---------------------------------------------------------------------------- shared rules
def level_limit(max_levels: int | None = None, max_depth: int | None = None) -> int:
    """The DP's level limit (root counted) from ``max_levels`` or ``max_depth`` (edges; one
    level fewer); ``DEFAULT_MAX_LEVELS`` when neither is given."""

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

    return reliable_table(profile)


def load_profile(profile):
    """A ``Profile`` from a Profile or a path (.json, or Sequoia's acceptance vector .pt)."""
    if isinstance(profile, (str, os.PathLike)):
        return Profile.load(profile)
    return profile


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

        self.path = save_growmap(self.tree, path, self.meta)
        return self.path


@dataclass(frozen=True)
class SearchSettings:
    """How a tree is searched, the one settings object ``search_tree``, ``optuna_tree`` and
    ``tune`` take: the sizes the hardware-aware sweep considers (``max_size``, default the
    largest measured latency point; ``measured_sizes_only``), the height limit
    (``max_levels``, root counted, or ``max_depth`` in edges, never both; default
    ``DEFAULT_MAX_LEVELS`` levels), the draft-cost model, whether per-depth acceptance rows
    are used, how many Optuna trials ``tune`` adds after the DP (0: none), and whether a
    greedy ``tune`` of a model-free drafter also replays the other model-free drafters
    (``other_drafters``: ``auto``, ``suffix``, ``ngram``; ``treeopt.tuning.other_drafters``)
    so that it can answer with another drafter."""

    max_size: int | None = None
    max_levels: int | None = None
    max_depth: int | None = None
    draft_cost: str = DEFAULT_DRAFT_COST
    depth_aware: bool = True
    measured_sizes_only: bool = False
    optuna_trials: int = 0
    other_drafters: bool = True

    def levels(self) -> int:
        """The DP's level limit (root counted): :func:`level_limit` of the height fields."""
        return level_limit(self.max_levels, self.max_depth)


def search_tree(profile, *, budget: int | None = None, at_most: bool = False,
                search: SearchSettings | None = None, out: str | os.PathLike | None = None,
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

    search = search or SearchSettings()
    draft_cost, max_size = search.draft_cost, search.max_size
    measured_sizes_only = search.measured_sizes_only
    check_cost(draft_cost)
    levels = search.levels()
    prof = load_profile(profile)
    table_p = rank_table(prof, search.depth_aware)
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
        draw_tree(tree, picture, profile=table_p)
    return result


# ---------------------------------------------------------------------------- optuna
OPTUNA_OBJECTIVES = ("model", "replay", "engine")
# The Optuna search's size limit when neither a budget, a max_size nor a latency table says.
OPTUNA_MAX_SIZE = 64


def optuna_size_limit(profile, budget: int | None = None, max_size: int | None = None) -> int:
    """The Optuna search's size limit: ``budget``, else ``max_size``, else the largest
    measured latency point (clamped to ``MAX_TREE_NODES``), else ``OPTUNA_MAX_SIZE``."""

    latency = load_profile(profile).latency
    return budget or max_size or (default_max_size(latency) if latency is not None
                                  else OPTUNA_MAX_SIZE)


@dataclass(frozen=True)
class ReplaySettings:
    """What the "replay" and "engine" objectives of :func:`optuna_tree` decode: the pair
    (``target``, ``draft`` specs), ``prompts`` held-out prompts of ``dataset`` (ones the
    profile did not use), ``max_new_tokens`` each, at ``temperature`` on ``device``, verified
    by ``rule`` (default: the profile's own rule, so "engine" chooses trees for the rule in
    use; the DP's model is exact for token-level rules only)."""

    target: str | None = None
    draft: str | None = None
    dataset: str = "spec_bench"
    prompts: int = 8
    max_new_tokens: int = 64
    temperature: float = 0.0
    device: str = "auto"
    rule: str | None = None


def optuna_tree(profile, *, objective: str = "model", metric: str | None = None,
                budget: int | None = None, search: SearchSettings | None = None,
                optuna_settings: OptunaSettings | None = None,
                replay: ReplaySettings | None = None, progress: bool = False,
                out: str | os.PathLike | None = None) -> SearchResult:
    """An Optuna search over trees (``treeopt.search.optuna_search``), seeded with the DP's
    trees and a chain, for objectives the DP cannot model.

    ``objective``: "model" (the profile's F, or predicted tokens/s with its latency),
    "replay" (recorded greedy traces of held-out prompts, ``replay``: a
    :class:`ReplaySettings` naming the pair) or "engine" (measured decoding; the same).
    ``metric``: "tokens" or "speed" (default: speed when the profile has latency or with
    "engine"). Size limit: ``budget`` or ``search.max_size`` (default: the largest measured
    latency point, clamped, else 64 nodes); height and draft cost from ``search`` as in
    :func:`search_tree`. ``optuna_settings`` (``OptunaSettings``): ``trials`` this process
    finishes, COMPLETE or PRUNED (a failed one is replaced; default 200, 20 for "engine");
    ``storage``: an Optuna storage URL or an SQLite file path
    (checked before any work; ``None`` = in memory); a study with the same ``study_name``
    there is continued, and a trial left RUNNING by a killed worker is marked FAIL (its tree
    queued again) instead of being counted (``treeopt.search.optuna_search.run_search``)."""
    search, replay = search or SearchSettings(), replay or ReplaySettings()
    how = optuna_settings or OptunaSettings()
    max_size, draft_cost, seed = search.max_size, search.draft_cost, how.seed
    target, draft, device = replay.target, replay.draft, replay.device
    max_new_tokens, temperature = replay.max_new_tokens, replay.temperature

    if objective not in OPTUNA_OBJECTIVES:
        raise PipelineError(f"unknown objective {objective!r}; use one of "
                            f"{', '.join(OPTUNA_OBJECTIVES)}")
    check_cost(draft_cost)
    levels = search.levels()
    url = resolve_storage(how.storage, how.storage) if how.storage is not None else None
    prof = load_profile(profile)
    table = rank_table(prof, search.depth_aware)
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

        pair = load_pair(target, draft, device=resolve_device(device))
        chosen = held_out_prompts(replay.dataset, prof.meta, replay.prompts, seed)
        ids = encode_prompts(pair.tokenizer, chosen, True)
        eos = eos_ids(pair.tokenizer, pair.target) if pair.tokenizer is not None else []
        settings.update(target=target, draft=draft, dataset=replay.dataset,
                        prompts=[p.id for p in chosen], max_new_tokens=max_new_tokens,
                        temperature=temperature)
        rule = replay.rule or prof.meta.get("rule") or "sequoia"
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
                                     eos_token_id=eos or None, rule=rule)
            settings.update(rule=rule)
    trials = how.trials if how.trials is not None else (20 if objective == "engine" else 200)
    found = run_search(scorer, width=prof.width, max_size=size_limit, levels=levels, seeds=seeds,
                       baseline=baseline, settings=settings,
                       optuna_settings=dataclasses.replace(how, trials=trials, storage=url))
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
