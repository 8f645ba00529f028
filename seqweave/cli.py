"""The `seqweave` command: `demo`, `explain`, `kernels`, `run`, `convert` and `fuzz`."""
from __future__ import annotations

import json
import sys
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from seqweave.config import BALANCES, DEFAULT_PIPELINE
from seqweave.errors import OptionError, SeqweaveError
from seqweave.testing.models import SampleSpec

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="seqweave: compile PyTorch models for long-context attention.")
#: Piped output (CI logs, files) gets wide tables instead of rich's 80-column default.
PIPED_WIDTH = 160
out = Console(width=None if sys.stdout.isatty() else PIPED_WIDTH)
err = Console(stderr=True)


def _fail(error: SeqweaveError) -> None:
    err.print(f"[bold red]error:[/] {error}")
    raise typer.Exit(2)


def _plain(console: Console):
    """A print function for text that is not rich markup (IR shapes look like `[2, 8]`)."""
    return lambda text: console.print(text, markup=False, highlight=False, soft_wrap=True)


def _demo_sp(world: int, seq_len: int) -> None:
    from seqweave.demo import TOLERANCE
    from seqweave.demo_sp import run_demo

    with err.status(f"training tiny Llama at {seq_len} tokens on {world} ranks under each strategy…"):
        rows = run_demo(world, seq_len)
    table = Table(title=f"sequence parallel over {world} ranks, {seq_len} tokens, vs one process eager (fp32)")
    for column in ("strategy", "attention", "|Δloss|", "max grad err", "bytes sent (busiest rank)",
                   "predicted", "saved activations vs 1 process", "time ratio", "ok"):
        table.add_column(column, justify="left" if column in ("strategy", "attention") else "right")
    for row in rows:
        table.add_row(row.label, row.attention_op, f"{row.loss_error:.1e}", f"{row.grad_error:.1e}",
                      f"{row.bytes_measured:,}", f"{row.bytes_predicted:,}", f"{row.saved_ratio:.2f}",
                      f"{row.time_ratio:.2f}",
                      "[green]yes[/]" if row.passed(TOLERANCE) else "[red]NO[/]")
    out.print(table)
    out.print("bytes = attention traffic (ring shifts or Ulysses all-to-alls), forward + backward, both layers; "
              "saved activations = bytes the compiled forward keeps for the backward on the busiest rank / in one process; "
              "time ratio = compiled step on each rank / eager step of the whole sequence in one process.")
    if not all(row.passed(TOLERANCE) for row in rows):
        raise typer.Exit(1)


@app.command()
def demo(sp: int = typer.Option(4, "--sp", help="local ranks for the sequence-parallel part (1: skip it)"),
         seq_len: int = typer.Option(4096, "--seq-len", help="sequence length of the sequence-parallel part"),
         single: bool = typer.Option(True, "--single/--no-single", help="run the single-device part")) -> None:
    """Built-in tiny HF models through the seqweave backend (forward + backward) against eager on one
    device, then tiny Llama trained on SP local ranks under each sequence-parallel strategy."""
    if single:
        _demo_single()
    if sp > 1:
        _demo_sp(sp, seq_len)


def _demo_single() -> None:
    from seqweave.demo import DEMO_CASES, TOLERANCE, run_case

    table = Table(title=f"seqweave vs eager (fp32, tolerance {TOLERANCE:g})")
    for column in ("model", "variant", "attention", "mask", "max|Δlogits|", "|Δloss|", "max grad err",
                   "compile s", "time ratio", "ok"):
        table.add_column(column, justify="left" if column in ("model", "variant", "mask") else "right")
    rows = []
    for index, spec in enumerate(DEMO_CASES, start=1):
        with err.status(f"[{index}/{len(DEMO_CASES)}] compiling {spec.name} ({spec.attn_implementation})…"):
            rows.append(run_case(spec))
        c = rows[-1].comparison
        table.add_row(spec.name, rows[-1].variant, rows[-1].attention, rows[-1].mask, f"{c.logits_max_abs:.1e}",
                      f"{c.loss_abs:.1e}", f"{c.grad_max_rel:.1e}", f"{c.compile_s:.1f}", f"{c.time_ratio:.2f}",
                      "[green]yes[/]" if rows[-1].passed else "[red]NO[/]")
    out.print(table)
    from seqweave.codegen.attention_kernels import kernels_in_use
    out.print(f"time ratio = steady-state compiled step / eager step (tiny shapes on CPU; attention ran on: "
              f"{kernels_in_use('cpu')}).")
    if not all(row.passed for row in rows):
        raise typer.Exit(1)


def _explain_table(explanation, world: int) -> Table:
    table = Table(title="attention per layer" + (f" (sequence parallel over {world} ranks)" if world > 1 else ""))
    columns = ["layer", "found", "form", "q heads", "kv heads", "head dim", "mask", "positions", "note"]
    if world > 1:
        columns += ["strategy", "fwd bytes/device", "bwd bytes/device"]
    for column in columns:
        table.add_column(column)
    for layer in explanation.layers:
        after = layer.get("after") or {}
        row = [layer["layer"], "yes" if layer["found"] else "no", layer["form"], str(layer["q_heads"]),
               str(layer["kv_heads"]), str(layer["head_dim"]), after.get("mask", layer["mask"]),
               escape(after.get("positions", layer["positions"] or "none")), escape(layer["reason"])]
        if world > 1:
            sp = layer.get("sp", {})
            row += [sp.get("strategy", "-"), f"{sp['forward_bytes']:,}" if sp else "-",
                    f"{sp['backward_bytes']:,}" if sp else "-"]
        table.add_row(*row)
    return table


@app.command()
def explain(target: str = typer.Argument(..., help="built-in sample (llama-tiny, qwen2-tiny, mistral-tiny, gpt2-tiny) "
                                          "or package.module:function returning (model, example_inputs)"),
            seq_len: int = typer.Option(64, help="sequence length of built-in samples"),
            layers: int = typer.Option(2, help="decoder layers of built-in samples"),
            hidden: int = typer.Option(64, help="hidden size of built-in samples"),
            attn: str = typer.Option("sdpa", help="attn_implementation of built-in samples: sdpa or eager"),
            padded: bool = typer.Option(False, help="left-pad the batch (attention_mask)"),
            packed: bool = typer.Option(False, help="pack several documents per row (restarting position ids)"),
            sp: int = typer.Option(1, "--sp", help="also show the cost model's sequence-parallel strategy "
                                                   "and predicted bytes per layer for this many ranks"),
            balance: str = typer.Option("zigzag", help="sequence layout for --sp: zigzag, striped or none"),
            pipeline: str = typer.Option(DEFAULT_PIPELINE, help="pass pipeline, e.g. "
                                         "'canonicalize,streaming{sinks=4,window=1024}': the table shows each "
                                         "attention's mask and positions after it"),
            memory: bool = typer.Option(False, "--memory", help="predict each rank's training-step memory as an "
                                        "expression of N (built-in samples: captures at N/4, N/2 and N)"),
            budget: str = typer.Option("", "--budget", help="plan a training step's activations under this "
                                       "device budget per rank (bytes like 12GB, or a fraction of the plan-free "
                                       "peak like 0.25) and show per layer what is kept, offloaded, recomputed"),
            quantize: bool = typer.Option(False, "--quantize", help="with --budget: allow 8-bit storage"),
            as_json: bool = typer.Option(False, "--json", help="print JSON instead of tables")) -> None:
    """Capture TARGET and show, per layer, the attention found and its lifted MaskSpec."""
    from seqweave.explain import explain as run_explain
    from seqweave.targets import load_target

    try:
        if balance not in BALANCES:
            raise OptionError(f"--balance {balance!r} is not a sequence layout", hint=f"use one of {BALANCES}")
        spec = SampleSpec("llama-tiny", seq_len=seq_len, layers=layers, hidden=hidden,
                          attn_implementation=attn, padded=padded, packed=packed)
        model, inputs = load_target(target, spec)
        with err.status(f"capturing {target}…"):
            explanation = run_explain(model, inputs, world=sp, balance=balance, pipeline=pipeline)
        if memory:
            explanation.totals["memory"] = _memory_prediction(target, spec, sp)
        if budget:
            with err.status(f"planning activation memory under {budget}…"):
                explanation.totals["memory_plan"] = _memory_plan(model, inputs, budget, sp, quantize)
    except SeqweaveError as error:
        _fail(error)
    if as_json:
        print(json.dumps(explanation.as_dict(), indent=2))
        return
    out.print(_explain_table(explanation, sp))
    totals = explanation.totals
    out.print(f"graphs: {', '.join(totals['graphs'])}; IR nodes: {totals['nodes']}; attention found: "
              f"{totals['attention_found']}, left alone: {totals['attention_left_alone']}; "
              f"parameters: {totals['parameters']:,}")
    for step in totals["pipeline"]:
        out.print(f"pass {step['pass']}: {step['semantics']}")
    for warning in totals.get("sp_warnings", []):
        if "ran on operands gathered" in warning or warning.startswith("refused"):
            out.print(f"sequence parallelism: {warning}")
    for output in totals.get("gathered_outputs", []):
        if output["largest_per_rank"]:
            out.print(f"output {output['output']} {output['shape']} is gathered whole on every rank "
                      f"({output['bytes']:,} bytes, the largest tensor per rank): outputs='sharded' keeps it sharded")
    if "memory_plan" in totals:
        out.print(_memory_plan_table(totals["memory_plan"]))
    if "memory" in totals:
        predicted = totals["memory"]
        out.print(f"per-rank memory of a training step on {predicted['world']} rank(s), bytes: saved activations "
                  f"{predicted['saved_bytes']} + outputs {predicted['output_bytes']} = {predicted['total_bytes']} "
                  f"= {predicted[f'bytes_at_{seq_len}'] / 2**20:,.1f} MiB at N={seq_len}")


def _memory_plan(model, inputs, budget: str, world: int, quantize: bool) -> dict:
    from seqweave.memory_report import explain_memory

    number = budget.strip()
    parsed = float(number) if number.replace(".", "", 1).isdigit() else number
    return explain_memory(model, inputs, int(parsed) if isinstance(parsed, float) and parsed > 1 else parsed,
                          world, quantize)


def _memory_plan_table(plan: dict) -> Table:
    totals = plan["totals"]
    mib = lambda n: f"{n / 2**20:,.1f}"  # noqa: E731
    table = Table(title=f"activation memory per rank ({plan['world']} rank(s)): budget {mib(totals['budget_bytes'])} "
                        f"MiB, plan-free peak {mib(totals['plan_free_peak_bytes'])} MiB -> planned "
                        f"{mib(totals['planned_peak_bytes'])} MiB; {mib(totals['bytes_moved'])} MiB moved, "
                        f"{totals['recompute_flops']:.3g} FLOPs recomputed, "
                        f"+{totals['predicted_extra_seconds'] * 1e3:.2f} ms predicted")
    for column in ("layer", "kept MiB", "offloaded MiB", "recomputed MiB", "8-bit MiB", "recompute FLOPs"):
        table.add_column(column, justify="left" if column == "layer" else "right")
    for row in plan["layers"]:
        table.add_row(str(row["layer"]), mib(row["keep"]), mib(row["offload"] + row["offload-at-use"]),
                      mib(row["recompute"]),
                      mib(row["quantize"]), f"{row['recompute_flops']:.3g}")
    return table


def _memory_prediction(target: str, spec: SampleSpec, world: int) -> dict:
    from dataclasses import replace

    from seqweave.errors import TargetError
    from seqweave.memory_prediction import predict_memory
    from seqweave.targets import load_target
    from seqweave.testing.models import BUILDERS

    if target not in BUILDERS:
        raise TargetError("--memory rebuilds the model at N/4 and N/2, which only built-in samples can do",
                          hint=f"use a built-in sample ({', '.join(sorted(BUILDERS))}) or drop --memory")
    with err.status("predicting memory…") as status:
        prediction = predict_memory(lambda n: load_target(target, replace(spec, seq_len=n)), spec.seq_len, world,
                                    progress=status.update)
    return prediction.as_dict(spec.seq_len)


DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
          "float32": "float32", "fp32": "float32"}


def _kernel_table(spec, results) -> Table:
    table = Table(title=f"attention kernels for {spec.mask} ({spec.dtype}, d={spec.head_dim}, GQA {spec.group})")
    for column in ("kernel", "arch", "tiles (m x n)", "warps / stages", "shared KiB", "registers", "spilled bytes"):
        table.add_column(column, justify="left" if column == "kernel" else "right")
    for result in results:
        knobs = spec.backward if "backward" in result.name else spec.forward
        spilled = f"{result.spill_bytes:,}" if not result.spill_bytes else f"[yellow]{result.spill_bytes:,}[/]"
        table.add_row(result.name, f"sm_{result.arch}", f"{knobs.block_m} x {knobs.block_n}",
                      f"{knobs.num_warps} / {knobs.num_stages}", f"{result.shared_bytes / 1024:.1f}",
                      str(result.registers), spilled)
    return table


@app.command()
def kernels(mask: str = typer.Option("causal", help="MaskSpec text, e.g. 'causal & sliding_window(4095, 0)'"),
            score_mod: str = typer.Option("none", "--score-mod", help="none or softcap(cap)"),
            head_dim: int = typer.Option(128, "--head-dim"),
            dtype: str = typer.Option("bfloat16", help="bfloat16, float16 or float32"),
            group: int = typer.Option(1, help="query heads per kv head (GQA ratio)"),
            source: bool = typer.Option(False, "--source", help="print the generated Triton source"),
            compile_for: list[int] = typer.Option([], "--compile", help="compile offline for this GPU "
                                                  "architecture (80, 90, ...; repeatable) and report "
                                                  "shared memory, registers and spills; no GPU needed")) -> None:
    """Show the Triton attention kernels seqweave generates for one specialisation."""
    import torch

    from seqweave.codegen.triton.attention_template import attention_source
    from seqweave.codegen.triton.offline import compile_spec, spec_for

    if dtype not in DTYPES:
        _fail(SeqweaveError(f"--dtype {dtype!r} is not one of {', '.join(sorted(set(DTYPES.values())))}"))
    try:
        spec = spec_for(mask, score_mod, head_dim, getattr(torch, DTYPES[dtype]), group)
    except ValueError as error:
        _fail(SeqweaveError(str(error)))
    out.print(f"spec {spec.key()}: {spec}")
    if source:
        print(attention_source(spec))
    results = []
    for arch in compile_for:
        with err.status(f"compiling for sm_{arch}…"):
            try:
                results += compile_spec(spec, arch)
            except RuntimeError as error:
                _fail(SeqweaveError(str(error)))
    if results:
        out.print(_kernel_table(spec, results))


@app.command()
def convert(source: str = typer.Argument(..., help="an IR text file (as SEQWEAVE_DUMP or fuzz write them)"),
            output: str = typer.Option(..., "--output", "-o", help="where to write the rewritten IR text"),
            pipeline: str = typer.Option(DEFAULT_PIPELINE, "--pipeline",
                                         help="passes to run, e.g. 'canonicalize,shard-sequence{world=4,length=1024}'; "
                                              "passes a package registers under the `seqweave.passes` entry-point "
                                              "group are found by name"),
            verify: bool = typer.Option(True, "--verify/--no-verify", help="verify the IR after every pass")) -> None:
    """Run PIPELINE on the IR program in SOURCE and write the result to OUTPUT (written whole or not at all)."""
    from seqweave.convert import convert as convert_file

    try:
        convert_file(source, output, pipeline, verify=verify, echo=_plain(err))
    except SeqweaveError as error:
        _fail(error)
    except OSError as error:
        _fail(SeqweaveError(f"cannot convert {source}: {error.strerror}: {error.filename}",
                            hint="check the input path exists and the output directory is writable"))


@app.command()
def fuzz(pipeline: str = typer.Option("canonicalize,shard-sequence{world=2}", "--pipeline",
                                      help="passes to check on every generated program"),
         examples: int = typer.Option(200, "--examples", help="how many programs to generate and check"),
         seed: int = typer.Option(0, "--seed", help="the generator's seed (same seed, same programs)"),
         mesh: Optional[str] = typer.Option(None, "--mesh", help="ranks to simulate, e.g. '4' or '4x2' "
                                                                 "(4 ranks, Ulysses groups of 2)"),
         out_dir: str = typer.Option("fuzz-failures", "--out", help="where failing programs are written"),
         replay: Optional[str] = typer.Option(None, "--replay", help="check one IR file written by an earlier run")
         ) -> None:
    """Generate random IR programs, check PIPELINE on each (verifies, idempotent, equal to the original on
    simulated ranks in float64), shrink any failure and write it as a replayable IR file."""
    from seqweave.fuzz import fuzz as run_fuzz

    if examples < 1:
        _fail(OptionError(f"--examples must be at least 1, got {examples}"))
    try:
        status = run_fuzz(pipeline, examples, seed, mesh, out_dir, echo=_plain(out), replay=replay)
    except SeqweaveError as error:
        _fail(error)
    raise typer.Exit(status)


# Everything after SCRIPT is the script's, options included (`--nproc` there is the script's own),
# as torchrun's argument parsing does.
@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                               "allow_interspersed_args": False})
def run(ctx: typer.Context,
        script: str = typer.Argument(..., help="the Python script every rank runs, then its arguments"),
        nproc: int = typer.Option(2, "--nproc", help="number of local ranks (processes)")) -> None:
    """Launch SCRIPT on NPROC local ranks with torchrun's launcher (torchrun --standalone):
    torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT), output prefixed by
    rank, and the first failing rank stops the others."""
    from torch.distributed.elastic.multiprocessing import SignalException

    from seqweave.runtime.launch import launch

    if nproc < 1:
        _fail(OptionError(f"--nproc must be at least 1, got {nproc}"))
    try:
        result = launch(nproc, script, ctx.args)
    except SignalException as stopped:  # Ctrl-C or a scheduler's SIGTERM: the agent stopped every rank
        err.print(f"[bold red]stopped:[/] {stopped.sigval.name}; every rank was stopped")
        raise typer.Exit(128 + int(stopped.sigval))
    if result.returncode:
        err.print(result.report, markup=False, highlight=False, soft_wrap=True)
        err.print(f"[bold red]error:[/] rank {result.failed_rank} exited with status {result.returncode}; "
                  "the other ranks were stopped")
        raise typer.Exit(_exit_status(result.returncode))


def _exit_status(returncode: int) -> int:
    """A rank's status as ours: killed by signal S (returncode -S) exits 128 + S, as in a shell."""
    if returncode < 0:
        return 128 - returncode
    return returncode if returncode < 256 else 1


def main(argv: Optional[list[str]] = None) -> None:
    """Console-script entry point."""
    app(args=argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":
    main()
