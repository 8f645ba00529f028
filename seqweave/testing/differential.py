"""Differential check: run a zoo `Program` through seqweave and through `aot_eager`, compare all.

Both backends see the same weights (deep copies of one module) and the same input values
(fresh copies per call). After every call we compare what a user could observe: every
output (nested containers and ModelOutputs flattened), every parameter gradient (None on
one side only is a mismatch), every parameter and buffer value (in-place writes), every
input tensor's value and gradient (in-place writes on inputs), and which outputs alias an
input, a buffer or another output (a view must stay a view). `aot_eager` is the reference:
the same dynamo graphs and aot_autograd wrappers, run by eager ATen kernels.

The module also runs uncompiled (eager), only as an arbiter: aot_eager has its own bugs
(torch 2.13's min-cut partitioner recomputes a read of a buffer mutated in the forward in the
backward, after the write, so `y = w * self.count` after `self.count.add_(1)` gets the wrong
gradient). Where aot_eager differs from eager and seqweave matches eager, the item passes
with a "reference wrong" note instead of blaming seqweave.

seqweave may refuse a program, but only with a `SeqweaveError` naming why; any other
exception, or any difference beyond fp32 tolerance, is a failure.
"""
from __future__ import annotations

import copy
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from seqweave.errors import find_seqweave_error
from seqweave.testing.zoo import Program, build

ATOL = 1e-5
RTOL = 1e-5
REFERENCE = "aot_eager"

MATCH, MISMATCH, REFUSED, ERROR, REFERENCE_ERROR = "match", "mismatch", "refused", "error", "reference_error"
#: Marks an item where aot_eager disagrees with eager and seqweave agrees with eager.
REFERENCE_WRONG = "reference wrong"


@dataclass(frozen=True)
class ItemDiff:
    """One compared item, e.g. `call1/grad/proj.weight`: whether it matched and by how much."""

    name: str
    ok: bool
    max_abs: float = 0.0
    note: str = ""

    def __str__(self) -> str:
        text = f"{self.name}: {'ok' if self.ok else 'MISMATCH'} max|Δ|={self.max_abs:.3g}"
        return text + (f" ({self.note})" if self.note else "")


@dataclass(frozen=True)
class DiffResult:
    """The verdict for one program: `status` is match, mismatch, refused (a SeqweaveError),
    error (any other exception in seqweave) or reference_error (aot_eager itself failed)."""

    program: str
    status: str
    items: tuple[ItemDiff, ...] = ()
    exception: str = ""          # "Type: message" of what seqweave (or the reference) raised
    refusal: str = ""            # the SeqweaveError's message, when status is refused
    seconds: dict[str, float] = field(default_factory=dict)
    graphs: int = 0              # dynamo graphs the backend under test compiled
    attentions: int = 0          # seqweave attention ops in the forward graphs it compiled (0 for other backends)

    @property
    def mismatches(self) -> list[ItemDiff]:
        return [item for item in self.items if not item.ok]

    @property
    def reference_wrong(self) -> list[ItemDiff]:
        """Items where aot_eager differed from eager and seqweave matched eager (a torch bug)."""
        return [item for item in self.items if item.note.startswith(REFERENCE_WRONG)]

    def largest(self, count: int = 5) -> list[ItemDiff]:
        """The items with the largest differences, mismatches first."""
        return sorted(self.items, key=lambda item: (item.ok, -item.max_abs))[:count]

    def summary(self) -> str:
        """A few lines for an assertion message or a report."""
        lines = [f"{self.program}: {self.status} ({self.graphs} graphs compiled)"]
        if self.exception:
            lines.append(f"  raised {self.exception}")
        shown = self.mismatches[:12] if self.mismatches else self.largest(3)
        lines += [f"  {item}" for item in shown]
        lines += [f"  {item}" for item in self.reference_wrong[:4] if item not in shown]
        if len(self.mismatches) > len(shown):
            lines.append(f"  ... and {len(self.mismatches) - len(shown)} more mismatches")
        return "\n".join(lines)


#: Everything one backend's run exposed: per call, item name -> tensor, Python scalar, None, or
#: (for `alias/...` items) the frozenset of names an output shares storage with.
Observed = list[dict[str, Any]]


# --- flattening and snapshots ----------------------------------------------------------------


def flatten(value: Any, prefix: str = "", depth: int = 8) -> Iterator[tuple[str, Any]]:
    """(path, leaf) for every tensor or Python scalar inside tuples, lists, dicts, ModelOutputs
    and plain objects such as HF caches (through their attributes)."""
    if isinstance(value, torch.Tensor) or value is None or isinstance(value, (bool, int, float, str)):
        yield prefix or "value", value
    elif depth <= 0:
        return
    elif isinstance(value, dict):  # ModelOutput is an OrderedDict
        for key, item in value.items():
            yield from flatten(item, f"{prefix}.{key}" if prefix else str(key), depth - 1)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from flatten(item, f"{prefix}[{index}]", depth - 1)
    elif hasattr(value, "__dict__") and not callable(value):
        for key, item in sorted(vars(value).items()):
            if not key.startswith("_"):
                yield from flatten(item, f"{prefix}.{key}", depth - 1)


def _snapshot(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


def _fresh(value: Any) -> Any:
    """A copy of an input with the same values (and requires_grad), sharing no memory."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone().requires_grad_(value.requires_grad)
    if isinstance(value, (list, tuple)):
        return type(value)(_fresh(item) for item in value)
    if isinstance(value, dict):
        return {key: _fresh(item) for key, item in value.items()}
    return copy.deepcopy(value)


def _storage(tensor: torch.Tensor) -> int | None:
    if tensor.layout != torch.strided or tensor.numel() == 0:
        return None
    return tensor.untyped_storage().data_ptr()


def alias_map(outputs: list[tuple[str, Any]], others: dict[str, torch.Tensor]) -> dict[str, frozenset[str]]:
    """For each output tensor, the names of the inputs, buffers/parameters and earlier outputs
    it shares storage with (an output that is a view of an input must alias it)."""
    owners: dict[int, list[str]] = {}
    for name, tensor in others.items():
        if (ptr := _storage(tensor)) is not None:
            owners.setdefault(ptr, []).append(name)
    result = {}
    for name, value in outputs:
        if isinstance(value, torch.Tensor) and (ptr := _storage(value)) is not None:
            result[name] = frozenset(owners.get(ptr, ()))
            owners.setdefault(ptr, []).append(f"output:{name}")
    return result


# --- running one backend ---------------------------------------------------------------------


def _differentiable(outputs: list[tuple[str, Any]]) -> list[torch.Tensor]:
    return [value for _, value in outputs
            if isinstance(value, torch.Tensor) and value.requires_grad and value.is_floating_point()]


def _backward(program: Program, out: Any, kwargs: dict, call: int) -> dict[str, Any]:
    """Use the result as the program says; returns extra observed values (a loss computed outside)."""
    generator = torch.Generator().manual_seed(1000 + call)
    if program.call == "loss":
        out["loss"].backward()
    elif program.call == "dout":
        out.backward(torch.randn(out.shape, generator=generator, dtype=out.dtype))
    elif program.call == "cross_entropy":
        ids = kwargs["input_ids"]
        loss = F.cross_entropy(out["logits"][:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        return {"loss_outside": loss.detach()}
    elif program.call == "backward":
        leaves = _differentiable(list(flatten(out, "out")))
        if leaves:
            sum((t * torch.randn(t.shape, generator=generator, dtype=t.dtype)).sum() for t in leaves).backward()
    return {}


def _one_call(program: Program, compiled: Callable, module: torch.nn.Module, inputs: tuple[tuple, dict],
              call: int) -> dict[str, Any]:
    """One call with fresh inputs, the program's backward, then a snapshot of what is observable."""
    args, kwargs = _fresh(inputs[0]), _fresh(inputs[1])
    torch.manual_seed(call)
    with torch.set_grad_enabled(program.mode != "no_grad"):
        out = compiled(*args, **kwargs)
    outputs = list(flatten(out, "out"))
    named_inputs = dict([*flatten(args, "args"), *flatten(kwargs, "kwargs")])
    state = dict([*module.named_parameters(), *module.named_buffers()])
    owners = {**{name: t for name, t in named_inputs.items() if isinstance(t, torch.Tensor)},
              **{f"state.{name}": t for name, t in state.items()}}
    snapshot = {f"alias/{name}": names for name, names in alias_map(outputs, owners).items()}
    extra = _backward(program, out, kwargs, call) if program.mode != "no_grad" else {}
    snapshot.update({f"output/{name}": _snapshot(value) for name, value in outputs})
    snapshot.update({f"output/{name}": value for name, value in extra.items()})  # a loss computed outside
    snapshot.update({f"input/{name}": _snapshot(value) for name, value in named_inputs.items()})
    snapshot.update({f"input_grad/{name}": _snapshot(value.grad) for name, value in named_inputs.items()
                     if isinstance(value, torch.Tensor) and value.requires_grad})
    snapshot.update({f"grad/{name}": _snapshot(p.grad) for name, p in module.named_parameters()})
    snapshot.update({f"state/{name}": _snapshot(t) for name, t in state.items()})
    return snapshot


def _observe(program: Program, module: torch.nn.Module, inputs: tuple[tuple, dict], backend: Any,
             calls: int) -> Observed:
    """Compile `module` with `backend` (None: run it eagerly) and call it `calls` times."""
    torch._dynamo.reset()
    compiled = module if backend is None else torch.compile(module, backend=backend, fullgraph=False, dynamic=False)
    return [_one_call(program, compiled, module, inputs, call) for call in range(calls)]


# --- comparing -------------------------------------------------------------------------------


def compare_values(name: str, got: Any, want: Any) -> ItemDiff:
    """Compare one leaf: float tensors within ATOL + RTOL·|want|, everything else exactly."""
    if got is None or want is None or isinstance(got, torch.Tensor) != isinstance(want, torch.Tensor):
        ok = got is None and want is None
        return ItemDiff(name, ok, note="" if ok else f"seqweave {_kind(got)}, aot_eager {_kind(want)}")
    if not isinstance(got, torch.Tensor):
        ok = got == want or (isinstance(got, float) and abs(got - want) <= ATOL + RTOL * abs(want))
        return ItemDiff(name, bool(ok), note="" if ok else f"seqweave {_kind(got)}, aot_eager {_kind(want)}")
    if got.shape != want.shape or got.dtype != want.dtype:
        return ItemDiff(name, False, note=f"seqweave {_kind(got)}, aot_eager {_kind(want)}")
    return _compare_tensors(name, got, want)


def _compare_tensors(name: str, got: torch.Tensor, want: torch.Tensor) -> ItemDiff:
    if got.numel() == 0:
        return ItemDiff(name, True)
    if not got.is_floating_point():
        same = torch.equal(got, want)
        diff = float((got != want).any()) if got.dtype == torch.bool else float((got.long() - want.long()).abs().max())
        return ItemDiff(name, same, diff, "" if same else "integers differ")
    ok = bool(torch.isclose(got, want, rtol=RTOL, atol=ATOL, equal_nan=True).all())
    finite = torch.isfinite(got) & torch.isfinite(want)
    diff = float((got - want)[finite].abs().max()) if finite.any() else 0.0
    specials = lambda t: t[~finite].nan_to_num(nan=0.0, posinf=1.0, neginf=-1.0)  # noqa: E731
    return ItemDiff(name, ok, diff, "" if torch.equal(specials(got), specials(want)) else "non-finite values differ")


def _kind(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor{tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    if isinstance(value, frozenset):
        return f"aliases {sorted(value)}" if value else "aliases nothing"
    return repr(value) if isinstance(value, (bool, int, float, str)) else type(value).__name__


def compare_observed(got: Observed, want: Observed, truth: Observed | None = None) -> list[ItemDiff]:
    """Item-by-item comparison of `got` (seqweave) with `want` (aot_eager); a name present on one
    side only is a mismatch. Where `want` itself differs from `truth` (eager) and `got` matches
    `truth`, the reference is wrong, not seqweave: the item passes with a note saying so."""
    items = []
    for call, (mine, theirs) in enumerate(zip(got, want)):
        for name in sorted(set(mine) | set(theirs)):
            label = f"call{call}/{name}"
            if name not in mine or name not in theirs:
                items.append(ItemDiff(label, False, note=f"only in {'aot_eager' if name in theirs else 'seqweave'}"))
                continue
            item = compare_values(label, mine[name], theirs[name])
            if not item.ok and truth is not None and name in truth[call]:
                item = _arbitrate(item, mine[name], theirs[name], truth[call][name])
            items.append(item)
    return items


def _arbitrate(item: ItemDiff, got: Any, want: Any, truth: Any) -> ItemDiff:
    """A seqweave/aot_eager difference where eager sides with seqweave is aot_eager's bug."""
    reference = compare_values(item.name, want, truth)
    if reference.ok or not compare_values(item.name, got, truth).ok:
        return item
    note = f"{REFERENCE_WRONG}: aot_eager differs from eager by {reference.max_abs:.3g}; seqweave matches eager"
    return ItemDiff(item.name, True, item.max_abs, note)


# --- the check -------------------------------------------------------------------------------


def _describe(error: BaseException) -> str:
    """`Type: message`, the innermost seqweave frame, and the wrapped exception's type if any."""
    inner = getattr(error, "inner_exception", None) or error.__cause__
    frames = traceback.extract_tb((inner or error).__traceback__)
    ours = [frame for frame in frames if "/seqweave/" in frame.filename]
    where = f" [at {'/'.join(ours[-1].filename.split('/')[-2:])}:{ours[-1].lineno}]" if ours else ""
    wrapped = f" (wrapping {type(inner).__name__})" if inner is not None else ""
    first_lines = " | ".join(str(error).strip().splitlines()[:3])[:600]
    return f"{type(error).__name__}{wrapped}: {first_lines}{where}"


def _timed(run: Callable[[], Observed], seconds: dict[str, float], label: str) -> Observed:
    start = time.perf_counter()
    try:
        return run()
    finally:
        seconds[label] = round(time.perf_counter() - start, 3)


def _attentions(backend: Callable) -> int:
    """What the backend replaced by its attention op, when it is seqweave's (else 0)."""
    inner = getattr(backend, "inner", None)
    return inner.attention_count("forward") if hasattr(inner, "attention_count") else 0


def _counted(backend: Any, graphs: list[int]) -> Callable:
    """`backend`, appending to `graphs` each time it compiles a dynamo graph (a program that
    dynamo only ever runs eagerly would otherwise "match" without seqweave running anything)."""
    def counted_backend(gm: torch.fx.GraphModule, example_inputs: Any) -> Callable:
        compiled = backend(gm, example_inputs)
        graphs.append(len(gm.graph.nodes))
        return compiled
    counted_backend.inner = backend  # type: ignore[attr-defined]
    return counted_backend


def _default_backend() -> Any:
    from seqweave.compiler import SeqweaveBackend  # imports torch's compiler stack lazily
    return SeqweaveBackend()


def _references(program: Program, module: torch.nn.Module, inputs: tuple[tuple, dict], calls: int,
                seconds: dict[str, float]) -> tuple[Observed, Observed]:
    """(aot_eager's run, eager's run) of fresh copies of `module`."""
    want = _timed(lambda: _observe(program, copy.deepcopy(module), inputs, REFERENCE, calls), seconds, REFERENCE)
    truth = _timed(lambda: _observe(program, copy.deepcopy(module), inputs, None, calls), seconds, "eager")
    return want, truth


def run_differential(program: Program, calls: int = 2,
                     make_backend: Callable[[], Any] = _default_backend) -> DiffResult:
    """Run `program` through `make_backend()` (seqweave by default) and through aot_eager, and
    compare outputs, gradients, buffers, inputs and aliasing after each of `calls` calls.
    Eager runs too, only to arbitrate where aot_eager itself is wrong (see `compare_observed`)."""
    module, args, kwargs = build(program)
    seconds: dict[str, float] = {}
    with torch.random.fork_rng():
        try:
            want, truth = _references(program, module, (args, kwargs), calls, seconds)
        except Exception as error:  # noqa: BLE001 - the zoo program itself is broken
            torch._dynamo.reset()
            return DiffResult(program.name, REFERENCE_ERROR, exception=_describe(error), seconds=seconds)
        graphs: list[int] = []  # one entry per dynamo graph handed to the backend
        try:
            backend = _counted(make_backend(), graphs)
            got = _timed(lambda: _observe(program, copy.deepcopy(module), (args, kwargs), backend, calls),
                         seconds, "seqweave")
        except Exception as error:  # noqa: BLE001 - classified: a SeqweaveError is a refusal
            refusal = find_seqweave_error(error)
            return DiffResult(program.name, REFUSED if refusal else ERROR, exception=_describe(error),
                              refusal=str(refusal) if refusal else "", seconds=seconds, graphs=len(graphs))
        finally:
            torch._dynamo.reset()
    items = tuple(compare_observed(got, want, truth))
    return DiffResult(program.name, MATCH if all(item.ok for item in items) else MISMATCH, items, seconds=seconds,
                      graphs=len(graphs), attentions=_attentions(backend))
