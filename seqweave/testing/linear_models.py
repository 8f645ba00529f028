"""Linear-attention models written the way users write them (plain torch, no seqweave in sight),
for tests, samples and benchmarks. Each attention is the parallel form with its N x N score
matrix; seqweave is expected to recognise it and never build that matrix.

* `DecayAttention`: RetNet / Lightning style, per-head decay lambda_h = 1 - 2^(-5-h), an
  optional RetNet normaliser `/ clamp(|row sum|, min=1)`.
* `CausalLinearAttention`: Katharopoulos et al., phi = elu + 1, causal mask by `masked_fill`,
  normaliser `/ (row sum + eps)`.
* `CumsumLinearAttention`: the same model as fast-transformers writes it without the N x N
  matrix: `cumsum` of k ⊗ v, `einsum` with q, and the normaliser q . cumsum(k).
* `GatedAttention`: GLA, per-token per-channel forget gates from the input, written as the
  reference loop over time (fla's `naive_recurrent_gla`).
* `DeltaAttention`: DeltaNet, L2-normalised keys and a per-token beta, the reference loop.
* `SoftmaxAttention`: plain causal SDPA, for hybrid models.
* `TinyLM`: embedding, pre-norm blocks of any of these (a pattern string such as "lsll"), and
  a vocabulary head; returns logits (the caller takes the loss).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def retnet_gammas(heads: int) -> torch.Tensor:
    return 1 - 2.0 ** (-5.0 - torch.arange(heads, dtype=torch.float32))


class _Heads(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.out = nn.Linear(hidden, hidden, bias=False)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        return q, k, v

    def merge(self, o: torch.Tensor) -> torch.Tensor:
        b, _, n, _ = o.shape
        return self.out(o.transpose(1, 2).reshape(b, n, -1))


class DecayAttention(_Heads):
    """o = ((q k^T / sqrt(d)) * D) v, D[i, j] = gamma_h^(i-j) for i >= j (RetNet's parallel form)."""

    def __init__(self, hidden: int, heads: int, normalise: bool = True) -> None:
        super().__init__(hidden, heads)
        self.normalise = normalise
        self.register_buffer("gamma", retnet_gammas(heads), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split(x)
        n = x.shape[1]
        index = torch.arange(n, device=x.device)
        distance = index[:, None] - index[None, :]
        decay = (self.gamma[:, None, None] ** distance.clamp(min=0)) * (distance >= 0)
        scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5 * decay.to(q.dtype)
        o = scores @ v
        if self.normalise:
            o = o / scores.sum(-1, keepdim=True).abs().clamp(min=1)
        return self.merge(o)


class CausalLinearAttention(_Heads):
    """o_i = phi(q_i) sum_{j<=i} phi(k_j)^T v_j / (phi(q_i) . sum_{j<=i} phi(k_j) + eps), phi = elu + 1."""

    def __init__(self, hidden: int, heads: int, eps: float = 1e-6) -> None:
        super().__init__(hidden, heads)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split(x)
        q, k = F.elu(q) + 1, F.elu(k) + 1
        n = x.shape[1]
        future = torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1)
        scores = (q @ k.transpose(-1, -2)).masked_fill(future, 0)
        return self.merge((scores @ v) / (scores.sum(-1, keepdim=True) + self.eps))


class CumsumLinearAttention(_Heads):
    """The cumulative-sum form of `CausalLinearAttention` (N d Dv memory instead of N^2)."""

    def __init__(self, hidden: int, heads: int, eps: float = 1e-6, spelling: str = "einsum") -> None:
        super().__init__(hidden, heads)
        self.eps, self.spelling = eps, spelling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split(x)
        q, k = F.elu(q) + 1, F.elu(k) + 1
        if self.spelling == "einsum":
            state = torch.einsum("bhnd,bhne->bhnde", k, v).cumsum(2)
            numerator = torch.einsum("bhnd,bhnde->bhne", q, state)
            denominator = torch.einsum("bhnd,bhnd->bhn", q, k.cumsum(2))
        else:  # broadcasting, as people write it without einsum
            state = torch.cumsum(k[..., :, None] * v[..., None, :], dim=-3)
            numerator = (q[..., :, None] * state).sum(-2)
            denominator = (q * k.cumsum(-2)).sum(-1)
        return self.merge(numerator / (denominator[..., None] + self.eps))


class GatedAttention(_Heads):
    """S_t = diag(alpha_t) S_{t-1} + k_t^T v_t, alpha_t = exp(logsigmoid(W_a x_t) / 16); o_t = q_t S_t."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__(hidden, heads)
        self.gate = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split(x)
        b, n, _ = x.shape
        log_gate = (F.logsigmoid(self.gate(x)) / 16).view(b, n, self.heads, -1).transpose(1, 2)
        scale = q.shape[-1] ** -0.5
        o = torch.zeros_like(v)
        state = q.new_zeros(b, self.heads, q.shape[-1], v.shape[-1])
        for t in range(n):
            kv = k[:, :, t][..., None] * v[:, :, t][..., None, :]
            state = state * log_gate[:, :, t].exp()[..., None] + kv
            o[:, :, t] = ((q[:, :, t] * scale)[..., None] * state).sum(-2)
        return self.merge(o)


class DeltaAttention(_Heads):
    """S_t = S_{t-1} + k_t^T (beta_t (v_t - k_t S_{t-1})), k L2-normalised, beta = sigmoid(W_b x)."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__(hidden, heads)
        self.beta = nn.Linear(hidden, heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split(x)
        b, n, _ = x.shape
        k = F.normalize(k, dim=-1)
        beta = torch.sigmoid(self.beta(x)).transpose(1, 2)[..., None]  # [B, H, N, 1]
        o = torch.zeros_like(v)
        state = torch.zeros(b, self.heads, q.shape[-1], v.shape[-1]).to(v)
        for t in range(n):
            k_t = k[:, :, t]
            v_t = v[:, :, t] - (state.clone() * k_t[..., None]).sum(-2)
            v_t = v_t * beta[:, :, t]
            state = state.clone() + k_t.unsqueeze(-1) * v_t.unsqueeze(-2)
            o[:, :, t] = torch.einsum("bhd,bhdm->bhm", q[:, :, t], state)
        return self.merge(o)


class SoftmaxAttention(_Heads):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split(x)
        return self.merge(F.scaled_dot_product_attention(q, k, v, is_causal=True))


MIXERS = {"l": DecayAttention, "c": CausalLinearAttention, "u": CumsumLinearAttention, "g": GatedAttention,
          "d": DeltaAttention, "s": SoftmaxAttention}


class Block(nn.Module):
    def __init__(self, mixer: nn.Module, hidden: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.mixer = mixer
        self.mlp = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    """Token ids [B, N] -> logits [B, N, vocab]; `pattern` names each layer's mixer (MIXERS: l, c, u, g, d, s)."""

    def __init__(self, pattern: str = "ll", vocab: int = 64, hidden: int = 32, heads: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList(Block(MIXERS[kind](hidden, heads), hidden) for kind in pattern)
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def hybrid_example(seq_len: int = 128) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """A 1-in-4 softmax hybrid and a batch of ids, for `seqweave explain
    seqweave.testing.linear_models:hybrid_example --sp 4` (one softmax, three decay layers)."""
    torch.manual_seed(0)
    return TinyLM("slll").eval(), (torch.randint(0, 64, (2, seq_len)),)
