"""Per-rank peak memory and step time of a training step at real lengths (8k-32k tokens).

Tiny Llama (hidden 256, 4 layers, 4 heads / 2 KV heads, vocab 32000, random weights, batch 1),
one training step (forward + backward) after a warm-up step, each configuration in fresh
processes. Peak memory is the resident-set high-water mark above the pre-step baseline
(`seqweave.testing.memory`), per rank; eager is one process holding the whole sequence.

Models: `loss` returns only the loss; `logits` returns (loss, logits) and the caller
backpropagates the loss only, so the logits are gathered to every rank (`outputs="gathered"`)
but never differentiated (no zero gradient may be materialised for them).

    python benchmarks/long_context.py                                  # N = 8k, 16k; 4 ranks
    python benchmarks/long_context.py --seq-lens 32768 --add-to benchmarks/results/long_context.json
    python benchmarks/long_context.py --report benchmarks/results/long_context.json --markdown
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shlex
import sys
import time

import torch

import results_io

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results", "long_context.json")
LEFT_COLUMNS = ("N", "run")
MIB = 1 << 20


def build_model(seq_len: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=seq_len,
                         attn_implementation="sdpa")
    return LlamaForCausalLM(config)


class Returns(torch.nn.Module):
    """The LM returning its loss only (`loss`) or its loss and logits (`logits`)."""

    def __init__(self, model: torch.nn.Module, outputs: str) -> None:
        super().__init__()
        self.model, self.outputs = model, outputs

    def forward(self, ids: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        out = self.model(input_ids=ids, labels=ids)
        return out.loss if self.outputs == "loss" else (out.loss, out.logits)


def _loss(result) -> torch.Tensor:
    return result if isinstance(result, torch.Tensor) else result[0]


def step_worker(rank: int, world: int, run: dict) -> dict:
    """One configuration on one rank: warm-up step, then a measured step."""
    import seqweave
    from seqweave.testing.memory import step_peak
    torch.set_num_threads(run["threads"])
    model = Returns(build_model(run["seq_len"]), run["outputs"])
    ids = torch.randint(0, 32000, (1, run["seq_len"]), generator=torch.Generator().manual_seed(1))
    backend = None
    if run["backend"] == "seqweave":
        backend = seqweave.backend(mesh=seqweave.Mesh(sp=world), timeout=1800)
        model = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)
    started = time.perf_counter()
    _loss(model(ids)).backward()
    first = time.perf_counter() - started
    for p in model.parameters():
        p.grad = None
    with step_peak() as peak:
        started = time.perf_counter()
        loss = _loss(model(ids))
        loss.backward()
        step = time.perf_counter() - started
    return {"rank": rank, "peak_bytes": peak.peak_bytes, "step_s": step, "first_s": first,
            "loss": loss.detach().item(),
            **(_predicted(backend) if backend else {})}


def _predicted(backend) -> dict:
    """What the compiled forward says this rank holds: saved activations and the user's outputs."""
    forward = [c for c in backend.graphs if c.kind == "forward"]
    return {"saved_bytes": sum(c.saved_bytes for c in forward),
            "output_bytes": sum(c.output_bytes for c in forward),
            "gather_bytes_sent": backend.comm_stats().get("gather", {}).get("bytes_sent", 0)}


def measure(run: dict, timeout_s: float) -> dict:
    from seqweave.testing.distributed import run_ranks
    print(f"N={run['seq_len']} {run['name']} ...", file=sys.stderr, flush=True)
    ranks = run_ranks(run["world"], step_worker, run, timeout_s=timeout_s)
    busiest = max(ranks, key=lambda r: r["peak_bytes"])
    return {**run, "peak_bytes": busiest["peak_bytes"], "step_s": max(r["step_s"] for r in ranks),
            "first_s": max(r["first_s"] for r in ranks), "loss": ranks[0]["loss"],
            **{key: busiest[key] for key in ("saved_bytes", "output_bytes", "gather_bytes_sent") if key in busiest}}


def configurations(seq_len: int, world: int, threads: int, eager_max: int, single_max: int,
                   gathered_max: int) -> list[dict]:
    runs = []
    if seq_len <= eager_max:
        runs.append(dict(name="eager, 1 process", backend="eager", world=1, outputs="loss"))
    if seq_len <= single_max:
        runs.append(dict(name="seqweave, 1 process", backend="seqweave", world=1, outputs="logits"))
    runs.append(dict(name=f"seqweave sp={world}, loss only", backend="seqweave", world=world, outputs="loss"))
    if seq_len <= gathered_max:
        runs.append(dict(name=f"seqweave sp={world}, logits gathered", backend="seqweave", world=world,
                         outputs="logits"))
    return [{**r, "seq_len": seq_len, "threads": threads} for r in runs]


def with_ratios(rows: list[dict]) -> list[dict]:
    eager = {r["seq_len"]: r for r in rows if r["backend"] == "eager"}
    for row in rows:
        base = eager.get(row["seq_len"])
        row["peak_vs_eager"] = row["peak_bytes"] / base["peak_bytes"] if base else None
        row["step_vs_eager"] = row["step_s"] / base["step_s"] if base else None
    return rows


def growth(rows: list[dict]) -> list[dict]:
    """peak(2N) / peak(N) per run kind: at most ~2 when nothing grows like N²."""
    out = []
    for name in dict.fromkeys(r["name"] for r in rows):
        by_len = {r["seq_len"]: r["peak_bytes"] for r in rows if r["name"] == name}
        for n, peak in sorted(by_len.items()):
            if 2 * n in by_len:
                out.append({"run": name, "from": n, "to": 2 * n, "ratio": by_len[2 * n] / peak})
    return out


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def render(payload: dict) -> list[results_io.TableData]:
    header = ["N", "run", "peak MiB/rank", "vs eager", "predicted MiB (saved + outputs)", "step vs eager",
              "gather MiB sent"]
    body = []
    for r in payload["rows"]:
        predicted = (r.get("saved_bytes", 0) + r.get("output_bytes", 0)) / MIB if "saved_bytes" in r else None
        body.append([str(r["seq_len"]), r["name"], f"{r['peak_bytes'] / MIB:,.0f}", _ratio(r["peak_vs_eager"]),
                     "-" if predicted is None else f"{predicted:,.0f}", _ratio(r["step_vs_eager"]),
                     f"{r.get('gather_bytes_sent', 0) / MIB:,.0f}"])
    tables = [(f"Training step, tiny Llama (vocab 32000, hidden 256, 4 layers), batch 1, "
               f"{payload['threads']} thread(s) per process", header, body)]
    if payload["growth"]:
        tables.append(("Peak growth when N doubles (linear in N: <= 2.1)", ["run", "N -> 2N", "peak ratio"],
                       [[g["run"], f"{g['from']} -> {g['to']}", f"{g['ratio']:.2f}"] for g in payload["growth"]]))
    return tables


def run(args: argparse.Namespace, argv: list[str]) -> dict:
    from seqweave.testing.memory import supported
    if not supported():
        raise SystemExit("long_context.py measures peak memory through /proc (Linux only)")
    started = _dt.datetime.now(_dt.timezone.utc)
    rows = _earlier_rows(args.add_to)
    for seq_len in args.seq_lens:
        for config in configurations(seq_len, args.world, args.threads, args.eager_max, args.single_max,
                                     args.gathered_max):
            rows.append(measure(config, args.timeout))
    rows = with_ratios(rows)
    return {"benchmark": "long_context",
            "command": " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0]), *argv]),
            "started_utc": started.isoformat(timespec="seconds"),
            "finished_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": {**results_io.machine_info(HERE), "torch": torch.__version__},
            "threads": args.threads, "rows": rows, "growth": growth(rows)}


def _earlier_rows(path: str | None) -> list[dict]:
    """Rows of an earlier run to extend (its machine and thread count must match: checked by the reader)."""
    if not path:
        return []
    with open(path) as handle:
        return [{**row, "run_of": handle.name} for row in json.load(handle)["rows"]]


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Lengths, ranks, threads and the per-configuration timeout (shared with memory_sp.py)."""
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 16384])
    parser.add_argument("--world", type=int, default=4, help="sequence-parallel ranks")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per configuration")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(parser)
    parser.add_argument("--eager-max", type=int, default=32768, help="longest N to run eager at (it must fit)")
    parser.add_argument("--single-max", type=int, default=16384,
                        help="longest N to run seqweave on one process at")
    parser.add_argument("--add-to", metavar="JSON", help="extend the rows of an earlier run (same machine)")
    parser.add_argument("--gathered-max", type=int, default=16384,
                        help="longest N to run the gathered-logits model at (every rank holds N x vocab)")
    results_io.add_output_arguments(parser, DEFAULT_OUT)
    args = parser.parse_args(argv)
    results_io.run_or_report(args, lambda: run(args, argv), render, LEFT_COLUMNS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
