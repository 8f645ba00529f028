"""Fitting structured MaskSpecs to evaluated mask patterns, and the helpers lifting relies on."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from seqweave.frontend.mask_lift import fit_structured, segment_ids_from_positions
from seqweave.ir.mask import Causal, Chunked, Full, Sinks, SlidingWindow, dense_mask


def _pattern(spec, size):
    return dense_mask(spec, size, size)[0, 0]


@given(size=st.integers(2, 40), data=st.data())
def test_fit_recovers_every_structured_kind(size, data):
    window = data.draw(st.integers(0, size - 1))
    chunk = data.draw(st.integers(1, size))
    sinks = data.draw(st.integers(1, size))
    specs = [Full(), Causal(), Causal() & SlidingWindow(window, 0), Chunked(chunk), Causal() & Chunked(chunk),
             SlidingWindow(window, data.draw(st.integers(1, size))),
             Causal() & (Sinks(sinks) | SlidingWindow(window, 0))]
    for spec in specs:
        fitted = fit_structured(_pattern(spec, size))
        assert fitted is not None, spec
        # The fit may choose a simpler equal spec (a window as wide as the sequence is just causal).
        assert torch.equal(_pattern(fitted, size), _pattern(spec, size)), (spec, fitted)


def test_fit_prefers_the_plain_name():
    assert fit_structured(_pattern(Causal() & SlidingWindow(99, 0), 16)) == Causal()
    assert fit_structured(_pattern(Causal() & SlidingWindow(3, 0), 16)) == Causal() & SlidingWindow(3, 0)


def test_irregular_pattern_has_no_fit():
    pattern = _pattern(Causal(), 12).clone()
    pattern[7, 2] = False
    assert fit_structured(pattern) is None


def test_rectangular_pattern_fits_only_full():
    assert fit_structured(torch.ones(4, 9, dtype=torch.bool)) == Full()
    assert fit_structured(torch.tril(torch.ones(4, 9, dtype=torch.bool))) is None


@pytest.mark.parametrize("positions, segments", [
    ([0, 1, 2, 0, 1, 0], [1, 1, 1, 2, 2, 3]),
    ([0, 1, 2, 3], [1, 1, 1, 1]),
    ([5, 6, 0, 1], [1, 1, 2, 2]),      # a row may start mid-document
])
def test_segment_ids_from_positions(positions, segments):
    result = segment_ids_from_positions(torch.tensor([positions]))
    assert result.tolist() == [segments]
