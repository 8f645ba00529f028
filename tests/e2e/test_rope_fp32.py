"""`rope-fp32` in a bf16 model: rotary computed in fp32 and cast back is closer to the fp64
rotary than HF's bf16 path (bf16 tables and products), at positions where bf16 rounding of
cos / sin matters (AnchorAttention's finding). Same bf16 inputs for every path; the
reference is the fp64 computation of those inputs."""
import torch
import torch.nn.functional as F
from torch import nn

import seqweave

HEAD_DIM, SEQ, OFFSET = 64, 256, 100_000


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RotaryAttention(nn.Module):
    """HF's rotary as HF writes it: fp32 angles, tables cast to the activations' dtype."""

    def __init__(self):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM)))

    def forward(self, q, k, v, position_ids):
        freqs = position_ids[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(q.dtype).unsqueeze(1), emb.sin().to(q.dtype).unsqueeze(1)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def test_rope_fp32_is_closer_to_fp64_than_the_bf16_path():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, SEQ, HEAD_DIM).bfloat16() for _ in range(3))
    positions = torch.arange(SEQ)[None] + OFFSET
    module = RotaryAttention()
    reference = module.double()(q.double(), k.double(), v.double(), positions)
    module = module.float()
    with torch.no_grad():
        bf16_path = module(q, k, v, positions)
        fp32_backend = seqweave.backend(pipeline="canonicalize,rope-fp32")
        fp32_rotary = torch.compile(module, backend=fp32_backend, fullgraph=True, dynamic=False)(q, k, v, positions)
    error = lambda x: float((x.double() - reference).abs().mean())  # noqa: E731
    assert fp32_rotary.dtype == torch.bfloat16
    assert error(fp32_rotary) < 0.8 * error(bf16_path)
    (node,) = [n for g in fp32_backend.graphs for n in g.graph.nodes if n.op == "attn.sdpa"]
    positions = str(node.kwargs["positions"])  # a typed PositionSpec, in its text form
    assert "compute=float32" in positions and "table=bfloat16" in positions
