"""Differential check: every zoo program through seqweave equals it through aot_eager.

Outputs, parameter gradients, buffers, inputs (in-place writes) and output aliasing are
compared after each of two calls (`seqweave.testing.differential`). A program may be refused
only with a SeqweaveError listed in EXPECTED_REFUSALS. The last tests break a backend on
purpose to show that the check itself notices dropped writes, wrong values and lost views.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Any, Callable, Sequence

import pytest
import torch
from torch import fx

from seqweave.errors import CaptureError
from seqweave.testing.differential import (ERROR, MATCH, MISMATCH, REFUSED, DiffResult, compare_values,
                                           run_differential)
from seqweave.testing.zoo import Program, by_name, zoo

#: program name -> a substring of the SeqweaveError message seqweave refuses it with. Only
#: refusals that are seqweave's stated limits belong here, not bugs that happen to raise one.
EXPECTED_REFUSALS: MappingProxyType[str, str] = MappingProxyType({})

#: Programs where torch's aot_eager itself is wrong (it differs from eager) and seqweave must
#: match eager instead: the min-cut partitioner recomputes, in the backward, a read of a buffer
#: the forward mutated, so the backward sees the value after the write.
AOT_EAGER_WRONG = frozenset({"buffer_counter_add", "buffer_int_counter_iadd", "buffer_mul"})

#: Programs whose attention seqweave must find and run as its own op (pinned, not only numbers).
#: nn.TransformerEncoderLayer reaches dynamo as F.multi_head_attention_forward (or, under no_grad in
#: eval, the fused fast path), which the frontend spells out; the ring cache is `@` on [B, S, D].
REPLACED_ATTENTION = frozenset({"sdpa_causal", "sdpa_causal_backward_dout", "eager_causal_softmax",
                                "eager_causal_softmax_no_grad", "transformer_encoder_layer",
                                "transformer_encoder_layer_no_grad", "buffer_ring_cache",
                                "buffer_ring_cache_no_grad"}) | frozenset(
    f"hf_{name}_{kind}" for name in ("llama", "qwen2", "mistral", "gpt2")
    for kind in ("train_loss", "eval_cache", "logits_ce"))

PROGRAMS = zoo()


def test_zoo_is_large_named_uniquely_and_lists_only_its_own_programs() -> None:
    names = [program.name for program in PROGRAMS]
    assert len(names) >= 34
    assert len(set(names)) == len(names)
    assert set(EXPECTED_REFUSALS) <= set(names) and AOT_EAGER_WRONG <= set(names)
    assert REPLACED_ATTENTION <= set(names)


@pytest.mark.parametrize("program", PROGRAMS, ids=lambda program: program.name)
def test_seqweave_matches_aot_eager(program: Program) -> None:
    result = run_differential(program, calls=2)
    if program.name in EXPECTED_REFUSALS:
        assert result.status == REFUSED, result.summary()
        assert EXPECTED_REFUSALS[program.name] in result.refusal, result.summary()
        return
    assert result.status == MATCH, result.summary()
    assert result.graphs >= 1, result.summary()  # seqweave ran, not only dynamo's eager fallback
    assert (result.attentions >= 1) == (program.name in REPLACED_ATTENTION), (result.attentions, result.summary())
    # the eager arbiter may excuse seqweave only where aot_eager is known to be wrong
    assert bool(result.reference_wrong) == (program.name in AOT_EAGER_WRONG), result.summary()


# --- the check can fail ----------------------------------------------------------------------


def _aot_eager_after(rewrite: Callable[[fx.GraphModule], None]) -> Callable:
    """A backend that rewrites dynamo's graph, then hands it to aot_eager."""
    def backend(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        rewrite(gm)
        gm.recompile()
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)
    return backend


def _drop_in_place_writes(gm: fx.GraphModule) -> None:
    """The bug a whole-graph DCE makes: `buf.index_copy_(...)` / `x.add_(1)` silently removed."""
    for node in list(gm.graph.nodes):
        if node.op == "call_method" and node.target.endswith("_") and not node.target.startswith("_"):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)


def _wrap_outputs(change: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
    """A backend that runs aot_eager and passes every tensor output through `change`."""
    def backend(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        compiled = torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

        def run(*args: Any) -> Any:
            outputs = compiled(*args)
            return type(outputs)(change(t) if isinstance(t, torch.Tensor) else t for t in outputs)
        return run
    return backend


def _raising(error: Exception) -> Callable:
    def backend(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        raise error
    return backend


def _mismatched(result: DiffResult) -> set[str]:
    return {item.name.split("/", 1)[1] for item in result.mismatches}


def test_dropped_buffer_write_is_a_mismatch() -> None:
    dropping = lambda: _aot_eager_after(_drop_in_place_writes)  # noqa: E731
    result = run_differential(by_name("buffer_index_copy"), make_backend=dropping)
    assert result.status == MISMATCH
    assert "state/memory" in _mismatched(result), result.summary()


def test_dropped_input_write_is_a_mismatch() -> None:
    result = run_differential(by_name("input_add_"), make_backend=lambda: _aot_eager_after(_drop_in_place_writes))
    assert result.status == MISMATCH
    assert "input/args[0]" in _mismatched(result), result.summary()


def test_output_off_by_1e_3_is_a_mismatch() -> None:
    perturb = lambda t: t + 1e-3 if t.is_floating_point() else t  # noqa: E731
    result = run_differential(by_name("mlp"), make_backend=lambda: _wrap_outputs(perturb))
    assert result.status == MISMATCH
    assert "output/out" in _mismatched(result), result.summary()
    assert max(item.max_abs for item in result.mismatches) == pytest.approx(1e-3, rel=1e-2)


def test_lost_view_is_a_mismatch() -> None:
    """Same values, but the output is a copy where aot_eager returns a view of the input."""
    result = run_differential(by_name("return_view_only"), make_backend=lambda: _wrap_outputs(torch.clone))
    assert result.status == MISMATCH
    assert _mismatched(result) == {"alias/out"}, result.summary()


def test_refusal_needs_a_seqweave_error() -> None:
    mlp = by_name("mlp")
    refused = run_differential(mlp, make_backend=lambda: _raising(CaptureError("no graph for you")))
    assert refused.status == REFUSED and "no graph for you" in refused.refusal
    crashed = run_differential(mlp, make_backend=lambda: _raising(IndexError("list index out of range")))
    assert crashed.status == ERROR and "IndexError" in crashed.exception


def test_missing_gradient_is_a_mismatch_not_skipped() -> None:
    assert not compare_values("grad/w", None, torch.zeros(2)).ok
    assert not compare_values("grad/w", torch.zeros(2), None).ok
    assert compare_values("grad/w", None, None).ok
    assert not compare_values("state/count", torch.tensor(2), torch.tensor(1)).ok
