"""Lift an attention mask subgraph into a MaskSpec by evaluating it, one block of rows at a time.

The mask HF builds is a function of index arithmetic and at most a few inputs
(`attention_mask` for padding, `position_ids` for packed documents). We cut out the
subgraph that computes it and evaluate it tile by tile (`mask_tiles`), so no N×N tensor is
ever built: with neutral inputs to fit the structured part (causal, sliding window, chunked,
sinks), then with each way of reading the inputs (padding, documents). A spec is accepted
only if it reproduces the subgraph on the example inputs and on random probes: on every
query row when the mask has at most `MAX_WHOLE_ELEMENTS` elements, otherwise on the first
and last rows and a spread of sampled ones. Otherwise we say why and fall back to Dense.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import fx
from torch._dynamo.source import AttrSource, LocalSource

from seqweave.frontend.mask_tiles import (MAX_WHOLE_ELEMENTS, Tiled, ancestors_in_order, leaves_of, project,
                                          tiled_function)
from seqweave.ir.mask import Causal, Chunked, Dense, Document, Full, MaskSpec, Padding, Sinks, SlidingWindow

PROBES_PER_ROLE = 4
#: An additive mask entry at or below this is "masked": exp() of it underflows to 0 even in fp64.
MASKED_ADDITIVE_VALUE = -1e6
#: How a per-token input may be read: `padding` (nonzero = key visible, HF's attention_mask),
#: `key_padding` (True = key hidden, torch's key_padding_mask), `document` (position ids).
ROLES = ("padding", "document", "key_padding")
#: Above MAX_WHOLE_ELEMENTS, rows checked per group (leading, trailing, evenly spread, random).
SAMPLED_ROWS = 64
#: Elements evaluated per block of rows (bounds the memory lifting uses at any length).
BLOCK_ELEMENTS = 1 << 24


@dataclass
class LiftedMask:
    """The lifted spec, the FX values its `$i` operands are computed from, and how it was decided.

    Each operand is (node, role): `padding` (the keys' valid flags), `key_padding` (the keys'
    hidden flags, negated), `document` (position ids, turned into segment ids), or `dense` (the
    mask itself; additive masks compare to 0).
    """

    spec: MaskSpec
    operands: list[tuple[fx.Node, str]] = field(default_factory=list)
    note: str = ""


@dataclass
class MaskFunction:
    """The mask subgraph as a function of its leaf inputs, read as bool [B, H, rows, Skv] blocks."""

    tiled: Callable[[Sequence[torch.Tensor]], Tiled]
    leaves: list[fx.Node]
    leaf_values: list[torch.Tensor]
    additive: bool

    def rows(self, values: Sequence[torch.Tensor], shape: tuple[int, ...], q_idx: torch.Tensor,
             kv_idx: torch.Tensor | None = None) -> torch.Tensor:
        """Allowed (bool) at query rows `q_idx` and keys `kv_idx` (all keys by default)."""
        batch, heads, _, kv_len = shape
        kv_idx = torch.arange(kv_len) if kv_idx is None else kv_idx
        mask = self.tiled(values)
        step = max(1, BLOCK_ELEMENTS // max(1, batch * heads * len(kv_idx)))
        blocks = []
        for start in range(0, len(q_idx), step):
            rows = q_idx[start:start + step]
            index = [torch.arange(batch), torch.arange(heads), rows, kv_idx]
            block = mask.tile(project(index, mask.shape))
            block = block.reshape((1,) * (4 - block.dim()) + tuple(block.shape))
            blocks.append(self._allowed(block).expand(batch, heads, len(rows), len(kv_idx)))
        return torch.cat(blocks, dim=2)

    def _allowed(self, block: torch.Tensor) -> torch.Tensor:
        if not self.additive:
            return block.to(torch.bool)
        check_additive_values(block)
        return block == 0  # additive masks are 0 where attention is allowed


class SymbolicMaskInput(Exception):
    """The mask reads a symbolic size (dynamic shapes): evaluating it at one value proves nothing."""


def _leaf_value(node: fx.Node, placeholder_values: dict[fx.Node, torch.Tensor]) -> torch.Tensor:
    if node.op == "placeholder":
        if node not in placeholder_values:
            raise SymbolicMaskInput(f"the mask reads the symbolic size {node.name}")
        return placeholder_values[node]
    return fx.graph_module._get_attr(node.graph.owning_module, node.target)  # a constant buffer


def extract_mask_function(mask: fx.Node, placeholder_values: dict[fx.Node, torch.Tensor],
                          additive: bool) -> MaskFunction:
    """The ancestors of `mask` as a tiled function of its leaves (placeholders and constants)."""
    ancestors = ancestors_in_order(mask)
    leaves = leaves_of(ancestors)
    values = [_leaf_value(leaf, placeholder_values) for leaf in leaves]
    floating = [leaf.name for leaf, v in zip(leaves, values) if v.dtype.is_floating_point and v.dim() > 0]
    if floating:
        raise ValueError(f"the mask depends on floating-point data ({', '.join(floating)})")
    return MaskFunction(tiled_function(ancestors, leaves, mask), leaves, values, additive)


def check_additive_values(mask_value: torch.Tensor) -> None:
    """An additive mask must hold only 0 and 'minus infinity' (-inf, finfo.min, -1e9, ...)."""
    odd = (mask_value != 0) & (mask_value > MASKED_ADDITIVE_VALUE)
    if bool(odd.any()):
        raise ValueError("the additive mask holds values other than 0 and -inf (a bias such as ALiBi), "
                         "which a boolean MaskSpec cannot express")


def checked_rows(shape: tuple[int, ...]) -> torch.Tensor:
    """Every query row when the mask is small enough; else the first, last, spread and random rows."""
    q_len = shape[2]
    if torch.Size(shape).numel() <= MAX_WHOLE_ELEMENTS:
        return torch.arange(q_len)
    generator = torch.Generator().manual_seed(0)
    groups = [torch.arange(min(q_len, SAMPLED_ROWS)), torch.arange(max(0, q_len - SAMPLED_ROWS), q_len),
              torch.linspace(0, q_len - 1, SAMPLED_ROWS).long(), torch.randint(0, q_len, (SAMPLED_ROWS,), generator=generator)]
    return torch.unique(torch.cat(groups))


def _structured_candidates(allowed: torch.Tensor, q_idx: torch.Tensor, first_column: torch.Tensor) -> list[MaskSpec]:
    """Specs worth testing against a square pattern: `allowed` holds rows `q_idx` (the first and
    last among them), `first_column` is key 0's column over every row."""
    size = allowed.shape[1]
    rows, kv_idx = torch.nonzero(allowed, as_tuple=True)
    if rows.numel() == 0:
        return []
    q_of = q_idx[rows]
    left, right = int((q_of - kv_idx).max()), int((kv_idx - q_of).max())
    candidates: list[MaskSpec] = [Full()]
    if right <= 0 and left >= size - 1:
        candidates.append(Causal())
    elif right <= 0:
        candidates.append(Causal() & SlidingWindow(left, 0))
    else:
        candidates.append(SlidingWindow(max(left, 0), right))
    first_row_width = int(allowed[0].sum())
    if 0 < first_row_width < size:
        chunk = first_row_width if right > 0 else int(first_column.sum())
        candidates += [Chunked(chunk), Causal() & Chunked(chunk)]
    last = allowed[-1]
    sinks = int(torch.cumprod(last.int(), 0).sum())
    window = int(torch.cumprod(last.flip(0).int(), 0).sum())
    if 0 < sinks and 0 < window and sinks + window < size:
        candidates.append(Causal() & (Sinks(sinks) | SlidingWindow(window - 1, 0)))
    return candidates


def fit_structured(allowed: torch.Tensor, q_idx: torch.Tensor | None = None,
                   first_column: torch.Tensor | None = None) -> MaskSpec | None:
    """The structured MaskSpec equal to a boolean pattern, or None when none is.

    `allowed` holds the rows `q_idx` (every row by default) of a [Sq, Skv] pattern, and
    `first_column` key 0's column over every row (read off `allowed` by default).
    """
    q_idx = torch.arange(allowed.shape[0]) if q_idx is None else q_idx
    first_column = allowed[:, 0] if first_column is None else first_column
    sq, skv = len(first_column), allowed.shape[1]
    if sq != skv:
        return Full() if bool(allowed.all()) else None
    for candidate in _structured_candidates(allowed, q_idx, first_column):
        if torch.equal(candidate.evaluate(q_idx, torch.arange(skv))[0, 0], allowed):
            return candidate
    return None


def _role_capable(value: torch.Tensor, shape: tuple[int, ...]) -> bool:
    """Could this leaf be per-token data ([B or 1, Skv] integers): an attention_mask or position ids?"""
    return value.dim() == 2 and value.shape[0] in (1, shape[0]) and value.shape[1] == shape[-1] \
        and not value.dtype.is_floating_point


def _neutral(value: torch.Tensor, role: str | None) -> torch.Tensor:
    if role == "document":
        return torch.arange(value.shape[-1]).expand(value.shape).to(value.dtype)
    return torch.zeros_like(value) if role == "key_padding" else torch.ones_like(value)


def _random_probe(value: torch.Tensor, role: str, generator: torch.Generator) -> torch.Tensor:
    """Random left/right padding (`padding`, `key_padding`) or restarting position ids (`document`)."""
    rows, length = value.shape
    probe = torch.empty(rows, length, dtype=torch.int64)
    for row in range(rows):
        if role in ("padding", "key_padding"):
            cut = int(torch.randint(0, length, (1,), generator=generator))
            valid = torch.arange(length) >= cut if row % 2 == 0 else torch.arange(length) < length - cut
            probe[row] = (valid if role == "padding" else ~valid).long()
        else:
            starts = torch.rand(length, generator=generator) < 0.25
            starts[0] = True
            segment = torch.cumsum(starts.long(), 0)
            first = torch.searchsorted(segment, segment, right=False)
            probe[row] = torch.arange(length) - first
    return probe.to(value.dtype)


def segment_ids_from_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """Packed documents: a new segment starts wherever the position does not follow its predecessor."""
    restart = torch.ones_like(position_ids, dtype=torch.bool)
    restart[..., 1:] = position_ids[..., 1:] != position_ids[..., :-1] + 1
    return torch.cumsum(restart.long(), dim=-1)


def _operand_for(value: torch.Tensor, role: str) -> torch.Tensor:
    if role == "key_padding":
        return torch.logical_not(value)
    return segment_ids_from_positions(value) if role == "document" else value


def _candidate_spec(structured: MaskSpec, roles: Sequence[str | None]) -> MaskSpec:
    spec = structured
    for index, role in enumerate(role for role in roles if role is not None):
        spec = spec & (Document(index) if role == "document" else Padding(index))
    return spec


def _reproduces(fn: MaskFunction, spec: MaskSpec, roles: Sequence[str | None], shape: tuple[int, ...],
                q_idx: torch.Tensor) -> bool:
    """Does `spec` equal the mask subgraph on rows `q_idx`, on the example inputs and on random probes?"""
    generator = torch.Generator().manual_seed(0)
    capable = [role is not None or _role_capable(v, shape) for v, role in zip(fn.leaf_values, roles)]
    rounds = [list(fn.leaf_values)]
    for round_index in range(PROBES_PER_ROLE * len(ROLES)):
        rounds.append([
            _random_probe(value, role or ROLES[round_index % len(ROLES)], generator) if ok else value
            for value, role, ok in zip(fn.leaf_values, roles, capable)])
    kv_idx = torch.arange(shape[-1])
    for values in rounds:
        operands = [_operand_for(v, role) for v, role in zip(values, roles) if role is not None]
        expected = spec.evaluate(q_idx, kv_idx, operands).expand(*shape[:2], len(q_idx), shape[-1])
        if not torch.equal(fn.rows(values, shape, q_idx), expected):
            return False
    return True


def _role_assignments(fn: MaskFunction, shape: tuple[int, ...]):
    """Every way of reading the role-capable leaves, fewest roles first."""
    options = [(None, *ROLES) if _role_capable(v, shape) else (None,) for v in fn.leaf_values]
    assignments = list(itertools.product(*options))
    return sorted(assignments, key=lambda roles: sum(role is not None for role in roles))


def lift_mask(mask: fx.Node, placeholder_values: dict[fx.Node, torch.Tensor], additive: bool,
              shape: tuple[int, ...]) -> LiftedMask:
    """Lift the mask computed by `mask` ([B, H|1, Sq, Skv] after broadcasting) into a MaskSpec.

    Raises ValueError (with the reason) when the mask depends on data, so attention must be left
    alone, and `Untileable` (a ValueError) when it is built by an op too large to evaluate whole.
    """
    fn = extract_mask_function(mask, placeholder_values, additive)
    passed_in = [leaf.name for leaf, value in zip(fn.leaves, fn.leaf_values)
                 if value.dim() >= 2 and not _role_capable(value, shape) and passed_by_caller(leaf)]
    if passed_in:
        return LiftedMask(Dense(0), [(mask, "dense_additive" if additive else "dense")],
                          f"the mask reads {', '.join(passed_in)}, passed in by the caller (its values may "
                          f"change from call to call); kept as a dense tensor")
    q_idx = checked_rows(shape)
    for roles in _role_assignments(fn, shape):
        neutral = [_neutral(v, role) if role else v for v, role in zip(fn.leaf_values, roles)]
        pattern = fn.rows(neutral, shape, q_idx)
        if not bool((pattern == pattern[:1, :1]).all()):
            continue  # still varies over batch or heads: some input plays a role we have not assigned
        first_column = fn.rows(neutral, shape, torch.arange(shape[2]), torch.zeros(1, dtype=torch.long))
        structured = fit_structured(pattern[0, 0], q_idx, first_column[0, 0, :, 0])
        if structured is None:
            continue
        spec = _candidate_spec(structured, roles)
        if _reproduces(fn, spec, roles, shape, q_idx):
            operands = [(leaf, role) for leaf, role in zip(fn.leaves, roles) if role is not None]
            return LiftedMask(spec, operands, _lifted_note(q_idx, shape[2]))
    return LiftedMask(Dense(0), [(mask, "dense_additive" if additive else "dense")],
                      "no MaskSpec reproduces the mask on probes; kept as a dense tensor")


def passed_by_caller(node: fx.Node) -> bool:
    """Is this placeholder a tensor the caller passes in (an argument or an item of one), rather
    than a parameter, buffer or global? Dynamo guards no tensor values, so the next call may
    bring other values: a spec fitted to these would silently be wrong."""
    source = getattr(node.meta.get("grapharg"), "source", None)
    while source is not None and not isinstance(source, LocalSource):
        if isinstance(source, AttrSource):  # L['self']._buffers[...] and other object state
            return False
        source = getattr(source, "base", None)
    return isinstance(source, LocalSource)


def _lifted_note(q_idx: torch.Tensor, q_len: int) -> str:
    if len(q_idx) == q_len:
        return "lifted"
    return f"lifted (checked on {len(q_idx)} of {q_len} query rows per probe; the mask was never built whole)"
