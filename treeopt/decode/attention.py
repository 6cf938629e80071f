"""Tree attention through the public transformers API: a 4D additive mask, explicit position
ids and a ``DynamicCache`` whose entries can be kept or dropped per token.

Facts this relies on (transformers 5.x): a 4D float mask of shape ``(1, 1, q, past + q)`` in
the model's dtype (0 = attend, ``finfo.min`` = blocked) is used as given by both the sdpa and
the eager attention; a bool mask is silently misread by eager attention, so it is never passed.

Grouped-query layers (several query heads sharing one key/value head: SmolLM2 3 per head,
Qwen2.5-Coder 6) are served from their key/value heads as they are. transformers' sdpa does
this for one query token only; for several (a tree or a chain being verified) it copies
every cached key and value once per query head sharing it, a copy that grows with the
context and that plain decoding never pays. :data:`GROUPED_SDPA` (registered through
transformers' ``AttentionInterface``; :func:`group_query_heads` switches a model to it)
stacks the sharing query heads' tokens instead: the same attention, computed without the
copy. ``treeopt.models.loading.load_model`` switches every model it loads.
"""

from __future__ import annotations

import inspect
from functools import lru_cache
from typing import Sequence

import torch

from treeopt.errors import TreeoptError

#: treeopt's name for PyTorch's SDPA with query heads stacked on their shared key/value heads.
GROUPED_SDPA = "treeopt_grouped_sdpa"


class CacheError(TreeoptError, ValueError):
    """The model's cache cannot be compacted token by token (e.g. sliding-window layers)."""


def tree_attention_mask(tree_mask: torch.Tensor, past_len: int, dtype: torch.dtype,
                        device: torch.device | str | None = None) -> torch.Tensor:
    """Additive float mask for ``q`` new tokens after ``past_len`` cached ones.

    tree_mask: (q, q) bool (or (q, k) with k >= q for a partial tree already in the cache:
    the last ``k`` columns are the tree part); True = may attend.
    Returns (1, 1, q, past_len + k) in ``dtype``: 0 where attending, ``finfo(dtype).min``
    elsewhere; every cached prefix token is visible.
    """
    device = tree_mask.device if device is None else device
    q, k = tree_mask.shape
    mask = torch.zeros(q, past_len + k, dtype=dtype, device=device)
    mask[:, past_len:].masked_fill_(~tree_mask.to(device), torch.finfo(dtype).min)
    return mask.view(1, 1, q, past_len + k)


@lru_cache(maxsize=64)
def _cache_argument(model_class: type) -> str:
    """The name under which ``model_class.forward`` takes the KV cache: ``cache`` in
    transformers versions that deprecate ``past_key_values``, else ``past_key_values``."""
    params = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def run_model(model, input_ids: torch.Tensor, cache, **kwargs):
    """``model(input_ids=..., <cache argument>=cache, use_cache=True, **kwargs)`` with the
    cache passed under the name this transformers version expects (no deprecation warning on
    new versions, still working on old ones). Returns the model output."""
    kwargs[_cache_argument(type(model))] = cache
    return model(input_ids=input_ids, use_cache=True, **kwargs)


def new_cache(model):
    """An empty ``DynamicCache`` for ``model`` (its layers must support per-token compaction)."""
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def cache_length(cache) -> int:
    """Number of tokens held by the cache (0 when empty)."""
    return cache.get_seq_length() if cache is not None else 0


def forward_tree(model, input_ids: torch.Tensor, position_ids: torch.Tensor,
                 tree_mask: torch.Tensor | None, cache, *, logits_to_keep: int = 0
                 ) -> torch.Tensor:
    """One forward over ``q`` new tokens that see the whole cache plus their tree ancestors.

    input_ids: (1, q) int64; position_ids: (1, q) int64 (prefix length + depth);
    tree_mask: (q, k) bool ancestor-or-self mask over the last k >= q tokens of the cache after
    this call (k > q when earlier levels of the same tree are already cached), or None for a
    plain causal chain (transformers builds the causal mask). ``cache`` is updated in place.
    Returns logits (1, q, V) (or (1, logits_to_keep, V) when ``logits_to_keep`` > 0).
    """
    mask = None
    if tree_mask is not None:
        k = tree_mask.shape[1]
        past = cache_length(cache) + input_ids.shape[1] - k
        mask = tree_attention_mask(tree_mask, past, model.dtype, input_ids.device)
    out = run_model(model, input_ids, cache, position_ids=position_ids, attention_mask=mask,
                    logits_to_keep=logits_to_keep)
    return out.logits


def check_cache(cache) -> None:
    """Raise CacheError unless every layer is a plain (full-attention) dynamic layer."""
    from transformers.cache_utils import DynamicLayer

    for layer in cache.layers:
        if type(layer) is not DynamicLayer:
            raise CacheError(f"cache layer type {type(layer).__name__} cannot be compacted per "
                             "token; tree decoding needs full-attention layers only")


def keep_tokens(cache, start: int, keep: torch.Tensor) -> None:
    """Compact the cache in place: keep positions ``[0, start)`` plus ``start + keep``.

    keep: (m,) int64 offsets after ``start``, strictly increasing with ``keep[j] >= j`` (an
    accepted path in breadth-first node order), on the cache's device. Everything else after
    ``start`` is dropped. Only the tail is copied, never the prefix.
    """
    m = keep.shape[0]
    for layer in cache.layers:
        if not layer.is_initialized or layer.keys.numel() == 0:
            continue
        for name in ("keys", "values"):
            t = getattr(layer, name)
            tail = t[:, :, start:].index_select(2, keep.to(t.device))
            t[:, :, start:start + m] = tail
            setattr(layer, name, t[:, :, :start + m])


def crop_to(cache, length: int) -> None:
    """Drop every cached token at position >= ``length``."""
    for layer in cache.layers:
        if layer.is_initialized and layer.keys.numel() > 0:
            layer.keys = layer.keys[:, :, :length]
            layer.values = layer.values[:, :, :length]


def compact(cache, start: int, keep: Sequence[int]) -> None:
    """Keep cache positions [0, start) and start + keep (increasing offsets), drop the rest.
    A contiguous keep (0, 1, ..., m-1) is a plain crop."""
    m = len(keep)
    if m == 0 or keep[-1] == m - 1:
        crop_to(cache, start + m)
    else:
        device = cache.layers[0].keys.device
        keep_tokens(cache, start, torch.tensor(keep, dtype=torch.int64, device=device))


# ---------------------------------------------------------------- grouped-query attention
def grouped_sdpa_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, dropout: float = 0.0,
                           scaling: float | None = None, is_causal: bool | None = None,
                           **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention (same signature, same result) for a layer whose
    ``num_key_value_groups`` query heads share each key/value head: with several query
    tokens and a mask shared by the heads, each key/value head's queries are stacked
    (heads ``g * groups .. g * groups + groups - 1``, the order of transformers'
    ``repeat_kv``) into one ``groups * q``-row query, the mask repeated to match, and the
    output unstacked. Anything else (one query token, no mask, per-head masks or position
    biases) goes to transformers' own sdpa attention.

    query: (b, heads, q, d); key, value: (b, kv_heads, past + q, d); attention_mask:
    (b or 1, 1, q, past + q) additive float or bool. Returns ((b, q, heads, d), None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = int(getattr(module, "num_key_value_groups", 1) or 1)
    batch, heads, q, _ = query.shape
    kv_heads = key.shape[1]
    if (groups == 1 or q == 1 or attention_mask is None or attention_mask.dim() != 4
            or attention_mask.shape[1] != 1 or kv_heads * groups != heads
            or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None
            or kwargs.get("output_attentions", False)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout,
                                      scaling, is_causal, **kwargs)
    stacked = query.reshape(batch, kv_heads, groups * q, query.shape[-1])
    mask = attention_mask.expand(attention_mask.shape[0], 1, q, attention_mask.shape[-1])
    out = torch.nn.functional.scaled_dot_product_attention(
        stacked, key, value, attn_mask=mask.repeat(1, 1, groups, 1), dropout_p=dropout,
        scale=scaling)
    out = out.reshape(out.shape[0], heads, q, value.shape[-1]).transpose(1, 2).contiguous()
    return out, None


def _register_grouped_sdpa() -> bool:
    """Register :data:`GROUPED_SDPA` with transformers (attention and mask functions; the
    mask is sdpa's). False when this transformers version has no such interfaces."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:  # pragma: no cover - transformers older than the supported range
        return False
    if GROUPED_SDPA not in AttentionInterface._global_mapping:
        AttentionInterface.register(GROUPED_SDPA, grouped_sdpa_attention)
        AttentionMaskInterface.register(GROUPED_SDPA,
                                        AttentionMaskInterface._global_mapping["sdpa"])
    return True


def group_query_heads(model) -> bool:
    """Switch ``model`` from transformers' sdpa attention to :data:`GROUPED_SDPA` when it has
    grouped-query layers (any other attention, or none grouped: left as it is). True when
    the model uses :data:`GROUPED_SDPA` afterwards."""
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current == GROUPED_SDPA:
        return True
    if current != "sdpa" or not any(int(getattr(m, "num_key_value_groups", 1) or 1) > 1
                                    for m in model.modules()):
        return False
    if not _register_grouped_sdpa():  # pragma: no cover - old transformers
        return False
    model.set_attn_implementation(GROUPED_SDPA)
    return config._attn_implementation == GROUPED_SDPA


def attention_in_use(model) -> str:
    """The attention implementation ``model`` runs ("sdpa", "eager", :data:`GROUPED_SDPA`,
    ...), as recorded beside timings."""
    return str(getattr(getattr(model, "config", None), "_attn_implementation", None) or "")
