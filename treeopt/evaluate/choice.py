"""How good treeopt's choices are: regret and prediction error on held-out prompts.

For a pair and a data set (:func:`bench_choice`): the prompts are split in two; for each
dtype, :func:`treeopt.tuning.tune` profiles the pair on the first split and chooses a tree,
then :func:`treeopt.evaluate.runner.run_eval` measures, interleaved on the held-out split, plain
decoding, the tuned tree, the ``auto`` drafter (with the pair's draft model among its
candidates when it has one) and a grid: chains of 2..16 drafted tokens, the
DP trees of 8/16/32 nodes (from the same profile) and Hugging Face prompt lookup. Each
temperature is its own tune and measurement: greedy (tune chooses a model-free drafter's
configuration by replay) or sampled (tune's acceptance profile at that temperature, the
methods verified by the settings' rule, seeded).

Per dtype, temperature and category (:func:`choice_table`):

- regret = best measured speed-up in the grid / the chosen method's speed-up - 1 (0 when the
  choice was the best; for the tuned tree and for ``auto``);
- prediction error = predicted speed-up / measured speed-up - 1 (the tuned tree, and every
  grid tree the profile can predict), both of whole generations: the per-step prediction is
  carried over the held-out generations' prompt and answer lengths with the prefill times tune
  measured (``treeopt.search.hardware.end_to_end``), as eval's speed-up includes the prefill;
  ``predicted_tuned_per_step`` keeps the per-step figure;
- plain decoding's tokens/s, so that a dtype's gain and speculation's gain are never mixed:
  speed-ups are over plain decoding *in the same dtype*, and :func:`dtype_table` compares the
  dtypes' plain speeds (and says which dtype ``--dtype auto`` picks from the tunes'
  predicted speculative speeds).

Beside them, two diagnostics: :func:`replay_on_held_out` (tune's choice replayed along the
held-out prompts' own outputs: the predictor's error and regret without the tune split) and
:func:`priced_steps` (every method's recorded steps priced with one curve: the regret of the
decisions without the timing noise between methods).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from treeopt.api import Pair, encode_prompts
from treeopt.datasets import split_prompts
from treeopt.decode.drafter import build_drafter
from treeopt.decode.sampling import Sampling, SamplingError
from treeopt.evaluate.errors import EvalError
from treeopt.evaluate.methods import (
    ALL,
    AR,
    Method,
    ar_method,
    chain_method,
    dp_method,
    drafter_method,
)
from treeopt.evaluate.outdir import atomic_write
from treeopt.evaluate.reference import hf_prompt_lookup
from treeopt.evaluate.results import RUN_FILE
from treeopt.evaluate.runner import EvalConfig, check_config, run_eval
from treeopt.evaluate.spread import paired_times, spread
from treeopt.models.dtype import choose_by_rate
from treeopt.models.loading import load_model, load_tokenizer
from treeopt.models.machine import Machine
from treeopt.profile import LatencyCurve
from treeopt.profile.latency import LatencySettings
from treeopt.profile.replay import private, replay, replayable
from treeopt.search.hardware import (
    PrefillCost,
    empty_step_rate,
    end_to_end,
    monotone,
    predict,
    prefill_costs,
)
from treeopt.tuning import AcceptanceSettings, runs_given_drafter, tune

CHAINS = (2, 4, 8, 16)
DP_SIZES = (8, 16, 32)
HF_LOOKUP = (3,)
TUNED = "tuned"
AUTO = "auto"


@dataclass
class ChoiceRun:
    """One dtype's measurements at one temperature: the eval summary (``summary``: method x
    category), the predicted speed-up of every method the profile predicts (``predicted``),
    the tuned tree's shape, the tune's latency curve of the target (tokens -> ms) and the
    rows."""

    dtype: str
    summary: Any
    predicted: dict[str, float]
    tuned_size: int
    tuned_depth: int
    target_ms: dict[int, float]
    rows: Any = None
    tuned_method: str = ""
    held_out: dict | None = None  # replay_on_held_out
    temperature: float = 0.0
    rule: str = "sequoia"
    same_as_tuned: list[str] = field(default_factory=list)  # grid names measured as tuned
    prefill: PrefillCost | None = None  # tune's prefill costs (None: per-step predictions)
    plain_ms: float = math.nan  # tune's plain step (ms), which the predictions are over
    no_draft_prefill: list[str] = field(default_factory=list)  # methods not running the draft
    notes: list[str] = field(default_factory=list)  # what a resumed run did differently

    def whole(self, name: str, rows) -> float:
        """Method ``name``'s predicted speed-up over the generations of ``rows`` (eval rows
        of plain decoding: prompt and new tokens), prefill included; the per-step prediction
        without tune's prefill costs."""
        per_step = self.predicted[name]
        if self.prefill is None or name == AR or rows is None or not len(rows):
            return per_step
        gens = list(zip(rows["prompt_tokens"], rows["new_tokens"]))
        return end_to_end(per_step, self.plain_ms, self.prefill, gens,
                          draft=name not in self.no_draft_prefill)


@dataclass
class ChoiceReport:
    runs: list[ChoiceRun] = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    def table(self) -> pd.DataFrame:
        return pd.concat([choice_table(r) for r in self.runs], ignore_index=True)

    def dtypes(self) -> pd.DataFrame:
        return dtype_table(self.runs)

    def priced(self) -> pd.DataFrame:
        """Per dtype and temperature, :func:`priced_steps` (no rows without step records)."""
        return pd.DataFrame([p for p in map(priced_steps, self.runs) if p is not None])

    def held_out(self) -> pd.DataFrame:
        """Per dtype, :func:`replay_on_held_out` (greedy runs only: no rows when nothing was
        replayed)."""
        return pd.DataFrame([{"dtype": r.dtype, **r.held_out} for r in self.runs
                             if r.held_out is not None])


def grid_methods(profile, chains: Sequence[int] = CHAINS, dp_sizes: Sequence[int] = DP_SIZES,
                 hf_lookup: Sequence[int] = HF_LOOKUP, tuned: Method | None = None,
                 draft_model: str | None = None) -> list[Method]:
    """Plain decoding, tune's choice (``tuned``, see :func:`tuned_method`), ``auto``, chains
    of ``chains`` drafted tokens, the DP trees of ``dp_sizes`` nodes and Hugging Face prompt
    lookup of ``hf_lookup`` tokens. With a ``draft_model`` spec ``auto`` has it among its
    candidates (``auto:draft=(SPEC)``, which starts from the acceptance tune recorded), as a
    user who gives a draft model runs it; the method is still named ``auto``."""
    methods = [ar_method()]
    if tuned is not None:
        methods.append(tuned)
    if draft_model:
        spec = f"{AUTO}:draft=({draft_model})"
        methods.append(Method(AUTO, None, "drafter", f"auto with the draft: {spec}", spec))
    else:
        methods.append(drafter_method(AUTO))
    methods += [chain_method(n) for n in chains]
    methods += [dp_method(profile, n) for n in dp_sizes]
    methods += [hf_prompt_lookup(k) for k in hf_lookup]
    return methods


def _config(m: Method) -> tuple | None:
    """What a treeopt method decodes with: (drafter spec or None for the run's drafter, the
    tree's parents or None); None for plain decoding and reference methods."""
    if m.kind in ("ar", "hf"):
        return None
    return (m.drafter, None if m.tree is None else tuple(m.tree.parents))


def same_as_tuned(methods: Sequence[Method]) -> tuple[list[Method], list[str]]:
    """``methods`` without the grid methods that decode exactly as tune's choice does (tune
    chose ``auto``, or a chain of the grid), and their names: measured once, as the tuned
    method, they are one configuration, so two timings of it never pass for regret."""
    tuned = next((m for m in methods if m.name == TUNED), None)
    key = None if tuned is None else _config(tuned)
    if key is None:
        return list(methods), []
    kept = [m for m in methods if m.name == TUNED or _config(m) != key]
    return kept, [m.name for m in methods if m.name != TUNED and _config(m) == key]


def _pair(target: str, draft: str, dtype: str, device: str) -> Pair:
    model = load_model(target, dtype=dtype, device=device)
    tokenizer = load_tokenizer(target)
    drafter = build_drafter(draft, target=model, tokenizer=tokenizer)
    return Pair(model, getattr(drafter, "model", None), tokenizer, target, draft, drafter)


@dataclass(frozen=True)
class ChoiceSettings:
    """What :func:`bench_choice` runs: ``tune_prompts`` prompts to tune on and
    ``eval_prompts`` others to measure on (drawn with ``seed``, optionally only
    ``categories``), each ``dtype``; ``tune_tokens`` per tuning continuation and
    ``max_new_tokens`` per measured answer (``stop_at_eos``); the grid (``chains`` of drafted
    tokens, ``dp_sizes`` nodes, ``hf_lookup`` tokens) and the tune's ``latency`` settings.
    Each of ``temperatures`` is a tune and a measurement of its own (0: greedy, tune chooses
    by replay; above 0: sampled, tuned on an acceptance profile at that temperature and
    verified by ``rule``, both seeded by ``seed``). ``repeats``: each measured generation is
    run that many times and the fastest kept (``EvalConfig.repeats``)."""

    tune_prompts: int = 8
    eval_prompts: int = 13
    dtypes: tuple[str, ...] = ("float32",)
    max_new_tokens: int = 64
    tune_tokens: int = 32
    chains: tuple[int, ...] = CHAINS
    dp_sizes: tuple[int, ...] = DP_SIZES
    hf_lookup: tuple[int, ...] = HF_LOOKUP
    seed: int = 0
    categories: str | None = None
    stop_at_eos: bool = False
    latency: LatencySettings = field(default_factory=LatencySettings)
    temperatures: tuple[float, ...] = (0.0,)
    rule: str = "sequoia"
    repeats: int = 1

    def __post_init__(self):
        if not self.temperatures:
            raise SamplingError("give at least one temperature, e.g. 0 or 0,0.7,1.0")
        for t in self.temperatures:  # a bad temperature or rule fails before any work
            Sampling(float(t), rule=self.rule)
        check_config(EvalConfig(repeats=self.repeats))  # before any tune
        if self.rule == "block" and self.dp_sizes:
            raise SamplingError("rule 'block' verifies chains (one child per node): DP trees "
                             "branch; give --dp-sizes '' with --rule block")


BENCH_FILE = "bench.json"


def bench_choice(target: str, draft: str, dataset: str = "spec_bench",
                 settings: ChoiceSettings | None = None, *, device: str = "cpu",
                 progress: bool = False, out: str | Path | None = None,
                 resume: bool = False) -> ChoiceReport:
    """Tune on one split and measure on the other, per dtype (see the module docstring).

    ``out``: a folder that keeps everything measured, so an interrupted run loses nothing:
    ``bench.json`` (the settings and the split), and per dtype and temperature a folder
    ``<dtype>-t<T>`` with the tune (``tune/``: profile, tree, summary) and the eval
    (``eval/``: rows as prompts finish). ``resume=True`` continues such a run with the same
    settings: the tune resumes its acceptance profile and keeps its finished latency
    measurement (so it chooses as the first time did), and the eval skips finished prompts.
    Without ``out`` the files live in a temporary folder."""
    cs = settings or ChoiceSettings()
    tune_set, held_out = split_prompts(dataset, cs.tune_prompts, cs.eval_prompts, cs.seed,
                                       cs.categories)
    report = ChoiceReport(settings={"target": target, "draft": draft, "dataset": dataset,
                                    "tune_prompts": [p.id for p in tune_set],
                                    "eval_prompts": [p.id for p in held_out],
                                    "max_new_tokens": cs.max_new_tokens,
                                    "dtypes": list(cs.dtypes),
                                    "temperatures": [float(t) for t in cs.temperatures],
                                    "rule": cs.rule, "seed": cs.seed})
    with contextlib.ExitStack() as stack:
        if out is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(
                prefix="treeopt-choice-")))
        else:
            work = Path(out)
            _claim(work, {**report.settings, "device": device,
                          "settings": json.loads(json.dumps(dataclasses.asdict(cs),
                                                            default=str))}, resume)
        for dtype in cs.dtypes:
            for temp in cs.temperatures:
                report.runs.append(_choice_run(target, draft, dtype, device, cs, tune_set,
                                               held_out, work / f"{dtype}-t{temp:g}",
                                               progress, float(temp)))
    return report


def _claim(work: Path, settings: dict, resume: bool) -> None:
    """Record ``settings`` in ``work`` (a new run) or check them against the recorded ones
    (``resume``); one-line EvalError when the folder holds another run."""
    path = work / BENCH_FILE
    if path.exists():
        if not resume:
            raise EvalError(f"{work} already holds a bench_choice run; pass --resume to "
                            "continue it or choose another --out")
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise EvalError(f"cannot resume {work}: its {BENCH_FILE} is unreadable; choose "
                            "another --out") from None
        settings = _as_recorded(settings, old)
        if old != settings:
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            if "settings" in diff and all(isinstance(d.get("settings"), dict)
                                          for d in (old, settings)):
                inner = (old["settings"], settings["settings"])
                diff = sorted({k for k in diff if k != "settings"} | {
                    k for k in set(inner[0]) | set(inner[1])
                    if inner[0].get(k) != inner[1].get(k)})
            raise EvalError(f"cannot resume {work}: it was run with other settings "
                            f"({', '.join(diff)}); use the same options or another --out")
        return
    if work.exists() and any(work.iterdir()):
        raise EvalError(f"{work} is not empty and holds no bench_choice run; choose another "
                        "--out")
    work.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(settings, indent=1) + "\n")


def _as_recorded(settings: dict, old: dict) -> dict:
    """``settings`` without the ChoiceSettings fields a run recorded in ``old`` predates, when
    they have their default value (an older run resumes as it was run)."""
    mine, theirs = settings.get("settings"), old.get("settings")
    if not isinstance(mine, dict) or not isinstance(theirs, dict):
        return settings
    defaults = json.loads(json.dumps(dataclasses.asdict(ChoiceSettings()), default=str))
    kept = {k: v for k, v in mine.items()
            if k in theirs or k not in defaults or v != defaults[k]}
    return {**settings, "settings": kept}


def _choice_of(tune_dir: Path) -> tuple | None:
    """What the tune in ``tune_dir`` chose (method, tree, drafter spec), None before it
    finished."""
    try:
        done = json.loads((tune_dir / "summary.json").read_text(encoding="utf-8"))
        return done["method"], done["tree"]["parents"], done.get("draft_spec")
    except (OSError, ValueError, KeyError, TypeError):
        return None


def tuned_method(tuned) -> Method:
    """The configuration ``tune`` chose as an eval method: its tree over the run's drafter,
    or the drafter spec it names (per-step lengths from the saved copy table; a drafter
    that sizes its own steps drafts without a tree)."""
    self_sized = tuned.replay is not None and tuned.replay.sizes_itself
    if tuned.draft_spec is None and not self_sized:
        return Method(TUNED, tuned.tree, "tree", f"the tree tune chose ({tuned.method})")
    spec = tuned.draft_spec or tuned.summary["draft"]
    return Method(TUNED, None if self_sized else tuned.tree, "drafter",
                  f"tune's choice: {spec} ({tuned.method})", spec)


def _choice_run(target, draft, dtype, device, cs: ChoiceSettings, tune_set, held_out, work,
                progress, temperature: float = 0.0) -> ChoiceRun:
    """Tune in ``dtype`` at ``temperature`` on ``tune_set`` (files in ``work``), then measure
    on ``held_out`` at that temperature."""
    pair = _pair(target, draft, dtype, device)
    sampling = Sampling(temperature, rule=cs.rule)
    before = _choice_of(work / "tune")
    tuned = tune(pair, prompts=tune_set, out_dir=work / "tune", sampling=sampling,
                 acceptance=AcceptanceSettings(prompts=len(tune_set),
                                               max_new_tokens=cs.tune_tokens, seed=cs.seed),
                 latency=cs.latency, machine=Machine(device=device), progress=progress,
                 resume=(work / "tune" / "profile.json").exists())
    has_model = getattr(pair.drafter, "model", None) is not None
    methods, aliases = same_as_tuned(grid_methods(tuned.profile, cs.chains, cs.dp_sizes,
                                                  cs.hf_lookup, tuned_method(tuned),
                                                  draft if has_model else None))
    empty = empty_step_rate(tuned.profile)
    table = tuned.search.rank_table
    replayed = tuned.replay.predictions if tuned.replay is not None else {}
    predicted = {AR: 1.0, TUNED: tuned.prediction.speedup}
    for m in methods:
        if m.name == AUTO and has_model:
            continue  # auto with the draft model: replay knows only its copies
        if m.name in replayed:  # a model-free drafter's chain: its greedy replay
            predicted[m.name] = replayed[m.name].speedup
        elif m.kind in ("chain", "dp") and m.tree is not None and tuned.replay is not None \
                and replayable(pair.drafter) is None:  # not a draft model's (tune kept a copy)
            predicted[m.name] = tuned.replay.predict(private(pair.drafter, m.tree, sized=False),
                                                     m.tree).speedup
        elif m.kind in ("chain", "dp") and m.tree is not None:
            predicted[m.name] = predict(m.tree, table, tuned.latency, tuned.search.meta.get(
                "draft_cost", "per-level"), empty).speedup
    config = EvalConfig(max_new_tokens=cs.max_new_tokens, sampling=sampling, seed=cs.seed,
                        stop_at_eos=cs.stop_at_eos, repeats=cs.repeats)
    notes = []
    if before is not None and before != _choice_of(work / "tune") and (work / "eval").exists():
        # the resumed tune chose otherwise (replay times proposals: a near tie can flip), so
        # the eval of the earlier choice cannot continue: kept aside, measured anew
        aside = work / f"eval-before-{sum(1 for _ in work.glob('eval-before-*')) + 1}"
        (work / "eval").rename(aside)
        notes.append(f"the resumed tune chose {tuned.method} where the interrupted one chose "
                     f"{before[0]}: its eval was kept in {aside.name} and measured anew")
    result = run_eval(pair.target, pair.drafter, held_out, methods, config=config,
                      tokenizer=pair.tokenizer, progress=progress, out_dir=work / "eval",
                      resume=(work / "eval" / RUN_FILE).exists(),
                      meta={"target": target, "draft": draft, "dataset": "held-out split"})
    lat = tuned.latency.target
    target_ms = {int(n): float(ms) for n, ms in zip(lat.tokens, lat.ms)}
    # methods that never start the run's drafter, whose prefill tune timed: a drafter spec
    # of their own (auto without the draft, HF), and tune's answer when it is another
    # drafter or plain decoding
    own = [m.name for m in methods
           if (not runs_given_drafter(pair, tuned.draft_spec, tuned.tree, tuned.replay)
               if m.name == TUNED
               else m.kind in ("drafter", "hf") and not (m.name == AUTO and has_model))]
    return ChoiceRun(dtype, result.summary, predicted, tuned.tree.size, tuned.tree.depth,
                     target_ms, result.rows, tuned.method,
                     replay_on_held_out(tuned, pair, held_out, result.rows, methods), temperature,
                     cs.rule, aliases, prefill_costs(tuned.latency), tuned.prediction.plain_ms,
                     own, notes)


def replay_on_held_out(tuned, pair, held_out, rows, methods: Sequence[Method] = ()
                       ) -> dict | None:
    """Tune's choice replayed along plain decoding's outputs of the *held-out* prompts (first
    turns), priced with tune's latency curve, beside what was measured on those turns: the
    prediction's own error once the prompts' difference is taken out. Measured speed-up
    without the prefill (the replay has none): plain decoding's decode time per token over
    the tuned method's. None without a replay (sampling; a draft model's tree that tune
    kept).

    With ``methods`` (the grid), every chain and DP tree of the run's model-free drafter is
    replayed there too, and ``held_out_pick`` is the one the replay would have chosen had it
    tuned on these very prompts: ``model_regret`` (the best of those measured / the pick's
    measured speed-up - 1, both without the prefill) is what remains of the regret once the
    tune split is out of it — the predictor's own share."""
    if tuned.replay is None or rows is None or not len(rows):
        return None
    first = rows[rows["turn"] == 1]
    plain = {r["prompt_id"]: r for _, r in first[first["method"] == AR].iterrows()}
    chosen = {r["prompt_id"]: r for _, r in first[first["method"] == TUNED].iterrows()}
    ids, conts, keys = [], [], []
    for p in held_out:
        if p.id not in plain or p.id not in chosen:
            continue
        enc = encode_prompts(pair.tokenizer, [p], True, None)[0]
        enc = enc[int(plain[p.id].get("truncated_tokens", 0) or 0):]  # eval's left cut
        if len(enc) != int(plain[p.id]["prompt_tokens"]):
            continue  # encoded unlike the eval: not comparable
        ids.append(enc)
        conts.append(list(plain[p.id]["output_ids"]))
        keys.append(p.id)
    if not keys:
        return None
    got = replay(private(tuned.replay.drafter), ids, conts, models=True)  # auto:draft= too
    pred = got.predict(monotone(tuned.latency.target))

    def decode_rate(table) -> float:
        secs = sum(float(table[k]["seconds"]) - float(table[k]["prefill_s"]) for k in keys)
        return sum(int(table[k]["new_tokens"]) for k in keys) / secs

    measured = decode_rate(chosen) / decode_rate(plain)
    steps = sum(int(chosen[k]["steps"]) for k in keys)
    pick = _held_out_pick(tuned, pair, first, keys, ids, conts, methods, decode_rate,
                          plain, {TUNED: (pred.speedup, measured)})
    return {"prompts": len(keys), "predicted": pred.speedup, "measured_decode": measured,
            **pick,
            "error": pred.speedup / measured - 1,
            "tokens_per_step_replayed": pred.expected_tokens,
            "tokens_per_step_measured": sum(int(chosen[k]["step_tokens"]) for k in keys) / steps,
            "step_ms_predicted": pred.step_ms,
            "step_ms_measured": 1000 * sum(float(chosen[k]["seconds"]) - float(
                chosen[k]["prefill_s"]) for k in keys) / steps,
            "plain_ms_predicted": pred.plain_ms,
            "plain_ms_measured": 1000 / decode_rate(plain)}


def _held_out_pick(tuned, pair, first, keys, ids, conts, methods, decode_rate, plain,
                   known: dict) -> dict:
    """``replay_on_held_out``'s pick among the grid's chains and DP trees of a model-free
    drafter (and tune's choice, ``known``: name -> (predicted, measured))."""
    if replayable(pair.drafter) is not None:
        return {}
    curve = monotone(tuned.latency.target)
    scores = dict(known)
    for m in methods:
        if m.kind not in ("chain", "dp") or m.tree is None:
            continue
        by_id = {r["prompt_id"]: r for _, r in first[first["method"] == m.name].iterrows()}
        if not all(k in by_id for k in keys):
            continue
        got = replay(private(pair.drafter, m.tree, sized=False), ids, conts)
        scores[m.name] = (got.predict(curve).speedup, decode_rate(by_id) / decode_rate(plain))
    if len(scores) < 2:
        return {}
    pick = max(scores, key=lambda k: (scores[k][0], k))
    best = max(scores, key=lambda k: (scores[k][1], k))
    return {"held_out_pick": pick, "held_out_pick_measured": scores[pick][1],
            "held_out_best": best, "held_out_best_measured": scores[best][1],
            "model_regret": scores[best][1] / scores[pick][1] - 1}


def priced_steps(run: ChoiceRun) -> dict | None:
    """Every treeopt method's measured steps (nodes verified per step, over all its
    generations) priced with tune's latency curve of the target, plus its measured drafting
    time, without the prefill: the speed-up each method's *decisions* earn once the timing
    noise between methods is out (on a shared machine the same steps cost up to a third more
    in one method's generations than in another's). ``regret_tuned_priced`` /
    ``regret_auto_priced``: the best priced speed-up over the tuned method's / ``auto``'s -
    1. Hugging Face's methods record no steps and are left out. None without step rows."""
    rows = run.rows
    if rows is None or not len(rows) or "nodes_per_step" not in rows or not run.target_ms:
        return None
    sizes = sorted(run.target_ms)
    curve = monotone(LatencyCurve(tokens=sizes, ms=[run.target_ms[n] for n in sizes]))
    rates = {}
    for name, group in rows.groupby("method", sort=False):
        steps = [n for ns in group["nodes_per_step"] if isinstance(ns, list) for n in ns]
        if not steps or len(steps) < sum(int(x) for x in group["steps"]):
            continue  # a method without per-step records (Hugging Face's)
        ms = sum(float(curve(n)) for n in steps) + 1000.0 * float(group["draft_s"].sum())
        rates[name] = float(group["new_tokens"].sum()) / ms
    if AR not in rates:
        return None
    speed = {k: v / rates[AR] for k, v in rates.items()}
    for name in run.same_as_tuned:
        if TUNED in speed:
            speed[name] = speed[TUNED]
    best = max(speed, key=lambda k: (speed[k], k))
    return {"dtype": run.dtype, "temperature": run.temperature,
            "tuned_priced": speed.get(TUNED, math.nan), "auto_priced": speed.get(AUTO, math.nan),
            "best_priced": speed[best], "best_priced_method": best,
            "regret_tuned_priced": _regret(speed[best], speed.get(TUNED, math.nan)),
            "regret_auto_priced": _regret(speed[best], speed.get(AUTO, math.nan))}


def _regret_interval(rows, best: str, aliases: Sequence[str]) -> dict:
    """A bootstrap 95 % interval of the tuned method's regret against the measured ``best``
    (``treeopt.evaluate.spread``: prompts resampled, paired, ratios of summed times), so a
    regret within the timing noise of a few prompts reads as such; NaN when tune's choice
    is the best or the rows are missing."""
    out = {"regret_tuned_ci95_low": math.nan, "regret_tuned_ci95_high": math.nan}
    if rows is None or not len(rows) or best == TUNED or best in aliases \
            or "prompt_key" not in rows:
        return out
    got = spread(*paired_times(rows, best, TUNED))
    out["regret_tuned_ci95_low"] = got["speedup_ci95_low"] - 1
    out["regret_tuned_ci95_high"] = got["speedup_ci95_high"] - 1
    return out


def _regret(best: float, chosen: float) -> float:
    return best / chosen - 1 if chosen > 0 else math.nan


def choice_table(run: ChoiceRun) -> pd.DataFrame:
    """One row per category (and "all"): plain tokens/s, the tuned tree's and auto's measured
    speed-ups, their regret against the best method measured, the tuned tree's predicted
    speed-up and prediction error, the best method and Hugging Face prompt lookup's best."""
    s = with_all(run.summary)
    rows = run.rows
    plain_rows = rows[rows["method"] == AR] if rows is not None and len(rows) else None
    out = []
    for cat, group in s.groupby("category", sort=False):
        gens = (plain_rows if plain_rows is None or cat == ALL
                else plain_rows[plain_rows["category"] == cat])
        cat_rows = (rows if rows is None or not len(rows) or cat == ALL
                    else rows[rows["category"] == cat])
        predicted = {k: run.whole(k, gens) for k in run.predicted}
        speed = dict(zip(group["method"], group["speedup"]))
        for name in run.same_as_tuned:  # the same configuration as tune's choice
            speed[name] = speed[TUNED]
        plain = group.loc[group["method"] == AR, "tokens_per_s"]
        best_name = max(speed, key=lambda k: (speed[k], k))
        tuned, auto = speed.get(TUNED, math.nan), speed.get(AUTO, math.nan)
        hf = max((v for k, v in speed.items() if k.startswith("hf-")), default=math.nan)
        pred = predicted.get(TUNED, math.nan)
        errors = [predicted[k] / v - 1 for k, v in speed.items()
                  if k in predicted and k != AR and v > 0]
        out.append({"dtype": run.dtype, "temperature": run.temperature,
                    "rule": run.rule if run.temperature > 0 else "greedy", "category": cat,
                    "plain_tokens_per_s": float(plain.iloc[0]) if len(plain) else math.nan,
                    "tuned": tuned, "auto": auto, "best": speed[best_name],
                    "best_method": best_name, "hf_pld": hf,
                    "regret_tuned": _regret(speed[best_name], tuned),
                    **_regret_interval(cat_rows, best_name, run.same_as_tuned),
                    "regret_auto": _regret(speed[best_name], auto),
                    "predicted_tuned": pred,
                    "predicted_tuned_per_step": run.predicted.get(TUNED, math.nan),
                    "prediction_error_tuned": pred / tuned - 1 if tuned > 0 else math.nan,
                    "prediction_error_grid_max": max(errors, key=abs) if errors else math.nan,
                    "tuned_tree": f"{run.tuned_size} nodes, depth {run.tuned_depth}",
                    "tuned_method": run.tuned_method})
    return pd.DataFrame(out)


def with_all(summary: pd.DataFrame) -> pd.DataFrame:
    """The eval summary with its overall rows: eval adds category "all" only when there are
    several categories; with one (HumanEval, say) its rows are the overall ones too."""
    cats = set(summary["category"])
    if ALL in cats or len(cats) != 1:
        return summary
    return pd.concat([summary, summary.assign(category=ALL)], ignore_index=True)


def dtype_table(runs: Sequence[ChoiceRun]) -> pd.DataFrame:
    """Plain decoding's tokens/s per dtype over all prompts, the best method's tokens/s in that
    dtype, and the dtype ``--dtype auto`` means after ``tune --dtypes``: the one whose tuned
    configuration is predicted fastest (``choose_by_rate`` of predicted speed-up x plain
    tokens/s of the tune's curve)."""
    picked = {}
    for temp in dict.fromkeys(r.temperature for r in runs):  # per temperature
        picked[temp] = choose_by_rate({r.dtype: r.predicted[TUNED] * 1000.0 / r.target_ms[1]
                                       for r in runs if r.temperature == temp})
    rows = []
    for r in runs:
        summary = with_all(r.summary)
        every = summary[summary["category"] == ALL]
        plain = every.loc[every["method"] == AR, "tokens_per_s"]
        best = every.loc[every["speedup"].idxmax()]
        auto = every.loc[every["method"] == (TUNED if AUTO in r.same_as_tuned else AUTO),
                         "tokens_per_s"]
        rows.append({"dtype": r.dtype, "temperature": r.temperature,
                     "plain_tokens_per_s": float(plain.iloc[0]),
                     "auto_tokens_per_s": float(auto.iloc[0]) if len(auto) else math.nan,
                     "best_method": best["method"], "best_tokens_per_s": best["tokens_per_s"],
                     "target_ms_1": r.target_ms.get(1, math.nan),
                     "auto_dtype_pick": r.dtype == picked[r.temperature]})
    return pd.DataFrame(rows)


__all__ = ["ChoiceReport", "ChoiceRun", "ChoiceSettings", "bench_choice", "choice_table",
           "dtype_table", "grid_methods", "priced_steps", "with_all"]
