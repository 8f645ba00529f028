"""More spellings of attention, each found, replaced by `seqweave::attention` and equal to eager.

nn.MultiheadAttention and the nn.Transformer layers, einsum, bmm/baddbmm and Gemma-2's logit
soft-capping. Every compiled model is float32 and is checked, output and gradients, against a
float64 eager copy of itself. The last tests pin what must be left alone, and that it is
reported with its reason.
"""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from seqweave.compiler import SeqweaveBackend

B, N, E, H = 2, 6, 8, 2
D = E // H
TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def _seeded(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _padding():
    """key_padding_mask: True hides a key; the second sequence has two padded keys."""
    hidden = torch.zeros(B, N, dtype=torch.bool)
    hidden[1, -2:] = True
    return hidden


def _compile_and_compare(model, inputs, train=True):
    """Compile `model` in float32; its output (and, in training, every gradient) equals a float64
    eager copy of it. Returns the backend."""
    torch.manual_seed(0)
    reference = copy.deepcopy(model).double().train(train)
    model.train(train)
    backend = SeqweaveBackend()
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)
    ours = [x.clone().requires_grad_(train) if x.is_floating_point() else x for x in inputs]
    theirs = [x.double().requires_grad_(train) if x.is_floating_point() else x for x in inputs]
    with torch.set_grad_enabled(train):
        out, expected = compiled(*ours), reference(*theirs)
    torch.testing.assert_close(out.double(), expected, **TOLERANCE)
    if train:
        weights = _seeded(*expected.shape, seed=1)
        (out * weights).sum().backward()
        (expected * weights.double()).sum().backward()
        pairs = [(a.grad, b.grad) for a, b in zip(model.parameters(), reference.parameters())]
        pairs += [(a.grad, b.grad) for a, b in zip(ours, theirs) if b.is_floating_point()]
        assert pairs and all(a is not None and b is not None for a, b in pairs), "a gradient is missing"
        for a, b in pairs:
            torch.testing.assert_close(a.double(), b, **TOLERANCE)
    return backend


def _replaced(backend):
    return [(r.form, r.mask) for r in backend.reports if r.found]


# --- nn.MultiheadAttention -------------------------------------------------------------------

class SelfAttention(nn.Module):
    """nn.MultiheadAttention(x, x, x, need_weights=False) with the masks `masks(x, padding)` gives."""

    def __init__(self, batch_first, masks):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, H, batch_first=batch_first)
        self.masks = masks

    def forward(self, x, padding):
        return self.attn(x, x, x, need_weights=False, **self.masks(x, padding))[0]


def _bool_causal(x, padding):
    return dict(attn_mask=torch.ones(N, N, dtype=torch.bool).triu(1))


def _float_causal(x, padding):
    return dict(attn_mask=nn.Transformer.generate_square_subsequent_mask(N, dtype=x.dtype))


def _is_causal(x, padding):
    return dict(attn_mask=torch.ones(N, N, dtype=torch.bool).triu(1), is_causal=True)


def _key_padding(x, padding):
    return dict(key_padding_mask=padding)


def _float_causal_and_padding(x, padding):
    hidden = torch.zeros(B, N, dtype=x.dtype).masked_fill(padding, float("-inf"))
    return dict(attn_mask=nn.Transformer.generate_square_subsequent_mask(N, dtype=x.dtype),
                key_padding_mask=hidden, is_causal=True)  # with padding, torch merges and drops the hint


def _per_head_window(x, padding):
    index = torch.arange(N)
    far = (index[:, None] - index[None, :]).abs() > 1
    return dict(attn_mask=far.expand(B * H, N, N))  # [B*H, N, N]


@pytest.mark.parametrize("batch_first, masks, mask", [
    (True, _bool_causal, "causal"),
    (False, _float_causal, "causal"),
    (False, _is_causal, "causal"),
    (True, _key_padding, "full & padding($0)"),
    (True, _float_causal_and_padding, "causal & padding($0)"),
    (False, _per_head_window, "sliding_window(1, 1)"),
], ids=lambda value: getattr(value, "__name__", str(value)))
def test_multihead_attention_masks_are_merged_as_torch_merges_them(batch_first, masks, mask):
    x = _seeded(B, N, E) if batch_first else _seeded(N, B, E)
    backend = _compile_and_compare(SelfAttention(batch_first, masks), [x, _padding()])
    assert _replaced(backend) == [("multi_head_attention", mask)]
    assert backend.attention_count() == 1 and backend.attention_count("backward") == 1


class CrossAttention(nn.Module):
    """Queries attend to a memory of another length and width (separate q/k/v projections)."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, H, kdim=5, vdim=3, batch_first=True)

    def forward(self, x, keys, values):
        return self.attn(x, keys, values, need_weights=False)[0]


def test_cross_attention_with_separate_projection_weights():
    inputs = [_seeded(B, N, E), _seeded(B, N + 3, 5, seed=2), _seeded(B, N + 3, 3, seed=3)]
    backend = _compile_and_compare(CrossAttention(), inputs)
    assert _replaced(backend) == [("multi_head_attention", "full")]


class CallerMask(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, H, batch_first=True)

    def forward(self, x, hidden):
        return self.attn(x, x, x, need_weights=False, attn_mask=hidden)[0]


def test_a_mask_the_caller_passes_is_never_fitted_to_its_first_values():
    """Dynamo guards no tensor values: a causal mask passed in today may be another tomorrow."""
    model = CallerMask()
    backend = SeqweaveBackend()
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)
    x = _seeded(B, N, E)
    for hidden in (torch.ones(N, N, dtype=torch.bool).triu(1), torch.ones(N, N, dtype=torch.bool).tril(-1)):
        torch.testing.assert_close(compiled(x, hidden), model(x, hidden), **TOLERANCE)
    [report] = backend.reports
    assert report.found and report.mask == "dense($0)" and "passed in by the caller" in report.reason


# --- nn.TransformerEncoderLayer / nn.TransformerDecoderLayer ---------------------------------

class Encoder(nn.Module):
    def __init__(self, **options):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=2 * E, dropout=0.0, batch_first=True,
                                                **options)

    def forward(self, x, padding):
        causal = torch.ones(N, N, dtype=torch.bool).triu(1)
        return self.layer(x, src_mask=causal, src_key_padding_mask=padding, is_causal=True)


def test_transformer_encoder_layer_in_training():
    backend = _compile_and_compare(Encoder(), [_seeded(B, N, E), _padding()])
    assert _replaced(backend) == [("multi_head_attention", "causal & padding($0)")]


@pytest.mark.parametrize("options", [{}, dict(norm_first=True, activation="gelu")], ids=["post_norm", "pre_norm_gelu"])
def test_transformer_encoder_layer_fast_path_in_inference(options):
    """eval() under no_grad takes torch._transformer_encoder_layer_fwd: spelled out again, then replaced."""
    backend = _compile_and_compare(Encoder(**options), [_seeded(B, N, E), _padding()], train=False)
    assert _replaced(backend) == [("multi_head_attention", "causal & padding($0)")]


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerDecoderLayer(E, H, dim_feedforward=2 * E, dropout=0.0)

    def forward(self, target, memory):
        causal = nn.Transformer.generate_square_subsequent_mask(N, dtype=target.dtype)
        return self.layer(target, memory, tgt_mask=causal, tgt_is_causal=True)


def test_transformer_decoder_layer_self_and_cross_attention():
    backend = _compile_and_compare(Decoder(), [_seeded(N, B, E), _seeded(N + 2, B, E, seed=2)])
    assert _replaced(backend) == [("multi_head_attention", "causal"), ("multi_head_attention", "full")]


# --- einsum, bmm, soft-capping ---------------------------------------------------------------

class Heads(nn.Module):
    """Projects x [B, N, E] to q, k, v as [B, N, H, D]; subclasses attend."""

    def __init__(self):
        super().__init__()
        self.qkv, self.out = nn.Linear(E, 3 * E), nn.Linear(E, E)

    def forward(self, x):
        q, k, v = self.qkv(x).view(B, N, 3, H, D).unbind(2)
        return self.out(self.attend(q, k, v).reshape(B, N, E))


class EinsumSequenceMajor(Heads):
    def attend(self, q, k, v):
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D)
        causal = torch.ones(N, N, dtype=torch.bool).tril()
        weights = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
        return torch.einsum("bhqk,bkhd->bqhd", weights, v)


class EinsumHeadMajor(Heads):
    def attend(self, q, k, v):
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
        scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * D ** -0.5
        hidden = torch.ones(N, N, dtype=torch.bool).triu(1)
        weights = F.softmax(scores.masked_fill(hidden, torch.finfo(scores.dtype).min), dim=-1)
        return torch.einsum("bhqk,bhkd->bhqd", weights, v).transpose(1, 2)


class Bmm(Heads):
    """[B*H, N, D] tensors, scores through bmm with an additive causal mask."""

    def attend(self, q, k, v):
        q, k, v = (x.transpose(1, 2).reshape(B * H, N, D) for x in (q, k, v))
        mask = torch.full((N, N), float("-inf"), dtype=q.dtype).triu(1)
        weights = torch.softmax(torch.bmm(q, k.transpose(1, 2)) * D ** -0.5 + mask, dim=-1)
        return torch.bmm(weights, v).view(B, H, N, D).transpose(1, 2)


class Baddbmm(Heads):
    def attend(self, q, k, v):
        q, k, v = (x.transpose(1, 2).reshape(B * H, N, D) for x in (q, k, v))
        mask = torch.full((N, N), float("-inf"), dtype=q.dtype).triu(1)
        weights = torch.softmax(torch.baddbmm(mask, q, k.transpose(-2, -1), alpha=D ** -0.5), dim=-1)
        return torch.bmm(weights, v).view(B, H, N, D).transpose(1, 2)


class Softcapped(Heads):
    """Gemma-2's eager attention: scores * scaling, / cap, tanh, * cap, + causal mask."""

    cap = 2.0

    def attend(self, q, k, v):
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
        scores = torch.matmul(q, k.transpose(2, 3)) * D ** -0.5
        scores = torch.tanh(scores / self.cap) * self.cap
        mask = torch.full((N, N), float("-inf"), dtype=q.dtype).triu(1)
        weights = F.softmax(scores + mask, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(weights, v).transpose(1, 2)


@pytest.mark.parametrize("model, form", [
    (EinsumSequenceMajor, "einsum"), (EinsumHeadMajor, "einsum"), (Bmm, "bmm"), (Baddbmm, "bmm"),
], ids=lambda value: getattr(value, "__name__", str(value)))
def test_einsum_and_bmm_attention_is_read_as_matmul(model, form):
    backend = _compile_and_compare(model(), [_seeded(B, N, E)])
    assert _replaced(backend) == [(form, "causal")]
    assert backend.attention_count() == 1 and backend.attention_count("backward") == 1


def test_gemma2_soft_capping_becomes_the_score_mod():
    backend = _compile_and_compare(Softcapped(), [_seeded(B, N, E) * 4])  # large scores: the cap bites
    [report] = backend.reports
    assert (report.found, report.mask, report.score_mod) == (True, "causal", "softcap(2.0)")


# --- left alone, and said so -----------------------------------------------------------------

class ReturnsWeights(nn.Module):
    def __init__(self, dropout=0.0, need_weights=False):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, H, dropout=dropout, batch_first=True)
        self.need_weights = need_weights

    def forward(self, x):
        out, weights = self.attn(x, x, x, need_weights=self.need_weights)
        return out if weights is None else out + weights.sum(-1, keepdim=True)


def test_multihead_attention_that_returns_its_weights_is_left_alone():
    backend = _compile_and_compare(ReturnsWeights(need_weights=True), [_seeded(B, N, E)])
    [report] = backend.reports
    assert not report.found and "need_weights=True" in report.reason
    assert backend.attention_count() == 0


def test_multihead_attention_with_dropout_in_training_is_left_alone():
    backend = SeqweaveBackend()
    with torch.no_grad():  # the decision is the same; the inference graph alone is cheaper to compile
        torch.compile(ReturnsWeights(dropout=0.1).train(), backend=backend, fullgraph=True)(_seeded(B, N, E))
    [report] = backend.reports
    assert not report.found and "dropout_p=0.1 in training mode" in report.reason


def _probabilities_on_the_right(q, k, v):
    probs = torch.softmax(q @ k.transpose(-2, -1), dim=-1)
    return (v.transpose(-2, -1) @ probs.transpose(-2, -1)).transpose(-2, -1)


def _three_operand_einsum(q, k, v):
    probs = torch.softmax(torch.einsum("bhqd,bhkd->bhqk", q, k), dim=-1)
    return torch.einsum("bhqk,bhkd,bh->bhqd", probs, v, torch.ones(B, H))


@pytest.mark.parametrize("attend, why", [
    (_probabilities_on_the_right, "no product with values reads its probabilities"),
    (_three_operand_einsum, "einsum of other than two tensors"),
])
def test_attention_like_softmax_that_is_not_read_is_reported(attend, why):
    backend = SeqweaveBackend()
    q, k, v = (_seeded(B, H, N, D, seed=seed) for seed in range(3))
    out = torch.compile(attend, backend=backend, fullgraph=True, dynamic=False)(q, k, v)
    torch.testing.assert_close(out, attend(q, k, v), **TOLERANCE)
    [report] = backend.reports
    assert not report.found and report.reason.startswith("attention-like softmax left alone: ")
    assert why in report.reason
    assert backend.attention_count() == 0
