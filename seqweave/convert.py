"""`seqweave convert`: run a pipeline on an IR text file and write the result, whole or not at all.

The input is what `SEQWEAVE_DUMP=dir` and `seqweave fuzz` write; passes are found by name in the
registry, so a pass a package registers under the `seqweave.passes` entry-point group runs here
as it does in `backend(pipeline=...)`.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

from seqweave.errors import PassError, SeqweaveError
from seqweave.ir.ops import VerificationError
from seqweave.ir.parser import ParseError, parse_graph
from seqweave.ir.printer import print_graph
from seqweave.ir.verifier import verify
from seqweave.passes.manager import PassRun, parse_pipeline, run_pipeline


def convert(input_path: str | os.PathLike, output_path: str | os.PathLike, pipeline: str, *,
            verify: bool = True, echo: Callable[[str], object] = print) -> list[PassRun]:
    """Read `input_path`, run `pipeline` (verifying after every pass when `verify`), write the IR
    text to `output_path` atomically; `echo` gets one progress line per pass."""
    passes = parse_pipeline(pipeline)  # a bad pipeline fails before anything is read or written
    graph = _read(Path(input_path), check=verify)
    runs: list[PassRun] = []
    for index, pass_ in enumerate(passes, start=1):
        (run,) = run_pipeline(graph, [pass_], check=verify)
        runs.append(run)
        echo(f"[{index}/{len(passes)}] {run.name}: {run.result.rewrites} rewrites, {run.millis:.1f} ms"
             + (f" ({run.result.detail})" if run.result.detail else ""))
    _write_atomically(Path(output_path), print_graph(graph))
    return runs


def _read(path: Path, *, check: bool):
    try:
        graph = parse_graph(path.read_text())
    except ParseError as error:
        raise SeqweaveError(f"{path} is not IR text: {error}",
                            hint="give a file written by SEQWEAVE_DUMP=dir or `seqweave fuzz`") from error
    if check:
        try:
            verify(graph)
        except VerificationError as error:
            raise PassError(f"the input {path} does not verify: {error}", pass_name="(input)",
                            hint="fix the input program, or convert with --no-verify to run the passes anyway"
                            ) from error
    return graph


def _write_atomically(path: Path, text: str) -> None:
    """A temporary file beside the target, renamed over it: a reader never sees half a program."""
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, prefix=f".{path.name}.",
                                     suffix=".tmp") as handle:
        temporary = handle.name
        try:
            handle.write(text)
        except BaseException:
            handle.close()
            os.unlink(temporary)
            raise
    os.replace(temporary, path)
