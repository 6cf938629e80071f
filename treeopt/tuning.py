"""Tune a pair on this machine: profile its acceptance and latency, choose its best tree,
save everything (``treeopt tune``; ``treeopt.tune`` in Python).

    import treeopt

    run = treeopt.tune("smollm2", "early-exit:4", "spec_bench", out_dir="runs/ee4")
    print(run.tree, run.prediction.tokens_per_s, run.files)

The tree is chosen by ``treeopt.search.api.search_tree`` on the measured profile, so
searching the saved ``profile.json`` again with the same limits gives the same tree.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shlex
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import treeopt.profile.latency as latency_mod
from treeopt import limits
from treeopt.api import (
    MAX_PROMPT_TOKENS,
    Pair,
    as_drafter,
    encode_for_decoding,
    encode_prompts,
    load_pair,
)
from treeopt.datasets import Prompt, load_prompts, select
from treeopt.decode.drafter import build_drafter, registered, respec, split_spec
from treeopt.decode.sampling import GREEDY, Sampling
from treeopt.drafters.auto import (
    DATASTORE,
    MARGIN,
    MAX_DRAFT,
    SUFFIX,
    auto_drafter,
    remember_copy_table,
    remember_tune,
)
from treeopt.errors import TreeoptError
from treeopt.growmap import save_growmap
from treeopt.limits import check_nodes
from treeopt.models.cache import cache_dir
from treeopt.models.loading import eos_ids, resolve_device
from treeopt.models.machine import Machine
from treeopt.profile import Profile
from treeopt.profile.acceptance import AcceptanceRun, profile_acceptance
from treeopt.profile.copy import sizing_copy, tune_copy_table
from treeopt.profile.latency import (
    LatencySettings,
    measure_latency,
    parse_contexts,
    parse_tokens,
    time_prefill,
    timing_warnings,
    write_latency,
)
from treeopt.profile.model import latencies_by_context
from treeopt.profile.replay import (
    ReplayChoice,
    choose_replayed,
    continuations,
    private,
    replayable,
    runs_model,
)
from treeopt.rules import default_width
from treeopt.search.api import (
    PipelineError,
    SearchResult,
    SearchSettings,
    search_tree,
)
from treeopt.search.hardware import (
    check_cost,
    curve_notes,
    empty_step_rate,
    end_to_end,
    monotone,
    predict,
    prefill_costs,
)
from treeopt.search.optuna_search import (
    ModelObjective,
    OptunaSettings,
    resolve_storage,
    run_search,
)
from treeopt.shapes import chain, from_name
from treeopt.tree import Tree
from treeopt.treeset import save_treeset
from treeopt.viz import draw_tree

# Acceptance profiling defaults by device (smaller samples without a GPU).
CPU_PROMPTS, GPU_PROMPTS = 8, 40
CPU_NEW_TOKENS, GPU_NEW_TOKENS = 32, 128
# Latency profiling defaults by device: sizes interleaved, 10 timed runs per point on CPU too
# (a stable median needs them).
CPU_LATENCY = dict(tokens=(1, 2, 4, 8, 16, 32), context=128, repeats=10, warmup=2)
GPU_LATENCY = dict(tokens=(1, 2, 4, 8, 16, 32, 64, 128), context=256, repeats=10, warmup=3)
# Per-depth acceptance rows ``tune`` measures by default (depths in edges below the root).
TUNE_ACCEPTANCE_DEPTH = 4
# Longest chain (drafted tokens) ``tune`` replays for a model-free drafter, and the
# SuffixDecoding budgets (alpha x match length) it replays for ``suffix``.
REPLAY_MAX_CHAIN = 16
SUFFIX_ALPHAS = (0.5, 1.0, 2.0, 4.0)
REPLAY_DP_SIZES = (4, 8, 16, 32)  # the DP's trees (positional profile) replayed beside


# ---------------------------------------------------------------------------- prompts

def load_prompt_set(prompts, n: int | None = None, seed: int = 0,
                    categories: str | Sequence[str] | None = None):
    """(prompts, name): a data set spec (a shipped name, a .jsonl/.txt file, ``hf:NAME``) is
    loaded and ``n`` prompts drawn with ``seed``; a list of strings, chat-message lists,
    token-id lists or ``Prompt`` objects is used as given (``n`` first ones). ``name`` is
    what a profile records as its data set (a fingerprint for a list)."""

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
    """Acceptance profile of ``pair`` (``treeopt.models.loading.Pair``) over ``prompts``
    (``Prompt`` objects or text) under ``run`` (an ``AcceptanceRun``); written to ``out``
    as it goes (``resume`` continues it). Prompts are encoded with the one prompt encoder
    (``treeopt.api.encode_prompts``) and decoding stops at the first EOS id
    (``eos_ids``)."""

    if pair.drafter is None:
        raise PipelineError("acceptance profiling needs a draft (a drafter spec such as "
                            "early-exit:4 or ngram)")
    ids = encode_for_decoding(pair, prompts, run.chat_template, run.max_new_tokens) \
        if run.continuation == "target" else \
        encode_prompts(pair.tokenizer, prompts, run.chat_template, MAX_PROMPT_TOKENS)
    if run.continuation == "dataset":
        ids = [x for x in ids if len(x) >= 2]
    eos = eos_ids(pair.tokenizer, pair.target) if pair.tokenizer is not None else []
    return profile_acceptance(pair.target, pair.drafter, ids, run, out=out, resume=resume,
                              save_every=max(1, save_every), progress=progress,
                              eos_token_id=eos[0] if eos else None, max_positions=positions)


def latency_warnings(latency) -> list[str]:
    """One-line warnings about a measured latency table: noisy or falling points
    (``timing_warnings``) and CPU timings taken with OpenMP spin-waiting."""

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
    written (profile, growmap, growmap_json, picture, summary). ``seconds``: per stage.
    ``replay`` (model-free drafters, greedy): every candidate configuration replayed along the
    target's continuations (``treeopt.profile.replay``) and the best, which ``tree`` /
    ``prediction`` / ``method`` then hold; ``draft_spec``: the drafter spec that decodes the
    choice (per-step lengths name the saved profile), None when it is the one tuned."""

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
    draft_spec: str | None = None  # the drafter spec to decode with (None: the one tuned)
    replay: ReplayChoice | None = None  # model-free drafters, greedy: every candidate replayed


def _load_pair(target, draft, tokenizer, device, dtype):
    if isinstance(target, Pair):
        if draft is not None:
            raise PipelineError("give a Pair or target and draft, not both")
        return target
    if isinstance(target, (str, os.PathLike)):
        if not isinstance(draft, (str, os.PathLike)):
            raise PipelineError("a target given by name needs its draft by name (a drafter "
                                "spec such as early-exit:4 or ngram)")
        return load_pair(str(target), str(draft), dtype=dtype, device=device)

    drafter = as_drafter(draft, target, tokenizer)
    return Pair(target, getattr(drafter, "model", None), tokenizer, drafter=drafter)


def _name(x) -> str:
    return str(x) if isinstance(x, (str, os.PathLike)) else type(x).__name__


@dataclass(frozen=True)
class AcceptanceSettings:
    """What ``tune`` profiles acceptance on: ``prompts`` prompts of the data set (drawn with
    ``seed``; default by device, as ``max_new_tokens``), optionally only ``categories`` and at
    most ``positions`` positions; ``width`` siblings and ``depth`` per-depth rows (edges),
    ``mode`` teacher-forced or online along the ``continuation`` (the target's own, or the
    data set's), prompts in the chat template unless ``chat_template`` is False. Sampling
    settings are a separate ``Sampling``."""

    prompts: int | None = None
    categories: str | Sequence[str] | None = None
    positions: int | None = None
    max_new_tokens: int | None = None
    width: int | None = None  # 8, or 1 when the sampling rule verifies chains only (block)
    depth: int = TUNE_ACCEPTANCE_DEPTH
    mode: str = "teacher-forced"
    continuation: str = "target"
    seed: int = 0
    chat_template: bool = True


def tune(target, draft=None, prompts="spec_bench", *, out_dir: str | os.PathLike | None = None,
         resume: bool = False, tokenizer=None, acceptance: AcceptanceSettings | None = None,
         sampling: Sampling | None = None, latency: LatencySettings | None = None,
         search: SearchSettings | None = None, machine: Machine | None = None,
         progress: bool = False) -> TuneResult:
    """Profile a pair, choose its best tree on this machine, and (with ``out_dir``) save it.

    ``target``/``draft``: model and drafter specs (``"smollm2"``, ``"early-exit:4"``,
    ``"ngram"``, a folder, ...), a loaded ``Pair`` (no ``draft``), or a target model with a
    draft model or ``Drafter`` (then ``tokenizer=`` for text prompts). ``prompts``: a data
    set spec or a list of prompts (:func:`load_prompt_set`); ``acceptance.prompts`` of them
    are used (default by device, as ``max_new_tokens``).

    Settings, one object each: ``acceptance`` (:class:`AcceptanceSettings`), ``sampling``
    (``treeopt.decode.sampling.Sampling``; default greedy), ``latency``
    (``treeopt.profile.latency.LatencySettings``; unset fields by device), ``search``
    (``treeopt.search.api.SearchSettings``) and ``machine``
    (``treeopt.models.machine.Machine``: device, dtype, threads).

    Steps: acceptance profile (``width`` siblings, ``depth`` per-depth rows in edges;
    teacher-forced along the target's own continuations by default) -> latency profile
    (target tree forwards of ``tokens`` sizes and draft levels) -> :func:`search_tree` with
    the hardware-aware choice under ``search`` -> optionally ``search.optuna_trials`` Optuna
    trials on predicted tokens/s, seeded with that tree -> for a model-free drafter
    (``ngram``, ``suffix``, ``datastore``) at temperature 0: greedy replay of the drafter
    itself along the target's continuations of the prompts (:func:`replay_choice`,
    ``treeopt.profile.replay``) over that tree, the DP's trees of 4-32 nodes, chains of 1-16
    drafted tokens, per-step lengths from the copy table and SuffixDecoding's alpha budgets;
    the fastest replayed is kept (``replay``, ``draft_spec``), except that ``auto`` is kept
    unless another replays more than ``ADAPTIVE_MARGIN`` faster. For a draft model (one
    tree for every context): its tree, ``auto:draft=`` and the copy drafters replayed alike
    (:func:`replay_others`; not with ``search.measured_sizes_only``: they draft steps of
    any size); a kept tree is then predicted by its replay. With ``out_dir``:
    ``profile.json`` (written as it is measured; ``resume`` continues an interrupted one),
    ``tree.pt`` (Sequoia-compatible growmap), ``tree.json``, ``tree.png`` and
    ``summary.json``. Searching ``profile.json`` again with the same limits gives the same
    tree. Ctrl-C keeps what was measured in ``profile.json``. ``summary.json`` is written
    atomically (``treeopt.limits.atomic_write``). ``progress``: progress bars on stderr for
    the acceptance prompts and the latency runs (:func:`latency_progress`); the defaults used
    are known before any work (:func:`tune_defaults`).

    ``latency.contexts`` (several cached prefix lengths, e.g. ``[128, 512, 1024]`` or
    ``"128,512,1024"``, instead of the one ``context``): latency is timed at each, the tree
    is chosen at each and ``treeset`` holds one tree per context bucket
    (``treeopt.treeset``), written as ``treeset.json`` beside ``tree.pt`` (which holds the
    smallest context's tree); decoding with the set picks each prompt's tree by its
    length."""
    acc, samp = acceptance or AcceptanceSettings(), sampling or GREEDY
    lat, search, machine = latency or LatencySettings(), search or SearchSettings(), \
        machine or Machine()
    n_prompts, categories, positions = acc.prompts, acc.categories, acc.positions
    max_new_tokens, seed = acc.max_new_tokens, acc.seed
    tokens, context, contexts = lat.tokens, lat.context, lat.contexts
    repeats, warmup = lat.repeats, lat.warmup
    max_size, draft_cost = search.max_size, search.draft_cost
    measured_sizes_only, optuna_trials = search.measured_sizes_only, search.optuna_trials
    device, dtype, threads = machine.device, machine.dtype, machine.threads

    t0 = time.perf_counter()
    check_cost(draft_cost)
    levels = search.levels()
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
        tokens = parse_tokens(tokens)
    if contexts is not None:
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

        every, dataset_name = load_prompt_set(prompts, None, seed, categories)
        chosen = select(every, n=n_prompts, seed=seed, source=dataset_name, order="draw")
    else:
        chosen, dataset_name = load_prompt_set(prompts, n_prompts, seed, categories)
    width = default_width(samp.rule) if acc.width is None else acc.width
    run = AcceptanceRun(width=width, depth=acc.depth, mode=acc.mode,
                        continuation=acc.continuation, max_new_tokens=max_new_tokens, seed=seed,
                        draft=_name(draft), target=_name(target), dataset=dataset_name,
                        chat_template=acc.chat_template, sampling=samp)
    run.check()
    storage = None
    if optuna_trials > 0 and out is not None:
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

    lat_settings, lat_notes = latency_defaults(dev, tokens=tokens, context=context,
                                               repeats=repeats, warmup=warmup)
    defaults += lat_notes
    prompt_ids = encode_for_decoding(pair, chosen, run.chat_template, run.max_new_tokens)
    latency = finished_latency(profile_path, pair.target, lat_settings, contexts) \
        if resume else None
    if latency is not None:
        defaults.append("latency: the finished measurement in the profile (resumed)")
    else:
        with latency_progress(progress):
            latency = measure_latency(pair.target, pair.drafter, tokens=lat_settings["tokens"],
                                      context=lat_settings["context"],
                                      contexts=contexts,
                                      repeats=lat_settings["repeats"],
                                      warmup=lat_settings["warmup"],
                                      names={"target": _name(target), "draft": _name(draft)},
                                      out=profile_path)
            latency.meta["prefill"] = time_prefill(pair.target, pair.drafter, prompt_ids)
    if profile_path is not None:
        write_latency(latency, profile_path)
        profile = Profile.load(profile_path)  # what `treeopt search` will read
    else:
        profile = dataclasses.replace(profile, latency=latency)
    t_lat = time.perf_counter() - t0 - t_acc
    warnings = latency_warnings(latency)
    copy_table = tune_copy_table(pair, chosen, run, profile_path)  # ngram / suffix only
    copy_summary = None if copy_table is None else copy_table[1]

    found = search_tree(profile, search=dataclasses.replace(search, max_levels=levels,
                                                            max_depth=None))
    tree, pred, method = found.tree, found.prediction, "dp + hardware-aware"
    optuna_note = None
    if optuna_trials > 0:
        empty = empty_step_rate(profile)
        res = run_search(ModelObjective(found.rank_table, latency, "speed", draft_cost, empty),
                         width=profile.width, max_size=found.max_size, levels=levels,
                         seeds=[tree, chain(min(found.max_size, 4))], baseline=tree,
                         optuna_settings=OptunaSettings(trials=optuna_trials, seed=seed,
                                                        study_name="tune", storage=storage))
        optuna_note = (f"optuna ({res.trials} trials): best {res.value:.2f} tokens/s vs DP "
                       f"{res.baseline_value:.2f}")
        sizes = {int(t) for t in latency.target.tokens} | {1}
        if res.value > res.baseline_value and (not measured_sizes_only
                                               or res.tree.size in sizes):
            tree, method = res.tree, "optuna (seeded with the DP choice)"
            pred = predict(tree, found.rank_table, latency, draft_cost, empty)
        elif res.value > res.baseline_value:
            optuna_note += f" (its size {res.tree.size} was not timed: kept the DP choice)"

    replayed, draft_spec, t_replay = None, None, time.perf_counter()
    considered = None  # a draft model's replays, whether or not one replaced its tree
    if samp.greedy and replayable(pair.drafter) is None:
        replayed = replay_choice(pair, chosen, run, found, tree, latency,
                                 None if copy_table is None else copy_table[0], search,
                                 profile_path)
        tree = replayed.tree
        pred, method = replayed.prediction, f"replay ({replayed.label})"
        given = _name(draft)
        base = given if given.split(":")[0] == pair.drafter.name else pair.drafter.name
        if "spec" in replayed.options:  # another drafter replayed faster
            draft_spec = replayed.options["spec"]
        elif replayed.options and (replayed.label != LEN_AUTO or profile_path is not None):
            draft_spec = respec(base, **replayed.options)
    elif samp.greedy and search.other_drafters and found.treeset is None \
            and not measured_sizes_only:
        # a draft model (one tree for every context): the copy drafters, or ``auto`` choosing
        # per step between the model and them, may decode faster (they draft steps of any
        # size, which measured_sizes_only rules out)
        others = considered = replay_others(pair, chosen, run, found, latency, search, tree,
                                            _draft_spec(pair, draft))
        tree_replayed = None if others is None else others.predictions.get(TUNED_TREE)
        if tree_replayed is not None and others.label == TUNED_TREE:
            # the tree stays; its replay timed its drafting as decoding does, which the
            # DP's per-level draft cost under-states for a draft model
            pred, method = tree_replayed, f"{method}, priced by replay"
        elif others is not None and (tree_replayed is not None or
                                     others.prediction.tokens_per_s > pred.tokens_per_s):
            replayed, tree, pred = others, others.tree, others.prediction
            method, draft_spec = f"replay ({others.label})", others.options["spec"]
    seconds_replay = time.perf_counter() - t_replay
    whole = whole_generations(latency, pred, [len(x) for x in prompt_ids], max_new_tokens,
                              draft=runs_given_drafter(pair, draft_spec, tree, replayed))

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
    if replayed is not None or considered is not None:
        seconds["replay"] = round(seconds_replay, 1)
    summary = {"target": _name(target), "draft": _name(draft), "dataset": dataset_name,
               "device": latency.meta.get("device"), "defaults": defaults,
               "tree": {"size": tree.size, "depth": tree.depth, "width": tree.width,
                        "parents": tree.to_parents()},
               "prediction": {**pred.to_dict(), **({"whole": whole} if whole else {})},
               "method": method, "draft_cost": draft_cost,
               "max_levels": levels, "max_size": found.max_size,
               "measured_sizes_only": measured_sizes_only, "warnings": warnings + notes}
    if copy_summary is not None:
        summary["copy"] = copy_summary
    if replayed is not None or considered is not None:
        summary["replay"] = replay_summary(replayed or considered)
    if draft_spec is not None:
        summary["draft_spec"] = draft_spec
    if out is not None:
        files["profile"] = profile_path
        files["growmap"] = save_growmap(tree, out / "tree.pt", meta)
        files["growmap_json"] = save_growmap(tree, out / "tree.json", meta)
        files["picture"] = draw_tree(tree, out / "tree.png", profile=found.rank_table,
                                     title=f"{_name(target)} + {_name(draft)}: n={tree.size}")
        files["summary"] = out / "summary.json"
        summary.update(profile=profile_path.name, growmap=files["growmap"].name)
        self_sized = replayed is not None and replayed.sizes_itself
        summary["decode"] = decode_args(draft_spec or _name(draft),
                                        None if self_sized else files["growmap"])
    if found.treeset is not None:
        summary["treeset"] = found.treeset.to_dict()["buckets"]
        if out is not None:
            files["treeset"] = save_treeset(found.treeset, out / "treeset.json")
            summary["treeset_file"] = files["treeset"].name
    remember_for_auto(pair, draft, found.rank_table, pred, tree)
    if copy_table is not None and samp.greedy and pair.drafter.name == SUFFIX[0]:
        # auto's suffix candidate starts from it (``treeopt.drafters.auto``)
        remember_copy_table(pair.target, SUFFIX[0], copy_table[0], cache_dir())
    seconds["total"] = round(time.perf_counter() - t0, 1)
    summary["seconds"] = seconds
    if out is not None:
        text = json.dumps(summary, indent=2) + "\n"
        limits.atomic_write(files["summary"], lambda fh: fh.write(text), binary=False)
    return TuneResult(profile=profile, latency=latency, search=found, tree=tree,
                      prediction=pred, method=method, device=str(latency.meta.get("device")),
                      defaults=defaults, warnings=warnings, notes=notes,
                      optuna_note=optuna_note,
                      files=files, seconds=seconds, summary=summary, treeset=found.treeset,
                      draft_spec=draft_spec, replay=replayed)


def decode_args(spec: str, growmap: str | os.PathLike | None = None) -> str:
    """``--draft SPEC [--tree GROWMAP]`` as shell words: a spec holding parentheses
    (``auto:draft=(…)``, ``auto:datastore=(…)``) or a path with spaces is quoted, so the
    printed line pastes into a shell as it is."""
    words = ["--draft", str(spec)] + ([] if growmap is None else ["--tree", str(growmap)])
    return shlex.join(words)


def remember_for_auto(pair, draft, rank_table, pred, tree: Tree) -> Path | None:
    """Cache the draft's acceptance and the prediction for ``--draft auto:draft=SPEC``
    (``treeopt.drafters.auto.remember_tune``), whether the draft came as a spec (``draft``)
    or inside a Pair (``pair.draft_spec``: bench_choice's ``auto`` had nothing to start from
    and learned from one half per level); not for plain decoding (a one-node tree)."""
    spec = _draft_spec(pair, draft)
    if not spec or tree.size <= 1:
        return None
    return remember_tune(pair.target, spec, rank_table, pred, tree, cache_dir())


def _draft_spec(pair, draft) -> str | None:
    """The draft's spec, whether it came as one (``draft``) or inside a Pair."""
    return str(draft) if isinstance(draft, (str, os.PathLike)) else pair.draft_spec


def runs_given_drafter(pair, draft_spec: str | None, tree: Tree,
                       replayed: ReplayChoice | None = None) -> bool:
    """Whether tune's answer decodes with the drafter it was given, whose prefill it timed:
    not when a model-free drafter replayed faster replaced a draft model (``draft_spec``
    then names it; a model-free drafter's own options, per-step lengths, still run it; ``auto``
    with the draft model, ``replayed``'s drafter, runs it), and not for a tree of one node,
    which is plain decoding (no drafter starts)."""
    if draft_spec is not None:
        if replayed is not None and runs_model(replayed.drafter):
            return True
        return replayable(pair.drafter) is None
    return tree.size > 1


def finished_latency(profile_path, target, settings: dict, contexts) -> Any:
    """On resume: the latency table an earlier run of the same tune finished in
    ``profile_path`` (every repeat timed, the prefill too) with the same ``settings``
    (tokens, context or ``contexts``, repeats, warmup), device, dtype and threads, so that a
    resumed tune chooses from the costs it measured the first time; None otherwise (it is
    measured again)."""
    import torch

    if profile_path is None or not Path(profile_path).is_file():
        return None
    try:
        lat = latency_mod.load_latency(profile_path)
    except TreeoptError:
        return None
    if lat is None or lat.draft is None:
        return None
    meta = lat.meta or {}
    first = next(target.parameters())
    want = [int(c) for c in contexts] if contexts else [int(settings["context"])]
    same = (not meta.get("partial") and "prefill" in meta
            and meta.get("repeats") == settings["repeats"]
            and meta.get("warmup") == settings["warmup"]
            and meta.get("threads") == torch.get_num_threads()
            and meta.get("dtype") == str(first.dtype).replace("torch.", "")
            and meta.get("device") == latency_mod.device_name(first.device)
            and sorted(int(t) for t in lat.target.tokens) == sorted(set(settings["tokens"]))
            and [t.context for t in latencies_by_context(lat)] == want)
    return lat if same else None


def whole_generations(latency, pred, prompt_tokens: Sequence[int], new_tokens: int,
                      draft: bool = True) -> dict | None:
    """The prediction for whole generations of ``new_tokens`` after each of the tune prompts
    (``prompt_tokens``: their lengths), prefill included
    (``treeopt.search.hardware.end_to_end``; ``draft``: the configuration runs the drafter
    whose prefill was timed): ``{"prompt_tokens"`` (mean), ``"new_tokens", "prefill_ms",
    "draft_prefill_ms"`` (at the mean length), ``"speedup"}``, or None without prefill
    times."""
    cost = prefill_costs(latency)
    if cost is None or not prompt_tokens:
        return None
    length = sum(prompt_tokens) / len(prompt_tokens)
    return {"prompt_tokens": round(length), "new_tokens": int(new_tokens),
            "prefill_ms": round(cost.target_ms_per_token * length, 1),
            "draft_prefill_ms": round(cost.draft_ms_per_token * length, 1) if draft else 0.0,
            "speedup": end_to_end(pred.speedup, pred.plain_ms, cost,
                                  [(n, new_tokens) for n in prompt_tokens], draft)}


# ---------------------------------------------------------------------------- replay
LEN_AUTO = "len=auto"


def replay_candidates(drafter, searched: Tree, most: int, table, verify_ms,
                      table_path: str | os.PathLike | None = None, rank_table=None,
                      max_size: int = 0, others: Sequence[tuple[str, object]] = ()) -> list:
    """What ``tune`` replays for a model-free drafter: (label, factory of a private drafter,
    the shape it fills or None, the drafter-spec options that decode it): the searched tree,
    the DP's trees of ``REPLAY_DP_SIZES`` nodes (at most ``max_size``, depth at most
    ``most``) for the positional ``rank_table``, chains of 1..``most`` drafted tokens,
    per-step lengths up to ``most`` tokens from the copy ``table`` (when measured; its spec
    names ``table_path``), and for a drafter that sizes its own steps its rule as given, or
    SuffixDecoding's budget at several ``alpha``; then ``others``, (spec, drafter) of other
    model-free drafters replayed as they are (their decode spec under the option "spec")."""
    fixed = {"len": None, "table": None, "latency": None}
    out = [(f"searched tree, {searched.size} nodes",
            lambda: private(drafter, searched, sized=False), searched, fixed)]
    if rank_table is not None:
        for n in (n for n in REPLAY_DP_SIZES if n <= max_size):
            spec = f"dp:{n}x{most}"
            shape = from_name(spec, profile=rank_table)
            out.append((spec, lambda s=shape: private(drafter, s, sized=False), shape, fixed))
    for k in range(1, most + 1):
        shape = chain(draft_tokens=k)
        out.append((f"chain:{k + 1}", lambda s=shape: private(drafter, s, sized=False), shape,
                    fixed))
    if table is not None:
        opts = {"latency": None, "len": "auto", "table": table_path}
        if getattr(drafter, "max_tokens", most) > most:  # suffix: its largest step
            opts = {"latency": None, "max": most, "len": "auto", "table": table_path}
        out.append((LEN_AUTO, lambda: private(sizing_copy(drafter, table, verify_ms, most)),
                    None, opts))
    if drafter.shape is None and hasattr(drafter, "alpha"):
        for alpha in SUFFIX_ALPHAS:
            out.append((f"alpha={alpha:g}", lambda a=alpha: _with_alpha(drafter, a), None,
                        {**fixed, "alpha": alpha}))
    elif drafter.shape is None:
        out.append(("as given", lambda: private(drafter), None, {}))
    return out + other_candidates(others)


def other_candidates(others: Sequence[tuple[str, object]]) -> list:
    """Replay candidates of other drafters, (spec, drafter) each, replayed as they are; their
    decode spec under the option "spec"."""
    return [(f"--draft {spec}", lambda d=other: private(d), None, {"spec": spec})
            for spec, other in others]


#: Other model-free drafters ``tune`` replays beside the one tuned (when registered):
#: the per-step chooser and the copy drafter it does not tune.
OTHER_DRAFTERS = ("auto", "suffix", "ngram")


def other_drafters(pair, most: int = REPLAY_MAX_CHAIN) -> list[tuple[str, object]]:
    """(spec, drafter) of every ``OTHER_DRAFTERS`` entry that is registered, is not the
    drafter tuned, and can be replayed (``auto`` without a draft model: copies only, and the
    corpus when a ``datastore:PATH`` is tuned: ``auto:datastore=(PATH)``); the drafters that
    size their own steps capped at ``most`` drafted tokens when that is below
    ``REPLAY_MAX_CHAIN`` (a height limit the user gave)."""
    out = []
    for name in OTHER_DRAFTERS:
        if name == pair.drafter.name or name not in registered():
            continue
        opts = [f"max={most}"] if most < REPLAY_MAX_CHAIN and name != "ngram" else []
        if name == "auto":
            opts = _corpus_options(pair) + opts
        spec = f"{name}:{','.join(opts)}" if opts else name
        other = build_drafter(spec, target=pair.target, tokenizer=pair.tokenizer)
        if replayable(other) is None:
            out.append((spec, other))
    return out


def _corpus_options(pair) -> list[str]:
    """``["datastore=(PATH)"]`` when the drafter tuned is ``datastore:PATH`` given by its
    spec (``auto`` then has that corpus among its candidates), else []."""
    if pair.drafter.name != DATASTORE or not pair.draft_spec:
        return []
    entry, path = split_spec(pair.draft_spec)
    return [f"{DATASTORE}=({path})"] if entry is not None and path else []


def _with_alpha(drafter, alpha: float):
    new = private(drafter, sized=False)
    new.alpha = float(alpha)
    return new


def replay_choice(pair, prompts, run, found: SearchResult, searched: Tree, latency,
                  table, search: SearchSettings, table_path=None) -> ReplayChoice:
    """The best configuration of a model-free drafter by greedy replay
    (``treeopt.profile.replay``) along the target's continuations of the tune ``prompts``
    (``run.max_new_tokens`` each), drafting at most ``REPLAY_MAX_CHAIN`` tokens a step,
    fewer under ``found.max_size`` and a height limit the user gave in ``search``; its
    ``tree`` is the shape to save (for a drafter that sizes its steps: its largest step as
    a chain) and ``options`` the drafter-spec options that decode it (``table_path``: where
    the copy table was saved, for per-step lengths)."""
    most = _replay_most(found, search)
    others = other_drafters(pair, most) if search.other_drafters else []
    cands = replay_candidates(pair.drafter, searched, most, table, monotone(latency.target),
                              table_path, found.rank_table, found.max_size, others)
    return _replay_best(pair, prompts, run, latency, cands)


def replay_others(pair, prompts, run, found: SearchResult, latency, search: SearchSettings,
                  tree: Tree | None = None, spec: str | None = None) -> ReplayChoice | None:
    """For a drafter that runs a model: the fastest by greedy replay along the target's
    continuations of the tune ``prompts`` (those the acceptance profile computed) of the
    other model-free drafters (:func:`other_drafters`) and, given the tuned ``tree`` and the
    draft's ``spec``, of :func:`model_candidates` (that tree, labelled ``TUNED_TREE``, and
    ``auto`` with the draft), or None when there is nothing to replay. ``tune`` keeps
    another candidate when it beats the tuned tree's replay (like for like: both timed
    drafting here), or without that replay the DP's prediction: copies, or copies and the
    model chosen per step, are what decodes fastest for some pairs on some machines."""
    most = _replay_most(found, search)
    others = other_drafters(pair, most)
    cands = model_candidates(pair, tree, found.rank_table, spec, most) \
        if tree is not None else []
    cands += other_candidates(others)
    if not cands:
        return None
    return _replay_best(pair, prompts, run, latency, cands, models=True)


#: The label of the tuned tree among :func:`model_candidates`.
TUNED_TREE = "tuned tree"


def model_candidates(pair, tree: Tree, rank_table, spec: str | None,
                     most: int = REPLAY_MAX_CHAIN) -> list:
    """Replay candidates of a draft model that drafts fixed shapes (``model:``,
    ``early-exit:``): the tuned ``tree`` (``TUNED_TREE``) and ``auto:draft=(SPEC)``, which
    chooses per step between chains of the model and the copy drafters (at most ``most``
    drafted tokens: ``,max=`` below ``REPLAY_MAX_CHAIN``), starting from this tune's top-1
    acceptance by depth (``rank_table``) as ``auto:draft=`` will once the tune is cached.
    None for other drafters, or without ``spec`` or ``auto``."""
    drafter = pair.drafter
    if getattr(drafter, "model", None) is None or getattr(drafter, "shape", None) is None \
            or replayable(drafter, models=True) is not None or not spec:
        return []
    out = [(TUNED_TREE, lambda: private(drafter, tree, sized=False), tree, {})]
    if "auto" in registered():
        prior = [float(row[0]) if len(row) else 0.0 for row in rank_table]
        label = f"auto:draft=({spec})" + (f",max={most}" if most < REPLAY_MAX_CHAIN else "")
        out.append((f"--draft {label}", lambda: private(auto_drafter(
            pair.target, pair.tokenizer, model=drafter, model_prior=prior,
            max_draft=min(most, MAX_DRAFT))), None, {"spec": label}))
    return out


def _replay_most(found: SearchResult, search: SearchSettings) -> int:
    """The most tokens a replayed step drafts: ``REPLAY_MAX_CHAIN``, fewer under the search's
    size and a height limit the user gave."""
    most = min(REPLAY_MAX_CHAIN, max(1, found.max_size - 1))
    if search.max_levels is not None or search.max_depth is not None:
        most = max(1, min(most, search.levels() - 1))
    return most


#: ``auto`` (in any of its specs) stays tune's answer unless a fixed configuration replays
#: more than this much faster on the tune prompts (auto's own margin over plain decoding).
#: A fixed shape is fitted to the tune prompts and picked as the best of many replays (the
#: winner of several estimates is over-estimated); ``auto`` decides per step on the text it
#: decodes. Measured (README): with the Qwen2.5-Coder int8 draft a tuned chain replayed
#: 1.3 % ahead of ``auto:draft=`` on 4 tune prompts, while on 8 held-out prompts (another
#: run) ``auto`` ran 7.8 % ahead of such a chain; on SmolLM2 + early exit tune's n-gram
#: chain ran 3.7 % behind ``auto`` held out.
ADAPTIVE_MARGIN = MARGIN


def adaptive_labels(cands) -> list[str]:
    """The labels of ``cands`` (label, factory, shape, options) that decode with ``auto``."""
    return [c[0] for c in cands if str(c[3].get("spec", "")).split(":")[0] == "auto"]


def _replay_best(pair, prompts, run, latency, cands, *, models: bool = False
                 ) -> ReplayChoice:
    """The fastest of ``cands`` replayed along the target's greedy continuations of the tune
    ``prompts`` (``run.max_new_tokens`` each), ``auto`` unless another replays more than
    ``ADAPTIVE_MARGIN`` faster, with its decode options and the tree to save (``models``:
    candidates may run a model)."""
    ids = encode_for_decoding(pair, prompts, run.chat_template, run.max_new_tokens)
    eos = eos_ids(pair.tokenizer, pair.target) if pair.tokenizer is not None else []
    conts = continuations(pair.target, ids, run.max_new_tokens, eos[0] if eos else None)
    best = choose_replayed(cands, ids, conts, latency, models=models,
                           prefer=adaptive_labels(cands), margin=ADAPTIVE_MARGIN)
    best.options = {c[0]: c[3] for c in cands}[best.label]
    best.tree = best.shape_for(best.label, best.prediction)
    return best


def replay_summary(choice: ReplayChoice) -> dict:
    """The replayed candidates for ``summary.json``: label -> predicted tokens/s, speed-up
    and tokens per step; the one kept; the ones that could not run."""
    return {"chosen": choice.label,
            "candidates": {k: {"tokens_per_s": round(p.tokens_per_s, 3),
                               "speedup": round(p.speedup, 4),
                               "tokens_per_step": round(p.expected_tokens, 4),
                               "largest_step_nodes": p.size}
                           for k, p in choice.predictions.items()},
            "skipped": dict(choice.skipped)}
