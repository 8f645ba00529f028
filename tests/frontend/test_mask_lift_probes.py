"""Mask lifting must not trust the example inputs alone.

A padding mask traced with an all-ones `attention_mask`, or a packed-document mask traced with
`position_ids = arange(N)`, looks exactly like plain causal on those inputs. The lifted spec must
still read the input, so a later call with padding or several documents gets the right mask:
torch evaluating the user's own mask function on the new inputs is the reference.
"""
import pytest
import torch

from seqweave.frontend.mask_lift import lift_mask
from seqweave.ir.mask import Causal

N, B = 12, 2


def padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    idx = torch.arange(attention_mask.shape[-1])
    causal = idx[:, None] >= idx[None, :]
    return causal[None, None] & attention_mask[:, None, None, :].bool()


def document_mask(position_ids: torch.Tensor) -> torch.Tensor:
    previous = torch.cat([position_ids[:, :1] - 1, position_ids[:, :-1]], -1)  # HF's packed-sequence test
    segments = torch.cumsum((position_ids != previous + 1).long(), -1)
    idx = torch.arange(position_ids.shape[-1])
    causal = idx[:, None] >= idx[None, :]
    return causal[None, None] & (segments[:, None, :, None] == segments[:, None, None, :])


def _capture(fn, example: torch.Tensor):
    """The FX graph dynamo gives a backend for `fn(example)`: its mask node and placeholder values."""
    captured = {}

    def backend(gm, example_inputs):
        captured["gm"], captured["inputs"] = gm, example_inputs
        return gm.forward
    torch._dynamo.reset()
    torch.compile(fn, backend=backend, fullgraph=True, dynamic=False)(example)
    graph = captured["gm"].graph
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    output = next(node for node in graph.nodes if node.op == "output").args[0]
    output = output[0] if isinstance(output, (tuple, list)) else output
    return output, dict(zip(placeholders, captured["inputs"]))


def _operand(value: torch.Tensor, role: str) -> torch.Tensor:
    """What a lifted `$i` reads for an input of this role (the documented meaning of each role)."""
    if role == "padding":
        return value
    if role == "key_padding":
        return ~value.bool()
    assert role == "document", role
    restart = torch.ones_like(value, dtype=torch.bool)
    restart[:, 1:] = value[:, 1:] != value[:, :-1] + 1
    return torch.cumsum(restart.long(), -1)


def _later_call_inputs(kind: str) -> torch.Tensor:
    if kind == "padding":
        valid = torch.ones(B, N, dtype=torch.long)
        valid[0, :4] = 0   # left padding
        valid[1, -3:] = 0  # right padding
        return valid
    return torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4], list(range(N))])


EXAMPLES = {"padding": (padding_mask, torch.ones(B, N, dtype=torch.long)),
            "document": (document_mask, torch.arange(N).expand(B, N).clone())}


@pytest.mark.parametrize("kind", sorted(EXAMPLES))
def test_a_mask_that_looks_causal_on_its_example_still_reads_its_input(kind):
    fn, example = EXAMPLES[kind]
    mask_node, values = _capture(fn, example)
    lifted = lift_mask(mask_node, values, False, (B, 1, N, N))
    assert lifted.spec != Causal(), f"{kind} mask lifted to plain causal from its example inputs alone"
    later = _later_call_inputs(kind)
    operands = [_operand(later, role) for _, role in lifted.operands]
    idx = torch.arange(N)
    got = lifted.spec.evaluate(idx, idx, operands).expand(B, 1, N, N)
    torch.testing.assert_close(got, fn(later).expand(B, 1, N, N), msg=f"lifted {lifted.spec} on a later {kind} call")


class InPlaceDocumentMask(torch.nn.Module):
    """Packed documents, the mask's restarts written in place (`starts[:, 1:] = ...`) as users write it."""

    def forward(self, q, k, v, position_ids):
        starts = torch.ones_like(position_ids, dtype=torch.bool)
        starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
        segments = torch.cumsum(starts.long(), -1)
        idx = torch.arange(position_ids.shape[-1])
        causal = idx[:, None] >= idx[None, :]
        mask = causal[None, None] & (segments[:, None, :, None] == segments[:, None, None, :])
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def test_a_mask_written_in_place_is_not_lifted_from_its_reads_alone():
    """The in-place write is invisible to the mask's data dependencies: lifting from them alone gave
    `causal & sliding_window(0, 0)` (wrong even on the example). It must stay a dense operand."""
    from seqweave.compiler import SeqweaveBackend

    model, backend = InPlaceDocumentMask(), SeqweaveBackend()
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, 2, N, 8, generator=generator, dtype=torch.float64) for _ in range(3))
    packed = torch.cat([torch.arange(5), torch.arange(N - 5)]).repeat(B, 1)
    for positions in (torch.arange(N).repeat(B, 1), packed):
        expected = model(q, k, v, positions)
        torch.testing.assert_close(compiled(q, k, v, positions), expected, rtol=1e-12, atol=1e-12)
    [report] = backend.reports
    assert report.found and report.mask == "dense($0)" and "in-place write" in report.reason
