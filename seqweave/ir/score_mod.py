"""Score modifiers: elementwise transforms of raw attention scores that ride beside a MaskSpec."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from seqweave.ir.mask import ARG_FLOAT, _TextForm


class ScoreMod(_TextForm, ABC):
    """Elementwise transform of raw attention scores, applied before masking."""

    @abstractmethod
    def apply(self, scores: Tensor) -> Tensor:
        """Modified scores."""

    @abstractmethod
    def grad_factor(self, raw_scores: Tensor) -> Tensor:
        """d apply(raw) / d raw, elementwise (for hand-written backward passes)."""


@dataclass(frozen=True)
class NoScoreMod(ScoreMod):
    """Identity."""

    KIND: ClassVar[str] = "none"

    def apply(self, scores: Tensor) -> Tensor:
        return scores

    def grad_factor(self, raw_scores: Tensor) -> Tensor:
        return torch.ones_like(raw_scores)


@dataclass(frozen=True)
class Softcap(ScoreMod):
    """cap * tanh(scores / cap) (Gemma-2 style logit soft-capping)."""

    cap: float
    KIND: ClassVar[str] = "softcap"
    ARG_KINDS: ClassVar[tuple[str, ...]] = (ARG_FLOAT,)

    def __post_init__(self) -> None:
        number = isinstance(self.cap, (int, float)) and not isinstance(self.cap, bool)
        if not number or not math.isfinite(self.cap) or self.cap <= 0:
            raise ValueError(f"Softcap: cap must be a finite number > 0, got {self.cap!r}; "
                             f"pass the logit cap, e.g. Softcap(50.0), or use NoScoreMod()")
        object.__setattr__(self, "cap", float(self.cap))  # so str/parse round-trips

    def apply(self, scores: Tensor) -> Tensor:
        return self.cap * torch.tanh(scores / self.cap)

    def grad_factor(self, raw_scores: Tensor) -> Tensor:
        return 1 - torch.tanh(raw_scores / self.cap) ** 2
