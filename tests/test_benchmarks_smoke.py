"""The benchmark scripts run end to end: attention_gpu.py --smoke (CPU, Triton's interpreter, tiny shapes) and
generate_cpu.py at a few tokens."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")  # the smoke run launches the Triton kernels under the interpreter

REPO = Path(__file__).resolve().parents[1]
SMOKE_TIMEOUT_S = 120  # about 20 s on two idle cores; room for a loaded CI machine
ROW_KEYS = {"mask", "d", "n", "batch", "heads", "pairs", "flops_fwd", "ms", "tflops", "speedup_vs_sdpa", "notes"}


def test_attention_gpu_smoke_writes_every_config(tmp_path: Path) -> None:
    out = tmp_path / "attention_gpu.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "attention_gpu.py"), "--smoke", "--out", str(out)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=SMOKE_TIMEOUT_S)
    assert run.returncode == 0, f"exit {run.returncode}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    payload = json.loads(out.read_text())
    assert {"command", "machine", "settings", "rows", "targets", "skipped"} <= payload.keys()
    assert payload["machine"]["device"] and payload["settings"]["flop_convention"]
    rows = payload["rows"]
    assert {(r["mask"], r["n"]) for r in rows} == {(m, n) for m in ("causal", "sliding_window", "documents")
                                                   for n in payload["settings"]["lengths"]}
    for row in rows:
        assert ROW_KEYS <= row.keys() and not row["failed"], row
        assert {"fwd", "fwd_bwd"} <= row["ms"]["seqweave"].keys() and "sdpa_flash" in row["ms"], row
    checked = [r for r in rows if "numerics" in r]
    assert len(checked) == 3 and all(r["pairs_dense"] == r["pairs"] for r in checked)
    assert all(max(r["numerics"]["seqweave"].values()) < 1e-4 for r in checked)  # fp32 vs fp32 math SDPA


def test_generate_cpu_smoke_compares_tokens_with_eager(tmp_path: Path) -> None:
    out = tmp_path / "generate_cpu.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, str(REPO / "benchmarks" / "generate_cpu.py"), "--models", "llama-tiny", "--layers", "1",
               "--new-tokens", "3", "--repeats", "1", "--out", str(out)]
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=SMOKE_TIMEOUT_S)
    assert run.returncode == 0, f"exit {run.returncode}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    rows = json.loads(out.read_text())["rows"]
    assert [r["backend"] for r in rows] == ["eager", "aot_eager", "seqweave"]
    assert all(r["same_tokens"] for r in rows) and rows[2]["graphs"] == 2  # prefill and decode


def test_streaming_smoke_keeps_rolling_caches_flat(tmp_path: Path) -> None:
    out = tmp_path / "streaming.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, str(REPO / "benchmarks" / "streaming.py"), "--window", "8", "--factor", "2",
               "--prompt", "6", "--tokens", "4", "--layers", "1", "--out", str(out)]
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=SMOKE_TIMEOUT_S)
    assert run.returncode == 0, f"exit {run.returncode}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["dense", "streaming", "lm-infinite", "double-sparsity"]
    assert rows["dense"]["cache_bytes"]["2x"] > rows["dense"]["cache_bytes"]["1x"]  # the dense cache grows
    assert len(set(rows["streaming"]["cache_bytes"].values())) == 1  # the rolling one does not
    assert 0 < rows["double-sparsity"]["recall"] <= 1 and 0 < rows["double-sparsity"]["kv_read_fraction"] < 1


def test_property_testing_benchmark_checks_every_pipeline(tmp_path: Path) -> None:
    out = tmp_path / "property_testing.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, str(REPO / "benchmarks" / "property_testing.py"), "--programs", "3", "--out", str(out)]
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=SMOKE_TIMEOUT_S)
    assert run.returncode == 0, f"exit {run.returncode}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    payload = json.loads(out.read_text())
    assert [r["pipeline"].split("{")[0] for r in payload["rows"]][:2] == ["canonicalize", "shard-sequence"]
    assert all(r["checked"] == 3 and r["failed"] == 0 for r in payload["rows"])
    assert payload["schedule"]["programs"] == 3 and payload["schedule"]["schedule_check_s"] > 0


def test_step_smoke_checks_every_loss_against_eager(tmp_path: Path) -> None:
    """step.py at 64 tokens, 1 layer, without the rows that compile with Inductor (a minute each here)."""
    out = tmp_path / "step.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, str(REPO / "benchmarks" / "step.py"), "--lengths", "64", "--layers", "1", "--steps", "1",
               "--rows", "eager,seqweave eager", "--ranks", "2", "--out", str(out)]
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=SMOKE_TIMEOUT_S)
    assert run.returncode == 0, f"exit {run.returncode}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    payload = json.loads(out.read_text())
    rows = {r["row"]: r for r in payload["rows"]}
    assert list(rows) == ["eager", "seqweave eager", "seqweave eager, 2 ranks"] and not payload["failures"]
    assert all(r["loss_rel_err"] <= payload["settings"]["rtol"] for r in rows.values())
    assert rows["seqweave eager"]["runners"] == ["forward:eager", "backward:eager"]
    ranked = rows["seqweave eager, 2 ranks"]
    assert len(ranked["step_s_per_rank"]) == 2 and ranked["bytes_sent_per_step"] > 0 and ranked["comm_s"] > 0
