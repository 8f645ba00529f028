"""8-bit storage (Mesa): the packed buffer round-trips every value within its stated bound."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seqweave.ir.ops.quantize8 import CHUNK_ELEMENTS, dequantize, error_bound, packed_nbytes, quantize


@settings(deadline=None, max_examples=60)
@given(shape=st.lists(st.integers(1, 70), min_size=1, max_size=3), group=st.sampled_from([1, 16, 64, 100]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), spread=st.floats(0, 6),
       seed=st.integers(0, 2**16))
def test_round_trip_within_the_stated_bound(shape, group, dtype, spread, seed):
    generator = torch.Generator().manual_seed(seed)
    channels = torch.logspace(-spread / 2, spread / 2, shape[-1]) if dtype != torch.float16 else 1.0
    x = (torch.randn(shape, generator=generator) * channels).to(dtype)
    packed = quantize(x, group)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(tuple(shape), group)
    restored = dequantize(packed, tuple(shape), dtype, group)
    assert restored.dtype == dtype and restored.shape == x.shape
    error = (restored.float() - x.float()).abs()
    assert bool((error <= error_bound(x, group)).all())


def test_the_bound_is_tight_and_zeros_stay_zero():
    x = torch.randn(64, 256)
    x[3] = 0
    restored = dequantize(quantize(x), tuple(x.shape), x.dtype)
    ratio = ((restored - x).abs() / error_bound(x).clamp_min(1e-30)).max()
    assert 0.5 < ratio <= 1.0, "the bound should be about half a step, not loose"
    assert bool((restored[3] == 0).all())


def test_one_outlier_widens_only_its_own_group():
    x = torch.randn(8, 128)
    x[2, 5] = 1e4
    restored = dequantize(quantize(x, 64), tuple(x.shape), x.dtype, 64)
    others = torch.ones_like(x, dtype=torch.bool)
    others[2, :64] = False
    assert float((restored - x).abs()[others].max()) < 0.05


def test_large_values_are_converted_a_chunk_at_a_time():
    """The fp32 temporaries stay near one chunk however large the value (what the plan reserves)."""
    from seqweave.runtime.live_bytes import LiveBytes

    rows = 4 * CHUNK_ELEMENTS // 256
    x = torch.randn(rows, 256)
    with LiveBytes() as live:
        packed = quantize(x)
    temporaries = live.device_peak - packed.numel()
    assert temporaries <= 5 * 4 * CHUNK_ELEMENTS, f"{temporaries} bytes of temporaries for {x.numel()} elements"
    assert math.isclose(packed.numel(), x.numel() * (1 + 4 / 64), rel_tol=1e-3)


@pytest.mark.parametrize("shape", [(0, 4), (3, 0)])
def test_empty_tensors(shape):
    x = torch.zeros(shape)
    assert dequantize(quantize(x), shape, x.dtype).shape == x.shape
