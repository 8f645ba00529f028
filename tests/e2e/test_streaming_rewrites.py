"""`streaming` and `lm-infinite` against references of their declared semantics, written here.

The model is written the way users write one (rotary tables from an `inv_freq` buffer,
`rotate_half`, SDPA with is_causal). References, in plain torch and independent of the
passes' near/far decomposition:

- StreamingLLM decoded token by token with its rolling cache: unrotated keys kept for the
  first `sinks` tokens and the last `window`, the oldest non-sink evicted, keys rotated by
  their cache slot and the query by its own;
- both rewrites as a dense score matrix where each pair (i, j) is scored with q rotated by the
  distance the method declares (RoPE depends on distance only), used for gradients too.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import seqweave

VOCAB, HIDDEN, HEADS, HEAD_DIM, LAYERS = 48, 32, 4, 8, 2
TOLERANCE = 1e-5


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RopeLM(nn.Module):
    """A small causal LM with rotary positions, as a user would write it."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.qkv = nn.ModuleList(nn.Linear(HIDDEN, 3 * HIDDEN, bias=False) for _ in range(LAYERS))
        self.out = nn.ModuleList(nn.Linear(HIDDEN, HIDDEN, bias=False) for _ in range(LAYERS))
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM)))

    def heads(self, layer, h):
        b, n, _ = h.shape
        q, k, v = self.qkv[layer](h).view(b, n, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)
        return q, k, v

    def forward(self, ids):
        h = self.embed(ids)
        positions = torch.arange(ids.shape[1], device=ids.device)[None]
        freqs = positions[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().unsqueeze(1), emb.sin().unsqueeze(1)
        for layer in range(LAYERS):
            q, k, v = self.heads(layer, h)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            h = h + self.out[layer](a.transpose(1, 2).reshape(h.shape))
        return self.head(h)


def _rotate_at(model, x, position):
    freqs = torch.tensor(float(position)) * model.inv_freq
    emb = torch.cat((freqs, freqs))
    return x * emb.cos() + rotate_half(x) * emb.sin()


def streaming_decode(model, ids, sinks, window):
    """Logits of StreamingLLM decoding `ids` one token at a time (batch 1)."""
    caches = [([], []) for _ in range(LAYERS)]  # unrotated keys, values per layer
    logits = []
    for t in range(ids.shape[1]):
        h = model.embed(ids[:, t:t + 1])
        for layer in range(LAYERS):
            q, k, v = model.heads(layer, h)
            keys, values = caches[layer]
            keys.append(k)
            values.append(v)
            if len(keys) > sinks + window:
                del keys[sinks], values[sinks]  # evict the oldest token that is not a sink
            rotated = torch.cat([_rotate_at(model, key, slot) for slot, key in enumerate(keys)], dim=2)
            query = _rotate_at(model, q, len(keys) - 1)
            scores = (query @ rotated.transpose(-1, -2)) / HEAD_DIM ** 0.5
            a = scores.softmax(-1) @ torch.cat(values, dim=2)
            h = h + model.out[layer](a.transpose(1, 2).reshape(h.shape))
        logits.append(model.head(h))
    return torch.cat(logits, dim=1)


def dense_by_distance(model, ids, allowed, distance):
    """The model with attention scored as q rotated by distance[i, j] against the unrotated key j."""
    n = ids.shape[1]
    h = model.embed(ids)
    tables = torch.arange(n).float()[:, None] * model.inv_freq
    emb = torch.cat((tables, tables), dim=-1)
    cos, sin = emb.cos()[distance.clamp_min(0)], emb.sin()[distance.clamp_min(0)]  # [n, n, d]
    for layer in range(LAYERS):
        q, k, v = model.heads(layer, h)
        q_pairs = q[:, :, :, None, :] * cos + rotate_half(q)[:, :, :, None, :] * sin  # [b, h, n, n, d]
        scores = (q_pairs * k[:, :, None, :, :]).sum(-1) / HEAD_DIM ** 0.5
        a = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v
        h = h + model.out[layer](a.transpose(1, 2).reshape(h.shape))
    return model.head(h)


def _streaming_pairs(n, sinks, window):
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    allowed = (j <= i) & ((j < sinks) | (i - j < window))
    evicted = i >= sinks + window  # the cache is full: the query sits at its last slot
    distance = torch.where(evicted & (j < sinks), sinks + window - 1 - j, i - j)
    return allowed, distance


def _lm_infinite_pairs(n, sinks, window, limit):
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    allowed = (j <= i) & ((j < sinks) | (i - j < window))
    return allowed, (i - j).clamp(max=limit)


def _model_and_ids(n):
    torch.manual_seed(0)
    return RopeLM(), torch.randint(0, VOCAB, (1, n))


def _compiled_logits(model, ids, pipeline):
    backend = seqweave.backend(pipeline=f"canonicalize,{pipeline}")
    logits = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)(ids)
    return logits, backend


def _close(got, expected):
    return float((got - expected).abs().max() / expected.abs().max()) <= TOLERANCE


def _pinned(backend, mask_part, far):
    nodes = [node for graph in backend.graphs for node in graph.graph.nodes if node.op.startswith("attn.")]
    assert nodes and all(mask_part in str(node.kwargs["mask"]) and far in str(node.kwargs["positions"])
                         for node in nodes)
    assert all(report.positions for report in backend.reports if report.found)


def test_streaming_equals_token_by_token_rolling_cache():
    model, ids = _model_and_ids(30)
    sinks, window = 2, 8
    with torch.no_grad():
        expected = streaming_decode(model, ids, sinks, window)
        got, backend = _compiled_logits(model, ids, f"streaming{{sinks={sinks},window={window}}}")
        dense = model(ids)
    assert _close(got, expected)
    assert not _close(got, dense)  # the rewrite changed what the model computes
    _pinned(backend, "sliding_window(7, 0)", "far=[")


@pytest.mark.parametrize("method, pipeline, pairs", [
    ("streaming", "streaming{sinks=2,window=8}", lambda n: _streaming_pairs(n, 2, 8)),
    ("lm-infinite", "lm-infinite{sinks=2,window=8,max_distance=12}", lambda n: _lm_infinite_pairs(n, 2, 8, 12)),
])
def test_rewrite_trains_like_its_dense_reference(method, pipeline, pairs):
    model, ids = _model_and_ids(29)
    allowed, distance = pairs(ids.shape[1])
    expected = dense_by_distance(model, ids, allowed, distance)
    expected.pow(2).mean().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    got, backend = _compiled_logits(model, ids, pipeline)
    got.pow(2).mean().backward()
    assert _close(got.detach(), expected.detach())
    for name, p in model.named_parameters():
        assert _close(p.grad, grads[name]), name
    assert [graph.kind for graph in backend.graphs] == ["forward", "backward"]
    _pinned(backend, "sinks(2)", "far=[")


def test_streaming_without_sinks_is_a_plain_window():
    model, ids = _model_and_ids(20)
    allowed, distance = _streaming_pairs(20, 0, 6)
    with torch.no_grad():
        got, backend = _compiled_logits(model, ids, "streaming{sinks=0,window=6}")
        expected = dense_by_distance(model, ids, allowed, distance)
    assert _close(got, expected)
    _pinned(backend, "sliding_window(5, 0)", "rope(")
