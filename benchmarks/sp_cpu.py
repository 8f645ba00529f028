"""Sequence-parallel attention on CPU: comm bytes per layer and per-rank activation bytes.

For one Llama-like attention layer (B=1, Hq=8, Hkv=2 GQA, D=64, bf16) it tabulates, for every
(N, P), the bytes the busiest rank sends per layer, forward and backward, from the cost model
(seqweave/passes/cost.py) for: ring (contiguous layout, causal, under its RingPlan), zigzag ring,
striped ring, halo (contiguous ring under causal & sliding_window(W-1, 0), W=1024: the plan
forwards each shard only as far as the window reaches), Ulysses, and hybrid U x R (model only:
there is no hybrid runtime). Where N <= --measure-max-seq it also runs the ring variants and
Ulysses forward + backward on real gloo ranks (`run_ranks`) and compares the bytes counted by
`Communicator.stats` with the model for the same shape; any difference is reported as MISMATCH.
Peak per-rank activation bytes are analytic (from shapes), against a single process.

    python benchmarks/sp_cpu.py                                   # N 4k 16k 64k, P 2 4 8, measure N=4k
    python benchmarks/sp_cpu.py --report benchmarks/results/sp_cpu.json --markdown
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass

import results_io  # benchmarks/ is on sys.path when a script runs

import torch

from seqweave.ir.mask import Causal, SlidingWindow
from seqweave.ir.score_mod import NoScoreMod
from seqweave.ir.sharding import Layout, plan_ring, shard_positions
from seqweave.passes.cost import (evaluate_expr, hybrid_estimate, ring_bytes, ring_estimate, ulysses_bytes,
                                  ulysses_estimate)
from seqweave.passes.strategy import LayerShape
from seqweave.runtime.comm import Communicator
from seqweave.runtime.sequence_parallel import (ring_attention_backward, ring_attention_forward,
                                                ulysses_attention_backward, ulysses_attention_forward)
from seqweave.testing.distributed import run_ranks

LEFT_COLUMNS = ("strategy",)  # the rest align right

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join("benchmarks", "results", "sp_cpu.json")
SHAPE = dict(batch=1, q_heads=8, kv_heads=2, head_dim=64, element_bytes=2)  # bf16, model and measured
WINDOW = 1024
ACCUM_BYTES = 4  # lse and dK/dV accumulators are fp32 for bf16
MIB = float(1 << 20)


@dataclass(frozen=True)
class Variant:
    """One strategy: a ring under `layout` and `mask`, Ulysses, or hybrid u x r (ring across r groups)."""

    name: str
    kind: str  # "ring", "ulysses" or "hybrid"
    layout: Layout = Layout.CONTIGUOUS
    mask: str = "causal"
    u: int = 1
    r: int = 1


def variants(world: int) -> list[Variant]:
    """Every strategy applicable on `world` ranks, ring first (the ratios' baseline)."""
    found = [Variant("ring", "ring"), Variant("zigzag", "ring", Layout.ZIGZAG),
             Variant("striped", "ring", Layout.STRIPED), Variant("halo", "ring", mask="window"),
             Variant("ulysses", "ulysses")]
    found += [Variant(f"hybrid {u}x{world // u}", "hybrid", Layout.ZIGZAG, u=u, r=world // u)
              for u in range(2, world) if world % u == 0]
    return found


def mask_of(name: str):
    """causal, or causal & a sliding window of WINDOW tokens (the query and WINDOW-1 before it)."""
    return Causal() if name == "causal" else Causal() & SlidingWindow(WINDOW - 1, 0)


# ----------------------------------------------------------------------------- model


def model_row(v: Variant, seq_len: int, world: int) -> dict:
    """Cost-model bytes of the busiest rank (and all ranks) per layer, forward and backward."""
    values = LayerShape(seq_len=seq_len, world=world, **SHAPE).values()
    mask = mask_of(v.mask)
    row = {"strategy": v.name, "N": seq_len, "P": world, "hops": None, "work_imbalance": 1.0}
    if v.kind == "ring":
        plan = plan_ring(mask, v.layout, world, seq_len)
        estimate = ring_estimate(mask, plan, seq_len=seq_len)
        totals = (ring_bytes(plan, total=True), ring_bytes(plan, backward=True, total=True))
        row.update(hops=max_hops(plan), work_imbalance=work_imbalance(v, world, seq_len))
    elif v.kind == "ulysses":
        estimate = ulysses_estimate(mask, seq_len=seq_len)
        totals = (ulysses_bytes(total=True), ulysses_bytes(backward=True, total=True))
    else:
        estimate = hybrid_estimate(mask, v.u, v.r, seq_len=seq_len)
        totals = (None, None)
        row.update(work_imbalance=work_imbalance(v, v.r, seq_len))
    cost = estimate.evaluate(**values)
    row.update(model_label=estimate.strategy, fwd=cost["forward_bytes"], bwd=cost["backward_bytes"],
               fwd_total=None if totals[0] is None else evaluate_expr(totals[0], **values),
               bwd_total=None if totals[1] is None else evaluate_expr(totals[1], **values))
    row.update(act=activation_bytes(v, world, seq_len), act_single=activation_bytes(None, 1, seq_len))
    return row


def max_hops(plan) -> int:
    """The longest path any shard's K/V travels under `plan` (P-1 for a dense ring)."""
    longest = 0
    for source in range(plan.world):
        holder, step = source, 0
        while step < plan.world - 1 and plan.sends[step][holder]:
            holder, step = (holder + 1) % plan.world, step + 1
        longest = max(longest, step)
    return longest


def work_imbalance(v: Variant, world: int, seq_len: int) -> float:
    """Busiest rank's allowed (q, kv) pairs over the mean: a query at p sees min(p+1, window) keys."""
    reach = seq_len if v.mask == "causal" else WINDOW
    work = [float(torch.clamp(shard_positions(v.layout, r, world, seq_len) + 1, max=reach).sum())
            for r in range(world)]
    return max(work) / (sum(work) / world)


def activation_bytes(v: Variant | None, world: int, seq_len: int) -> int:
    """Analytic peak resident bytes of one rank: q/k/v/out/lse for its N/P tokens, plus what the scheme
    holds beside them (score tiles and workspaces are not counted). v=None: one process, whole sequence.

    ring/halo: the held K/V message and the one arriving (bf16), the travelling dK/dV accumulator and
    the one arriving (fp32), as the backward ring double-buffers them. Ulysses: the head-sharded q, k, v,
    out, lse over all N tokens (Hq/P and max(Hkv, P)/P heads). hybrid: Ulysses over N/R tokens within a
    group of U, plus the ring buffers of N/R tokens and max(Hkv, U)/U heads.
    """
    b, hq, hkv, d, e = (SHAPE[k] for k in ("batch", "q_heads", "kv_heads", "head_dim", "element_bytes"))
    local = seq_len // world
    shards = b * local * ((2 * hq + 2 * hkv) * d * e + hq * ACCUM_BYTES)
    if v is None:
        return shards

    def heads_view(tokens: int, group: int) -> int:
        return b * tokens * ((2 * hq + 2 * max(hkv, group)) * d * e + hq * ACCUM_BYTES) // group

    def ring_buffers(tokens: int, kv_heads: int) -> int:
        message = 2 * b * tokens * kv_heads * d  # K and V (or dK and dV) elements
        return 2 * message * e + 2 * message * ACCUM_BYTES

    if v.kind == "ring":
        return shards + ring_buffers(local, hkv)
    if v.kind == "ulysses":
        return shards + heads_view(seq_len, world)
    tokens = seq_len // v.r
    return shards + heads_view(tokens, v.u) + ring_buffers(tokens, max(hkv, v.u) // v.u)


# ----------------------------------------------------------------------------- measurement


def _sent(comm: Communicator) -> int:
    return comm.bytes_sent


def run_variant(comm: Communicator, v: Variant, seq_len: int) -> dict:
    """Forward + backward of one strategy on this rank: bytes sent in each, and seconds."""
    b, hq, hkv, d = (SHAPE[k] for k in ("batch", "q_heads", "kv_heads", "head_dim"))
    gen = torch.Generator().manual_seed(1000 * comm.rank + seq_len)
    local = seq_len // comm.world

    def draw(heads: int) -> torch.Tensor:
        return torch.randn(b, heads, local, d, generator=gen).to(torch.bfloat16)

    q, k, v_, dout = draw(hq), draw(hkv), draw(hkv), draw(hq)
    mask, scale = mask_of(v.mask), d ** -0.5

    def positions_of(rank: int) -> torch.Tensor:
        return shard_positions(v.layout, rank, comm.world, seq_len)

    common: tuple = (mask, NoScoreMod(), scale)
    if v.kind == "ring":
        common += (plan_ring(mask, v.layout, comm.world, seq_len),)
        forward, backward = ring_attention_forward, ring_attention_backward
    else:
        forward, backward = ulysses_attention_forward, ulysses_attention_backward
    start, began = _sent(comm), time.perf_counter()
    out, lse = forward(comm, q, k, v_, *common, positions_of)
    middle = _sent(comm)
    backward(comm, dout, q, k, v_, out, lse, *common, positions_of)
    return {"fwd": middle - start, "bwd": _sent(comm) - middle, "seconds": time.perf_counter() - began}


def measure_worker(rank: int, world: int, jobs: list[tuple[Variant, int]]) -> list[dict]:
    """Entry point of each spawned rank: every (strategy, N) job in one process group."""
    comm = Communicator(timeout_s=300)
    return [run_variant(comm, v, seq_len) for v, seq_len in jobs]


def measure(world: int, seq_lens: list[int]) -> list[dict]:
    """Per job: bytes sent per rank (forward, backward) and the slowest rank's seconds."""
    jobs = [(v, n) for n in seq_lens for v in variants(world) if v.kind != "hybrid"]
    per_rank = run_ranks(world, measure_worker, jobs, timeout_s=900)
    rows = []
    for index, (v, seq_len) in enumerate(jobs):
        ranks = [results[index] for results in per_rank]
        rows.append({"strategy": v.name, "N": seq_len, "P": world,
                     "fwd_per_rank": [r["fwd"] for r in ranks], "bwd_per_rank": [r["bwd"] for r in ranks],
                     "seconds_max": max(r["seconds"] for r in ranks)})
    return rows


def compare(measured: dict, model: dict) -> dict:
    """Measured busiest rank and sum over ranks against the model; `mismatches` lists every difference."""
    checks = {"fwd": (max(measured["fwd_per_rank"]), model["fwd"]),
              "bwd": (max(measured["bwd_per_rank"]), model["bwd"]),
              "fwd_total": (sum(measured["fwd_per_rank"]), model["fwd_total"]),
              "bwd_total": (sum(measured["bwd_per_rank"]), model["bwd_total"])}
    mismatches = [f"{key}: measured {got:,} != model {want:,}" for key, (got, want) in checks.items() if got != want]
    return {**measured, "fwd_max": checks["fwd"][0], "bwd_max": checks["bwd"][0], "model_fwd": model["fwd"],
            "model_bwd": model["bwd"], "mismatches": mismatches}


# ----------------------------------------------------------------------------- tables


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / MIB:,.2f}"


def _wide(model: list[dict], cell) -> tuple[list[str], list[list[str]]]:
    """Rows (N, P), one column per strategy, cells from cell(row, ring_row)."""
    names = list(dict.fromkeys(r["strategy"] for r in model))
    header, body = ["N", "P", *names], []
    for n, p in dict.fromkeys((r["N"], r["P"]) for r in model):
        here = {r["strategy"]: r for r in model if (r["N"], r["P"]) == (n, p)}
        body.append([f"{n // 1024}k", str(p), *(cell(here[s], here["ring"]) if s in here else "-" for s in names)])
    return header, body


def _bytes_cell(row: dict, ring: dict) -> str:
    """forward / backward MiB; halo also says how many hops its longest path takes."""
    hops = f" ({row['hops']} hop{'s' * (row['hops'] != 1)})" if row["strategy"] == "halo" else ""
    return f"{_mib(row['fwd'])} / {_mib(row['bwd'])}{hops}"


def render(payload: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of every table."""
    model, shape = payload["model"], "B=1, Hq=8, Hkv=2 (GQA), D=64, bf16 (e=2; lse, dK/dV fp32)"
    tables = [(f"Model: MiB sent per layer by the busiest rank, forward / backward [{shape}]",
               *_wide(model, _bytes_cell)),
              ("Model: forward+backward bytes as a ratio of ring's (same N, P)",
               *_wide(model, lambda r, ring: f"{(r['fwd'] + r['bwd']) / (ring['fwd'] + ring['bwd']):.2f}")),
              ("Work balance: busiest rank's (q, kv) pairs / mean (ring across groups for hybrid)",
               *_wide(model, lambda r, ring: f"{r['work_imbalance']:.2f}")),
              ("Analytic peak activation MiB per rank (ratio vs one process holding q/k/v/out/lse)",
               *_wide(model, lambda r, ring: f"{_mib(r['act'])} ({r['act'] / r['act_single']:.2f})"))]
    header = ["N", "P", "strategy", "fwd max MiB", "model fwd", "bwd max MiB", "model bwd", "max rank s", "check"]
    body = [[f"{m['N'] // 1024}k", str(m["P"]), m["strategy"], _mib(m["fwd_max"]), _mib(m["model_fwd"]),
             _mib(m["bwd_max"]), _mib(m["model_bwd"]), f"{m['seconds_max']:.1f}",
             "MISMATCH: " + "; ".join(m["mismatches"]) if m["mismatches"] else "exact"] for m in payload["measured"]]
    if body:
        tables.append((f"Measured on gloo ranks (Communicator.stats, busiest rank) vs model, same shape [{shape}]; "
                       "check also compares the sum over ranks", header, body))
    return tables


# ----------------------------------------------------------------------------- main


def machine_info() -> dict:
    return {**results_io.machine_info(HERE), "torch": torch.__version__}


def run(args: argparse.Namespace, argv: list[str]) -> dict:
    """Model every (N, P), measure the small ones, and gather the payload."""
    started = _dt.datetime.now(_dt.timezone.utc)
    model = [model_row(v, n, p) for n in args.seq_lens for p in args.worlds for v in variants(p)]
    measured = []
    for p in args.worlds:
        small = [n for n in args.seq_lens if n <= args.measure_max_seq]
        if small:
            print(f"measuring P={p} N={small} on gloo ...", file=sys.stderr, flush=True)
            lookup = {(r["strategy"], r["N"], r["P"]): r for r in model}
            measured += [compare(m, lookup[m["strategy"], m["N"], m["P"]]) for m in measure(p, small)]
    return {"benchmark": "sp_cpu",
            "command": " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0]), *argv]),
            "started_utc": started.isoformat(timespec="seconds"),
            "finished_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_info(), "shape": {**SHAPE, "window": WINDOW, "dtype": "bfloat16"},
            "variants": {p: [asdict(v) | {"layout": v.layout.value} for v in variants(p)] for p in args.worlds},
            "model": model, "measured": measured}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--measure-max-seq", type=int, default=4096, help="largest N run on gloo ranks (0: none)")
    results_io.add_output_arguments(parser, DEFAULT_OUT)
    args = parser.parse_args(argv)
    payload = results_io.run_or_report(args, lambda: run(args, argv), render, LEFT_COLUMNS)
    mismatched = [m for m in payload["measured"] if m["mismatches"]]
    for m in mismatched:
        print(f"MISMATCH {m['strategy']} N={m['N']} P={m['P']}: {'; '.join(m['mismatches'])}", file=sys.stderr)
    return 1 if mismatched else 0


if __name__ == "__main__":
    sys.exit(main())
