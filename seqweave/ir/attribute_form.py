"""Typed attribute values (MaskSpec, ScoreMod, PositionSpec) during the move away from text.

The capture writes typed values; IR written by hand, by older tools or by test generators may
still hold the text form. A pass that rewrites an attribute keeps the form it found, so a text
program stays text (its golden printouts with it) and a typed one stays typed.
"""
from __future__ import annotations

from typing import Any


def in_form_of(found: Any, value: Any) -> Any:
    """`value` as text when the attribute it replaces was text, else the typed value itself."""
    return str(value) if isinstance(found, str) else value
