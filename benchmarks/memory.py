"""Activation memory of one training step on CPU: no plan, PyTorch's two baselines, seqweave's plans.

Tiny Llama (random weights, batch 1, loss inside the model), one process, over N. Rows, all
measured in the same run by the live-bytes accounting (`seqweave.runtime.live_bytes`: every
storage an op allocates during the step, parameters excluded; host memory apart):
- eager: the model as written;
- checkpoint: eager with `torch.utils.checkpoint` on every decoder layer (HF's
  `gradient_checkpointing_enable`);
- save_on_cpu: eager under `torch.autograd.graph.save_on_cpu()` (every saved tensor to host);
- seqweave: compiled, no plan;
- seqweave B%: compiled with `memory_budget` = B% of seqweave's own measured plan-free peak.
Columns: device peak, host peak, bytes moved, recomputed FLOPs (seqweave's plan), the step
time as a ratio to eager's (same run; one step after a warm-up), and whether loss and every
gradient equal the plan-free seqweave step bit for bit. A planned row whose peak exceeds its
budget is reported and makes the script exit non-zero; a budget no plan meets is a row saying
the least peak any plan reaches (the logits and the loss's [N, vocab] tensors are not planned:
at a large vocabulary they set the floor).

    python benchmarks/memory.py                                          # N = 4096, 8192
    python benchmarks/memory.py --lengths 1024 --layers 4 --out /tmp/memory.json   # quick
    python benchmarks/memory.py --vocab 32000 --layers 4 --budgets --lengths 8192   # seqweave vs eager only
    python benchmarks/memory.py --report benchmarks/results/memory.json --markdown
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import torch

import results_io

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results", "memory.json")
LEFT_COLUMNS = ("N", "row")


def _model(args: argparse.Namespace, length: int):
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                                      intermediate_size=args.hidden * 11 // 4, num_hidden_layers=args.layers,
                                      num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64,
                                      max_position_embeddings=length, attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(config)
    ids = torch.randint(0, args.vocab, (1, length))
    return model, {"input_ids": ids, "labels": ids, "use_cache": False}


def _measure(model, run, inputs, around=contextlib.nullcontext):
    """(live bytes, seconds, loss, grads) of the second step (the first compiles / warms up)."""
    from seqweave.runtime.live_bytes import LiveBytes

    def step():
        model.zero_grad(set_to_none=True)
        with around():
            loss = run(**inputs).loss
            loss.backward()
        return loss.detach()

    step()
    with LiveBytes() as live:
        start = time.perf_counter()
        loss = step()
        seconds = time.perf_counter() - start
    return live, seconds, loss, [p.grad.clone() for p in model.parameters()]


def _row(name: str, live, seconds: float, **extra) -> dict:
    return {"row": name, "device_peak": live.device_peak, "host_peak": live.host_peak, "seconds": seconds, **extra}


def _eager_rows(args, length: int) -> list[dict]:
    rows = []
    for name in ("eager", "checkpoint", "save_on_cpu"):
        model, inputs = _model(args, length)
        if name == "checkpoint":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.train()
        around = (lambda: torch.autograd.graph.save_on_cpu()) if name == "save_on_cpu" else contextlib.nullcontext
        live, seconds, _, _ = _measure(model, model, inputs, around)
        rows.append(_row(name, live, seconds))
        print(f"N={length:>6} {name:>12}: peak {live.device_peak / 2**20:9.1f} MiB, {seconds:7.2f} s",
              file=sys.stderr)
    return rows


def _seqweave_rows(args, length: int) -> list[dict]:
    import seqweave
    from seqweave.errors import find_seqweave_error

    model, inputs = _model(args, length)
    rows, free = [], None
    for fraction in [None, *args.budgets]:
        torch._dynamo.reset()
        budget = None if fraction is None else int(fraction * free["device_peak"])
        backend = seqweave.backend(memory_budget=budget)
        try:
            live, seconds, loss, grads = _measure(model, torch.compile(model, backend=backend), inputs)
        except Exception as error:  # a budget no plan meets: say the least it can be, go on
            refusal = find_seqweave_error(error)
            if refusal is None or not hasattr(refusal, "least_peak"):
                raise
            rows.append({"row": f"seqweave {fraction:.0%}", "budget": budget, "refused": refusal.least_peak})
            print(f"N={length:>6} seqweave {fraction:.0%}: refused, least peak {refusal.least_peak / 2**20:.1f} MiB",
                  file=sys.stderr)
            continue
        if fraction is None:
            free = _row("seqweave", live, seconds, bytes_moved=0, recompute_flops=0.0, exact=True)
            reference = (loss, grads)
            rows.append(free)
            continue
        plan = backend.memory_plans[0].plan
        exact = torch.equal(loss, reference[0]) and all(torch.equal(a, b) for a, b in zip(grads, reference[1]))
        rows.append(_row(f"seqweave {fraction:.0%}", live, seconds, budget=budget, bytes_moved=plan.bytes_moved,
                         recompute_flops=plan.recompute_flops, exact=exact,
                         choices={option: len(plan.of(option)) for option in sorted(set(plan.choice.values()))}))
        print(f"N={length:>6} seqweave {fraction:.0%}: peak {live.device_peak / 2**20:9.1f} MiB (budget "
              f"{budget / 2**20:.1f}), {seconds:7.2f} s, exact {exact}", file=sys.stderr)
    return rows


def run(args: argparse.Namespace, argv: list[str]) -> dict:
    torch.set_num_threads(args.threads)
    rows = []
    for length in args.lengths:
        group = _eager_rows(args, length) + _seqweave_rows(args, length)
        eager = group[0]
        for row in group:
            row["N"] = length
            if "refused" not in row:
                row["time_vs_eager"] = row["seconds"] / eager["seconds"]
                row["peak_vs_eager"] = row["device_peak"] / eager["device_peak"]
        rows += group
    return {"command": "python benchmarks/memory.py " + " ".join(argv),
            "machine": {**results_io.machine_info(HERE), "torch": torch.__version__},
            "settings": {"hidden": args.hidden, "layers": args.layers, "vocab": args.vocab, "batch": 1,
                         "threads": args.threads, "budgets": args.budgets,
                         "accounting": "live bytes at every ATen op (seqweave.runtime.live_bytes)"},
            "rows": rows}


def render(payload: dict) -> list[results_io.TableData]:
    header = ["N", "row", "device peak MiB", "peak / eager", "host peak MiB", "moved MiB", "recomputed GFLOP",
              "time / eager", "exact", "budget MiB"]
    mib = lambda n: f"{n / 2**20:.1f}"  # noqa: E731
    body = [[str(r["N"]), r["row"], f"refused (least {mib(r['refused'])})", "-", "-", "-", "-", "-", "-",
             mib(r["budget"])] if "refused" in r else
            [str(r["N"]), r["row"], mib(r["device_peak"]), f"{r['peak_vs_eager']:.3f}", mib(r["host_peak"]),
             mib(r["bytes_moved"]) if "bytes_moved" in r else "-",
             f"{r['recompute_flops'] / 1e9:.2f}" if "recompute_flops" in r else "-",
             f"{r['time_vs_eager']:.2f}", str(r.get("exact", "-")), mib(r["budget"]) if "budget" in r else "-"]
            for r in payload["rows"]]
    s = payload["settings"]
    title = (f"one training step's activation memory, CPU ({s['threads']} threads), tiny Llama hidden {s['hidden']}, "
             f"{s['layers']} layers, vocab {s['vocab']}; budgets are fractions of seqweave's plan-free peak")
    return [(title, header, body)]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--budgets", type=float, nargs="*", default=[0.5, 0.25])
    parser.add_argument("--threads", type=int, default=2)
    results_io.add_output_arguments(parser, DEFAULT_OUT)
    args = parser.parse_args(argv)
    payload = results_io.run_or_report(args, lambda: run(args, argv), render, LEFT_COLUMNS)
    over = [r for r in payload["rows"] if "device_peak" in r and "budget" in r and r["device_peak"] > r["budget"]]
    inexact = [r for r in payload["rows"] if r.get("exact") is False]
    for row in over:
        print(f"OVER BUDGET: N={row['N']} {row['row']} peaked at {row['device_peak']} > {row['budget']}", file=sys.stderr)
    for row in inexact:
        print(f"NOT EXACT: N={row['N']} {row['row']}", file=sys.stderr)
    return 1 if over or inexact else 0


if __name__ == "__main__":
    sys.exit(main())
