"""`MaskSpec.to_triton` says the same as `MaskSpec.evaluate`.

The emitted Triton expression is run here with a tiny stand-in for `triton.language` over
torch tensors (pointer arithmetic and masked loads), for structured masks drawn by hypothesis
and for the data-dependent kinds, at offset global positions.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
from hypothesis import given
from hypothesis import strategies as st

from seqweave.ir.mask import MaskSpec, dense_mask
from seqweave.ir.mask_parser import parse_mask
from seqweave.testing.strategies import structured_masks

B, H, LENGTH = 2, 3, 40


@dataclass(frozen=True)
class Pointer:
    """A flat tensor and an element offset (int or tensor), as Triton pointers behave."""

    data: torch.Tensor
    offset: object = 0

    def __add__(self, other: object) -> "Pointer":
        return Pointer(self.data, self.offset + other)


def load(pointer: Pointer, mask: torch.Tensor, other: int) -> torch.Tensor:
    offset = torch.as_tensor(pointer.offset)
    safe = offset.clamp(0, pointer.data.numel() - 1)
    return torch.where(mask, pointer.data[safe], torch.tensor(other, dtype=pointer.data.dtype))


def operand_names(operands: list[torch.Tensor]) -> dict[str, object]:
    """`opN` pointers and their (b, h, q, k) strides, the way the kernel launcher passes them."""
    names: dict[str, object] = {}
    for index, tensor in enumerate(operands):
        if tensor.dim() == 2:
            strides = (tensor.stride(0), 0, 0, tensor.stride(1))
        else:
            strides = tuple(0 if tensor.shape[d] == 1 else tensor.stride(d) for d in range(4))
        names[f"op{index}"] = Pointer(tensor.contiguous().flatten().to(torch.int64))
        names.update({f"stride_op{index}_{dim}": s for dim, s in zip("bhqk", strides)})
    return names


def emitted(mask: MaskSpec, q_offset: int, q_len: int, kv_offset: int, kv_len: int,
            operands: list[torch.Tensor]) -> torch.Tensor:
    """[B, H, Q, K] values of the emitted expression, one (b, h) program at a time."""
    q = torch.arange(q_offset, q_offset + q_len)[:, None]
    kv = torch.arange(kv_offset, kv_offset + kv_len)[None, :]
    rows = []
    for b in range(B):
        for h in range(H):
            scope = dict(q=q, kv=kv, q_ok=q < LENGTH, kv_ok=kv < LENGTH, off_b=b, off_h=h,
                         tl=SimpleNamespace(load=load), **operand_names(operands))
            rows.append(torch.broadcast_to(eval(mask.to_triton("q", "kv"), scope), (q_len, kv_len)))
    return torch.stack(rows).view(B, H, q_len, kv_len)


def expected(mask: MaskSpec, q_offset: int, q_len: int, kv_offset: int, kv_len: int,
             operands: list[torch.Tensor]) -> torch.Tensor:
    return dense_mask(mask, q_len, kv_len, operands, q_offset, kv_offset).expand(B, H, q_len, kv_len)


offsets = st.tuples(st.integers(0, 20), st.integers(1, 20), st.integers(0, 20), st.integers(1, 20))


@given(st.one_of(structured_masks(), st.just("sinks(3) | sliding_window(2, 5)")), offsets)
def test_structured_predicates_match_evaluate(text: str, window: tuple[int, int, int, int]):
    mask = parse_mask(text)
    assert torch.equal(emitted(mask, *window, []), expected(mask, *window, []))


def data_operands(seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    segments = torch.sort(torch.randint(0, 5, (B, LENGTH), generator=generator), 1).values
    valid = torch.rand(B, LENGTH, generator=generator) < 0.7
    dense = torch.rand(B, H, LENGTH, LENGTH, generator=generator) < 0.4
    return [segments, valid.to(torch.int64), dense]


@given(st.sampled_from(["causal & document($0)", "padding($1)", "dense($2)", "document($0) | dense($2)",
                        "sliding_window(4, 0) & padding($1) & document($0)"]),
       offsets, st.integers(0, 1000))
def test_data_dependent_predicates_match_evaluate(text: str, window: tuple[int, int, int, int], seed: int):
    mask, operands = parse_mask(text), data_operands(seed)
    assert torch.equal(emitted(mask, *window, operands), expected(mask, *window, operands))
