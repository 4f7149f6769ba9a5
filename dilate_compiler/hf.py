"""Hugging Face transformers integration: a strategy as an ``attn_implementation``, and a cache that keeps only the
keys a future query can link.

``register(name="dilated", strategy=dc.Dilated(...))`` adds an attention function to transformers'
``AttentionInterface`` and a mask function to its ``AttentionMaskInterface`` under ``name``; then
``AutoModelForCausalLM.from_config(cfg, attn_implementation=name)`` or ``model.set_attn_implementation(name)``
trains and generates with the strategy's semantics, on the Triton kernels on CUDA and on the exact path
elsewhere (``dc.ops``; the log says which and why).

What the attention function receives, and how it is read:

- the mask function returns what transformers' FlashAttention mask returns: ``None`` when no key is padded, else
  the bool ``[B, Nk]`` of the model's ``attention_mask`` for the keys of this step. It becomes the ops'
  ``key_keep`` (left or right padding alike). A query row that keeps no key (a left-padding row) is 0.
- the layer's own pattern must be plain causal (decoders) or bidirectional (encoder-only models): a layer whose
  mask is a sliding window, chunked, packed sequences or any custom mask function raises ``NotImplementedError``
  naming it, because the strategy would replace that pattern, not refine it. Soft-capped scores (Gemma2) and
  encoder-decoder models raise too.
- queries are the last ``Nq`` of the ``Nk`` key positions (a KV cache holds the earlier ones): prefill has
  ``Nq == Nk``, a decode step ``Nq == 1``. The pattern is evaluated on positions within the key tensor, which
  start at the first token the cache holds (0 for ``DynamicCache``; see ``EvictingCache``).

``EvictingCache(strategy)`` is a transformers ``Cache`` whose layers drop the keys no future query links: for a
causal ``Dilated`` pattern the keys before the current segment of ``L = lcm(segment lengths)`` (so generation
keeps fewer than ``L`` keys plus the step's per layer, whatever its length); for a block-sparse pattern whose
terms reach a bounded distance back (sliding window, local blocks) the keys older than that reach. The dropped
prefix is always a whole number of the pattern's periods, so the pattern on the kept keys, counted from 0, is the
pattern on the full sequence: the evicting cache generates the same tokens as ``DynamicCache``.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import torch
from torch import Tensor
from transformers import masking_utils, modeling_utils
from transformers.cache_utils import Cache, DynamicLayer

from . import ops
from .patterns import Pattern
from .patterns.algebra import INF, UNBOUNDED, LocalBlocks
from .strategies import BlockSparse, Dilated

__all__ = ["register", "attention_function", "EvictingCache", "EvictingLayer", "first_needed_key"]


def _check_strategy(strategy) -> None:
    if isinstance(strategy, Dilated):
        return
    if isinstance(strategy, BlockSparse):
        if not isinstance(strategy.pattern, Pattern):
            raise ValueError(
                f"strategy=BlockSparse({strategy.pattern!r}): a registered attention needs a fixed pattern "
                f"(dc.patterns.sliding_window(w), local(b), ...); 'auto' reads a model's mask from its graph, which "
                f"torch.compile(model, backend='dilated', options={{'strategy': dc.BlockSparse('auto')}}) does")
        if strategy.pattern.grid is not None:
            raise NotImplementedError(f"strategy=BlockSparse({strategy.pattern!r}): patterns on a grid have no "
                                      f"token order for generation")
        return
    raise TypeError(f"strategy must be a dc.Dilated or a dc.BlockSparse with a pattern, got {strategy!r}")


def _mask_parts(fn, depth: int = 0) -> list[str]:
    """The names of the mask functions ``fn`` combines (transformers builds masks as closures over closures)."""
    name = getattr(fn, "__qualname__", type(fn).__name__)
    inner = []
    for cell in getattr(fn, "__closure__", None) or ():
        value = cell.cell_contents
        values = value if isinstance(value, (tuple, list)) else (value,)
        inner += [part for v in values if callable(v) and depth < 4 for part in _mask_parts(v, depth + 1)]
    return inner or [name.split(".<locals>")[0]]


def _mask_kind(mask_function) -> str:
    """'' for a plain causal or bidirectional mask function, else what it is."""
    if mask_function in (masking_utils.causal_mask_function, masking_utils.bidirectional_mask_function):
        return ""
    parts = [p for p in _mask_parts(mask_function) if p not in ("causal_mask_function", "and_masks", "or_masks")]
    return "a mask of " + " and ".join(parts or ["a custom mask function"])


def _mask_function() -> Callable:
    def dilate_compiler_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                             mask_function: Callable = masking_utils.causal_mask_function,
                             attention_mask: Optional[Tensor] = None, **kwargs):
        kind = _mask_kind(mask_function)
        if kind:
            raise NotImplementedError(
                f"this model's layer builds {kind}: a registered dilate_compiler strategy replaces a plain causal "
                f"or bidirectional pattern only (it would drop the model's own pattern, not refine it)")
        if attention_mask is None:
            return None
        attention_mask = attention_mask[:, -kv_length:]
        if torch.compiler.is_compiling():
            return attention_mask   # no data-dependent branch in a traced graph; an all-True row costs the kernels nothing
        if attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
            return None
        return attention_mask
    return dilate_compiler_mask


def _key_keep(attention_mask: Optional[Tensor], key: Tensor) -> Optional[Tensor]:
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise NotImplementedError(
            f"attention_mask of shape {tuple(attention_mask.shape)}: a registered dilate_compiler strategy takes the "
            f"model's 2-D padding mask [B, N] (a prepared 4-D mask would have to be read as a pattern)")
    if attention_mask.shape[1] != key.shape[2]:
        raise ValueError(f"the padding mask covers {attention_mask.shape[1]} keys, the keys are {key.shape[2]}: "
                         f"a cache whose get_mask_sizes disagrees with the keys it returns")
    return attention_mask.to(device=key.device, dtype=torch.bool)


def attention_function(strategy) -> Callable:
    """The transformers attention function running ``strategy`` (``register`` installs it)."""
    _check_strategy(strategy)

    def dilate_compiler_attention(module, query: Tensor, key: Tensor, value: Tensor,
                                  attention_mask: Optional[Tensor], dropout: float = 0.0,
                                  scaling: Optional[float] = None, is_causal: Optional[bool] = None, **kwargs):
        layer = type(module).__name__
        softcap = kwargs.get("softcap")   # Gemma2's attn_logit_softcapping: the ops cap the scaled scores
        if kwargs.get("sliding_window") is not None:
            raise NotImplementedError(
                f"{layer}: the layer has its own sliding window ({kwargs['sliding_window']}); a registered strategy "
                f"replaces a plain causal or bidirectional pattern only")
        config = getattr(module, "config", None)
        if getattr(config, "is_encoder_decoder", False):
            raise NotImplementedError(f"{layer}: encoder-decoder models (cross-attention) are not supported by a "
                                      f"registered dilate_compiler strategy")
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        causal = bool(causal)
        n_q, n_k = query.shape[2], key.shape[2]
        if not causal and n_q != n_k:
            raise NotImplementedError(
                f"{layer}: a non-causal layer with {n_q} queries over {n_k} keys (cross-attention or non-causal "
                f"decoding) has no positional pattern to run")
        keep = _key_keep(attention_mask, key)
        if isinstance(strategy, Dilated):
            out = ops.dilated_attention(query, key, value, strategy.segment_lengths, strategy.dilation_rates,
                                        is_causal=causal, scale=scaling, mixing=strategy.mixing,
                                        head_offsets=strategy.head_offsets,
                                        dropout_p=float(dropout) if module.training else 0.0, key_keep=keep,
                                        softcap=softcap)
        else:
            if module.training and dropout:
                raise NotImplementedError(f"{layer}: attention dropout ({dropout}) in training: the block-sparse op "
                                          f"has no dropout")
            out = ops.block_sparse_attention(query, key, value, strategy.pattern, block_size=strategy.block_size,
                                             is_causal=causal, scale=scaling, key_keep=keep, softcap=softcap)
        return out.transpose(1, 2).contiguous(), None

    dilate_compiler_attention.strategy = strategy
    return dilate_compiler_attention


def register(name: str = "dilated", strategy=None) -> str:
    """Register ``strategy`` with transformers as ``attn_implementation=name``; returns ``name``.

    Args:
        name: the implementation's name (``from_config(..., attn_implementation=name)``,
            ``model.set_attn_implementation(name)``); registering a name again replaces its strategy.
        strategy: a ``dc.Dilated`` or a ``dc.BlockSparse`` with a pattern.
    """
    if not isinstance(name, str) or not name or name in ("eager", "sdpa", "flex_attention") \
            or name.startswith("flash_attention") or "/" in name:
        raise ValueError(f"name must be a new implementation name (not eager, sdpa, flash_attention_*, "
                         f"flex_attention, nor a hub path with '/'), got {name!r}")
    if strategy is None:
        raise ValueError("strategy is required: dc.hf.register(name='dilated', strategy=dc.Dilated(...))")
    function = attention_function(strategy)
    modeling_utils.AttentionInterface.register(name, function)
    masking_utils.AttentionMaskInterface.register(name, _mask_function())
    return name


# --- the evicting cache ------------------------------------------------------------------------------------------


def _term_reaches(pattern: Pattern) -> list[tuple[Optional[int], Optional[int]]]:
    """Per term: ``(tokens, blocks)``, how far back a causal query links (key ``>= p - tokens`` and key block
    ``>= block(p) - blocks``; None: no bound of that kind). Raises when a term reaches arbitrarily far back or
    depends on absolute positions."""
    reaches = []
    for t in pattern.terms:
        if t.p != UNBOUNDED or t.j != UNBOUNDED or t.uses_grid:
            raise NotImplementedError(
                f"pattern {pattern!r}: a term bound to absolute positions (global tokens, ...) keeps its keys "
                f"forever; nothing can be evicted (use transformers' DynamicCache)")
        tokens = t.d[1] if t.d[1] < INF else None
        blocks = None
        for bs in t.blocks:
            if not isinstance(bs, LocalBlocks):
                raise NotImplementedError(
                    f"pattern {pattern!r}: the block set {bs!r} links keys arbitrarily far back or depends on "
                    f"absolute block numbers; nothing can be evicted (use transformers' DynamicCache)")
            back = bs.window_blocks - 1
            blocks = back if blocks is None else min(blocks, back)
        if tokens is None and blocks is None:
            raise NotImplementedError(f"pattern {pattern!r}: a term links every earlier key; nothing can be evicted "
                                      f"(use transformers' DynamicCache)")
        reaches.append((tokens, blocks))
    return reaches


def first_needed_key(strategy) -> Callable[[int], int]:
    """``start(n)``: the first key position any query at position ``>= n`` links under ``strategy`` (causal), rounded
    down so that the pattern on positions ``>= start`` counted from 0 is the pattern on the full sequence (a
    multiple of ``lcm(segment lengths)`` for ``Dilated``, of the block size for a block-sparse pattern)."""
    _check_strategy(strategy)
    if isinstance(strategy, Dilated):
        period = math.lcm(*strategy.segment_lengths)
        return lambda n: (n // period) * period
    bs = strategy.block_size
    reaches = _term_reaches(strategy.pattern)

    def start(n: int) -> int:
        first = n
        for tokens, blocks in reaches:    # a term's keys satisfy all its bounds; the pattern's, any term's
            lo = -INF
            if tokens is not None:
                lo = max(lo, n - tokens)
            if blocks is not None:
                lo = max(lo, (n // bs - blocks) * bs)
            first = min(first, lo)
        return max(0, first // bs * bs)
    return start


class EvictingLayer(DynamicLayer):
    """A ``DynamicLayer`` that drops the keys no future query links under ``strategy`` (``EvictingCache``)."""

    is_sliding = False

    def __init__(self, strategy):
        super().__init__()
        self.strategy = strategy
        self.start = first_needed_key(strategy)
        self.cumulative_length = 0   # tokens seen (the positions RoPE counts); the held keys start at self.first
        self.first = 0

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        first = self.start(self.cumulative_length)
        if first > self.first:
            drop = first - self.first
            self.keys, self.values = self.keys[..., drop:, :], self.values[..., drop:, :]
            self.first = first
        self.cumulative_length += key_states.shape[-2]
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int, *args) -> tuple[int, int]:
        first = max(self.first, self.start(self.cumulative_length))
        return self.cumulative_length - first + query_length, first

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1

    def held(self) -> int:
        """The number of keys held now."""
        return 0 if not self.is_initialized or self.keys is None else self.keys.shape[-2]

    def reset(self) -> None:
        super().reset()
        self.cumulative_length, self.first = 0, 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0 or -tokens_to_remove > self.held():
            raise NotImplementedError(f"crop({tokens_to_remove}) of an evicting cache: only removing up to the "
                                      f"{self.held()} held tokens (a negative count) is supported")
        super().crop(tokens_to_remove)
        self.cumulative_length += tokens_to_remove


class EvictingCache(Cache):
    """A transformers ``Cache`` for causal generation with ``strategy`` that keeps only the keys a future query links
    (the module docstring says which). Pass it as the model's cache (``generate(..., past_key_values=cache)``).

    Args:
        strategy: the registered strategy (``dc.Dilated``, or ``dc.BlockSparse`` with a pattern of bounded reach).
        num_layers: create the layers now; by default one is added per layer as the model first updates it.
    """

    def __init__(self, strategy, num_layers: Optional[int] = None):
        first_needed_key(strategy)   # checks the strategy before any layer exists
        if num_layers is None:
            super().__init__(layer_class_to_replicate=functools.partial(EvictingLayer, strategy))
        else:
            super().__init__(layers=[EvictingLayer(strategy) for _ in range(num_layers)])
        self.strategy = strategy

    def held(self) -> list[int]:
        """Keys held per layer."""
        return [layer.held() for layer in self.layers]
