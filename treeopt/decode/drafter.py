"""The drafter interface: anything that proposes a token tree for the target to verify.

The engine knows a target, one :class:`Drafter` and one :class:`~treeopt.decode.sampling.
Sampling`. Each step it asks the drafter for a :class:`Proposal` (a tree shape, its tokens and,
for drafters that have them, the draft distributions the stochastic rules need), verifies it
in one target forward, and tells the drafter what was accepted (``update``), where adaptive
drafters learn and model drafters compact their own cache. This mirrors Hugging Face's
``get_candidates`` / ``update_candidate_strategy`` split.

A proposal may differ from step to step: fewer nodes when a drafter has fewer candidates, and
size 1 (the root alone) when it has none: that step is then plain decoding, with no draft work.

Drafters are chosen by spec strings (``"ngram"``, ``"ngram:min=1,max=4,k=8"``,
``"datastore:PATH"``, ``"early-exit:4"``, a model id or folder, ...): a module that defines a
drafter registers a factory under its name with :func:`register_drafter`, and
:func:`build_drafter` turns a spec into a drafter. Anything that is not a registered name is a
model spec, drafted by :class:`~treeopt.drafters.model.ModelDrafter`.

Writing a drafter (see the README for a complete example)::

    class EchoDrafter(Drafter):
        name = "echo"

        def propose(self, committed, max_depth, sampling, generator=None):
            if max_depth < 1:
                return root_only(committed)
            return Proposal(Tree((-1, 0)), torch.tensor([committed[-1], committed[-1]]))

    @register_drafter("echo", "proposes the last token again")
    def _echo(options, *, target, tokenizer, tree):
        return EchoDrafter()
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from treeopt.decode.sampling import Sampling
from treeopt.errors import TreeoptError, one_line
from treeopt.limits import quote
from treeopt.tree import Tree

ROOT_ONLY = Tree((-1,))
# What model-free drafters fill at most by default: a chain of 3 drafted tokens (4 nodes). On
# the CPU this was measured on, verifying 4 tokens with packed oneDNN weights costs about 1.15x
# one token; over Spec-Bench it was never slower than plain decoding (README, drafters table).
DEFAULT_CANDIDATE_SHAPE = Tree((-1, 0, 1, 2))
# Longest drafter spec, in characters: a file path (up to 4096 bytes on Linux) and a few
# levels of nested specs fit; a longer spec is refused before it is parsed.
MAX_SPEC_CHARS = 8192
# Deepest nesting of specs (parentheses, or a drafter built inside a drafter): cascades
# need two or three levels.
MAX_SPEC_DEPTH = 8


class DrafterError(TreeoptError, ValueError):
    """A drafter spec or option that cannot be used; the message says what to change."""


@dataclass
class Proposal:
    """One step's draft.

    tree:    the proposed shape (size 1 = nothing proposed: a plain decoding step).
    tokens:  (size,) int64 tree tokens on the target's device, node 0 = the root (the last
             committed token).
    q:       per depth d, (e_d, V) float32 processed draft probabilities of the nodes at depth
             d that have children (the distributions their children were drawn from), or
             None for a drafter without distributions (greedy mode, or a deterministic
             drafter: stochastic verification then treats every child as a point mass).
    q_row:   (size,) row of node v in ``q[depth(v)]`` (-1 for nodes without children), or
             None with ``q``.
    forwards: draft-model forwards spent on this proposal (0 for model-free drafters).
    fixed_shape: True when ``tree`` comes from a small fixed set of shapes (a growmap and its
             truncations), so its verification buffers are worth caching. The default,
             False, builds them fresh (vectorised) each step: always correct, and safe for a
             drafter that makes a new tree every step and forgets to say so.
    """

    tree: Tree
    tokens: torch.Tensor
    q: Sequence[torch.Tensor] | None = None
    q_row: Sequence[int] | None = None
    forwards: int = 0
    fixed_shape: bool = False

    def q_at(self, node: int) -> torch.Tensor | None:
        """(V,) draft distribution the children of ``node`` were drawn from, or None (no
        distributions, or a node without children)."""
        if self.q is None or self.q_row is None or self.q_row[node] < 0:
            return None
        return self.q[self.tree.depths[node]][self.q_row[node]]

    @property
    def drafted(self) -> int:
        """Speculated tokens (nodes other than the root)."""
        return self.tree.size - 1


def root_only(committed: Sequence[int], device: torch.device | str = "cpu") -> Proposal:
    """The empty proposal: the root alone (the step is plain decoding)."""
    return Proposal(ROOT_ONLY, torch.tensor([int(committed[-1])], dtype=torch.int64,
                                            device=device), fixed_shape=True)


def proposal_from_paths(committed: Sequence[int], children: Callable[[tuple[int, ...]],
                        Sequence[int]], shape: Tree, max_depth: int,
                        device: torch.device | str = "cpu") -> Proposal:
    """Fill ``shape`` with candidates, keeping only the nodes that have one.

    ``children(path_tokens)`` returns the ranked distinct candidate tokens after
    ``committed + path_tokens`` (path_tokens: the tokens from the root's first child down to
    a node, ``()`` at the root). Node v of ``shape`` is kept when its parent is kept, its
    depth is <= ``max_depth`` and the parent has at least rank(v) candidates; the kept nodes
    form a tree (ranks are consecutive from 1), renumbered breadth-first. Returns a
    ``Proposal`` without distributions and with ``fixed_shape=False``.
    """
    parents = [-1]
    tokens = [int(committed[-1])]
    paths: list[tuple[int, ...]] = [()]
    kept = {0: 0}  # shape node -> proposal node
    cands: dict[int, Sequence[int]] = {}
    for v in range(1, shape.size):
        u = shape.parents[v]
        if u not in kept or shape.depths[v] > max_depth:
            continue
        pu = kept[u]
        if pu not in cands:
            cands[pu] = children(paths[pu])
        rank = shape.ranks[v]
        if rank > len(cands[pu]):
            continue
        tok = int(cands[pu][rank - 1])
        kept[v] = len(parents)
        parents.append(pu)
        tokens.append(tok)
        paths.append(paths[pu] + (tok,))
    return Proposal(Tree(tuple(parents)), torch.tensor(tokens, dtype=torch.int64,
                                                       device=device), fixed_shape=False)


class Drafter:
    """Base class of every drafter. Subclasses implement ``propose``; ``start`` and
    ``update`` default to doing nothing.

    ``shape`` / ``reshaped``: the tree a drafter drafts, and a copy with another one.
    ``wants_target_topk``: a drafter that learns from the target's own predictions (NASD's
    top-k filler) sets it to k > 0; ``update`` then receives the target's top-k tokens at
    every node of the accepted path.
    """

    name = "drafter"
    wants_target_topk = 0
    #: The tree this drafter drafts (model drafters) or fills at most (candidate drafters);
    #: None for drafters that choose their own shape every step.
    shape: Tree | None = None

    def reshaped(self, shape: Tree) -> "Drafter":
        """A copy drafting ``shape`` instead (models and stores are shared, not copied)."""
        if self.shape is None:
            raise DrafterError(f"the {self.name} drafter chooses its own tree; it takes no "
                               "tree shape")
        new = copy.copy(self)
        new.shape = shape
        return new

    def forked(self) -> "Drafter":
        """A copy for an independent run: the same shape, models and stores shared, and its
        own copy of whatever it keeps across requests (a global suffix trie, online
        statistics), so that what the copy decodes never reaches this drafter. Each method of
        an eval run, and its warm-up, decodes with one (``treeopt.evaluate.runner``)."""
        return self.reshaped(self.shape) if self.shape is not None else copy.copy(self)

    def check(self, target) -> None:
        """Raise DrafterError (or DecodeError) when this drafter cannot draft for ``target``."""

    def start(self, prompt_ids: torch.Tensor) -> None:
        """A new generation begins with the prompt ``prompt_ids`` (1, L) int64 (on the
        target's device). Model drafters prefill their cache here."""

    def propose(self, committed: Sequence[int], max_depth: int, sampling: Sampling,
                generator: torch.Generator | None = None) -> Proposal:
        """The tree to verify after ``committed`` (prompt + generated tokens; its last token
        is the root). The tree may be at most ``max_depth`` deep (0: propose the root
        alone). ``sampling``: the run's settings; ``generator``: its random stream."""
        raise NotImplementedError

    def choice(self) -> str:
        """One line saying what this drafter chose in the last generation ("" when it chooses
        nothing: a fixed drafter). The engine copies it into ``DecodeStats.choice``."""
        return ""

    def update(self, path: Sequence[int], committed: Sequence[int],
               target_topk: torch.Tensor | None = None) -> None:
        """After verification: ``path`` are the accepted node ids of the last proposal (from
        the root, root included), ``committed`` the committed tokens now (the accepted
        tokens and the bonus appended). ``target_topk``: (len(path), k) int64 target top-k
        tokens at the path's nodes, when ``wants_target_topk`` asked for them."""


# ---------------------------------------------------------------------------- registry
Factory = Callable[..., Drafter]


@dataclass
class DrafterEntry:
    """A registered drafter: its spec ``name``, a one-line ``description`` for help texts,
    its ``factory``, whether its options are a file path, and the ``spec_form`` messages
    show (default ``name``, or ``name:PATH`` when it takes a path)."""

    name: str
    description: str
    factory: Factory
    takes_path: bool = False
    spec_form: str = ""

    def form(self) -> str:
        return self.spec_form or (f"{self.name}:PATH" if self.takes_path else self.name)


_REGISTRY: dict[str, DrafterEntry] = {}
_loaded = False


def register_drafter(name: str, description: str, *, takes_path: bool = False,
                     spec_form: str = ""):
    """Decorator registering ``factory(options, *, target, tokenizer, tree) -> Drafter``
    under ``name``. ``options`` is the text after ``name:`` in the spec ("" when none);
    ``takes_path``: the options are a file path (``datastore:PATH``) rather than
    ``key=value`` pairs; ``spec_form``: how messages show the spec (e.g. ``early-exit:K``)."""

    def deco(factory: Factory) -> Factory:
        _REGISTRY[name.lower()] = DrafterEntry(name.lower(), description, factory, takes_path,
                                               spec_form)
        return factory

    return deco


def registered() -> dict[str, DrafterEntry]:
    """Every registered drafter by name. On first use this imports treeopt's drafter modules,
    then third-party ones: the modules named in ``$TREEOPT_DRAFTERS`` (comma-separated module
    names, found on ``sys.path`` or as ``NAME.py`` in the working folder, or ``.py`` file
    paths) and the entry points of the group ``treeopt.drafters`` (a module importing
    registers)."""
    global _loaded
    if not _loaded:
        _loaded = True
        # treeopt's own drafters (importing the package registers every one). The interface
        # never imports an implementation: the registry loads them on the first look-up as
        # it loads third-party drafter modules (the one deliberate upward import here).
        importlib.import_module("treeopt.drafters")
        for module in filter(None, (m.strip() for m in
                                    os.environ.get("TREEOPT_DRAFTERS", "").split(","))):
            _load_plugin(f"{quote(module)} (TREEOPT_DRAFTERS)",
                         lambda module=module: _import_plugin(module))
        try:
            from importlib.metadata import entry_points

            points = list(entry_points(group="treeopt.drafters"))
        except Exception as exc:  # noqa: BLE001 - broken installed metadata
            points = []
            _disable("entry points of treeopt.drafters", f"{type(exc).__name__}: "
                     f"{one_line(exc, 160)}")
        for ep in points:
            _load_plugin(f"{quote(ep.name)} (entry point {quote(ep.value)})", ep.load)
    return dict(_REGISTRY)


def _import_plugin(name: str) -> None:
    """Import one ``$TREEOPT_DRAFTERS`` entry: a file path (``mydrafters.py``,
    ``plugins/x.py``), a module on ``sys.path``, or else a module file in the working folder
    (``mydrafters`` for ``./mydrafters.py``: the ``treeopt`` script does not put the working
    folder on ``sys.path`` as ``python -m`` does)."""
    path = Path(name).expanduser()
    if name.endswith(".py") or os.sep in name or "/" in name:
        if not path.is_file():
            raise ImportError(f"no such file {name!r}")
        _import_file(path.stem, path)
        return
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as exc:
        local = Path.cwd() / f"{name}.py"
        if exc.name != name or not name.isidentifier() or not local.is_file():
            raise
        _import_file(name, local)


def _import_file(name: str, path: Path) -> None:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{str(path)!r} is not a Python module file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
#: Seconds a third-party drafter module may take to load (``$TREEOPT_PLUGIN_TIMEOUT_S``).
PLUGIN_TIMEOUT_S = 30.0
#: Plugins that failed to load and were disabled: what names them -> why, one line.
FAILED_PLUGINS: dict[str, str] = {}


def _plugin_timeout() -> float:
    try:
        return max(0.01, float(os.environ.get("TREEOPT_PLUGIN_TIMEOUT_S", PLUGIN_TIMEOUT_S)))
    except ValueError:
        return PLUGIN_TIMEOUT_S


def _load_plugin(label: str, load: Callable[[], Any]) -> None:
    """Run ``load`` (a plugin's import) guarded: any exception, or not returning within
    :func:`_plugin_timeout` seconds, disables the plugin (whatever it registered is taken
    back) with one warning line; treeopt's own drafters keep working. A plugin that never
    returns is left running in a daemon thread (Python cannot stop an import)."""
    before = dict(_REGISTRY)
    outcome: dict[str, BaseException] = {}

    def run() -> None:
        try:
            load()
        except BaseException as exc:  # noqa: BLE001 - SystemExit too: a plugin must not exit
            outcome["error"] = exc

    thread = threading.Thread(target=run, name="treeopt-drafter-plugin", daemon=True)
    thread.start()
    timeout = _plugin_timeout()
    thread.join(timeout)
    if thread.is_alive():
        reason = f"did not finish loading within {timeout:g} s (TREEOPT_PLUGIN_TIMEOUT_S)"
    elif "error" in outcome:
        exc = outcome["error"]
        reason = f"{type(exc).__name__}: {one_line(exc, 160)}"
    else:
        return
    _REGISTRY.clear()
    _REGISTRY.update(before)
    _disable(label, reason)


def _disable(label: str, reason: str) -> None:
    FAILED_PLUGINS[label] = reason
    print(f"treeopt: warning: drafter plugin {label} disabled: {reason}", file=sys.stderr)


def check_spec(text: str, drafter: str = "") -> str:
    """``text`` if it is at most :data:`MAX_SPEC_CHARS` long and its parentheses nest at
    most :data:`MAX_SPEC_DEPTH` deep (one linear pass), else a one-line DrafterError naming
    the limit."""
    where = f"drafter {quote(drafter)}: " if drafter else ""
    if len(text) > MAX_SPEC_CHARS:
        raise DrafterError(f"{where}spec of {len(text)} characters, more than the limit "
                           f"{MAX_SPEC_CHARS} (MAX_SPEC_CHARS): {quote(text)}")
    depth = deepest = 0
    for ch in text:
        if ch == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif ch == ")":
            depth -= 1
    if deepest > MAX_SPEC_DEPTH:
        raise DrafterError(f"{where}spec nested {deepest} levels deep, more than the limit "
                           f"{MAX_SPEC_DEPTH} (MAX_SPEC_DEPTH): {quote(text)}")
    return text


def split_spec(spec: str) -> tuple[DrafterEntry | None, str]:
    """(registered entry, option text) for a spec, or (None, spec) for a model spec."""
    text = check_spec(str(spec).strip())
    name, _, options = text.partition(":")
    entry = registered().get(name.strip().lower())
    if entry is None:
        return None, text
    return entry, options.strip()


def split_options(text: str, drafter: str) -> list[str]:
    """``"a=1,b=(x:y=2,z=3)"`` -> ["a=1", "b=(x:y=2,z=3)"]: the comma-separated parts of an
    option text, where commas inside parentheses do not split (a nested drafter spec with
    options of its own is wrapped in parentheses). Unbalanced parentheses, or text past the
    spec limits (:func:`check_spec`), raise DrafterError."""
    check_spec(text, drafter)
    parts: list[str] = []
    depth, start = 0, 0
    for i, ch in enumerate(text):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise DrafterError(f"drafter {quote(drafter)}: unbalanced ')' at character "
                                   f"{i + 1} of {quote(text)}; wrap a nested spec as key=(SPEC)")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise DrafterError(f"drafter {quote(drafter)}: {depth} unclosed '(' in {quote(text)}; "
                           "wrap a nested spec as key=(SPEC)")
    parts.append(text[start:])
    return [x.strip() for x in parts if x.strip()]


def respec(spec: str, **options) -> str:
    """``spec`` (``NAME`` or ``NAME:OPTIONS``) with ``options`` set, replacing given values in
    place of the old ones at the end; a None value removes that option:
    ``respec("suffix:max=24,alpha=1", alpha=2, max=None) == "suffix:alpha=2"``."""
    name, sep, text = str(spec).strip().partition(":")
    kept = [o for o in (split_options(text, name) if sep else [])
            if o.split("=", 1)[0].strip() not in options]
    kept += [f"{k}={v}" for k, v in options.items() if v is not None]
    return name + (":" + ",".join(kept) if kept else "")


def unwrap(value: str) -> str:
    """``"(SPEC)"`` -> ``"SPEC"`` when the outer parentheses enclose the whole value (repeated
    for ``((SPEC))``); anything else is returned stripped, unchanged. Linear: the nesting is
    checked against :data:`MAX_SPEC_DEPTH` first, so at most that many passes are made."""
    value = check_spec(value.strip())
    while value.startswith("(") and value.endswith(")"):
        depth = 0
        for i, ch in enumerate(value):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0 and i < len(value) - 1:
                return value  # "(a),(b)": the first ')' closes before the end
        value = value[1:-1].strip()
    return value


def parse_options(text: str, allowed: dict[str, type], drafter: str) -> dict[str, Any]:
    """``"min=1,max=4,k=8"`` -> {"min": 1, "max": 4, "k": 8}, typed by ``allowed``
    (name -> int/float/bool/str); an unknown or malformed option raises DrafterError.

    A value may be wrapped in parentheses so that it can hold commas, colons and ``=``:
    ``first=(ngram:max=3,k=8),then=early-exit:4`` gives first="ngram:max=3,k=8" (the outer
    parentheses are removed; a nested drafter spec is a ``str`` option). Unbalanced
    parentheses raise DrafterError."""
    out: dict[str, Any] = {}
    for part in split_options(text, drafter):
        key, eq, value = part.partition("=")
        key = key.strip().lower()
        if not eq or key not in allowed:
            names = ", ".join(f"{k}=" for k in allowed) or "none"
            raise DrafterError(f"drafter {quote(drafter)}: bad option {quote(part)}; "
                               f"options: {names}")
        kind = allowed[key]
        value = unwrap(value)
        try:
            if kind is bool:
                if value.lower() not in ("0", "1", "true", "false", "yes", "no"):
                    raise ValueError
                out[key] = value.lower() in ("1", "true", "yes")
            else:
                out[key] = kind(value)
        except ValueError:
            raise DrafterError(f"drafter {quote(drafter)}: option {key}={quote(value)} must be "
                               f"of type {kind.__name__}") from None
    return out


def build_drafter(spec: str | Drafter | None, *, target, tokenizer=None,
                  tree: Tree | None = None) -> Drafter | None:
    """A drafter from a spec: None / "none" / "ar" -> None (plain decoding); a registered
    name with its options; otherwise a model spec (a folder, a .gguf file, a hub id, or
    "early-exit:K") drafted over ``tree`` by a ModelDrafter. A Drafter is returned as is."""
    if spec is None or isinstance(spec, Drafter):
        return spec
    text = str(spec).strip()
    if text.lower() in ("", "none", "ar"):
        return None
    entry, options = split_spec(text)
    if entry is None:
        name, colon, _ = text.partition(":")
        if colon and name.isidentifier() and not os.path.exists(text):
            raise DrafterError(f"unknown drafter {quote(name)} in {quote(text)}; drafters: "
                               f"{known_names()}, or a model spec")
        entry, options = registered()["model"], text
    depth = getattr(_building, "depth", 0)
    if depth >= MAX_SPEC_DEPTH:
        raise DrafterError(f"drafter specs nested more than {MAX_SPEC_DEPTH} levels deep "
                           f"(MAX_SPEC_DEPTH) at {quote(text)}; a cascade needs two or three")
    _building.depth = depth + 1
    try:
        return entry.factory(options, target=target, tokenizer=tokenizer, tree=tree)
    finally:
        _building.depth = depth


# How deep build_drafter is in building drafters inside drafters, per thread.
_building = threading.local()


def known_names() -> str:
    """The registered drafter spec forms, for error messages."""
    return ", ".join(e.form() for e in registered().values() if e.name != "model")


def describe_drafters() -> str:
    """One line per registered drafter, for help texts."""
    return "; ".join(f"{e.name}: {e.description}" for e in registered().values()
                     if e.name != "model")


__all__ = ["Drafter", "DrafterError", "Proposal", "ROOT_ONLY", "build_drafter",
           "check_spec", "describe_drafters", "parse_options", "proposal_from_paths", "register_drafter",
           "registered", "root_only", "split_options", "split_spec", "unwrap"]
