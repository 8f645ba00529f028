"""Linear vs softmax attention through seqweave on CPU, over sequence length.

The same tiny model (seqweave/testing/linear_models.py: embedding, one pre-norm block, head)
with its mixer written two ways in plain PyTorch: RetNet-style decay attention with a row
normaliser (parallel form, an N x N matrix as written; seqweave recognises it and runs
`attn.linear` chunkwise) and causal softmax attention (SDPA; seqweave runs `attn.sdpa`, its
blockwise kernel). Both compiled with `seqweave.backend()`, eval, no grad, batch 1; the time
per forward is the median of `--repeats` calls after a warm-up (compiles excluded), both models
measured in the same run. The table gives each time, their ratio, and per model the fitted
scaling exponent (slope of log time over log N on the lengths >= `--fit-from`) and the
crossover length (where linear first beats softmax, interpolated in log space).

    python benchmarks/linear_vs_softmax.py                                 # N = 1k .. 64k
    python benchmarks/linear_vs_softmax.py --lengths 256 512 --repeats 1   # quick
    python benchmarks/linear_vs_softmax.py --report benchmarks/results/linear_vs_softmax.json --markdown
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch

import results_io

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results", "linear_vs_softmax.json")
LEFT_COLUMNS = ("N",)
DEFAULT_LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768, 65536)
MODELS = {"linear": "l", "softmax": "s"}


def _time_forward(pattern: str, length: int, args: argparse.Namespace) -> tuple[float, list[str]]:
    """Median seconds per compiled forward, and the attention ops that ran."""
    import seqweave
    from seqweave.testing.linear_models import TinyLM
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyLM(pattern, vocab=256, hidden=args.hidden, heads=args.heads).eval()
    ids = torch.randint(0, 256, (1, length))
    backend = seqweave.backend()
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)
    times = []
    with torch.no_grad():
        compiled(ids)  # compile and warm up
        for _ in range(args.repeats):
            start = time.perf_counter()
            compiled(ids)
            times.append(time.perf_counter() - start)
    ops = sorted({n.op for c in backend.graphs for n in c.graph.nodes if n.op.startswith("attn.")})
    return statistics.median(times), ops


def fit_exponent(lengths: list[int], seconds: list[float]) -> float:
    """Least-squares slope of log(seconds) over log(N)."""
    xs, ys = [math.log(n) for n in lengths], [math.log(s) for s in seconds]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def crossover(lengths: list[int], linear: list[float], softmax: list[float]) -> float | None:
    """The N where linear's time first drops below softmax's (log-linear interpolation), or None."""
    gaps = [math.log(a / b) for a, b in zip(linear, softmax)]
    if gaps[0] <= 0:
        return float(lengths[0])
    for i in range(1, len(gaps)):
        if gaps[i] <= 0:
            share = gaps[i - 1] / (gaps[i - 1] - gaps[i])
            return math.exp(math.log(lengths[i - 1]) + share * (math.log(lengths[i]) - math.log(lengths[i - 1])))
    return None


def run(args: argparse.Namespace, argv: list[str]) -> dict:
    torch.set_num_threads(args.threads)
    rows = []
    for length in args.lengths:
        row = {"N": length}
        for name, pattern in MODELS.items():
            seconds, ops = _time_forward(pattern, length, args)
            row[name] = {"seconds": seconds, "ops": ops}
            print(f"N={length:>6} {name:>7}: {seconds * 1e3:9.2f} ms  ({', '.join(ops)})", file=sys.stderr)
        rows.append(row)
    fitted = [r for r in rows if r["N"] >= args.fit_from] or rows
    lengths = [r["N"] for r in fitted]
    summary = {name: fit_exponent(lengths, [r[name]["seconds"] for r in fitted]) if len(fitted) > 1 else None
               for name in MODELS}
    all_lengths = [r["N"] for r in rows]
    summary["crossover_N"] = crossover(all_lengths, [r["linear"]["seconds"] for r in rows],
                                       [r["softmax"]["seconds"] for r in rows])
    return {"command": "python benchmarks/linear_vs_softmax.py " + " ".join(argv),
            "machine": {**results_io.machine_info(HERE), "torch": torch.__version__},
            "settings": {"hidden": args.hidden, "heads": args.heads, "threads": args.threads,
                         "repeats": args.repeats, "fit_from": args.fit_from, "batch": 1, "layers": 1},
            "rows": rows, "fit": summary}


def render(payload: dict) -> list[results_io.TableData]:
    header = ["N", "linear ms", "softmax ms", "linear / softmax", "linear op", "softmax op"]
    body = [[str(r["N"]), f"{r['linear']['seconds'] * 1e3:.2f}", f"{r['softmax']['seconds'] * 1e3:.2f}",
             f"{r['linear']['seconds'] / r['softmax']['seconds']:.3f}", ", ".join(r["linear"]["ops"]),
             ", ".join(r["softmax"]["ops"])] for r in payload["rows"]]
    fit, s = payload["fit"], payload["settings"]
    exponent = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    cross = "none in range" if fit["crossover_N"] is None else f"{fit['crossover_N']:.0f}"
    title = (f"forward time through seqweave, CPU ({s['threads']} threads, hidden {s['hidden']}, {s['heads']} heads); "
             f"exponent (N >= {s['fit_from']}): linear {exponent(fit['linear'])}, softmax {exponent(fit['softmax'])}; "
             f"crossover N = {cross}")
    return [(title, header, body)]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS))
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fit-from", type=int, default=4096, help="fit exponents on lengths >= this")
    results_io.add_output_arguments(parser, DEFAULT_OUT)
    args = parser.parse_args(argv)
    payload = results_io.run_or_report(args, lambda: run(args, argv), render, LEFT_COLUMNS)
    exponent = payload["fit"]["linear"]
    if exponent is not None and exponent > 1.1:
        print(f"ABOVE TARGET: linear attention scales as N^{exponent:.2f} (target <= 1.1)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
