"""Compile generated attention kernels for a GPU architecture on a machine without one.

Triton's compiler runs its whole pipeline (TTIR → TTGIR → LLVM → PTX → cubin via the bundled
ptxas) from a target description, so a CPU machine can prove that a KernelSpec's kernels
compile for sm_80 / sm_90 and report their shared memory: the interpreter accepts code the
real compiler rejects (dtype mixes, non-constexpr block shapes), and this catches it before a
GPU session does. Needs Triton's interpreter off in this process.
"""
from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from seqweave.codegen.cache import KernelCache
from seqweave.codegen.triton.attention_template import attention_source, operand_names
from seqweave.codegen.triton.jit import interpreter_active
from seqweave.codegen.triton.specs import KernelSpec, LaunchKnobs, kernel_constants
from seqweave.ir.mask_parser import parse_mask

TRITON_TYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
FLOAT32_POINTERS = ("Lse", "Delta")
INT32_POINTERS = ("Counts", "Indices", "Visits")
INPUT_POINTERS = ("Q", "K", "V", "Out", "DOut", "DQ", "DK", "DV")
KERNELS = ("attention_forward", "attention_backward_preprocess", "attention_backward_dkdv", "attention_backward_dq")


@dataclass(frozen=True)
class CompiledKernel:
    """What one offline compile produced."""

    name: str
    arch: int
    shared_bytes: int
    registers: int  # per thread, from ptxas -v
    spill_bytes: int  # spill stores + loads: nonzero means the tile is too big for the registers


def _ptxas_report(ptx: str, arch: int) -> tuple[int, int]:
    """(registers per thread, spilled bytes) from Triton's bundled ptxas run verbosely on `ptx`."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "kernel.ptx"
        source.write_text(ptx)
        command = [get_ptxas(arch).path, "-v", f"--gpu-name={sm_arch_from_capability(arch)}", str(source),
                   "-o", str(source.with_suffix(".cubin"))]
        log = subprocess.run(command, check=True, capture_output=True, text=True).stderr
    registers = [int(n) for n in re.findall(r"Used (\d+) registers", log)]
    spills = [int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)]
    return max(registers, default=0), sum(spills)


def _argument_type(name: str, spec: KernelSpec, operands: set[str]) -> str:
    if name in INPUT_POINTERS:
        return "*" + TRITON_TYPES[spec.dtype]
    if name in FLOAT32_POINTERS:
        return "*fp32"
    if name in INT32_POINTERS or name in operands:
        return "*i32"  # mask operands are passed as int32 (see attention._operand_arguments)
    return "fp32" if name == "sm_scale" else "i32"


def compile_kernel(function, name: str, spec: KernelSpec, knobs: LaunchKnobs, arch: int) -> CompiledKernel:
    """Compile one jit function of the spec's module for `arch` (e.g. 90) and summarise it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(function.arg_names)
    constants = {n: v for n, v in kernel_constants(spec, knobs).items() if n in names}
    operands = {n for n in operand_names(parse_mask(spec.mask)) if not n.startswith("stride_")}
    signature = {n: "constexpr" if n in constants else _argument_type(n, spec, operands) for n in names}
    source = ASTSource(function, signature, constexprs={(names.index(n),): v for n, v in constants.items()})
    options = dict(num_warps=knobs.num_warps)
    if "preprocess" not in name:  # as attention._delta launches it: Triton's default stages
        options["num_stages"] = knobs.num_stages
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    registers, spills = _ptxas_report(compiled.asm["ptx"], arch)
    return CompiledKernel(name, arch, int(compiled.metadata.shared), registers, spills)


def compile_spec(spec: KernelSpec, arch: int, cache: KernelCache | None = None) -> list[CompiledKernel]:
    """Compile every kernel of `spec` for `arch` without a GPU."""
    if interpreter_active():
        raise RuntimeError("offline compilation needs Triton's interpreter off: unset TRITON_INTERPRET and "
                           "SEQWEAVE_TRITON_INTERPRET before starting Python")
    import triton
    module = (cache or KernelCache()).load(attention_source(spec), f"offline-sm{arch}", {"jit": triton.jit})
    return [compile_kernel(getattr(module, name), name, spec, spec.backward if "backward" in name else spec.forward,
                           arch) for name in KERNELS]


def spec_for(mask: str, score_mod: str, head_dim: int, dtype: torch.dtype, group: int) -> KernelSpec:
    """The GPU spec seqweave would pick for attention with these properties."""
    from seqweave.codegen.triton.specs import make_spec
    from seqweave.ir.mask_parser import parse_score_mod

    q = torch.empty(1, group, 1, head_dim, dtype=dtype, device="meta")
    k = torch.empty(1, 1, 1, head_dim, dtype=dtype, device="meta")
    return make_spec(q, k, k, parse_mask(mask), parse_score_mod(score_mod), interpret=False)


LINEAR_INPUTS = ("Q", "K", "V", "O", "DO", "DVOUT")  # in the input dtype; other pointers are fp32
LINEAR_KERNELS = ("forward", "dq", "dkv")


def _linear_signature(function, dtype: str, constants: dict[str, object]) -> dict[str, str]:
    def kind(name: str) -> str:
        if name in constants:
            return "constexpr"
        if name.startswith("stride_") or name in ("H", "N", "D", "DV"):
            return "i32"
        return "*" + (TRITON_TYPES[dtype] if name in LINEAR_INPUTS else "fp32")
    return {name: kind(name) for name in function.arg_names}


def compile_linear_attention(dtype: torch.dtype, head_dim: int, arch: int) -> list[CompiledKernel]:
    """Compile the chunked linear-attention kernels (decay, initial state, final-state gradient) for `arch`."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from seqweave.codegen.triton import linear_attention

    probe = torch.empty(1, 1, 1, head_dim, dtype=dtype, device="meta")
    launch = linear_attention._launch_config(probe, probe, None, None)
    kernels = linear_attention._kernels(False)
    results = []
    for name in LINEAR_KERNELS:
        function = getattr(kernels, name)
        constants = {**{k: v for k, v in launch.constants().items() if k != "num_warps"},
                     "HAS_INITIAL_STATE": True, "HAS_FINAL_GRAD": True}
        constants = {k: v for k, v in constants.items() if k in function.arg_names}
        signature = _linear_signature(function, str(dtype).removeprefix("torch."), constants)
        names = list(function.arg_names)
        source = ASTSource(function, signature, constexprs={(names.index(k),): v for k, v in constants.items()})
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=launch.num_warps))
        registers, spills = _ptxas_report(compiled.asm["ptx"], arch)
        results.append(CompiledKernel(f"linear_attention_{name}", arch, int(compiled.metadata.shared), registers, spills))
    return results
