"""Linear-attention kernels on a GPU: the generated Triton kernels (decay, GLA, delta rule)
against the chunked torch forms they replace, forward and forward+backward, with each one's
error against the float64 chunked form. Prepared for a session lent a GPU (gpu_check.sh runs it).

    python benchmarks/linear_attention_gpu.py                       # CUDA: bf16, N = 4k, 16k, 32k
    python benchmarks/linear_attention_gpu.py --smoke               # CPU, Triton interpreter, tiny
    python benchmarks/linear_attention_gpu.py --report benchmarks/results/linear_attention_gpu.json --markdown
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

import results_io

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results", "linear_attention_gpu.json")
LEFT_COLUMNS = ("recurrence",)
RECURRENCES = ("decay", "gla", "delta")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _problem(name: str, b: int, h: int, n: int, d: int, dtype: torch.dtype, device: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    q, k, v = rand(b, h, n, d) * d ** -0.5, rand(b, h, n, d), rand(b, h, n, d)
    if name == "delta":
        k = torch.nn.functional.normalize(k, dim=-1)
        gate = torch.rand(b, h, n, generator=gen)
    elif name == "gla":
        gate = torch.nn.functional.logsigmoid(rand(b, h, n, d)) / 16
    else:
        gate = torch.linspace(0.01, 0.5, h)
    tensors = [x.to(device) for x in (q, k, v)]
    return [x.to(dtype) for x in tensors], gate.to(device)


def _implementations(name: str):
    """(generated, chunked torch): each (q, k, v, gate) -> (o, final), differentiable."""
    from seqweave.codegen.triton import gated_linear_attention as gated
    from seqweave.codegen.triton import linear_attention as linear
    from seqweave.ir.ops.linear_recurrences import REFERENCE
    generated = {"decay": linear.linear_attention, "gla": gated.gla, "delta": gated.delta_rule}[name]
    return generated, REFERENCE[name].forward


def _time(fn, device: str, reps: int) -> float:
    times = []
    for _ in range(reps + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]) * 1e3


def _run(impl, q, k, v, gate, name: str, backward: bool):
    leaves = [x.detach().requires_grad_(backward) for x in (q, k, v)]
    g = gate.detach().requires_grad_(backward and name != "decay")
    o, _ = impl(*leaves, g, None)
    if backward:
        o.float().sum().backward()
    return o


def measure(name: str, n: int, args: argparse.Namespace) -> dict:
    (q, k, v), gate = _problem(name, args.batch, args.heads, n, args.head_dim, DTYPES[args.dtype], args.device)
    generated, chunked = _implementations(name)
    row = {"recurrence": name, "N": n, "ms": {}}
    for label, impl in (("generated", generated), ("chunked torch", chunked)):
        for mode, backward in (("fwd", False), ("fwd_bwd", True)):
            try:
                row["ms"][f"{label} {mode}"] = _time(lambda: _run(impl, q, k, v, gate, name, backward), args.device,
                                                     args.reps)
            except Exception as error:  # noqa: BLE001 - recorded in the row, the run goes on
                row["ms"][f"{label} {mode}"] = None
                row.setdefault("failures", []).append(f"{label} {mode}: {type(error).__name__}: {error}"[:300])
    exact = _run(chunked, *(x.double() for x in (q, k, v)), gate.double() if name != "decay" else gate, name, False)
    got = _run(generated, q, k, v, gate, name, False)
    row["error_vs_fp64"] = float((got.double() - exact).abs().max() / exact.abs().max())
    return row


def run(args: argparse.Namespace, argv: list[str]) -> dict:
    rows = []
    for name in RECURRENCES:
        for n in args.lengths:
            rows.append(measure(name, n, args))
            print(f"{name:>6} N={n:>6}: {rows[-1]['ms']}", file=sys.stderr)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (Triton interpreter)"
    return {"command": "python benchmarks/linear_attention_gpu.py " + " ".join(argv),
            "machine": {**results_io.machine_info(HERE), "torch": torch.__version__, "device": device},
            "settings": {k: getattr(args, k) for k in ("batch", "heads", "head_dim", "dtype", "lengths", "reps")},
            "rows": rows}


def render(payload: dict) -> list[results_io.TableData]:
    modes = ("generated fwd", "chunked torch fwd", "generated fwd_bwd", "chunked torch fwd_bwd")
    header = ["recurrence", "N", *(f"{m} ms" for m in modes), "fwd speed-up", "error vs fp64"]
    body = []
    for r in payload["rows"]:
        ms = r["ms"]
        speed = "-" if not ms.get("generated fwd") or not ms.get("chunked torch fwd") else \
            f"{ms['chunked torch fwd'] / ms['generated fwd']:.2f}x"
        body.append([r["recurrence"], str(r["N"]), *("-" if ms.get(m) is None else f"{ms[m]:.2f}" for m in modes),
                     speed, f"{r['error_vs_fp64']:.1e}"])
    s = payload["settings"]
    title = (f"linear attention kernels on {payload['machine']['device']} ({s['dtype']}, B={s['batch']}, "
             f"H={s['heads']}, d={s['head_dim']})")
    return [(title, header, body)]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU under Triton's interpreter, tiny shapes")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 32768])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--reps", type=int, default=5)
    results_io.add_output_arguments(parser, DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.smoke:
        os.environ["SEQWEAVE_TRITON_INTERPRET"] = os.environ["TRITON_INTERPRET"] = "1"
        args.lengths, args.heads, args.head_dim, args.dtype, args.reps = [40], 2, 16, "float32", 1
    args.device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if args.device == "cpu" and not args.smoke and not args.report:
        print("no CUDA device: run with --smoke (CPU, Triton interpreter) or on a GPU", file=sys.stderr)
        return 2
    payload = results_io.run_or_report(args, lambda: run(args, argv), render, LEFT_COLUMNS)
    failed = [r for r in payload["rows"] if r.get("failures")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
