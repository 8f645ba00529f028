"""Per-rank peak memory of a training step whose model returns its logits, sharded vs gathered.

Tiny Llama (hidden 256, 4 layers, vocab 32000, random weights, batch 1) returns its logits and
the caller takes the loss outside, as long-context users do. Rows:
- eager, 1 process: logits [N, 32000] whole, cross-entropy on them;
- seqweave sp=P, outputs="sharded": each rank gets its rows of the logits as a DTensor and
  takes the cross-entropy of its own rows against its rows of the labels (`seqweave.shard`),
  divided by N; the sum over ranks is the global mean loss, so each rank backpropagates its
  own part and nothing is gathered;
- seqweave sp=P, outputs="gathered": the logits whole on every rank, the same loss as eager.
Peak memory is the resident-set high-water mark above the pre-step baseline, per rank (the
busiest rank is reported), after a warm-up step; each configuration runs in fresh processes.

    python benchmarks/memory_sp.py                      # N = 8192, 16384 on 4 ranks
    python benchmarks/memory_sp.py --seq-lens 2048 --world 2 --out /tmp/memory_sp.json   # a quick look
    python benchmarks/memory_sp.py --report benchmarks/results/memory_sp.json --markdown
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import shlex
import sys
import time

import torch
import torch.nn.functional as F

import results_io
from long_context import add_run_arguments, build_model

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results", "memory_sp.json")
LEFT_COLUMNS = ("N", "run")
MIB = 1 << 20
VOCAB = 32000
TARGET = 0.30  # issue 10: per-rank peak with sharded logits, as a fraction of one eager process


class Logits(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, use_cache=False).logits


def _loss(logits, labels: torch.Tensor, balance: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(what this rank backpropagates, the global mean loss for display)."""
    if type(logits).__name__ != "DTensor":
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1))
        return loss, loss.detach()
    import seqweave
    import torch.distributed as dist
    rows = seqweave.shard(labels, 1, balance).to_local()
    local = F.cross_entropy(logits.to_local().reshape(-1, VOCAB), rows.reshape(-1), reduction="sum") / labels.numel()
    total = local.detach().clone()
    dist.all_reduce(total)
    return local, total


def step_worker(rank: int, world: int, run: dict) -> dict:
    """One configuration on one rank: warm-up step, then a measured step."""
    import seqweave
    from seqweave.testing.memory import step_peak
    torch.set_num_threads(run["threads"])
    model = Logits(build_model(run["seq_len"]))
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (1, run["seq_len"]), generator=generator)
    labels = torch.randint(0, VOCAB, (1, run["seq_len"]), generator=generator)
    balance = "zigzag"
    if run["backend"] == "seqweave":
        backend = seqweave.backend(mesh=seqweave.Mesh(sp=world), outputs=run["outputs"], balance=balance,
                                   timeout=1800)
        model = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)
    _loss(model(ids), labels, balance)[0].backward()
    for p in model.parameters():
        p.grad = None
    with step_peak() as peak:
        started = time.perf_counter()
        loss, shown = _loss(model(ids), labels, balance)
        loss.backward()
        step = time.perf_counter() - started
    return {"rank": rank, "peak_bytes": peak.peak_bytes, "step_s": step, "loss": shown.item()}


def measure(run: dict, timeout_s: float) -> dict:
    from seqweave.testing.distributed import run_ranks
    print(f"N={run['seq_len']} {run['name']} ...", file=sys.stderr, flush=True)
    ranks = run_ranks(run["world"], step_worker, run, timeout_s=timeout_s)
    busiest = max(ranks, key=lambda r: r["peak_bytes"])
    return {**run, "peak_bytes": busiest["peak_bytes"], "step_s": max(r["step_s"] for r in ranks),
            "loss": ranks[0]["loss"]}


def configurations(seq_len: int, world: int, threads: int, gathered_max: int) -> list[dict]:
    runs = [dict(name="eager, 1 process", backend="eager", world=1, outputs="gathered"),
            dict(name=f"seqweave sp={world}, logits sharded", backend="seqweave", world=world, outputs="sharded")]
    if seq_len <= gathered_max:
        runs.append(dict(name=f"seqweave sp={world}, logits gathered", backend="seqweave", world=world,
                         outputs="gathered"))
    return [{**r, "seq_len": seq_len, "threads": threads} for r in runs]


def with_ratios(rows: list[dict]) -> list[dict]:
    eager = {r["seq_len"]: r for r in rows if r["backend"] == "eager"}
    for row in rows:
        base = eager[row["seq_len"]]
        row["peak_vs_eager"] = row["peak_bytes"] / base["peak_bytes"]
        row["loss_vs_eager"] = abs(row["loss"] - base["loss"])
    return rows


def render(payload: dict) -> list[results_io.TableData]:
    header = ["N", "run", "peak MiB/rank", "vs eager", f"target <= {TARGET}", "loss error vs eager"]
    body = []
    for r in payload["rows"]:
        sharded = r["outputs"] == "sharded" and r["backend"] == "seqweave"
        body.append([str(r["seq_len"]), r["name"], f"{r['peak_bytes'] / MIB:,.0f}", f"{r['peak_vs_eager']:.2f}",
                     ("yes" if r["peak_vs_eager"] <= TARGET else "NO") if sharded else "-",
                     f"{r['loss_vs_eager']:.1e}"])
    return [(f"Training step, logits returned and the loss outside, tiny Llama (vocab 32000, hidden 256, "
             f"4 layers), batch 1, {payload['threads']} thread(s) per process", header, body)]


def run(args: argparse.Namespace, argv: list[str]) -> dict:
    from seqweave.testing.memory import supported
    if not supported():
        raise SystemExit("memory_sp.py measures peak memory through /proc (Linux only)")
    started = _dt.datetime.now(_dt.timezone.utc)
    rows = [measure(config, args.timeout) for seq_len in args.seq_lens
            for config in configurations(seq_len, args.world, args.threads, args.gathered_max)]
    return {"benchmark": "memory_sp",
            "command": " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0]), *argv]),
            "started_utc": started.isoformat(timespec="seconds"),
            "finished_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": {**results_io.machine_info(HERE), "torch": torch.__version__},
            "threads": args.threads, "rows": with_ratios(rows)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(parser)
    parser.add_argument("--gathered-max", type=int, default=8192,
                        help="longest N to run the gathered-logits row at (every rank holds N x vocab)")
    results_io.add_output_arguments(parser, DEFAULT_OUT)
    args = parser.parse_args(argv)
    results_io.run_or_report(args, lambda: run(args, argv), render, LEFT_COLUMNS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
