"""The pass manager: pipeline strings, verification after each pass, dumps and provenance notes."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from seqweave.errors import OptionError, PassError
from seqweave.ir.graph import Graph
from seqweave.ir.parser import parse_graph
from seqweave.ir.printer import print_graph
from seqweave.ir.types import TensorType
from seqweave.ir.verifier import VerificationError, verify
from seqweave.passes import manager
from seqweave.passes.base import Pass, PassResult
from seqweave.passes.canonicalize import Canonicalize
from seqweave.passes.manager import parse_pipeline, run_pipeline

GRAPH = """\
graph g(%x: f32[2, 8], %y: f32[2, 8]) {
  %c = core.clone(%x) : f32[2, 8]
  %a = core.add.Tensor(%c, %y) : f32[2, 8]
  %dead = core.neg(%a) : f32[2, 8]
  %m = core.mul.Tensor(%a, %a) : f32[2, 8]
  return (%m,)
}
"""
NOTE = re.compile(r"after canonicalize: (\d+) rewrites, \d+\.\d ms")


@dataclass(frozen=True)
class Scaled(Pass):
    """A do-nothing pass with one option of each kind the pipeline syntax can spell."""

    name = "scaled"
    factor: int = 1
    ratio: float = 0.5
    label: str = ""
    strict: bool = False

    def run(self, graph: Graph) -> PassResult:
        return PassResult(0)


@dataclass(frozen=True)
class CorruptType(Pass):
    """A broken pass: records f16 for a result the op computes in f32."""

    name = "corrupt-type"

    def run(self, graph: Graph) -> PassResult:
        value = graph.nodes[0].results[0]
        value.type = TensorType(value.type.shape, torch.float16)
        return PassResult(1)


@pytest.fixture
def extra_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Register the test passes beside the real ones for one test."""
    monkeypatch.setitem(manager.PASSES, Scaled.name, Scaled)
    monkeypatch.setitem(manager.PASSES, CorruptType.name, CorruptType)


# ------------------------------------------------------------------ pipeline strings


@pytest.mark.parametrize("text, count", [
    ("canonicalize", 1),
    ("canonicalize,canonicalize", 2),
    (" canonicalize , canonicalize{} ", 2),
    ("", 0),
])
def test_parse_pipeline(text: str, count: int) -> None:
    assert parse_pipeline(text) == [Canonicalize()] * count


def test_options_of_every_kind(extra_passes: None) -> None:
    passes = parse_pipeline("scaled{factor=3, ratio = 0.25,label=abc, strict=true},canonicalize,scaled")
    assert passes == [Scaled(factor=3, ratio=0.25, label="abc", strict=True), Canonicalize(), Scaled()]


def test_unknown_pass_lists_the_known_ones(extra_passes: None) -> None:
    with pytest.raises(OptionError) as caught:
        parse_pipeline("canonicalize,canonicalise")
    assert "'canonicalise'" in str(caught.value)
    # every registered pass, sorted (other tests may have registered theirs: the registry is per process)
    listed = caught.value.hint.split("known passes: ", 1)[1]
    names = [name.strip(" '[]") for name in listed.split(",")]
    assert names == sorted(names)
    assert {"activation-memory", "canonicalize", "corrupt-type", "double-sparsity", "lm-infinite", "mixed-spans",
            "rope-fp32", "rope-scale", "scaled", "shard-sequence", "streaming"} <= set(names)


@pytest.mark.parametrize("text, unknown", [("canonicalize{foo=1}", "foo"), ("scaled{factor=2, colour=red}", "colour")])
def test_unknown_option_names_the_pass_and_the_option(extra_passes: None, text: str, unknown: str) -> None:
    with pytest.raises(OptionError) as caught:
        parse_pipeline(text)
    name = text.split("{")[0]
    assert f"pass {name} has no option(s) ['{unknown}']" in str(caught.value)


def test_option_without_a_value_is_an_option_error(extra_passes: None) -> None:
    with pytest.raises(OptionError, match="'strict' of pass scaled has no value"):
        parse_pipeline("scaled{strict}")


def test_unknown_pass_fails_before_any_pass_runs() -> None:
    graph = parse_graph(GRAPH)
    with pytest.raises(OptionError):
        run_pipeline(graph, "canonicalize,nope")
    assert print_graph(graph) == GRAPH


# ------------------------------------------------------------------ verification after each pass


def test_verification_catches_a_broken_pass_and_names_it(extra_passes: None) -> None:
    graph = parse_graph(GRAPH)
    with pytest.raises(PassError) as caught:
        run_pipeline(graph, "canonicalize,corrupt-type,canonicalize")
    error = caught.value
    assert error.pass_name == "corrupt-type"
    assert "[pass corrupt-type]" in str(error)
    assert "%a" in str(error) and "f16" in str(error) and "f32" in str(error)
    assert isinstance(error.__cause__, VerificationError)
    assert len(graph.notes) == 2, "canonicalize and the broken pass ran; the second canonicalize did not"


def test_without_check_the_broken_graph_gets_through(extra_passes: None) -> None:
    graph = parse_graph(GRAPH)
    runs = run_pipeline(graph, "corrupt-type", check=False)
    assert [run.name for run in runs] == ["corrupt-type"]
    with pytest.raises(VerificationError):
        verify(graph)


# ------------------------------------------------------------------ dumps and notes


def test_notes_record_each_pass_and_its_rewrites() -> None:
    graph = parse_graph(GRAPH)
    runs = run_pipeline(graph, "canonicalize,canonicalize")
    assert [run.result.rewrites for run in runs] == [2, 0]  # clone folded, neg dead; then nothing
    assert [int(NOTE.fullmatch(note).group(1)) for note in graph.notes] == [2, 0]
    assert [note.endswith(f"{run.millis:.1f} ms") for note, run in zip(graph.notes, runs)] == [True, True]


def test_dump_dir_gets_the_input_and_one_file_per_pass(tmp_path: Path) -> None:
    graph = parse_graph(GRAPH)
    run_pipeline(graph, "canonicalize,canonicalize", dump_dir=str(tmp_path))
    names = sorted(path.name for path in tmp_path.iterdir())
    assert names == ["g.00.input.ir", "g.01.canonicalize.ir", "g.02.canonicalize.ir"]
    assert (tmp_path / "g.00.input.ir").read_text() == GRAPH
    first = parse_graph((tmp_path / "g.01.canonicalize.ir").read_text())
    assert len(first.notes) == 1 and NOTE.fullmatch(first.notes[0])
    assert [node.op for node in first.nodes] == ["core.add.Tensor", "core.mul.Tensor"]
    assert (tmp_path / "g.02.canonicalize.ir").read_text() == print_graph(graph)


def test_dump_dir_is_created_when_missing(tmp_path: Path) -> None:
    target = tmp_path / "nested" / "dumps"
    run_pipeline(parse_graph(GRAPH), "canonicalize", dump_dir=str(target))
    assert sorted(path.name for path in target.iterdir()) == ["g.00.input.ir", "g.01.canonicalize.ir"]


@dataclass(frozen=True)
class _Warns(Pass):
    name = "warns"

    def run(self, graph: Graph) -> PassResult:
        return PassResult(0, "nothing", ("look here",))


@pytest.mark.parametrize("log_warnings", [True, False])
def test_warnings_are_logged_unless_asked_not_to_and_kept_either_way(caplog, log_warnings):
    """Sequence-parallel ranks compile the same graph: only rank 0 logs its warnings."""
    with caplog.at_level("WARNING"):
        runs = run_pipeline(parse_graph(GRAPH), [_Warns()], log_warnings=log_warnings)
    assert runs[0].result.warnings == ("look here",)
    assert ("warns: look here" in caplog.text) == log_warnings
