"""Measuring a :class:`~treeopt.profile.calibration.Calibration`: along the target's own greedy
continuation of each prompt, the draft's top-k candidates at every position with their
confidence and whether the target accepts them (the method is described in
``treeopt.profile.calibration``, which holds the table type and its file format)."""

from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np
import torch

from treeopt.api import encode_prompts
from treeopt.decode.drafter import Drafter
from treeopt.decode.engine import model_window
from treeopt.models.loading import eos_ids
from treeopt.profile.acceptance import target_continuation
from treeopt.profile.calibration import (
    DEFAULT_BINS,
    DEFAULT_TOPK,
    Calibration,
    CalibrationError,
    check_settings,
    from_samples,
)


def candidate_outcomes(target, draft, prompt_ids: Sequence[int], *, topk: int = DEFAULT_TOPK,
                       max_new_tokens: int = 32, eos_token_id: int | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """(confidence (T, topk) float64, accepted (T, topk) bool) at the T positions of the
    target's greedy continuation of one prompt: the draft's top-``topk`` softmax
    probabilities there and whether each candidate equals the target's token."""

    prompt_ids = [int(t) for t in prompt_ids]
    tokens, _ = target_continuation(target, prompt_ids, max_new_tokens,
                                    eos_token_id=eos_token_id)
    if not tokens:
        return np.zeros((0, topk)), np.zeros((0, topk), dtype=bool)
    device = next(draft.parameters()).device
    seq = torch.tensor([prompt_ids + tokens[:-1]], dtype=torch.int64, device=device)
    with torch.inference_mode():
        logits = draft(input_ids=seq, use_cache=False).logits[0, len(prompt_ids) - 1:]
        probs = torch.softmax(logits.float(), dim=-1)
        k = min(topk, probs.shape[-1])
        conf, idx = probs.topk(k, dim=-1)
        want = torch.tensor(tokens, dtype=torch.int64, device=device)[:, None]
        hit = idx == want
    return conf.double().cpu().numpy(), hit.cpu().numpy()


def _draft_model(draft):
    """The draft model of a model drafter, or ``draft`` itself when it is a model."""

    model = getattr(draft, "model", None) if isinstance(draft, Drafter) else draft
    if not hasattr(model, "parameters"):
        raise CalibrationError("calibration needs a draft model (early-exit:K or a model "
                               "with the target's tokenizer), not a model-free drafter")
    return model


def calibrate(target, draft, prompts: Sequence[Sequence[int]], *, topk: int = DEFAULT_TOPK,
              bins: int = DEFAULT_BINS, binning: str = "quantile", max_new_tokens: int = 32,
              latency=None, names: dict | None = None, eos_token_id: int | None = None,
              window: int | None = None,
              progress: Callable[[int, int], None] | None = None) -> Calibration:
    """Measure the confidence -> acceptance map of a draft for a target (see the module
    docstring).

    draft: a draft model or a model drafter (its ``model``). prompts: token-id sequences,
    each cut from the left so that it and its continuation fit ``window`` (default: the
    models' smallest ``max_position_embeddings``). latency: copied into the result for
    cost-aware choices. names: {"target": ..., "draft": ...} recorded in the meta.
    progress(done, total) is called after each prompt."""
    check_settings(bins, binning, topk, max_new_tokens)
    model = _draft_model(draft)
    if window is None:
        window = model_window(target, model)
    t0 = time.perf_counter()
    confs, hits = [], []
    for i, ids in enumerate(prompts):
        ids = [int(t) for t in ids]
        if window is not None and len(ids) + max_new_tokens > window:
            ids = ids[len(ids) + max_new_tokens - window:]
        if ids:
            c, h = candidate_outcomes(target, model, ids, topk=topk,
                                      max_new_tokens=max_new_tokens, eos_token_id=eos_token_id)
            confs.append(c)
            hits.append(h)
        if progress is not None:
            progress(i + 1, len(prompts))
    conf = np.concatenate(confs) if confs else np.zeros((0, topk))
    hit = np.concatenate(hits) if hits else np.zeros((0, topk), dtype=bool)
    meta = {"kind": "calibration", **(names or {}),
            "settings": {"topk": topk, "bins": bins, "binning": binning,
                         "max_new_tokens": max_new_tokens, "temperature": 0.0,
                         "continuation": "target", "confidence": "draft softmax probability "
                         "(temperature 1) of the candidate at its parent",
                         "accepted": "the candidate equals the target's greedy token"},
            "prompts": len(prompts), "positions": int(conf.shape[0]),
            "candidates": int(conf.size), "top1_accept": float(hit[:, 0].mean())
            if hit.size else 0.0,
            "seconds": round(time.perf_counter() - t0, 3),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    return from_samples(conf, hit, bins=bins, binning=binning, latency=latency, meta=meta)


def calibrate_pair(pair, prompts, *, chat_template: bool = True, **kw) -> Calibration:
    """:func:`calibrate` for a loaded ``treeopt.models.loading.Pair`` and prompts given as
    ``Prompt`` objects, text or token ids (encoded as every command encodes them; decoding
    stops at the first EOS id)."""

    if pair.drafter is None:
        raise CalibrationError("calibration needs a --draft")
    ids = encode_prompts(pair.tokenizer, prompts, chat_template)
    eos = eos_ids(pair.tokenizer, pair.target) if pair.tokenizer is not None else []
    names = {"target": pair.target_spec, "draft": pair.draft_spec}
    return calibrate(pair.target, pair.drafter, ids, eos_token_id=eos[0] if eos else None,
                     names=names, **kw)


__all__ = ["calibrate", "calibrate_pair", "candidate_outcomes"]
