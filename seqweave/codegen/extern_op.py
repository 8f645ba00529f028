"""`seqweave::extern`: one custom op through which an Inductor-compiled graph calls seqweave.

Inductor fuses the regions between attentions; seqweave's own ops (attention on one device
and over ranks, collectives) must stay seqweave's. Each such IR node becomes one call
`seqweave::extern(index, [token, *tensors]) -> [*results, token]`:

- `index` picks the node's bound implementation from the table of the program running in this
  thread (`running`), so a compiled graph holds no Python objects and Inductor's cache can
  share it between ranks and processes that compiled the same program.
- the token is a 0-element tensor threaded from each extern call to the next: Inductor may
  reorder independent work, but not calls that depend on each other, so collectives leave in
  the IR's order on every rank. The table checks that order on every call anyway.
- the fake kernel makes empty tensors of the IR node's result types: exact shapes, dtypes and
  (contiguous) strides, which the real implementation is held to.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import Tensor

from seqweave.errors import SeqweaveError

OP_NAME = "seqweave::extern"


class ExternOrderError(SeqweaveError):
    """A compiled graph called seqweave's ops in another order than the IR's."""


@dataclass(frozen=True)
class ExternCall:
    """One IR node the compiled graph calls out to: how to run it, and what it returns."""

    label: str
    run: Callable[[list[Tensor]], list[Tensor]]
    result_types: tuple[tuple[tuple[int, ...], torch.dtype], ...]  # (shape, dtype) per result


@dataclass
class ExternTable:
    """The extern calls of one lowered program, by index, and the order they must run in."""

    calls: list[ExternCall] = field(default_factory=list)
    device: torch.device = torch.device("cpu")  # where the program's tensors live (set when it is compiled)
    _next: int = 0

    def add(self, call: ExternCall) -> int:
        self.calls.append(call)
        return len(self.calls) - 1

    def run(self, index: int, tensors: list[Tensor]) -> list[Tensor]:
        self._expect(index)
        call = self.calls[index]
        token, operands = tensors[0], tensors[1:]
        taken = {t.untyped_storage().data_ptr() for t in operands if t.numel()}
        owned = []
        for position, result in enumerate(call.run(operands)):
            owned.append(_own(result, taken, call, position))
            if owned[-1].numel():
                taken.add(owned[-1].untyped_storage().data_ptr())
        return owned + [token.new_empty(0)]

    def fake(self, index: int, tensors: list[Tensor]) -> list[Tensor]:
        call, token = self.calls[index], tensors[0]
        return [torch.empty(shape, dtype=dtype, device=self.device) for shape, dtype in call.result_types] + \
            [token.new_empty(0)]

    def _expect(self, index: int) -> None:
        """Each step calls every extern once, in IR order (index 0 starts a step)."""
        if index not in (0, self._next):
            raise ExternOrderError(f"the compiled graph called {self.calls[index].label} (extern {index}) where the "
                                   f"IR runs {self.calls[self._next].label} (extern {self._next}) next",
                                   hint="compile with inner_backend='eager' and report this graph")
        self._next = (index + 1) % len(self.calls)


def _own(result: Tensor, taken: set[int], call: ExternCall, position: int) -> Tensor:
    """A result Inductor may treat as fresh and laid out as the fake kernel said: a custom op
    may not return (a view of) an input or of another result (`taken`: their storages), and
    code after it assumes contiguous strides."""
    shape, dtype = call.result_types[position]
    if tuple(result.shape) != shape or result.dtype != dtype:
        raise SeqweaveError(f"{call.label} returned {tuple(result.shape)} {result.dtype} where the IR says "
                            f"{shape} {dtype}", hint="this is a seqweave bug; compile with inner_backend='eager'")
    if result.numel() and result.untyped_storage().data_ptr() in taken:
        return result.clone(memory_format=torch.contiguous_format)
    return result.contiguous()


_RUNNING = threading.local()


@contextlib.contextmanager
def running(table: ExternTable) -> Iterator[None]:
    """Make `table` the one this thread's extern calls (and fake kernels, while compiling) read."""
    previous = getattr(_RUNNING, "table", None)
    _RUNNING.table = table
    try:
        yield
    finally:
        _RUNNING.table = previous


_AUTOGRAD_KEYS = (torch._C.DispatchKeySet(torch._C.DispatchKey.AutogradFunctionality)
                  | torch._C.DispatchKeySet(torch._C.DispatchKey.AutogradOther)
                  | torch._C.DispatchKeySet(torch._C.DispatchKey.AutogradNestedTensor))


def _with_autograd() -> contextlib.AbstractContextManager:
    """The dispatcher calls a custom op's kernel with autograd excluded below it; an extern call
    runs what the eager runtime runs, some of which differentiates inside (linear attention's
    reference backward), so autograd is let back in (grad mode stays the caller's)."""
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(),
                                           torch._C._dispatch_tls_local_exclude_set() - _AUTOGRAD_KEYS)


def _table() -> ExternTable:
    table = getattr(_RUNNING, "table", None)
    if table is None:
        raise SeqweaveError("seqweave::extern was called outside a seqweave program",
                            hint="call the compiled function seqweave returned, not its inner graph")
    return table


@torch.library.custom_op(OP_NAME, mutates_args=())
def extern(index: int, tensors: list[Tensor]) -> list[Tensor]:
    table = _table()
    with _with_autograd():
        return table.run(index, tensors)


@extern.register_fake
def _extern_fake(index: int, tensors: list[Tensor]) -> list[Tensor]:
    return _table().fake(index, tensors)
