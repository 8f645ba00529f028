"""The step list a rank executes. Values live in numbered slots; each slot is freed after
its last reader so long sequences do not keep every activation alive."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence


def steal(args: list) -> list:
    """The items of a boxed argument list, the list itself emptied: aot_autograd hands a graph
    its arguments in a list it lets the callee clear, so that a backward can free each saved
    activation after its last use instead of holding every one until it returns."""
    taken = list(args)
    if isinstance(args, list):
        args.clear()
    return taken


@dataclass(frozen=True)
class Slot:
    """A reference to a value slot inside an argument template."""

    index: int


def fill(template: Any, slots: list[Any]) -> Any:
    """Replace every `Slot` inside a nested template by the slot's current value."""
    if isinstance(template, Slot):
        return slots[template.index]
    if isinstance(template, tuple):
        return tuple(fill(item, slots) for item in template)
    if isinstance(template, list):
        return [fill(item, slots) for item in template]
    if isinstance(template, dict):
        return {key: fill(item, slots) for key, item in template.items()}
    return template


@dataclass(frozen=True)
class Step:
    """`results = fn(*args, **kwargs)`; `frees` are slots no later step reads."""

    label: str
    fn: Callable[..., Any]
    args: tuple
    kwargs: dict
    results: tuple[int, ...]
    frees: tuple[int, ...] = ()


@dataclass
class Program:
    """A lowered graph: input slots, steps, and the outputs template."""

    name: str
    num_slots: int
    inputs: tuple[int, ...]
    steps: list[Step]
    outputs: Any
    stats: dict[str, int] = field(default_factory=dict)

    def __call__(self, args: Sequence[Any]) -> Any:
        if len(args) != len(self.inputs):
            raise TypeError(f"program {self.name} takes {len(self.inputs)} inputs, got {len(args)}")
        slots: list[Any] = [None] * self.num_slots
        for index, value in zip(self.inputs, steal(args)):
            slots[index] = value
        for step in self.steps:
            self._run(step, slots)
        return fill(self.outputs, slots)

    @staticmethod
    def _run(step: Step, slots: list[Any]) -> None:
        result = step.fn(*fill(step.args, slots), **fill(step.kwargs, slots))
        if len(step.results) == 1 and not isinstance(result, (tuple, list)):
            slots[step.results[0]] = result
        else:
            for index, value in zip(step.results, result):
                slots[index] = value
        for index in step.frees:
            slots[index] = None
