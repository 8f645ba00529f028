"""Recognise causal linear attention written in plain torch and replace it by `seqweave::linear_attention`.

The parallel form `((phi(q) @ phi(k)^T) * M) @ v` builds an N x N score matrix; the same
numbers come from the chunkwise recurrence in O(N d^2) time and O(d^2) state. We match

    scores = q @ k^T                       (matmul, @, bmm or einsum; phi stays in the graph)
    masked = scores (* factor | / factor | .tril() | masked_fill(hidden, 0) | where(allowed, ., 0))*
    out    = masked @ v
    [norm  = masked.sum(-1)]               (a row normaliser, divided by as the user wrote it)

(the cumulative-sum form, `cumsum(k ⊗ v)`, is matched in `linear_cumsum`; loops over time,
with decays, GLA gates or the delta rule, in `linear_recurrent`)

and lift M, the linear map from scores to masked scores, by evaluating that chain on a lazy
tensor of ones, tile by tile (`mask_tiles`: never N x N at once). M is accepted only when it
is c * lambda_h^(i - j) below the diagonal and 0 above, the same for every batch row and within
`DECAY_TOLERANCE` of c on the rows checked (all of them, or a spread at long lengths, as for
masks): lambda_h = 1 is causal linear attention, 0 < lambda_h < 1 RetNet / Lightning decay.
The factors must be constants of the model (buffers, index arithmetic): a mask that reads a
caller's tensor or a parameter that learns would make the lifted constant wrong next call.
A row normaliser makes the op run on [v, 1]; its last column is the row sum.

Anything else reading the masked scores (a softmax, a sum over another axis) leaves the
pattern alone, with the reason in the report.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
from torch import fx

from seqweave.frontend.fx_build import NodeBuilder
from seqweave.frontend.linear_cumsum import NotCumsumForm, cumsums, match_cumsum, replace_cumsum
from seqweave.frontend.linear_ops import LINEAR_ATTENTION_OP
from seqweave.frontend.linear_recurrent import (Assembly, NotRecurrent, assemblies, decays, match_recurrence,
                                                reads_state, replace_recurrence)
from seqweave.frontend.mask_lift import BLOCK_ELEMENTS, checked_rows
from seqweave.frontend.mask_tiles import Lazy, Untileable, ancestors_in_order, leaves_of, tiled_function
from seqweave.frontend.model_constants import NotConstant, constant_value
from seqweave.frontend.patterns import (MATMUL_TARGETS, example, is_call, is_product, layer_name,
                                        softmax_feeding)
from seqweave.frontend.products import NotRewritten, rewrite_product, split_einsum_factors

#: |M - c lambda^(i-j)| allowed, relative to |c|: a few fp32 rounding steps of lambda ** (i - j);
#: a mask computed in fp16 / bf16 is allowed 4 of its own rounding steps instead.
DECAY_TOLERANCE = 4e-6
MUL_TARGETS = (operator.mul, torch.mul)
DIV_TARGETS = (operator.truediv, torch.div)
SUM_TARGETS = (torch.sum,)
CAST_METHODS = ("to", "type", "float", "double", "half", "bfloat16", "type_as", "contiguous")


class NotLinear(Exception):
    """Looks like linear attention but is not exactly it; the message says why."""


@dataclass
class LinearMatch:
    """One recognised parallel-form linear attention."""

    product: fx.Node  # masked @ v
    masked: fx.Node
    scores: fx.Node   # q @ k^T
    q: fx.Node
    k: fx.Node
    v: fx.Node
    normalisers: list[fx.Node] = field(default_factory=list)  # masked.sum(-1), each


@dataclass
class LiftedDecay:
    """M = scale * lambda_h^(i - j) (causal): per-head log-decays s_h = -log lambda_h."""

    decay: list[float]
    scale: float
    note: str


@dataclass
class LinearReport:
    layer: str
    found: bool
    reason: str
    decay: list[float] = field(default_factory=list)
    shape: tuple[int, ...] = ()  # q's
    value_dim: int = 0           # columns the op runs on (v's, + 1 with a row normaliser)
    element_bytes: int = 0


def _is_method(node: object, names: tuple[str, ...]) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_method" and node.target in names


def _score_operand(node: fx.Node) -> fx.Node | None:
    """Which argument of one masking step carries the scores (None when the step is not linear in them)."""
    nodes = [a for a in node.args if isinstance(a, fx.Node)]
    if is_call(node, MUL_TARGETS, "mul"):
        return next((a for a in nodes if _reaches_scores(a)), None)
    if is_call(node, DIV_TARGETS, "div") or _is_method(node, ("__truediv__",)):
        return node.args[0] if _reaches_scores(node.args[0]) and not _reaches_scores(node.args[1]) else None
    if is_call(node, (torch.tril,), "tril") or _is_method(node, CAST_METHODS):
        return node.args[0]
    if is_call(node, (torch.masked_fill,), "masked_fill"):
        value = node.args[2] if len(node.args) > 2 else node.kwargs.get("value")
        return node.args[0] if value == 0 else None
    if is_call(node, (torch.where,)) and len(node.args) == 3 and node.args[2] == 0:
        return node.args[1]
    return None


def _reaches_scores(node: object, depth: int = 8) -> bool:
    """Is `node` a product, or a masking chain ending in one?"""
    if not isinstance(node, fx.Node) or depth == 0:
        return False
    if is_product(node):
        return True
    operand = _score_operand(node) if depth > 1 else None
    return operand is not None and _reaches_scores(operand, depth - 1)


def _chain_to_scores(masked: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """The product that makes the scores and the masking steps after it (nearest the scores last)."""
    chain, node = [], masked
    for _ in range(8):
        if is_product(node):
            return node, chain
        chain.append(node)
        node = _score_operand(node)
        if node is None:
            break
    raise NotLinear("the scores pass through an op that is not linear in them")


def _candidates(graph: fx.Graph) -> list[fx.Node]:
    """Products whose left operand is (a masking of) another product: `(q @ k^T ...) @ v`."""
    found = []
    for node in graph.nodes:
        if not is_product(node) or softmax_feeding(node) is not None or not node.args:
            continue
        left = _left_operand(node)
        if left is not None and not is_product(left) and _reaches_scores(left):
            found.append(node)
    return found


def _left_operand(product: fx.Node) -> fx.Node | None:
    if is_call(product, (torch.einsum,)) or product.target is torch.functional.einsum:
        operands = product.args[1:]
        if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
            operands = operands[0]
        return operands[0] if len(operands) == 2 and isinstance(operands[0], fx.Node) else None
    first = product.args[0]
    return first if isinstance(first, fx.Node) else None


def _as_matmul(product: fx.Node) -> fx.Node:
    """The product rewritten as `lhs @ rhs` (einsum / bmm spellings), or refused with why."""
    if is_call(product, MATMUL_TARGETS) or _is_method(product, ("matmul", "__matmul__")):
        return product
    try:
        rewritten = rewrite_product(product)
    except NotRewritten as why:
        raise NotLinear(str(why)) from why
    if not is_call(rewritten, MATMUL_TARGETS):
        raise NotLinear(f"the product {product.name} has permuted operands")
    return rewritten


def _transposed_keys(node: object) -> fx.Node:
    if not (isinstance(node, fx.Node) and is_call(node, (torch.transpose,), "transpose")):
        raise NotLinear("the keys of q @ k^T are not a transpose of the last two dims")
    ndim = example(node).dim()
    if sorted(d % ndim for d in node.args[1:3]) != [ndim - 2, ndim - 1]:
        raise NotLinear("the keys are transposed over other dims than the last two")
    return node.args[0]


def _normalisers(masked: fx.Node, product: fx.Node) -> list[fx.Node]:
    """Users of the masked scores besides the product: each must be a sum over the key axis."""
    found = []
    ndim = example(masked).dim()
    for user in masked.users:
        if user is product:
            continue
        dims = user.args[1] if len(user.args) > 1 else user.kwargs.get("dim")
        dims = list(dims) if isinstance(dims, (list, tuple)) else [dims]
        is_sum = is_call(user, SUM_TARGETS, "sum") and dims[0] is not None and len(dims) == 1
        if not is_sum or dims[0] % ndim != ndim - 1 or user.kwargs.get("dtype") is not None:
            what = user.target if isinstance(user.target, str) else getattr(user.target, "__name__", user.name)
            raise NotLinear(f"the masked scores are also read by `{what}` ({user.name}), which is not a row "
                            "normaliser (a sum over the key axis)")
        found.append(user)
    return found


def match_linear(product: fx.Node) -> LinearMatch:
    """The parallel form ending in `product`, or NotLinear with the reason."""
    product = _as_matmul(product)
    masked, v = product.args[:2]
    scores, chain = _chain_to_scores(masked)
    if not chain:
        raise NotLinear("the scores reach the value product unmasked (non-causal)")
    scores = _as_matmul(scores)
    q, k = scores.args[0], _transposed_keys(scores.args[1])
    shapes = [tuple(example(x).shape) for x in (q, k, v)]
    if shapes[0] != shapes[1] or shapes[2][:-1] != shapes[0][:-1]:
        raise NotLinear(f"q {list(shapes[0])}, k {list(shapes[1])}, v {list(shapes[2])} do not share batch, "
                        "heads and tokens")
    if len(shapes[0]) > 4 or len(shapes[0]) < 2:
        raise NotLinear(f"q has {len(shapes[0])} dims; [B, H, N, D], [B, N, D] or [N, D] are read")
    if tuple(example(masked).shape) != shapes[0][:-1] + (shapes[0][-2],):
        raise NotLinear("the mask broadcasts the scores to another shape")
    dtypes = {example(x).dtype for x in (q, k, v, masked)}
    if len(dtypes) != 1:
        raise NotLinear(f"q, k, v and the masked scores differ in dtype ({sorted(map(str, dtypes))})")
    for node in (scores, *chain[1:]):
        if len(node.users) != 1:
            raise NotLinear(f"{node.name} (a step of the scores) is read elsewhere too")
    return LinearMatch(product, masked, scores, q, k, v, _normalisers(masked, product))


def lift_decay(match: LinearMatch, placeholder_values: dict[fx.Node, torch.Tensor]) -> LiftedDecay:
    """Evaluate M on a lazy tensor of ones standing for the scores and fit c * lambda_h^(i-j)."""
    nodes = ancestors_in_order(match.masked, stop=[match.scores])  # the masking, the scores as a leaf
    leaves = leaves_of(nodes)
    try:
        values = [constant_value(leaf, placeholder_values, "the mask") for leaf in leaves]
    except NotConstant as why:
        raise NotLinear(str(why)) from why
    shape = tuple(int(s) for s in example(match.masked).shape)
    ones = Lazy(shape, lambda index: torch.ones([1] * len(index)))
    try:
        tiled = tiled_function(nodes, leaves, match.masked, {match.scores: ones})(values)
    except Untileable as why:
        raise NotLinear(f"the mask cannot be evaluated tile by tile: {why}") from why
    four_d = (1,) * (4 - len(shape)) + shape
    index = lambda rows: [torch.arange(s) for s in shape[:-2]] + [rows, torch.arange(shape[-1])]  # noqa: E731
    read = lambda rows: tiled.tile(index(rows)).expand(*shape[:-2], len(rows), shape[-1]) \
        .reshape(four_d[:2] + (len(rows), shape[-1])).double()  # noqa: E731
    column = tiled.tile([torch.arange(s) for s in shape[:-1]] + [torch.zeros(1, dtype=torch.long)])
    scale, decay = _fit(column.expand(*shape[:-1], 1).reshape(four_d[:3]).double())
    tolerance = max(DECAY_TOLERANCE, 4 * torch.finfo(example(match.masked).dtype).eps) * abs(scale)
    rows = checked_rows(four_d)
    step = max(1, BLOCK_ELEMENTS // max(1, math.prod(four_d[:2]) * shape[-1]))
    for start in range(0, len(rows), step):
        block = rows[start:start + step]
        _check_block(read(block), block, scale, decay, tolerance)
    note = "lifted" if len(rows) == shape[-2] else f"lifted (checked on {len(rows)} of {shape[-2]} rows)"
    return LiftedDecay([float(-math.log(lam)) if lam < 1 else 0.0 for lam in decay.tolist()], scale, note)


def _fit(column: torch.Tensor) -> tuple[float, torch.Tensor]:
    """c and lambda_h from the mask's first column ([B, H, N], fp64): M[i, 0] = c lambda^i. lambda
    is read where c lambda^i is still well above rounding (the farthest i with lambda^i >= 0.01),
    so its error shrinks as 1/i and lambda^(i-j) stays exact to the mask's own precision."""
    corner = column[:, :, 0]
    if not bool(torch.isfinite(column).all()):
        raise NotLinear("the mask holds inf or nan")
    c = float(corner[0, 0])
    if c == 0 or bool((corner != c).any()):
        raise NotLinear("the mask's diagonal is not one scale shared by every head "
                        f"(got {corner.flatten()[:4].tolist()})")
    if column.shape[2] < 2:
        return c, torch.ones(column.shape[1], dtype=torch.float64)
    ratios = column[0] / c  # [H, N]: lambda_h ** i, if a decay
    if bool((ratios[:, 1] <= 0).any()) or bool((ratios[:, 1] > 1).any()):
        raise NotLinear(f"the mask is not a decay lambda^(i-j) with 0 < lambda <= 1 "
                        f"(lambda = {ratios[:, 1].tolist()[:4]})")
    positions = torch.arange(column.shape[2], dtype=torch.float64)
    far = torch.where(ratios >= 0.01, positions, 0.0).amax(dim=1).clamp(min=1)
    lam = ratios.gather(1, far.long()[:, None]).squeeze(1).clamp(min=1e-300) ** (1 / far)
    return c, lam


def _check_block(got: torch.Tensor, rows: torch.Tensor, scale: float, lam: torch.Tensor, tolerance: float) -> None:
    """Every checked entry equals scale * lambda_h^(i - j) on and below the diagonal, 0 above."""
    distance = rows[:, None].double() - torch.arange(got.shape[-1], dtype=torch.float64)[None, :]
    want = scale * torch.where(distance >= 0, lam.view(1, -1, 1, 1) ** distance.clamp(min=0), 0.0)
    error = (got - want).abs()
    if bool((error > tolerance).any()):
        b, h, i, j = (int(x) for x in (error == error.max()).nonzero()[0])
        above = "above the diagonal (not causal)" if int(rows[i]) < j else "below the diagonal"
        raise NotLinear(f"the mask is not a causal decay: M[{b}, {h}, {int(rows[i])}, {j}] = "
                        f"{float(got[b, h, i, j]):.6g} {above}, a decay would give {float(want[b, h, i, j]):.6g}")


def _four_d(builder: NodeBuilder, node: fx.Node) -> fx.Node:
    """[B, H, N, D] as is; [B, N, D] and [N, D] with leading 1s (their leading dim becomes heads)."""
    ndim = example(node).dim()
    for _ in range(4 - ndim):
        node = builder.method("unsqueeze", node, 0)
    return node


def replace_linear(match: LinearMatch, lifted: LiftedDecay, layer: int) -> list[fx.Node]:
    """Put `seqweave::linear_attention` in place of the match; returns the nodes it read."""
    builder = NodeBuilder(match.product)
    q, k, v = (_four_d(builder, x) for x in (match.q, match.k, match.v))
    width = example(match.v).shape[-1]
    if match.normalisers:  # the row sums ride along as one more value column
        ones = builder.call(torch.ones_like, builder.call(operator.getitem, v, (Ellipsis, slice(0, 1))))
        v = builder.call(torch.cat, [v, ones], -1)
    out = builder.call(LINEAR_ATTENTION_OP, q, k, v, lifted.decay, lifted.scale, layer)
    leading = tuple(example(match.v).shape[:-1])
    values = builder.call(operator.getitem, out, (Ellipsis, slice(0, width))) if match.normalisers else out
    values = builder.method("reshape", values, *leading, width)
    match.product.replace_all_uses_with(values)
    for normaliser in match.normalisers:
        keep = normaliser.kwargs.get("keepdim", normaliser.args[2] if len(normaliser.args) > 2 else False)
        column = slice(width, width + 1) if keep else width
        sums = builder.call(operator.getitem, out, (Ellipsis, column))
        sums = builder.method("reshape", sums, *leading, *((1,) if keep else ()))
        normaliser.replace_all_uses_with(sums)
    read = [match.product, *match.normalisers]
    for node in read:
        node.graph.erase_node(node)
    return [match.masked, match.scores]


def replace_linear_attention(graph: fx.Graph, placeholder_values: dict[fx.Node, torch.Tensor],
                             first_layer: int) -> tuple[list[LinearReport], list[fx.Node]]:
    """Recognise and replace every parallel-form linear attention; returns reports and the nodes
    the replaced patterns read (for orphan removal)."""
    reports, orphans = [], []
    split_einsum_factors(graph)
    for product in _candidates(graph):
        layer = layer_name(product)
        try:
            match = match_linear(product)
            lifted = lift_decay(match, placeholder_values)
        except NotLinear as why:
            reports.append(LinearReport(layer, False, f"left alone: {why}"))
            continue
        shape = tuple(example(match.q).shape)
        orphans += replace_linear(match, lifted, first_layer + len([r for r in reports if r.found]))
        decay = "" if not any(lifted.decay) else f", decay λ={[round(math.exp(-s), 6) for s in lifted.decay]}"
        normaliser = ", row normaliser" if match.normalisers else ""
        value_dim = example(match.v).shape[-1] + bool(match.normalisers)
        reports.append(LinearReport(layer, True, f"replaced by linear attention ({lifted.note}{decay}{normaliser})",
                                    lifted.decay, shape, value_dim, example(match.q).element_size()))
    for cumsum in cumsums(graph):
        reports += _replace_cumsum_form(cumsum, first_layer + len([r for r in reports if r.found]), orphans)
    for assembly in assemblies(graph):
        reports += _replace_loop(assembly, placeholder_values, first_layer + len([r for r in reports if r.found]),
                                 orphans)
    return reports, orphans


def _replace_loop(assembly: Assembly, placeholder_values: dict[fx.Node, torch.Tensor], layer: int,
                  orphans: list[fx.Node]) -> list[LinearReport]:
    """One report for an unrolled loop of linear attention's (replaced, or why not); none for
    outputs assembled by other loops."""
    where = layer_name(assembly.result)
    try:
        steps = match_recurrence(assembly)
        decay = decays(steps, placeholder_values) if steps[0].kind == "decay" else []
        orphans += replace_recurrence(assembly, steps, decay, layer)
    except NotRecurrent as why:
        looks_recurrent = any(reads_state(output) for output in assembly.outputs)
        return [LinearReport(where, False, f"left alone: {why}")] if looks_recurrent else []
    kind = {"decay": "decay" if decay else "no decay", "gla": "GLA gates", "delta": "delta rule"}[steps[0].kind]
    shape = tuple(example(steps[0].q).shape[:-1]) + (len(steps), example(steps[0].q).shape[-1])
    return [LinearReport(where, True, f"replaced by linear attention (recurrent loop of {len(steps)} steps, {kind})",
                         decay, shape, example(steps[0].v).shape[-1], example(steps[0].q).element_size())]


def _replace_cumsum_form(cumsum: fx.Node, layer: int, orphans: list[fx.Node]) -> list[LinearReport]:
    """One report for a cumulative sum of linear attention's (replaced, or why not); none for
    other cumulative sums (positions, normalisers that are not linear attention's)."""
    try:
        match = match_cumsum(cumsum)
    except NotCumsumForm as why:
        source = example(cumsum.args[0])
        looks_like_state = source.dim() >= 4 and any(is_product(user) or is_call(user, (operator.mul,))
                                                       for user in cumsum.users)
        return [LinearReport(layer_name(cumsum), False, f"left alone: {why}")] if looks_like_state else []
    replace_cumsum(match, layer)
    orphans.append(cumsum)
    shape = tuple(example(match.q).shape)
    what = "cumulative-sum form" if match.v is not None else "cumulative-sum normaliser"
    value_dim = example(match.v).shape[-1] if match.v is not None else 1
    return [LinearReport(layer_name(cumsum), True, f"replaced by linear attention ({what})", [], shape, value_dim,
                         example(match.q).element_size())]
