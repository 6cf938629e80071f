"""A draft model grows a fixed tree shape every step (a second model, or an early-exit draft).

The drafter owns the draft model's KV cache. Invariant between steps, with C committed tokens:
the cache holds the first ``cached`` <= C of them, and the next ``propose`` feeds the rest
(the accepted leaf it never expanded and the bonus token) with its first forward. After a
verification ``update`` keeps, of the tree nodes the draft fed, only those on the accepted
path (see ``treeopt.drafters.grow`` for the level-by-level drafting and its plan).
"""

from __future__ import annotations

from typing import Sequence

import torch

from treeopt.decode.attention import check_cache, compact, forward_tree, new_cache
from treeopt.decode.drafter import (
    Drafter,
    DrafterError,
    Proposal,
    known_names,
    register_drafter,
    root_only,
)
from treeopt.decode.sampling import Sampling
from treeopt.decode.verify import DecodeError
from treeopt.drafters.grow import draft_plan, draft_tree
from treeopt.models.loading import (
    ModelError,
    check_vocab,
    early_exit_draft,
    lm_head_rows,
    load_model,
    load_tokenizer,
)
from treeopt.models.variants import (
    apply_variant,
    proposable_tokens,
    split_early_exit_options,
    split_model_options,
)
from treeopt.shapes import chain
from treeopt.tree import Tree

DEFAULT_CHAIN = 4  # drafted tokens per step when a model draft is given without a tree


def truncate_tree(tree: Tree, max_depth: int) -> Tree:
    """The subtree of nodes with depth <= max_depth (a prefix of the breadth-first ids)."""
    if tree.depth <= max_depth:
        return tree
    n = sum(1 for d in tree.depths if d <= max_depth)
    return Tree(tree.parents[:n])


class ModelDrafter(Drafter):
    """Drafts ``tree`` with a causal LM sharing the target's vocabulary: the draft's top-k
    children per node (greedy) or children drawn from its processed distribution Q (with
    replacement for the SpecInfer rule), one draft forward per level."""

    name = "model"

    def __init__(self, model, tree: Tree | None = None):
        self.model = model
        self.shape = tree if tree is not None else chain(draft_tokens=DEFAULT_CHAIN)
        self.cache = None
        self.cached = 0
        self._root_pos = 0
        self._tree: Tree | None = None

    def check(self, target) -> None:
        device = next(target.parameters()).device
        if next(self.model.parameters()).device != device:
            raise DecodeError("target and draft are on different devices; load both on one")
        try:
            check_vocab(target, self.model)
        except ModelError as exc:
            raise DecodeError(str(exc)) from None
        vd = lm_head_rows(self.model)
        proposable = proposable_tokens(self.model)
        width, what_width = self.children_per_node()
        if width > proposable:
            what = "vocabulary size" if proposable == vd else \
                "draft's token subset (vocab=N)"
            raise DecodeError(f"{what_width}{width} exceeds the {what} {proposable}")

    def children_per_node(self) -> tuple[int, str]:
        """The most children a node can get, and what to call that number in an error (a
        fixed tree's width; subclasses growing their own trees say theirs)."""
        return self.shape.width, "tree width "

    def start(self, prompt_ids: torch.Tensor) -> None:
        positions = torch.arange(prompt_ids.shape[1], device=prompt_ids.device)[None]
        self.cache = new_cache(self.model)
        forward_tree(self.model, prompt_ids, positions, None, self.cache, logits_to_keep=1)
        check_cache(self.cache)
        self.cached = prompt_ids.shape[1]

    def propose(self, committed: Sequence[int], max_depth: int, sampling: Sampling,
                generator: torch.Generator | None = None) -> Proposal:
        device = self.cache.layers[0].keys.device if self.cache.layers else torch.device("cpu")
        tree = truncate_tree(self.shape, max_depth)
        self._tree = tree
        if tree.size == 1:
            return root_only(committed, device)
        root_pos, pending = self.begin_step(committed, device)
        drafted = draft_tree(self.model, self.cache, pending, root_pos, tree,
                             sampling=sampling, generator=generator)
        self.mark_fed(committed)
        row = None if drafted.q is None else draft_plan(tree, str(device)).row
        return Proposal(tree, drafted.tokens, drafted.q, row, drafted.forwards,
                        fixed_shape=True)

    # The draft cache's one invariant, kept by the four methods below and nowhere else: the
    # cache holds the first ``cached`` committed tokens; during a step, the tree nodes fed
    # after the root (at ``root_pos``) follow them until ``keep_fed`` keeps the accepted ones.
    def begin_step(self, committed: Sequence[int], device: torch.device | str
                   ) -> tuple[int, torch.Tensor]:
        """Start drafting from the root ``committed[-1]``: (its position, :meth:`pending`)."""
        self._root_pos = len(committed) - 1
        return self._root_pos, self.pending(committed, device)

    def mark_fed(self, committed: Sequence[int]) -> None:
        """The pending tokens (the root last) are in the cache now."""
        self.cached = len(committed)

    def keep_fed(self, offsets: Sequence[int]) -> None:
        """Keep, of the nodes fed after the root this step, those at ``offsets`` (in order):
        the accepted path's; the rest leave the cache."""
        compact(self.cache, self._root_pos + 1, list(offsets))
        self.cached = self._root_pos + 1 + len(offsets)

    def pending(self, committed: Sequence[int], device: torch.device | str) -> torch.Tensor:
        """(1, P) int64: the committed tokens the draft cache lacks, the root last. A cache
        that already holds the root (a drafter started on text ending with it, as the
        acceptance profiler's one-token contexts are, or one whose steps another drafter
        drafted) drops it first, so the root is always fed and drafted from."""
        if self.cached >= len(committed):
            compact(self.cache, len(committed) - 1, [])
            self.cached = len(committed) - 1
        return torch.tensor([list(committed[self.cached:])], dtype=torch.int64, device=device)

    def update(self, path: Sequence[int], committed: Sequence[int],
               target_topk: torch.Tensor | None = None) -> None:
        """Keep, of the fed tree nodes, those on the accepted path (a prefix of path[1:]:
        all of it, or all but an accepted leaf the draft never expanded)."""
        fed_index = self.fed_index()
        if fed_index is None:
            return
        self.keep_fed([fed_index[v] for v in path[1:] if fed_index[v] >= 0])

    def fed_index(self) -> Sequence[int] | None:
        """Per node of the last proposal, its offset among the tokens the draft fed after the
        root (-1 for nodes never fed), or None when nothing was fed (a root-only step)."""
        tree = self._tree
        if tree is None or tree.size == 1:
            return None
        return draft_plan(tree, str(self.cache.layers[0].keys.device)).fed_index


@register_drafter("model", "a draft model: a folder, a .gguf file or a Hugging Face id, "
                           "[model:]SPEC[,quant=int8][,vocab=N][,vocab_corpus=PATH]")
def _model(options: str, *, target, tokenizer, tree):
    """``options``: the model spec with optional trailing variant options (see
    ``treeopt.models.variants``: int8 weights, a head over the N most frequent tokens)."""

    spec, variant = split_model_options(options)
    # an int8 draft is quantised from float32 weights whatever the target's dtype (it hands
    # the target token ids only): loaded so, not rounded through the target's bfloat16
    cpu_int8 = variant.quant == "int8" and torch.device(target.device).type == "cpu"
    try:
        draft = load_model(spec, dtype=torch.float32 if cpu_int8 else target.dtype,
                           device=target.device)
    except ModelError as exc:
        raise DrafterError(f"draft {spec!r} is not a drafter ({known_names()}) and "
                           f"cannot be loaded as a model: {exc}") from None
    draft_tokenizer = load_tokenizer(spec) if tokenizer or variant.vocab is not None else None
    check_vocab(target, draft, tokenizer, draft_tokenizer if tokenizer else None)
    draft = apply_variant(draft, variant, target=target, tokenizer=tokenizer or draft_tokenizer)
    return ModelDrafter(draft, tree)


@register_drafter("early-exit", "the target's first K layers, final norm and LM head "
                                "(early-exit:K[,quant=int8][,vocab=N][,vocab_corpus=PATH])",
                  spec_form="early-exit:K")
def _early_exit(options: str, *, target, tokenizer, tree):
    """``options``: ``K`` with optional variant options; a variant is built on copies of the
    shared modules, so the target is never changed."""

    k, variant = split_early_exit_options(options)
    draft = apply_variant(early_exit_draft(target, k), variant, target=target,
                          tokenizer=tokenizer)
    return ModelDrafter(draft, tree)
