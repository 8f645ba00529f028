"""Per-rank training-step memory predicted as a polynomial in N from captures (nothing runs):
linear for a lifted mask, with an N² term for a dense one, and right at a length it was not fit at."""
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from seqweave.memory_prediction import N, predict_memory, step_bytes
from seqweave.testing.models import SampleSpec, build_sample

SPEC = SampleSpec("llama-tiny", seq_len=128, batch=1, layers=1)


def test_lifted_masks_give_a_linear_prediction_that_holds_at_another_length():
    build = lambda n: build_sample(replace(SPEC, seq_len=n))  # noqa: E731
    prediction = predict_memory(build, 128, world=2)
    assert prediction.quadratic_bytes() == 0, prediction.total
    assert prediction.total.coeff(N) > 0
    assert prediction.at(96) == sum(step_bytes(*build(96), 2))  # a length the fit never saw


class TokenEqualityMask(torch.nn.Module):
    """Layers of attention among equal tokens: a data mask no MaskSpec expresses (so it stays
    dense), built once and shared by every layer, as HF shares its mask."""

    def __init__(self, layers: int) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(16, 8)
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(8, 24) for _ in range(layers))

    def forward(self, ids):
        x = self.embed(ids).unsqueeze(1)
        same = ids[:, None, :, None] == ids[:, None, None, :]
        for qkv in self.qkv:
            q, k, v = qkv(x).chunk(3, dim=-1)
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=same)
        return x.sum()


@pytest.mark.parametrize("layers", [1, 3])
def test_a_dense_mask_is_an_n_squared_term_counted_once(layers):
    def build(n):
        torch.manual_seed(0)
        return TokenEqualityMask(layers), (torch.randint(0, 16, (1, n)),)
    prediction = predict_memory(build, 64, world=1)
    assert prediction.quadratic_bytes() == 1, prediction.total  # one bool [1, 1, N, N] mask, whatever the layers
