"""Whole training step (forward + backward + zeroing gradients) of a Llama-shaped model: eager,
torch.compile (Inductor), seqweave with each inner backend, and seqweave on 4 gloo ranks.

Llama (hidden 256, 4 layers, 4 heads / 2 KV heads, intermediate 688, vocab 4096, random weights,
batch 1, float32, attn_implementation="sdpa"), the loss computed inside the model (labels = ids).
Every row runs in the same invocation: a first step (compile + step, reported separately), then
the median of --steps steps. Times are given as ratios to torch.compile's step. The loss of every
compiled row must match eager's within 1e-4 relative, else a FAIL line and exit code 1.

The rank rows run seqweave with Mesh(sp=P) on P real gloo processes (seqweave.testing.distributed):
per-rank step time (the slowest rank's median), the bytes each rank sends (`backend.comm_stats()`)
and the seconds a rank spends blocked in seqweave's collectives (timed here by wrapping
Communicator's public waiting calls; that includes waiting for a slower peer). The target
is "single-process seqweave inductor step / P + comm".

--gpu: hidden 2048, 8 layers, 32k tokens, bfloat16 on CUDA, the same single-process rows plus
tokens/s and MFU against an assumed peak (--peak-tflops, else a table of known devices).

    python benchmarks/step.py                                   # N = 4096, 16384; 4 ranks
    python benchmarks/step.py --lengths 512 --steps 2           # quick
    python benchmarks/step.py --profile                         # + top ops of one seqweave inductor step
    python benchmarks/step.py --gpu
    python benchmarks/step.py --report benchmarks/results/step.json --markdown
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import os
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Iterator

import torch

import results_io  # benchmarks/ is on sys.path when a script runs

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join("benchmarks", "results", "step.json")
LEFT_COLUMNS = ("row",)
RTOL = 1e-4  # loss of every compiled row against eager's, relative
BASELINE = "torch.compile"
#: dense bf16 peak FLOP/s by device-name fragment (vendor datasheets, no sparsity)
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "4090": 165e12}


@dataclass(frozen=True)
class Shape:
    """The model and its step: Llama sizes, dtype, device."""

    hidden: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 688
    vocab: int = 4096
    dtype: str = "float32"
    device: str = "cpu"

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


CPU_SHAPE = Shape()
GPU_SHAPE = Shape(hidden=2048, layers=8, heads=16, kv_heads=8, intermediate=5632, vocab=32000, dtype="bfloat16",
                  device="cuda")


# ----------------------------------------------------------------------------- the step


class LossOnly(torch.nn.Module):
    """The causal LM returning its loss only (labels = the inputs, shifted inside HF's loss)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, labels=ids, use_cache=False).loss


def build_model(shape: Shape, seq_len: int) -> torch.nn.Module:
    """Random weights, seed 0: every row (and every rank) builds the same model."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, max_position_embeddings=seq_len,
                         attention_dropout=0.0, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).to(device=shape.device, dtype=getattr(torch, shape.dtype))
    return LossOnly(model).train()


def input_ids(shape: Shape, seq_len: int) -> torch.Tensor:
    return torch.randint(0, shape.vocab, (1, seq_len), generator=torch.Generator().manual_seed(1)).to(shape.device)


def train_step(model: torch.nn.Module, ids: torch.Tensor) -> float:
    """Forward, backward, gradients zeroed (set to None); the loss."""
    loss = model(ids)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return loss.detach().float().item()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str) -> tuple[Any, float]:
    _sync(device)
    started = time.perf_counter()
    value = fn()
    _sync(device)
    return value, time.perf_counter() - started


def compiled(model: torch.nn.Module, row: str, world: int = 1) -> tuple[torch.nn.Module, Any]:
    """(the model as `row` runs it, the seqweave backend or None)."""
    if row == "eager":
        return model, None
    if row == BASELINE:
        return torch.compile(model, dynamic=False), None
    import seqweave
    inner = row.split()[-1]
    backend = seqweave.backend(inner_backend=inner, mesh=seqweave.Mesh(sp=world), timeout=3600)
    return torch.compile(model, backend=backend, dynamic=False), backend


def measure_row(row: str, shape: Shape, seq_len: int, steps: int, world: int = 1) -> dict:
    """First step (compile + run) and the median of `steps` more, on a fresh model and fresh dynamo caches."""
    torch._dynamo.reset()
    model, backend = compiled(build_model(shape, seq_len), row, world)
    ids = input_ids(shape, seq_len)
    with comm_timer() as blocked:
        loss, first = timed(lambda: train_step(model, ids), shape.device)
        first_comm, first_bytes = blocked.seconds, _bytes_sent(backend)
        times, comm = [], []
        for _ in range(steps):
            before = blocked.seconds
            times.append(timed(lambda: train_step(model, ids), shape.device)[1])
            comm.append(blocked.seconds - before)
    step = statistics.median(times)
    result = {"row": row, "N": seq_len, "world": world, "loss": loss, "first_s": first, "step_s": step,
              "steps_s": times, "compile_s": max(first - step, 0.0), "tokens_per_s": seq_len / step}
    if backend is not None:
        result.update(_backend_facts(backend, steps, first_bytes))
        if world > 1:
            result.update(comm_s=statistics.median(comm), first_comm_s=first_comm)
    return result


def _bytes_sent(backend: Any) -> int:
    return 0 if backend is None else sum(e["bytes_sent"] for e in backend.comm_stats().values())


def _backend_facts(backend: Any, steps: int, first_bytes: int) -> dict:
    """Which runner ran each graph, Inductor's compile count and seconds, bytes sent per step."""
    programs = [g.program.stats for g in backend.graphs if g.runner == "inductor"]
    per_step = (_bytes_sent(backend) - first_bytes) // max(steps, 1)
    return {"runners": [f"{g.kind}:{g.runner}" for g in backend.graphs],
            "inductor_compiles": sum(p["compiles"] for p in programs),
            "inductor_compile_s": sum(p["compile_s"] for p in programs),
            "bytes_sent_per_step": per_step,
            "comm_stats_total": {kind: e for kind, e in backend.comm_stats().items() if e["calls"]}}  # warm-up + steps


class _Blocked:
    seconds = 0.0


@contextlib.contextmanager
def comm_timer() -> Iterator[_Blocked]:
    """Seconds spent inside Communicator's blocking calls (Pending.wait, all_to_all, all_gather, all_reduce)."""
    from seqweave.runtime.comm import Communicator, Pending
    blocked = _Blocked()
    originals = [(Pending, "wait"), (Communicator, "all_to_all"), (Communicator, "all_gather"),
                 (Communicator, "all_reduce")]
    saved = [(owner, name, getattr(owner, name)) for owner, name in originals]

    def timing(fn: Callable) -> Callable:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                blocked.seconds += time.perf_counter() - started
        return wrapper

    for owner, name, fn in saved:
        setattr(owner, name, timing(fn))
    try:
        yield blocked
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


# ----------------------------------------------------------------------------- rows


ROWS = ("eager", BASELINE, "seqweave eager", "seqweave inductor")


def single_rows(shape: Shape, seq_len: int, steps: int, names: list[str]) -> list[dict]:
    rows = []
    for row in (r for r in ROWS if r in names):
        print(f"N={seq_len} {row} ...", file=sys.stderr, flush=True)
        rows.append(measure_row(row, shape, seq_len, steps))
    return rows


def rank_worker(rank: int, world: int, jobs: list[tuple[str, Shape, int, int, int]]) -> list[dict]:
    """Every rank job in one process group; threads per rank as the parent decided."""
    results = []
    for row, shape, seq_len, steps, threads in jobs:
        torch.set_num_threads(threads)
        results.append({**measure_row(row, shape, seq_len, steps, world), "rank": rank})
    return results


def rank_rows(shape: Shape, seq_lens: list[int], steps: int, world: int, threads: int, timeout_s: float,
              names: list[str]) -> list[dict]:
    """seqweave inductor and eager (those in `names`) on `world` gloo ranks: the slowest rank's step,
    every rank's numbers."""
    from seqweave.testing.distributed import run_ranks
    jobs = [(row, shape, n, steps, threads) for row in ("seqweave inductor", "seqweave eager") if row in names
            for n in seq_lens]
    print(f"{world} ranks, N={seq_lens} ...", file=sys.stderr, flush=True)
    per_rank = run_ranks(world, rank_worker, jobs, timeout_s=timeout_s)
    rows = []
    for index, (row, _, seq_len, _, _) in enumerate(jobs):
        ranks = [results[index] for results in per_rank]
        slowest = max(ranks, key=lambda r: r["step_s"])
        rows.append({**slowest, "row": f"{row}, {world} ranks", "threads_per_rank": threads,
                     "step_s_per_rank": [r["step_s"] for r in ranks], "comm_s_per_rank": [r["comm_s"] for r in ranks],
                     "first_s": max(r["first_s"] for r in ranks), "compile_s": max(r["compile_s"] for r in ranks),
                     "loss_per_rank": [r["loss"] for r in ranks]})
    return sorted(rows, key=lambda r: r["N"])


def check_losses(rows: list[dict]) -> list[str]:
    """Every row's loss (every rank's) against eager's at the same N, relative."""
    eager = {r["N"]: r["loss"] for r in rows if r["row"] == "eager"}
    failures = []
    for row in rows:
        want = eager.get(row["N"])
        for got in row.get("loss_per_rank", [row["loss"]]):
            error = abs(got - want) / abs(want) if want is not None else float("nan")
            row["loss_rel_err"] = max(row.get("loss_rel_err", 0.0), error)
            if not error <= RTOL:
                failures.append(f"FAIL: {row['row']} N={row['N']}: loss {got!r} vs eager {want!r} "
                                f"(relative {error:.2e} > {RTOL:g})")
    return failures


def with_ratios(rows: list[dict]) -> list[dict]:
    """step and first call / torch.compile's (same N); rank rows also against single inductor / P + comm."""
    base = {r["N"]: r for r in rows if r["row"] == BASELINE}
    single = {r["N"]: r for r in rows if r["row"] == "seqweave inductor"}
    for row in rows:
        ref = base.get(row["N"])
        row["step_vs_compile"] = row["step_s"] / ref["step_s"] if ref else None
        row["first_vs_compile"] = row["first_s"] / ref["first_s"] if ref else None
        if row["world"] > 1 and row["N"] in single:
            row["target_s"] = single[row["N"]]["step_s"] / row["world"] + row["comm_s"]
            row["step_vs_target"] = row["step_s"] / row["target_s"]
    return rows


# ----------------------------------------------------------------------------- GPU


def attention_flops(shape: Shape, seq_len: int) -> float:
    """Causal attention, forward + backward: 12·L·H·D·N² / 2 (PaLM's 12·L·H·Q·T per token, halved for causal)."""
    return 12 * shape.layers * shape.heads * shape.head_dim * seq_len * seq_len / 2


def model_flops(shape: Shape, params: int, seq_len: int) -> float:
    return 6 * params * seq_len + attention_flops(shape, seq_len)


def device_peak(override_tflops: float | None) -> tuple[float | None, str]:
    """(peak bf16 FLOP/s, where it came from)."""
    if override_tflops:
        return override_tflops * 1e12, "--peak-tflops"
    name = torch.cuda.get_device_name()
    for fragment, peak in PEAK_BF16.items():
        if fragment in name:
            return peak, f"datasheet dense bf16 for {fragment}"
    return None, f"unknown device {name!r}: pass --peak-tflops"


def add_mfu(rows: list[dict], shape: Shape, args: argparse.Namespace) -> dict:
    peak, source = device_peak(args.peak_tflops)
    params = sum(p.numel() for p in build_model(shape, 16).parameters())
    for row in rows:
        flops = model_flops(shape, params, row["N"])
        row["model_flops"] = flops
        row["mfu"] = flops / row["step_s"] / peak if peak else None
    return {"peak_flops": peak, "peak_source": source, "params": params,
            "flop_convention": "6 * params * tokens + causal attention 12*L*H*D*N^2/2 (fwd+bwd)"}


# ----------------------------------------------------------------------------- tables


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _per_rank(seconds: list[float]) -> str:
    return ", ".join(f"{t:.2f}" for t in seconds)


def render(payload: dict) -> list[results_io.TableData]:
    settings = payload["settings"]
    header = ["N", "row", "step vs torch.compile", "first call vs torch.compile", "step s", "first call s",
              "tokens/s", "loss rel err"]
    gpu = settings["shape"]["device"] == "cuda"
    if gpu:
        header.append("MFU")
    body = []
    for r in payload["rows"]:
        line = [str(r["N"]), r["row"], _x(r["step_vs_compile"]), _x(r["first_vs_compile"]), _s(r["step_s"]),
                _s(r["first_s"]), f"{r['tokens_per_s']:,.0f}", f"{r['loss_rel_err']:.1e}"]
        body.append(line + ([f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"] if gpu else []))
    shape = settings["shape"]
    tables = [(f"Training step, Llama hidden {shape['hidden']}, {shape['layers']} layers, vocab {shape['vocab']}, "
               f"{shape['dtype']}, {shape['device']}, batch 1; {settings['threads']} thread(s), "
               f"median of {settings['steps']} steps", header, body)]
    ranked = [r for r in payload["rows"] if r["world"] > 1]
    if ranked:
        tables.append((f"{ranked[0]['world']} gloo ranks, {ranked[0]['threads_per_rank']} thread(s) each "
                       f"(on {payload['machine']['nproc']} cores): slowest rank vs single-process inductor / P + comm",
                       ["N", "row", "step s/rank (per rank)", "comm s (blocked)", "MiB sent/step/rank",
                        "target s", "step vs target", "step vs torch.compile"],
                       [[str(r["N"]), r["row"], f"{r['step_s']:.2f} ({_per_rank(r['step_s_per_rank'])})",
                         _s(r["comm_s"]), f"{r['bytes_sent_per_step'] / (1 << 20):,.1f}", _s(r.get("target_s")),
                         _x(r.get("step_vs_target")), _x(r["step_vs_compile"])] for r in ranked]))
    compiles = [r for r in payload["rows"] if "inductor_compile_s" in r]
    if compiles:
        tables.append(("seqweave graphs and Inductor compiles (first call)", ["N", "row", "runners", "compiles",
                                                                             "Inductor compile s"],
                       [[str(r["N"]), r["row"], " ".join(r["runners"]), str(r["inductor_compiles"]),
                         _s(r["inductor_compile_s"])] for r in compiles]))
    if payload.get("profile"):
        prof = payload["profile"]
        tables.append((f"Top ops of one seqweave inductor step, N={prof['N']} (self CPU time)",
                       ["op", "self CPU s", "share", "calls"],
                       [[o["op"], f"{o['self_s']:.3f}", f"{100 * o['share']:.0f}%", str(o["calls"])]
                        for o in prof["ops"]]))
    return tables


# ----------------------------------------------------------------------------- profile


def profile_step(shape: Shape, seq_len: int, top: int = 12) -> dict:
    """One seqweave inductor step (after the compiling one) under torch.profiler: the top ops by self CPU time."""
    from torch.profiler import ProfilerActivity, profile
    torch._dynamo.reset()
    model, _ = compiled(build_model(shape, seq_len), "seqweave inductor")
    ids = input_ids(shape, seq_len)
    train_step(model, ids)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train_step(model, ids)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return {"N": seq_len, "total_s": total / 1e6,
            "ops": [{"op": e.key, "self_s": e.self_cpu_time_total / 1e6, "share": e.self_cpu_time_total / total,
                     "calls": e.count} for e in events[:top]]}


# ----------------------------------------------------------------------------- main


def run(args: argparse.Namespace, argv: list[str]) -> dict:
    started = _dt.datetime.now(_dt.timezone.utc)
    shape = replace(GPU_SHAPE if args.gpu else CPU_SHAPE, **({"layers": args.layers} if args.layers else {}))
    torch.set_num_threads(args.threads)
    rows = [row for n in args.lengths for row in single_rows(shape, n, args.steps, args.rows)]
    world = args.ranks if args.ranks > 1 and not args.gpu else 1  # --gpu: one device, no rank rows
    if world > 1 and {"seqweave eager", "seqweave inductor"} & set(args.rows):
        per_rank = max(1, args.threads // world)
        rows += rank_rows(shape, args.lengths, args.steps, world, per_rank, args.timeout, args.rows)
    rows.sort(key=lambda r: r["N"])  # stable: single-process rows, then the ranks, per N
    failures = check_losses(rows)
    rows = with_ratios(rows)
    extra = add_mfu(rows, shape, args) if args.gpu else {}
    payload = {"benchmark": "step",
               "command": " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0]), *argv]),
               "started_utc": started.isoformat(timespec="seconds"),
               "machine": {**results_io.machine_info(HERE), "torch": torch.__version__,
                           **({"device": torch.cuda.get_device_name()} if args.gpu else {})},
               "settings": {"shape": asdict(shape), "lengths": args.lengths, "steps": args.steps,
                            "threads": args.threads, "ranks": world, "rtol": RTOL, **extra},
               "rows": rows, "failures": failures}
    if args.profile:
        print(f"profiling one seqweave inductor step at N={args.lengths[0]} ...", file=sys.stderr, flush=True)
        payload["profile"] = profile_step(shape, args.lengths[0])
    payload["finished_utc"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return payload


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=lambda s: [int(n) for n in s.split(",")], default=None,
                        help="comma-separated sequence lengths (CPU default 4096,16384; --gpu 32768)")
    parser.add_argument("--rows", type=lambda s: s.split(","), default=list(ROWS),
                        help=f"comma-separated rows to run, of {','.join(ROWS)} (the seqweave ones on ranks too)")
    parser.add_argument("--steps", type=int, default=3, help="measured steps per row (median)")
    parser.add_argument("--ranks", type=int, default=4, help="gloo ranks of the sequence-parallel rows (1: none)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (per rank: threads // ranks, >= 1)")
    parser.add_argument("--layers", type=int, default=None, help="override the layer count (smoke tests)")
    parser.add_argument("--profile", action="store_true", help="profile one seqweave inductor step at the first N")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds for all rank rows together")
    parser.add_argument("--gpu", action="store_true", help="hidden 2048, 8 layers, 32k tokens, bf16 on CUDA")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak bf16 TFLOP/s for MFU (--gpu)")
    results_io.add_output_arguments(parser, DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.gpu and not args.report and not torch.cuda.is_available():
        print("--gpu: CUDA is not available on this machine; nothing measured", file=sys.stderr)
        return 0
    unknown = sorted(set(args.rows) - set(ROWS))
    if unknown:
        parser.error(f"--rows: unknown {unknown}; rows are {list(ROWS)}")
    if "eager" not in args.rows:
        parser.error("--rows must include eager: every other row's loss is checked against it")
    args.lengths = args.lengths or ([32768] if args.gpu else [4096, 16384])
    payload = results_io.run_or_report(args, lambda: run(args, argv), render, LEFT_COLUMNS)
    for line in payload["failures"]:
        print(line, file=sys.stderr)
    if payload["failures"]:
        print(f"FAIL: {len(payload['failures'])} row(s) disagree with eager's loss", file=sys.stderr)
    return 1 if payload["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
