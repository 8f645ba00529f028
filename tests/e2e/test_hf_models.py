"""Real HF architectures through `torch.compile(backend="seqweave", fullgraph=True)` against eager.

Each case checks that the pass fired (one attn.sdpa per layer forward, one sdpa_backward per
layer backward, the right lifted MaskSpec) and that logits, loss and every parameter gradient
match eager in fp32.
"""
import pytest
import torch

from seqweave.compiler import SeqweaveBackend
from seqweave.testing.compare import compare_with_eager
from seqweave.testing.models import SampleSpec, build_sample

TOLERANCE = 1e-5
LAYERS = 2
SEQ_LEN = 48

#: (sample, attn_implementation, padded, packed) -> expected MaskSpec text for every layer.
CASES = {
    ("llama-tiny", "sdpa", False, False): "causal",
    ("llama-tiny", "sdpa", True, False): "causal & padding($0)",
    ("llama-tiny", "eager", False, False): "causal",
    ("llama-tiny", "eager", True, False): "causal & padding($0)",
    ("llama-tiny", "sdpa", False, True): "causal & document($0)",
    ("llama-tiny", "eager", False, True): "causal & document($0)",
    ("qwen2-tiny", "sdpa", False, False): "causal",
    ("qwen2-tiny", "sdpa", True, False): "causal & padding($0)",
    ("qwen2-tiny", "eager", False, False): "causal",
    ("qwen2-tiny", "eager", True, False): "causal & padding($0)",
    # Mistral's window is seq_len // 4 = 12 tokens: each query sees itself and 11 before it.
    ("mistral-tiny", "sdpa", False, False): "causal & sliding_window(11, 0)",
    ("mistral-tiny", "sdpa", True, False): "causal & sliding_window(11, 0) & padding($0)",
    ("mistral-tiny", "eager", False, False): "causal & sliding_window(11, 0)",
    ("mistral-tiny", "eager", True, False): "causal & sliding_window(11, 0) & padding($0)",
    ("gpt2-tiny", "sdpa", False, False): "causal",
    ("gpt2-tiny", "sdpa", True, False): "causal & padding($0)",
    ("gpt2-tiny", "eager", False, False): "causal",
    ("gpt2-tiny", "eager", True, False): "causal & padding($0)",
}


def _case_id(case):
    name, impl, padded, packed = case
    return "-".join([name, impl] + (["padded"] if padded else []) + (["packed"] if packed else []))


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES), ids=_case_id)
def test_compiled_matches_eager(case):
    name, impl, padded, packed = case
    model, inputs = build_sample(SampleSpec(name, seq_len=SEQ_LEN, layers=LAYERS, attn_implementation=impl,
                                            padded=padded, packed=packed))
    backend = SeqweaveBackend()
    result = compare_with_eager(model, inputs, backend)

    assert [report.mask for report in backend.reports] == [CASES[case]] * LAYERS
    assert all(report.found for report in backend.reports)
    assert backend.attention_count("forward") == LAYERS
    assert backend.attention_count("backward") == LAYERS
    assert result.logits_max_abs <= TOLERANCE, result
    assert result.loss_abs <= TOLERANCE, result
    assert result.grad_max_rel <= TOLERANCE, result


def test_registered_backend_name_with_options():
    """`backend="seqweave"` resolves through the torch_dynamo_backends entry point and reads `options=`."""
    model, inputs = build_sample(SampleSpec("llama-tiny", seq_len=16, layers=1))
    compiled = torch.compile(model, backend="seqweave", options={"pipeline": "canonicalize"}, fullgraph=True,
                             dynamic=False)
    with torch.no_grad():
        expected = model(**inputs).logits
        torch.testing.assert_close(compiled(**inputs).logits, expected, atol=TOLERANCE, rtol=0)


def test_unknown_option_is_named():
    model, inputs = build_sample(SampleSpec("llama-tiny", seq_len=16, layers=1))
    compiled = torch.compile(model, backend="seqweave", options={"pipline": "x"}, dynamic=False)
    with pytest.raises(Exception, match="pipline"):
        compiled(**inputs)
