"""Generated kernels compile for real GPU architectures on this CPU-only machine.

The interpreter accepts code Triton's GPU compiler rejects, so this compiles a spec's four
kernels through the whole pipeline (down to a cubin, with the bundled ptxas) for sm_80 and
sm_90, in a subprocess with the interpreter off, through `seqweave kernels --compile`.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

KERNELS = ("attention_forward", "attention_backward_preprocess", "attention_backward_dkdv", "attention_backward_dq")


def kernels_command(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SEQWEAVE_TRITON_INTERPRET")}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    return subprocess.run([sys.executable, "-m", "seqweave.cli", "kernels", *args], capture_output=True, text=True,
                          env=env, timeout=600)


@pytest.mark.slow
def test_document_softcap_gqa_kernels_compile_for_sm80_and_sm90():
    result = kernels_command("--mask", "causal & (sliding_window(255, 0) | sinks(4)) & document($0)",
                             "--score-mod", "softcap(30.0)", "--head-dim", "64", "--dtype", "bfloat16",
                             "--group", "2", "--compile", "80", "--compile", "90")
    assert result.returncode == 0, result.stderr[-3000:]
    for kernel in KERNELS:
        assert result.stdout.count(kernel) == 2, result.stdout  # one row per architecture
    assert "sm_80" in result.stdout and "sm_90" in result.stdout


def test_offline_compile_refuses_to_run_under_the_interpreter():
    result = subprocess.run([sys.executable, "-m", "seqweave.cli", "kernels", "--compile", "90"], capture_output=True,
                            text=True, env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=300)
    assert result.returncode == 2
    assert "unset TRITON_INTERPRET" in " ".join(result.stderr.split())  # rich wraps long lines


@pytest.mark.slow
def test_linear_attention_kernels_compile_for_sm90_without_spills_at_d64():
    script = ("import torch\n"
              "from seqweave.codegen.triton.offline import compile_linear_attention\n"
              "for r in compile_linear_attention(torch.bfloat16, 64, 90): print(r.name, r.spill_bytes)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SEQWEAVE_TRITON_INTERPRET")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env={**env, "TRITON_DEFAULT_FP_FUSION": "1"}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    spills = dict(line.split() for line in result.stdout.splitlines())
    assert set(spills) == {"linear_attention_forward", "linear_attention_dq", "linear_attention_dkv"}
    assert spills["linear_attention_forward"] == "0" and spills["linear_attention_dq"] == "0", spills
