"""Recognise attention in a dynamo (torch-level) FX graph.

Two shapes reach us: one `F.scaled_dot_product_attention` call, and the eager chain
`matmul -> (*scale) -> (softcap) -> (+ mask | masked_fill) -> softmax(-1) -> (to) -> (dropout p=0) -> matmul`
on [B, H, S, D] or, for bmm-style code, [B*H, S, D] tensors. Other spellings (einsum, bmm,
nn.MultiheadAttention) are rewritten into one of these first (`products`, `mha`).
Each matcher checks every guard before returning a match; a near miss returns a reason.
"""
from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from seqweave.frontend.mask_lift import MASKED_ADDITIVE_VALUE
from seqweave.ir.score_mod import NoScoreMod, ScoreMod, Softcap

SDPA_TARGETS = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)
MATMUL_TARGETS = (torch.matmul, operator.matmul)
SOFTMAX_TARGETS = (F.softmax, torch.softmax)
DROPOUT_TARGETS = (F.dropout, torch.dropout)
CAST_METHODS = ("to", "type", "float")
EINSUM_TARGETS = (torch.einsum, torch.functional.einsum)
BMM_TARGETS = (torch.bmm,)
BADDBMM_TARGETS = (torch.baddbmm,)
PRODUCT_TARGETS = MATMUL_TARGETS + EINSUM_TARGETS + BMM_TARGETS + BADDBMM_TARGETS
PRODUCT_METHODS = ("matmul", "bmm", "baddbmm", "__matmul__")
#: What may stand between a product and the softmax of its scores (scale, softcap, mask, casts).
SCORE_EPILOGUE_TARGETS = (operator.mul, operator.truediv, operator.add, operator.sub, torch.mul, torch.div,
                          torch.add, torch.sub, torch.tanh, torch.masked_fill, torch.where)
SCORE_EPILOGUE_METHODS = ("mul", "div", "add", "sub", "tanh", "masked_fill", "to", "type", "float")
MASKED_FILL_TARGETS = (torch.masked_fill,)
WHERE_TARGETS = (torch.where,)
TANH_TARGETS = (torch.tanh, F.tanh)
NEGATION_TARGETS = (operator.invert, torch.logical_not, torch.bitwise_not)
NEGATION_METHODS = ("logical_not", "bitwise_not", "__invert__")
#: Node meta key naming the form a rewrite produced a node from (e.g. "multi_head_attention").
FORM_META = "seqweave_form"


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
    form: str                 # "sdpa" | "eager" | what a rewrite made the SDPA from
    mask_hides: bool = False  # a bool mask that is True where attention is *hidden* (masked_fill's)
    score_mod: ScoreMod = field(default_factory=NoScoreMod)
    flat: bool = False        # q, k, v are [B*H, S, D] (bmm style): the op sees them as [1, B*H, S, D]

    def shape_4d(self, node: fx.Node) -> tuple:
        """The shape of q, k or v as the op sees it."""
        shape = tuple(example(node).shape)
        return (1, *shape) if self.flat else shape


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


def _check_qkv(q: fx.Node, k: fx.Node, v: fx.Node, ndim: int = 4) -> None:
    shapes = [example(x) for x in (q, k, v)]
    if any(s is None or s.dim() != ndim for s in shapes):
        raise NotAttention("q, k, v are not all 4-D [B, H, S, D] or all 3-D [B*H, S, D] tensors")
    if ndim == 3:
        if len({s.shape[0] for s in shapes}) != 1:
            raise NotAttention("3-D q, k, v with different leading (batch * heads) sizes")
        return
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
                          mask, additive, is_causal, node.meta.get(FORM_META, "sdpa"))


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


def _split_mask(scores: fx.Node) -> tuple[fx.Node, fx.Node | None, str]:
    """(scores, mask, how the mask reads): `scores + mask` -> "added" (0 / -inf, the operand that is
    not the scores); `scores.masked_fill(hidden, -inf)` -> "hidden"; `where(allowed, scores, -inf)`
    -> "allowed"."""
    if is_call(scores, MASKED_FILL_TARGETS, "masked_fill"):
        return _split_filled(scores, arg(scores, 1, "mask"), arg(scores, 2, "value"), scores.args[0], "hidden")
    if is_call(scores, WHERE_TARGETS) and len(scores.args) == 3:  # not the method: x.where(c, y) reads c first
        return _split_filled(scores, scores.args[0], scores.args[2], scores.args[1], "allowed")
    if not is_call(scores, (operator.add, torch.add), "add"):
        return scores, None, ""
    _single_user(scores, "masked scores")
    left, right = scores.args[:2]
    if not isinstance(left, fx.Node) or not isinstance(right, fx.Node):
        raise NotAttention("scores are shifted by a constant, not a mask")
    return left, right, "added"


def _split_filled(node: fx.Node, mask: Any, value: Any, scores: Any, how: str) -> tuple[fx.Node, fx.Node, str]:
    """masked_fill / where that set scores to -inf where a bool mask says so."""
    _single_user(node, "masked scores")
    op = getattr(node.target, "__name__", node.target)
    if not isinstance(value, (int, float)) or value > MASKED_ADDITIVE_VALUE:
        raise NotAttention(f"{op} with {value}, not -inf: the filled scores keep some weight")
    if not isinstance(mask, fx.Node) or example(mask) is None or example(mask).dtype != torch.bool:
        raise NotAttention(f"{op}'s mask is not a bool tensor in the graph")
    if not isinstance(scores, fx.Node):
        raise NotAttention(f"{op} fills a constant, not the scores")
    return scores, mask, how


def _allowed_of(hidden: fx.Node) -> fx.Node | None:
    """`x` when `hidden` is `~x` (or logical_not / bitwise_not) of a bool tensor, else None."""
    if not (is_call(hidden, NEGATION_TARGETS) or (hidden.op == "call_method" and hidden.target in NEGATION_METHODS)):
        return None
    inner = hidden.args[0]
    value = example(inner)
    return inner if value is not None and value.dtype == torch.bool else None


def _split_softcap(scores: fx.Node) -> tuple[fx.Node, ScoreMod]:
    """`tanh(scores / cap) * cap` (Gemma-2's logit soft-capping) -> (scores, Softcap(cap))."""
    if not is_call(scores, (operator.mul, torch.mul), "mul"):
        return scores, NoScoreMod()
    tanh, cap = scores.args[:2]
    if isinstance(tanh, (int, float)):
        tanh, cap = cap, tanh
    if not is_call(tanh, TANH_TARGETS, "tanh") or not isinstance(cap, (int, float)):
        return scores, NoScoreMod()  # a plain scale, read by _split_scale
    inner = tanh.args[0]
    divided = is_call(inner, (operator.truediv, torch.div), "div") and inner.args[1] == cap
    multiplied = is_call(inner, (operator.mul, torch.mul), "mul") and isinstance(inner.args[1], (int, float)) \
        and math.isclose(inner.args[1] * cap, 1.0, rel_tol=1e-12)
    if not (divided or multiplied):
        raise NotAttention(f"tanh(...) * {cap} around something other than scores / {cap}: not a softcap")
    for node, what in ((scores, "soft-capped scores"), (tanh, "tanh of the scores"), (inner, "scores / cap")):
        _single_user(node, what)
    return inner.args[0], Softcap(cap)


def _split_scale(scores: fx.Node) -> tuple[fx.Node, float]:
    if is_call(scores, (operator.mul, torch.mul), "mul") and isinstance(scores.args[1], (int, float)):
        _single_user(scores, "scaled scores")
        return scores.args[0], float(scores.args[1])
    if is_call(scores, (operator.truediv, torch.div), "div") and isinstance(scores.args[1], (int, float)):
        _single_user(scores, "scaled scores")
        return scores.args[0], 1.0 / float(scores.args[1])
    return scores, 1.0


def _key_of(transposed: Any) -> fx.Node:
    if not is_call(transposed, (torch.transpose,), "transpose") or example(transposed) is None:
        raise NotAttention("the keys of q @ k^T are not a transpose of the last two dims")
    ndim = example(transposed).dim()
    dims = tuple(d % ndim for d in transposed.args[1:3])
    if sorted(dims) != [ndim - 2, ndim - 1]:
        raise NotAttention(f"keys are transposed over dims {dims}, not the last two")
    _single_user(transposed, "transposed keys")
    return transposed.args[0]


def match_eager(node: fx.Node) -> AttentionMatch:
    """`softmax(q @ k^T * scale (softcap) + mask, -1) @ v`, HF's eager_attention_forward and its kin."""
    probs, v = node.args[:2]
    softmax = _strip_probability_epilogue(probs)
    scores, mask, how = _split_mask(_softmax_input(softmax))
    scores, score_mod = _split_softcap(scores)
    scores, scale = _split_scale(scores)
    if not is_call(scores, MATMUL_TARGETS):
        raise NotAttention("softmax input is not q @ k^T")
    _single_user(scores, "raw scores")
    q, k = scores.args[0], _key_of(scores.args[1])
    flat = example(q) is not None and example(q).dim() == 3
    if flat:
        _check_qkv(q, k, v, ndim=3)
        kv_heads = example(k).shape[0]
    else:
        k, kv_heads = undo_repeat_kv(k)
        v, v_heads = undo_repeat_kv(v)
        if kv_heads != v_heads:
            raise NotAttention(f"k has {kv_heads} heads but v has {v_heads}")
        _check_qkv(q, k, v)
    hides = how == "hidden"
    if hides and _allowed_of(mask) is not None:
        mask, hides = _allowed_of(mask), False
    additive = how == "added"
    return AttentionMatch(node, q, k, v, kv_heads, scale, mask, additive, False, node.meta.get(FORM_META, "eager"),
                          mask_hides=hides, score_mod=score_mod, flat=flat)


def looks_like_eager_attention(node: fx.Node) -> bool:
    """A matmul whose left operand is (a cast/dropout of) a softmax: worth trying `match_eager`."""
    return is_call(node, MATMUL_TARGETS) and softmax_feeding(node) is not None


def softmax_feeding(product: fx.Node) -> fx.Node | None:
    """The softmax whose probabilities (through at most 3 casts/dropouts) are `product`'s left operand."""
    probs = product.args[0] if product.args else None
    for _ in range(4):
        if is_call(probs, SOFTMAX_TARGETS, "softmax"):
            return probs
        if not (is_call(probs, DROPOUT_TARGETS, "dropout") or _is_cast(probs)):
            return None
        probs = probs.args[0]
    return None


def is_product(node: Any) -> bool:
    """matmul, @, bmm, baddbmm or einsum."""
    return isinstance(node, fx.Node) and (is_call(node, PRODUCT_TARGETS) or
                                          (node.op == "call_method" and node.target in PRODUCT_METHODS))


def softmaxes(graph: fx.Graph) -> list[fx.Node]:
    return [node for node in graph.nodes if is_call(node, SOFTMAX_TARGETS, "softmax")]


def score_product(softmax: fx.Node) -> fx.Node | None:
    """The product that makes `softmax`'s scores, walking back over scale, softcap, mask and casts."""
    node = softmax.args[0] if softmax.args else None
    for _ in range(8):
        if is_product(node):
            return node
        epilogue = is_call(node, SCORE_EPILOGUE_TARGETS) or (
            isinstance(node, fx.Node) and node.op == "call_method" and node.target in SCORE_EPILOGUE_METHODS)
        if not epilogue:
            return None
        if is_call(node, WHERE_TARGETS) and len(node.args) == 3:
            node = node.args[1]  # where(allowed, scores, -inf)
        else:
            node = next((x for x in node.args if isinstance(x, fx.Node)), None)  # the scores come first
    return None


def probability_products(softmax: fx.Node) -> list[fx.Node]:
    """The products that read `softmax`'s probabilities, through casts and dropout."""
    found, frontier = [], [softmax]
    for _ in range(4):
        users = [user for node in frontier for user in node.users]
        found += [user for user in users if is_product(user)]
        frontier = [user for user in users if is_call(user, DROPOUT_TARGETS, "dropout") or _is_cast(user)]
    return found
