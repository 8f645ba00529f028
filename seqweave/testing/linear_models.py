"""Linear-attention models written the way users write them (plain torch, no seqweave in sight),
for tests, samples and benchmarks. Each attention is the parallel form with its N x N score
matrix; seqweave is expected to recognise it and never build that matrix.

* `DecayAttention`: RetNet / Lightning style, per-head decay lambda_h = 1 - 2^(-5-h), an
  optional RetNet normaliser `/ clamp(|row sum|, min=1)`.
* `CausalLinearAttention`: Katharopoulos et al., phi = elu + 1, causal mask by `masked_fill`,
  normaliser `/ (row sum + eps)`.
* `CumsumLinearAttention`: the same model as fast-transformers writes it without the N x N
  matrix: `cumsum` of k ⊗ v, `einsum` with q, and the normaliser q . cumsum(k).
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


class SoftmaxAttention(_Heads):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split(x)
        return self.merge(F.scaled_dot_product_attention(q, k, v, is_causal=True))


MIXERS = {"l": DecayAttention, "c": CausalLinearAttention, "u": CumsumLinearAttention, "s": SoftmaxAttention}


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
    """Token ids [B, N] -> logits [B, N, vocab]; `pattern` names each layer's mixer (l, c, u or s)."""

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
