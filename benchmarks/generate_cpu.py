"""generate() through a compiled forward: eager vs aot_eager vs seqweave, same run, same model.

Tiny random-weight HF causal LMs (the built-in samples, eval mode) generate greedily with a
StaticCache, the documented way to generate through seqweave (two graphs: prefill and
decode). For each backend the table gives whether its tokens equal eager's, how many graphs
it compiled, the first generate() (compiles included) and the steady-state decode rate as a
ratio to eager measured in the same process. Exit status 1 if any backend's tokens differ.

    python benchmarks/generate_cpu.py                      # llama-tiny and qwen2-tiny, 32 new tokens
    python benchmarks/generate_cpu.py --report benchmarks/results/generate_cpu.json --markdown
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import shlex
import statistics
import sys
import time

import torch

import results_io

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results", "generate_cpu.json")
LEFT_COLUMNS = ("model", "backend", "same tokens")
BACKENDS = ("eager", "aot_eager", "seqweave")


def _model(name: str, prompt: int, new_tokens: int, hidden: int, layers: int):
    from seqweave.testing.models import SampleSpec, build_sample
    model, inputs = build_sample(SampleSpec(name, seq_len=prompt + new_tokens, batch=1, hidden=hidden, layers=layers))
    return model.eval(), inputs["input_ids"][:, :prompt]


def _compiled(model: torch.nn.Module, backend: str):
    """The model with its forward compiled by `backend` (eager: untouched), and seqweave's backend object."""
    import seqweave
    torch._dynamo.reset()
    if backend == "eager":
        return model, None
    target = seqweave.backend() if backend == "seqweave" else backend
    model.forward = torch.compile(model.forward, backend=target, fullgraph=True, dynamic=False)
    return model, target


def _timed_generate(model, prompt, options) -> tuple[torch.Tensor, float]:
    started = time.perf_counter()
    with torch.no_grad():
        tokens = model.generate(prompt, **options)
    return tokens, time.perf_counter() - started


def measure(name: str, args: argparse.Namespace) -> list[dict]:
    """One row per backend: tokens equal to eager's, graphs, first call and steady-state seconds."""
    options = dict(max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0, cache_implementation="static")
    rows, expected = [], None
    for backend in BACKENDS:
        model, prompt = _model(name, args.prompt, args.new_tokens, args.hidden, args.layers)
        model, target = _compiled(model, backend)
        tokens, first = _timed_generate(model, prompt, options)
        steady = statistics.median(_timed_generate(model, prompt, options)[1] for _ in range(args.repeats))
        expected = tokens if expected is None else expected
        graphs = len(target.graphs) if backend == "seqweave" else None
        rows.append({"model": name, "backend": backend, "same_tokens": bool(torch.equal(tokens, expected)),
                     "graphs": graphs, "first_s": first, "steady_s": steady})
    eager_steady = rows[0]["steady_s"]
    for row in rows:
        row["steady_vs_eager"] = row["steady_s"] / eager_steady
    return rows


def render(payload: dict) -> list[results_io.TableData]:
    header = ["model", "backend", "same tokens", "graphs", "first generate() s", "steady generate() vs eager"]
    body = [[r["model"], r["backend"], "yes" if r["same_tokens"] else "NO", str(r["graphs"] or "-"),
             f"{r['first_s']:.2f}", f"{r['steady_vs_eager']:.2f}x"] for r in payload["rows"]]
    shape = payload["shape"]
    title = (f"generate(): prompt {shape['prompt']}, {shape['new_tokens']} new tokens, StaticCache, "
             f"hidden {shape['hidden']}, {shape['layers']} layers, 1 thread")
    return [(title, header, body)]


def run(args: argparse.Namespace, argv: list[str]) -> dict:
    torch.set_num_threads(args.threads)
    started = _dt.datetime.now(_dt.timezone.utc)
    rows = []
    for name in args.models:
        print(f"generating with {name} ...", file=sys.stderr, flush=True)
        rows += measure(name, args)
    return {"benchmark": "generate_cpu",
            "command": " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0]), *argv]),
            "started_utc": started.isoformat(timespec="seconds"),
            "finished_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": {**results_io.machine_info(HERE), "torch": torch.__version__},
            "shape": {"prompt": args.prompt, "new_tokens": args.new_tokens, "hidden": args.hidden,
                      "layers": args.layers},
            "rows": rows}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["llama-tiny", "qwen2-tiny"])
    parser.add_argument("--prompt", type=int, default=40)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="steady-state generate() calls (median)")
    parser.add_argument("--threads", type=int, default=1)
    results_io.add_output_arguments(parser, DEFAULT_OUT)
    args = parser.parse_args(argv)
    payload = results_io.run_or_report(args, lambda: run(args, argv), render, LEFT_COLUMNS)
    wrong = [r for r in payload["rows"] if not r["same_tokens"]]
    for row in wrong:
        print(f"MISMATCH {row['model']} {row['backend']}: tokens differ from eager", file=sys.stderr)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
