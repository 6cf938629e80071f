"""Text in, text out: tree speculative decoding behind one call (exported as
``treeopt.generate``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from treeopt.decode.models import ModelError, Pair, check_vocab, load_pair
from treeopt.tree import Tree

DEFAULT_CHAIN = 4  # drafted tokens per step when a draft is given without a tree


class GenerateError(ValueError):
    """Arguments to ``generate`` that do not fit together."""


def chain_tree(drafted: int) -> Tree:
    """A chain speculating ``drafted`` tokens (size ``drafted + 1``)."""
    return Tree(tuple(range(-1, drafted)))


def resolve_tree(spec: Tree | str | os.PathLike | None) -> Tree | None:
    """A ``Tree`` from a Tree, a growmap file (.pt/.json), or a shape string such as
    ``"chain:4"``, ``"kary:2x3"`` (see ``treeopt.shapes.from_name``); ``None`` stays None."""
    if spec is None or isinstance(spec, Tree):
        return spec
    text = str(spec).strip()
    path = Path(text).expanduser()
    if path.is_file():
        from treeopt.growmap import load_growmap

        return load_growmap(path)[0]
    try:
        from treeopt.shapes import from_name
    except ModuleNotFoundError:
        if text.lower().startswith("chain:") and text[6:].isdigit():
            return chain_tree(int(text[6:]) - 1)
        raise GenerateError(f"growmap {text!r} is not a file") from None
    return from_name(text)


def encode_prompt(tokenizer, prompt: str | Sequence[dict], chat_template: bool = True
                  ) -> torch.Tensor:
    """Token ids (1, L) int64 for a prompt: a string, or a list of chat messages
    (``{"role": ..., "content": ...}``). The tokenizer's chat template is applied when it has
    one and ``chat_template`` is true (a plain string becomes one user message)."""
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


def eos_ids(tokenizer, model) -> list[int]:
    """End-of-sequence ids from the tokenizer and the model's generation config."""
    out: list[int] = []
    for value in (getattr(tokenizer, "eos_token_id", None),
                  getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            if v is not None and int(v) not in out:
                out.append(int(v))
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


def generate(prompt: str | Sequence[dict], *, pair: Pair | None = None, target=None, draft=None,
             tokenizer=None, growmap: Tree | str | os.PathLike | None = None,
             tree: Tree | None = None, chat_template: bool = True, max_new_tokens: int = 128,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             rule: str = "sequoia", seed: int | None = None,
             on_text: Callable[[str], Any] | None = None):
    """Generate a reply to ``prompt`` with tree speculative decoding; returns ``(text, stats)``.

    Models come from ``pair`` (``treeopt.decode.models.load_pair``) or from ``target``,
    ``draft`` and ``tokenizer``; ``target`` may also be a model spec string (``"smollm2"``,
    a folder, a .gguf file, a hub id) and ``draft`` a spec or ``"early-exit:K"``, loaded
    here. ``draft=None`` decodes plain autoregressively (the same engine). The tree is
    ``tree`` or ``growmap`` (a growmap file or a shape string like ``"chain:5"``); with a
    draft and neither, a chain of ``DEFAULT_CHAIN`` drafted tokens is used.

    The chat template is applied when the tokenizer has one (``chat_template=False`` feeds the
    raw text). ``temperature=0`` is greedy: the text equals the target's own greedy output.
    ``on_text(str)`` receives the text as it is produced. ``stats`` is the engine's
    ``DecodeStats`` (tokens per step, acceptance rate, draft/verify/other seconds).

    Example::

        import treeopt
        from treeopt.decode.models import load_pair

        pair = load_pair("smollm2", "early-exit:4")
        text, stats = treeopt.generate("Name three rivers.", pair=pair, growmap="chain:4",
                                       max_new_tokens=64,
                                       on_text=lambda s: print(s, end="", flush=True))
        print(stats.tokens_per_step, stats.acceptance_rate)
    """
    from treeopt.decode.engine import generate as engine_generate

    if pair is not None:
        if target is not None:
            raise GenerateError("give either pair= or target=/draft=, not both")
        target, draft = pair.target, pair.draft if draft is None else draft
        tokenizer = pair.tokenizer if tokenizer is None else tokenizer
    if target is None:
        raise GenerateError("generate needs pair= or target=")
    if isinstance(target, (str, os.PathLike)):
        loaded = load_pair(str(target), None if draft is None else str(draft))
        target, draft = loaded.target, loaded.draft
        tokenizer = loaded.tokenizer if tokenizer is None else tokenizer
    elif isinstance(draft, (str, os.PathLike)):
        from treeopt.decode.models import early_exit_draft, load_model, parse_draft_spec

        parsed = parse_draft_spec(str(draft))
        if parsed is None or isinstance(parsed, int):
            draft = None if parsed is None else early_exit_draft(target, parsed)
        else:
            draft = load_model(parsed, dtype=target.dtype, device=target.device)
    if tokenizer is None:
        raise GenerateError("generate needs a tokenizer (the target's folder has none); "
                            "pass tokenizer=")
    check_vocab(target, draft)
    if tree is not None and growmap is not None:
        raise GenerateError("give either tree= or growmap=, not both")
    tree = resolve_tree(tree if tree is not None else growmap)
    if tree is None and draft is not None:
        tree = chain_tree(DEFAULT_CHAIN)
    if max_new_tokens < 1:
        raise GenerateError(f"max_new_tokens must be >= 1, got {max_new_tokens}")

    input_ids = encode_prompt(tokenizer, prompt, chat_template).to(target.device)
    stream = TextStream(tokenizer, on_text)
    eos = eos_ids(tokenizer, target)
    with torch.inference_mode():
        result = engine_generate(
            target, draft, tree, input_ids, max_new_tokens=max_new_tokens,
            temperature=temperature, top_k=top_k, top_p=top_p, rule=rule,
            eos_token_id=eos or None, seed=seed, on_tokens=stream.push)
    return stream.finish(result.tokens), result.stats


__all__ = ["GenerateError", "ModelError", "generate", "encode_prompt", "resolve_tree",
           "chain_tree", "DEFAULT_CHAIN"]
