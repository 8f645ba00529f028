"""Models written the way users write them, for sequence-parallel tests.

Each entry builds a fresh module, its inputs and how a step uses the output (the loss inside
the module, or taken outside on the returned output). `sp_step` trains one step of an entry
on this rank under a given strategy and compares output, loss and every gradient (parameters
and float inputs) with one eager process on the same data. Shapes are tiny so a whole zoo
runs in CPU seconds per rank count.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

D, HEADS = 16, 4


class DiTBlock(nn.Module):
    """A DiT-style block on float latents: adaLN modulation from a timestep embedding,
    non-causal attention, an MLP; trained with MSE against a target inside the module."""

    def __init__(self) -> None:
        super().__init__()
        self.time = nn.Linear(1, 6 * D)
        self.norm1, self.norm2 = nn.LayerNorm(D, elementwise_affine=False), nn.LayerNorm(D, elementwise_affine=False)
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.mlp = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(approximate="tanh"), nn.Linear(2 * D, D))

    def forward(self, latents: torch.Tensor, t: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        b, n, _ = latents.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = self.time(t[:, None]).unsqueeze(1).chunk(6, dim=-1)
        h = self.norm1(latents) * (1 + scale1) + shift1
        q, k, v = self.qkv(h).reshape(b, n, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, D)
        x = latents + gate1 * self.proj(attn)
        x = x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)
        return F.mse_loss(x, target)


class ViTClassifier(nn.Module):
    """A ViT-style encoder: linear patch embedding of float patches, learned positions,
    non-causal attention, mean pooling over tokens and a classifier head (loss outside)."""

    def __init__(self, patches: int, patch_dim: int = 12, classes: int = 5) -> None:
        super().__init__()
        self.embed = nn.Linear(patch_dim, D)
        self.positions = nn.Parameter(torch.randn(1, patches, D) * 0.1)
        self.norm = nn.LayerNorm(D)
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.head = nn.Linear(D, classes)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        x = self.embed(patches) + self.positions
        b, n, _ = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, n, 3, HEADS, D // HEADS).unbind(2)
        attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + self.proj(attn.transpose(1, 2).reshape(b, n, D))
        return self.head(x.mean(dim=1))


class EinsumGPT(nn.Module):
    """A GPT block whose attention is written with einsum and an explicit causal softmax."""

    def __init__(self, vocab: int = 37) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, D)
        self.qkv, self.proj = nn.Linear(D, 3 * D, bias=False), nn.Linear(D, D, bias=False)
        self.head = nn.Linear(D, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, HEADS, D // HEADS).unbind(2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D // HEADS)
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        weights = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
        out = torch.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, n, D)
        return self.head(x + self.proj(out))


class TorchEncoder(nn.Module):
    """`nn.TransformerEncoder` with a causal mask and a key padding mask (loss outside)."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(D, HEADS, dim_feedforward=2 * D, dropout=0.0, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.batch_first = batch_first

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        n = x.shape[1 if self.batch_first else 0]
        causal = torch.ones(n, n, dtype=torch.bool).triu(1)  # True: not allowed to attend
        return self.encoder(x, mask=causal, src_key_padding_mask=padding, is_causal=True)


class ManyLosses(nn.Module):
    """Float frames through one attention layer, then every usual loss over tokens inside the
    module: MSE, L1, smooth L1, KL divergence and cross-entropy with label smoothing and an
    ignored class."""

    def __init__(self, classes: int = 6) -> None:
        super().__init__()
        self.qkv, self.head = nn.Linear(D, 3 * D), nn.Linear(D, classes)

    def forward(self, frames: torch.Tensor, target: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        b, n, _ = frames.shape
        q, k, v = self.qkv(frames).view(b, n, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, n, D)
        logits = self.head(x)
        log_probs = logits.log_softmax(-1)
        return (F.mse_loss(x, target) + F.l1_loss(x, target) + F.smooth_l1_loss(x, target, beta=0.5)
                + F.kl_div(log_probs, target[..., :log_probs.shape[-1]].softmax(-1), reduction="batchmean")
                + F.cross_entropy(logits.transpose(1, 2), labels, label_smoothing=0.1, ignore_index=0))


class BareAttention(nn.Module):
    """Attention alone on q, k, v inputs [B, N, H, D], as sequence-parallel libraries test it:
    grouped KV heads, and a mask kind: "causal", "window" (each query sees itself and the 2
    keys before it) or "documents" (packed documents from cumulative lengths, causal inside)."""

    def __init__(self, mask: str) -> None:
        super().__init__()
        self.mask = mask

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ends: torch.Tensor) -> torch.Tensor:
        n = q.shape[1]
        positions = torch.arange(n)
        causal = positions[:, None] >= positions[None, :]
        if self.mask == "causal":
            mask = None
        elif self.mask == "window":
            mask = causal & (positions[:, None] - positions[None, :] < 3)
        else:
            docs = torch.bucketize(positions, doc_ends, right=True)
            mask = causal & (docs[:, None] == docs[None, :])
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        return out.transpose(1, 2)


class HFLogits(nn.Module):
    """An HF causal LM as users call it for their own loss: token ids (or, with `embeds`, float
    input embeddings) in, logits out."""

    def __init__(self, sample: str = "llama-tiny", embeds: bool = False) -> None:
        super().__init__()
        from seqweave.testing.models import SampleSpec, build_sample
        self.lm = build_sample(SampleSpec(sample, hidden=32, layers=1))[0]
        self.embeds = embeds

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.embeds:
            return self.lm(inputs_embeds=ids, use_cache=False).logits
        return self.lm(input_ids=ids, use_cache=False).logits


@dataclass(frozen=True)
class Entry:
    """A zoo model: `build(n)` gives (module, inputs); `loss(out, inputs)` the scalar to
    differentiate outside the module (None: the module returns its loss)."""

    name: str
    build: Callable[[int], tuple[nn.Module, tuple]]
    loss: Callable[[Any, tuple], torch.Tensor] | None = None
    heads: int = HEADS


def _seeded(n: int, seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1000 + n)


def _dit(n: int) -> tuple[nn.Module, tuple]:
    g = _seeded(n)
    return DiTBlock(), (torch.randn(2, n, D, generator=g, requires_grad=True), torch.rand(2, generator=g),
                        torch.randn(2, n, D, generator=g))


def _vit(n: int) -> tuple[nn.Module, tuple]:
    return ViTClassifier(n), (torch.randn(2, n, 12, generator=_seeded(n), requires_grad=True),)


def _einsum_gpt(n: int) -> tuple[nn.Module, tuple]:
    return EinsumGPT(), (torch.randint(0, 37, (2, n), generator=_seeded(n)),)


def _encoder(batch_first: bool) -> Callable[[int], tuple[nn.Module, tuple]]:
    def build(n: int) -> tuple[nn.Module, tuple]:
        shape = (2, n, D) if batch_first else (n, 2, D)
        padding = torch.zeros(2, n, dtype=torch.bool)
        padding[1, n - 3:] = True  # the second sequence ends 3 tokens early
        return TorchEncoder(batch_first), (torch.randn(*shape, generator=_seeded(n), requires_grad=True), padding)
    return build


def _many_losses(n: int) -> tuple[nn.Module, tuple]:
    g = _seeded(n)
    return ManyLosses(), (torch.randn(2, n, D, generator=g, requires_grad=True), torch.randn(2, n, D, generator=g),
                          torch.randint(0, 6, (2, n), generator=g))


def _bare(mask: str) -> Callable[[int], tuple[nn.Module, tuple]]:
    def build(n: int) -> tuple[nn.Module, tuple]:
        g = _seeded(n)
        q = torch.randn(2, n, HEADS, D // HEADS, generator=g, requires_grad=True)
        k, v = (torch.randn(2, n, 2, D // HEADS, generator=g, requires_grad=True) for _ in range(2))
        return BareAttention(mask), (q, k, v, torch.tensor([n // 3, n // 2, n]))
    return build


def _hf_logits(sample: str = "llama-tiny") -> Callable[[int], tuple[nn.Module, tuple]]:
    def build(n: int) -> tuple[nn.Module, tuple]:
        return HFLogits(sample), (torch.randint(1, 128, (2, n), generator=_seeded(n)),)
    return build


def _hf_embeds(n: int) -> tuple[nn.Module, tuple]:
    return HFLogits(embeds=True), (torch.randn(2, n, 32, generator=_seeded(n), requires_grad=True),)


def _weights(shape: torch.Size) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(7))


def _classes_loss(out: torch.Tensor, inputs: tuple) -> torch.Tensor:
    return F.cross_entropy(out, torch.arange(out.shape[0]) % out.shape[1], label_smoothing=0.1)


def _next_token_loss(out: torch.Tensor, inputs: tuple) -> torch.Tensor:
    ids = inputs[0]
    return F.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), ids[:, 1:].reshape(-1))


def _weighted_sum(out: torch.Tensor, inputs: tuple) -> torch.Tensor:
    """What `out.backward(dout)` does, as a scalar: dout is a fixed random tensor."""
    return (out * _weights(out.shape)).sum()


ZOO: dict[str, Entry] = {entry.name: entry for entry in (
    Entry("dit", _dit),
    Entry("vit", _vit, _classes_loss),
    Entry("einsum-gpt", _einsum_gpt, _next_token_loss),
    Entry("encoder-batch-first", _encoder(True), _weighted_sum),
    Entry("encoder-seq-first", _encoder(False), _weighted_sum),
    Entry("hf-llama-logits", _hf_logits(), _next_token_loss),
    *(Entry(f"hf-{name}-logits", _hf_logits(f"{name}-tiny"), _next_token_loss) for name in ("qwen2", "mistral", "gpt2")),
    Entry("hf-llama-embeds", _hf_embeds, _weighted_sum),
    Entry("losses", _many_losses),
    *(Entry(f"attention-{mask}", _bare(mask), _weighted_sum) for mask in ("causal", "window", "documents")),
)}


def _relative(got: torch.Tensor | None, want: torch.Tensor | None) -> float:
    if got is None and want is None:
        return 0.0
    if got is None or want is None or got.shape != want.shape:
        return float("inf")
    return float((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30))


def _errors(model: nn.Module, reference: nn.Module, out: Any, expected: Any, inputs: tuple,
            ref_inputs: tuple, loss: torch.Tensor, ref_loss: torch.Tensor) -> dict[str, float]:
    errors = {"output": _relative(out.detach(), expected.detach()), "loss": _relative(loss.detach(), ref_loss.detach())}
    ref_params = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        errors[f"grad {name}"] = _relative(param.grad, ref_params[name].grad)
    for index, (got, want) in enumerate(zip(inputs, ref_inputs)):
        if isinstance(got, torch.Tensor) and got.requires_grad:
            errors[f"grad input {index}"] = _relative(got.grad, want.grad)
    return errors


def _fresh_inputs(inputs: tuple) -> tuple:
    return tuple(t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t
                 for t in inputs)


def _shard_dim(out: Any) -> int:
    return next(p.dim for p in out.placements if hasattr(p, "dim"))


def _is_dtensor(value: Any) -> bool:
    return type(value).__name__ == "DTensor"


def sp_step(rank: int, world: int, name: str, n: int, options: dict) -> dict:
    """One training step of zoo entry `name` at length `n` under `seqweave.backend(**options)`
    with `Mesh(sp=world)` (or the mesh in `options`); the worst relative error per item and the
    attention ops that ran. An output that comes back sharded (outputs="sharded") is checked
    through `seqweave.unshard`, and the loss on it is a weighted sum with weights sharded by
    `seqweave.shard` (what a user does with sharded outputs)."""
    import seqweave

    entry = ZOO[name]
    torch.manual_seed(0)
    model, inputs = entry.build(n)
    reference, ref_inputs = copy.deepcopy(model), _fresh_inputs(inputs)
    options = {"mesh": seqweave.Mesh(sp=world), "timeout": 60, **options}
    backend = seqweave.backend(**options)
    out = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)(*inputs)
    expected = reference(*ref_inputs)
    balance = options.get("balance", "zigzag")
    if _is_dtensor(out):
        weights = _weights(expected.shape)
        loss = (out * seqweave.shard(weights, _shard_dim(out), balance)).sum().full_tensor()
        ref_loss = (expected * weights).sum()
        out = seqweave.unshard(out, balance)
    else:
        loss = out if entry.loss is None else entry.loss(out, inputs)
        ref_loss = expected if entry.loss is None else entry.loss(expected, ref_inputs)
    loss.backward()
    ref_loss.backward()
    ops = sorted({node.op for compiled_graph in backend.graphs for node in compiled_graph.graph.nodes
                  if node.op.startswith("attn.")})
    return {"errors": _errors(model, reference, out, expected, inputs, ref_inputs, loss, ref_loss),
            "ops": ops, "masks": [report.mask for report in backend.reports if report.found],
            "warnings": [w for c in backend.graphs for r in c.passes for w in r.result.warnings],
            "runners": [(c.kind, c.runner, dict(getattr(c.program, "stats", {}))) for c in backend.graphs]}


def sp_steps(rank: int, world: int, cases: list[tuple[str, int, dict]]) -> list[dict]:
    """`sp_step` for each (name, n, options), in one process per rank (compiles dominate)."""
    return [sp_step(rank, world, name, n, options) for name, n, options in cases]
