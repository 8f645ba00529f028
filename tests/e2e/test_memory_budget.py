"""activation-memory end to end: a training step under a budget holds no more than the budget
(measured by the live-bytes accounting), and its loss and gradients equal the plan-free step's."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import seqweave
from seqweave.errors import find_seqweave_error
from seqweave.passes.memory_plan import KEEP, OFFLOAD, OFFLOAD_AT_USE, QUANTIZE, RECOMPUTE
from seqweave.runtime import host_pool
from seqweave.runtime.live_bytes import LiveBytes
from seqweave.testing.models import SampleSpec, build_sample


class Block(nn.Module):
    """Written the way users write one: pre-norm, fused qkv, torch's SDPA, GELU MLP."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


class Encoder(nn.Module):
    """Float inputs in, features out: the caller takes the loss (here `out.backward(dout)`)."""

    def __init__(self, width: int = 64, heads: int = 4, depth: int = 8) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def _encoder(seq_len: int = 1024):
    torch.manual_seed(0)
    model = Encoder()
    x = torch.randn(1, seq_len, 64)
    dout = torch.randn(1, seq_len, 64)
    return model, x, dout


def _step(module: nn.Module, run, x: torch.Tensor, dout: torch.Tensor):
    module.zero_grad(set_to_none=True)
    out = run(x)
    out.backward(dout)
    return out.detach(), [p.grad.clone() for p in module.parameters()]


def _measured(model: nn.Module, x, dout, **options):
    """(live bytes of the second step, its result, the backend)."""
    torch._dynamo.reset()
    # plans are made against the eager runtime's allocations (with inner_backend="inductor" a
    # planned graph runs eager too): the plan-free peak they are a fraction of is measured there
    backend = seqweave.backend(inner_backend="eager", **options)
    compiled = torch.compile(model, backend=backend)
    _step(model, compiled, x, dout)
    with LiveBytes() as live:
        result = _step(model, compiled, x, dout)
    return live, result, backend


@pytest.fixture(scope="module")
def plan_free():
    model, x, dout = _encoder()
    live, result, _ = _measured(model, x, dout)
    return model, x, dout, live.device_peak, result


@pytest.mark.parametrize("fraction", [1.0, 0.5, 0.25])
def test_peak_within_budget_and_bit_exact(plan_free, fraction):
    model, x, dout, free_peak, (free_out, free_grads) = plan_free
    budget = int(fraction * free_peak)
    host_pool.release_all()
    live, (out, grads), backend = _measured(model, x, dout, memory_budget=budget)
    (plan,) = backend.memory_plans
    assert live.device_peak <= budget, f"{live.device_peak} bytes measured over a budget of {budget}\n{live.summary()}"
    assert torch.equal(out, free_out)
    assert all(torch.equal(a, b) for a, b in zip(grads, free_grads)), "offload and recompute must be exact"
    moved = plan.plan.of(OFFLOAD) + plan.plan.of(OFFLOAD_AT_USE)
    if fraction < 1:  # what ran: the plan moved storages, and the host pool held them
        assert moved and plan.plan.of(RECOMPUTE) and live.host_peak >= plan.plan.bytes_moved // 2 > 0
        forward = next(c.graph for c in backend.graphs if c.kind == "forward")
        backward = next(c.graph for c in backend.graphs if c.kind == "backward")
        assert forward.count("mem.offload") == len(moved) and forward.count("mem.host_arena") == 1
        assert backward.count("mem.prefetch") == backward.count("mem.wait") == len(moved)
        assert forward.count("mem.drop") == len(plan.plan.of(RECOMPUTE))
    # the plan's model of the step errs on the safe side, by little: it reserves what ops
    # allocate inside themselves (attention's score tiles), which the accounting sees as it happens
    assert free_peak <= plan.plan_free_peak <= 1.2 * free_peak


def test_eight_bit_storage_within_its_bound(plan_free):
    """Quantised activations change the gradients, by no more than their stated bound allows."""
    model, x, dout, free_peak, (free_out, free_grads) = plan_free
    _, (out, grads), backend = _measured(model, x, dout, memory_budget=int(0.3 * free_peak), memory_quantize=True)
    (plan,) = backend.memory_plans
    assert plan.plan.of(QUANTIZE), "at 30% with 8 bits allowed, the cheapest plan stores some in 8 bits"
    assert torch.equal(out, free_out), "the forward is untouched: only what the backward reads is quantised"
    for ours, exact in zip(grads, free_grads):
        assert (ours - exact).norm() <= 0.05 * exact.norm() + 1e-6


def test_budget_below_what_any_plan_reaches_is_refused_with_the_least_it_can_be(plan_free):
    model, x, dout, free_peak, _ = plan_free
    with pytest.raises(Exception) as raised:
        _measured(model, x, dout, memory_budget=int(0.02 * free_peak))
    error = find_seqweave_error(raised.value)
    assert error is not None and "least peak any plan reaches" in str(error) and "raise the budget" in str(error)


def test_budget_as_text_and_plan_free_when_it_fits():
    model, x, dout = _encoder(seq_len=128)
    torch._dynamo.reset()
    backend = seqweave.backend(memory_budget="1GiB")
    torch.compile(model, backend=backend)(x).backward(dout)
    (plan,) = backend.memory_plans
    assert plan.budget == 2**30 and set(plan.plan.choice.values()) == {KEEP}
    assert not any(n.op.startswith("mem.") for c in backend.graphs for n in c.graph.nodes)


def test_hf_llama_with_loss_inside_and_inference_untouched():
    """An HF causal LM trains under a budget exactly; an inference call compiles no plan."""
    model, inputs = build_sample(SampleSpec("llama-tiny", seq_len=512, layers=4))
    reference = copy.deepcopy(model)
    torch._dynamo.reset()
    backend = seqweave.backend(memory_budget=0.5)
    loss = torch.compile(model, backend=backend)(**inputs).loss
    loss.backward()
    expected = reference(**inputs).loss
    expected.backward()
    assert backend.memory_plans and backend.memory_plans[0].choices
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for ours, theirs in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-4, atol=1e-5)
    plans = len(backend.memory_plans)
    with torch.no_grad():
        logits = torch.compile(model, backend=backend)(input_ids=inputs["input_ids"], use_cache=False).logits
    assert len(backend.memory_plans) == plans and any(c.kind == "inference" for c in backend.graphs)
    torch.testing.assert_close(logits, reference(input_ids=inputs["input_ids"], use_cache=False).logits,
                               rtol=1e-4, atol=1e-5)


def test_generate_with_a_budget_gives_eager_tokens_and_plans_nothing():
    """A budget is about a training step: generate() (eval, static cache) compiles inference
    graphs only, with no mem.* op, and returns eager's tokens."""
    model, inputs = build_sample(SampleSpec("llama-tiny", seq_len=12, layers=2))
    model.eval()
    prompt = inputs["input_ids"][:1]
    options = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, cache_implementation="static")
    expected = model.generate(prompt, **options)
    torch._dynamo.reset()
    backend = seqweave.backend(memory_budget=0.25)
    model.forward = torch.compile(model.forward, backend=backend, fullgraph=True, dynamic=False)
    assert torch.equal(model.generate(prompt, **options), expected)
    assert {graph.kind for graph in backend.graphs} == {"inference"} and not backend.memory_plans
    assert not any(node.op.startswith("mem.") for graph in backend.graphs for node in graph.graph.nodes)
