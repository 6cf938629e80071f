"""Text in, text out: tree speculative decoding behind one call (exported as
``treeopt.generate``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from treeopt.decode.drafter import Drafter, build_drafter
from treeopt.decode.engine import generate as engine_generate
from treeopt.decode.engine import model_window
from treeopt.decode.sampling import GREEDY, Sampling
from treeopt.drafters.model import DEFAULT_CHAIN, ModelDrafter
from treeopt.errors import TreeoptError
from treeopt.models.loading import ModelError, check_vocab, eos_ids, load_model, load_tokenizer
from treeopt.shapes import resolve_tree
from treeopt.tree import Tree
from treeopt.treeset import TreeSet


class GenerateError(TreeoptError, ValueError):
    """Arguments to ``generate`` that do not fit together."""



def tree_for_prompt(tree: Tree | TreeSet | None, prompt_tokens: int, max_new_tokens: int
                    ) -> Tree | None:
    """The tree a prompt of ``prompt_tokens`` tokens decodes with: ``tree`` itself, or for a
    tree set the tree of the prompt's bucket (``TreeSet.pick``: by prompt tokens +
    max_new_tokens // 2)."""
    if isinstance(tree, TreeSet):
        return tree.pick(prompt_tokens, max_new_tokens)[1]
    return tree


# Prompts longer than this are cut to their last tokens when profiling a dataset's own text
# and searching (teacher-forced logits over every position); profiles along the target's
# continuation keep what decoding keeps (:func:`prompt_room`).
MAX_PROMPT_TOKENS = 512


def prompt_room(new_tokens: int, *models) -> int | None:
    """The most prompt tokens decoding keeps when ``new_tokens`` follow: the models' window
    (``treeopt.decode.engine.model_window``) minus ``new_tokens``, eval's rule (a longer
    prompt loses its first tokens); None (keep all) when no window is known. Profiling the
    same prompts with another cut measures other prompts: a copy drafter tuned on the last
    512 tokens of a 1,000-token article to summarise sees half of what it copies from."""
    window = model_window(*models)
    return None if window is None else max(1, window - int(new_tokens))


def encode_for_decoding(pair, prompts, chat_template: bool, new_tokens: int) -> list[list[int]]:
    """Token ids of ``prompts`` for ``pair`` (a :class:`Pair`) as decoding ``new_tokens``
    more keeps them (:func:`prompt_room`): what profiles along the target's continuation,
    copy tables, prefill timing and replays encode."""
    return encode_prompts(pair.tokenizer, prompts, chat_template,
                          prompt_room(new_tokens, pair.target, pair.drafter))


def encode_prompt(tokenizer, prompt: str | Sequence[dict], chat_template: bool = True
                  ) -> torch.Tensor:
    """Token ids (1, L) int64 for a prompt: a string, or a list of chat messages
    (``{"role": ..., "content": ...}``). The tokenizer's chat template is applied when it has
    one and ``chat_template`` is true (a plain string becomes one user message): the template
    is rendered to text, then that text is tokenised without adding special tokens again
    (the template holds them). Without a template the messages' contents are joined by a
    newline and tokenised with the tokenizer's own special tokens. treeopt's one prompt
    encoder: decoding, profiling, searching and evaluating all go through it."""
    use_template = chat_template and getattr(tokenizer, "chat_template", None)
    if use_template:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else \
            list(prompt)
        text = tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    else:
        if not isinstance(prompt, str):
            prompt = "\n".join(str(m.get("content", "")) for m in prompt)
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if ids.shape[1] == 0:
        raise GenerateError("the prompt encodes to zero tokens; give a non-empty prompt")
    return ids.to(torch.int64)


def encode_prompts(tokenizer, prompts, chat_template: bool = True,
                   max_tokens: int | None = MAX_PROMPT_TOKENS) -> list[list[int]]:
    """Token ids of each prompt (its last ``max_tokens`` tokens; None: all): a string, a list
    of chat messages, or a ``treeopt.datasets.Prompt`` (its ``token_ids`` when it has them,
    else its text through :func:`encode_prompt`)."""
    out = []
    for p in prompts:
        if getattr(p, "token_ids", None):
            ids = [int(t) for t in p.token_ids]
        else:
            if tokenizer is None:
                raise GenerateError("the target has no tokenizer to encode prompt text; use a "
                                    "model folder that includes one, or token-id prompts")
            text = p.text if hasattr(p, "text") else p
            ids = encode_prompt(tokenizer, text, chat_template)[0].tolist()
        out.append(ids if max_tokens is None else ids[-max_tokens:])
    return out



class TextStream:
    """Turns the growing list of generated ids into text increments for ``on_text``
    (holding back text while a multi-byte character is incomplete)."""

    def __init__(self, tokenizer, on_text: Callable[[str], Any] | None):
        self.tokenizer = tokenizer
        self.on_text = on_text
        self.ids: list[int] = []
        self.sent = ""

    def push(self, tokens: Sequence[int]) -> None:
        self.ids.extend(int(t) for t in tokens)
        if self.on_text is None:
            return
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(self.sent):
            return
        new, self.sent = text[len(self.sent):], text
        if new:
            self.on_text(new)

    def finish(self, tokens: Sequence[int]) -> str:
        """Final text of ``tokens``; sends whatever was held back."""
        text = self.tokenizer.decode(list(tokens), skip_special_tokens=True)
        if self.on_text is not None and text.startswith(self.sent) and len(text) > len(self.sent):
            self.on_text(text[len(self.sent):])
        self.sent = text
        return text


def as_drafter(draft: Drafter | str | os.PathLike | Any, target, tokenizer=None,
               tree: Tree | None = None) -> Drafter | None:
    """A drafter from a Drafter, a drafter spec string (see ``treeopt.decode.drafter``), a
    draft model (drafted over ``tree`` by a ModelDrafter) or None (plain decoding); with
    ``tree`` the drafter drafts (or fills at most) that shape."""
    if draft is None:
        return None
    if isinstance(draft, (str, os.PathLike)):
        drafter = build_drafter(str(draft), target=target, tokenizer=tokenizer, tree=tree)
    elif isinstance(draft, Drafter):
        drafter = draft.reshaped(tree) if tree is not None else draft
    else:
        check_vocab(target, draft)
        drafter = ModelDrafter(draft, tree)
    return drafter


def generate(prompt: str | Sequence[dict], *, pair: Pair | None = None, target=None, draft=None,
             tokenizer=None, growmap: Tree | str | os.PathLike | None = None,
             tree: Tree | TreeSet | None = None, chat_template: bool = True,
             max_new_tokens: int = 128, sampling: Sampling | None = None,
             on_text: Callable[[str], Any] | None = None):
    """Generate a reply to ``prompt`` with tree speculative decoding; returns ``(text, stats)``.

    Models come from ``pair`` (``treeopt.models.loading.load_pair``) or from ``target``,
    ``draft`` and ``tokenizer``; ``target`` may also be a model spec string (``"smollm2"``,
    a folder, a .gguf file, a hub id) and ``draft`` a drafter spec (``"ngram"``,
    ``"early-exit:K"``, ``"datastore:PATH"``, a model spec), a draft model or a ``Drafter``.
    ``draft=None`` decodes plain autoregressively (the same engine). The tree is ``tree`` or
    ``growmap`` (a growmap file or a shape string like ``"chain:5"``): what a model drafter
    drafts, or the most a candidate drafter (n-gram, datastore) fills; without either each
    drafter uses its default (a chain of ``DEFAULT_CHAIN`` drafted tokens for models). A tree
    set (``treeopt.treeset.TreeSet`` or its .json file) decodes the prompt with the tree of
    its bucket, by prompt tokens + ``max_new_tokens // 2`` (:func:`tree_for_prompt`).

    The chat template is applied when the tokenizer has one (``chat_template=False`` feeds the raw
    text). ``sampling`` (``treeopt.decode.sampling.Sampling``; default greedy): at temperature 0
    the text equals the target's own greedy output; otherwise its temperature, top-k, top-p,
    verification rule and seed. ``on_text(str)`` receives the text as it is produced. ``stats`` is
    the engine's ``DecodeStats`` (tokens per step, acceptance rate, draft/verify/other seconds).

    Example::

        import treeopt
        from treeopt.api import load_pair

        pair = load_pair("smollm2", "ngram")
        text, stats = treeopt.generate("Name three rivers.", pair=pair, growmap="chain:3",
                                       max_new_tokens=64,
                                       on_text=lambda s: print(s, end="", flush=True))
        print(stats.tokens_per_step, stats.acceptance_rate)
    """
    sampling = sampling or GREEDY
    if tree is not None and growmap is not None:
        raise GenerateError("give either tree= or growmap=, not both")
    tree = resolve_tree(tree if tree is not None else growmap)
    if max_new_tokens < 1:
        raise GenerateError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if pair is not None:
        if target is not None:
            raise GenerateError("give either pair= or target=/draft=, not both")
        target = pair.target
        draft = pair.drafter if draft is None else draft
        tokenizer = pair.tokenizer if tokenizer is None else tokenizer
    if target is None:
        raise GenerateError("generate needs pair= or target=")
    if isinstance(target, (str, os.PathLike)):
        loaded = load_pair(str(target), None if draft is None else str(draft))
        target, draft = loaded.target, loaded.drafter
        tokenizer = loaded.tokenizer if tokenizer is None else tokenizer
    if tokenizer is None:
        raise GenerateError("generate needs a tokenizer (the target's folder has none); "
                            "pass tokenizer=")
    input_ids = encode_prompt(tokenizer, prompt, chat_template).to(target.device)
    tree = tree_for_prompt(tree, input_ids.shape[1], max_new_tokens)
    drafter = as_drafter(draft, target, tokenizer, tree)

    stream = TextStream(tokenizer, on_text)
    eos = eos_ids(tokenizer, target)
    with torch.inference_mode():
        result = engine_generate(target, drafter, input_ids, max_new_tokens=max_new_tokens,
                                 sampling=sampling, eos_token_id=eos or None,
                                 on_tokens=stream.push)
    return stream.finish(result.tokens), result.stats


@dataclass
class Pair:
    """A target, its drafter (``None`` = plain autoregressive decoding), the draft model when
    the drafter is one (``draft``; None for model-free drafters) and the tokenizer (``None``
    when the target folder has none)."""

    target: Any
    draft: Any
    tokenizer: Any
    target_spec: str = ""
    draft_spec: str | None = None
    drafter: Any = None


def load_pair(target_spec: str, draft_spec: str | None = None, dtype: str | torch.dtype = "auto",
              device: str | torch.device = "auto") -> Pair:
    """Load a target, its drafter and the tokenizer, checking that they fit together.

    ``draft_spec``: any drafter spec (``"ngram"``, ``"datastore:PATH"``, ``"early-exit:K"``,
    a model spec, ...; see ``treeopt.decode.drafter``) or ``None`` for plain decoding."""
    target = load_model(target_spec, dtype=dtype, device=device)
    tokenizer = load_tokenizer(target_spec)
    drafter = build_drafter(draft_spec, target=target, tokenizer=tokenizer)
    return Pair(target, getattr(drafter, "model", None), tokenizer, str(target_spec),
                None if draft_spec is None else str(draft_spec), drafter)


__all__ = ["GenerateError", "ModelError", "generate", "encode_prompt", "encode_prompts",
           "eos_ids", "resolve_tree", "tree_for_prompt", "as_drafter", "DEFAULT_CHAIN",
           "MAX_PROMPT_TOKENS", "Pair", "load_pair", "prompt_room", "encode_for_decoding"]
