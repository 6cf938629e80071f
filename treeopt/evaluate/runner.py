"""Interleaved comparison of decoding methods on the same prompts.

Every method (plain autoregressive decoding, chains and trees of the run's default drafter,
any other drafter by spec, and Hugging Face's own prompt lookup and assisted generation as
reference methods, see ``treeopt.evaluate.reference``) runs on every prompt with the same
settings; for each prompt all methods run back to back in a rotating order, so drift of
the machine (thermal, other jobs) hits every method alike. Per-prompt rows are appended to
``rows.jsonl`` as each prompt finishes, so an interrupted run keeps its work and
``resume=True`` skips finished prompts.

Metrics (their definitions are also written into every result file, see ``METRICS``):
tokens/s counts generated tokens only; speed-up compares with plain decoding on the same
prompts; greedy outputs must equal plain decoding's token for token.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from treeopt.evaluate.datasets import Prompt
from treeopt.tree import Tree

ROWS_FILE = "rows.jsonl"
RUN_FILE = "run.json"
RESULTS_JSON = "results.json"
SUMMARY_CSV = "summary.csv"
PER_PROMPT_CSV = "per_prompt.csv"
AR = "ar"
ALL = "all"

METRICS = {
    "new_tokens": "generated tokens (prompt tokens never counted); with stop_at_eos off every "
                  "method generates exactly max_new_tokens per turn",
    "seconds": "wall-clock seconds of the generate call (prefill included), summed",
    "tokens_per_s": "new_tokens / seconds: generated tokens only, never prompt tokens, never "
                    "characters",
    "speedup": "plain decoding's time / this method's time on the same prompts for the same "
               "number of new tokens (computed per token: (ar_seconds / ar_tokens) / "
               "(seconds / new_tokens), identical when the token counts are equal)",
    "tokens_per_step": "tokens committed by verification steps / target verification forwards "
                       "(accepted draft tokens + the bonus token per step; the first token, "
                       "which comes from the prefill forward, is excluded); 1 for plain "
                       "decoding. hf-* methods: (new tokens - 1) / (target forwards - 1), "
                       "forwards counted with a hook (Hugging Face verifies candidates in its "
                       "prefill forward too, so this is the same count to within one step)",
    "acceptance_rate": "accepted draft tokens / drafted draft tokens (tree nodes speculated); "
                       "hf-* methods: candidates counted from the lengths of the target's "
                       "inputs, accepted = new tokens - target forwards",
    "mean_accepted": "accepted draft tokens per verification step (mean accepted length)",
    "expected_tokens_per_step": "F(tree) under the acceptance profile given to the run, when "
                                "one was given",
    "matches_ar": "greedy only: turns whose output equals plain decoding's token for token / "
                  "turns compared",
    "prefill_ms": "milliseconds of the prefill (prompt forwards and the first token) per turn",
    "draft_ms_per_step": "drafting milliseconds (draft forwards, candidate look-ups) per "
                         "verification step; hf-pld: inside other_ms_per_step",
    "verify_ms_per_step": "target verification-forward milliseconds per verification step",
    "other_ms_per_step": "the rest of each step (acceptance walk, cache compaction, "
                         "bookkeeping; Hugging Face's own loop for hf-* methods) in "
                         "milliseconds per verification step; (draft + verify + other) / "
                         "tokens_per_step is the time per generated token",
}


class EvalError(ValueError):
    """A run that cannot proceed (bad method spec, mismatched resume)."""


@dataclass(frozen=True)
class Method:
    """One decoding method.

    tree:    the shape drafted (or filled at most, for candidate drafters); None with no
             ``drafter`` = plain autoregressive decoding; None with a ``drafter`` = that
             drafter's own default shape.
    kind:    "ar" | "chain" | "tree" | "dp" (the run's default drafter over ``tree``),
             "drafter" (the drafter spec ``drafter``) or "hf" (a Hugging Face reference
             method, see ``treeopt.evaluate.reference``).
    drafter: a drafter spec for this method (``treeopt.decode.drafter``); None = the run's
             default drafter. For "hf" methods the Hugging Face option it stands for.
    """

    name: str
    tree: Tree | None = None
    kind: str = "tree"
    source: str = ""
    drafter: str | None = None

    def to_dict(self) -> dict:
        d = {"name": self.name, "kind": self.kind, "source": self.source,
             "parents": None if self.tree is None else list(self.tree.parents)}
        if self.drafter is not None:  # absent when None: older run.json files stay equal
            d["drafter"] = self.drafter
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Method":
        tree = None if d.get("parents") is None else Tree.from_parents(d["parents"])
        return cls(d["name"], tree, d.get("kind", "tree"), d.get("source", ""),
                   d.get("drafter"))

    @property
    def is_plain(self) -> bool:
        """Plain autoregressive decoding through the engine (no drafter at all)."""
        return self.kind != "hf" and self.drafter is None and (
            self.tree is None or self.tree.size <= 1)

    @property
    def uses_default_drafter(self) -> bool:
        """Drafts with the run's default drafter (chains, trees, dp shapes)."""
        return self.kind != "hf" and self.drafter is None and not self.is_plain


def ar_method() -> Method:
    return Method(AR, None, "ar", "plain autoregressive decoding")


def chain_method(draft_length: int) -> Method:
    """A chain drafting ``draft_length`` tokens per step: the shape ``chain:N`` of
    N = draft_length + 1 nodes (the name follows ``treeopt.shapes``: N counts the root)."""
    if draft_length < 1:
        raise EvalError(f"chain draft length must be at least 1, got {draft_length}")
    tree = Tree.from_parents([-1] + list(range(draft_length)))
    return Method(f"chain:{draft_length + 1}", tree, "chain",
                  f"chain drafting {draft_length} tokens per step")


def tree_method(spec: str, profile: Any = None) -> Method:
    """A tree from a growmap file or a shape spec ("kary:2x3", "dp:64x8", "greedy:32", ...;
    see ``treeopt.shapes.from_name``; ``dp:`` and ``greedy:`` need ``profile``)."""
    from treeopt.shapes import describe, from_name

    tree = from_name(spec, profile=profile)
    path = Path(spec)
    if path.suffix.lower() in (".pt", ".pth", ".json"):
        return Method(f"tree:{path.stem}", tree, "tree", describe(spec))
    kind = "dp" if spec.strip().lower().startswith("dp:") else (
        "chain" if tree.width == 1 else "tree")
    return Method(spec.strip(), tree, kind, describe(spec))


def drafter_method(text: str, profile: Any = None) -> Method:
    """A method drafting with the drafter spec in ``text``, optionally over a shape:
    ``SPEC[@SHAPE]`` ("ngram", "ngram@chain:3", "ngram:max=3@kary:2x1",
    "datastore:store.npz@chain:4"); SHAPE is a growmap file or a shape spec as for
    ``tree_method``. The method's name is ``text``."""
    name = text.strip()
    spec, at, shape = name.rpartition("@")
    if not at:
        spec, shape = name, ""
    spec, shape = spec.strip(), shape.strip()
    if not spec:
        raise EvalError(f"drafter method {text!r}: give a drafter spec before '@', e.g. "
                        "ngram@chain:3")
    if at and not shape:
        raise EvalError(f"drafter method {text!r}: give a shape after '@', e.g. {spec}@chain:3")
    if spec.lower() in ("none", "ar"):
        raise EvalError(f"drafter method {text!r}: plain decoding always runs; give a drafter")
    tree = tree_method(shape, profile).tree if shape else None
    source = f"drafter {spec}" + (f" over {shape}" if shape else " (its default shape)")
    return Method(name, tree, "drafter", source, spec)


def dp_method(profile: Any, size: int, levels: int) -> Method:
    """The exact-DP tree (``treeopt.search.dp``) of ``size`` nodes and at most ``levels``
    levels, root included (Sequoia's depth convention)."""
    return tree_method(f"dp:{size}x{levels}", profile)


@dataclass
class EvalConfig:
    """Settings shared by every method of a run.

    temperature 0 = greedy (then outputs are checked against plain decoding). ``seed`` seeds
    sampling; prompt i uses ``seed + i`` for every method. ``stop_at_eos`` False (default)
    makes every method generate exactly ``max_new_tokens`` per turn."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    rule: str = "sequoia"
    stop_at_eos: bool = False
    chat_template: bool = True
    warmup: bool = True


@dataclass
class EvalResult:
    """rows: one row per (prompt, turn, method); summary: one row per (method, category),
    category "all" included; failures: one line per greedy output that differs from AR."""

    rows: Any
    summary: Any
    meta: dict
    failures: list[str] = field(default_factory=list)
    out_dir: Path | None = None


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


def _encode_text(tokenizer: Any, messages: list[dict], use_template: bool) -> list[int]:
    if tokenizer is None:
        raise EvalError("text prompts need a tokenizer; pass tokenizer= or token-id prompts")
    if use_template and getattr(tokenizer, "chat_template", None):
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if hasattr(out, "keys") and "input_ids" in out:
            out = out["input_ids"]
        if hasattr(out, "tolist"):
            out = out.tolist()
        if out and isinstance(out[0], list):
            out = out[0]
        return [int(t) for t in out]
    text = "\n\n".join(m["content"] for m in messages)
    return [int(t) for t in tokenizer.encode(text)]


# ---------------------------------------------------------------------------- one call
def _sync(device: Any) -> None:
    if getattr(device, "type", "cpu") == "cuda":
        import torch

        torch.cuda.synchronize(device)


def _stat(stats: Any, name: str, default: Any = 0) -> Any:
    return getattr(stats, name, default)


@dataclass
class _Runner:
    """How one method runs: through the engine with ``drafter`` (None = plain decoding), or
    through Hugging Face's generate with ``hf_options`` (reference methods)."""

    method: Method
    drafter: Any = None
    hf_options: dict | None = None


def _run_one(generate: Callable, target: Any, runner: _Runner, ids: list[int],
             cfg: EvalConfig, eos: int | None, seed: int, max_new: int) -> tuple[list[int], dict]:
    import torch

    from treeopt.decode.sampling import Sampling

    device = getattr(target, "device", torch.device("cpu"))
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    sampling = Sampling(cfg.temperature, cfg.top_k, cfg.top_p, cfg.rule, seed)
    _sync(device)
    t0 = time.perf_counter()
    if runner.hf_options is not None:
        from treeopt.evaluate.reference import run_hf

        gen = run_hf(target, input_ids, max_new_tokens=max_new, sampling=sampling,
                     eos_token_id=eos, options=runner.hf_options)
    else:
        gen = generate(target, runner.drafter, input_ids, max_new_tokens=max_new,
                       sampling=sampling, eos_token_id=eos)
    _sync(device)
    seconds = time.perf_counter() - t0
    stats = gen.stats
    tokens = [int(t) for t in gen.tokens]
    steps = list(_stat(stats, "steps", []))
    n_new = len(tokens)
    forwards = int(_stat(stats, "target_forwards", len(steps)))
    n_steps = int(_stat(stats, "num_steps", len(steps)))
    step_tokens = int(_stat(stats, "step_tokens", sum(
        int(getattr(s, "tokens", s.accepted + 1)) for s in steps)))
    drafted = _stat(stats, "drafted_tokens", 0)
    drafted = math.nan if drafted is None else int(drafted)
    accepted = int(_stat(stats, "accepted_tokens", 0))
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
        "accepted_per_step": [int(s.accepted) for s in steps],
        "ranks_per_step": [[int(r) for r in s.ranks] for s in steps],
    }
    return tokens, row


def _seconds(stats: Any, name: str) -> float:
    v = _stat(stats, name, math.nan)
    return math.nan if v is None else float(v)


def tokens_per_second(generated_tokens: int, seconds: float) -> float:
    """Generated tokens per second of wall time; prompt tokens are not an argument on
    purpose."""
    return generated_tokens / seconds if seconds > 0 else math.nan


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
    first when missing. ``out_dir`` receives run.json, rows.jsonl (as prompts finish),
    results.json, summary.csv and per_prompt.csv. ``profile`` (a Profile or p table) adds
    the expected tokens per step of each default-drafter tree. ``generate`` defaults to
    ``treeopt.decode.engine.generate`` and is called as ``generate(target, drafter,
    input_ids, max_new_tokens=, sampling=, eos_token_id=)``; reference methods ("hf")
    call Hugging Face's ``target.generate``.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    if generate is None:
        from treeopt.decode.engine import generate
    cfg = config or EvalConfig()
    if cfg.max_new_tokens < 1:
        raise EvalError(f"max_new_tokens must be at least 1, got {cfg.max_new_tokens}")
    from treeopt.decode.sampling import Sampling, SamplingError

    try:  # validate the sampling settings before any model or drafter work
        Sampling(cfg.temperature, cfg.top_k, cfg.top_p, cfg.rule, cfg.seed)
    except SamplingError as exc:
        raise EvalError(str(exc)) from None
    methods = list(methods)
    if not any(m.name == AR for m in methods):
        methods.insert(0, ar_method())
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise EvalError(f"method {dup!r} is listed twice")
    runners = _runners(methods, target, draft, tokenizer)
    items = _as_items(prompts)
    if not items:
        raise EvalError("no prompts to evaluate")
    eos = None
    if cfg.stop_at_eos:
        eos = getattr(getattr(target, "config", None), "eos_token_id", None)
        if isinstance(eos, (list, tuple)):
            eos = eos[0] if eos else None
    expected = _expected(methods, profile)
    settings = {"config": asdict(cfg), "methods": [m.to_dict() for m in methods]}

    out = Path(out_dir) if out_dir is not None else None
    done_rows: list[dict] = []
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        done_rows = _prepare_out(out, settings, resume)
    done_keys = {r["prompt_key"] for r in done_rows}
    todo = [(i, it) for i, it in enumerate(items) if it.key not in done_keys]
    wanted = {it.key for it in items}
    rows = [r for r in done_rows if r["prompt_key"] in wanted]

    if todo and cfg.warmup:
        _warmup(generate, target, runners, methods, todo[0][1], cfg, tokenizer, eos)
    bar = tqdm(total=len(todo) * len(methods), desc="eval", unit="run", file=sys.stderr,
               disable=not progress, dynamic_ncols=True)
    try:
        for i, it in todo:
            k = i % len(methods)
            order = methods[k:] + methods[:k]
            prompt_rows = _run_prompt(generate, target, runners, it, i, order, cfg,
                                      tokenizer, eos, expected, bar)
            rows.extend(prompt_rows)
            if out is not None:
                with open(out / ROWS_FILE, "a", encoding="utf-8") as fh:
                    for r in prompt_rows:
                        fh.write(json.dumps(r) + "\n")
    finally:
        bar.close()

    df = pd.DataFrame(rows)
    summary = summarise(df, methods=names)
    failures = exactness_failures(df)
    run_meta = {"settings": settings, "metrics": METRICS, "prompts": len(items),
                "expected_tokens_per_step": expected, **(meta or {})}
    if out is not None:
        write_results(out, df, summary, run_meta)
    return EvalResult(df, summary, run_meta, failures, out)


def _runners(methods: list[Method], target: Any, draft: Any, tokenizer: Any
             ) -> dict[str, _Runner]:
    """Each method's drafter (or Hugging Face options), built once for the whole run."""
    from treeopt.decode.api import as_drafter
    from treeopt.decode.drafter import DrafterError, build_drafter
    from treeopt.evaluate.reference import early_exit_layers, hf_options

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
            else:
                runners[m.name] = _Runner(m, default.reshaped(m.tree))
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
        elif m.uses_default_drafter:
            out[m.name] = m.tree.expected_tokens(table)
    return out


def _prepare_out(out: Path, settings: dict, resume: bool) -> list[dict]:
    run_file, rows_file = out / RUN_FILE, out / ROWS_FILE
    if not resume:
        if rows_file.exists() and rows_file.stat().st_size > 0:
            raise EvalError(f"{out} already holds results; pass --resume to continue that run "
                            "or choose another --out")
        rows_file.write_text("")
        run_file.write_text(json.dumps(settings, indent=1))
        return []
    if not run_file.exists():
        run_file.write_text(json.dumps(settings, indent=1))
        rows_file.write_text("")
        return []
    old = json.loads(run_file.read_text())
    if old != json.loads(json.dumps(settings)):
        diff = [k for k in ("methods", "config") if old.get(k) != json.loads(
            json.dumps(settings))[k]]
        raise EvalError(f"cannot resume {out}: its {' and '.join(diff) or 'settings'} differ "
                        "from this run's; use the same options or another --out")
    rows = []
    if rows_file.exists():
        for line in rows_file.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by the interruption: that prompt is redone
    # Keep only prompts whose every method finished (rows are written per finished prompt).
    n_methods = len(settings["methods"])
    per_key: dict[str, set] = {}
    for r in rows:
        per_key.setdefault(r["prompt_key"], set()).add(r["method"])
    complete = {k for k, v in per_key.items() if len(v) == n_methods}
    kept = [r for r in rows if r["prompt_key"] in complete]
    with open(rows_file, "w", encoding="utf-8") as fh:
        for r in kept:
            fh.write(json.dumps(r) + "\n")
    return kept


def _warmup(generate, target, runners, methods, item, cfg, tokenizer, eos) -> None:
    ids = _first_ids(item, tokenizer, cfg)
    for m in methods:
        _run_one(generate, target, runners[m.name], ids, cfg, eos, cfg.seed,
                 min(4, cfg.max_new_tokens))


def _first_ids(item: _Item, tokenizer: Any, cfg: EvalConfig) -> list[int]:
    if item.token_ids is not None:
        return list(item.token_ids)
    return _encode_text(tokenizer, [{"role": "user", "content": item.turns[0]}],
                        cfg.chat_template)


def _run_prompt(generate, target, runners, it: _Item, index: int, order: list[Method],
                cfg: EvalConfig, tokenizer, eos, expected: dict, bar) -> list[dict]:
    seed = cfg.seed + index
    outputs: dict[str, list[list[int]]] = {}
    rows: dict[str, list[dict]] = {}
    for position, m in enumerate(order):
        history: list[dict] = []
        prev_ids: list[int] = []
        outputs[m.name], rows[m.name] = [], []
        for turn, text in enumerate(it.turns):
            if it.token_ids is not None and turn == 0:
                ids = list(it.token_ids)
            elif tokenizer is not None and cfg.chat_template and getattr(
                    tokenizer, "chat_template", None):
                history.append({"role": "user", "content": text})
                ids = _encode_text(tokenizer, history, True)
            else:
                ids = prev_ids + _encode_text(tokenizer, [{"role": "user", "content": text}],
                                              False)
            tokens, row = _run_one(generate, target, runners[m.name], ids, cfg, eos,
                                   seed + 1000 * turn, cfg.max_new_tokens)
            outputs[m.name].append(tokens)
            if tokenizer is not None and len(it.turns) > 1:
                history.append({"role": "assistant",
                                "content": tokenizer.decode(tokens, skip_special_tokens=True)})
            prev_ids = ids + tokens
            row.update({"prompt_key": it.key, "prompt_id": it.id, "category": it.category,
                        "turn": turn + 1, "method": m.name, "position": position,
                        "expected_tokens_per_step": expected.get(m.name)})
            rows[m.name].append(row)
        bar.update(1)
    greedy = cfg.temperature == 0
    for name, mrows in rows.items():
        for turn, row in enumerate(mrows):
            if greedy:
                ref, got = outputs[AR][turn], outputs[name][turn]
                row["matches_ar"] = ref == got
                row["first_mismatch"] = None if ref == got else next(
                    (j for j, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref),
                                                                                  len(got)))
            else:
                row["matches_ar"] = None
                row["first_mismatch"] = None
    return [r for m in order for r in rows[m.name]]


# ---------------------------------------------------------------------------- summaries
SUMMARY_COLUMNS = ["method", "category", "prompts", "new_tokens", "seconds", "tokens_per_s",
                   "speedup", "tokens_per_step", "acceptance_rate", "mean_accepted",
                   "expected_tokens_per_step", "matches_ar", "prefill_ms",
                   "draft_ms_per_step", "verify_ms_per_step", "other_ms_per_step"]
TIME_SPLIT = (("draft_s", "draft_ms_per_step"), ("verify_s", "verify_ms_per_step"),
              ("other_s", "other_ms_per_step"))


def summarise(rows: Any, methods: Sequence[str] | None = None) -> Any:
    """One row per (method, category) plus category "all": sums first, then ratios (so long
    prompts weigh by their tokens). ``rows`` needs method, category, prompt_key, new_tokens,
    seconds, target_forwards, step_tokens, drafted, accepted, steps; matches_ar,
    expected_tokens_per_step and the time split (prefill_s, draft_s, verify_s, other_s) are
    optional (NaN columns when missing)."""
    import pandas as pd

    if len(rows) == 0:
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    methods = list(methods) if methods else list(dict.fromkeys(rows["method"]))
    cats = list(dict.fromkeys(rows["category"]))
    groups = [(c, rows[rows["category"] == c]) for c in cats]
    if len(cats) > 1:
        groups.append((ALL, rows))
    out = []
    for cat, g in groups:
        ar = g[g["method"] == AR]
        ar_time_per_token = (ar["seconds"].sum() / ar["new_tokens"].sum()
                             if len(ar) and ar["new_tokens"].sum() else math.nan)
        for name in methods:
            m = g[g["method"] == name]
            if not len(m):
                continue
            tokens = int(m["new_tokens"].sum())
            secs = float(m["seconds"].sum())
            forwards = int(m["target_forwards"].sum())
            step_tokens = int(m["step_tokens"].sum())
            drafted = int(m["drafted"].sum())  # unknown (NaN) counts count as 0
            accepted = int(m["accepted"].sum())
            steps = int(m["steps"].sum())
            rec = {
                "method": name, "category": cat, "prompts": int(m["prompt_key"].nunique()),
                "new_tokens": tokens, "seconds": secs,
                "tokens_per_s": tokens_per_second(tokens, secs),
                "speedup": (ar_time_per_token / (secs / tokens)
                            if tokens and secs > 0 else math.nan),
                "tokens_per_step": step_tokens / forwards if forwards else math.nan,
                "acceptance_rate": accepted / drafted if drafted else math.nan,
                "mean_accepted": (accepted / steps if steps and (drafted or accepted)
                                  else math.nan),
                "expected_tokens_per_step": math.nan,
                "matches_ar": "-",
                "prefill_ms": 1000 * _total(m, "prefill_s") / len(m),
            }
            for col, name in TIME_SPLIT:
                rec[name] = 1000 * _total(m, col) / forwards if forwards else math.nan
            if "expected_tokens_per_step" in m and m["expected_tokens_per_step"].notna().any():
                rec["expected_tokens_per_step"] = float(m["expected_tokens_per_step"].dropna()
                                                        .iloc[0])
            if "matches_ar" in m and m["matches_ar"].notna().any():
                checked = m["matches_ar"].dropna()
                rec["matches_ar"] = f"{int(checked.astype(bool).sum())}/{len(checked)}"
            out.append(rec)
    return pd.DataFrame(out, columns=SUMMARY_COLUMNS)


def _total(rows: Any, col: str) -> float:
    """Sum of a column; NaN when the column is missing or holds no number at all."""
    if col not in rows:
        return math.nan
    return float(rows[col].sum(min_count=1))


def exactness_failures(rows: Any) -> list[str]:
    """One line per greedy (prompt, turn, method) whose output differs from plain decoding."""
    if len(rows) == 0 or "matches_ar" not in rows:
        return []
    bad = rows[rows["matches_ar"].notna() & (rows["matches_ar"] == False)]  # noqa: E712
    return [f"{r.method} differs from ar on prompt {r.prompt_key} turn {int(r.turn)} at new "
            f"token {int(r.first_mismatch)}" for r in bad.itertuples()]


STEP_COLUMNS = ("accepted_per_step", "ranks_per_step")


def _csv_with_definitions(df: Any, path: Path, header: str) -> None:
    lines = [f"# {header}"] + [f"# {k}: {v}" for k, v in METRICS.items()
                               if k in df.columns]
    with open(path, "w", encoding="utf-8", newline="") as fh:
        fh.write("\n".join(lines) + "\n")
        df.to_csv(fh, index=False)


def write_results(out: Path, rows: Any, summary: Any, meta: dict) -> None:
    """results.json (metrics, settings, summary, per-prompt rows with per-step data),
    summary.csv and per_prompt.csv (definitions as leading '#' lines; read them with
    ``pandas.read_csv(path, comment='#')``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    per_prompt = rows.drop(columns=[c for c in STEP_COLUMNS if c in rows.columns])
    _csv_with_definitions(summary, out / SUMMARY_CSV, "treeopt eval summary, one row per "
                          "method and category")
    _csv_with_definitions(per_prompt, out / PER_PROMPT_CSV, "treeopt eval per-prompt rows")
    doc = {"format": "treeopt-eval", "version": 1, **meta,
           "summary": _records(summary), "rows": _records(rows)}
    (out / RESULTS_JSON).write_text(json.dumps(doc, indent=1, default=_jsonable))


def _records(df: Any) -> list[dict]:
    recs = df.to_dict(orient="records")
    return [{k: _clean(v) for k, v in r.items()} for r in recs]


def _clean(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return None
    if hasattr(v, "item") and not isinstance(v, (list, dict)):
        v = v.item()
        if isinstance(v, float) and math.isnan(v):
            return None
    return v


def _jsonable(v: Any) -> Any:
    if hasattr(v, "tolist"):
        return v.tolist()
    return str(v)


def format_summary(summary: Any) -> str:
    """The summary as an aligned text table for the terminal."""
    show = summary.copy()
    for col, fmt in (("seconds", "{:.2f}"), ("tokens_per_s", "{:.1f}"), ("speedup", "{:.2f}x"),
                     ("tokens_per_step", "{:.2f}"), ("acceptance_rate", "{:.1%}"),
                     ("mean_accepted", "{:.2f}"), ("expected_tokens_per_step", "{:.2f}"),
                     ("prefill_ms", "{:.1f}"), ("draft_ms_per_step", "{:.2f}"),
                     ("verify_ms_per_step", "{:.2f}"), ("other_ms_per_step", "{:.2f}")):
        if col in show:
            show[col] = [("-" if v is None or (isinstance(v, float) and math.isnan(v))
                          else fmt.format(v)) for v in show[col]]
    for col in ("expected_tokens_per_step", "prefill_ms", "draft_ms_per_step",
                "verify_ms_per_step", "other_ms_per_step"):
        if col in show and (show[col] == "-").all():
            show = show.drop(columns=[col])
    # Short headers for the time split (ms per verification step) so the table stays narrow.
    show = show.rename(columns={"draft_ms_per_step": "draft_ms/step",
                                "verify_ms_per_step": "verify_ms/step",
                                "other_ms_per_step": "other_ms/step"})
    return show.to_string(index=False)


def load_results(path: str | Path) -> dict:
    """results.json of a run (a folder or the file)."""
    p = Path(path)
    if p.is_dir():
        p = p / RESULTS_JSON
    if not p.exists():
        raise EvalError(f"{p}: no results file; give a folder written by treeopt eval or its "
                        f"{RESULTS_JSON}")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EvalError(f"{p}: not a treeopt eval results file ({exc})") from None
    if doc.get("format") != "treeopt-eval":
        raise EvalError(f"{p}: not a treeopt eval results file (no format 'treeopt-eval')")
    return doc
