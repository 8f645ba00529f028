"""Recognise attention in a dynamo (torch-level) FX graph.

Two shapes reach us from HF models: one `F.scaled_dot_product_attention` call, and the
eager chain `matmul -> (*scale) -> (+ mask) -> softmax(-1) -> (to) -> (dropout p=0) -> matmul`.
Each matcher checks every guard before returning a match; a near miss returns a reason.
"""
from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

SDPA_TARGETS = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)
MATMUL_TARGETS = (torch.matmul, operator.matmul)
SOFTMAX_TARGETS = (F.softmax, torch.softmax)
DROPOUT_TARGETS = (F.dropout, torch.dropout)
CAST_METHODS = ("to", "type", "float")


@dataclass
class AttentionMatch:
    """One attention found in the graph, with K/V at their true KV-head count."""

    anchor: fx.Node           # the node whose value is the attention output [B, Hq, Sq, Dv]
    q: fx.Node
    k: fx.Node
    v: fx.Node
    kv_heads: int
    scale: float
    mask: fx.Node | None      # bool mask, or additive float mask (see `additive`)
    additive: bool
    is_causal: bool
    form: str                 # "sdpa" | "eager"


class NotAttention(Exception):
    """A pattern that looks like attention but is not one we may replace; the message says why."""


def example(node: Any) -> torch.Tensor | None:
    """The example (fake) tensor dynamo recorded for a node, if any."""
    if not isinstance(node, fx.Node):
        return None
    value = node.meta.get("example_value", node.meta.get("val"))
    return value if isinstance(value, torch.Tensor) else None


def layer_name(node: fx.Node) -> str:
    """`model.layers.0.self_attn` from dynamo's module stack (the innermost module)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return node.name
    path = list(stack.values())[-1][0]
    path = re.sub(r"^L\[[^\]]*\](\[\d+\])*\.?", "", path)  # dynamo's name for the root module
    return re.sub(r"\[['\"]?([^\]'\"]*)['\"]?\]", r".\1", path).replace("._modules.", ".").strip(".")


def is_call(node: Any, targets: tuple, method: str | None = None) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function" and node.target in targets:
        return True
    return method is not None and node.op == "call_method" and node.target == method


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def undo_repeat_kv(node: fx.Node) -> tuple[fx.Node, int]:
    """If `node` is HF's `repeat_kv(x, n)` (getitem[:, :, None] -> expand -> reshape), return (x, kv heads)."""
    expand = node.args[0] if is_call(node, (torch.reshape,), "reshape") else None
    source = expand.args[0] if is_call(expand, (), "expand") else None
    if not is_call(source, (operator.getitem,)):
        return node, example(node).shape[1]
    index = source.args[1]
    expected = (slice(None), slice(None), None, slice(None), slice(None))
    if not isinstance(index, tuple) or index != expected:
        return node, example(node).shape[1]
    base = source.args[0]
    return base, example(base).shape[1]


def _check_qkv(q: fx.Node, k: fx.Node, v: fx.Node) -> None:
    shapes = [example(x) for x in (q, k, v)]
    if any(s is None or s.dim() != 4 for s in shapes):
        raise NotAttention("q, k, v are not 4-D [B, H, S, D] tensors")
    if shapes[0].shape[1] % shapes[1].shape[1]:
        raise NotAttention(f"{shapes[0].shape[1]} query heads are not a multiple of {shapes[1].shape[1]} kv heads")


def match_sdpa(node: fx.Node) -> AttentionMatch:
    """`F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)`."""
    q, k, v = node.args[:3]
    mask = arg(node, 3, "attn_mask")
    dropout = arg(node, 4, "dropout_p", 0.0)
    is_causal = bool(arg(node, 5, "is_causal", False))
    scale = arg(node, 6, "scale")
    if not isinstance(dropout, (int, float)) or dropout != 0.0:
        raise NotAttention(f"dropout_p={dropout} inside attention; use eval() or attention_dropout=0")
    if is_causal and mask is not None:
        raise NotAttention("both is_causal and attn_mask are given")
    if scale is not None and not isinstance(scale, (int, float)):
        raise NotAttention(f"scale={scale} is computed at run time (a symbolic head size?); left alone")
    k, kv_heads = undo_repeat_kv(k)
    v, v_heads = undo_repeat_kv(v)
    if kv_heads != v_heads:
        raise NotAttention(f"k has {kv_heads} heads but v has {v_heads}")
    _check_qkv(q, k, v)
    if is_causal and example(q).shape[2] != example(k).shape[2]:
        raise NotAttention("is_causal with different query and key lengths (top-left aligned) is not lifted")
    head_dim = example(q).shape[-1]
    mask_value = example(mask)
    additive = mask_value is not None and mask_value.dtype != torch.bool
    return AttentionMatch(node, q, k, v, kv_heads, float(scale) if scale is not None else 1 / math.sqrt(head_dim),
                          mask, additive, is_causal, "sdpa")


def _is_cast(node: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_method" and node.target in CAST_METHODS


def _single_user(node: fx.Node, what: str) -> None:
    if len(node.users) != 1:
        raise NotAttention(f"the {what} ({node.name}) is also used elsewhere (output_attentions?); left alone")


def _strip_probability_epilogue(probs: fx.Node) -> fx.Node:
    """Walk back over `dropout(p=0 or eval)` and dtype casts to the softmax node."""
    while True:
        if is_call(probs, DROPOUT_TARGETS, "dropout"):
            p, training = arg(probs, 1, "p", 0.5), arg(probs, 2, "training", True)
            if p != 0.0 and training is not False:
                raise NotAttention(f"attention dropout p={p} in training mode; use eval() or attention_dropout=0")
        elif not _is_cast(probs):
            return probs
        _single_user(probs, "attention probabilities")
        probs = probs.args[0]


def _softmax_input(softmax: fx.Node) -> fx.Node:
    if not is_call(softmax, SOFTMAX_TARGETS, "softmax"):
        raise NotAttention("the left operand of the final matmul is not a softmax")
    _single_user(softmax, "softmax")
    dim = arg(softmax, 1, "dim")
    if dim not in (-1, 3):
        raise NotAttention(f"softmax over dim {dim}, not over the keys (dim -1)")
    return softmax.args[0]


def _split_mask(scores: fx.Node) -> tuple[fx.Node, fx.Node | None]:
    """`scores + mask` -> (scores, mask); the mask is the operand that is not a matmul chain."""
    if not is_call(scores, (operator.add, torch.add), "add"):
        return scores, None
    _single_user(scores, "masked scores")
    left, right = scores.args[:2]
    if not isinstance(left, fx.Node) or not isinstance(right, fx.Node):
        raise NotAttention("scores are shifted by a constant, not a mask")
    return left, right


def _split_scale(scores: fx.Node) -> tuple[fx.Node, float]:
    if is_call(scores, (operator.mul, torch.mul), "mul") and isinstance(scores.args[1], (int, float)):
        _single_user(scores, "scaled scores")
        return scores.args[0], float(scores.args[1])
    if is_call(scores, (operator.truediv, torch.div), "div") and isinstance(scores.args[1], (int, float)):
        _single_user(scores, "scaled scores")
        return scores.args[0], 1.0 / float(scores.args[1])
    return scores, 1.0


def _key_of(transposed: Any) -> fx.Node:
    if not is_call(transposed, (torch.transpose,), "transpose"):
        raise NotAttention("the keys of q @ k^T are not a transpose of the last two dims")
    dims = tuple(d % 4 for d in transposed.args[1:3])
    if sorted(dims) != [2, 3]:
        raise NotAttention(f"keys are transposed over dims {dims}, not the last two")
    _single_user(transposed, "transposed keys")
    return transposed.args[0]


def match_eager(node: fx.Node) -> AttentionMatch:
    """`softmax(q @ k^T * scale + mask, -1) @ v`, HF's eager_attention_forward."""
    probs, v = node.args[:2]
    softmax = _strip_probability_epilogue(probs)
    scores, mask = _split_mask(_softmax_input(softmax))
    scores, scale = _split_scale(scores)
    if not is_call(scores, MATMUL_TARGETS):
        raise NotAttention("softmax input is not q @ k^T")
    _single_user(scores, "raw scores")
    q, k = scores.args[0], _key_of(scores.args[1])
    k, kv_heads = undo_repeat_kv(k)
    v, v_heads = undo_repeat_kv(v)
    if kv_heads != v_heads:
        raise NotAttention(f"k has {kv_heads} heads but v has {v_heads}")
    _check_qkv(q, k, v)
    return AttentionMatch(node, q, k, v, kv_heads, scale, mask, mask is not None, False, "eager")


def looks_like_eager_attention(node: fx.Node) -> bool:
    """A matmul whose left operand is (a cast/dropout of) a softmax: worth trying `match_eager`."""
    if not is_call(node, MATMUL_TARGETS):
        return False
    probs = node.args[0]
    for _ in range(4):
        if is_call(probs, SOFTMAX_TARGETS, "softmax"):
            return True
        if not (is_call(probs, DROPOUT_TARGETS, "dropout") or _is_cast(probs)):
            return False
        probs = probs.args[0]
    return False
