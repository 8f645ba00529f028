"""Double Sparsity (Yang et al. 2024): offline channel calibration, and the decode-time rewrite.

`calibrate(model, inputs, channels=16)` runs the model once through seqweave and, per
attention layer and KV head, keeps the channels where |q| and |k| are largest together (the
channels that carry the scores: the paper's outlier channels), measured on the q and k the
attention really scores (after its rotary). It reports the recall of the approximation on
those inputs: of the exact top-K keys of each query, the share the channel scores also pick.
The table is a small JSON file; `double-sparsity{table=path, tokens=K}` in the pipeline then
restricts every decode attention (one query) to the K keys its channels pick
(`ir.ops.attn_sparsity`): each step reads r / D of every key plus K whole keys.
"""
from __future__ import annotations

from typing import Any

import torch

from seqweave.codegen.attention_observer import Observed, observe_attention
from seqweave.errors import OptionError
from seqweave.ir.ops.attn_sparsity import ChannelTable, DoubleSparsity, selected_keys
from seqweave.targets import call_model


def important_channels(q: torch.Tensor, k: torch.Tensor, channels: int) -> list[list[int]]:
    """Per KV head, the `channels` indices with the largest mean |q| x mean |k| (q heads of a group summed)."""
    kv_heads, group = k.shape[1], q.shape[1] // k.shape[1]
    q_size = q.abs().float().mean(dim=(0, 2)).view(kv_heads, group, -1).sum(1)  # [Hkv, D]
    k_size = k.abs().float().mean(dim=(0, 2))  # [Hkv, D]
    best = (q_size * k_size).topk(min(channels, q.shape[-1]), dim=-1).indices
    return [sorted(head.tolist()) for head in best]


def recall(call: Observed, sparsity: DoubleSparsity) -> tuple[float, int]:
    """(sum of per-query recall, number of queries that see more than K keys) for one call."""
    exact = DoubleSparsity(sparsity.tokens, tuple(tuple(range(call.q.shape[-1])) for _ in sparsity.channels))
    chosen = selected_keys(call.q, call.k, call.mask, call.operands, sparsity)
    truth = selected_keys(call.q, call.k, call.mask, call.operands, exact)
    visible = call.mask.evaluate(torch.arange(call.q.shape[2]), torch.arange(call.k.shape[2]), call.operands)
    crowded = (visible.sum(-1) > sparsity.tokens).expand(truth.shape[:3])
    kept = (chosen & truth).sum(-1).float() / truth.sum(-1).clamp_min(1)
    return float(kept[crowded].sum()), int(crowded.sum())


def calibrate(model: torch.nn.Module, inputs: dict[str, Any] | tuple, channels: int = 16,
              tokens: int = 64) -> ChannelTable:
    """Run `model(**inputs)` once through seqweave and pick each KV head's channels."""
    import seqweave

    compiled = torch.compile(model, backend=seqweave.backend(), fullgraph=True, dynamic=False)
    with torch.no_grad(), observe_attention() as seen:
        call_model(compiled, inputs)
    if not seen:
        raise OptionError("the model ran no attention seqweave replaced: nothing to calibrate",
                          hint="`seqweave explain` shows which attention was found and why not")
    table = ChannelTable({call.layer: important_channels(call.q, call.k, channels) for call in seen}, tokens,
                         head_dim=seen[0].q.shape[-1])
    sums = [recall(call, table.sparsity(call.layer)) for call in seen]
    counted = sum(count for _, count in sums)
    table.recall = sum(total for total, _ in sums) / counted if counted else 1.0
    return table
