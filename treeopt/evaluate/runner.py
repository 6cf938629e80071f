"""Interleaved comparison of decoding methods on the same prompts.

Every method (plain autoregressive decoding, chains and trees of the run's default drafter,
any other drafter by spec, and Hugging Face's own prompt lookup and assisted generation as
reference methods, see ``treeopt.evaluate.reference``) runs on every prompt with the same
settings; for each prompt all methods run back to back in a rotating order, so drift of
the machine (thermal, other jobs) hits every method alike. Per-prompt rows are appended to
``rows.jsonl`` as each prompt finishes, so an interrupted run keeps its work and
``resume=True`` skips finished prompts (a prompt is finished when every turn of every method
has its row). The results folder is locked while a run writes to it, its files are replaced
atomically, and a resume is refused when it would mix results of other settings
(``treeopt.evaluate.outdir``). Prompts longer than the model window minus the new tokens are
cut from the left or skipped, with a warning.

Metrics (their definitions are written into results.json and, beside the plain CSV files,
into metrics.json; see ``METRICS``): tokens/s counts generated tokens only; speed-up compares
with plain decoding on the same prompts, with its spread over prompts (median, bootstrap
interval) and flags for figures that cannot be trusted (``treeopt.evaluate.spread``).

Greedy outputs are checked against plain decoding's (``treeopt.evaluate.exactness``): each is
"equal", "tie" (it differs first where the target's two tokens in question are within the
dtype's rounding tolerance of its best logit, as half precision produces without any bug:
reported, not a failure) or "differs" (a failure: ``EvalResult.failures``, and
``treeopt eval`` exits 1).
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from treeopt.api import GenerateError, as_drafter, encode_prompt
from treeopt.datasets import Prompt
from treeopt.decode.drafter import DrafterError, build_drafter
from treeopt.decode.engine import generate as engine_generate, model_window
from treeopt.decode.sampling import GREEDY, Sampling
from treeopt.errors import one_line
from treeopt.evaluate import exactness as _exactness
from treeopt.evaluate.errors import EvalError
from treeopt.evaluate.methods import AR, Method, ar_method
from treeopt.evaluate.outdir import append_rows, atomic_write, locked, read_rows, resume_difference
from treeopt.evaluate.reference import early_exit_layers, hf_options, run_hf
from treeopt.evaluate.results import (
    METRICS,
    ROWS_FILE,
    RUN_FILE,
    _jsonable,
    exactness_failures,
    exactness_ties,
    summarise,
    tokens_per_second,
    write_results,
)
from treeopt.limits import read_json
from treeopt.models.loading import eos_ids
from treeopt.models.machine import threading_settings, threads_text

LONG_PROMPTS = ("truncate", "skip")


@dataclass
class EvalConfig:
    """Settings shared by every method of a run.

    ``sampling`` (temperature 0 = greedy: then outputs are checked against plain decoding;
    its own seed is not used). ``seed`` seeds sampling; prompt i uses ``seed + i`` for every
    method. ``stop_at_eos`` False (default)
    makes every method generate exactly ``max_new_tokens`` per turn. ``long_prompts``: what
    to do with a prompt longer than the model window minus ``max_new_tokens`` (the window:
    the smallest ``max_position_embeddings`` of the target and the draft models run, when
    known): "truncate" (default) keeps its last tokens (a left cut, so the end of the prompt
    the answer follows stays), "skip" leaves the prompt out; either way a warning says how
    many prompts and tokens. A later turn of a multi-turn prompt that outgrows the window is
    always cut from the left. ``repeats``: each method's generation of a turn is run that
    many times in a row, each from the same drafter state (the extra runs on forked
    drafters, which keep nothing), and the fastest is kept (``repeat_seconds`` lists every
    time): noise from a shared machine only ever adds time, so on a noisy machine the
    fastest of a few runs ranks configurations a few % apart where one run cannot."""

    max_new_tokens: int = 128
    sampling: Sampling = GREEDY
    seed: int = 0
    stop_at_eos: bool = False
    chat_template: bool = True
    warmup: bool = True
    long_prompts: str = "truncate"
    repeats: int = 1

    # Read-only views of ``sampling`` (the one place the settings live).
    temperature = property(lambda self: self.sampling.temperature)
    top_k = property(lambda self: self.sampling.top_k)
    top_p = property(lambda self: self.sampling.top_p)
    rule = property(lambda self: self.sampling.rule)

    def to_dict(self) -> dict:
        """The settings as recorded in a results folder (flat, as they always were)."""
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature,
                "top_k": self.top_k, "top_p": self.top_p, "seed": self.seed,
                "rule": self.rule, "stop_at_eos": self.stop_at_eos,
                "chat_template": self.chat_template, "warmup": self.warmup,
                "long_prompts": self.long_prompts, "repeats": self.repeats}


@dataclass
class EvalResult:
    """rows: one row per (prompt, turn, method); summary: one row per (method, category),
    category "all" included; failures: one line per greedy output that differs from AR
    (exactness "differs"); ties: one line per greedy output that differs only at a numerical
    tie (exactness "tie": reported, not a failure)."""

    rows: Any
    summary: Any
    meta: dict
    failures: list[str] = field(default_factory=list)
    out_dir: Path | None = None
    ties: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------- prompts
@dataclass
class _Item:
    key: str
    id: str
    category: str
    turns: tuple[str, ...]
    token_ids: tuple[int, ...] | None


def _as_items(prompts: Sequence[Any]) -> list[_Item]:
    items = []
    for i, p in enumerate(prompts):
        if isinstance(p, Prompt):
            items.append(_Item(f"{p.category}/{p.id}", p.id, p.category, p.turns, p.token_ids))
        elif isinstance(p, str):
            items.append(_Item(f"default/{i}", str(i), "default", (p,), None))
        else:
            ids = tuple(int(t) for t in (p.tolist() if hasattr(p, "tolist") else p))
            if not ids:
                raise EvalError(f"prompt {i} has no tokens")
            items.append(_Item(f"default/{i}", str(i), "default", ("",), ids))
    keys = [it.key for it in items]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise EvalError(f"prompt {dup!r} appears twice; prompt ids must be unique")
    return items


def _encode_text(tokenizer: Any, messages: list[dict], use_template: bool,
                 key: str | None = None) -> list[int]:
    """Token ids of chat ``messages`` exactly as ``treeopt.api.encode_prompt`` makes
    them (as ``treeopt generate`` and ``treeopt profile`` do): with the chat template, the
    template's text then the tokenizer without added special tokens; without it, a single
    message's text through the tokenizer."""
    if tokenizer is None:
        raise EvalError("text prompts need a tokenizer; pass tokenizer= or token-id prompts")

    prompt: str | list[dict] = messages
    if not (use_template and getattr(tokenizer, "chat_template", None)) and len(messages) == 1:
        prompt = messages[0]["content"]
    try:
        ids = encode_prompt(tokenizer, prompt, use_template)
    except GenerateError as exc:
        where = f"prompt {key}: " if key else ""
        raise EvalError(f"{where}{exc}") from None
    return [int(t) for t in ids[0].tolist()]


# ---------------------------------------------------------------------------- one call
def _sync(device: Any) -> None:
    if getattr(device, "type", "cpu") == "cuda":
        import torch

        torch.cuda.synchronize(device)


@dataclass
class _Runner:
    """How one method runs: through the engine with ``drafter`` (None = plain decoding), or
    through Hugging Face's generate with ``hf_options`` (reference methods)."""

    method: Method
    drafter: Any = None
    hf_options: dict | None = None
    by_bucket: list | None = None  # a tree-set method's drafter per context range


def _run_one(generate: Callable, target: Any, runner: _Runner, ids: list[int],
             cfg: EvalConfig, eos: list[int] | None, seed: int, max_new: int
             ) -> tuple[list[int], dict]:
    import torch

    device = getattr(target, "device", torch.device("cpu"))
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    sampling = replace(cfg.sampling, seed=seed)
    drafter, picked = runner.drafter, {}
    if runner.by_bucket is not None:  # a tree set: the drafter of this prompt's range
        bucket, tree = runner.method.treeset.pick(len(ids), max_new)
        drafter, picked = runner.by_bucket[bucket], {"tree_bucket": bucket,
                                                     "tree_nodes": tree.size}
    _sync(device)
    t0 = time.perf_counter()
    if runner.hf_options is not None:
        gen = run_hf(target, input_ids, max_new_tokens=max_new, sampling=sampling,
                     eos_token_id=eos, options=runner.hf_options)
    else:
        gen = generate(target, drafter, input_ids, max_new_tokens=max_new,
                       sampling=sampling, eos_token_id=eos)
    _sync(device)
    seconds = time.perf_counter() - t0
    stats = gen.stats
    tokens = [int(t) for t in gen.tokens]
    # DecodeStats (the engine) and HFStats (reference methods) have the same fields.
    steps = list(stats.steps)
    n_new = len(tokens)
    forwards, n_steps = int(stats.target_forwards), int(stats.num_steps)
    step_tokens = int(stats.step_tokens)
    drafted = math.nan if stats.drafted_tokens is None else int(stats.drafted_tokens)
    accepted = int(stats.accepted_tokens)
    known = drafted > 0 or accepted > 0  # nothing drafted (plain decoding): no acceptance
    row = {
        "prompt_tokens": len(ids),
        "new_tokens": n_new,
        "seconds": seconds,
        "tokens_per_s": tokens_per_second(n_new, seconds),
        "target_forwards": forwards,
        "steps": n_steps,
        "step_tokens": step_tokens,
        "drafted": drafted,
        "accepted": accepted,
        "tokens_per_step": step_tokens / forwards if forwards else math.nan,
        "acceptance_rate": accepted / drafted if drafted else math.nan,
        "mean_accepted": accepted / n_steps if n_steps and known else math.nan,
        "prefill_s": _seconds(stats, "prefill_s"),
        "draft_s": _seconds(stats, "draft_s"),
        "verify_s": _seconds(stats, "verify_s"),
        "other_s": _seconds(stats, "other_s"),
        "drafter_choice": str(getattr(stats, "choice", "") or ""),
        "accepted_per_step": [int(s.accepted) for s in steps],
        "ranks_per_step": [[int(r) for r in s.ranks] for s in steps],
    }
    row.update(_tree_sizes(steps))
    row.update(picked)
    return tokens, row


def _answer_text(tokenizer: Any, target: Any, tokens: list[int]) -> str | None:
    """The generated text up to the first end-of-sequence id, special tokens removed (the
    answer a fixed-length generation holds); None without a tokenizer that decodes."""
    if getattr(tokenizer, "decode", None) is None:
        return None

    stops = set(eos_ids(tokenizer, target))
    end = next((i for i, t in enumerate(tokens) if t in stops), len(tokens))
    return tokenizer.decode(tokens[:end], skip_special_tokens=True)


def _tree_sizes(steps: Sequence[Any]) -> dict:
    """Per-step tree sizes of a generation (``StepStats.nodes`` root included, ``depth`` in
    edges) and their means; NaN means for runs without engine steps (hf-* methods)."""
    nodes = [int(getattr(s, "nodes", 1)) for s in steps]
    depths = [int(getattr(s, "depth", 0)) for s in steps]
    return {"mean_nodes": sum(nodes) / len(nodes) if nodes else math.nan,
            "mean_depth": sum(depths) / len(depths) if depths else math.nan,
            "nodes_per_step": nodes, "depth_per_step": depths}


def _seconds(stats: Any, name: str) -> float:
    v = getattr(stats, name)
    return math.nan if v is None else float(v)



# ---------------------------------------------------------------------------- the run
def run_eval(target: Any, draft: Any, prompts: Sequence[Any], methods: Sequence[Method], *,
             config: EvalConfig | None = None, tokenizer: Any = None,
             out_dir: str | Path | None = None, resume: bool = False, profile: Any = None,
             progress: bool = True, meta: dict | None = None,
             generate: Callable | None = None) -> EvalResult:
    """Run every method on every prompt, interleaved, and summarise.

    draft: the run's default drafter, used by chain / tree / dp methods (each drafts its own
    ``tree`` with a reshaped copy) and by ``hf-assisted``: a draft model, a ``Drafter``, a
    drafter spec string ("early-exit:4", "ngram", a model folder, ...) or None. Methods with
    a ``drafter`` spec build their own drafter. Every drafter is built once per run, not per
    prompt. prompts: ``Prompt`` objects (text, encoded with ``tokenizer``, chat template
    when it has one), plain strings, or token-id sequences. Plain decoding (``ar``) is added
    first when missing. ``profile`` (a Profile or p table) adds the expected tokens per step
    of each default-drafter tree. ``generate`` defaults to ``treeopt.decode.engine.generate``
    and is called as ``generate(target, drafter, input_ids, max_new_tokens=, sampling=,
    eos_token_id=)``; reference methods ("hf") call Hugging Face's ``target.generate``.
    ``meta`` adds entries to the results (the command line gives target, draft, dataset,
    device, profile); its ``target``, ``draft`` and ``dataset`` are also what a resume is
    checked against (without them, descriptions of the model objects are recorded).

    ``out_dir`` receives run.json (the settings, checked on resume, and the threading
    settings), rows.jsonl (as prompts finish), results.json, summary.csv, per_prompt.csv and
    metrics.json (the definitions of the CSV columns). The folder is locked for the whole
    run (a second run on it fails at once), every file but rows.jsonl is replaced
    atomically, and nothing is created before every setting is checked. ``resume=True``
    continues the run recorded there: refused when it changed the target, the default
    drafter, the dataset, a decoding setting, the methods or the prompts (a selection that
    keeps every earlier prompt and adds some is allowed); a prompt counts as done only when
    every (turn, method) row exists.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    if generate is None:
        generate = engine_generate
    cfg = config or EvalConfig()
    check_config(cfg)
    methods = list(methods)
    if not any(m.name == AR for m in methods):
        methods.insert(0, ar_method())
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        sources = "; ".join(dict.fromkeys(m.source or m.kind for m in methods if m.name == dup))
        raise EvalError(f"method {dup!r} is listed twice ({sources}); give each method once")
    out = check_out_dir(out_dir)
    runners = _runners(methods, target, draft, tokenizer)
    items = _as_items(prompts)
    if not items:
        raise EvalError("no prompts to evaluate")
    eos = None
    if cfg.stop_at_eos:
        eos = eos_ids(tokenizer, target) or None  # every EOS id of tokenizer and model
    expected = _expected(methods, profile)
    window = _window(target, runners)
    limit = None
    if window is not None:
        limit = window - cfg.max_new_tokens
        if limit < 1:
            raise EvalError(f"max_new_tokens {cfg.max_new_tokens} leaves no room for a prompt "
                            f"in the model window of {window} tokens; generate fewer tokens")
    over = {} if limit is None else {
        it.key: n - limit for it in items
        if (n := len(_first_ids(it, tokenizer, cfg))) > limit}
    skipped = list(over) if cfg.long_prompts == "skip" else []
    run_items = [it for it in items if it.key not in set(skipped)]
    if not run_items:
        raise EvalError(f"every prompt is longer than the model window ({window} tokens) minus "
                        f"{cfg.max_new_tokens} new tokens; cut them instead (long_prompts "
                        "'truncate', --long-prompts truncate) or generate fewer tokens")
    settings = run_settings(cfg, methods, items, target, draft, meta)
    threading = threading_settings(target)
    long_info = {"window": window, "prompt_limit": limit, "policy": cfg.long_prompts,
                 "prompts_over": len(over), "tokens_cut": sum(over.values()),
                 "skipped": skipped}
    if over:
        _warn(_long_prompt_warning(over, len(items), window, cfg))

    done_rows: list[dict] = []
    earlier_threading = None
    with _claim(out):
        if out is not None:
            done_rows, earlier_threading = _prepare_out(
                out, {**settings, "threading": threading}, resume, run_items, names)
            if earlier_threading is not None and earlier_threading != threading:
                _warn(f"the threading settings differ from the earlier part of this run "
                      f"({threads_text(earlier_threading)} there, "
                      f"{threads_text(threading)} here): their timings may not compare")
        done_keys = {r["prompt_key"] for r in done_rows}
        todo = [(i, it) for i, it in enumerate(items)
                if it.key not in done_keys and it.key not in set(skipped)]
        wanted = {it.key for it in run_items}
        rows = [r for r in done_rows if r["prompt_key"] in wanted]

        if todo and cfg.warmup:
            _warmup(generate, target, runners, methods, todo[0][1], cfg, tokenizer, eos, limit)
        bar = tqdm(total=len(todo) * len(methods), desc="eval", unit="run", file=sys.stderr,
                   disable=not progress, dynamic_ncols=True)
        new_rows: list[dict] = []
        try:
            for i, it in todo:
                k = i % len(methods)
                order = methods[k:] + methods[:k]
                prompt_rows = _run_prompt(generate, target, runners, it, i, order, cfg,
                                          tokenizer, eos, expected, bar, limit)
                rows.extend(prompt_rows)
                new_rows.extend(prompt_rows)
                if out is not None:
                    append_rows(out / ROWS_FILE, prompt_rows)
        finally:
            bar.close()
        later = [r for r in new_rows if r["method"] == AR and r["turn"] > 1
                 and r.get("truncated_tokens")]
        long_info["later_turns_cut"] = len(later)
        if later:
            _warn(f"{len(later)} later turn(s) of multi-turn prompts outgrew the model window "
                  f"({window} tokens) minus {cfg.max_new_tokens} new tokens and were cut from "
                  f"the left, {sum(r['truncated_tokens'] for r in later)} tokens in all")

        df = pd.DataFrame(rows)
        summary = summarise(df, methods=names)
        failures = exactness_failures(df)
        ties = exactness_ties(df)
        run_meta = {"settings": settings, "metrics": METRICS, "prompts": len(run_items),
                    "expected_tokens_per_step": expected, "threading": threading,
                    "long_prompts": long_info, **(meta or {})}
        if earlier_threading is not None and earlier_threading != threading:
            run_meta["threading_earlier"] = earlier_threading
        if out is not None:
            write_results(out, df, summary, run_meta)
    return EvalResult(df, summary, run_meta, failures, out, ties)


def check_config(cfg: EvalConfig) -> None:
    """Raise EvalError for settings no run can use (checked before any model work or file)."""
    if cfg.max_new_tokens < 1:
        raise EvalError(f"max_new_tokens must be at least 1, got {cfg.max_new_tokens}")
    if not isinstance(cfg.sampling, Sampling):  # a Sampling checks itself when it is made
        raise EvalError(f"config.sampling must be a Sampling, got {type(cfg.sampling).__name__}")
    if isinstance(cfg.repeats, bool) or not isinstance(cfg.repeats, int) or cfg.repeats < 1:
        raise EvalError(f"repeats must be a whole number of at least 1, got {cfg.repeats!r}")
    if cfg.long_prompts not in LONG_PROMPTS:
        raise EvalError(f"long_prompts must be one of {', '.join(LONG_PROMPTS)}, got "
                        f"{cfg.long_prompts!r}")


def check_out_dir(out_dir: str | Path | None, resume: bool | None = None) -> Path | None:
    """The results folder as a Path (None for none); EvalError when it names a file, or
    (``resume`` False) when it already holds results."""
    if out_dir is None:
        return None
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise EvalError(f"{out} is a file, not a folder; give a folder for the results (it is "
                        "created when missing)")
    rows = out / ROWS_FILE
    if resume is False and rows.is_file() and rows.stat().st_size > 0:
        raise EvalError(f"{out} already holds results; pass --resume to continue that run "
                        "or choose another --out")
    return out


class _NoLock:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _claim(out: Path | None):
    """Create the results folder and lock it (nothing to do without one)."""
    if out is None:
        return _NoLock()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EvalError(f"cannot create the results folder {out} ({exc.strerror or exc})"
                        ) from None
    return locked(out)


def _warn(text: str) -> None:
    print(f"treeopt eval: warning: {text}", file=sys.stderr, flush=True)


def _long_prompt_warning(over: dict[str, int], total: int, window: int, cfg: EvalConfig) -> str:
    head = (f"{len(over)} of {total} prompts are longer than the model window ({window} "
            f"tokens) minus {cfg.max_new_tokens} new tokens")
    if cfg.long_prompts == "skip":
        keys = list(over)
        more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
        return f"{head}: skipped ({', '.join(keys[:3])}{more}); --long-prompts truncate keeps them"
    return (f"{head}: cut from the left, {sum(over.values())} tokens in all (at most "
            f"{max(over.values())} from one prompt); --long-prompts skip leaves them out")


def _window(target: Any, runners: dict[str, "_Runner"]) -> int | None:
    """The model window of the run: the target, the drafters' models and Hugging Face's
    assistant model (``treeopt.decode.engine.model_window``)."""
    models = [target, *(r.drafter for r in runners.values())]
    models += [r.hf_options.get("assistant_model") for r in runners.values() if r.hf_options]
    return model_window(*models)


def _fit(ids: list[int], limit: int | None) -> tuple[list[int], int]:
    """``ids`` cut from the left to ``limit`` tokens; (ids, tokens cut)."""
    if limit is None or len(ids) <= limit:
        return ids, 0
    return ids[len(ids) - limit:], len(ids) - limit


# ---------------------------------------------------------------------------- run settings
def run_settings(cfg: EvalConfig, methods: Sequence[Method], items: Sequence[_Item],
                 target: Any, draft: Any, meta: dict | None) -> dict:
    """What a resume must not change: the decoding settings, the methods, the target, the
    default drafter, the dataset (from ``meta`` when given, else descriptions of the objects)
    and the prompts (key -> digest of the prompt's content)."""
    meta = meta or {}
    return {"config": cfg.to_dict(), "methods": [m.to_dict() for m in methods],
            "target": meta["target"] if meta.get("target") is not None
            else describe_model(target),
            "draft": meta["draft"] if "draft" in meta else describe_model(draft),
            "dataset": meta.get("dataset"),
            "prompts": {it.key: _digest(it) for it in items}}


def _digest(it: _Item) -> str:
    text = json.dumps([it.category, it.id, list(it.turns),
                       None if it.token_ids is None else list(it.token_ids)])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def describe_model(obj: Any) -> str | None:
    """A short description of a model, drafter or spec: the spec itself for a string, else
    the class, the name or path, and the size of the configuration."""
    if obj is None or isinstance(obj, str):
        return obj
    model = obj if getattr(obj, "config", None) is not None else getattr(obj, "model", None)
    cls = type(obj).__name__
    prefix = f"{getattr(obj, 'name', cls)} " if model is not obj else ""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return str(getattr(obj, "name", None) or cls)
    parts = [str(getattr(cfg, "_name_or_path", "") or "")]
    for key, short in (("num_hidden_layers", "layers"), ("hidden_size", "hidden"),
                       ("vocab_size", "vocab")):
        v = getattr(cfg, key, None)
        if v is not None:
            parts.append(f"{short}={v}")
    try:
        parts.append(f"params={sum(p.numel() for p in model.parameters())}")
    except (AttributeError, TypeError):
        pass
    return f"{prefix}{type(model).__name__}({', '.join(p for p in parts if p)})"



def _runners(methods: list[Method], target: Any, draft: Any, tokenizer: Any
             ) -> dict[str, _Runner]:
    """Each method's drafter (or Hugging Face options), built once for the whole run."""

    needs_default = [m.name for m in methods if m.uses_default_drafter]
    # hf-assisted drafts with the default drafter's model unless it is an early exit.
    hf_model = any(m.kind == "hf" and m.drafter is None for m in methods) and \
        early_exit_layers(draft) is None
    if draft is None and needs_default:
        raise EvalError("chain and tree methods need a draft model (or another drafter); "
                        f"{', '.join(needs_default)} draft with the run's default drafter and "
                        "none was given")
    default = None
    if draft is not None and (needs_default or hf_model):
        try:
            default = as_drafter(draft, target, tokenizer)
        except DrafterError as exc:
            raise EvalError(f"default drafter: {exc}") from None
    runners: dict[str, _Runner] = {}
    for m in methods:
        try:
            if m.kind == "hf":
                runners[m.name] = _Runner(m, None, hf_options(m, draft, default, target))
            elif m.drafter is not None:
                runners[m.name] = _Runner(m, build_drafter(m.drafter, target=target,
                                                           tokenizer=tokenizer, tree=m.tree))
            elif m.is_plain:
                runners[m.name] = _Runner(m, None)
            else:  # forked: a shared global trie would hand one method another's outputs
                runners[m.name] = _Runner(m, default.reshaped(m.tree).forked())
            if m.treeset is not None and runners[m.name].drafter is not None:
                runners[m.name].by_bucket = [runners[m.name].drafter.reshaped(t)
                                             for t in m.treeset.trees]
        except DrafterError as exc:
            raise EvalError(f"method {m.name}: {exc}") from None
    return runners


def _expected(methods: list[Method], profile: Any) -> dict[str, float]:
    """F(tree) under the profile for plain decoding (1) and the default drafter's trees; the
    profile says nothing about other drafters or the reference methods."""
    if profile is None:
        return {}
    table = profile.table() if hasattr(profile, "table") else profile
    out = {}
    for m in methods:
        if m.is_plain:
            out[m.name] = 1.0
        elif m.uses_default_drafter and m.treeset is not None:  # per range; rows pick theirs
            out[m.name] = [t.expected_tokens(table) for t in m.treeset.trees]
        elif m.uses_default_drafter:
            out[m.name] = m.tree.expected_tokens(table)
    return out


def _prepare_out(out: Path, settings: dict, resume: bool, items: Sequence[_Item],
                 names: Sequence[str]) -> tuple[list[dict], dict | None]:
    """Start or continue the run in ``out`` (locked by the caller); returns the rows of the
    prompts already done and the threading settings recorded by the earlier part (None for
    a fresh run). Writes run.json and rows.jsonl atomically."""
    run_file, rows_file = out / RUN_FILE, out / ROWS_FILE
    has_rows = rows_file.exists() and rows_file.stat().st_size > 0
    text = json.dumps(settings, indent=1, default=_jsonable)
    if not resume:
        if has_rows:
            raise EvalError(f"{out} already holds results; pass --resume to continue that run "
                            "or choose another --out")
        atomic_write(rows_file, "")
        atomic_write(run_file, text)
        return [], None
    if not run_file.exists():
        if has_rows:
            raise EvalError(f"cannot resume {out}: its {RUN_FILE} is missing, so the rows in "
                            f"{ROWS_FILE} cannot be checked against this run's settings; "
                            f"restore {RUN_FILE}, or move {ROWS_FILE} away to start afresh")
        atomic_write(rows_file, "")
        atomic_write(run_file, text)
        return [], None
    try:
        old = read_json(run_file)
    except (OSError, ValueError) as exc:  # LimitError is a ValueError
        raise EvalError(f"cannot resume {out}: its {RUN_FILE} is unreadable "
                        f"({one_line(exc, 160)}); restore it or choose another --out") from None
    if not isinstance(old, dict):
        raise EvalError(f"cannot resume {out}: its {RUN_FILE} is not a treeopt eval run file")
    diff = resume_difference(old, json.loads(text))
    if diff:
        raise EvalError(f"cannot resume {out}: {diff}; use the same options or another --out")
    rows = read_rows(rows_file)
    # A prompt is done when every (turn, method) row exists; its other rows are dropped.
    want = {it.key: {(t, m) for t in range(1, len(it.turns) + 1) for m in names}
            for it in items}
    have: dict[str, set] = {}
    for r in rows:
        have.setdefault(r["prompt_key"], set()).add((r.get("turn"), r["method"]))
    kept = []
    for r in rows:
        key = r["prompt_key"]
        if key in want:
            if want[key] <= have[key] and (r.get("turn"), r["method"]) in want[key]:
                kept.append(r)
        elif set(names) <= {m for _, m in have[key]}:
            kept.append(r)  # a prompt outside this selection (a run.json without prompts)
    atomic_write(rows_file, "".join(json.dumps(r) + "\n" for r in kept))
    atomic_write(run_file, text)
    earlier = old.get("threading")
    return kept, earlier if isinstance(earlier, dict) else None


def _warmup(generate, target, runners, methods, item, cfg, tokenizer, eos, limit) -> None:
    """A few tokens of the first prompt with every method, on forked drafters: the code
    paths warm up, and no drafter keeps the warm-up's output (a global trie that held it
    would copy the first answer)."""
    ids, _ = _fit(_first_ids(item, tokenizer, cfg), limit)
    for m in methods:
        _run_one(generate, target, _forked(runners[m.name]), ids, cfg, eos, cfg.seed,
                 min(4, cfg.max_new_tokens))


def _forked(runner: _Runner) -> _Runner:
    """``runner`` with forked drafters: it decodes from the same state, and what it drafts
    and learns is thrown away with it."""
    return replace(runner, drafter=None if runner.drafter is None else runner.drafter.forked(),
                   by_bucket=None if runner.by_bucket is None
                   else [d.forked() for d in runner.by_bucket])


TIMES = ("seconds", "tokens_per_s", "prefill_s", "draft_s", "verify_s", "other_s")


def _run_repeated(generate: Callable, target: Any, runner: _Runner, ids: list[int],
                  cfg: EvalConfig, eos: list[int] | None, seed: int, max_new: int
                  ) -> tuple[list[int], dict]:
    """:func:`_run_one` ``cfg.repeats`` times from the same drafter state: first on forked
    drafters, then on the runner's own (whose state goes on to the next prompt); the row of
    the last run with the times of the fastest run that generated the same tokens, and
    ``repeat_seconds`` (every run's time) when there were several."""
    spare = [_forked(runner) for _ in range(cfg.repeats - 1)]
    extra = [_run_one(generate, target, r, ids, cfg, eos, seed, max_new) for r in spare]
    tokens, row = _run_one(generate, target, runner, ids, cfg, eos, seed, max_new)
    if not extra:
        return tokens, row
    every = [r["seconds"] for _, r in extra] + [row["seconds"]]
    alike = [r for t, r in extra if t == tokens and r["steps"] == row["steps"]]
    fastest = min([row, *alike], key=lambda r: r["seconds"])
    row.update({k: fastest[k] for k in TIMES})
    row["repeat_seconds"] = every
    return tokens, row


def _first_ids(item: _Item, tokenizer: Any, cfg: EvalConfig) -> list[int]:
    if item.token_ids is not None:
        return list(item.token_ids)
    return _encode_text(tokenizer, [{"role": "user", "content": item.turns[0]}],
                        cfg.chat_template, item.key)


def _run_prompt(generate, target, runners, it: _Item, index: int, order: list[Method],
                cfg: EvalConfig, tokenizer, eos, expected: dict, bar,
                limit: int | None = None) -> list[dict]:
    seed = cfg.seed + index
    outputs: dict[str, list[list[int]]] = {}
    inputs: dict[str, list[list[int]]] = {}
    rows: dict[str, list[dict]] = {}
    for position, m in enumerate(order):
        history: list[dict] = []
        prev_ids: list[int] = []
        outputs[m.name], inputs[m.name], rows[m.name] = [], [], []
        for turn, text in enumerate(it.turns):
            if it.token_ids is not None and turn == 0:
                ids = list(it.token_ids)
            elif tokenizer is not None and cfg.chat_template and getattr(
                    tokenizer, "chat_template", None):
                history.append({"role": "user", "content": text})
                ids = _encode_text(tokenizer, history, True, it.key)
            else:
                ids = prev_ids + _encode_text(tokenizer, [{"role": "user", "content": text}],
                                              False, it.key)
            ids, cut = _fit(ids, limit)
            tokens, row = _run_repeated(generate, target, runners[m.name], ids, cfg, eos,
                                        seed + 1000 * turn, cfg.max_new_tokens)
            outputs[m.name].append(tokens)
            inputs[m.name].append(ids)
            if tokenizer is not None and len(it.turns) > 1:
                history.append({"role": "assistant",
                                "content": tokenizer.decode(tokens, skip_special_tokens=True)})
            prev_ids = ids + tokens
            row.update({"prompt_key": it.key, "prompt_id": it.id, "category": it.category,
                        "turn": turn + 1, "method": m.name, "position": position,
                        "truncated_tokens": cut, "output_ids": tokens,
                        "output_text": _answer_text(tokenizer, target, tokens),
                        "expected_tokens_per_step": expected.get(m.name)})
            if isinstance(row["expected_tokens_per_step"], list):  # a tree set: its range's
                row["expected_tokens_per_step"] = row["expected_tokens_per_step"][
                    row["tree_bucket"]]
            rows[m.name].append(row)
        bar.update(1)
    greedy = cfg.temperature == 0
    dtype = _exactness.model_dtype(target) if greedy else None
    for name, mrows in rows.items():
        for turn, row in enumerate(mrows):
            if not greedy:
                row.update({"matches_ar": None, "exactness": None, "first_mismatch": None,
                            "tie_gap": None, "tie_tolerance": None})
                continue
            ids, ref = inputs[AR][turn], outputs[AR][turn]
            if inputs[name][turn] != ids:
                # An earlier turn differed (at a tie or not), so this turn's prompt is not plain
                # decoding's: compare with plain decoding of this method's own prompt
                # (untimed; its row is not kept).
                ids = inputs[name][turn]
                ref, _ = _run_one(generate, target, runners[AR], ids, cfg, eos,
                                  seed + 1000 * turn, cfg.max_new_tokens)
            row.update(_exactness.compare(target, ids, ref, outputs[name][turn], dtype))
    return [r for m in order for r in rows[m.name]]


# ---------------------------------------------------------------------------- summaries

