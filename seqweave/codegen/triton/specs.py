"""KernelSpec: everything a generated attention kernel is specialised on, as one frozen value.

Two attention calls share a compiled kernel exactly when their specs are equal; the spec's
hash keys the on-disk module cache. Block sizes and launch knobs are chosen here by named
rules, so a reader can see why a shape got the tiles it got.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from seqweave.ir.mask import MaskSpec
from seqweave.ir.score_mod import NoScoreMod, ScoreMod, Softcap

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INTERPRETER_BLOCK = 16  # small tiles, so CPU tests with tiny shapes still cross tile edges
MIN_DOT_DIM = 16  # tl.dot needs every dim >= 16
MAX_HEAD_DIM = 256  # a q or k/v row tile of a wider head does not fit the registers


@dataclass(frozen=True)
class LaunchKnobs:
    """Tile sizes and the GPU launch parameters that go with them."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class KernelSpec:
    """One attention kernel's specialisation: shapes' constants, dtype, mask, score mod, tiles."""

    head_dim: int
    head_dim_v: int
    dtype: str  # "float16" | "bfloat16" | "float32"
    group: int  # query heads per kv head (GQA ratio)
    mask: str  # MaskSpec text; its predicate is emitted into the kernel
    score_mod: str
    forward: LaunchKnobs
    backward: LaunchKnobs

    def key(self) -> str:
        """Stable hash of the spec (the cache key; also stamped in the generated source)."""
        return hashlib.sha256(repr(self).encode()).hexdigest()[:16]


def next_power_of_two(n: int) -> int:
    """Smallest power of two >= max(n, MIN_DOT_DIM): padded head dims for tl.arange / tl.dot."""
    return max(MIN_DOT_DIM, 1 << (max(n, 1) - 1).bit_length())


def forward_knobs(head_dim: int, dtype: torch.dtype, interpret: bool) -> LaunchKnobs:
    """Forward tiles: 128 query rows per program, 8 warps so the accumulator fits in registers.

    Chosen with `seqweave kernels --compile sm90` (offline ptxas report, no GPU here): these are
    the largest tiles tried that compile for sm_90 without register spills at bf16 / fp16.
    float32 (full-precision dots, no tensor cores) is a correctness path, not a fast one.
    """
    if interpret:
        return LaunchKnobs(INTERPRETER_BLOCK, INTERPRETER_BLOCK, 1, 1)
    if dtype == torch.float32:
        return LaunchKnobs(64, 32, 4, 2)
    if head_dim <= 64:
        return LaunchKnobs(128, 64, 8, 3)
    return LaunchKnobs(128, 64, 8, 2)


def backward_knobs(head_dim: int, dtype: torch.dtype, interpret: bool) -> LaunchKnobs:
    """Backward tiles (dq and dk/dv share one tile schedule), chosen like the forward's:
    no spills at sm_90 for bf16 / fp16; dk/dv hold four [BLOCK_N, D] tiles, hence narrow kv tiles at d=128."""
    if interpret:
        return LaunchKnobs(INTERPRETER_BLOCK, INTERPRETER_BLOCK, 1, 1)
    if dtype == torch.float32:
        return LaunchKnobs(32, 32, 8, 2)
    if head_dim <= 64:
        return LaunchKnobs(64, 64, 4, 2)
    return LaunchKnobs(64, 32, 8, 2)


def kernel_constants(spec: KernelSpec, knobs: LaunchKnobs, count_visits: bool = False) -> dict[str, object]:
    """The constexpr arguments of the attention kernels for `spec` at these tiles."""
    return dict(GROUP=spec.group, HEAD_DIM=spec.head_dim, HEAD_DIM_V=spec.head_dim_v,
                BLOCK_D=next_power_of_two(spec.head_dim), BLOCK_DV=next_power_of_two(spec.head_dim_v),
                BLOCK_M=knobs.block_m, BLOCK_N=knobs.block_n, COUNT_VISITS=count_visits)


def check_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, score_mod: ScoreMod) -> None:
    """Raise a ValueError naming what the generated kernels cannot run, and what to do instead."""
    if q.dtype not in SUPPORTED_DTYPES or not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"Triton attention runs float16, bfloat16 and float32; got q {q.dtype}, "
                         f"k {k.dtype}, v {v.dtype}. Cast the inputs, or use the CPU reference for float64.")
    if not isinstance(score_mod, (NoScoreMod, Softcap)):
        raise ValueError(f"score mod {score_mod} has no Triton form; use none or softcap(cap)")
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        raise ValueError(f"Triton attention supports head dims up to {MAX_HEAD_DIM}; got q {q.shape[-1]}, "
                         f"v {v.shape[-1]}. Use the CPU reference, or split the heads.")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} kv heads")


def make_spec(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: MaskSpec, score_mod: ScoreMod,
              interpret: bool) -> KernelSpec:
    """The spec for attention over these inputs."""
    check_supported(q, k, v, score_mod)
    head_dim = q.shape[-1]
    return KernelSpec(head_dim, v.shape[-1], str(q.dtype).removeprefix("torch."), q.shape[1] // k.shape[1],
                      str(mask), str(score_mod), forward_knobs(head_dim, q.dtype, interpret),
                      backward_knobs(head_dim, q.dtype, interpret))
