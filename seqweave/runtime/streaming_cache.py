"""A rolling KV cache of `sinks + window` slots for HF `generate()` (StreamingLLM, LM-Infinite).

HF rotates each key by its true position before caching it. Keys kept in the window then
already sit at their true distance from every later query, as StreamingLLM's cache-slot
positions give them; only the sink keys need another distance once tokens were evicted:
StreamingLLM sees sink j at `sinks + window - 1 - j`, LM-Infinite at `min(t - j, max_distance)`.
Rotations compose, so at each decode step the sinks are rotated further by the difference
(`rerotated_sinks`), from their stored copy, never accumulating error.

Slots: token p < sinks stays in slot p; later tokens take slot `sinks + (p - sinks) % window`,
overwriting the oldest. Writes are `index_copy_` at tensor positions and the step's position
is a tensor too, so one compiled decode graph serves every token (no recompiling), and the
cache's memory is the same after a million tokens as after `sinks + window`.

The prefill attends over the whole prompt (the compiled prefill graph, with the `streaming`
or `lm-infinite` pass, applies the same semantics to it) and keeps only what survives.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers.cache_utils import Cache, StaticLayer

from seqweave.errors import OptionError
from seqweave.ir.positions import rotate_half


def rotary_frequencies(model: torch.nn.Module) -> Tensor:
    """The inverse frequencies of the model's rotary embedding (its `inv_freq` buffer)."""
    for name, buffer in model.named_buffers():
        if name.endswith("inv_freq"):
            return buffer.detach().float()
    raise OptionError(f"{type(model).__name__} has no rotary embedding (no inv_freq buffer)",
                      hint="StreamingCache re-rotates sink keys, which only rotary models need; use HF's caches")


class StreamingLayer(StaticLayer):
    """One layer's rolling cache; see the module docstring."""

    def __init__(self, sinks: int, window: int, inv_freq: Tensor, max_distance: int = 0) -> None:
        super().__init__(max_cache_len=sinks + window)
        self.sinks, self.window, self.max_distance = sinks, window, max_distance
        self.inv_freq = inv_freq
        self.prefilled = False

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.inv_freq = self.inv_freq.to(self.device)
        length = key_states.shape[-2]
        if not self.prefilled:
            self._keep_survivors(key_states, value_states)
            self.prefilled = True
            return key_states, value_states
        if length != 1:
            raise OptionError(f"StreamingCache decodes one token at a time; got {length} new tokens after the prompt",
                              hint="generate with num_beams=1 and no assistant model, or prefill once with the whole prompt")
        position = self.cumulative_length.clone()
        slot = torch.where(position < self.sinks, position,
                           self.sinks + (position - self.sinks) % self.window).reshape(1)
        self.keys.index_copy_(2, slot, key_states)
        self.values.index_copy_(2, slot, value_states)
        self.cumulative_length.add_(1)
        return torch.cat((self.rerotated_sinks(position), self.keys[:, :, self.sinks:]), dim=2), self.values

    def _keep_survivors(self, key_states: Tensor, value_states: Tensor) -> None:
        """Store the prompt's sinks and its last `window` tokens in their slots."""
        length = key_states.shape[-2]
        kept = list(range(min(self.sinks, length))) + list(range(max(self.sinks, length - self.window), length))
        positions = torch.tensor(kept, device=self.device)
        slots = torch.where(positions < self.sinks, positions, self.sinks + (positions - self.sinks) % self.window)
        self.keys.index_copy_(2, slots, key_states.index_select(2, positions))
        self.values.index_copy_(2, slots, value_states.index_select(2, positions))
        self.cumulative_length.add_(length)

    def rerotated_sinks(self, position: Tensor) -> Tensor:
        """The sink keys rotated on so a query at `position` sees them at the method's distance."""
        sinks = torch.arange(self.sinks, device=self.device)
        distance = position - sinks
        limit = self.max_distance if self.max_distance else self.sinks + self.window - 1 - sinks
        shift = (distance - limit).clamp_min(0).float()  # [sinks]
        angles = shift[:, None] * self.inv_freq
        cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
        keys = self.keys[:, :, :self.sinks]
        dims = cos.shape[-1]
        part = keys[..., :dims].float()
        rotated = (part * cos + rotate_half(part) * sin).to(keys.dtype)
        return torch.cat((rotated, keys[..., dims:]), dim=-1) if dims < keys.shape[-1] else rotated

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return (query_length, 0) if not self.prefilled else (self.max_cache_len, 0)

    def get_seq_length(self) -> Any:
        return self.cumulative_length if self.is_initialized else 0

    def get_max_length(self) -> int:
        return -1  # generate() may run past any length: the cache never grows

    def reset(self) -> None:
        super().reset()
        self.prefilled = False


class StreamingCache(Cache):
    """`generate(..., past_key_values=StreamingCache(model, sinks=4, window=1024))`: a rolling
    cache of sinks + window slots per layer. `max_distance` > 0 gives LM-Infinite's distances
    (pair it with `lm-infinite{..., max_distance=...}` in the pipeline for the prefill), else
    StreamingLLM's (pair it with `streaming{sinks=..., window=...}`)."""

    def __init__(self, model: torch.nn.Module, sinks: int = 4, window: int = 1024, max_distance: int = 0) -> None:
        if sinks < 1 or window < 1:
            raise OptionError(f"StreamingCache(sinks={sinks}, window={window}): both must be >= 1",
                              hint="e.g. StreamingCache(model, sinks=4, window=1024)")
        if max_distance and max_distance < window - 1:
            raise OptionError(f"StreamingCache(max_distance={max_distance}) is shorter than the window ({window}): "
                              "window keys would need their distance clamped too",
                              hint="use max_distance >= window - 1 (LM-Infinite uses the pretraining length)")
        config = model.config.get_text_config()
        if getattr(config, "sliding_window", None):
            raise OptionError(f"{type(model).__name__} has its own sliding window ({config.sliding_window}), whose mask "
                              "HF builds from cache slot indices as if they were positions: wrong once the cache rolls",
                              hint="set model.config.sliding_window = None (the streaming window replaces it; keep "
                                   "window <= the model's) and pass the same window to the streaming pass")
        layers = config.num_hidden_layers
        inv_freq = rotary_frequencies(model)
        super().__init__(layers=[StreamingLayer(sinks, window, inv_freq, max_distance) for _ in range(layers)])
        self.sinks, self.window = sinks, window

    def cache_bytes(self) -> int:
        """Bytes the cache holds (constant once the first token was cached)."""
        return sum(t.numel() * t.element_size() for layer in self.layers if layer.is_initialized
                   for t in (layer.keys, layer.values))
