"""Attention detection on small hand-written modules: what is replaced, what is left alone and why.

Every case also checks numerics against eager, so "left alone" must still compute the right thing.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from seqweave.compiler import SeqweaveBackend

B, H, S, D = 2, 4, 24, 8


def _qkv(seed=0, kv_heads=H):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, S, D, generator=generator, dtype=torch.float64)
    k = torch.randn(B, kv_heads, S, D, generator=generator, dtype=torch.float64)
    v = torch.randn(B, kv_heads, S, D, generator=generator, dtype=torch.float64)
    return q, k, v


def _compile_and_check(fn, *args):
    backend = SeqweaveBackend()
    compiled = torch.compile(fn, backend=backend, fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(*args), fn(*args), atol=1e-12, rtol=1e-10)
    return backend


def _index_mask(predicate):
    q_idx = torch.arange(S)[:, None]
    kv_idx = torch.arange(S)[None, :]
    return predicate(q_idx, kv_idx)


def test_sdpa_with_index_built_chunked_mask_is_lifted():
    def attend(q, k, v):
        mask = _index_mask(lambda qi, ki: (qi // 6 == ki // 6) & (ki <= qi))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    backend = _compile_and_check(attend, *_qkv())
    assert [r.mask for r in backend.reports] == ["causal & chunked(6)"]
    assert backend.attention_count() == 1


def test_eager_sinks_and_window_is_lifted():
    def attend(q, k, v):
        allowed = _index_mask(lambda qi, ki: (ki <= qi) & ((ki < 2) | (qi - ki < 5)))
        scores = torch.matmul(q, k.transpose(2, 3)) * (1 / math.sqrt(D))
        scores = scores + torch.where(allowed, 0.0, torch.finfo(torch.float32).min)
        return torch.matmul(F.softmax(scores, dim=-1), v)

    backend = _compile_and_check(attend, *_qkv())
    assert [r.mask for r in backend.reports] == ["causal & (sinks(2) | sliding_window(4, 0))"]


def test_sdpa_gqa_is_kept_at_kv_head_count():
    def attend(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    backend = _compile_and_check(attend, *_qkv(kv_heads=2))
    report = backend.reports[0]
    assert (report.q_heads, report.kv_heads, report.mask) == (4, 2, "causal")


def test_irregular_constant_mask_falls_back_to_dense():
    pattern = torch.rand(S, S, generator=torch.Generator().manual_seed(3)) > 0.3
    pattern |= torch.eye(S, dtype=torch.bool)

    def attend(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=pattern)

    backend = _compile_and_check(attend, *_qkv())
    assert backend.reports[0].mask == "dense($0)"
    assert "dense" in backend.reports[0].reason


def test_softmax_over_the_wrong_axis_is_left_alone():
    def not_attention(q, k, v):
        return torch.matmul(F.softmax(torch.matmul(q, k.transpose(2, 3)), dim=-2), v)

    backend = _compile_and_check(not_attention, *_qkv())
    assert not backend.reports[0].found
    assert "dim -2" in backend.reports[0].reason
    assert backend.attention_count() == 0


def test_mask_that_depends_on_data_is_left_alone():
    def data_masked(q, k, v):
        scores = torch.matmul(q, k.transpose(2, 3))
        scores = scores + torch.where(v.sum(-1, keepdim=True).transpose(2, 3) > 0, 0.0, -1e9)
        return torch.matmul(F.softmax(scores, dim=-1), v)

    backend = _compile_and_check(data_masked, *_qkv())
    assert not backend.reports[0].found
    assert "depends on floating-point data" in backend.reports[0].reason


def test_attention_probabilities_used_elsewhere_are_left_alone():
    def returns_probs(q, k, v):
        probs = F.softmax(torch.matmul(q, k.transpose(2, 3)), dim=-1)
        return torch.matmul(probs, v) + probs.sum()

    backend = _compile_and_check(returns_probs, *_qkv())
    assert not backend.reports[0].found
    assert "used elsewhere" in backend.reports[0].reason


def test_dropout_in_training_is_left_alone():
    def dropped(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.1)

    backend = SeqweaveBackend()
    torch.compile(dropped, backend=backend, fullgraph=True, dynamic=False)(*_qkv())
    assert not backend.reports[0].found
    assert "dropout_p=0.1" in backend.reports[0].reason


@pytest.mark.parametrize("additive_bias", [0.5])
def test_additive_bias_is_not_mistaken_for_a_mask(additive_bias):
    def biased(q, k, v):
        bias = _index_mask(lambda qi, ki: (qi - ki).abs()).to(q.dtype) * -additive_bias
        return torch.matmul(F.softmax(torch.matmul(q, k.transpose(2, 3)) + bias, dim=-1), v)

    backend = _compile_and_check(biased, *_qkv())
    assert not backend.reports[0].found
    assert "ALiBi" in backend.reports[0].reason
