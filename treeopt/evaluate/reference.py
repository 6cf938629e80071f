"""Hugging Face's own speculative decoding as reference methods for ``treeopt eval``.

A user who does not use treeopt would pick one of these: prompt lookup
(``target.generate(..., prompt_lookup_num_tokens=K)``) or assisted generation
(``assistant_model=draft`` or, for a LayerSkip-style self-draft, ``assistant_early_exit=K``).
They run on the same prompts, interleaved with the other methods, with the same settings:

- greedy (``do_sample=False``) or, when the temperature is above 0, ``do_sample=True`` with
  the run's temperature, top-k and top-p after ``torch.manual_seed(seed)``;
- with ``stop_at_eos`` off the end-of-sequence id is unset, so Hugging Face generates exactly
  ``max_new_tokens`` like every other method and greedy outputs can be compared with plain
  decoding token for token.

The target's forward calls are counted (and timed) with hooks during the call, so tokens per
step is measured for these methods too: Hugging Face verifies candidates in its first (prefill)
forward already; the runner's convention (first token and first forward excluded) is kept, so
tokens per step = (new tokens - 1) / (target forwards - 1). Drafted candidates are read off
the lengths of the target's inputs: prompt + candidates in the first forward, the last token +
candidates in each later one; accepted = new tokens - target forwards.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from treeopt.evaluate.errors import EvalError
from treeopt.evaluate.methods import Method
from treeopt.models.loading import EARLY_EXIT_PREFIX

HF = "hf"
PLD_PREFIX = "pld:"


def hf_prompt_lookup(k: int) -> Method:
    """Hugging Face prompt lookup drafting up to ``k`` tokens per step ("hf-pld:K")."""
    if int(k) < 1:
        raise EvalError(f"hf prompt lookup needs at least 1 token per step, got {k}")
    k = int(k)
    return Method(f"hf-pld:{k}", None, HF,
                  f"Hugging Face generate(prompt_lookup_num_tokens={k})", f"{PLD_PREFIX}{k}")


def hf_assisted(early_exit: int | None = None) -> Method:
    """Hugging Face assisted generation ("hf-assisted"): ``assistant_model=`` the run's draft
    model, or ``assistant_early_exit=K`` when ``early_exit`` is given (the run's draft is
    ``early-exit:K``)."""
    if early_exit is None:
        return Method("hf-assisted", None, HF,
                      "Hugging Face generate(assistant_model=the run's draft model)")
    if int(early_exit) < 1:
        raise EvalError(f"hf assisted early exit needs at least 1 layer, got {early_exit}")
    k = int(early_exit)
    return Method("hf-assisted", None, HF, f"Hugging Face generate(assistant_early_exit={k})",
                  f"{EARLY_EXIT_PREFIX}{k}")


def early_exit_layers(spec: Any) -> int | None:
    """K for a draft spec "early-exit:K", else None."""
    if not isinstance(spec, str):
        return None
    text = spec.strip().lower()
    if text.startswith(EARLY_EXIT_PREFIX) and text[len(EARLY_EXIT_PREFIX):].strip().isdigit():
        return int(text[len(EARLY_EXIT_PREFIX):])
    return None


def hf_options(method: Method, draft: Any = None, drafter: Any = None, target: Any = None
               ) -> dict:
    """The keyword arguments of ``target.generate`` for a reference method.

    draft: the run's draft as given (a model, a Drafter, a spec string or None); drafter:
    the run's default drafter built from it. ``hf-assisted`` without an early-exit spec needs
    a draft model (the drafter's ``model``); raises EvalError when there is none, or when
    an early exit asks for more layers than ``target`` has."""
    spec = method.drafter
    if spec is not None and spec.startswith(PLD_PREFIX):
        return {"prompt_lookup_num_tokens": int(spec[len(PLD_PREFIX):])}
    k = early_exit_layers(spec)
    if spec is not None and k is None:
        raise EvalError(f"method {method.name}: unknown Hugging Face option {spec!r} (use "
                        f"{PLD_PREFIX}K or {EARLY_EXIT_PREFIX}K)")
    if k is None:
        k = early_exit_layers(draft)
    if k is not None:
        total = getattr(getattr(target, "config", None), "num_hidden_layers", None)
        if k < 1 or (total is not None and k > int(total)):
            raise EvalError(f"{method.name}: assistant_early_exit={k} needs 1 <= K <= "
                            f"{total} (the target's layers)")
        return {"assistant_early_exit": k}
    model = getattr(drafter, "model", None)
    if model is None and isinstance(draft, torch.nn.Module):
        model = draft
    if model is None:
        what = ("no drafter" if draft is None and drafter is None else
                f"the drafter {getattr(drafter, 'name', type(drafter).__name__)!r}, which has "
                "no model")
        raise EvalError(f"{method.name} needs a draft model, and this run has {what}; give a "
                        "draft model or early-exit:K as the default draft, or drop "
                        f"{method.name}")
    return {"assistant_model": model}


@dataclass
class HFStats:
    """What the runner reads from a reference call (the engine's DecodeStats names)."""

    target_forwards: int = 0       # target forwards after the first (prefill) one
    num_steps: int = 0
    step_tokens: int = 0           # new tokens after the first one
    drafted_tokens: int | None = None
    accepted_tokens: int = 0
    all_target_forwards: int = 0   # the first one included
    prefill_s: float = math.nan
    draft_s: float = math.nan
    verify_s: float = math.nan
    other_s: float = math.nan
    total_s: float = 0.0
    steps: list = field(default_factory=list)  # per-step data is not observable


@dataclass
class HFGeneration:
    tokens: list[int]
    stats: HFStats


class _ForwardMeter:
    """Counts and times the target's forwards (and the assistant's) during one generate call.

    Hugging Face drafts by calling ``assistant.generate``; an early-exit assistant (or a
    draft that is the target itself) is the target module, so the target's ``generate`` is
    wrapped for the call to track nesting: target forwards inside a nested ``generate`` are
    draft forwards."""

    def __init__(self, target, assistant=None):
        self.cuda = getattr(getattr(target, "device", None), "type", "cpu") == "cuda"
        self.calls: list[tuple[float, int | None]] = []  # (seconds, input length) per forward
        self.draft_s = 0.0
        self._depth = 0
        self._t0 = self._td = 0.0
        self._q: int | None = None
        self._handles = [target.register_forward_pre_hook(self._pre, with_kwargs=True),
                         target.register_forward_hook(self._post)]
        self._wrapped = [target]
        if assistant is not None and assistant is not target:
            self._handles += [assistant.register_forward_pre_hook(self._draft_pre),
                              assistant.register_forward_hook(self._draft_post)]
        for model in self._wrapped:
            model.generate = self._nesting(type(model).generate.__get__(model))

    def _nesting(self, generate):
        def wrapped(*args, **kwargs):
            self._depth += 1
            try:
                return generate(*args, **kwargs)
            finally:
                self._depth -= 1
        return wrapped

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _pre(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self._q = int(ids.shape[-1]) if isinstance(ids, torch.Tensor) else None
        self._t0 = self._now()

    def _post(self, module, args, output):
        dt = self._now() - self._t0
        if self._depth > 1:
            self.draft_s += dt  # the target drafting for itself (early exit, self-draft)
        else:
            self.calls.append((dt, self._q))

    def _draft_pre(self, module, args):
        self._td = self._now()

    def _draft_post(self, module, args, output):
        self.draft_s += self._now() - self._td

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        for model in self._wrapped:
            model.__dict__.pop("generate", None)
        self._handles, self._wrapped = [], []


def _no_eos_ids(target) -> int:
    cfg = getattr(target, "generation_config", None)
    for value in (getattr(cfg, "pad_token_id", None), getattr(target.config, "pad_token_id", None),
                  getattr(cfg, "eos_token_id", None)):
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


def generate_kwargs(target, *, max_new_tokens: int, sampling,
                    eos_token_id: int | list[int] | None
                    ) -> dict:
    """Sampling and stopping arguments of ``target.generate`` matching the run's settings."""
    kw: dict[str, Any] = {"max_new_tokens": int(max_new_tokens)}
    if sampling.greedy:
        kw.update(do_sample=False, temperature=None, top_k=None, top_p=None)
    else:
        kw.update(do_sample=True, temperature=float(sampling.temperature),
                  top_k=int(sampling.top_k), top_p=float(sampling.top_p))
    if eos_token_id is None:
        # Unset EOS (the model's generation config would stop there): exactly max_new_tokens.
        kw.update(eos_token_id=None, pad_token_id=_no_eos_ids(target))
    else:
        ids = [int(t) for t in eos_token_id] if isinstance(eos_token_id, (list, tuple)) \
            else [int(eos_token_id)]
        kw.update(eos_token_id=ids, pad_token_id=ids[0])
    return kw


def run_hf(target, input_ids: torch.Tensor, *, max_new_tokens: int, sampling,
           eos_token_id: int | list[int] | None = None, options: dict) -> HFGeneration:
    """One ``target.generate`` call with ``options`` (``hf_options``); tokens generated
    (prompt excluded) and the counted statistics."""
    from transformers.utils import logging as hf_logging

    kw = generate_kwargs(target, max_new_tokens=max_new_tokens, sampling=sampling,
                         eos_token_id=eos_token_id)
    meter = _ForwardMeter(target, options.get("assistant_model"))
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if not sampling.greedy and sampling.seed is not None:
                torch.manual_seed(int(sampling.seed))
            start = time.perf_counter()
            out = target.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                  **kw, **options)
            total = meter._now() - start
    finally:
        hf_logging.set_verbosity(verbosity)
        meter.remove()
    tokens = [int(t) for t in out[0, input_ids.shape[1]:].tolist()]
    return HFGeneration(tokens, _stats(meter, len(tokens), input_ids.shape[1], total,
                                       "prompt_lookup_num_tokens" in options))


def _stats(meter: _ForwardMeter, n_new: int, prompt_len: int, total: float,
           lookup: bool) -> HFStats:
    calls = meter.calls
    n = len(calls)
    s = HFStats(all_target_forwards=n, total_s=total)
    s.target_forwards = s.num_steps = max(0, n - 1)
    s.step_tokens = max(0, n_new - 1)
    s.accepted_tokens = max(0, n_new - n)
    qs = [q for _, q in calls]
    if n and all(q is not None for q in qs):
        s.drafted_tokens = max(0, qs[0] - prompt_len) + sum(max(0, q - 1) for q in qs[1:])
    if n:
        s.prefill_s = calls[0][0]
        s.verify_s = sum(dt for dt, _ in calls[1:])
    s.draft_s = math.nan if lookup else meter.draft_s
    known = [x for x in (s.prefill_s, s.verify_s, s.draft_s) if not math.isnan(x)]
    s.other_s = max(0.0, total - sum(known)) if n else math.nan
    return s


__all__ = ["HFGeneration", "HFStats", "early_exit_layers", "generate_kwargs", "hf_assisted",
           "hf_options", "hf_prompt_lookup", "run_hf"]
