"""Measuring copy-aware acceptance (``treeopt.profile.copytable``) of a copy drafter.

Both measurements let the drafter propose its *largest* candidate tree at every step (a chain
of ``max_tokens`` drafted tokens for ``ngram``; ``suffix``'s best-first tree of that many nodes
with no per-step cut), so that deep rows are measured wherever copies run that long, and count
every node whose parent was accepted (a trial) and whether it was accepted itself:

- ``online``: along real decoding: the engine verifies each proposal and the drafter records
  the accepted path in ``update`` (:func:`online_table`). What decoding sees, at the cost of
  verifying the large trees.
- ``teacher-forced``: along the target's own greedy continuation of each prompt: at every
  position the drafter proposes after the text so far and the accepted path is the greedy
  walk along the continuation (:func:`teacher_forced_table`); one target pass per prompt.
  Every position starts a step here (decoding starts steps only after a rejection), which
  gives more trials; the features condition on what distinguishes those positions.

At temperature 0 both count the same event (a node equals the target's argmax after an
accepted path); with sampling, use ``online``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Sequence

import torch

from treeopt.api import encode_for_decoding
from treeopt.decode.drafter import Drafter, respec
from treeopt.decode.engine import generate
from treeopt.decode.sampling import GREEDY, Sampling
from treeopt.drafters.copylen import StepSizer
from treeopt.drafters.ngram import AUTO_SHAPE, NgramDrafter
from treeopt.drafters.suffix import SuffixDrafter
from treeopt.errors import TreeoptError
from treeopt.models.loading import eos_ids
from treeopt.profile.acceptance import target_continuation
from treeopt.profile.copytable import CopyTable, CopyTableError, read_document
from treeopt.profile.model import JSON_FORMAT, JSON_VERSION, write_json_atomic
from treeopt.tree import Tree

DEFAULT_MAX_TOKENS = 32
MODES = ("online", "teacher-forced")


class CopyProfileError(TreeoptError, ValueError):
    """A copy-acceptance measurement that cannot run; one line."""


def is_copy_drafter(drafter) -> bool:
    """Whether ``drafter`` reports copy features (``ngram`` and ``suffix``)."""
    return isinstance(drafter, (NgramDrafter, SuffixDrafter))


def measuring_copy(drafter: Drafter, max_tokens: int, table: CopyTable) -> Drafter:
    """A copy of ``drafter`` that proposes its largest tree every step (``max_tokens``
    drafted tokens at most, no per-step cut) and records into ``table``."""
    if isinstance(drafter, NgramDrafter):
        new = drafter.reshaped(Tree(tuple(range(-1, max_tokens))))
        new.sizer = None
    elif isinstance(drafter, SuffixDrafter):
        new = copy.copy(drafter)
        new.shape, new.sizer, new.length = None, None, "alpha"
        new.max_tokens, new.alpha, new.offset = max_tokens, 0.0, float(max_tokens)
        new.request = type(drafter.request)(drafter.depth)
        new._seen, new._prompt_len, new.last_draft = [], 0, None
        if new.cache is not None:  # it may hold these prompts' outputs already (profiled)
            new.cache = new.cache.empty_copy()
    else:
        raise CopyProfileError(f"copy-acceptance tables are measured for ngram and suffix "
                               f"drafters, not {getattr(drafter, 'name', type(drafter).__name__)}")
    new.recorder = table
    return new


def online_table(target, drafter: Drafter, prompts: Sequence[Sequence[int]], *,
                 max_new_tokens: int = 64, sampling: Sampling = GREEDY,
                 eos_token_id: int | None = None,
                 max_tokens: int = DEFAULT_MAX_TOKENS) -> CopyTable:
    """Counts along real decoding of every prompt (token id lists)."""
    table = CopyTable(mode="online")
    d = measuring_copy(drafter, max_tokens, table)
    device = next(target.parameters()).device
    for ids in prompts:
        generate(target, d, torch.tensor([list(ids)], dtype=torch.int64, device=device),
                 max_new_tokens=max_new_tokens, sampling=sampling, eos_token_id=eos_token_id)
    table.meta.update(prompts=len(prompts), max_new_tokens=max_new_tokens,
                      max_tokens=max_tokens, drafter=repr(drafter),
                      temperature=sampling.temperature)
    return table


def greedy_path(parents: Sequence[int], tokens: Sequence[int], truth: Sequence[int]) -> list[int]:
    """Accepted node ids (root first) of a tree whose depth-i nodes are checked against
    ``truth[i - 1]``: the greedy walk along a known continuation."""
    kids: dict[int, list[int]] = {}
    for v in range(1, len(parents)):
        kids.setdefault(parents[v], []).append(v)
    path, u = [0], 0
    while len(path) - 1 < len(truth):
        nxt = next((v for v in kids.get(u, ()) if tokens[v] == truth[len(path) - 1]), None)
        if nxt is None:
            break
        path.append(nxt)
        u = nxt
    return path


def teacher_forced_table(target, drafter: Drafter, prompts: Sequence[Sequence[int]], *,
                         max_new_tokens: int = 64, eos_token_id: int | None = None,
                         max_tokens: int = DEFAULT_MAX_TOKENS) -> CopyTable:
    """Counts at every position of the target's greedy continuation of each prompt."""
    table = CopyTable(mode="teacher-forced")
    d = measuring_copy(drafter, max_tokens, table)
    device = next(target.parameters()).device
    for ids in prompts:
        ids = [int(t) for t in ids]
        cont, _ = target_continuation(target, ids, max_new_tokens, eos_token_id=eos_token_id)
        d.start(torch.tensor([ids], dtype=torch.int64, device=device))
        for t in range(1, len(cont)):
            committed = ids + cont[:t]
            proposal = d.propose(committed, len(cont) - t, GREEDY)
            path = greedy_path(proposal.tree.parents, proposal.tokens.tolist(), cont[t:])
            d.update(path, committed)
    table.meta.update(prompts=len(prompts), max_new_tokens=max_new_tokens,
                      max_tokens=max_tokens, drafter=repr(drafter), temperature=0.0)
    return table


def measure_copy(target, drafter: Drafter, prompts: Sequence[Sequence[int]], *,
                 mode: str = "online", **kw) -> CopyTable:
    """The copy table of ``drafter`` by ``mode`` ("online" or "teacher-forced")."""
    if mode not in MODES:
        raise CopyProfileError(f"unknown copy-table mode {mode!r}; use online or "
                               "teacher-forced")
    fn = online_table if mode == "online" else teacher_forced_table
    if mode == "teacher-forced":
        kw.pop("sampling", None)
    return fn(target, drafter, prompts, **kw)


def write_copy_table(table: CopyTable, path: str | Path, merge: bool = False) -> Path:
    """Store ``table`` as the ``"copy"`` section of the profile JSON ``path`` (created when
    missing; other sections kept). ``merge``: add the counts of a table already there."""
    path = Path(path)
    doc = {"format": JSON_FORMAT, "version": JSON_VERSION, "meta": {}}
    if path.exists():
        doc = read_document(path)
        if doc.get("format") != JSON_FORMAT:
            raise CopyTableError(f"{path}: not a treeopt profile; refusing to write into it")
    if merge and doc.get("copy") is not None:
        table = CopyTable.from_dict(doc["copy"]).merge(table)
    doc["copy"] = table.to_dict()
    return write_json_atomic(path, doc)


def sizing_copy(drafter: Drafter, table: CopyTable, verify_ms, max_tokens: int | None = None
                ) -> Drafter:
    """A copy of ``drafter`` (``ngram`` or ``suffix``) that sizes every step from ``table``
    and the verification cost ``verify_ms`` (n -> ms, non-decreasing), drafting at most
    ``max_tokens`` tokens a step (default: the drafter's own most): what the drafter spec
    ``DRAFT:len=auto,table=PROFILE`` builds (``ngram`` over a chain of ``max_tokens``,
    ``suffix`` with ``max=``), made from objects in memory."""
    if isinstance(drafter, NgramDrafter):
        shape = AUTO_SHAPE if max_tokens is None else Tree(tuple(range(-1, max_tokens)))
        new = drafter.reshaped(shape)
        new.sizer = StepSizer(table, verify_ms, shape.size)
    elif isinstance(drafter, SuffixDrafter):
        new = drafter.reshaped(None)
        new.length = "auto"
        if max_tokens is not None:
            new.max_tokens = min(new.max_tokens, int(max_tokens))
        new.sizer = StepSizer(table, verify_ms, new.max_tokens + 1)
    else:
        raise CopyProfileError(f"per-step lengths from a copy table are for ngram and suffix "
                               f"drafters, not {getattr(drafter, 'name', type(drafter).__name__)}")
    new.recorder = None
    return new


def len_auto_spec(draft: str, table_path: str | Path, **extra) -> str:
    """The drafter spec ``draft`` (``ngram``, ``suffix:max=24``, ...) with per-step lengths
    from the copy table in ``table_path`` and the options ``extra`` (replacing the given
    ones): ``ngram:len=auto,table=PATH``."""
    return respec(draft, latency=None, **extra, len="auto", table=table_path)


def tune_copy_table(pair, prompts, run, out: str | Path | None = None
                    ) -> tuple[CopyTable, dict] | None:
    """For a copy drafter (``ngram``, ``suffix``): its copy table measured online on
    ``prompts`` under ``run``'s sampling and length (an ``AcceptanceRun``), written into the
    profile ``out`` (when given), with its summary for ``tune``'s summary (None for other
    drafters). The summary names the drafter spec that uses it: ``DRAFT:len=auto,table=OUT``."""
    if not is_copy_drafter(pair.drafter):
        return None
    ids = encode_for_decoding(pair, prompts, run.chat_template, run.max_new_tokens)
    eos = eos_ids(pair.tokenizer, pair.target) if pair.tokenizer is not None else []
    sampling = Sampling(run.temperature, run.top_k, run.top_p, run.rule, run.seed)
    table = online_table(pair.target, pair.drafter, ids, max_new_tokens=run.max_new_tokens,
                         sampling=sampling, eos_token_id=eos[0] if eos else None)
    table.meta.update(draft=run.draft, target=run.target, dataset=run.dataset)
    summary = {"summary": table.summary(), "trials": table.total_trials,
               "by_depth": [list(row) for row in table.by_depth(1)]}
    if out is not None:
        write_copy_table(table, out)
        given = str(run.draft)
        name = pair.drafter.name
        summary["draft_spec"] = len_auto_spec(given if given.split(":")[0] == name else name,
                                              out)
    return table, summary


__all__ = ["CopyProfileError", "greedy_path", "is_copy_drafter", "len_auto_spec", "measure_copy",
           "measuring_copy", "online_table", "sizing_copy", "teacher_forced_table",
           "tune_copy_table", "write_copy_table"]
