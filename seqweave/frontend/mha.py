"""Spell torch's multi-head attention out as the FX nodes the attention matchers read.

Dynamo keeps `F.multi_head_attention_forward` (behind nn.MultiheadAttention and the
nn.Transformer*Layer modules) as one opaque node, and nn.TransformerEncoderLayer in eval mode
under no_grad takes the fused fast path `torch._transformer_encoder_layer_fwd`. Left alone,
aot_autograd would decompose either into ATen attention we never see. So before matching each
becomes the same computation written with F.linear, views and one
F.scaled_dot_product_attention, which the SDPA matcher then replaces. The steps follow torch's
`need_weights=False` path one by one, so the numerics are eager's.
"""
from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx

from seqweave.frontend.fx_build import NodeBuilder
from seqweave.frontend.patterns import FORM_META, example

FORM = "multi_head_attention"
MHA_TARGETS = (F.multi_head_attention_forward,)
ENCODER_FAST_PATH_TARGETS = (torch._transformer_encoder_layer_fwd,)
_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


class NotDecomposed(Exception):
    """A multi-head attention we must leave as it is; the message says why."""


@dataclass(frozen=True)
class Projections:
    """In- and out-projection parameters: a packed [3E, E] weight, or separate q/k/v weights."""

    in_weight: fx.Node | None
    in_bias: fx.Node | None
    separate: tuple[fx.Node, fx.Node, fx.Node] | None
    out_weight: fx.Node
    out_bias: fx.Node | None


@dataclass(frozen=True)
class Attention:
    """One multi-head attention on sequence-first inputs: query [L, B, E], key/value [S, B, E]."""

    query: fx.Node
    key: fx.Node
    value: fx.Node
    heads: int
    proj: Projections
    mask: fx.Node | None  # additive, broadcastable to [B, H, L, S]
    is_causal: bool


def decompose_multi_head_attention(graph: fx.Graph) -> list[tuple[fx.Node, str]]:
    """Rewrite every multi-head attention node of `graph` it may; returns (node, reason) for the rest."""
    refused = []
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        try:
            if node.target in MHA_TARGETS:
                _decompose_mha(node)
            elif node.target in ENCODER_FAST_PATH_TARGETS:
                _decompose_encoder_layer(node)
        except NotDecomposed as why:
            refused.append((node, str(why)))
    return refused


# --- F.multi_head_attention_forward -------------------------------------------------------

def _decompose_mha(node: fx.Node) -> None:
    bound = _MHA_SIGNATURE.bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    p = bound.arguments
    _check_mha(node, p)
    builder = NodeBuilder(node)
    proj = Projections(p["in_proj_weight"], p["in_proj_bias"],
                       (p["q_proj_weight"], p["k_proj_weight"], p["v_proj_weight"])
                       if p["use_separate_proj_weight"] else None, p["out_proj_weight"], p["out_proj_bias"])
    mask, is_causal = _merged_mask(builder, p)
    out = _attention(builder, Attention(p["query"], p["key"], p["value"], p["num_heads"], proj, mask, is_causal))
    for user in list(node.users):  # checked: only `result[0]` is read
        user.replace_all_uses_with(out)
        node.graph.erase_node(user)
    node.graph.erase_node(node)


def _check_mha(node: fx.Node, p: dict) -> None:
    """Every reason torch's computation could differ from the one `_attention` spells."""
    _check_options(p)
    _check_operands(p)
    _check_users(node)


def _check_options(p: dict) -> None:
    if p["need_weights"]:
        raise NotDecomposed("need_weights=True: the attention weights are returned, and the fused op "
                            "never builds them; call it with need_weights=False")
    if p["training"] and _number(p["dropout_p"]) != 0.0:
        raise NotDecomposed(f"dropout_p={p['dropout_p']} in training mode; use eval() or dropout=0")
    if p["bias_k"] is not None or p["bias_v"] is not None:
        raise NotDecomposed("bias_k/bias_v (add_bias_kv=True) append a learned key and value")
    if p["add_zero_attn"]:
        raise NotDecomposed("add_zero_attn=True appends a zero key and value")
    if p["static_k"] is not None or p["static_v"] is not None:
        raise NotDecomposed("static_k/static_v replace the projected keys or values")
    if p["is_causal"] and p["attn_mask"] is None:
        raise NotDecomposed("is_causal=True without attn_mask (torch itself refuses this)")


def _check_operands(p: dict) -> None:
    _check_shapes(p["query"], p["key"], p["value"], p["num_heads"])
    if p["use_separate_proj_weight"] and any(p[name] is None for name in ("q_proj_weight", "k_proj_weight",
                                                                         "v_proj_weight")):
        raise NotDecomposed("use_separate_proj_weight=True but a q/k/v projection weight is missing")
    if not p["use_separate_proj_weight"] and p["in_proj_weight"] is None:
        raise NotDecomposed("no in_proj_weight")
    for name in ("attn_mask", "key_padding_mask"):
        _check_mask(p[name], name)


def _number(value: object) -> float:
    if not isinstance(value, (int, float)):
        raise NotDecomposed(f"dropout_p={value} is computed at run time")
    return float(value)


def _check_shapes(query: object, key: object, value: object, heads: object) -> None:
    values = [example(x) for x in (query, key, value)]
    if any(v is None for v in values):
        raise NotDecomposed("query, key or value is not a tensor in the graph")
    if any(v.dim() != 3 for v in values):
        raise NotDecomposed("unbatched (2-D) query/key/value; give them a batch dimension")
    if any(isinstance(size, torch.SymInt) for v in values for size in v.shape):
        raise NotDecomposed("symbolic sizes (dynamic shapes); compile with dynamic=False")
    if not isinstance(heads, int) or values[0].shape[2] % heads:
        raise NotDecomposed(f"embed_dim {values[0].shape[2]} is not a multiple of num_heads={heads}")


def _check_mask(mask: object, name: str) -> None:
    if mask is None:
        return
    value = example(mask)
    if value is None or not (value.dtype == torch.bool or value.dtype.is_floating_point):
        raise NotDecomposed(f"{name} is neither a bool nor a float tensor")


def _check_users(node: fx.Node) -> None:
    for user in node.users:
        if user.op != "call_function" or user.target is not operator.getitem or user.args[1] != 0:
            raise NotDecomposed(f"its result is read other than as result[0] (by {user.name})")


def _canonical(builder: NodeBuilder, mask: fx.Node | None, dtype: torch.dtype) -> fx.Node | None:
    """torch's `_canonical_mask`: a bool mask (True = hidden) becomes 0 / -inf in the query's dtype.

    Out of place (torch writes `masked_fill_` on a fresh tensor): the same values, and a node that
    writes nothing can be dropped once the mask is lifted.
    """
    if mask is None or example(mask).dtype != torch.bool:
        return mask
    zeros = builder.call(torch.zeros_like, mask, dtype=dtype)
    return builder.method("masked_fill", zeros, mask, float("-inf"))


def _merged_mask(builder: NodeBuilder, p: dict) -> tuple[fx.Node | None, bool]:
    """The additive mask SDPA gets and its is_causal flag, decided as torch decides them.

    torch sums attn_mask [L, S] or [B*H, L, S] and key_padding_mask [B, S] as [B*H, L, S] and
    views the sum as [B, H, L, S]. We add the same two numbers at every position, broadcast as
    [1|B, 1|H, L, S] + [B, 1, 1, S], so the mask is never built per head and lifting reads it
    row by row.
    """
    dtype = example(p["query"]).dtype
    batch, heads = example(p["query"]).shape[1], p["num_heads"]
    padding = _canonical(builder, p["key_padding_mask"], dtype)
    if p["is_causal"] and padding is None:
        return None, True  # torch trusts the hint and drops attn_mask (need_weights is False)
    attn = _canonical(builder, p["attn_mask"], dtype)
    parts = []
    if attn is not None:
        length, source = example(attn).shape[-2:]
        shape = (1, 1, length, source) if example(attn).dim() == 2 else (batch, heads, length, source)
        parts.append(builder.method("view", attn, *shape))
    if padding is not None:
        parts.append(builder.method("view", padding, batch, 1, 1, example(padding).shape[-1]))
    mask = parts[0] if len(parts) == 1 else builder.call(operator.add, *parts) if parts else None
    return mask, p["is_causal"] and padding is None


# --- the attention itself -----------------------------------------------------------------

def _attention(builder: NodeBuilder, attn: Attention) -> fx.Node:
    """in-projection -> [B, H, N, Dh] -> SDPA -> out-projection; returns attn_output [L, B, E]."""
    length, batch, embed = example(attn.query).shape
    source, heads = example(attn.key).shape[0], attn.heads
    head_dim = embed // heads
    q, k, v = _in_projection(builder, attn)
    q = builder.method("transpose", builder.method("view", q, length, batch * heads, head_dim), 0, 1)
    k = builder.method("transpose", builder.method("view", k, source, batch * heads, head_dim), 0, 1)
    v = builder.method("transpose", builder.method("view", v, source, batch * heads, head_dim), 0, 1)
    q = builder.method("view", q, batch, heads, length, head_dim)
    k = builder.method("view", k, batch, heads, source, head_dim)
    v = builder.method("view", v, batch, heads, source, head_dim)
    out = builder.call(F.scaled_dot_product_attention, q, k, v, attn.mask, 0.0, attn.is_causal)
    out.meta[FORM_META] = FORM
    out = builder.method("reshape", builder.method("permute", out, 2, 0, 1, 3), batch * length, embed)
    out = builder.call(F.linear, out, attn.proj.out_weight, attn.proj.out_bias)
    return builder.method("view", out, length, batch, embed)


def _in_projection(builder: NodeBuilder, attn: Attention) -> tuple[fx.Node, fx.Node, fx.Node]:
    """torch's `_in_projection_packed` / `_in_projection`, branch for branch."""
    proj, embed = attn.proj, example(attn.query).shape[-1]
    if proj.separate is not None:
        biases = _chunks(builder, proj.in_bias, 3)
        return tuple(builder.call(F.linear, x, w, b) for x, w, b in
                     zip((attn.query, attn.key, attn.value), proj.separate, biases))
    if attn.key is attn.value and attn.query is attn.key:  # self-attention: one packed projection
        return _unpack(builder, builder.call(F.linear, attn.query, proj.in_weight, proj.in_bias), 3, embed)
    if attn.key is attn.value:  # encoder-decoder attention: q alone, k and v packed
        w_q, w_kv = _splits(builder, proj.in_weight, embed)
        b_q, b_kv = _splits(builder, proj.in_bias, embed)
        k, v = _unpack(builder, builder.call(F.linear, attn.key, w_kv, b_kv), 2, embed)
        return builder.call(F.linear, attn.query, w_q, b_q), k, v
    weights, biases = _chunks(builder, proj.in_weight, 3), _chunks(builder, proj.in_bias, 3)
    return tuple(builder.call(F.linear, x, w, b) for x, w, b in
                 zip((attn.query, attn.key, attn.value), weights, biases))


def _unpack(builder: NodeBuilder, proj: fx.Node, parts: int, embed: int) -> tuple[fx.Node, ...]:
    """`proj.unflatten(-1, (parts, E)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()`, split."""
    packed = builder.method("unflatten", proj, -1, (parts, embed))
    packed = builder.method("squeeze", builder.method("transpose", builder.method("unsqueeze", packed, 0), 0, -2), -2)
    packed = builder.method("contiguous", packed)
    return tuple(builder.call(operator.getitem, packed, index) for index in range(parts))


def _chunks(builder: NodeBuilder, tensor: fx.Node | None, parts: int) -> tuple:
    if tensor is None:
        return (None,) * parts
    chunks = builder.method("chunk", tensor, parts)
    return tuple(builder.call(operator.getitem, chunks, index) for index in range(parts))


def _splits(builder: NodeBuilder, tensor: fx.Node | None, embed: int) -> tuple:
    if tensor is None:
        return None, None
    halves = builder.method("split", tensor, [embed, 2 * embed])
    return builder.call(operator.getitem, halves, 0), builder.call(operator.getitem, halves, 1)


# --- torch._transformer_encoder_layer_fwd (nn.TransformerEncoderLayer's eval fast path) ----

_ENCODER_ARGS = ("src", "embed_dim", "num_heads", "qkv_weight", "qkv_bias", "proj_weight", "proj_bias",
                 "use_gelu", "norm_first", "eps", "norm_weight_1", "norm_bias_1", "norm_weight_2",
                 "norm_bias_2", "ffn_weight_1", "ffn_bias_1", "ffn_weight_2", "ffn_bias_2", "mask", "mask_type")


def _decompose_encoder_layer(node: fx.Node) -> None:
    """The fused layer as nn.TransformerEncoderLayer's ordinary forward computes it (batch_first)."""
    p = {"mask": None, "mask_type": None, **dict(zip(_ENCODER_ARGS, node.args)), **node.kwargs}
    src = p["src"]
    _check_shapes(src, src, src, p["num_heads"])
    _check_mask(p["mask"], "mask")
    _check_fast_path_mask(p)
    builder = NodeBuilder(node)
    proj = Projections(p["qkv_weight"], p["qkv_bias"], None, p["proj_weight"], p["proj_bias"])
    mask = _fast_path_mask(builder, p)

    def self_attention(x: fx.Node) -> fx.Node:
        seq_first = builder.method("transpose", x, 1, 0)  # what MultiheadAttention does for batch_first
        out = _attention(builder, Attention(seq_first, seq_first, seq_first, p["num_heads"], proj, mask, False))
        return builder.method("transpose", out, 1, 0)

    def feed_forward(x: fx.Node) -> fx.Node:
        hidden = builder.call(F.linear, x, p["ffn_weight_1"], p["ffn_bias_1"])
        hidden = builder.call(F.gelu if p["use_gelu"] else F.relu, hidden)
        return builder.call(F.linear, hidden, p["ffn_weight_2"], p["ffn_bias_2"])

    def norm(x: fx.Node, which: int) -> fx.Node:
        return builder.call(F.layer_norm, x, (p["embed_dim"],), p[f"norm_weight_{which}"],
                            p[f"norm_bias_{which}"], p["eps"])

    if p["norm_first"]:
        x = builder.call(operator.add, src, self_attention(norm(src, 1)))
        x = builder.call(operator.add, x, feed_forward(norm(x, 2)))
    else:
        x = norm(builder.call(operator.add, src, self_attention(src)), 1)
        x = norm(builder.call(operator.add, x, feed_forward(x)), 2)
    node.replace_all_uses_with(x)
    node.graph.erase_node(node)


def _check_fast_path_mask(p: dict) -> None:
    """mask_type 0 is attn_mask [L, S], 1 key_padding_mask [B, S], 2 both merged as [B, H, L, S]."""
    if p["mask"] is None:
        return
    shape, kind = tuple(example(p["mask"]).shape), p["mask_type"]
    if (kind, len(shape)) not in ((0, 2), (1, 2), (2, 4)):
        raise NotDecomposed(f"fast-path mask_type={kind} with a mask of shape {list(shape)}")


def _fast_path_mask(builder: NodeBuilder, p: dict) -> fx.Node | None:
    """`merge_masks`'s result (checked by `_check_fast_path_mask`) as an additive mask
    broadcastable to [B, H, L, S]."""
    mask = _canonical(builder, p["mask"], example(p["src"]).dtype)
    if mask is None:
        return None
    shape = tuple(example(mask).shape)
    if p["mask_type"] == 1:
        return builder.method("view", mask, shape[0], 1, 1, shape[-1])
    if p["mask_type"] == 0:
        return builder.method("view", mask, 1, 1, *shape)
    return mask
