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
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from treeopt.decode.sampling import Sampling
from treeopt.errors import TreeoptError
from treeopt.tree import Tree

ROOT_ONLY = Tree((-1,))
# What model-free drafters fill at most by default: a chain of 3 drafted tokens (4 nodes). On
# the CPU this was measured on, verifying 4 tokens with packed oneDNN weights costs about 1.15x
# one token; over Spec-Bench it was never slower than plain decoding (README, drafters table).
DEFAULT_CANDIDATE_SHAPE = Tree((-1, 0, 1, 2))


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
    then third-party ones: the modules named in ``$TREEOPT_DRAFTERS`` (comma-separated) and
    the entry points of the group ``treeopt.drafters`` (a module importing registers)."""
    global _loaded
    if not _loaded:
        _loaded = True
        # treeopt's own drafters (importing the package registers every one). The interface
        # never imports an implementation: the registry loads them on the first look-up as
        # it loads third-party drafter modules (the one deliberate upward import here).
        importlib.import_module("treeopt.drafters")
        for module in filter(None, (m.strip() for m in
                                    os.environ.get("TREEOPT_DRAFTERS", "").split(","))):
            try:
                importlib.import_module(module)
            except ImportError as exc:
                raise DrafterError(f"TREEOPT_DRAFTERS names {module!r}, which cannot be "
                                   f"imported ({exc}); fix the name or PYTHONPATH") from None
        from importlib.metadata import entry_points

        for ep in entry_points(group="treeopt.drafters"):
            ep.load()
    return dict(_REGISTRY)


def split_spec(spec: str) -> tuple[DrafterEntry | None, str]:
    """(registered entry, option text) for a spec, or (None, spec) for a model spec."""
    text = str(spec).strip()
    name, _, options = text.partition(":")
    entry = registered().get(name.strip().lower())
    if entry is None:
        return None, text
    return entry, options.strip()


def split_options(text: str, drafter: str) -> list[str]:
    """``"a=1,b=(x:y=2,z=3)"`` -> ["a=1", "b=(x:y=2,z=3)"]: the comma-separated parts of an
    option text, where commas inside parentheses do not split (a nested drafter spec with
    options of its own is wrapped in parentheses). Unbalanced parentheses raise
    DrafterError."""
    parts: list[str] = []
    depth, start = 0, 0
    for i, ch in enumerate(text):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise DrafterError(f"drafter {drafter!r}: unbalanced ')' at character {i + 1} "
                                   f"of {text!r}; wrap a nested spec as key=(SPEC)")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise DrafterError(f"drafter {drafter!r}: {depth} unclosed '(' in {text!r}; wrap a "
                           "nested spec as key=(SPEC)")
    parts.append(text[start:])
    return [x.strip() for x in parts if x.strip()]


def unwrap(value: str) -> str:
    """``"(SPEC)"`` -> ``"SPEC"`` when the outer parentheses enclose the whole value (repeated
    for ``((SPEC))``); anything else is returned stripped, unchanged."""
    value = value.strip()
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
            raise DrafterError(f"drafter {drafter!r}: bad option {part!r}; options: {names}")
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
            raise DrafterError(f"drafter {drafter!r}: option {key}={value!r} must be of type "
                               f"{kind.__name__}") from None
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
            raise DrafterError(f"unknown drafter {name!r} in {text!r}; drafters: "
                               f"{known_names()}, or a model spec")
        entry, options = registered()["model"], text
    return entry.factory(options, target=target, tokenizer=tokenizer, tree=tree)


def known_names() -> str:
    """The registered drafter spec forms, for error messages."""
    return ", ".join(e.form() for e in registered().values() if e.name != "model")


def describe_drafters() -> str:
    """One line per registered drafter, for help texts."""
    return "; ".join(f"{e.name}: {e.description}" for e in registered().values()
                     if e.name != "model")


__all__ = ["Drafter", "DrafterError", "Proposal", "ROOT_ONLY", "build_drafter",
           "describe_drafters", "parse_options", "proposal_from_paths", "register_drafter",
           "registered", "root_only", "split_options", "split_spec", "unwrap"]
