"""Built-in sample models: real `transformers` architectures with tiny configs and random weights.

Nothing is downloaded; every model is built locally from its config class.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

VOCAB = 128
HIDDEN = 64
HEADS = 4


@dataclass(frozen=True)
class SampleSpec:
    """How to build one sample: sizes, attention implementation and what the batch looks like."""

    name: str
    seq_len: int = 64
    batch: int = 2
    layers: int = 2
    hidden: int = HIDDEN
    attn_implementation: str = "sdpa"
    padded: bool = False      # left-pad the first row (attention_mask with leading zeros)
    packed: bool = False      # position ids restart: several documents per row
    kv_heads: int = HEADS // 2  # grouped-query attention; 1 = multi-query
    seed: int = 0


def _llama(spec: SampleSpec) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(LlamaConfig(**_decoder_sizes(spec), num_key_value_heads=spec.kv_heads))


def _qwen2(spec: SampleSpec) -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM
    return Qwen2ForCausalLM(Qwen2Config(**_decoder_sizes(spec), num_key_value_heads=spec.kv_heads))


def _mistral(spec: SampleSpec) -> torch.nn.Module:
    from transformers import MistralConfig, MistralForCausalLM
    window = max(2, spec.seq_len // 4)  # shorter than the sequence, so the window really masks
    return MistralForCausalLM(MistralConfig(**_decoder_sizes(spec), num_key_value_heads=spec.kv_heads,
                                            sliding_window=window))


def _neox(spec: SampleSpec) -> torch.nn.Module:
    """GPT-NeoX: partial rotary (a quarter of each head rotated), fused QKV, parallel residual."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    sizes = _decoder_sizes(spec)
    return GPTNeoXForCausalLM(GPTNeoXConfig(**sizes, rotary_pct=0.25, hidden_dropout=0.0))


def _phi3(spec: SampleSpec) -> torch.nn.Module:
    from transformers import Phi3Config, Phi3ForCausalLM
    return Phi3ForCausalLM(Phi3Config(**_decoder_sizes(spec), num_key_value_heads=spec.kv_heads,
                                      resid_pdrop=0.0, embd_pdrop=0.0))


def _gemma(spec: SampleSpec) -> torch.nn.Module:
    from transformers import GemmaConfig, GemmaForCausalLM
    return GemmaForCausalLM(GemmaConfig(**_decoder_sizes(spec), num_key_value_heads=spec.kv_heads,
                                        head_dim=spec.hidden // HEADS))


def _gpt2(spec: SampleSpec) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=spec.hidden, n_layer=spec.layers, n_head=HEADS,
                                      n_positions=max(spec.seq_len, 64), attn_pdrop=0.0, resid_pdrop=0.0,
                                      embd_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                                      attn_implementation=spec.attn_implementation))


def _decoder_sizes(spec: SampleSpec) -> dict[str, Any]:
    return dict(vocab_size=VOCAB, hidden_size=spec.hidden, intermediate_size=2 * spec.hidden,
                num_hidden_layers=spec.layers, num_attention_heads=HEADS, attention_dropout=0.0,
                max_position_embeddings=max(spec.seq_len, 64), bos_token_id=0, eos_token_id=0, pad_token_id=0,
                attn_implementation=spec.attn_implementation)


BUILDERS: dict[str, Callable[[SampleSpec], torch.nn.Module]] = {
    "llama-tiny": _llama, "qwen2-tiny": _qwen2, "mistral-tiny": _mistral, "gpt2-tiny": _gpt2,
    "neox-tiny": _neox, "phi3-tiny": _phi3, "gemma-tiny": _gemma,
}


def packed_position_ids(batch: int, seq_len: int) -> torch.Tensor:
    """Three documents per row (lengths about 1/2, 1/3, 1/6): positions restart at each."""
    cuts = [0, seq_len // 2, seq_len // 2 + seq_len // 3, seq_len]
    row = torch.cat([torch.arange(end - start) for start, end in zip(cuts, cuts[1:])])
    return row.expand(batch, seq_len).clone()


def sample_inputs(spec: SampleSpec) -> dict[str, torch.Tensor]:
    """input_ids, labels (-100 on padding) and, as asked, attention_mask or position_ids."""
    generator = torch.Generator().manual_seed(spec.seed + 1)
    ids = torch.randint(1, VOCAB, (spec.batch, spec.seq_len), generator=generator)
    inputs: dict[str, Any] = {"input_ids": ids, "labels": ids.clone(), "use_cache": False}
    if spec.padded:
        mask = torch.ones(spec.batch, spec.seq_len, dtype=torch.long)
        mask[0, : spec.seq_len // 4] = 0
        inputs["attention_mask"] = mask
        # HF shifts labels inside the loss: the logit at t predicts label t+1. A padded query has
        # no visible key (its output is undefined), so the label it would predict is ignored too.
        predecessor_valid = torch.cat([torch.ones_like(mask[:, :1]), mask[:, :-1]], dim=1)
        inputs["labels"] = ids.masked_fill((mask == 0) | (predecessor_valid == 0), -100)
    if spec.packed:
        inputs["position_ids"] = packed_position_ids(spec.batch, spec.seq_len)
    return inputs


def build_sample(spec: SampleSpec) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(model in train mode with random weights, keyword inputs)."""
    if spec.name not in BUILDERS:
        raise KeyError(f"unknown sample {spec.name!r}; built-in samples: {sorted(BUILDERS)}")
    torch.manual_seed(spec.seed)
    model = BUILDERS[spec.name](spec)
    # Name the loss explicitly: HF otherwise logs a warning inside forward, a graph break under fullgraph.
    model.loss_type = "ForCausalLM"
    return model.train(), sample_inputs(spec)
