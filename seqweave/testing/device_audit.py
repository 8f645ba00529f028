"""Catch tensors that land on the wrong device, for tests of device-agnostic code.

`DeviceAudit` is a TorchFunctionMode that watches every torch call made inside it and notes
two mistakes, each with the seqweave source line that made the call:

- a result on a `forbidden` device from arguments that were not on it. Run the code under
  `torch.device("meta")` with inputs elsewhere and forbid "meta": a factory called without
  `device=` (torch.zeros(shape), torch.arange(n), torch.tensor(x)) lands on the default
  device and is caught where it was called, not where its tensor later meets the inputs;
- one call mixing tensors of two devices (say an index built on the CPU applied to CUDA
  data). CPU-only tests cannot see this one, since everything is on the CPU: give the code
  inputs on "meta" instead, whose kernels accept such mixes silently where CUDA would raise.

Explicit moves (`.to`, `.copy_`) and 0-dim CPU scalars, which torch lets any device read,
are not mixes. Notes are kept even when the call itself then raises, so a test can show
where the first wrong tensor came from instead of only the error it led to.
"""
from __future__ import annotations

import traceback
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

PACKAGE = Path(__file__).resolve().parent.parent  # the seqweave package: where findings point
MOVES = {"to", "copy_", "cpu", "cuda", "type"}  # calls whose purpose is crossing devices


def _tensors(tree: object) -> list[torch.Tensor]:
    """The tensors in nested tuples, lists and dicts (a call's args and kwargs, or its result)."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        tree = list(tree.values())
    if isinstance(tree, (tuple, list)) and not isinstance(tree, torch.Size):
        return [t for item in tree for t in _tensors(item)]
    return []


def _name(func: object) -> str:
    return getattr(func, "__name__", None) or repr(func)


def _where() -> str:
    """The innermost seqweave frame outside this file: the line that made the call."""
    for frame in reversed(traceback.extract_stack()):
        path = Path(frame.filename).resolve()
        if path != Path(__file__).resolve() and PACKAGE in path.parents:
            return f"{path.relative_to(PACKAGE.parent)}:{frame.lineno} ({frame.name})"
    return "outside seqweave"


def mixed_devices(func: object, args: tuple, kwargs: dict) -> set[torch.device]:
    """The devices of a call's tensor arguments when they disagree (empty set when they agree)."""
    if _name(func) in MOVES:
        return set()
    devices = {t.device for t in _tensors((args, kwargs)) if not (t.dim() == 0 and t.device.type == "cpu")}
    return devices if len(devices) > 1 else set()


class DeviceAudit(TorchFunctionMode):
    """Note (in `findings`) every result on `forbidden` and every call mixing devices."""

    def __init__(self, forbidden: str | None = None) -> None:
        super().__init__()
        self.forbidden = forbidden
        self.findings: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        mixed = mixed_devices(func, args, kwargs)
        if mixed:
            self._note(f"{_name(func)} mixes {sorted(map(str, mixed))} at {_where()}")
        result = func(*args, **kwargs)
        if self._creates_forbidden(args, kwargs, result):
            self._note(f"{_name(func)} made a tensor on {self.forbidden} at {_where()}")
        return result

    def _note(self, finding: str) -> None:
        if finding not in self.findings:  # a loop repeats its mistake; once is enough to point at it
            self.findings.append(finding)

    def _creates_forbidden(self, args: tuple, kwargs: dict, result: object) -> bool:
        """A forbidden result from arguments that were not: where the wrong tensor came from,
        not every op that later computes with it."""
        def on(tree: object) -> bool:
            return any(t.device.type == self.forbidden for t in _tensors(tree))
        return bool(self.forbidden) and on(result) and not on((args, kwargs))
