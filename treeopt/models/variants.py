"""Cheaper drafts that stay lossless: an int8 draft, and a draft LM head over the most
frequent tokens only.

Both change what the draft costs and how often the target accepts it, never what is
generated: the target keeps its own weights and verifies over its whole vocabulary, so greedy
output stays token-exact with plain decoding and sampled output keeps the target's
distribution. Whether a cheaper draft pays is for the acceptance and latency profiles and the
DP to decide (``scripts/bench_cheap_drafts.py`` measures forward time and top-1 agreement).

- :func:`quantize_int8` (``quant=int8``): per-channel dynamic int8 of every linear layer of
  the draft, LM head included, with torch's own eager-mode API
  (``torch.ao.quantization.quantize_dynamic`` with ``per_channel_dynamic_qconfig``): weights
  int8 with one scale per output row, activations quantised per call. CPU only; a
  bfloat16 draft is quantised from float32 copies of its weights.
  torch 2.13 marks this API deprecated in favour of torchao (a ``DeprecationWarning`` and a
  ``UserWarning`` on quantised-tensor creation, both at quantisation time); treeopt uses what
  torch itself ships and filters exactly those two warnings inside :func:`quantize_int8`,
  nowhere else. Should a later torch drop the API, ``quant=int8`` fails with a one-line error.
- :func:`restrict_vocab` (``vocab=N``): the draft's LM head computes logits only for a token
  subset (a smaller matmul over those rows of the head) and scatters them into a
  full-vocabulary row filled with ``-inf`` (as FR-Spec and SGLang's token map do). Everything
  downstream (top-k drafting, the draft distribution Q of the stochastic rules) works over the
  target's vocabulary unchanged; Q is exactly zero outside the subset, which the lossless rules
  handle (a token the draft cannot propose is reached through the residual distribution).
- :func:`frequent_tokens`: the N most frequent tokens of a corpus (default: the prompts
  shipped with treeopt, Spec-Bench and HumanEval), special and EOS tokens always included;
  cached as a small JSON file keyed by tokenizer, corpus and N.

Neither ever changes the model it is given: both return a copy whose modules are new
objects (parameters not touched by the change stay shared). An early-exit draft shares the
target's modules, so this is what keeps the target untouched.

Draft spec options (``treeopt.decode.drafter``): model drafts take
``[model:]SPEC[,quant=int8][,vocab=N][,vocab_corpus=PATH]`` and early exits
``early-exit:K[,quant=int8][,vocab=N][,vocab_corpus=PATH]``. The options are the trailing
comma-separated ``key=value`` parts; everything before them is the model spec (so a path
containing a comma or a colon still works). A spec that names an existing file or folder as a
whole is never split. A model path whose last comma-separated part looks like ``key=value``,
or a ``vocab_corpus`` path containing a comma, cannot be written this way: rename it.
``quant`` is ``none`` or ``int8``; ``vocab=N`` needs 1 <= N <= the vocabulary size (N equal to
it keeps the full head; larger is refused); ``vocab_corpus`` is a text/.jsonl/.json file or a
shipped dataset name (``spec_bench``, ``mt_bench``, ``humaneval``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from treeopt.datasets import load_prompts
from treeopt.decode.drafter import DrafterError, parse_options, split_spec
from treeopt.limits import atomic_write, read_json
from treeopt.models.cache import cache_dir
from treeopt.models.cpu_kernels import PackedLinear, pack_linear_layers
from treeopt.models.loading import eos_ids, lm_head_rows

QUANTS = ("none", "int8")
VARIANT_OPTIONS: dict[str, type] = {"quant": str, "vocab": int, "vocab_corpus": str}
#: The corpus ``vocab=N`` counts tokens over when no ``vocab_corpus`` is given.
DEFAULT_CORPUS = ("spec_bench", "humaneval")
TOKEN_MAP_FORMAT = "treeopt-frequent-tokens"
# torch 2.13's deprecation notices of its eager-mode quantisation (see the module docstring).
_QUANT_WARNINGS = ((DeprecationWarning, r"torch\.ao\.quantization is deprecated"),
                   (UserWarning, r"torch\.quantize_per_tensor, torch\.quantize_per_channel"))
_OPTION_PART = re.compile(r"\s*([A-Za-z_]\w*)\s*=.*", re.S)


# ---------------------------------------------------------------------------- variants
@dataclass(frozen=True)
class DraftVariant:
    """A cheaper variant of a model draft: ``quant`` ("none" or "int8"), ``vocab`` (propose
    from this many most frequent tokens; None = the full head) and ``vocab_corpus`` (the
    corpus counted; None = Spec-Bench + HumanEval). Invalid values raise DrafterError."""

    quant: str = "none"
    vocab: int | None = None
    vocab_corpus: str | None = None

    def __post_init__(self) -> None:
        quant = str(self.quant).strip().lower()
        object.__setattr__(self, "quant", quant)
        if quant not in QUANTS:
            raise DrafterError(f"draft option quant={self.quant!r} is not supported; use "
                               "quant=int8 (per-channel dynamic int8) or quant=none")
        if self.vocab is not None and int(self.vocab) < 1:
            raise DrafterError(f"draft option vocab={self.vocab} must be >= 1 (the number of "
                               "most frequent tokens the draft proposes from)")
        if self.vocab_corpus is not None:
            if not str(self.vocab_corpus).strip():
                raise DrafterError("draft option vocab_corpus= is empty; give a text or .jsonl "
                                   "file, or drop it for the shipped prompts")
            if self.vocab is None:
                raise DrafterError("draft option vocab_corpus= needs vocab=N (the number of "
                                   "most frequent tokens to keep)")

    @property
    def plain(self) -> bool:
        """True when nothing changes the draft."""
        return self.quant == "none" and self.vocab is None

    def options(self) -> str:
        """The spec options, e.g. ``"quant=int8,vocab=32768"`` ("" when plain)."""
        parts = [f"quant={self.quant}"] if self.quant != "none" else []
        if self.vocab is not None:
            parts.append(f"vocab={int(self.vocab)}")
        if self.vocab_corpus is not None:
            parts.append(f"vocab_corpus={self.vocab_corpus}")
        return ",".join(parts)


def parse_variant(text: str, drafter: str) -> DraftVariant:
    """``"quant=int8,vocab=100"`` -> DraftVariant; unknown, repeated or malformed options
    raise DrafterError naming ``drafter``."""
    seen: set[str] = set()
    for part in filter(None, (x.strip() for x in str(text).split(","))):
        key = part.partition("=")[0].strip().lower()
        if key in seen:
            raise DrafterError(f"drafter {drafter!r}: option {key}= is given twice")
        seen.add(key)
    opts = parse_options(text, VARIANT_OPTIONS, drafter)
    return DraftVariant(opts.get("quant", "none"), opts.get("vocab"), opts.get("vocab_corpus"))


def split_model_options(text: str) -> tuple[str, DraftVariant]:
    """(model spec, variant) of a model draft's spec text: the trailing ``key=value`` parts
    are options, the rest is the model spec; an existing file or folder is never split."""
    text = str(text).strip()
    if not text or os.path.exists(os.path.expanduser(text)):
        return text, DraftVariant()
    parts = text.split(",")
    i = len(parts)
    while i > 1 and (not parts[i - 1].strip() or _OPTION_PART.fullmatch(parts[i - 1])):
        i -= 1
    return ",".join(parts[:i]).strip(), parse_variant(",".join(parts[i:]), "model")


def split_early_exit_options(text: str) -> tuple[int, DraftVariant]:
    """(K, variant) of an early-exit spec's options ``"K[,quant=..][,vocab=..]"``."""
    k, _, rest = str(text).partition(",")
    if not k.strip().isdigit():
        raise DrafterError(f"draft 'early-exit:{text}': early-exit takes a layer count, "
                           "e.g. early-exit:4 or early-exit:4,quant=int8")
    return int(k), parse_variant(rest, "early-exit")


def add_variant(spec: str | None, variant: DraftVariant) -> str | None:
    """``spec`` with ``variant``'s options appended (unchanged for a plain variant). Raises
    DrafterError when ``spec`` is not a model draft (a model spec, ``model:SPEC`` or
    ``early-exit:K``), or when an option is then given twice."""

    if variant.plain:
        return spec
    text = "" if spec is None else str(spec).strip()
    if text.lower() in ("", "none", "ar"):
        raise DrafterError("quant= and vocab= need a model draft (a model spec or "
                           "early-exit:K), not plain decoding")
    entry, options = split_spec(text)
    if entry is not None and entry.name not in ("model", "early-exit"):
        raise DrafterError(f"{entry.name!r} is a model-free drafter; quant= and vocab= apply "
                           "to model drafts (a model spec or early-exit:K)")
    joined = f"{text},{variant.options()}"
    if entry is not None and entry.name == "early-exit":
        split_early_exit_options(f"{options},{variant.options()}")
    else:
        split_model_options(joined.partition(":")[2] if entry is not None else joined)
    return joined


def apply_variant(model, variant: DraftVariant, *, target=None, tokenizer=None):
    """The draft ``model`` made cheaper as ``variant`` says (``model`` itself when plain):
    first the head restricted to the ``vocab`` most frequent tokens of the corpus (counted
    with ``tokenizer``; the special tokens and the EOS ids of ``target`` and ``model`` are
    always kept), then int8. Never changes ``model`` or ``target``."""

    if variant.vocab is not None:
        rows = lm_head_rows(model)
        if variant.vocab > rows:
            raise DrafterError(f"draft option vocab={variant.vocab} exceeds the draft's "
                               f"vocabulary of {rows} tokens; give at most {rows} (or drop "
                               "vocab= for the full head)")
        if variant.vocab < rows:
            if tokenizer is None:
                raise DrafterError(f"draft option vocab={variant.vocab} needs the target's "
                                   "tokenizer to count token frequencies, and this target "
                                   "has none")
            texts = corpus_texts(variant.vocab_corpus)
            always = sorted(set(eos_ids(None, target)) | set(eos_ids(None, model)))
            tokens = frequent_tokens(tokenizer, texts, variant.vocab, vocab_size=rows,
                                     always=always)
            model = restrict_vocab(model, tokens)
    if variant.quant == "int8":
        model = quantize_int8(model)
    return model



# ---------------------------------------------------------------------------- module copies
def copy_modules(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` in which every module is a new object (with its own child,
    parameter, buffer and hook dictionaries) while every tensor is shared: replacing or
    re-attributing a module of the copy never affects ``model`` (nor a target whose modules
    ``model`` shares), and costs no memory for weights."""
    done: dict[int, torch.nn.Module] = {}

    def rec(m: torch.nn.Module) -> torch.nn.Module:
        if id(m) in done:
            return done[id(m)]
        new = m.__class__.__new__(m.__class__)
        state = {k: (copy.copy(v) if isinstance(v, (dict, set, list)) else v)
                 for k, v in m.__dict__.items()}
        object.__setattr__(new, "__dict__", state)
        done[id(m)] = new
        for name, child in m._modules.items():
            state["_modules"][name] = None if child is None else rec(child)
        return new

    return rec(model)


def _own_float32(model: torch.nn.Module) -> None:
    """Give the modules of ``model`` (a :func:`copy_modules` copy) float32 copies of their
    floating-point parameters and buffers of another dtype, in place: the tensors they share
    with the original stay as they are; tied weights stay tied."""
    made: dict[int, torch.Tensor] = {}

    def own(t: torch.Tensor, param: bool) -> torch.Tensor:
        if id(t) not in made:
            data = t.detach().to(torch.float32)
            made[id(t)] = torch.nn.Parameter(data, requires_grad=False) if param else data
        return made[id(t)]

    for m in model.modules():
        for table, param in ((m._parameters, True), (m._buffers, False)):
            for name, t in table.items():
                if t is not None and t.is_floating_point() and t.dtype != torch.float32:
                    table[name] = own(t, param)


def _float_linear(module: torch.nn.Module) -> torch.nn.Linear:
    """An ``nn.Linear`` sharing the weight and bias of a ``PackedLinear`` (or ``nn.Linear``)."""
    with torch.device("meta"):
        lin = torch.nn.Linear(module.in_features, module.out_features,
                              bias=module.bias is not None)
    lin.weight = module.weight
    lin.bias = module.bias
    return lin


# ---------------------------------------------------------------------------- int8
def quantize_int8(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose linear layers (``nn.Linear`` and treeopt's oneDNN
    ``PackedLinear``, the LM head included) are per-channel dynamic int8
    (``torch.ao.nn.quantized.dynamic.Linear``); embeddings and norms stay float32 and shared.

    ``model``: a causal LM on the CPU; a bfloat16 or float16 one is quantised from a float32
    copy of its weights (a draft only hands token ids to the target, so an int8 draft can
    serve a bfloat16 target, whose multi-token verifications are the cheaper ones on a CPU
    with AVX512-BF16 or AMX). The copy takes the same inputs and returns float32 logits.
    ``model`` is left as it was (see :func:`copy_modules`). Raises DrafterError for another
    device, or a torch without the API."""
    try:
        param = next(model.parameters())
    except StopIteration:
        raise DrafterError("quant=int8: the draft has no parameters to quantise") from None
    if param.device.type != "cpu":
        raise DrafterError(f"quant=int8 runs on the CPU only (torch's dynamic quantisation); "
                           f"the draft is on {param.device.type}: use --device cpu or drop "
                           "quant=int8")
    try:
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    except ImportError:
        raise DrafterError(f"quant=int8 needs torch.ao.quantization's dynamic quantisation, "
                           f"which torch {torch.__version__} does not have; drop quant=int8"
                           ) from None

    out = copy_modules(model)
    for parent in list(out.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, PackedLinear):
                setattr(parent, name, _float_linear(child))
    _own_float32(out)
    with warnings.catch_warnings():
        for category, message in _QUANT_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)
        quantize_dynamic(out, {torch.nn.Linear: per_channel_dynamic_qconfig},
                         dtype=torch.qint8, inplace=True)
    out.eval()
    return out


def is_quantized(model: torch.nn.Module) -> bool:
    """Whether any layer of ``model`` is a dynamic int8 linear."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return any(isinstance(m, DynamicLinear) for m in model.modules())


# ---------------------------------------------------------------------------- reduced vocab
class RestrictedHead(torch.nn.Module):
    """An LM head that computes logits for ``token_ids`` only and returns full-vocabulary
    logits, ``-inf`` elsewhere.

    Input (..., in_features); output (..., out_features) in the input's dtype, where
    out_features is the full vocabulary. ``proj``: an ``nn.Linear`` (in_features ->
    len(token_ids)) holding copies of the original head's rows (the original head, and a
    tied input embedding, are left intact); it may be packed (oneDNN) or quantised like any
    other linear layer. ``token_ids``: (n,) int64 buffer, ascending."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None,
                 token_ids: torch.Tensor):
        super().__init__()
        self.out_features = int(weight.shape[0])
        self.in_features = int(weight.shape[1])
        ids = token_ids.to(device=weight.device, dtype=torch.int64)
        self.register_buffer("token_ids", ids)
        with torch.device("meta"):
            proj = torch.nn.Linear(self.in_features, len(ids), bias=bias is not None)
        proj.weight = torch.nn.Parameter(weight.detach()[ids].clone(), requires_grad=False)
        if bias is not None:
            proj.bias = torch.nn.Parameter(bias.detach()[ids].clone(), requires_grad=False)
        self.proj = proj

    @property
    def proposable(self) -> int:
        """Number of tokens the draft can propose (the subset's size)."""
        return int(self.token_ids.numel())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sub = self.proj(x)
        out = sub.new_full((*sub.shape[:-1], self.out_features), float("-inf"))
        return out.index_copy_(out.dim() - 1, self.token_ids, sub)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"proposable={self.proposable}")


def restrict_vocab(model: torch.nn.Module, token_ids: Iterable[int]) -> torch.nn.Module:
    """A copy of the causal LM ``model`` whose LM head is a :class:`RestrictedHead` over
    ``token_ids`` (any order, repeats ignored): its logits equal the full head's on those
    tokens and are ``-inf`` elsewhere. A oneDNN-packed head gives a packed restricted head.
    ``model`` (its head, its tied embedding) is left as it was. Restrict before quantising:
    a quantised head is refused."""

    head = model.get_output_embeddings()
    if isinstance(head, RestrictedHead):
        raise DrafterError("the draft's LM head is already restricted to a token subset")
    if not isinstance(head, (torch.nn.Linear, PackedLinear)):
        kind = "a quantised" if head is not None and callable(getattr(head, "weight", None)) \
            else f"an unsupported ({type(head).__name__})"
        raise DrafterError(f"vocab=N needs a float linear LM head; the draft has {kind} one "
                           "(restrict the vocabulary before quantising)")
    rows = int(head.weight.shape[0])
    ids = sorted({int(t) for t in token_ids})
    if not ids:
        raise DrafterError("vocab=N: the token subset is empty")
    if ids[0] < 0 or ids[-1] >= rows:
        bad = ids[0] if ids[0] < 0 else ids[-1]
        raise DrafterError(f"vocab=N: token id {bad} is outside the draft's vocabulary of "
                           f"{rows} tokens")
    new_head = RestrictedHead(head.weight, head.bias, torch.tensor(ids))
    if isinstance(head, PackedLinear):
        pack_linear_layers(new_head)
    out = copy_modules(model)
    path = next(name for name, m in model.named_modules() if m is head)
    parent, _, leaf = path.rpartition(".")
    setattr(out.get_submodule(parent), leaf, new_head)
    return out


def proposable_tokens(model: torch.nn.Module) -> int:
    """How many tokens a draft can propose: its restricted head's subset size, else its
    full vocabulary."""

    head = model.get_output_embeddings()
    return head.proposable if isinstance(head, RestrictedHead) else lm_head_rows(model)


# ---------------------------------------------------------------------------- frequencies
def corpus_texts(spec: str | os.PathLike | None = None) -> list[str]:
    """Every user turn of a corpus: a text/.jsonl/.json file or a shipped dataset name (see
    ``treeopt.datasets.load_prompts``); None = Spec-Bench and HumanEval."""

    specs = DEFAULT_CORPUS if spec is None else (str(spec),)
    return [turn for s in specs for p in load_prompts(s, turns="both") for turn in p.turns]


def special_ids(tokenizer) -> set[int]:
    """The tokenizer's special tokens: ``all_special_ids``, the EOS id and every added token
    marked special (chat-template markers)."""
    out = {int(t) for t in (getattr(tokenizer, "all_special_ids", None) or [])}
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None:
        out.add(int(eos))
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    out.update(int(i) for i, tok in added.items() if getattr(tok, "special", False))
    return out


def _digest(*parts: Any) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, ensure_ascii=False).encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def _tokenizer_key(tokenizer) -> str:
    vocab = tokenizer.get_vocab()
    return _digest(type(tokenizer).__name__, sorted(vocab.items(), key=lambda kv: kv[1]))


def count_tokens(tokenizer, texts: Sequence[str], vocab_size: int) -> torch.Tensor:
    """(vocab_size,) int64 occurrences of each token id in ``texts`` (no special tokens
    added; ids >= vocab_size ignored)."""
    counts = torch.zeros(vocab_size, dtype=torch.int64)
    step = 256
    for i in range(0, len(texts), step):
        batch = list(texts[i:i + step])
        ids = [t for row in tokenizer(batch, add_special_tokens=False)["input_ids"] for t in row]
        if ids:
            t = torch.tensor(ids, dtype=torch.int64)
            counts += torch.bincount(t[(t >= 0) & (t < vocab_size)], minlength=vocab_size)
    return counts


def frequent_tokens(tokenizer, texts: Sequence[str], n: int, *, vocab_size: int | None = None,
                    always: Iterable[int] = (), cache: bool | str | os.PathLike = True
                    ) -> list[int]:
    """The ``n`` most frequent token ids of ``texts`` under ``tokenizer``, most frequent first,
    after the tokens always kept (the tokenizer's special tokens, its EOS and ``always``,
    ascending) that come first; ties and unseen tokens in id order. Returns
    max(n, number of always-kept tokens) ids, at most ``vocab_size`` (default:
    ``len(tokenizer)``), all below it.

    ``cache``: True = a JSON file under treeopt's cache folder (``token-maps/``), a path = that
    folder, False = none. The file is keyed by the tokenizer's vocabulary, the texts, n,
    vocab_size and the always-kept tokens, so it is computed once per combination."""
    n = int(n)
    if n < 1:
        raise DrafterError(f"vocab={n} must be >= 1")
    size = int(vocab_size if vocab_size is not None else len(tokenizer))
    keep = sorted(t for t in special_ids(tokenizer) | {int(t) for t in always} if 0 <= t < size)
    texts = [str(t) for t in texts]
    path = None
    if cache:
        folder = Path(cache) if not isinstance(cache, bool) else cache_dir() / "token-maps"
        key = _digest(TOKEN_MAP_FORMAT, _tokenizer_key(tokenizer), _digest(texts), n, size, keep)
        path = folder / f"top{n}-{key[:20]}.json"
        tokens = _read_token_map(path, size)
        if tokens is not None:
            return tokens
    counts = count_tokens(tokenizer, texts, size)
    kept = set(keep)
    # By count, most frequent first; equal counts in id order.
    order = torch.argsort(counts * size - torch.arange(size), descending=True).tolist()
    rest = [t for t in order if t not in kept][:max(0, min(n, size) - len(keep))]
    tokens = keep + rest
    if path is not None:
        _write_token_map(path, tokens, n=n, size=size, corpus_texts=len(texts))
    return tokens


def _read_token_map(path: Path, size: int) -> list[int] | None:
    """The cached token list, or None when there is none (or it is unreadable: recomputed)."""
    try:
        d = read_json(path)
    except (OSError, ValueError):  # LimitError is a ValueError
        return None
    tokens = d.get("tokens") if isinstance(d, dict) and d.get("format") == TOKEN_MAP_FORMAT \
        else None
    if not isinstance(tokens, list) or not tokens or not all(
            isinstance(t, int) and 0 <= t < size for t in tokens):
        return None
    return tokens


def _write_token_map(path: Path, tokens: list[int], **meta: Any) -> None:
    record = {"format": TOKEN_MAP_FORMAT, "version": 1, **meta, "tokens": tokens}
    data = json.dumps(record, separators=(",", ":")).encode("utf-8")
    atomic_write(path, lambda fh: fh.write(data))


__all__ = ["DEFAULT_CORPUS", "DraftVariant", "QUANTS", "RestrictedHead", "add_variant",
           "apply_variant", "copy_modules", "corpus_texts", "count_tokens", "eos_ids",
           "frequent_tokens", "is_quantized", "parse_variant", "proposable_tokens",
           "quantize_int8", "restrict_vocab", "special_ids", "split_early_exit_options",
           "split_model_options"]
