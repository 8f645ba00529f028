"""seqweave's errors. Each names where it happened (layer, op, pass) and what to do about it."""
from __future__ import annotations


class SeqweaveError(Exception):
    """Base class: `str(error)` is the whole message, with the hint on its own line."""

    def __init__(self, message: str, *, hint: str = "", layer: str = "", op: str = "", pass_name: str = "") -> None:
        self.message, self.hint, self.layer, self.op, self.pass_name = message, hint, layer, op, pass_name
        super().__init__(self._text())

    def _text(self) -> str:
        where = ", ".join(f"{label} {value}" for label, value in
                          (("layer", self.layer), ("op", self.op), ("pass", self.pass_name)) if value)
        text = f"{self.message}" + (f" [{where}]" if where else "")
        return text + (f"\n  what to do: {self.hint}" if self.hint else "")


class CaptureError(SeqweaveError):
    """The model could not be captured or imported into the IR."""


class PassError(SeqweaveError):
    """A pass failed or left the IR invalid."""


class OptionError(SeqweaveError):
    """A backend option or CLI argument is wrong."""


class TargetError(SeqweaveError):
    """A `module:function` target could not be loaded or returned the wrong thing."""


class ScheduleError(SeqweaveError):
    """The ranks of a sharded program would not agree on their communication: collectives in
    different orders or shapes, a send without its receive, a wait cycle, a dead or duplicated
    collective. Found statically (`ir/schedule.py`), before any rank runs."""


class PeerFailedError(SeqweaveError):
    """Another rank failed compiling or preparing a step; this rank stops too, with its message."""


def find_seqweave_error(error: BaseException) -> SeqweaveError | None:
    """The SeqweaveError that `error` is or wraps (dynamo wraps backend errors), if any."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, SeqweaveError):
            return current
        pending += [current.__cause__, current.__context__, getattr(current, "inner_exception", None)]
    return None
