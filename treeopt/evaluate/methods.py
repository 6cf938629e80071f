"""The methods ``treeopt eval`` compares: plain decoding, chains and trees of the run's default
drafter, any drafter by spec (``SPEC[@SHAPE]``) and the exact DP's tree of a profile. A method
is data (:class:`Method`); ``treeopt.evaluate.runner`` runs them and
``treeopt.evaluate.reference`` adds Hugging Face's own speculative decoding."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from treeopt.evaluate.errors import EvalError
from treeopt.growmap import load_growmap
from treeopt.shapes import chain, describe, from_name
from treeopt.tree import Tree
from treeopt.treeset import TreeSet, is_treeset_file, load_treeset

AR = "ar"


ALL = "all"


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

    path = Path(spec.strip())

    if is_treeset_file(path):  # one tree per context range, picked per prompt
        ts = load_treeset(path)
        name = ts.meta.get("name")
        label = name.strip() if isinstance(name, str) and name.strip() else spec.strip()
        return Method(f"treeset:{label}", ts.trees[0], "tree",
                      f"tree set of {len(ts.buckets)} context ranges ({spec.strip()})",
                      treeset=ts)
    if path.suffix.lower() in (".pt", ".pth", ".json"):
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
