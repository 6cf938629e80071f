"""The same pair in every dtype the device runs well: plain speed and the best tree's
predicted speed per dtype, so a dtype's gain and speculation's gain are seen apart.

``tune`` measures acceptance once (it does not depend much on the dtype: greedy outputs
differ only at near-ties) and latency in the dtype it ran in; :func:`compare_dtypes` times
the target (and the drafter, for model drafts) in each other dtype, searches the best tree
with the same acceptance profile and returns one :class:`DtypeRow` per dtype. ``profile
latency`` prints :func:`plain_rows`: plain decoding's speed per dtype from the short cached
curves of ``treeopt.models.dtype``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

from treeopt.decode.drafter import build_drafter
from treeopt.errors import TreeoptError, one_line
from treeopt.models.cache import cache_dir
from treeopt.models.dtype import (
    DtypeError,
    choose_by_rate,
    latency_curve,
    remember_speculative_choice,
    supported_dtypes,
)
from treeopt.models.loading import (
    load_model,
    load_tokenizer,
    resolve_device,
    resolve_spec,
)
from treeopt.profile.latency import LatencySettings, measure_latency
from treeopt.search.api import SearchSettings, search_tree
from treeopt.tuning import latency_defaults


@dataclass
class DtypeRow:
    """One dtype: plain decoding's tokens/s (1000 / t_target(1)), the best tree's predicted
    tokens/s and speed-up over plain decoding in that dtype, its size and depth, and the
    target's latency curve (tokens -> ms)."""

    dtype: str
    plain_tokens_per_s: float
    predicted_tokens_per_s: float
    speedup: float
    size: int
    depth: int
    target_ms: dict

    def line(self) -> str:
        return (f"{self.dtype}: plain {self.plain_tokens_per_s:.1f} tokens/s; best tree "
                f"{self.size} nodes, depth {self.depth}: predicted "
                f"{self.predicted_tokens_per_s:.1f} tokens/s ({self.speedup:.2f}x over plain "
                f"{self.dtype})")


def row_from(dtype: str, latency, prediction, tree) -> DtypeRow:
    curve = latency.target
    ms = {int(n): float(v) for n, v in zip(curve.tokens, curve.ms)}
    return DtypeRow(dtype, 1000.0 / prediction.plain_ms, prediction.tokens_per_s,
                    prediction.speedup, tree.size, tree.depth, ms)


def compare_dtypes(target: str, draft: str, profile, *, done: DtypeRow | None = None,
                   dtypes: Sequence[str] | None = None, device: str = "auto",
                   latency: LatencySettings | None = None,
                   search: SearchSettings | None = None,
                   notes: list[str] | None = None, replayed=None) -> list[DtypeRow]:
    """One row per dtype in ``dtypes`` (default: those the device supports well); the row of
    the dtype already tuned is ``done`` (not measured again). Each other dtype loads the
    target afresh (and builds ``draft`` on it), times its latency with ``latency`` (unset
    fields by device) and searches the best tree for ``profile``'s acceptance with that
    latency under ``search``; with ``replayed`` (``tune``'s greedy replay of a model-free
    drafter, ``treeopt.profile.replay``) the replayed configurations are priced with that
    latency instead and the fastest kept. A dtype the pair cannot run (a draft model with
    another vocabulary, say) is left out, with one line in ``notes`` saying why."""
    dev = resolve_device(device)
    lat = latency or LatencySettings()
    rows = [done] if done is not None else []
    tokenizer = load_tokenizer(target)
    for dtype in dtypes or supported_dtypes(dev):
        if done is not None and dtype == done.dtype:
            continue
        try:
            model = load_model(target, dtype=dtype, device=dev)
            drafter = build_drafter(draft, target=model, tokenizer=tokenizer)
        except TreeoptError as exc:
            if notes is not None:
                notes.append(f"{dtype}: not compared ({one_line(exc)})")
            continue
        kw, _ = latency_defaults(dev, tokens=lat.tokens, context=lat.context,
                                 repeats=lat.repeats, warmup=lat.warmup)
        measured = measure_latency(model, drafter, **kw)
        if replayed is not None:  # a model-free drafter: its replayed steps, repriced
            label, pred = replayed.best_under(measured)
            rows.append(row_from(dtype, measured, pred, replayed.shape_for(label, pred)))
        else:
            found = search_tree(dataclasses.replace(profile, latency=measured),
                                search=search or SearchSettings())
            rows.append(row_from(dtype, measured, found.prediction, found.tree))
        del model, drafter
    return rows


def parse_dtypes(text: str | None, device: str = "auto") -> list[str]:
    """``--dtypes``: "auto" (every dtype the device runs well), "none" (no comparison) or a
    comma-separated list."""
    text = (text or "auto").strip().lower()
    if text == "none":
        return []
    if text == "auto":
        return supported_dtypes(resolve_device(device))
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in names if x not in ("float32", "bfloat16", "float16")]
    if bad or not names:
        raise DtypeError(f"--dtypes {text!r}: give auto, none or a list of float32, bfloat16, "
                         "float16")
    return names


def auto_pick(rows: Sequence[DtypeRow]) -> str:
    """The dtype these rows predict fastest for speculative decoding (their best
    configuration's tokens/s; float32 within 2 %): what ``--dtype auto`` means once
    :func:`remember_pick` has cached it."""
    return choose_by_rate(_rates(rows))


def remember_pick(target: str, draft: str, rows: Sequence[DtypeRow], device: str = "auto"
                  ) -> str | None:
    """Make :func:`auto_pick` of ``rows`` what ``--dtype auto`` means for ``target`` on this
    machine (``treeopt.models.dtype.remember_speculative_choice``); None when the rows do not
    cover every dtype the device runs well (the cached plain measurement then stays)."""
    return remember_speculative_choice(resolve_spec(target), _rates(rows), draft=draft,
                                       device=resolve_device(device), folder=cache_dir())


def _rates(rows: Sequence[DtypeRow]) -> dict[str, float]:
    """dtype -> predicted tokens/s of its best configuration."""
    return {r.dtype: r.predicted_tokens_per_s for r in rows}


def plain_rows(target: str, device: str = "auto", dtypes: Sequence[str] | None = None,
               loaded=None) -> dict[str, dict[int, float]]:
    """dtype -> the target's short latency curve (``treeopt.models.dtype``; cached);
    ``loaded``: the target already loaded in one of the dtypes (not loaded again)."""
    dev = resolve_device(device)
    out = {}
    have = None if loaded is None else str(next(loaded.parameters()).dtype).removeprefix(
        "torch.")
    for dtype in dtypes or supported_dtypes(dev):
        if dtype == have:
            out[dtype] = latency_curve(loaded, cache_dir())
            continue
        model = load_model(target, dtype=dtype, device=dev)
        out[dtype] = latency_curve(model, cache_dir())
        del model
    return out


__all__ = ["DtypeRow", "auto_pick", "compare_dtypes", "parse_dtypes", "plain_rows",
           "remember_pick", "row_from"]
