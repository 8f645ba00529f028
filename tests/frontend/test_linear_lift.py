"""Linear attention written in plain torch is recognised, lifted into one `attn.linear` op and
run chunkwise: compiled forward and gradients equal float64 eager, the IR holds no N x N value,
and look-alikes that are not linear attention are left alone with the reason."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import seqweave
from seqweave.ir.printer import format_node
from seqweave.testing.linear_models import (CausalLinearAttention, CumsumLinearAttention, DecayAttention,
                                            DeltaAttention, GatedAttention, TinyLM, retnet_gammas)

TOLERANCE = 1e-5
N = 37  # divides no chunk size


def _compile(model: nn.Module, *inputs: torch.Tensor):
    backend = seqweave.backend()
    return torch.compile(model, backend=backend, fullgraph=True, dynamic=False), backend


def _ops(backend) -> dict[str, list[str]]:
    return {c.kind: [n.op for n in c.graph.nodes if n.op.startswith("attn.")] for c in backend.graphs}


def _square_values(backend, length: int) -> list[str]:
    """Every IR value with two dims of the sequence length (an N x N score or mask)."""
    return [f"{c.kind}:%{v.name} {v.type}" for c in backend.graphs for v in c.graph.values()
            if hasattr(v.type, "shape") and sum(int(d) == length for d in v.type.shape) >= 2]


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.detach().double() - want.detach()).abs().max() / want.detach().abs().max().clamp(min=1e-30))


def _check_against_float64(model: nn.Module, x: torch.Tensor) -> object:
    """Compiled fp32 forward and the gradient of every parameter and of x, against fp64 eager."""
    reference = copy.deepcopy(model).double()
    x64 = x.detach().double().requires_grad_()
    want = reference(x64)
    dout = torch.randn(want.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    want.backward(dout)
    x = x.detach().requires_grad_()
    compiled, backend = _compile(model)
    got = compiled(x)
    got.backward(dout.float())  # out.backward(dout): the loss lives outside the graph
    assert _relative(got, want) < TOLERANCE
    assert _relative(x.grad, x64.grad) < TOLERANCE
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        assert q.grad is None or _relative(p.grad, q.grad) < TOLERANCE, name
    return backend


@pytest.mark.parametrize("mixer", [DecayAttention, CausalLinearAttention])
def test_parallel_forms_run_as_one_linear_op_with_no_square_value(mixer):
    torch.manual_seed(0)
    backend = _check_against_float64(mixer(32, 2), torch.randn(2, N, 32))
    assert _ops(backend) == {"forward": ["attn.linear"], "backward": ["attn.linear_backward"]}
    assert _square_values(backend, N) == []
    report = backend.reports[0]
    assert report.found and report.form == "linear" and "row normaliser" in report.reason


def test_golden_text_of_the_lifted_op():
    torch.manual_seed(0)
    model = DecayAttention(32, 2, normalise=False)
    compiled, backend = _compile(model)
    compiled(torch.randn(1, 9, 32))
    (node,) = [n for n in backend.graphs[0].graph.nodes if n.op == "attn.linear"]
    want = [float(-torch.log(g.double())) for g in retnet_gammas(2)]  # lambda_h = 1 - 2^(-5-h)
    assert node.kwargs["decay"] == pytest.approx(want, rel=1e-6)
    decays = ", ".join(repr(s) for s in node.kwargs["decay"])
    assert format_node(node) == (f"%linear_attention = attn.linear(%select, %select_1, %select_2, decay=[{decays}], "
                                 f"scale=0.25, layer=0) : f32[1, 2, 9, 16]")


def test_decay_is_lifted_per_head_and_reported():
    torch.manual_seed(0)
    compiled, backend = _compile(DecayAttention(32, 4))
    compiled(torch.randn(1, 12, 32))
    report = backend.reports[0]
    for gamma in retnet_gammas(4).tolist():
        assert f"{gamma:.6g}"[:6] in report.reason


class _Variant(nn.Module):
    """One attention written with a twist; `kind` says which."""

    def __init__(self, kind: str, heads: int = 2, dim: int = 8) -> None:
        super().__init__()
        self.kind = kind
        self.proj = nn.Linear(dim, 3 * dim)
        self.heads = heads
        self.rate = nn.Parameter(torch.tensor(0.9))

    def forward(self, x: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.proj(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        i = torch.arange(n)
        distance = (i[:, None] - i[None, :]).float()
        causal = distance >= 0
        scores = q @ k.transpose(-1, -2)
        if self.kind == "softmax-decay":
            return torch.softmax(scores * 0.9 ** distance.clamp(min=0) * causal, -1) @ v
        if self.kind == "band":  # keys at most 2 back: a mask, but no decay
            return (scores * (causal & (distance <= 2))) @ v
        if self.kind == "full":  # non-causal
            return (scores * 0.5) @ v
        if self.kind == "wrong-axis":
            masked = scores * causal
            return (masked @ v) / masked.sum(-2, keepdim=True).transpose(-1, -2).clamp(min=1)
        if self.kind == "learned-decay":
            return (scores * self.rate ** distance.clamp(min=0) * causal) @ v
        if self.kind == "caller-mask":
            return (scores * extra) @ v
        if self.kind == "rising":  # lambda > 1
            return (scores * 1.1 ** distance.clamp(min=0) * causal) @ v
        if self.kind == "einsum":  # RetNet as fla writes it: one three-operand einsum
            decay = 0.9 ** distance.clamp(min=0) * causal
            s = torch.einsum("bhqd,bhkd,qk->bhqk", q, k, decay)
            return torch.einsum("bhqk,bhkd->bhqd", s, v)
        raise ValueError(self.kind)


@pytest.mark.parametrize("kind, reason", [
    ("band", "not a causal decay"),
    ("full", "above the diagonal (not causal)"),
    ("wrong-axis", "not a row normaliser"),
    ("learned-decay", "trained"),
    ("caller-mask", "caller passes"),
    ("rising", "not a decay"),
])
def test_look_alikes_are_left_alone_with_the_reason(kind, reason):
    torch.manual_seed(0)
    model = _Variant(kind)
    x = torch.randn(1, 7, 8)
    extra = torch.tril(torch.ones(7, 7))
    compiled, backend = _compile(model)
    got = compiled(x, extra) if kind == "caller-mask" else compiled(x)
    want = model(x, extra) if kind == "caller-mask" else model(x)
    torch.testing.assert_close(got, want)
    assert "attn.linear" not in _ops(backend)["forward"]
    left = [r for r in backend.reports if not r.found and r.form == "linear"]
    assert left and reason in left[0].reason, [r.reason for r in backend.reports]


def test_softmax_of_decayed_scores_is_not_linear():
    model = _Variant("softmax-decay")
    compiled, backend = _compile(model)
    x = torch.randn(1, 7, 8)
    torch.testing.assert_close(compiled(x), model(x))
    assert "attn.linear" not in _ops(backend)["forward"]


def test_three_operand_einsum_retention_is_recognised():
    torch.manual_seed(0)
    backend = _check_against_float64(_Variant("einsum"), torch.randn(2, 11, 8))
    assert _ops(backend)["forward"] == ["attn.linear"]


@settings(max_examples=6)
@given(heads=st.integers(1, 3), length=st.integers(1, 40), normalise=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_property_decay_attention_matches_float64(heads, length, normalise, seed):
    torch._dynamo.reset()
    torch.manual_seed(seed)
    backend = _check_against_float64(DecayAttention(8 * heads, heads, normalise), torch.randn(1, length, 8 * heads))
    assert _ops(backend)["forward"] == ["attn.linear"]


def test_language_model_with_loss_outside_trains_like_eager():
    torch.manual_seed(0)
    model = TinyLM("lc")
    reference = copy.deepcopy(model).double()
    ids, targets = torch.randint(0, 64, (2, N)), torch.randint(0, 64, (2, N))
    compiled, backend = _compile(model)
    F.cross_entropy(compiled(ids).flatten(0, 1), targets.flatten()).backward()
    F.cross_entropy(reference(ids).flatten(0, 1), targets.flatten()).backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert _relative(p.grad, q.grad) < TOLERANCE, name
    assert _ops(backend)["forward"] == ["attn.linear", "attn.linear"]
    assert _square_values(backend, N) == []


@pytest.mark.parametrize("spelling", ["einsum", "broadcast"])
def test_cumulative_sum_form_runs_as_linear_ops_without_per_token_states(spelling):
    torch.manual_seed(0)
    backend = _check_against_float64(CumsumLinearAttention(32, 2, spelling=spelling), torch.randn(2, N, 32))
    assert _ops(backend) == {"forward": ["attn.linear"] * 2, "backward": ["attn.linear_backward"] * 2}
    per_token_states = [str(v.type) for c in backend.graphs for v in c.graph.values()
                        if hasattr(v.type, "shape") and len(v.type.shape) == 5 and int(v.type.shape[2]) == N]
    assert per_token_states == []  # no [B, H, N, D, Dv] cumulative state is built
    assert [r.reason for r in backend.reports] == ["replaced by linear attention (cumulative-sum form)",
                                                   "replaced by linear attention (cumulative-sum normaliser)"]


def test_cumulative_sum_over_features_is_not_linear_attention():
    class FeatureCumsum(nn.Module):
        def forward(self, k, v):
            return torch.einsum("bnd,bne->bnde", k, v).cumsum(-1).sum(-1)  # over Dv, not tokens

    k, v = torch.randn(1, 5, 4), torch.randn(1, 5, 4)
    compiled, backend = _compile(FeatureCumsum())
    torch.testing.assert_close(compiled(k, v), FeatureCumsum()(k, v))
    assert all(op not in _ops(backend).get("inference", []) for op in ("attn.linear",))


class _RetentionLoop(nn.Module):
    """RetNet's recurrent form: a decay per head from a buffer, einsum spelling, outputs stacked."""

    def __init__(self, heads: int = 2, dim: int = 8) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, 3 * dim)
        self.heads = heads
        self.register_buffer("gamma", retnet_gammas(heads).view(heads, 1, 1))

    def forward(self, x: torch.Tensor, initial: torch.Tensor | None = None, final: bool = False):
        b, n, _ = x.shape
        q, k, v = self.proj(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        state = q.new_zeros(b, self.heads, q.shape[-1], v.shape[-1]) if initial is None else initial
        outs = []
        for t in range(n):
            state = self.gamma * state + torch.einsum("bhd,bhe->bhde", k[:, :, t], v[:, :, t])
            outs.append(torch.einsum("bhd,bhde->bhe", q[:, :, t], state))
        out = torch.stack(outs, dim=2)
        return (out, state) if final else out


@pytest.mark.parametrize("mixer, kind", [(GatedAttention, "GLA gates"), (DeltaAttention, "delta rule"),
                                         (lambda hidden, heads: _RetentionLoop(heads, hidden), "decay")])
def test_loops_over_time_become_one_linear_op(mixer, kind):
    torch.manual_seed(0)
    backend = _check_against_float64(mixer(8, 2), torch.randn(2, 9, 8))
    assert _ops(backend) == {"forward": ["attn.linear"], "backward": ["attn.linear_backward"]}
    (report,) = backend.reports
    assert report.found and report.reason.endswith(f"recurrent loop of 9 steps, {kind})")
    ops = [n for c in backend.graphs for n in c.graph.nodes if n.op == "attn.linear"]
    expected = {"GLA gates": "gla", "delta rule": "delta", "decay": None}[kind]
    assert ops[0].kwargs.get("recurrence") == expected


@pytest.mark.parametrize("call, reason", [
    (lambda m, x: m(x, initial=torch.ones(1, 2, 4, 4)), "does not start from zeros"),
    (lambda m, x: m(x, final=True)[1], "final state is read after the loop"),
])
def test_loops_that_are_not_exactly_linear_attention_are_left_alone(call, reason):
    torch.manual_seed(0)
    model = _RetentionLoop(2, 8)
    x = torch.randn(1, 5, 8)
    compiled, backend = _compile(model)
    torch.testing.assert_close(call(compiled, x), call(model, x))
    assert "attn.linear" not in _ops(backend)["forward"]
    assert any(reason in r.reason for r in backend.reports), [r.reason for r in backend.reports]


def test_linear_attention_option_off_keeps_the_model_computation():
    torch.manual_seed(0)
    model = DecayAttention(16, 2)
    x = torch.randn(1, 6, 16)
    backend = seqweave.backend(linear_attention=False)
    got = torch.compile(model, backend=backend, fullgraph=True)(x)
    torch.testing.assert_close(got, model(x))
    assert all("attn.linear" not in ops for ops in _ops(backend).values())
    assert not any(r.form == "linear" for r in backend.reports)


def test_slow_decays_that_are_not_binary_fractions_are_lifted_at_length():
    """lambda = exp(-0.001) is not exact in fp32: it is read far down the mask's first column,
    so lambda^(i-j) matches the mask over hundreds of tokens."""
    torch.manual_seed(0)
    model = DecayAttention(16, 2)
    model.gamma = torch.tensor([0.999000499833375, 0.98639392])  # exp(-0.001), exp(-0.0137)
    backend = _check_against_float64(model, torch.randn(1, 300, 16))
    assert _ops(backend)["forward"] == ["attn.linear"]


def _simple_gla_loop(q, k, v, g):
    """fla's naive recurrent simple GLA: one gate per head and token, slices indexed with None."""
    o = torch.zeros_like(v)
    h = q.new_zeros(q.shape[0], q.shape[1], q.shape[3], v.shape[3])
    for i in range(q.shape[2]):
        kv = k[:, :, i, :, None] * v[:, :, i, None, :]
        h = h * g[:, :, i].exp()[..., None, None] + kv
        o[:, :, i] = (q[:, :, i, :, None] * h).sum(-2)
    return o


def test_a_per_head_gate_in_a_loop_is_gla_with_every_channel_alike():
    gen = torch.Generator().manual_seed(3)
    inputs = [torch.randn(2, 2, 9, 4, generator=gen) for _ in range(3)] + [-torch.rand(2, 2, 9, generator=gen)]
    leaves = [x.clone().requires_grad_() for x in inputs]
    doubles = [x.double().requires_grad_() for x in inputs]
    backend = seqweave.backend()
    got = torch.compile(_simple_gla_loop, backend=backend, fullgraph=True)(*leaves)
    want = _simple_gla_loop(*doubles)
    dout = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    got.backward(dout.float())
    want.backward(dout)
    assert _relative(got, want) < TOLERANCE
    for leaf, double in zip(leaves, doubles):  # q, k, v and the gates
        assert _relative(leaf.grad, double.grad) < TOLERANCE
    ops = [n for c in backend.graphs for n in c.graph.nodes if n.op == "attn.linear"]
    assert len(ops) == 1 and ops[0].kwargs["recurrence"] == "gla"


def test_eval_without_grad_runs_the_inference_graph_with_the_linear_op():
    torch.manual_seed(0)
    model = TinyLM("lg").eval()
    ids = torch.randint(0, 64, (2, 13))
    compiled, backend = _compile(model)
    with torch.no_grad():
        got = compiled(ids)
        want = model(ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert _ops(backend) == {"inference": ["attn.linear", "attn.linear"]}
