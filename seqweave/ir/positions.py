"""Positions as data: the rotary embedding an attention applies to q and k (a `PositionSpec`).

The frontend lifts the rotary embedding written before an attention (HF's
`apply_rotary_pos_emb`: `x * cos + rotate_half(x) * sin`, full or partial) into the
attention op, as it lifts masks: the op then takes q and k *before* rotation and the spec
says how to rotate them. Passes can rewrite it (`rope-scale`, `rope-fp32`, `streaming`,
`lm-infinite`) because it is data, not ops.

A spec reads two of the attention's operands, written `$N` as masks do: the token positions
(`[B, S]`, `[1, S]` or `[S]`) and, when the frequencies are not given by a rule, the inverse
frequencies (`[dims / 2]`). Tables and rotation follow HF's arithmetic step for step (fp32
outer product, `cat(freqs, freqs)`, `cos`/`sin`, times `scaling`, cast to `table`), so a
lifted rotary is bit-for-bit the captured one.

Text form: `rope(dims=16, positions=$2, freqs=$3, table=float32)`; fields at their default are
left out. `far=[mask]` names pairs (query, key) that see a second rotation: the query at
position `far_q`, the key at `far_k` (or its own position when `far_k` is -1). StreamingLLM
and LM-Infinite are written this way.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar, Sequence

import torch
from torch import Tensor

STYLES = ("half", "interleaved")
COMPUTES = ("native", "float32")
#: How the inverse frequencies are made: "captured" reads the operand; the rest follow HF's
#: `rope_parameters` rule of that name from `base` (see `inverse_frequencies`).
RULES = ("captured", "default", "linear", "dynamic", "yarn", "llama3")
_DTYPES = {"": None, "float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
           "float16": torch.float16}


class PositionSpec:
    """What an attention does to q and k positions before its scores."""

    def operand_indices(self) -> frozenset[int]:
        return frozenset()


@dataclass(frozen=True)
class NoPositions(PositionSpec):
    """q and k reach the scores as they are."""

    def __str__(self) -> str:
        return "none"


@dataclass(frozen=True)
class Rope(PositionSpec):
    """Rotary position embedding of the first `dims` channels of every head."""

    dims: int
    positions: int                # operand index: token positions
    freqs: int = -1               # operand index of the inverse frequencies when rule == "captured"
    style: str = "half"           # "half": rotate_half (HF, NeoX); "interleaved": pairs (2i, 2i+1) (GPT-J)
    scaling: float = 1.0          # HF's attention_scaling, multiplying cos and sin
    table: str = ""               # dtype the tables are cast to before use ("" keeps fp32)
    compute: str = "native"       # "float32": rotate in fp32 and cast back (AnchorAttention)
    rule: str = "captured"
    base: float = 0.0             # rotary base (theta); 0 when the captured table has none
    factor: float = 1.0
    original_max: int = 0         # pre-scaling context length (yarn, llama3, dynamic)
    low: float = 1.0              # llama3 low_freq_factor / yarn beta_slow
    high: float = 4.0             # llama3 high_freq_factor / yarn beta_fast
    far: str = ""                 # MaskSpec text of pairs seen with the far rotation
    far_q: int = -1               # the far rotation's query position
    far_k: int = -1               # the far rotation's key position (-1: the key's own)

    KIND: ClassVar[str] = "rope"

    def __post_init__(self) -> None:
        if not isinstance(self.dims, int) or self.dims < 2 or self.dims % 2:
            raise ValueError(f"rope: dims must be an even number >= 2, got {self.dims!r}")
        if self.style not in STYLES or self.compute not in COMPUTES or self.rule not in RULES:
            raise ValueError(f"rope: style {self.style!r} / compute {self.compute!r} / rule {self.rule!r} "
                             f"not in {STYLES} / {COMPUTES} / {RULES}")
        if self.table not in _DTYPES:
            raise ValueError(f"rope: table dtype {self.table!r} not in {sorted(_DTYPES)}")
        if self.rule == "captured" and self.freqs < 0:
            raise ValueError("rope: rule 'captured' reads the frequencies operand; give freqs=$N")
        if self.rule != "captured" and self.base <= 0:
            raise ValueError(f"rope: rule {self.rule!r} computes frequencies from the base; give base > 0")

    def operand_indices(self) -> frozenset[int]:
        return frozenset({self.positions} | ({self.freqs} if self.freqs >= 0 else set()))

    def __str__(self) -> str:
        parts = [f"dims={self.dims}", f"positions=${self.positions}"]
        defaults = Rope(2, 0, freqs=0)
        for field in fields(self)[2:]:
            value = getattr(self, field.name)
            if value == getattr(defaults, field.name) and field.name != "freqs":
                continue
            if field.name == "freqs":
                if value >= 0:
                    parts.append(f"freqs=${value}")
            elif field.name == "far":
                parts.append(f"far=[{value}]")
            else:
                parts.append(f"{field.name}={value!r}" if isinstance(value, float) else f"{field.name}={value}")
        return f"rope({', '.join(parts)})"

    @property
    def near(self) -> "Rope":
        """The spec without its far rotation."""
        return replace(self, far="", far_q=-1, far_k=-1)

    def remap_operands(self, mapping: dict[int, int]) -> "Rope":
        return replace(self, positions=mapping[self.positions],
                       freqs=mapping[self.freqs] if self.freqs >= 0 else -1)


_FIELD = re.compile(r"\s*([a-z_]+)\s*=\s*(\[[^\]]*\]|[^,\s)]+)\s*,?")


def parse_positions(text: str | PositionSpec) -> PositionSpec:
    """Inverse of `str`: `none` or `rope(dims=.., positions=$N, ...)`; a PositionSpec is returned as it is."""
    if isinstance(text, PositionSpec):
        return text
    if not isinstance(text, str):
        raise ValueError(f"expected the text form of a position spec (a str), got {text!r}")
    stripped = text.strip()
    if stripped == "none":
        return NoPositions()
    if not (stripped.startswith("rope(") and stripped.endswith(")")):
        raise ValueError(f"cannot parse position spec {text!r}: expected 'none' or 'rope(dims=D, positions=$N, ...)'")
    body, values, pos = stripped[len("rope("):-1], {}, 0
    kinds = {field.name: field.type for field in fields(Rope)}
    while pos < len(body):
        found = _FIELD.match(body, pos)
        if not found or found.group(1) not in kinds:
            raise ValueError(f"cannot parse position spec {text!r} at {body[pos:]!r}; fields: {sorted(kinds)}")
        values[found.group(1)] = _field_value(found.group(1), found.group(2), kinds[found.group(1)])
        pos = found.end()
    return Rope(**values)


def _field_value(name: str, text: str, kind: Any) -> Any:
    if text.startswith("$"):
        return int(text[1:])
    if text.startswith("["):
        return text[1:-1].strip()
    if kind in ("int", int):
        return int(text)
    if kind in ("float", float):
        return float(text)
    return text


# ------------------------------------------------------------------ frequencies (HF's rules)


def default_frequencies(base: float, dims: int) -> Tensor:
    """HF's default rule, as HF writes it: 1 / base^(2i / dims) in fp32."""
    return 1.0 / (base ** (torch.arange(0, dims, 2, dtype=torch.int64).to(dtype=torch.float) / dims))


def inverse_frequencies(spec: Rope, operands: Sequence[Tensor], positions: Tensor) -> tuple[Tensor, float]:
    """(inverse frequencies [dims/2] fp32, attention scaling) of `spec` for these positions."""
    if spec.rule == "captured":
        return operands[spec.freqs], spec.scaling
    inv_freq = default_frequencies(spec.base, spec.dims)
    if spec.rule == "linear":
        inv_freq = inv_freq / spec.factor
    elif spec.rule == "dynamic":
        inv_freq = _dynamic(spec, positions)
    elif spec.rule == "llama3":
        inv_freq = _llama3(spec, inv_freq)
    elif spec.rule == "yarn":
        inv_freq = _yarn(spec)
    return inv_freq.to(positions.device), spec.scaling


def _dynamic(spec: Rope, positions: Tensor) -> Tensor:
    """Dynamic NTK: past the original context, the base grows with the longest position seen."""
    seq_len = int(positions.max()) + 1
    if seq_len <= spec.original_max:
        return default_frequencies(spec.base, spec.dims)
    base = spec.base * ((spec.factor * seq_len / spec.original_max) - (spec.factor - 1)) ** (spec.dims / (spec.dims - 2))
    return default_frequencies(base, spec.dims)


def _llama3(spec: Rope, inv_freq: Tensor) -> Tensor:
    """Llama 3.1's rule: long wavelengths divided by `factor`, short ones kept, smooth between."""
    low_wavelen = spec.original_max / spec.low
    high_wavelen = spec.original_max / spec.high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / spec.factor, inv_freq)
    smooth = (spec.original_max / wavelen - spec.low) / (spec.high - spec.low)
    smoothed = (1 - smooth) * scaled / spec.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(spec: Rope) -> Tensor:
    """YaRN (HF's `_compute_yarn_parameters`, truncate=True): interpolation below the low
    correction dim, extrapolation above the high one, a linear ramp between. `low` / `high`
    are beta_slow / beta_fast; the attention scaling is set by the `rope-scale` pass."""
    dims, base, factor = spec.dims, spec.base, spec.factor

    def correction_dim(rotations: float) -> float:
        return (dims * math.log(spec.original_max / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(correction_dim(spec.high)), 0)
    high = min(math.ceil(correction_dim(spec.low)), dims - 1)
    if low == high:
        high += 0.001
    pos_freqs = base ** (torch.arange(0, dims, 2).to(dtype=torch.float) / dims)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    ramp = torch.clamp((torch.arange(dims // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation_factor = 1 - ramp
    return interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor


def yarn_scaling(factor: float) -> float:
    """YaRN's attention factor (mscale) for a scaling factor."""
    return 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0


# ------------------------------------------------------------------ tables and rotation


def _positions_at(positions: Tensor, rows: Tensor | None, constant: int) -> Tensor:
    """Positions of the rows this rank holds (all rows by default); a constant replaces them."""
    chosen = positions if rows is None else positions.index_select(-1, rows.to(positions.device))
    return torch.full_like(chosen, constant) if constant >= 0 else chosen


def tables(spec: Rope, positions: Tensor, operands: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """(cos, sin) [B or 1, S, dims] for `positions`, exactly as HF's rotary embedding makes them."""
    inv_freq, scaling = inverse_frequencies(spec, operands, operands[spec.positions])
    freqs = positions[..., None].float() * inv_freq.float().to(positions.device)
    if positions.dim() == 1:
        freqs = freqs[None]
    emb = torch.cat((freqs, freqs), dim=-1) if spec.style == "half" else freqs.repeat_interleave(2, dim=-1)
    cos, sin = emb.cos() * scaling, emb.sin() * scaling
    dtype = _DTYPES[spec.table] if spec.compute == "native" else None
    return (cos.to(dtype), sin.to(dtype)) if dtype is not None else (cos, sin)


def rotate_half(x: Tensor, style: str = "half") -> Tensor:
    """HF's rotate_half (`cat(-x2, x1)`), or its interleaved-pairs form."""
    if style == "half":
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def _rotate_half_transposed(y: Tensor, style: str) -> Tensor:
    if style == "half":
        half = y.shape[-1] // 2
        return torch.cat((y[..., half:], -y[..., :half]), dim=-1)
    pairs = y.unflatten(-1, (-1, 2))
    return torch.stack((pairs[..., 1], -pairs[..., 0]), dim=-1).flatten(-2)


def _split(x: Tensor, dims: int) -> tuple[Tensor, Tensor | None]:
    return (x, None) if x.shape[-1] == dims else (x[..., :dims], x[..., dims:])


def _join(rotated: Tensor, rest: Tensor | None) -> Tensor:
    return rotated if rest is None else torch.cat((rotated, rest.to(rotated.dtype)), dim=-1)


def rotate(x: Tensor, cos: Tensor, sin: Tensor, spec: Rope) -> Tensor:
    """x [B, H, S, D] rotated: `x * cos + rotate_half(x) * sin` on the first `dims` channels."""
    part, rest = _split(x, spec.dims)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    if spec.compute == "float32":
        wide = part.float()
        return _join((wide * cos.float() + rotate_half(wide, spec.style) * sin.float()).to(x.dtype), rest)
    return _join(part * cos + rotate_half(part, spec.style) * sin, rest)


def rotate_back(grad: Tensor, cos: Tensor, sin: Tensor, spec: Rope, dtype: torch.dtype) -> Tensor:
    """The gradient with respect to x of `rotate(x)`, given the gradient of its result."""
    part, rest = _split(grad, spec.dims)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    if spec.compute == "float32":
        part = part.float()
        cos, sin = cos.float(), sin.float()
    back = part * cos + _rotate_half_transposed(part * sin, spec.style)
    return _join(back.to(dtype), rest)


def rotate_operand(x: Tensor, spec: Rope, operands: Sequence[Tensor], rows: Tensor | None,
                   constant: int = -1) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """(x rotated at its rows' positions, the tables used)."""
    cos, sin = tables(spec, _positions_at(operands[spec.positions], rows, constant), operands)
    return rotate(x, cos, sin, spec), (cos, sin)
