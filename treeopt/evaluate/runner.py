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
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from treeopt.evaluate import exactness as _exactness
from treeopt.evaluate import spread as _spread
from treeopt.evaluate.datasets import Prompt
from treeopt.evaluate.errors import EvalError
from treeopt.evaluate.outdir import (append_rows, atomic_write, locked, read_rows,
                                     resume_difference)
from treeopt.shapes import chain
from treeopt.tree import Tree

ROWS_FILE = "rows.jsonl"
RUN_FILE = "run.json"
RESULTS_JSON = "results.json"
SUMMARY_CSV = "summary.csv"
PER_PROMPT_CSV = "per_prompt.csv"
METRICS_JSON = "metrics.json"
LONG_PROMPTS = ("truncate", "skip")
AR = "ar"
ALL = "all"

METRICS = {
    "prompt_tokens": "tokens of the prompt the model saw (after any cut to fit the window)",
    "truncated_tokens": "prompt tokens cut from the left so that the prompt plus "
                        "max_new_tokens fit the model window (the smallest "
                        "max_position_embeddings of the models run); 0 = none",
    "new_tokens": "generated tokens (prompt tokens never counted); with stop_at_eos off every "
                  "method generates exactly max_new_tokens per turn",
    "seconds": "wall-clock seconds of the generate call (prefill included), summed",
    "tokens_per_s": "new_tokens / seconds: generated tokens only, never prompt tokens, never "
                    "characters",
    "speedup": "plain decoding's time / this method's time on the same prompts for the same "
               "number of new tokens (computed per token: (ar_seconds / ar_tokens) / "
               "(seconds / new_tokens), identical when the token counts are equal)",
    "speedup_median": "median over prompts of each prompt's speed-up (its turns summed): "
                      "how a typical prompt fares, unlike speedup, which long prompts weigh",
    "speedup_ci95_low": f"lower end of a bootstrap {_spread.LEVEL:.0%} interval of speedup: "
                        f"{_spread.RESAMPLES} resamples of the prompts with replacement (seed "
                        f"{_spread.SEED}), each computing speedup's ratio of summed times; "
                        "the 2.5th percentile; empty with fewer than "
                        f"{_spread.MIN_PROMPTS} prompts",
    "speedup_ci95_high": "upper end of that interval (the 97.5th percentile)",
    "flag": "why a row's speed-up cannot be trusted, ';'-separated, empty = nothing found: "
            + "; ".join(f"{k} = {v}" for k, v in _spread.FLAGS.items()),
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
    "mean_nodes": "tree nodes verified per verification step, root included (1 = a plain "
                  "decoding step): the draft budget a method actually spent; adaptive drafters "
                  "(egag, dynamic trees, cascades, n-gram fills) change it from step to step, "
                  "and a fixed tree shrinks only where the remaining tokens cut it",
    "mean_depth": "depth (edges below the root) of the verified tree per verification step",
    "expected_tokens_per_step": "F(tree) under the acceptance profile given to the run, when "
                                "one was given",
    "matches_ar": "greedy only: turns whose output equals plain decoding's token for token / "
                  "turns compared; in the summary '5/6 (+1 tie)' counts apart the outputs "
                  "that differ only at a numerical tie (see exactness). A later turn whose "
                  "prompt differs from plain decoding's (an earlier turn differed) is "
                  "compared with plain decoding of its own prompt",
    "exactness": "greedy only: 'equal' (plain decoding's output token for token), 'tie' "
                 "(differs first at a numerical tie: the token plain decoding chose and the "
                 "token this method chose both have logits within tie_tolerance of the "
                 "target's best logit there, recomputed with one target forward; half "
                 "precision rounds batched tree passes and one-token steps differently, so "
                 "the argmax of tied logits may go either way; not a failure) or 'differs' "
                 "(any other difference: a failure, exit status 1)",
    "first_mismatch": "greedy only: index (from 0) of the first new token that differs from "
                      "plain decoding's output; empty when equal",
    "tie_gap": "greedy only, at first_mismatch: the target's best logit minus the lower of "
               "the logits of the two tokens that differ (the top-2 gap when they are the "
               "best two)",
    "tie_tolerance": "greedy only, at first_mismatch: the largest tie_gap counted as a "
                     "numerical tie: the model dtype's relative tolerance (float32 1e-4, "
                     "bfloat16 2**-7, float16 2**-10: one or two representable steps of "
                     "half precision) times the larger magnitude of the logits compared",
    "tree_bucket": "tree-set methods only (treeopt.treeset): the index of the context range "
                   "whose tree decoded this prompt, chosen by prompt tokens + "
                   "max_new_tokens // 2",
    "tree_nodes": "tree-set methods only: nodes (root included) of the tree that decoded this "
                  "prompt",
    "prefill_ms": "milliseconds of the prefill (prompt forwards and the first token) per turn",
    "draft_ms_per_step": "drafting milliseconds (draft forwards, candidate look-ups) per "
                         "verification step; hf-pld: inside other_ms_per_step",
    "verify_ms_per_step": "target verification-forward milliseconds per verification step",
    "other_ms_per_step": "the rest of each step (acceptance walk, cache compaction, "
                         "bookkeeping; Hugging Face's own loop for hf-* methods) in "
                         "milliseconds per verification step; (draft + verify + other) / "
                         "tokens_per_step is the time per generated token",
    "output_text": "results.json and rows.jsonl only: the generated text up to the first "
                   "end-of-sequence id (the answer; a fixed-length generation goes on past "
                   "it), special tokens removed; empty without a tokenizer",
    "output_ids": "results.json and rows.jsonl only: every generated token id",
    "pass_status": "pass@1 runs only (treeopt.evaluate.passk): 'passed' (exit 0 after every "
                   "test of the problem ran), 'failed' (a test assertion failed), 'timeout' "
                   "or 'error' (an exception, a crash, a resource limit, an early exit); "
                   "empty = not scored",
    "drafter_choice": "what a choosing drafter (auto) drafted with in this generation, one "
                      "line (steps per candidate; empty for fixed drafters)",
    "pass_reason": "pass@1 runs only: why a sample did not pass, one short line",
    "pass_at_1": "pass@1 runs only: samples passed / samples scored (one sample per prompt: "
                 "the unbiased pass@1 estimate); in greedy mode equal for every lossless "
                 "method",
}


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
    treeset: a ``treeopt.treeset.TreeSet``: each prompt is decoded with the tree of its
             context range (``TreeSet.pick``; rows record ``tree_bucket`` and
             ``tree_nodes``); ``tree`` is then its first range's tree. None otherwise.
    """

    name: str
    tree: Tree | None = None
    kind: str = "tree"
    source: str = ""
    drafter: str | None = None
    treeset: Any = None

    def to_dict(self) -> dict:
        d = {"name": self.name, "kind": self.kind, "source": self.source,
             "parents": None if self.tree is None else list(self.tree.parents)}
        if self.drafter is not None:  # absent when None: older run.json files stay equal
            d["drafter"] = self.drafter
        if self.treeset is not None:  # likewise
            d["treeset"] = self.treeset.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Method":
        tree = None if d.get("parents") is None else Tree.from_parents(d["parents"])
        treeset = None
        if d.get("treeset") is not None:
            from treeopt.treeset import TreeSet

            treeset = TreeSet.from_dict(d["treeset"], f"method {d['name']}")
        return cls(d["name"], tree, d.get("kind", "tree"), d.get("source", ""),
                   d.get("drafter"), treeset)

    @property
    def is_plain(self) -> bool:
        """Plain autoregressive decoding through the engine (no drafter at all)."""
        return self.kind != "hf" and self.drafter is None and self.treeset is None and (
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
    tree = chain(draft_tokens=draft_length)
    return Method(f"chain:{draft_length + 1}", tree, "chain",
                  f"chain drafting {draft_length} tokens per step")


def tree_method(spec: str, profile: Any = None) -> Method:
    """A tree from a growmap file or a shape spec ("kary:2x3", "dp:64x8", "greedy:32", ...;
    see ``treeopt.shapes.from_name``; ``dp:`` and ``greedy:`` need ``profile``).

    A growmap file is named ``tree:NAME`` with the name its metadata records (the
    ``"name"`` key of its ``treeopt`` dict), else ``tree:PATH`` with the path as given: two
    tuned trees saved as ``a/tree.pt`` and ``b/tree.pt`` stay apart."""
    from treeopt.shapes import describe, from_name

    path = Path(spec.strip())
    from treeopt.treeset import is_treeset_file, load_treeset

    if is_treeset_file(path):  # one tree per context range, picked per prompt
        ts = load_treeset(path)
        name = ts.meta.get("name")
        label = name.strip() if isinstance(name, str) and name.strip() else spec.strip()
        return Method(f"treeset:{label}", ts.trees[0], "tree",
                      f"tree set of {len(ts.buckets)} context ranges ({spec.strip()})",
                      treeset=ts)
    if path.suffix.lower() in (".pt", ".pth", ".json"):
        from treeopt.growmap import load_growmap

        tree, meta = load_growmap(path)
        name = meta.get("name") if isinstance(meta, dict) else None
        label = name.strip() if isinstance(name, str) and name.strip() else spec.strip()
        return Method(f"tree:{label}", tree, "tree", describe(spec))
    tree = from_name(spec, profile=profile)
    kind = "dp" if spec.strip().lower().startswith("dp:") else (
        "chain" if tree.width == 1 else "tree")
    return Method(spec.strip(), tree, kind, describe(spec))


def drafter_method(text: str, profile: Any = None) -> Method:
    """A method drafting with the drafter spec in ``text``, optionally over a shape:
    ``SPEC[@SHAPE]`` ("ngram", "ngram@chain:3", "ngram:max=3@kary:2x1",
    "datastore:store.npz@chain:4"); SHAPE is a growmap file or a shape spec as for
    ``tree_method``. The method's name is ``text``."""
    name = text.strip()
    spec, at, shape = _split_at(name)
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
    shaped = tree_method(shape, profile) if shape else None
    tree = shaped.tree if shaped is not None else None
    source = f"drafter {spec}" + (f" over {shape}" if shape else " (its default shape)")
    return Method(name, tree, "drafter", source, spec,
                  shaped.treeset if shaped is not None else None)


def _split_at(text: str) -> tuple[str, str, str]:
    """``text.rpartition("@")`` at the last '@' outside parentheses (a nested drafter spec in
    parentheses may hold one); ("", "", text) when there is none."""
    depth = 0
    for i in range(len(text) - 1, -1, -1):
        depth += (text[i] == ")") - (text[i] == "(")
        if text[i] == "@" and depth == 0:
            return text[:i], "@", text[i + 1:]
    return "", "", text


def disambiguate(methods: Sequence[Method], paths: Sequence[str | None]) -> list[Method]:
    """Methods whose names collide and that come from a growmap file (``paths[i]``: the path
    as given, None for other methods) are renamed ``tree:PATH``, so two growmaps whose
    metadata records the same name stay apart; any other repeated name is left for
    ``run_eval`` to refuse ("listed twice")."""
    methods = list(methods)
    names = [m.name for m in methods]
    out = []
    for m, path in zip(methods, paths):
        if path is not None and names.count(m.name) > 1:
            prefix = "treeset" if m.treeset is not None else "tree"
            m = Method(f"{prefix}:{str(path).strip()}", m.tree, m.kind, m.source, m.drafter,
                       m.treeset)
        out.append(m)
    return out


def dp_method(profile: Any, size: int, levels: int | None = None) -> Method:
    """The exact-DP tree (``treeopt.search.dp``) of at most ``size`` nodes and at most
    ``levels`` levels, root included (Sequoia's convention; None = no limit). The method is
    named by its shape spec, whose second number counts edges (depth = levels - 1):
    ``dp_method(p, 32, 6)`` is ``dp:32x5``, which ``--tree dp:32x5`` builds again."""
    return tree_method(dp_spec(size, levels), profile)


def dp_spec(size: int, levels: int | None = None) -> str:
    """The shape spec (``treeopt.shapes``) of the DP tree of ``size`` nodes and at most
    ``levels`` levels counting the root: ``dp:SIZExDEPTH`` with DEPTH = levels - 1 edges."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise EvalError(f"DP tree size must be a positive integer, got {size!r}")
    if levels is None:
        return f"dp:{size}"
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
        raise EvalError(f"DP tree levels count the root: at least 2 (the root and one level "
                        f"of drafted tokens), got {levels!r}")
    return f"dp:{size}x{levels - 1}"


@dataclass
class EvalConfig:
    """Settings shared by every method of a run.

    temperature 0 = greedy (then outputs are checked against plain decoding). ``seed`` seeds
    sampling; prompt i uses ``seed + i`` for every method. ``stop_at_eos`` False (default)
    makes every method generate exactly ``max_new_tokens`` per turn. ``long_prompts``: what
    to do with a prompt longer than the model window minus ``max_new_tokens`` (the window:
    the smallest ``max_position_embeddings`` of the target and the draft models run, when
    known): "truncate" (default) keeps its last tokens (a left cut, so the end of the prompt
    the answer follows stays), "skip" leaves the prompt out; either way a warning says how
    many prompts and tokens. A later turn of a multi-turn prompt that outgrows the window is
    always cut from the left."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    rule: str = "sequoia"
    stop_at_eos: bool = False
    chat_template: bool = True
    warmup: bool = True
    long_prompts: str = "truncate"


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
    """Token ids of chat ``messages`` exactly as ``treeopt.decode.api.encode_prompt`` makes
    them (as ``treeopt generate`` and ``treeopt profile`` do): with the chat template, the
    template's text then the tokenizer without added special tokens; without it, a single
    message's text through the tokenizer."""
    if tokenizer is None:
        raise EvalError("text prompts need a tokenizer; pass tokenizer= or token-id prompts")
    from treeopt.decode.api import GenerateError, encode_prompt

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


def _stat(stats: Any, name: str, default: Any = 0) -> Any:
    return getattr(stats, name, default)


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

    from treeopt.decode.sampling import Sampling

    device = getattr(target, "device", torch.device("cpu"))
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    sampling = Sampling(cfg.temperature, cfg.top_k, cfg.top_p, cfg.rule, seed)
    drafter, picked = runner.drafter, {}
    if runner.by_bucket is not None:  # a tree set: the drafter of this prompt's range
        bucket, tree = runner.method.treeset.pick(len(ids), max_new)
        drafter, picked = runner.by_bucket[bucket], {"tree_bucket": bucket,
                                                     "tree_nodes": tree.size}
    _sync(device)
    t0 = time.perf_counter()
    if runner.hf_options is not None:
        from treeopt.evaluate.reference import run_hf

        gen = run_hf(target, input_ids, max_new_tokens=max_new, sampling=sampling,
                     eos_token_id=eos, options=runner.hf_options)
    else:
        gen = generate(target, drafter, input_ids, max_new_tokens=max_new,
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
        "drafter_choice": str(_stat(stats, "choice", "") or ""),
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
    from treeopt.decode.api import eos_ids

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
        from treeopt.decode.engine import generate
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
        from treeopt.decode.api import eos_ids

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
                      f"({_threads_text(earlier_threading)} there, "
                      f"{_threads_text(threading)} here): their timings may not compare")
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
    from treeopt.decode.sampling import Sampling, SamplingError

    try:
        Sampling(cfg.temperature, cfg.top_k, cfg.top_p, cfg.rule, cfg.seed)
    except SamplingError as exc:
        raise EvalError(str(exc)) from None
    if cfg.long_prompts not in LONG_PROMPTS:
        raise EvalError(f"long_prompts must be one of {', '.join(LONG_PROMPTS)}, got "
                        f"{cfg.long_prompts!r}")


def check_out_dir(out_dir: str | Path | None) -> Path | None:
    """The results folder as a Path (None for none); EvalError when it names a file."""
    if out_dir is None:
        return None
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise EvalError(f"{out} is a file, not a folder; give a folder for the results (it is "
                        "created when missing)")
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
    """The smallest ``max_position_embeddings`` of the models the run uses (the target, the
    drafters' models, Hugging Face's assistant model); None when none is known."""
    models = [target]
    for r in runners.values():
        models.append(getattr(r.drafter, "model", None))
        if r.hf_options:
            models.append(r.hf_options.get("assistant_model"))
    limits = []
    for m in models:
        v = getattr(getattr(m, "config", None), "max_position_embeddings", None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            limits.append(v)
    return min(limits) if limits else None


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
    return {"config": asdict(cfg), "methods": [m.to_dict() for m in methods],
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


def threading_settings(target: Any) -> dict:
    """The settings CPU timings depend on: torch's intra- and inter-op threads, the OpenMP
    environment (OMP_WAIT_POLICY, OMP_NUM_THREADS) and the linear-layer kernels of the
    target (``treeopt.decode.cpu_kernels.kernels_in_use``)."""
    import torch

    kernels = None
    try:
        from treeopt.decode.cpu_kernels import kernels_in_use

        kernels = kernels_in_use(target)
    except (ImportError, AttributeError, TypeError):
        pass
    return {"torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(),
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "kernels": kernels, "cpu_count": os.cpu_count()}


def _threads_text(t: dict) -> str:
    return (f"{t.get('torch_threads')} threads, OMP_WAIT_POLICY="
            f"{t.get('OMP_WAIT_POLICY') or 'unset'}, kernels {t.get('kernels')}")


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
        old = json.loads(run_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EvalError(f"cannot resume {out}: its {RUN_FILE} is unreadable "
                        f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                        f"restore it or choose another --out") from None
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
    ids, _ = _fit(_first_ids(item, tokenizer, cfg), limit)
    for m in methods:
        _run_one(generate, target, runners[m.name], ids, cfg, eos, cfg.seed,
                 min(4, cfg.max_new_tokens))


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
            tokens, row = _run_one(generate, target, runners[m.name], ids, cfg, eos,
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
SUMMARY_COLUMNS = ["method", "category", "prompts", "new_tokens", "seconds", "tokens_per_s",
                   "speedup", "speedup_median", "speedup_ci95_low", "speedup_ci95_high",
                   "flag", "tokens_per_step", "acceptance_rate", "mean_accepted",
                   "mean_nodes", "mean_depth",
                   "expected_tokens_per_step", "matches_ar", "pass_at_1", "prefill_ms",
                   "draft_ms_per_step", "verify_ms_per_step", "other_ms_per_step"]
TIME_SPLIT = (("draft_s", "draft_ms_per_step"), ("verify_s", "verify_ms_per_step"),
              ("other_s", "other_ms_per_step"))


def summarise(rows: Any, methods: Sequence[str] | None = None) -> Any:
    """One row per (method, category) plus category "all": sums first, then ratios (so long
    prompts weigh by their tokens). ``rows`` needs method, category, prompt_key, new_tokens,
    seconds, target_forwards, step_tokens, drafted, accepted, steps; matches_ar,
    expected_tokens_per_step and the time split (prefill_s, draft_s, verify_s, other_s) are
    optional (NaN columns when missing). The spread of the speed-up (median per-prompt
    speed-up, seeded bootstrap 95 % interval) and the flags come from
    ``treeopt.evaluate.spread``."""
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
            speedup = (ar_time_per_token / (secs / tokens) if tokens and secs > 0
                       else math.nan)
            spread = _spread.spread(*_spread.paired_times(g, name, AR)) if len(ar) else {
                "prompts": 0, "speedup_median": math.nan, "speedup_ci95_low": math.nan,
                "speedup_ci95_high": math.nan}
            rec = {
                "method": name, "category": cat, "prompts": int(m["prompt_key"].nunique()),
                "new_tokens": tokens, "seconds": secs,
                "tokens_per_s": tokens_per_second(tokens, secs),
                "speedup": speedup,
                "speedup_median": spread["speedup_median"],
                "speedup_ci95_low": spread["speedup_ci95_low"],
                "speedup_ci95_high": spread["speedup_ci95_high"],
                "flag": _spread.flags(speedup, accepted, spread["prompts"],
                                      spread["speedup_ci95_low"], spread["speedup_ci95_high"],
                                      is_reference=name == AR),
                "tokens_per_step": step_tokens / forwards if forwards else math.nan,
                "acceptance_rate": accepted / drafted if drafted else math.nan,
                "mean_accepted": (accepted / steps if steps and (drafted or accepted)
                                  else math.nan),
                "mean_nodes": _per_forward(m, "mean_nodes"),
                "mean_depth": _per_forward(m, "mean_depth"),
                "expected_tokens_per_step": math.nan,
                "matches_ar": "-",
                "pass_at_1": _pass_at_1(m),
                "prefill_ms": 1000 * _total(m, "prefill_s") / len(m),
            }
            for col, split in TIME_SPLIT:
                rec[split] = 1000 * _total(m, col) / forwards if forwards else math.nan
            if "expected_tokens_per_step" in m and m["expected_tokens_per_step"].notna().any():
                rec["expected_tokens_per_step"] = float(m["expected_tokens_per_step"].dropna()
                                                        .iloc[0])
            if "matches_ar" in m and m["matches_ar"].notna().any():
                states = [_exactness.row_exactness(r) for r in m.to_dict("records")]
                states = [v for v in states if v is not None]
                rec["matches_ar"] = _exactness.count_text(
                    states.count(_exactness.EQUAL), states.count(_exactness.TIE), len(states))
            out.append(rec)
    return pd.DataFrame(out, columns=SUMMARY_COLUMNS)


def _pass_at_1(rows: Any) -> float:
    """Samples passed / samples scored (``pass_status``, set by
    ``treeopt.evaluate.passk``); NaN when no row was scored."""
    if "pass_status" not in rows:
        return math.nan
    scored = [s for s in rows["pass_status"] if isinstance(s, str)]
    return sum(s == "passed" for s in scored) / len(scored) if scored else math.nan


def _per_forward(rows: Any, col: str) -> float:
    """Pooled per-step mean of a per-row mean ``col`` (rows weighted by their target
    forwards); NaN when no row has it."""
    if col not in rows:
        return math.nan
    known = rows[rows[col].notna()]
    forwards = float(known["target_forwards"].sum()) if len(known) else 0.0
    if not forwards:
        return math.nan
    return float((known[col] * known["target_forwards"]).sum()) / forwards


def _total(rows: Any, col: str) -> float:
    """Sum of a column; NaN when the column is missing or holds no number at all."""
    if col not in rows:
        return math.nan
    return float(rows[col].sum(min_count=1))


def exactness_failures(rows: Any) -> list[str]:
    """One line per greedy (prompt, turn, method) whose output differs from plain decoding
    other than at a numerical tie (exactness "differs")."""
    if len(rows) == 0 or "matches_ar" not in rows:
        return []
    return [f"{r['method']} differs from ar on prompt {r['prompt_key']} turn "
            f"{int(r['turn'])} at new token {int(r['first_mismatch'])}"
            for r in rows.to_dict("records")
            if _exactness.row_exactness(r) == _exactness.DIFFERS]


def exactness_ties(rows: Any) -> list[str]:
    """One line per greedy (prompt, turn, method) that differs from plain decoding only at a
    numerical tie (exactness "tie"), with the position and the logit gap."""
    if len(rows) == 0 or "exactness" not in rows:
        return []
    return [_exactness.tie_line(r["method"], r["prompt_key"], int(r["turn"]),
                                r.get("first_mismatch"), r.get("tie_gap"),
                                r.get("tie_tolerance"))
            for r in rows.to_dict("records") if _exactness.row_exactness(r) == _exactness.TIE]


STEP_COLUMNS = ("accepted_per_step", "ranks_per_step", "nodes_per_step", "depth_per_step")
OUTPUT_COLUMNS = ("output_ids", "output_text")  # results.json / rows.jsonl only


def metric_definitions(columns: Sequence[str]) -> dict[str, str]:
    """The definitions (``METRICS``) of those of ``columns`` that have one."""
    return {k: v for k, v in METRICS.items() if k in columns}


def write_results(out: Path, rows: Any, summary: Any, meta: dict) -> None:
    """results.json (metrics, settings, summary, per-prompt rows with per-step data),
    summary.csv and per_prompt.csv (plain CSV: ``pandas.read_csv(path)`` reads them) and
    metrics.json beside them (the definition of every CSV column that has one). Each file is
    replaced atomically (a crash leaves the previous version, never a truncated file)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    per_prompt = rows.drop(columns=[c for c in STEP_COLUMNS + OUTPUT_COLUMNS
                                    if c in rows.columns])
    definitions = {"format": "treeopt-eval-metrics", "version": 1,
                   "files": {SUMMARY_CSV: "one row per method and category (category 'all' "
                                          "pools every category)",
                             PER_PROMPT_CSV: "one row per prompt, turn and method"},
                   "metrics": metric_definitions(list(summary.columns)
                                                 + list(per_prompt.columns))}
    atomic_write(out / METRICS_JSON, json.dumps(definitions, indent=1))
    atomic_write(out / SUMMARY_CSV, summary.to_csv(index=False))
    atomic_write(out / PER_PROMPT_CSV, per_prompt.to_csv(index=False))
    doc = {"format": "treeopt-eval", "version": 1, **meta,
           "summary": _records(summary), "rows": _records(rows)}
    atomic_write(out / RESULTS_JSON, json.dumps(doc, indent=1, default=_jsonable))


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
    """The summary as an aligned text table for the terminal. The speed-up's spread is
    shown compactly: ``median`` (per-prompt speed-ups) and ``ci95`` (``low-high``); the
    ``flag`` column only when a row is flagged (see ``METRICS["flag"]``)."""
    show = summary.copy()

    def num(v: Any) -> bool:
        return v is not None and not (isinstance(v, float) and math.isnan(v))

    if "speedup_median" in show:
        show["speedup_median"] = [f"{v:.2f}x" if num(v) else "-"
                                  for v in show["speedup_median"]]
    if "speedup_ci95_low" in show and "speedup_ci95_high" in show:
        ci = [f"{lo:.2f}-{hi:.2f}" if num(lo) and num(hi) else "-"
              for lo, hi in zip(show["speedup_ci95_low"], show["speedup_ci95_high"])]
        at = list(show.columns).index("speedup_ci95_low")
        show = show.drop(columns=["speedup_ci95_low", "speedup_ci95_high"])
        show.insert(at, "ci95", ci)
    if "flag" in show:
        flags = ["" if not isinstance(v, str) else v for v in show["flag"]]
        if any(flags):
            show["flag"] = [f or "-" for f in flags]
        else:
            show = show.drop(columns=["flag"])
    for col, fmt in (("seconds", "{:.2f}"), ("tokens_per_s", "{:.1f}"), ("speedup", "{:.2f}x"),
                     ("tokens_per_step", "{:.2f}"), ("acceptance_rate", "{:.1%}"),
                     ("mean_accepted", "{:.2f}"), ("mean_nodes", "{:.1f}"),
                     ("mean_depth", "{:.1f}"), ("expected_tokens_per_step", "{:.2f}"),
                     ("pass_at_1", "{:.1%}"),
                     ("prefill_ms", "{:.1f}"), ("draft_ms_per_step", "{:.2f}"),
                     ("verify_ms_per_step", "{:.2f}"), ("other_ms_per_step", "{:.2f}")):
        if col in show:
            show[col] = [("-" if v is None or (isinstance(v, float) and math.isnan(v))
                          else fmt.format(v)) for v in show[col]]
    for col in ("expected_tokens_per_step", "pass_at_1", "prefill_ms", "draft_ms_per_step",
                "verify_ms_per_step", "other_ms_per_step"):
        if col in show and (show[col] == "-").all():
            show = show.drop(columns=[col])
    # Short headers for the time split (ms per verification step) so the table stays narrow.
    show = show.rename(columns={"speedup_median": "median", "mean_nodes": "nodes/step",
                                "mean_depth": "depth/step",
                                "draft_ms_per_step": "draft_ms/step",
                                "verify_ms_per_step": "verify_ms/step",
                                "other_ms_per_step": "other_ms/step"})
    return show.to_string(index=False)


def choice_lines(rows: Any) -> list[str]:
    """One line per method whose drafter chooses (``auto``): its choice on the last prompt."""
    if "drafter_choice" not in getattr(rows, "columns", ()):
        return []
    out = []
    for name, group in rows.groupby("method", sort=False):
        said = [c for c in group["drafter_choice"] if isinstance(c, str) and c]
        if said:
            out.append(f"{name}: last prompt: {said[-1]}")
    return out


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
