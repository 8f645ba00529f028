"""Attention masks and score modifiers as data.

A :class:`MaskSpec` is a predicate over *global* indices ``(b, h, q, kv)``:
True means query ``q`` may attend to key ``kv``. Masks are small frozen values
rather than dense tensors or opaque callables so that compiler passes can
print, parse, compare, hash and re-shard them, and so kernels can skip whole
tiles: :meth:`MaskSpec.block_class` classifies a rectangle of positions as
EMPTY, FULL or PARTIAL without materialising it.

Data-dependent masks (document ids, padding, dense fallbacks) refer to runtime
tensors by their position in an ``operands`` list, written ``$N`` in text.

:meth:`MaskSpec.to_triton` writes the same predicate as a Triton expression for generated
kernels. Its names follow one contract with the kernel template: ``q`` / ``kv`` are the
global-position expressions passed in (shapes [BLOCK_M, 1] and [1, BLOCK_N]), ``q_ok`` /
``kv_ok`` say which of them lie inside the sequences, ``off_b`` / ``off_h`` are the batch and
query-head indices, and operand ``$N`` is the pointer ``opN`` with element strides
``stride_opN_b``, ``stride_opN_h``, ``stride_opN_q``, ``stride_opN_k`` (2-D ``[B, S]`` operands
use ``_b`` and ``_k`` for their sequence dim).
"""

from __future__ import annotations

import enum
import functools
import operator
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, fields, replace
from types import MappingProxyType
from typing import Callable, ClassVar, Mapping, Sequence

import torch
from torch import Tensor

Range = tuple[int, int]  # half-open [start, stop) of global positions
Operands = Sequence[Tensor]  # runtime tensors, referenced in text as $0, $1, ...
Combiner = Callable[[Tensor, Tensor], Tensor]
MASK_NDIM = 4  # evaluate() results are [B, H, Q, K] (B, H may be 1)
MIN_PARTS = 2  # And / Or need at least two parts
ARG_INT, ARG_FLOAT, ARG_OPERAND = "int", "float", "operand"
OPERAND_SIGIL = "$"
OPERAND_HINT = "pass the index N of the tensor in the operands list (written $N)"
_END, _PUNCT, _IDENT = "end", "punct", "ident"
_TOKEN_RE = re.compile(
    r"(?P<float>[-+]?(?:\d+\.\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?\d+[eE][-+]?\d+)"
    r"|(?P<int>[-+]?\d+)|(?P<operand>\$\d+)|(?P<ident>[A-Za-z_]\w*)|(?P<punct>[(),&|])")
_ARG_DESCRIPTIONS = MappingProxyType(
    {ARG_INT: "an integer", ARG_FLOAT: "a number", ARG_OPERAND: "an operand like $0"})


class BlockClass(enum.Enum):
    """What a mask looks like over one rectangular block of (q, kv) positions."""

    EMPTY = "empty"  # False everywhere: the block can be skipped
    FULL = "full"  # True everywhere: no per-element masking needed
    PARTIAL = "partial"  # mixed, or not known without looking at data


# ----------------------------------------------------------------- helpers


def _require_int(owner: str, name: str, value: object, minimum: int, hint: str) -> None:
    """Raise a ValueError saying what was wrong with an integer argument."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}: {name} must be an int >= {minimum}, got {value!r}; {hint}")


def _check_index(name: str, idx: object) -> None:
    """Index vectors must be 1-D integer tensors of global positions."""
    if not isinstance(idx, Tensor) or idx.dim() != 1:
        raise ValueError(f"{name} must be a 1-D tensor of global positions, got {idx!r}")
    if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
        raise ValueError(f"{name} must have an integer dtype (int64), got {idx.dtype}")


def _check_range(name: str, rng: Sequence[int]) -> Range:
    """Validate a half-open (start, stop) range and return it as ints."""
    start, stop = (operator.index(v) for v in rng)
    if start > stop:
        raise ValueError(f"{name} must be a half-open (start, stop) with start <= stop, got {rng!r}")
    return start, stop


def _from_bounds(all_true: bool, all_false: bool) -> BlockClass:
    """Turn two exact interval facts into a BlockClass."""
    if all_false:
        return BlockClass.EMPTY
    return BlockClass.FULL if all_true else BlockClass.PARTIAL


def _from_values(values: Tensor) -> BlockClass:
    """Classify a bool tensor holding every value the block takes."""
    if bool(values.all()):
        return BlockClass.FULL
    return BlockClass.PARTIAL if bool(values.any()) else BlockClass.EMPTY


def _truthy(t: Tensor) -> Tensor:
    """Bool version of a bool/int operand (nonzero means True)."""
    return t if t.dtype == torch.bool else t != 0


def _narrow(t: Tensor, dim: int, rng: Range, owner: str, broadcast: bool = False) -> Tensor:
    """Slice ``t`` to ``rng`` along ``dim``; size-1 dims pass through if ``broadcast``."""
    size = t.shape[dim]
    if broadcast and size == 1:
        return t
    if rng[0] < 0 or rng[1] > size:
        raise ValueError(f"{owner}: block range {rng} is outside the operand's dim {dim} (size {size})")
    return t.narrow(dim, rng[0], rng[1] - rng[0])


def _format_arg(kind: str, value: object) -> str:
    """Text form of one constructor argument."""
    if kind == ARG_OPERAND:
        return f"{OPERAND_SIGIL}{value}"
    return repr(value) if kind == ARG_FLOAT else str(value)


class _TextForm:
    """Mixin: ``kind(arg, ...)`` text form and int-argument validation, driven by class vars."""

    KIND: ClassVar[str] = ""
    ARG_KINDS: ClassVar[tuple[str, ...]] = ()  # one ARG_* per dataclass field
    MINIMUM: ClassVar[int] = 0  # smallest valid value of ARG_INT fields
    HINT: ClassVar[str] = ""  # what to pass instead, for error messages

    def __post_init__(self) -> None:
        for field, kind in zip(fields(self), self.ARG_KINDS):  # type: ignore[arg-type]
            if kind in (ARG_INT, ARG_OPERAND):
                minimum = self.MINIMUM if kind == ARG_INT else 0
                _require_int(type(self).__name__, field.name, getattr(self, field.name), minimum, self.HINT)

    def __str__(self) -> str:
        values = [getattr(self, f.name) for f in fields(self)]  # type: ignore[arg-type]
        args = ", ".join(_format_arg(k, v) for k, v in zip(self.ARG_KINDS, values))
        return f"{self.KIND}({args})" if values else self.KIND

    @classmethod
    def signature(cls) -> str:
        """Human-readable call shape, e.g. ``sliding_window(left, right)``."""
        names = [OPERAND_SIGIL + "N" if k == ARG_OPERAND else f.name
                 for k, f in zip(cls.ARG_KINDS, fields(cls))]  # type: ignore[arg-type]
        return f"{cls.KIND}({', '.join(names)})" if names else cls.KIND


# ------------------------------------------------------------------- masks


class MaskSpec(_TextForm, ABC):
    """Abstract mask: a predicate over global (b, h, q, kv) indices."""

    def evaluate(self, q_idx: Tensor, kv_idx: Tensor, operands: Operands = ()) -> Tensor:
        """Bool mask at the given (arbitrary, possibly permuted) global positions.

        Returns 4 dims broadcastable to [B, H, len(q_idx), len(kv_idx)]; the last two
        dims are exact. The result may be an expanded view (clone before writing in
        place). Index vectors should live on the operands' device.
        """
        _check_index("q_idx", q_idx)
        _check_index("kv_idx", kv_idx)
        return self._evaluate(q_idx, kv_idx, operands)

    def block_class(self, q_range: Range, kv_range: Range, operands: Operands | None = None) -> BlockClass:
        """Classify the block q_range x kv_range (half-open, global positions).

        Never contradicts :meth:`evaluate`. Exact for structured kinds, and for
        data-dependent kinds when ``operands`` is given; PARTIAL when unknown.
        """
        q, kv = _check_range("q_range", q_range), _check_range("kv_range", kv_range)
        if q[0] == q[1] or kv[0] == kv[1]:
            return BlockClass.EMPTY
        return self._classify(q, kv, operands)

    def operand_indices(self) -> frozenset[int]:
        """Indices N of the ``$N`` operands this mask reads."""
        return frozenset()

    def is_data_dependent(self) -> bool:
        """True when the mask needs runtime tensors to evaluate."""
        return bool(self.operand_indices())

    def remap_operands(self, mapping: Mapping[int, int]) -> MaskSpec:
        """Renumber operands ``$old`` -> ``$mapping[old]``; indices not in mapping stay."""
        return self

    def __and__(self, other: object) -> MaskSpec:
        return And((self, other)) if isinstance(other, MaskSpec) else NotImplemented

    def __or__(self, other: object) -> MaskSpec:
        return Or((self, other)) if isinstance(other, MaskSpec) else NotImplemented

    @abstractmethod
    def to_triton(self, q: str, kv: str) -> str:
        """This predicate as a Triton expression over the position expressions ``q`` and ``kv``.

        Names besides ``q`` / ``kv`` follow the contract in the module docstring.
        """

    @abstractmethod
    def _evaluate(self, q_idx: Tensor, kv_idx: Tensor, operands: Operands) -> Tensor:
        """evaluate() after argument validation."""

    @abstractmethod
    def _classify(self, q: Range, kv: Range, operands: Operands | None) -> BlockClass:
        """block_class() for a validated, non-empty block."""


class _Structured(MaskSpec):
    """Masks computed from positions alone; subclasses classify blocks by interval arithmetic."""

    def _evaluate(self, q_idx: Tensor, kv_idx: Tensor, operands: Operands) -> Tensor:
        allowed = self._allows(q_idx[:, None], kv_idx[None, :])
        return allowed.expand(len(q_idx), len(kv_idx))[None, None]

    @abstractmethod
    def _allows(self, q: Tensor, kv: Tensor) -> Tensor:
        """Elementwise predicate on broadcast q [Q, 1] and kv [1, K] positions."""


@dataclass(frozen=True)
class Full(_Structured):
    """Every query sees every key."""

    KIND: ClassVar[str] = "full"

    def _allows(self, q: Tensor, kv: Tensor) -> Tensor:
        return torch.ones(1, 1, dtype=torch.bool, device=q.device)

    def to_triton(self, q: str, kv: str) -> str:
        return f"({kv} >= 0)"  # positions are never negative: true, with kv's shape

    def _classify(self, q: Range, kv: Range, operands: Operands | None) -> BlockClass:
        return BlockClass.FULL


@dataclass(frozen=True)
class Causal(_Structured):
    """kv <= q."""

    KIND: ClassVar[str] = "causal"

    def _allows(self, q: Tensor, kv: Tensor) -> Tensor:
        return kv <= q

    def to_triton(self, q: str, kv: str) -> str:
        return f"({kv} <= {q})"

    def _classify(self, q: Range, kv: Range, operands: Operands | None) -> BlockClass:
        return _from_bounds(all_true=kv[1] - 1 <= q[0], all_false=kv[0] > q[1] - 1)


@dataclass(frozen=True)
class SlidingWindow(_Structured):
    """q - left <= kv <= q + right (``left`` earlier tokens visible besides q itself)."""

    left: int
    right: int
    KIND: ClassVar[str] = "sliding_window"
    ARG_KINDS: ClassVar[tuple[str, ...]] = (ARG_INT, ARG_INT)
    HINT: ClassVar[str] = "pass how many earlier (left) / later (right) tokens are visible, e.g. (4095, 0)"

    def _allows(self, q: Tensor, kv: Tensor) -> Tensor:
        return (kv - q >= -self.left) & (kv - q <= self.right)

    def to_triton(self, q: str, kv: str) -> str:
        return f"((({kv}) - ({q}) >= {-self.left}) & (({kv}) - ({q}) <= {self.right}))"

    def _classify(self, q: Range, kv: Range, operands: Operands | None) -> BlockClass:
        lo, hi = kv[0] - (q[1] - 1), (kv[1] - 1) - q[0]  # kv - q takes every value in [lo, hi]
        return _from_bounds(all_true=lo >= -self.left and hi <= self.right,
                            all_false=hi < -self.left or lo > self.right)


@dataclass(frozen=True)
class Sinks(_Structured):
    """kv < n: the first ``n`` keys (attention sinks) are visible to every query."""

    n: int
    KIND: ClassVar[str] = "sinks"
    ARG_KINDS: ClassVar[tuple[str, ...]] = (ARG_INT,)
    HINT: ClassVar[str] = "pass how many leading keys every query sees, e.g. Sinks(4)"

    def _allows(self, q: Tensor, kv: Tensor) -> Tensor:
        return kv < self.n

    def to_triton(self, q: str, kv: str) -> str:
        return f"({kv} < {self.n})"

    def _classify(self, q: Range, kv: Range, operands: Operands | None) -> BlockClass:
        return _from_bounds(all_true=kv[1] - 1 < self.n, all_false=kv[0] >= self.n)


@dataclass(frozen=True)
class QueriesFrom(_Structured):
    """q >= n: only queries from position n on (the pairs StreamingLLM rotates by cache slot)."""

    n: int
    KIND: ClassVar[str] = "queries_from"
    ARG_KINDS: ClassVar[tuple[str, ...]] = (ARG_INT,)
    HINT: ClassVar[str] = "pass the first query position, e.g. QueriesFrom(1028)"

    def _allows(self, q: Tensor, kv: Tensor) -> Tensor:
        return (q >= self.n) & (kv == kv)

    def to_triton(self, q: str, kv: str) -> str:
        return f"(({q}) + 0 * ({kv}) >= {self.n})"

    def _classify(self, q: Range, kv: Range, operands: Operands | None) -> BlockClass:
        return _from_bounds(all_true=q[0] >= self.n, all_false=q[1] - 1 < self.n)


@dataclass(frozen=True)
class QueriesBefore(_Structured):
    """q < n: only queries before position n."""

    n: int
    KIND: ClassVar[str] = "queries_before"
    ARG_KINDS: ClassVar[tuple[str, ...]] = (ARG_INT,)
    HINT: ClassVar[str] = "pass the first query position excluded, e.g. QueriesBefore(1028)"

    def _allows(self, q: Tensor, kv: Tensor) -> Tensor:
        return (q < self.n) & (kv == kv)

    def to_triton(self, q: str, kv: str) -> str:
        return f"(({q}) + 0 * ({kv}) < {self.n})"

    def _classify(self, q: Range, kv: Range, operands: Operands | None) -> BlockClass:
        return _from_bounds(all_true=q[1] - 1 < self.n, all_false=q[0] >= self.n)


@dataclass(frozen=True)
class DistanceAtLeast(_Structured):
    """q - kv >= d: keys at least d tokens before the query (LM-Infinite's clamped distances)."""

    d: int
    KIND: ClassVar[str] = "distance_at_least"
    ARG_KINDS: ClassVar[tuple[str, ...]] = (ARG_INT,)
    HINT: ClassVar[str] = "pass the smallest distance q - kv, e.g. DistanceAtLeast(2049)"

    def _allows(self, q: Tensor, kv: Tensor) -> Tensor:
        return q - kv >= self.d

    def to_triton(self, q: str, kv: str) -> str:
        return f"(({q}) - ({kv}) >= {self.d})"

    def _classify(self, q: Range, kv: Range, operands: Operands | None) -> BlockClass:
        return _from_bounds(all_true=q[0] - (kv[1] - 1) >= self.d, all_false=(q[1] - 1) - kv[0] < self.d)


@dataclass(frozen=True)
class Chunked(_Structured):
    """q // size == kv // size: attention only within fixed-size chunks."""

    size: int
    KIND: ClassVar[str] = "chunked"
    ARG_KINDS: ClassVar[tuple[str, ...]] = (ARG_INT,)
    MINIMUM: ClassVar[int] = 1
    HINT: ClassVar[str] = "pass the chunk length in tokens, e.g. Chunked(128)"

    def _allows(self, q: Tensor, kv: Tensor) -> Tensor:
        chunk = functools.partial(torch.div, other=self.size, rounding_mode="floor")
        return chunk(q) == chunk(kv)

    def to_triton(self, q: str, kv: str) -> str:
        return f"(({q}) // {self.size} == ({kv}) // {self.size})"  # positions >= 0: // is floor

    def _classify(self, q: Range, kv: Range, operands: Operands | None) -> BlockClass:
        q_lo, q_hi = q[0] // self.size, (q[1] - 1) // self.size
        kv_lo, kv_hi = kv[0] // self.size, (kv[1] - 1) // self.size
        return _from_bounds(all_true=q_lo == q_hi == kv_lo == kv_hi, all_false=q_hi < kv_lo or kv_hi < q_lo)


@dataclass(frozen=True)
class _OperandMask(MaskSpec):
    """Shared plumbing for masks that read one runtime tensor ``operands[operand]``."""

    operand: int
    ARG_KINDS: ClassVar[tuple[str, ...]] = (ARG_OPERAND,)
    HINT: ClassVar[str] = OPERAND_HINT
    ROLE: ClassVar[str] = ""  # what the operand must be, for error messages
    NDIMS: ClassVar[tuple[int, ...]] = ()  # accepted operand ranks

    def operand_indices(self) -> frozenset[int]:
        return frozenset({self.operand})

    def remap_operands(self, mapping: Mapping[int, int]) -> MaskSpec:
        return replace(self, operand=mapping.get(self.operand, self.operand))

    def _load(self, index: str, in_bounds: str, other: int) -> str:
        """Triton load of operand element [off_b, index] of a 2-D [B, S] operand."""
        name = f"op{self.operand}"
        return (f"tl.load({name} + off_b * stride_{name}_b + ({index}) * stride_{name}_k, "
                f"mask={in_bounds}, other={other})")

    def _fetch(self, operands: Operands) -> Tensor:
        """operands[self.operand], checked for presence and rank."""
        if self.operand >= len(operands):
            raise ValueError(f"{self} needs operands[{self.operand}] but {len(operands)} operand(s) "
                             f"were passed; pass the {self.ROLE} at that position")
        tensor = operands[self.operand]
        if tensor.dim() not in self.NDIMS:
            raise ValueError(f"{self}: operands[{self.operand}] must be the {self.ROLE}, "
                             f"got shape {tuple(tensor.shape)}")
        return tensor

    def _classify(self, q: Range, kv: Range, operands: Operands | None) -> BlockClass:
        return BlockClass.PARTIAL if operands is None else self._classify_data(q, kv, self._fetch(operands))

    @abstractmethod
    def _classify_data(self, q: Range, kv: Range, tensor: Tensor) -> BlockClass:
        """Exact classification from the block's slice of the operand tensor."""


@dataclass(frozen=True)
class Document(_OperandMask):
    """seg[b, q] == seg[b, kv]: packed sequences attend only within their own document."""

    KIND: ClassVar[str] = "document"
    ROLE: ClassVar[str] = "int segment_ids tensor [B, S]"
    NDIMS: ClassVar[tuple[int, ...]] = (2,)

    def _evaluate(self, q_idx: Tensor, kv_idx: Tensor, operands: Operands) -> Tensor:
        seg = self._fetch(operands)
        q_ids = seg.index_select(1, q_idx.to(seg.device))
        kv_ids = seg.index_select(1, kv_idx.to(seg.device))
        return (q_ids[:, :, None] == kv_ids[:, None, :])[:, None]

    def to_triton(self, q: str, kv: str) -> str:
        # Out-of-range positions load different ids, so they never match.
        return f"({self._load(q, 'q_ok', -1)} == {self._load(kv, 'kv_ok', -2)})"

    def _classify_data(self, q: Range, kv: Range, tensor: Tensor) -> BlockClass:
        q_ids, kv_ids = _narrow(tensor, 1, q, str(self)), _narrow(tensor, 1, kv, str(self))
        both = torch.cat([q_ids, kv_ids], dim=1)
        if bool((both == both[:, :1]).all()):
            return BlockClass.FULL
        overlap = any(bool(torch.isin(q_ids[b], kv_ids[b]).any()) for b in range(tensor.shape[0]))
        return BlockClass.PARTIAL if overlap else BlockClass.EMPTY


@dataclass(frozen=True)
class Padding(_OperandMask):
    """valid[b, kv] != 0: padding keys (HF attention_mask == 0) are hidden; left or right padding."""

    KIND: ClassVar[str] = "padding"
    ROLE: ClassVar[str] = "bool/int valid tensor [B, S_kv]"
    NDIMS: ClassVar[tuple[int, ...]] = (2,)

    def _evaluate(self, q_idx: Tensor, kv_idx: Tensor, operands: Operands) -> Tensor:
        valid = self._fetch(operands)
        keep = _truthy(valid.index_select(1, kv_idx.to(valid.device)))
        return keep[:, None, None, :].expand(-1, 1, len(q_idx), -1)

    def to_triton(self, q: str, kv: str) -> str:
        return f"({self._load(kv, 'kv_ok', 0)} != 0)"

    def _classify_data(self, q: Range, kv: Range, tensor: Tensor) -> BlockClass:
        return _from_values(_truthy(_narrow(tensor, 1, kv, str(self))))


@dataclass(frozen=True)
class Dense(_OperandMask):
    """Fallback: an explicit bool tensor broadcastable to [B, H, Sq, Skv]."""

    KIND: ClassVar[str] = "dense"
    ROLE: ClassVar[str] = "bool tensor broadcastable to [B, H, Sq, Skv]"
    NDIMS: ClassVar[tuple[int, ...]] = tuple(range(MASK_NDIM + 1))

    @staticmethod
    def _as_4d(tensor: Tensor) -> Tensor:
        """The operand as a 4-D bool tensor (missing leading dims become 1)."""
        return _truthy(tensor).reshape((1,) * (MASK_NDIM - tensor.dim()) + tuple(tensor.shape))

    def _evaluate(self, q_idx: Tensor, kv_idx: Tensor, operands: Operands) -> Tensor:
        dense = self._as_4d(self._fetch(operands))
        for dim, idx in ((2, q_idx), (3, kv_idx)):
            if dense.shape[dim] != 1:  # size-1 dims broadcast over every position
                dense = dense.index_select(dim, idx.to(dense.device))
        return dense.expand(-1, -1, len(q_idx), len(kv_idx))

    def to_triton(self, q: str, kv: str) -> str:
        name = f"op{self.operand}"  # a 4-D view; broadcast dims have stride 0
        address = (f"{name} + off_b * stride_{name}_b + off_h * stride_{name}_h"
                   f" + ({q}) * stride_{name}_q + ({kv}) * stride_{name}_k")
        return f"(tl.load({address}, mask=q_ok & kv_ok, other=0) != 0)"

    def _classify_data(self, q: Range, kv: Range, tensor: Tensor) -> BlockClass:
        dense = _narrow(self._as_4d(tensor), 2, q, str(self), broadcast=True)
        return _from_values(_narrow(dense, 3, kv, str(self), broadcast=True))


@dataclass(frozen=True)
class _Combine(MaskSpec):
    """Shared plumbing for And / Or: a flat tuple of at least two parts."""

    parts: tuple[MaskSpec, ...]
    JOIN: ClassVar[str] = ""
    COMBINE: ClassVar[Combiner] = operator.and_

    def __post_init__(self) -> None:
        name = type(self).__name__
        bad = [p for p in self.parts if not isinstance(p, MaskSpec)]
        if bad:
            raise ValueError(f"{name} parts must be MaskSpecs, got {bad!r}; build masks with a {self.JOIN} b")
        flat = tuple(x for p in self.parts for x in (p.parts if type(p) is type(self) else (p,)))
        if len(flat) < MIN_PARTS:
            raise ValueError(f"{name} needs at least {MIN_PARTS} parts, got {len(flat)}; use the mask itself")
        object.__setattr__(self, "parts", flat)  # flattened, so str/parse round-trips

    def operand_indices(self) -> frozenset[int]:
        return frozenset().union(*(p.operand_indices() for p in self.parts))

    def remap_operands(self, mapping: Mapping[int, int]) -> MaskSpec:
        return type(self)(tuple(p.remap_operands(mapping) for p in self.parts))

    def _evaluate(self, q_idx: Tensor, kv_idx: Tensor, operands: Operands) -> Tensor:
        return functools.reduce(self.COMBINE, (p._evaluate(q_idx, kv_idx, operands) for p in self.parts))

    def _part_classes(self, q: Range, kv: Range, operands: Operands | None) -> set[BlockClass]:
        return {p._classify(q, kv, operands) for p in self.parts}


@dataclass(frozen=True)
class And(_Combine):
    """Every part allows the pair. Text ``a & b``; ``&`` binds tighter than ``|``."""

    JOIN: ClassVar[str] = "&"
    COMBINE: ClassVar[Combiner] = operator.and_

    def __str__(self) -> str:
        return " & ".join(f"({p})" if isinstance(p, Or) else str(p) for p in self.parts)

    def to_triton(self, q: str, kv: str) -> str:
        return "(" + " & ".join(p.to_triton(q, kv) for p in self.parts) + ")"

    def _classify(self, q: Range, kv: Range, operands: Operands | None) -> BlockClass:
        classes = self._part_classes(q, kv, operands)
        if BlockClass.EMPTY in classes:
            return BlockClass.EMPTY
        return BlockClass.FULL if classes == {BlockClass.FULL} else BlockClass.PARTIAL


@dataclass(frozen=True)
class Or(_Combine):
    """Some part allows the pair. Text ``a | b``."""

    JOIN: ClassVar[str] = "|"
    COMBINE: ClassVar[Combiner] = operator.or_

    def __str__(self) -> str:
        return " | ".join(str(p) for p in self.parts)

    def to_triton(self, q: str, kv: str) -> str:
        return "(" + " | ".join(p.to_triton(q, kv) for p in self.parts) + ")"

    def _classify(self, q: Range, kv: Range, operands: Operands | None) -> BlockClass:
        classes = self._part_classes(q, kv, operands)
        if BlockClass.FULL in classes:
            return BlockClass.FULL
        return BlockClass.EMPTY if classes == {BlockClass.EMPTY} else BlockClass.PARTIAL


def dense_mask(spec: MaskSpec, q_len: int, kv_len: int, operands: Operands = (),
               q_offset: int = 0, kv_offset: int = 0) -> Tensor:
    """Evaluate ``spec`` on contiguous positions (reference / test convenience)."""
    device = operands[0].device if operands else None
    q_idx = torch.arange(q_offset, q_offset + q_len, device=device)
    kv_idx = torch.arange(kv_offset, kv_offset + kv_len, device=device)
    return spec.evaluate(q_idx, kv_idx, operands)
