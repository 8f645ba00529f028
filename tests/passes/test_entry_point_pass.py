"""A pass from a user's own package, declared under the `seqweave.passes` entry-point group, runs
from `seqweave.backend(pipeline=...)`, from `seqweave.convert.convert` and from `seqweave convert`.

The package is written to a temporary directory with its `*.dist-info` (METADATA and
entry_points.txt), which importlib.metadata finds on sys.path as it finds an installed one.
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import seqweave
from seqweave.convert import convert
from seqweave.errors import OptionError
from seqweave.ir.parser import parse_graph
from seqweave.passes.manager import PASSES, parse_pipeline

PLUGIN = "sw_count_ops_plugin"
PLUGIN_SOURCE = '''
from dataclasses import dataclass

from seqweave.passes.base import Pass, PassResult

CALLS = []  # (graph name, how many nodes matched): what each run saw


@dataclass(frozen=True)
class CountOps(Pass):
    """Counts the nodes of one op and leaves the count in the graph's notes."""

    name = "count-ops"
    op: str = "attn.sdpa"
    limit: int = 100

    def run(self, graph):
        found = sum(node.op == self.op for node in graph.nodes)
        CALLS.append((graph.name, found))
        graph.notes.append(f"count-ops saw {found} {self.op}")
        return PassResult(0, f"{found} {self.op}")
'''
GRAPH = """\
graph g(%x: f32[2, 8], %y: f32[2, 8]) {
  %c = core.clone(%x) : f32[2, 8]
  %a = core.add.Tensor(%c, %y) : f32[2, 8]
  %n = core.neg(%a) : f32[2, 8]
  %m = core.mul.Tensor(%n, %n) : f32[2, 8]
  return (%m,)
}
"""


def _write_distribution(root: Path, name: str, entry_points: str, module: str = "") -> None:
    if module:
        (root / f"{PLUGIN}.py").write_text(module)
    info = root / f"{name}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[seqweave.passes]\n{entry_points}\n")


@pytest.fixture
def plugin_root(tmp_path, monkeypatch):
    """A directory on sys.path holding the plugin; the registry and sys.modules are cleaned after."""
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))  # also invalidates importlib's path caches
    yield root
    for name in ("count-ops", "broken-pass", "not-a-pass"):
        PASSES.pop(name, None)
    sys.modules.pop(PLUGIN, None)
    importlib.invalidate_caches()


@pytest.fixture
def count_ops(plugin_root):
    _write_distribution(plugin_root, "sw-count-ops", f"count-ops = {PLUGIN}:CountOps", PLUGIN_SOURCE)
    return plugin_root


def _calls() -> list:
    return sys.modules[PLUGIN].CALLS


def test_the_entry_point_loads_on_first_use_with_typed_options(count_ops):
    assert "count-ops" not in PASSES and PLUGIN not in sys.modules  # nothing imported before it is named
    (made,) = parse_pipeline("count-ops{op=core.neg, limit=3}")
    assert type(made).__module__ == PLUGIN and (made.op, made.limit) == ("core.neg", 3)
    with pytest.raises(OptionError, match="option limit='many' of pass count-ops: expected int"):
        parse_pipeline("count-ops{limit=many}")


def test_the_user_pass_runs_from_torch_compile(count_ops):
    def attend(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    q, k, v = (torch.randn(1, 2, 9, 4, dtype=torch.float64) for _ in range(3))
    backend = seqweave.backend(pipeline="canonicalize,count-ops{op=attn.sdpa}")
    out = torch.compile(attend, backend=backend, fullgraph=True, dynamic=False)(q, k, v)
    torch.testing.assert_close(out, attend(q, k, v))
    (compiled,) = backend.graphs
    assert [run.name for run in compiled.passes] == ["canonicalize", "count-ops"]
    assert compiled.passes[1].result.detail == "1 attn.sdpa"  # one attention in `attend`
    assert "count-ops saw 1 attn.sdpa" in compiled.graph.notes
    assert _calls() == [(compiled.kind, 1)]


def test_the_user_pass_runs_from_convert(count_ops, tmp_path):
    source, target = tmp_path / "in.ir", tmp_path / "out.ir"
    source.write_text(GRAPH)
    lines: list[str] = []
    runs = convert(source, target, "count-ops{op=core.neg},canonicalize", echo=lines.append)
    assert [run.name for run in runs] == ["count-ops", "canonicalize"]
    assert _calls() == [("g", 1)]
    assert len(lines) == 2 and lines[0].startswith("[1/2] count-ops: 0 rewrites") and "1 core.neg" in lines[0]
    written = parse_graph(target.read_text())
    assert "count-ops saw 1 core.neg" in written.notes
    assert [node.op for node in written.nodes] == ["core.add.Tensor", "core.neg", "core.mul.Tensor"]


def test_the_user_pass_runs_from_the_convert_command(count_ops, tmp_path):
    source, target = tmp_path / "in.ir", tmp_path / "out.ir"
    source.write_text(GRAPH)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(count_ops), *sys.path])}
    done = subprocess.run([sys.executable, "-m", "seqweave.cli", "convert", str(source), "-o", str(target),
                           "--pipeline", "count-ops{op=core.add.Tensor}"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "count-ops saw 1 core.add.Tensor" in parse_graph(target.read_text()).notes
    assert "count-ops" in done.stdout + done.stderr  # the progress line


def test_a_broken_entry_point_names_its_distribution(plugin_root):
    _write_distribution(plugin_root, "sw-broken", "broken-pass = sw_no_such_module:Pass")
    with pytest.raises(OptionError) as caught:
        parse_pipeline("canonicalize,broken-pass")
    assert "entry point broken-pass = 'sw_no_such_module:Pass' of sw-broken" in str(caught.value)
    assert "ModuleNotFoundError" in str(caught.value)


def test_an_entry_point_that_is_not_a_pass_is_refused(plugin_root):
    _write_distribution(plugin_root, "sw-not-a-pass", "not-a-pass = os.path:join")
    with pytest.raises(OptionError, match="not a Pass subclass"):
        parse_pipeline("not-a-pass")


def test_a_failed_convert_writes_nothing(tmp_path):
    source, target = tmp_path / "in.ir", tmp_path / "out" / "g.ir"
    target.parent.mkdir()
    source.write_text(GRAPH.replace(": f32[2, 8]\n  return", ": f16[2, 8]\n  return"))
    with pytest.raises(seqweave.SeqweaveError, match="does not verify"):
        convert(source, target, "canonicalize", echo=lambda line: None)
    assert list(target.parent.iterdir()) == []
    target.write_text("old")
    with pytest.raises(OptionError):
        convert(source, target, "canonicalize{limit=x}", echo=lambda line: None)
    assert target.read_text() == "old"
