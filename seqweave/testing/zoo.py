"""A zoo of small programs written the way users write models, for the differential check.

Each `Program` builds a fresh module and its inputs; `seqweave.testing.differential` runs it
through seqweave and through `aot_eager` and compares everything observable. The zoo leans
on what a compiler most easily gets wrong without any error: in-place writes to buffers and
inputs, outputs that are views of inputs, train/eval-dependent modules, attention in the
forms the frontend rewrites, and the HF sample models in training and serving.
Every program is tiny (sequence <= 16, hidden <= 64) so the whole zoo runs in CPU seconds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from seqweave.testing.models import SampleSpec, build_sample

#: (module, positional inputs, keyword inputs)
Case = tuple[nn.Module, tuple, dict]

MODES = ("train", "eval", "no_grad")
#: How the compiled module's result is used after the call:
#:   "forward"        nothing (no backward);
#:   "backward"       sum(out_i * random_i) over every differentiable output, then backward;
#:   "dout"           `out.backward(dout)` on the single tensor output, dout random;
#:   "loss"           `out.loss.backward()` (HF models computing their loss inside);
#:   "cross_entropy"  `F.cross_entropy(out.logits, input_ids)` outside the compiled graph, then backward.
CALLS = ("forward", "backward", "dout", "loss", "cross_entropy")
D = 16      # feature width of the small modules
S = 8       # sequence length of the small modules
HF_SEQ = 16


@dataclass(frozen=True)
class Program:
    """One zoo entry. `mode`: "train" (module.train(), grad on), "eval" (module.eval(), grad on)
    or "no_grad" (module.eval() under torch.no_grad(), forward only)."""

    name: str
    build: Callable[[], Case]
    mode: str = "train"
    call: str = "backward"

    def __post_init__(self) -> None:
        if self.mode not in MODES or self.call not in CALLS:
            raise ValueError(f"{self.name}: mode {self.mode!r} / call {self.call!r} not in {MODES} / {CALLS}")


def _seeded(build: Callable[[], Case]) -> Callable[[], Case]:
    """Build under a fixed seed, so every build of a program has the same weights and inputs."""
    def seeded() -> Case:
        torch.manual_seed(0)
        return build()
    seeded.__name__ = build.__name__
    return seeded


def _x(*shape: int, grad: bool = False) -> torch.Tensor:
    return torch.randn(*shape).requires_grad_(grad)


# --- buffers written in place ----------------------------------------------------------------


class IndexCopyBuffer(nn.Module):
    """A memory whose rows are overwritten at given indices (`index_copy_`), then read back."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(D, D)
        self.register_buffer("memory", torch.zeros(6, D))

    def forward(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        self.memory.index_copy_(0, rows, h.detach())
        return h + self.memory.mean(0)


class IndexPutBuffer(nn.Module):
    """Accumulate per-class feature sums with `index_put_(accumulate=True)`."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(D, D)
        self.register_buffer("sums", torch.zeros(4, D))

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        self.sums.index_put_((labels,), h.detach(), accumulate=True)
        return h * self.sums[labels].tanh()


class SetitemBuffer(nn.Module):
    """`self.slots[i] = x`: Python item assignment into a buffer at an index (a 1-element
    tensor or an int; a 0-dim tensor index would be read with .item(), a graph break)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(D, D)
        self.register_buffer("slots", torch.zeros(5, D))

    def forward(self, x: torch.Tensor, slot: torch.Tensor | int) -> torch.Tensor:
        h = self.proj(x)
        self.slots[slot] = h.detach().mean(0)
        return h - self.slots.sum(0)


class CounterBuffer(nn.Module):
    """A float step counter bumped with `add_(1)` and read after the bump."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(D, D)
        self.register_buffer("count", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.count.add_(1)
        return self.proj(x) * self.count


class IntCounterBuffer(nn.Module):
    """An integer counter bumped with `+=` (as BatchNorm's num_batches_tracked is)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(D, D)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.steps += 1
        return self.proj(x) / self.steps


class CopyBuffer(nn.Module):
    """Remember the last input with `copy_` and subtract the previous one."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(D, D)
        self.register_buffer("last", torch.ones(4, D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = x - self.last
        self.last.copy_(x)
        return self.proj(delta)


class DecayBuffer(nn.Module):
    """A scale halved every call with `mul_`."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(D, D)
        self.register_buffer("scale", torch.full((D,), 2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.scale.mul_(0.5)
        return self.proj(x) * self.scale


class RingCache(nn.Module):
    """A key/value ring buffer written at `pos % capacity`, then attended over in full."""

    def __init__(self, capacity: int = 8) -> None:
        super().__init__()
        self.capacity = capacity
        self.qkv = nn.Linear(D, 3 * D)
        self.register_buffer("keys", torch.zeros(2, capacity, D))
        self.register_buffer("values", torch.zeros(2, capacity, D))

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)               # x: [B, 1, D]
        slot = pos % self.capacity
        self.keys.index_copy_(1, slot, k.detach())
        self.values[:, slot] = v.detach()
        scores = q @ self.keys.transpose(1, 2) / math.sqrt(D)
        return scores.softmax(-1) @ self.values + q


class RunningMean(nn.Module):
    """An EMA of the input mean, updated under `torch.no_grad()` inside forward."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(D, D)
        self.register_buffer("mean", torch.zeros(D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                self.mean.mul_(0.9).add_(0.1 * x.mean(0))
        return self.proj(x - self.mean)


# --- in-place ops on inputs, views returned --------------------------------------------------


class InputAdd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.add_(1)
        return self.proj(x)


class InputRelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.relu_())


class InputSetitem(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x[:, 0] = 0
        return self.proj(x)


class InputScaledReturned(nn.Module):
    """Scale the input in place and return the input itself beside a projection."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x.mul_(2)
        return x, self.proj(x)


class ReturnView(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.view(-1), self.proj(x)


class ReturnTranspose(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.transpose(0, 1), self.proj(x).transpose(0, 1)


class ReturnSlice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x[1:], self.proj(x)[1:]


class ReturnInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, self.proj(x)


class ReturnTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.proj(x).relu()
        return y, y


class ViewOnlyFunction(nn.Module):
    """No parameters at all: the whole graph is a view of the input that needs grad."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(-1)


# --- ordinary layers -------------------------------------------------------------------------


def _norm_net(norm: nn.Module, width: int = D) -> nn.Module:
    return nn.Sequential(nn.Linear(width, width), _with_stats(norm), nn.ReLU(), nn.Linear(width, width))


def _with_stats(module: nn.Module) -> nn.Module:
    """Give every BatchNorm inside non-trivial running statistics (fresh ones make eval the identity)."""
    for norm in module.modules():
        if isinstance(norm, nn.modules.batchnorm._BatchNorm):
            norm.running_mean.normal_()
            norm.running_var.uniform_(0.5, 2.0)
    return module


class TinyConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(8 * 4 * 4, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images).flatten(1))


class Embedder(nn.Module):
    """Token embedding + position embedding + LayerNorm + projection (integer inputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens, self.positions = nn.Embedding(50, D), nn.Embedding(S, D)
        self.norm, self.out = nn.LayerNorm(D), nn.Linear(D, 50)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        return self.out(self.norm(self.tokens(ids) + self.positions(positions)))


class ChannelBN(nn.Module):
    """A learnable per-channel scale, BatchNorm2d and ReLU on images (no convolution, so a
    convolution problem cannot hide a batch-norm one)."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(1, channels, 1, 1))
        self.norm = _with_stats(nn.BatchNorm2d(channels))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.norm(images * self.scale).relu()


class MHABlock(nn.Module):
    """nn.MultiheadAttention (batch_first) self-attention with a causal mask, plus residual."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(D, 4, batch_first=True)
        self.register_buffer("causal", torch.triu(torch.ones(S, S, dtype=torch.bool), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.attn(x, x, x, attn_mask=self.causal)
        return x + out


class SdpaCausal(nn.Module):
    """Hand-written multi-head attention through F.scaled_dot_product_attention(is_causal=True)."""

    def __init__(self, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.out = nn.Linear(D, 3 * D), nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = (t.view(b, s, self.heads, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        return self.out(self.attend(q, k, v).transpose(1, 2).reshape(b, s, D))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class EagerCausal(SdpaCausal):
    """The same block with attention written out: softmax(q @ kᵀ * scale + causal additive mask) @ v."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        s = q.shape[2]
        mask = torch.full((s, s), float("-inf"), device=q.device).triu(1)
        scores = q @ k.transpose(-2, -1) * (q.shape[-1] ** -0.5) + mask
        return scores.softmax(dim=-1) @ v


# --- builders --------------------------------------------------------------------------------


def _tokens(batch: int = 2, seq: int = S, vocab: int = 50) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq))


def _hf(name: str, kind: str) -> Callable[[], Case]:
    """An HF sample: "train" (labels, use_cache=False: loss inside), "cache" (plain
    `model(input_ids)`, the default cache on) or "logits" (use_cache=False, loss outside)."""
    def build() -> Case:
        model, inputs = build_sample(SampleSpec(name, seq_len=HF_SEQ, batch=1, layers=1))
        if kind == "train":
            return model, (), inputs
        if kind == "cache":
            return model, (inputs["input_ids"],), {}
        return model, (), {"input_ids": inputs["input_ids"], "use_cache": False}
    build.__name__ = f"{name}_{kind}"
    return build


def _buffer_programs() -> list[Program]:
    rows, labels = torch.tensor([4, 1, 0, 2]), torch.tensor([0, 3, 3, 1])
    return [
        Program("buffer_index_copy", _seeded(lambda: (IndexCopyBuffer(), (_x(4, D), rows), {}))),
        Program("buffer_index_put_accumulate", _seeded(lambda: (IndexPutBuffer(), (_x(4, D), labels), {}))),
        Program("buffer_setitem", _seeded(lambda: (SetitemBuffer(), (_x(4, D), torch.tensor([3])), {}))),
        Program("buffer_setitem_int", _seeded(lambda: (SetitemBuffer(), (_x(4, D), 1), {}))),
        Program("buffer_counter_add", _seeded(lambda: (CounterBuffer(), (_x(4, D),), {}))),
        Program("buffer_int_counter_iadd", _seeded(lambda: (IntCounterBuffer(), (_x(4, D),), {}))),
        Program("buffer_copy", _seeded(lambda: (CopyBuffer(), (_x(4, D),), {}))),
        Program("buffer_mul", _seeded(lambda: (DecayBuffer(), (_x(4, D),), {}))),
        Program("buffer_ring_cache", _seeded(lambda: (RingCache(), (_x(2, 1, D), torch.tensor([11])), {}))),
        Program("buffer_ring_cache_no_grad", _seeded(lambda: (RingCache(), (_x(2, 1, D), torch.tensor([5])), {})),
                mode="no_grad"),
        Program("buffer_running_mean_no_grad_block", _seeded(lambda: (RunningMean(), (_x(4, D),), {}))),
    ]


def _input_programs() -> list[Program]:
    return [
        Program("input_add_", _seeded(lambda: (InputAdd(), (_x(4, D),), {}))),
        Program("input_relu_", _seeded(lambda: (InputRelu(), (_x(4, D),), {}))),
        Program("input_setitem", _seeded(lambda: (InputSetitem(), (_x(4, D),), {}))),
        Program("input_mul_returned", _seeded(lambda: (InputScaledReturned(), (_x(4, D),), {}))),
        Program("return_view", _seeded(lambda: (ReturnView(), (_x(4, D, grad=True),), {}))),
        Program("return_transpose", _seeded(lambda: (ReturnTranspose(), (_x(4, D, grad=True),), {}))),
        Program("return_slice", _seeded(lambda: (ReturnSlice(), (_x(4, D, grad=True),), {}))),
        Program("return_input", _seeded(lambda: (ReturnInput(), (_x(4, D, grad=True),), {}))),
        Program("return_same_twice", _seeded(lambda: (ReturnTwice(), (_x(4, D),), {}))),
        Program("return_view_only", _seeded(lambda: (ViewOnlyFunction(), (_x(4, D, grad=True),), {}))),
        Program("return_view_no_grad", _seeded(lambda: (ReturnView(), (_x(4, D),), {})), mode="no_grad"),
    ]


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(D, 64), nn.GELU(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, D))


def _encoder() -> nn.Module:
    return nn.TransformerEncoderLayer(D, 4, dim_feedforward=32, dropout=0.0, batch_first=True)


def _layer_programs() -> list[Program]:
    return [
        Program("batchnorm1d_train", _seeded(lambda: (_norm_net(nn.BatchNorm1d(D)), (_x(6, D),), {}))),
        Program("batchnorm1d_eval", _seeded(lambda: (_norm_net(nn.BatchNorm1d(D)), (_x(6, D),), {})), mode="eval"),
        Program("batchnorm2d_train", _seeded(lambda: (ChannelBN(), (_x(2, 4, 6, 6),), {}))),
        Program("batchnorm2d_eval_no_grad", _seeded(lambda: (ChannelBN(), (_x(2, 4, 6, 6),), {})), mode="no_grad"),
        Program("layernorm", _seeded(lambda: (_norm_net(nn.LayerNorm(D)), (_x(2, S, D),), {}))),
        Program("groupnorm", _seeded(lambda: (_norm_net(nn.GroupNorm(4, D)), (_x(6, D),), {}))),
        Program("dropout_p0", _seeded(lambda: (_norm_net(nn.Dropout(p=0.0)), (_x(6, D),), {}))),
        Program("embedding", _seeded(lambda: (Embedder(), (_tokens(),), {}))),
        Program("mlp", _seeded(lambda: (_mlp(), (_x(4, D),), {}))),
        Program("mlp_out_backward_dout", _seeded(lambda: (_mlp(), (_x(4, D),), {})), call="dout"),
        Program("tiny_convnet", _seeded(lambda: (TinyConvNet(), (_x(2, 3, 8, 8),), {}))),
        Program("tiny_convnet_input_grad", _seeded(lambda: (TinyConvNet(), (_x(2, 3, 8, 8, grad=True),), {}))),
        Program("multihead_attention", _seeded(lambda: (MHABlock(), (_x(2, S, D),), {}))),
        Program("transformer_encoder_layer", _seeded(lambda: (_encoder(), (_x(2, S, D),), {}))),
        Program("transformer_encoder_layer_no_grad", _seeded(lambda: (_encoder(), (_x(2, S, D),), {})),
                mode="no_grad"),
        Program("sdpa_causal", _seeded(lambda: (SdpaCausal(), (_x(2, S, D),), {}))),
        Program("sdpa_causal_backward_dout", _seeded(lambda: (SdpaCausal(), (_x(2, S, D),), {})), call="dout"),
        Program("eager_causal_softmax", _seeded(lambda: (EagerCausal(), (_x(2, S, D),), {}))),
        Program("eager_causal_softmax_no_grad", _seeded(lambda: (EagerCausal(), (_x(2, S, D),), {})),
                mode="no_grad"),
    ]


def _hf_programs() -> list[Program]:
    programs = []
    for name in ("llama-tiny", "qwen2-tiny", "mistral-tiny", "gpt2-tiny"):
        short = name.removesuffix("-tiny")
        programs += [Program(f"hf_{short}_train_loss", _hf(name, "train"), call="loss"),
                     Program(f"hf_{short}_eval_cache", _hf(name, "cache"), mode="no_grad", call="forward"),
                     Program(f"hf_{short}_logits_ce", _hf(name, "logits"), call="cross_entropy")]
    return programs


def zoo() -> tuple[Program, ...]:
    """Every program, in a fixed order (names are unique)."""
    return tuple(_buffer_programs() + _input_programs() + _layer_programs() + _hf_programs())


def by_name(name: str) -> Program:
    """The zoo program called `name` (KeyError naming the valid ones otherwise)."""
    programs = {program.name: program for program in zoo()}
    if name not in programs:
        raise KeyError(f"no zoo program {name!r}; programs: {sorted(programs)}")
    return programs[name]


def build(program: Program) -> Case:
    """A fresh (module in the program's mode, args, kwargs)."""
    module, args, kwargs = program.build()
    module.train(program.mode == "train")
    return module, args, kwargs
