"""seqweave's CPU attention (`attention_kernels.forward` / `backward`) against F.scaled_dot_product_attention.

For each mask (causal, a causal sliding window of `--window` tokens, packed documents: causal
within documents of random lengths in [N/16, 3N/16], as in attention_gpu.py) and length N, both
run in the same process on the same inputs: seqweave through its kernel dispatch (on CPU,
PyTorch's fused flash kernel driven per query block by the MaskSpec, see
seqweave/codegen/cpu_flash.py), SDPA with the equivalent mask (`is_causal=True` for causal, a
dense N x N bool mask for the window and documents, which is all SDPA can take). Times are the
median of `--repeats` calls after one warm-up; fwd+bwd is one forward and one backward (SDPA:
autograd). The ratio seqweave / SDPA is the number that matters: target <= 1.2 everywhere.
`--reference` times the blockwise torch reference (SEQWEAVE_CPU_ATTENTION=reference) as well.

    python benchmarks/cpu_attention.py                          # N = 2k, 4k, 8k; B=1, H=8, D=64, fp32, 2 threads
    python benchmarks/cpu_attention.py --lengths 512 --repeats 1   # quick
    python benchmarks/cpu_attention.py --report benchmarks/results/cpu_attention.json --markdown
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

import results_io  # benchmarks/ is on sys.path when a script runs
from attention_gpu import document_ids, mask_text

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results", "cpu_attention.json")
LEFT_COLUMNS = ("mask",)
MASKS = ("causal", "sliding_window", "documents")
TARGET_RATIO = 1.2


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _inputs(n: int, args: argparse.Namespace, kind: str) -> dict:
    gen = torch.Generator().manual_seed(0)
    shape = (1, args.heads, n, args.head_dim)
    q, k, v, dout = (torch.randn(*shape, generator=gen) for _ in range(4))
    seg = document_ids(1, n, gen).to(torch.int64) if kind == "documents" else None
    return {"q": q, "k": k, "v": v, "dout": dout, "seg": seg}


def _dense_mask(kind: str, n: int, window: int, seg: torch.Tensor | None) -> torch.Tensor | None:
    """SDPA's mask: None for causal (is_causal), else the N x N bool mask (True = attend)."""
    if kind == "causal":
        return None
    pos = torch.arange(n)
    causal = pos[None, :] <= pos[:, None]
    if kind == "sliding_window":
        return causal & (pos[:, None] - pos[None, :] < window)
    return causal & (seg[0][:, None] == seg[0][None, :])


def _seqweave_fns(x: dict, kind: str, args: argparse.Namespace) -> tuple[Callable, Callable]:
    from seqweave.codegen import attention_kernels
    from seqweave.ir.mask_parser import parse_mask, parse_score_mod
    mask, none, scale = parse_mask(mask_text(kind, args.window)), parse_score_mod("none"), args.head_dim ** -0.5
    operands = (x["seg"],) if x["seg"] is not None else ()

    def fwd():
        return attention_kernels.forward(x["q"], x["k"], x["v"], mask, none, scale, operands)

    def fwd_bwd():
        out, lse = fwd()
        return attention_kernels.backward(x["dout"], x["q"], x["k"], x["v"], out, lse, mask, none, scale, operands)
    return fwd, fwd_bwd


def _sdpa_fns(x: dict, kind: str, args: argparse.Namespace) -> tuple[Callable, Callable]:
    dense = _dense_mask(kind, x["q"].shape[2], args.window, x["seg"])
    leaves = [t.detach().requires_grad_() for t in (x["q"], x["k"], x["v"])]

    def fwd():
        with torch.no_grad():
            return F.scaled_dot_product_attention(*leaves, attn_mask=dense, is_causal=dense is None)

    def fwd_bwd():
        out = F.scaled_dot_product_attention(*leaves, attn_mask=dense, is_causal=dense is None)
        return torch.autograd.grad(out, leaves, x["dout"])
    return fwd, fwd_bwd


def _time_row(kind: str, n: int, args: argparse.Namespace) -> dict:
    x = _inputs(n, args, kind)
    row: dict = {"mask": kind, "N": n}
    runners = {"seqweave": lambda: _seqweave_fns(x, kind, args), "sdpa": lambda: _sdpa_fns(x, kind, args)}
    for name, make in runners.items():
        fwd, fwd_bwd = make()
        row[name] = {"fwd": _median_seconds(fwd, args.repeats), "fwd_bwd": _median_seconds(fwd_bwd, args.repeats)}
    if args.reference:
        os.environ["SEQWEAVE_CPU_ATTENTION"] = "reference"
        try:
            fwd, fwd_bwd = _seqweave_fns(x, kind, args)
            row["reference"] = {"fwd": _median_seconds(fwd, 1), "fwd_bwd": _median_seconds(fwd_bwd, 1)}
        finally:
            del os.environ["SEQWEAVE_CPU_ATTENTION"]
    row["ratio"] = {p: row["seqweave"][p] / row["sdpa"][p] for p in ("fwd", "fwd_bwd")}
    print(f"{kind:>14} N={n:>5}: fwd {row['seqweave']['fwd'] * 1e3:8.1f} ms vs {row['sdpa']['fwd'] * 1e3:8.1f} ms,"
          f" fwd+bwd {row['seqweave']['fwd_bwd'] * 1e3:8.1f} ms vs {row['sdpa']['fwd_bwd'] * 1e3:8.1f} ms",
          file=sys.stderr)
    return row


def run(args: argparse.Namespace, argv: list[str]) -> dict:
    from seqweave.codegen.attention_kernels import kernels_in_use
    torch.set_num_threads(args.threads)
    rows = [_time_row(kind, n, args) for kind in args.masks for n in args.lengths]
    return {"command": "python benchmarks/cpu_attention.py " + " ".join(argv),
            "machine": {**results_io.machine_info(HERE), "torch": torch.__version__},
            "settings": {"batch": 1, "heads": args.heads, "head_dim": args.head_dim, "dtype": "float32",
                         "window": args.window, "threads": args.threads, "repeats": args.repeats,
                         "kernels": kernels_in_use("cpu")},
            "rows": rows, "target_ratio": TARGET_RATIO}


def render(payload: dict) -> list[results_io.TableData]:
    ms = lambda s: f"{s * 1e3:.1f}"  # noqa: E731
    with_reference = any("reference" in r for r in payload["rows"])
    header = ["mask", "N", "seqweave fwd ms", "SDPA fwd ms", "fwd ratio", "seqweave fwd+bwd ms",
              "SDPA fwd+bwd ms", "fwd+bwd ratio"] + (["reference fwd+bwd ms"] if with_reference else [])
    body = [[r["mask"], str(r["N"]), ms(r["seqweave"]["fwd"]), ms(r["sdpa"]["fwd"]), f"{r['ratio']['fwd']:.2f}",
             ms(r["seqweave"]["fwd_bwd"]), ms(r["sdpa"]["fwd_bwd"]), f"{r['ratio']['fwd_bwd']:.2f}"]
            + ([ms(r["reference"]["fwd_bwd"]) if "reference" in r else "-"] if with_reference else [])
            for r in payload["rows"]]
    s = payload["settings"]
    title = (f"CPU attention, seqweave ({s['kernels']}) vs F.scaled_dot_product_attention: B={s['batch']}, "
             f"H={s['heads']}, D={s['head_dim']}, {s['dtype']}, window {s['window']}, {s['threads']} threads; "
             f"ratio = seqweave / SDPA, target <= {payload['target_ratio']}")
    return [(title, header, body)]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--masks", nargs="+", choices=MASKS, default=list(MASKS))
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--window", type=int, default=1024, help="visible tokens, the query's own included")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reference", action="store_true", help="also time the blockwise torch reference")
    results_io.add_output_arguments(parser, DEFAULT_OUT)
    args = parser.parse_args(argv)
    payload = results_io.run_or_report(args, lambda: run(args, argv), render, LEFT_COLUMNS)
    worst = max(max(r["ratio"].values()) for r in payload["rows"])
    if worst > TARGET_RATIO:
        print(f"ABOVE TARGET: seqweave / SDPA up to {worst:.2f} (target <= {TARGET_RATIO})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
