"""Double Sparsity at decode: attend only to the keys a few channels say matter.

`sparsity` attribute text: `double(tokens=K, channels=[[c, ...], ...])`, one list of channel
indices per KV head (found offline, `seqweave.double_sparsity.calibrate`). For each query the
approximate scores `q[C_h] . k[C_h]` over the visible keys (the "label cache": only those
channels of each key are read) pick the `K` best keys; exact attention then runs over those
alone. An approximation: `seqweave.double_sparsity` reports how many of the exact top-K keys
it keeps (recall). Rows that see at most K keys are exact.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from seqweave.errors import OptionError
from seqweave.ir.mask import Dense, MaskSpec

_TEXT = re.compile(r"^double\(tokens=(\d+), channels=(\[.*\])\)$")


@dataclass(frozen=True)
class DoubleSparsity:
    tokens: int
    channels: tuple[tuple[int, ...], ...]  # per KV head

    def __str__(self) -> str:
        return f"double(tokens={self.tokens}, channels={json.dumps([list(c) for c in self.channels])})"


def parse_sparsity(text: str | None) -> DoubleSparsity | None:
    if text in (None, "none"):
        return None
    found = _TEXT.match(text.strip())
    if not found:
        raise ValueError(f"cannot parse sparsity {text!r}: expected 'double(tokens=K, channels=[[...], ...])'")
    channels = json.loads(found.group(2))
    return DoubleSparsity(int(found.group(1)), tuple(tuple(int(c) for c in head) for head in channels))


def label_scores(q: Tensor, k: Tensor, sparsity: DoubleSparsity) -> Tensor:
    """Approximate scores [B, Hq, Sq, Skv] from the chosen channels of each KV head."""
    kv_heads = k.shape[1]
    if len(sparsity.channels) != kv_heads:
        raise ValueError(f"double sparsity was calibrated for {len(sparsity.channels)} KV heads, not {kv_heads}")
    index = torch.tensor(sparsity.channels, device=k.device)  # [Hkv, r]
    group = q.shape[1] // kv_heads
    k_labels = torch.gather(k.float(), 3, index[None, :, None, :].expand(k.shape[0], -1, k.shape[2], -1))
    q_labels = torch.gather(q.float(), 3, index.repeat_interleave(group, 0)[None, :, None, :]
                            .expand(q.shape[0], -1, q.shape[2], -1))
    return q_labels @ k_labels.repeat_interleave(group, 1).transpose(-1, -2)


def selected_keys(q: Tensor, k: Tensor, mask: MaskSpec, operands: Sequence[Tensor],
                  sparsity: DoubleSparsity) -> Tensor:
    """Bool [B, Hq, Sq, Skv]: the `tokens` visible keys with the best label scores, per query."""
    allowed = mask.evaluate(torch.arange(q.shape[2], device=q.device), torch.arange(k.shape[2], device=q.device),
                            operands).to(q.device)
    scores = label_scores(q, k, sparsity).masked_fill(~allowed, float("-inf"))
    count = min(sparsity.tokens, k.shape[2])
    best = scores.topk(count, dim=-1).indices
    chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, best, True)
    return chosen & allowed


def sparse_attend(kernel: Callable, operands: Sequence[Tensor], sparsity: DoubleSparsity | None) -> Callable:
    """`attend(q, k, v, mask)` over `kernel(q, k, v, mask, operands)`, restricted to the selected keys."""
    def attend(q: Tensor, k: Tensor, v: Tensor, mask: MaskSpec):
        if sparsity is None:
            return kernel(q, k, v, mask, operands)
        chosen = selected_keys(q, k, mask, operands, sparsity)
        return kernel(q, k, v, mask & Dense(len(operands)), [*operands, chosen])
    return attend


@dataclass
class ChannelTable:
    """Per attention layer, per KV head: the channel indices the label cache keeps."""

    channels: dict[int, list[list[int]]]
    tokens: int
    recall: float = float("nan")
    head_dim: int = 0

    def save(self, path: str) -> None:
        """Write the table as JSON, atomically (no half-written file on failure)."""
        directory = os.path.dirname(os.path.abspath(path))
        with tempfile.NamedTemporaryFile("w", dir=directory, delete=False, suffix=".tmp") as handle:
            json.dump({"channels": {str(k): v for k, v in self.channels.items()}, "tokens": self.tokens,
                       "recall": self.recall, "head_dim": self.head_dim}, handle)
        os.replace(handle.name, path)

    @staticmethod
    def load(path: str) -> "ChannelTable":
        try:
            with open(path) as handle:
                data = json.load(handle)
            return ChannelTable({int(k): v for k, v in data["channels"].items()}, int(data["tokens"]),
                                float(data["recall"]), int(data.get("head_dim", 0)))
        except (OSError, ValueError, KeyError) as error:
            raise OptionError(f"cannot read the double-sparsity table {path!r}: {error}",
                              hint="write one with seqweave.double_sparsity.calibrate(model, inputs).save(path)") \
                from error

    def sparsity(self, layer: int, tokens: int = 0) -> DoubleSparsity:
        return DoubleSparsity(tokens or self.tokens, tuple(tuple(head) for head in self.channels[layer]))
