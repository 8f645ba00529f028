"""Recognise linear attention written as a Python loop over time (which dynamo unrolls):

    S = zeros(B, H, D, Dv)
    for t in range(N):
        S = A_t(S) + k_t ⊗ w_t                 (the update)
        o[:, :, t] = q_t S                     (the readout; or outputs.append(...) then stack)

with A_t(S) = S, lambda * S (a constant decay), alpha_t[..., None] * S (GLA's per-channel
gate) or g_t[..., None, None] * S (one gate per head and token: GLA with every channel
alike), and, for the delta rule, w_t = beta_t (v_t - k_t S) on top of A_t(S) = S. Each spelling
of the pieces that published reference code uses is read: `k[..., None] * v[..., None, :]`,
`k.unsqueeze(-1) * v.unsqueeze(-2)` or an outer-product einsum; `(q[..., None] * S).sum(-2)` or
`einsum("bhd,bhdm->bhm", q, S)`; `.clone()` and casts of the state. Every step must have the
same form and the chain must start from zeros.

The per-step q_t, k_t, v_t (and alpha_t / beta_t) are put back together into [B, H, N, .]
tensors (`rerolled`: the tensor they were sliced from when they are its steps) and the whole
loop becomes one `seqweave::linear_attention` with that recurrence: O(N d Dv)
chunkwise, O(d Dv) state, LASP-2 across ranks.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from seqweave.frontend.fx_build import NodeBuilder
from seqweave.frontend.linear_cumsum import NotCumsumForm, einsum_parts, outer_factors, unsqueezed_source
from seqweave.frontend.linear_ops import LINEAR_ATTENTION_OP
from seqweave.frontend.mask_tiles import ancestors_in_order, leaves_of, materialise, tiled_function
from seqweave.frontend.model_constants import NotConstant, constant_value
from seqweave.frontend.patterns import example, is_call
from seqweave.frontend.rerolled import per_token, split_index_and_unsqueeze

ADD_TARGETS = (operator.add, torch.add)
MUL_TARGETS = (operator.mul, torch.mul)
SUB_TARGETS = (operator.sub, torch.sub)
STATE_WRAPPERS = ("clone", "to", "float", "contiguous", "type")
ZERO_MAKERS = (torch.zeros, torch.zeros_like)
ZERO_METHODS = ("new_zeros", "zero_")
LOG_GATE_FLOOR = -60.0


class NotRecurrent(Exception):
    """Looks like a linear-attention loop but is not exactly one; the message says why."""


@dataclass
class Step:
    """One unrolled step: o_t = q_t S_t, S_t = A_t(S_prev) + k_t ⊗ w_t."""

    output: fx.Node
    q: fx.Node
    state: fx.Node
    previous: fx.Node
    k: fx.Node
    v: fx.Node
    kind: str                       # "decay", "gla" or "delta"
    factor: Any = None              # what multiplies S: decay: a number or a constant node; gla: alpha_t
    beta: fx.Node | None = None     # delta


@dataclass
class Assembly:
    """Where the step outputs go: `o[..., t, :] = y_t` writes, or one stack."""

    outputs: list[fx.Node]
    result: fx.Node                 # the buffer or the stack
    writes: list[fx.Node] = field(default_factory=list)


def _strip(node: Any) -> Any:
    """The state under clones and casts."""
    while isinstance(node, fx.Node) and node.op == "call_method" and node.target in STATE_WRAPPERS:
        node = node.args[0]
    return node


def _contract(node: Any) -> tuple[fx.Node, fx.Node] | None:
    """(x, S) when `node` is x_t S: [..., D] with [..., D, Dv] over D."""
    if not isinstance(node, fx.Node):
        return None
    parts = einsum_parts(node)
    if parts is not None:
        if len(parts[2]) != 2:
            return None
        (a, b), out, (x, s) = parts
        if len(b) == len(a) + 1 and b[:-1] == a and out == a[:-1] + b[-1]:
            return x, s
        if len(a) == len(b) + 1 and a[:-1] == b and out == b[:-1] + a[-1]:
            return s, x
        return None
    summed = is_call(node, (torch.sum,), "sum") and len(node.args) > 1 and node.args[1] == -2
    if summed and not node.kwargs.get("keepdim") and is_call(node.args[0], MUL_TARGETS, "mul"):
        left, right = node.args[0].args[:2]
        for x, s in ((left, right), (right, left)):
            query = unsqueezed_source(x, -1)
            if query is not None and example(s).dim() == example(query).dim() + 1:
                return query, s
    return None


def _update(state: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node, str, Any, fx.Node | None]:
    """(previous state, k, v, kind, decay or gate, beta) of `state = A(previous) + k ⊗ w`."""
    if not is_call(state, ADD_TARGETS, "add") or len(state.args) != 2:
        raise NotRecurrent("the state is not updated as A(S) + k ⊗ v")
    for carried, written in (state.args, state.args[::-1]):
        try:
            k, w = outer_factors(written)
        except NotCumsumForm:
            continue
        previous, kind, decay = _transition(carried, k)
        if kind == "plain":
            return (previous, k, *_delta_write(w, k, previous))
        return previous, k, w, kind, decay, None
    raise NotRecurrent("neither term of the state update is an outer product k ⊗ v")


def _transition(carried: Any, k: fx.Node) -> tuple[fx.Node, str, Any]:
    """(previous state, "plain" | "decay" | "gla", factor) of the carried term."""
    if not is_call(carried, MUL_TARGETS, "mul"):
        return _strip(carried), "plain", None
    left, right = carried.args[:2]
    for state, factor in ((left, right), (right, left)):
        gate = unsqueezed_source(factor, -1)
        if gate is not None and isinstance(gate, fx.Node) and example(gate).shape == example(k).shape:
            return _strip(state), "gla", gate
    state, factor = (left, right) if _is_state_like(left, carried) else (right, left)
    per_step_scalar = tuple(example(k).shape[:-1]) + (1, 1)
    if isinstance(factor, fx.Node) and tuple(example(factor).shape) == per_step_scalar and _reads_a_step(factor):
        return _strip(state), "gla", factor  # one gate per head and token (simple GLA): every channel alike
    return _strip(state), "decay", factor  # `_decays` proves the factor a constant per head


def _reads_a_step(node: fx.Node) -> bool:
    """Does `node` read a slice of the sequence (a per-step value), rather than a constant?"""
    for ancestor in ancestors_in_order(node):
        if ancestor.op == "call_function" and ancestor.target is operator.getitem and \
                isinstance(ancestor.args[1], tuple) and any(isinstance(i, int) for i in ancestor.args[1]):
            return True
    return False


def _is_state_like(node: Any, carried: fx.Node) -> bool:
    return isinstance(node, fx.Node) and example(node) is not None and example(node).shape == example(carried).shape


def _delta_write(w: fx.Node, k: fx.Node, previous: fx.Node) -> tuple[fx.Node, str, Any, fx.Node | None]:
    """(v, kind, None, beta): w = beta (v - k S) is the delta rule; anything else a plain write."""
    if not is_call(w, MUL_TARGETS, "mul"):
        return w, "decay", 1.0, None
    for difference, beta in (w.args[:2], w.args[1::-1]):
        if is_call(difference, SUB_TARGETS, "sub"):
            v, recalled = difference.args[:2]
            read = _contract(recalled)
            if read is not None and _strip(read[0]) is k and _strip(read[1]) is previous:
                return v, "delta", None, beta
    return w, "decay", 1.0, None


def assemblies(graph: fx.Graph) -> list[Assembly]:
    """Outputs written step by step into a buffer, or stacked (after splitting `x[:, t, None]`
    into its slice and its new dim)."""
    split_index_and_unsqueeze(graph)
    found = []
    for node in graph.nodes:
        if is_call(node, (torch.stack,)) and isinstance(node.args[0], (list, tuple)) and len(node.args[0]) > 1:
            found.append(Assembly(list(node.args[0]), node))
        writes = [u for u in node.users if u.target is operator.setitem and u.args[0] is node]
        if len(writes) > 1:
            outputs = _written_outputs(node, writes)
            if outputs:
                found.append(Assembly(outputs, node, writes))
    return found


def _written_outputs(buffer: fx.Node, writes: list[fx.Node]) -> list[fx.Node]:
    """The values written at index 0, 1, ..., N-1 of one dim, in order (else nothing)."""
    outputs, dims = [], set()
    for t, write in enumerate(writes):
        key = write.args[1]
        if not isinstance(key, tuple):
            return []
        ints = [(i, k) for i, k in enumerate(key) if isinstance(k, int)]
        if len(ints) != 1 or ints[0][1] != t or any(k != slice(None) for k in key if not isinstance(k, int)):
            return []
        dims.add(ints[0][0])
        outputs.append(write.args[2])
    length = example(buffer).shape[dims.pop()] if len(dims) == 1 else -1
    return outputs if len(outputs) == length else []


def _step(output: fx.Node) -> Step:
    read = _contract(output)
    if read is None:
        raise NotRecurrent("a step's output is not q_t S_t")
    q, state = read[0], _strip(read[1])
    previous, k, v, kind, decay, beta = _update(state)
    return Step(output, q, state, previous, k, v, kind, decay, beta)


def match_recurrence(assembly: Assembly) -> list[Step]:
    """The unrolled steps whose outputs `assembly` collects, or NotRecurrent with the reason."""
    _check_reads(assembly)
    steps = [_step(output) for output in assembly.outputs]
    kinds = {step.kind for step in steps}
    if len(kinds) != 1:
        raise NotRecurrent(f"the steps mix recurrences {sorted(kinds)}")
    for before, after in zip(steps, steps[1:]):
        if after.previous is not before.state:
            raise NotRecurrent("a step does not continue from the previous step's state")
    if not _is_zeros(steps[0].previous):
        raise NotRecurrent("the state does not start from zeros (an initial state)")
    for step in steps[:-1]:
        _state_stays_inside(step.state)
    last = steps[-1]
    readout = {last.output, *last.output.all_input_nodes, *_wrappers(last.state)}
    if last.state.users.keys() - readout:
        raise NotRecurrent("the final state is read after the loop (returned or reused)")
    return steps


def _wrappers(state: fx.Node) -> set[fx.Node]:
    return {u for u in state.users if u.op == "call_method" and u.target in STATE_WRAPPERS}


def _state_stays_inside(state: fx.Node) -> None:
    for user in state.users:
        if user.op == "output":
            raise NotRecurrent("an intermediate state is returned")


def _is_zeros(node: Any) -> bool:
    node = _strip(node)
    return isinstance(node, fx.Node) and (is_call(node, ZERO_MAKERS) or
                                          (node.op == "call_method" and node.target in ZERO_METHODS))


def decays(steps: list[Step], placeholder_values: dict[fx.Node, torch.Tensor]) -> list[float]:
    """Per-head log-decays of a constant decay (one number, or a buffer broadcast against S)."""
    factors = {id(step.factor): step.factor for step in steps}
    values = [_constant(f, placeholder_values) for f in factors.values()]
    if any(not torch.equal(values[0], v) for v in values[1:]):
        raise NotRecurrent("the decay changes from step to step (a gate, not a constant decay)")
    shape = tuple(example(steps[0].state).shape)
    heads = shape[1] if len(shape) == 4 else shape[0] if len(shape) == 3 else 1
    per_head = values[0].double().expand(shape).reshape(*(shape[:2] if len(shape) == 4 else (1,) + shape[:1]), -1)
    if bool((per_head != per_head[..., :1]).any()) or bool((per_head != per_head[:1]).any()):
        raise NotRecurrent("the decay is not one number per head")
    lam = per_head[0, :, 0] if per_head.shape[1] == heads else per_head[0, :1, 0].expand(heads)
    if bool((lam <= 0).any()) or bool((lam > 1).any()):
        raise NotRecurrent(f"the decay {lam.tolist()[:4]} is not in (0, 1]")
    return [] if bool((lam == 1).all()) else [float(-math.log(x)) for x in lam.tolist()]


def _constant(factor: Any, placeholder_values: dict[fx.Node, torch.Tensor]) -> torch.Tensor:
    if isinstance(factor, (int, float)):
        return torch.tensor(float(factor), dtype=torch.float64)
    nodes = ancestors_in_order(factor)
    leaves = leaves_of(nodes)
    try:
        values = [constant_value(leaf, placeholder_values, "the decay") for leaf in leaves]
    except NotConstant as why:
        raise NotRecurrent(str(why)) from why
    return materialise(tiled_function(nodes, leaves, factor)(values), "the decay").double()


def _channel_gates(builder: NodeBuilder, steps: list[Step]) -> list[fx.Node]:
    """alpha_t per channel: as written, or a per-head gate ([.., 1, 1]) expanded over k's channels."""
    shape = tuple(example(steps[0].k).shape)
    if tuple(example(steps[0].factor).shape) == shape:
        return [s.factor for s in steps]
    return [builder.method("expand", builder.method("reshape", s.factor, *shape[:-1], 1), *shape) for s in steps]


def replace_recurrence(assembly: Assembly, steps: list[Step], decay: list[float], layer: int) -> list[fx.Node]:
    """Put one `seqweave::linear_attention` where the loop's outputs were assembled."""
    kind = steps[0].kind
    anchor = next(iter(u for u in assembly.result.users if u not in assembly.writes), None) \
        if assembly.writes else assembly.result
    if anchor is None:
        raise NotRecurrent("the assembled output is never read")
    builder = NodeBuilder(anchor)
    q, k, v = (per_token(builder, [getattr(s, role) for s in steps], 1) for role in ("q", "k", "v"))
    gate = None
    if kind == "gla":
        # The kernels take log gates and refuse -inf: a gate below e^-60 (1e-26) acts as e^-60,
        # which fp32 arithmetic cannot tell from 0 beside any other term. Padding rows under
        # sequence parallelism hold gate 0; they come after every real row.
        gate = builder.call(torch.clamp, builder.call(torch.log, per_token(builder, _channel_gates(builder, steps), 1)),
                            min=LOG_GATE_FLOOR)
    elif kind == "delta":
        betas = [s.beta for s in steps]
        if example(betas[0]).dim() == example(steps[0].v).dim():  # [.., 1] beside v's [.., Dv]
            gate = builder.method("squeeze", per_token(builder, betas, 1), -1)
        else:
            gate = per_token(builder, betas, 0)
    recurrence = "decay" if kind == "decay" else kind
    out = builder.call(LINEAR_ATTENTION_OP, q, k, v, decay, 1.0, layer, gate=gate, recurrence=recurrence)
    target = example(assembly.result)
    out = builder.method("reshape", out, *target.shape)
    if example(out).dtype != target.dtype:
        out = builder.method("to", out, target.dtype)
    _redirect(assembly, out)
    return [s.output for s in steps]


def _redirect(assembly: Assembly, out: fx.Node) -> None:
    if not assembly.writes:
        assembly.result.replace_all_uses_with(out)
        assembly.result.graph.erase_node(assembly.result)
        return
    last = assembly.writes[-1]
    order = {node: index for index, node in enumerate(out.graph.nodes)}
    for user in list(assembly.result.users):
        if user not in assembly.writes and user is not out and order[user] > order[last]:
            user.replace_input_with(assembly.result, out)
    for write in assembly.writes:
        out.graph.erase_node(write)


def _check_reads(assembly: Assembly) -> None:
    """The buffer must not be read between its writes (the loop would see partial outputs)."""
    if not assembly.writes:
        return
    order = {node: index for index, node in enumerate(assembly.result.graph.nodes)}
    first, last = order[assembly.writes[0]], order[assembly.writes[-1]]
    if any(first < order[u] < last for u in assembly.result.users if u not in assembly.writes):
        raise NotRecurrent("the output buffer is read while the loop writes it")


def reads_state(output: fx.Node) -> bool:
    """Is `output` a readout q_t S_t (so its assembly is worth a report when it is not matched)?"""
    return _contract(output) is not None
