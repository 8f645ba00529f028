"""The `seqweave` command: explain's per-layer table and JSON, clear errors, the demo table, and `run`."""
import json
import time

import pytest
import sympy
from typer.testing import CliRunner

from seqweave.cli import app

runner = CliRunner()


def _explain_json(*args):
    result = runner.invoke(app, ["explain", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_explain_mistral_shows_sliding_window_and_padding():
    report = _explain_json("mistral-tiny", "--seq-len", "32", "--padded")
    assert [layer["mask"] for layer in report["layers"]] == ["causal & sliding_window(7, 0) & padding($0)"] * 2
    assert all(layer["q_heads"] == 4 and layer["kv_heads"] == 2 for layer in report["layers"])
    assert report["totals"]["attn.sdpa"] == 2


def test_explain_32_layer_llama_reports_32_attentions():
    report = _explain_json("llama-tiny", "--layers", "32", "--hidden", "256", "--seq-len", "32")
    assert report["totals"]["attention_found"] == 32
    assert report["totals"]["attn.sdpa"] == 32
    assert [layer["layer"] for layer in report["layers"]][-1] == "model.layers.31.self_attn"


def _module_target(tmp_path, monkeypatch, module: str, sample: str) -> str:
    """A `module:build` target on the path, returning the built-in sample `SampleSpec(<sample>)`."""
    (tmp_path / f"{module}.py").write_text(
        "from seqweave.testing.models import SampleSpec, build_sample\n"
        "def build():\n"
        f"    return build_sample(SampleSpec({sample}))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return f"{module}:build"


def test_explain_accepts_a_module_function_target(tmp_path, monkeypatch):
    target = _module_target(tmp_path, monkeypatch, "my_target", "'gpt2-tiny', seq_len=16, layers=1, packed=True")
    report = _explain_json(target)
    assert [layer["mask"] for layer in report["layers"]] == ["causal & document($0)"]


def test_explain_table_names_the_layers():
    result = runner.invoke(app, ["explain", "gpt2-tiny", "--seq-len", "16"])
    assert result.exit_code == 0, result.output
    assert "transformer.h.1.attn" in result.stdout and "causal" in result.stdout


@pytest.mark.parametrize("target, message", [
    ("no-such-model", "built-in sample"),
    ("no_such_module_xyz:build", "cannot import"),
    ("json:loads_nothing", "has no function"),
])
def test_explain_bad_target_says_what_to_do(target, message):
    result = runner.invoke(app, ["explain", target])
    assert result.exit_code == 2
    assert message in result.output and "what to do" in result.output


@pytest.mark.slow
def test_demo_prints_a_passing_table():
    result = runner.invoke(app, ["demo", "--sp", "1"])
    assert result.exit_code == 0, result.output
    for name in ("llama-tiny", "qwen2-tiny", "mistral-tiny", "gpt2-tiny"):
        assert name in result.stdout
    assert "NO" not in result.stdout


def test_explain_sp_picks_a_halo_for_a_window_narrower_than_a_shard():
    # The halo is planned under the layout that will run: contiguous shards (zigzag ones are not adjacent).
    report = _explain_json("mistral-tiny", "--seq-len", "256", "--sp", "4", "--balance", "none")
    batch, seq, kv_heads, head_dim, fp32_bytes, world = 2, 256, 2, 16, 4, 4
    # Window 64 < shard 64+: each rank sends its K and V shard to the next rank once.
    one_hop = 2 * batch * (seq // world) * kv_heads * head_dim * fp32_bytes
    for layer in report["layers"]:
        assert layer["sp"]["strategy"] == "halo", layer["sp"]["why"]
        assert layer["sp"]["forward_bytes"] == one_hop


def test_explain_without_sp_has_no_strategy():
    report = _explain_json("llama-tiny", "--seq-len", "16")
    assert all("sp" not in layer for layer in report["layers"])


def _sp_row(label: str, grad_error: float, bytes_measured: int):
    from seqweave.demo_sp import SpRow
    return SpRow(label, "attn.ring", 1e-7, grad_error, bytes_measured, 4096, 1.0, 0.25)


def test_demo_sp_table_fails_the_command_when_a_row_fails(monkeypatch):
    """The table and exit status of `seqweave demo --sp`; the real multi-rank run is the README's
    first command (CI's main job), which exits 1 on any row that fails."""
    import seqweave.demo_sp as demo_sp

    monkeypatch.setattr(demo_sp, "run_demo", lambda world, seq_len: [_sp_row("ring (zigzag)", 1e-7, 4096)])
    passing = runner.invoke(app, ["demo", "--no-single", "--sp", "2", "--seq-len", "64"])
    assert passing.exit_code == 0 and "ring (zigzag)" in passing.stdout and "NO" not in passing.stdout
    for bad in (_sp_row("ulysses", 1e-3, 4096), _sp_row("ulysses", 1e-7, 4097)):  # gradient off; bytes off
        monkeypatch.setattr(demo_sp, "run_demo", lambda world, seq_len, bad=bad: [bad])
        failing = runner.invoke(app, ["demo", "--no-single", "--sp", "2", "--seq-len", "64"])
        assert failing.exit_code == 1 and "NO" in failing.stdout


def test_explain_memory_predicts_each_rank_as_bytes_of_n():
    report = _explain_json("llama-tiny", "--seq-len", "64", "--layers", "1", "--sp", "2", "--memory")
    memory = report["totals"]["memory"]
    n = sympy.Symbol("N")
    total = sympy.sympify(memory["total_bytes"], locals={"N": n})
    assert memory["world"] == 2 and sympy.degree(total, n) == 1, memory  # linear: no N² term
    assert memory["bytes_at_64"] > 0


def test_explain_memory_needs_a_built_in_sample(tmp_path, monkeypatch):
    target = _module_target(tmp_path, monkeypatch, "mem_target", "'gpt2-tiny', seq_len=16, layers=1")
    result = runner.invoke(app, ["explain", target, "--memory"])
    assert result.exit_code == 2 and "only built-in samples" in result.output


def _job(tmp_path, text: str) -> str:
    path = tmp_path / "job.py"
    path.write_text(text)
    return str(path)


def test_run_hands_the_script_everything_after_it(tmp_path):
    script = _job(tmp_path, "import os, sys\nprint(os.environ['WORLD_SIZE'], sys.argv[1:])\n")
    result = runner.invoke(app, ["run", "--nproc", "2", script, "--nproc", "5", "x"])  # the 2nd --nproc: the script's
    assert result.exit_code == 0, result.output
    printed = sorted(line for line in result.stdout.splitlines() if line.startswith("[rank "))
    assert printed == [f"[rank {rank}] 2 ['--nproc', '5', 'x']" for rank in range(2)]


def test_run_names_the_failed_rank_and_stops_the_others_at_once(tmp_path):
    script = _job(tmp_path, "import os, sys, time\nif os.environ['RANK'] == '1':\n    sys.exit(3)\ntime.sleep(600)\n")
    start = time.monotonic()
    result = runner.invoke(app, ["run", "--nproc", "2", script])
    assert time.monotonic() - start < 10  # rank 0 sleeps 600 s unless stopped
    assert result.exit_code == 3, result.output
    assert "rank 1 exited with status 3; the other ranks were stopped" in result.output


def test_run_refuses_no_ranks(tmp_path):
    result = runner.invoke(app, ["run", "--nproc", "0", _job(tmp_path, "")])
    assert result.exit_code == 2 and "--nproc must be at least 1" in result.output


def test_explain_budget_prints_the_plan_per_layer():
    from rich.console import Console

    from seqweave.cli import _memory_plan_table

    planned = _explain_json("llama-tiny", "--seq-len", "512", "--layers", "4", "--budget", "0.6")["totals"]["memory_plan"]
    totals = planned["totals"]
    assert totals["planned_peak_bytes"] <= totals["budget_bytes"] < totals["plan_free_peak_bytes"]
    assert sum(row["offload"] + row["offload-at-use"] + row["recompute"] for row in planned["layers"]) > 0
    console = Console(width=200, record=True)
    console.print(_memory_plan_table(planned))
    table = console.export_text()
    assert "activation memory per rank" in table and "model.layers.3" in table


def test_explain_budget_too_small_is_a_clear_error():
    result = runner.invoke(app, ["explain", "llama-tiny", "--seq-len", "256", "--budget", "1KB"])
    assert result.exit_code == 2 and "least peak any plan reaches" in result.output
