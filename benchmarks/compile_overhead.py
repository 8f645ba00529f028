"""Compile overhead: seqweave vs torch.compile's aot_eager and Inductor backends on the same model.

For each layer count and mode (inference: ``torch.no_grad`` forward; train: forward + ``loss.backward()``)
it times the FIRST call of ``torch.compile(model, backend=X, fullgraph=True, dynamic=False)``: dynamo
capture + the backend's compile + one run. The baseline ``eager`` backend is dynamo capture only, so
``seqweave - eager`` is what seqweave adds on top of dynamo. For seqweave it also times its own
stages (attention replacement, FX import, IR verification, the pass pipeline, lowering), and for
every backend the steady-state call time against the uncompiled model.

Every (mode, layers, backend) run happens in its own worker process, with its own empty Inductor
cache directory and the FX/AOT caches disabled, so no run reuses another's work. Before measuring, a
worker compiles a 1-layer hidden-64 llama with the same backend (other shapes, so no kernel is
reused): one-time imports and initialisation are not charged to the measured call; that cold first
compile is recorded separately as ``cold_warmup_s``.

    python benchmarks/compile_overhead.py                      # 2 8 32 layers, both modes, all backends
    python benchmarks/compile_overhead.py --layers 2 --modes inference --skip-inductor-above 8

Prints a table (absolute seconds and ratios measured in this run) and writes JSON (atomically).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from typing import Any, Iterator

from results_io import write_json_atomic  # benchmarks/ is on sys.path when a script runs

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join("benchmarks", "results", "compile_overhead.json")
BASELINE = "eager"  # dynamo capture only: the graph is run as captured
MODEL = dict(name="llama-tiny", hidden=256, seq_len=128, batch=1)
WARMUP_MODEL = dict(name="llama-tiny", layers=1, hidden=64, seq_len=32, batch=1)
SEQWEAVE_STAGES = ("replace_attention", "import_fx", "verify", "run_pipeline", "lower")

# --------------------------------------------------------------------------------------------- worker

def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _make_backend(name: str) -> Any:
    """`seqweave.backend()` for seqweave; the name itself for torch's backends."""
    if name != "seqweave":
        return name
    import seqweave
    return seqweave.backend()


def _call(model: Any, inputs: dict, mode: str) -> tuple[float, float, Any]:
    """One step; returns (forward seconds, backward seconds, loss)."""
    import torch
    if mode == "inference":
        start = time.perf_counter()
        with torch.no_grad():
            loss = model(**inputs).loss
        return time.perf_counter() - start, 0.0, loss
    start = time.perf_counter()
    loss = model(**inputs).loss
    middle = time.perf_counter()
    loss.backward()
    return middle - start, time.perf_counter() - middle, loss.detach()


def _clear_grads(model: Any) -> None:
    for param in model.parameters():
        param.grad = None


def _steady(model: Any, inputs: dict, mode: str, repeats: int) -> float:
    """Median seconds of `repeats` calls (grads cleared between, outside the timing)."""
    times = []
    for _ in range(repeats):
        _clear_grads(model)
        forward, backward, _ = _call(model, inputs, mode)
        times.append(forward + backward)
    _clear_grads(model)
    return statistics.median(times)


@contextmanager
def _timed_stages(totals: dict[str, float], wrapped: list[str]) -> Iterator[None]:
    """Add up the wall time of seqweave's stage functions (SEQWEAVE_STAGES).

    Every loaded seqweave module's module-level reference to one of them is wrapped (the wiring between
    the modules changes; this finds the functions wherever they are looked up). Only the outermost stage
    call is counted, so verification inside `run_pipeline` is part of `run_pipeline`, never counted twice.
    """
    import types

    depth = [0]
    originals: list[tuple[Any, str, Any]] = []
    for module_name, module in list(sys.modules.items()):
        if module is None or not (module_name == "seqweave" or module_name.startswith("seqweave.")):
            continue
        if module_name.startswith("seqweave.testing"):
            continue
        for name in SEQWEAVE_STAGES:
            function = module.__dict__.get(name)
            if isinstance(function, types.FunctionType) and function.__module__.startswith("seqweave."):
                originals.append((module, name, function))

    def wrap(name: str, function: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if depth[0]:
                return function(*args, **kwargs)
            depth[0] += 1
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                totals[name] = totals.get(name, 0.0) + (time.perf_counter() - start)
                depth[0] -= 1
        return timed

    for module, name, function in originals:
        setattr(module, name, wrap(name, function))
        wrapped.append(f"{module.__name__}.{name}")
    try:
        yield
    finally:
        for module, name, function in originals:
            setattr(module, name, function)


def _dynamo_metrics() -> dict[str, float]:
    try:
        from torch._dynamo.utils import compilation_time_metrics
    except ImportError:  # internal; absent in some versions
        return {}
    return {key: float(sum(values)) for key, values in compilation_time_metrics.items()}


def _clear_dynamo_metrics() -> None:
    try:
        from torch._dynamo.utils import compilation_time_metrics
        compilation_time_metrics.clear()
    except ImportError:
        pass


def _inductor_compile_threads() -> int | None:
    try:
        import torch._inductor.config as inductor_config
        return int(inductor_config.compile_threads)
    except (ImportError, AttributeError, TypeError, ValueError):
        return None


def worker(layers: int, mode: str, backend_name: str, repeats: int, threads: int) -> dict[str, Any]:
    import copy

    import torch
    if threads > 0:
        torch.set_num_threads(threads)
    load_before = os.getloadavg()
    import torch._dynamo
    from torch._dynamo.utils import counters

    from seqweave.testing.models import SampleSpec, build_sample

    try:
        import torch._inductor.config as inductor_config
        inductor_config.force_disable_caches = True  # and a fresh TORCHINDUCTOR_CACHE_DIR (set by the parent)
    except (ImportError, AttributeError):
        pass

    def compiled(model: Any, backend: Any) -> Any:
        return torch.compile(model, backend=backend, fullgraph=True, dynamic=False)

    def prepare(model: Any) -> Any:
        return model.eval() if mode == "inference" else model.train()

    # Warm-up on other shapes: imports, dynamo's first use of the transformers code, backend initialisation.
    warm_model, warm_inputs = build_sample(SampleSpec(**WARMUP_MODEL))
    torch._dynamo.reset()
    start = time.perf_counter()
    _call(compiled(prepare(warm_model), _make_backend(backend_name)), warm_inputs, mode)
    cold_warmup = time.perf_counter() - start
    del warm_model

    base, inputs = build_sample(SampleSpec(MODEL["name"], layers=layers, hidden=MODEL["hidden"],
                                           seq_len=MODEL["seq_len"], batch=MODEL["batch"]))
    base = prepare(base)

    # The uncompiled model: reference loss and steady-state time.
    eager_model = copy.deepcopy(base)
    _, _, reference_loss = _call(eager_model, inputs, mode)
    eager_steady = _steady(eager_model, inputs, mode, repeats)
    del eager_model

    # The measured run: a fresh copy, a fresh dynamo.
    torch._dynamo.reset()
    counters.clear()
    _clear_dynamo_metrics()
    model = copy.deepcopy(base)
    backend = _make_backend(backend_name)
    stages: dict[str, float] = {}
    wrapped: list[str] = []
    opt = compiled(model, backend)
    if backend_name == "seqweave":
        # The warm-up compile has loaded every seqweave module the backend uses, so all are wrapped.
        with _timed_stages(stages, wrapped):
            first_forward, first_backward, loss = _call(opt, inputs, mode)
    else:
        first_forward, first_backward, loss = _call(opt, inputs, mode)
    metrics = _dynamo_metrics()
    graphs_after_first = int(counters["stats"]["unique_graphs"])
    steady = _steady(opt, inputs, mode, repeats)
    recompiled = int(counters["stats"]["unique_graphs"]) != graphs_after_first

    record: dict[str, Any] = {
        "layers": layers, "mode": mode, "backend": backend_name, "status": "ok",
        "first_call_s": first_forward + first_backward,
        "first_forward_s": first_forward, "first_backward_s": first_backward,
        "steady_s": steady, "uncompiled_steady_s": eager_steady,
        "steady_vs_uncompiled": steady / eager_steady,
        "cold_warmup_s": cold_warmup,
        "loss_abs_diff": float((loss.float() - reference_loss.float()).abs()),
        "graphs": graphs_after_first, "recompiled_in_steady_state": recompiled,
        "dynamo_metrics_s": metrics,
        "torch_threads": torch.get_num_threads(),
        "inductor_compile_threads": _inductor_compile_threads(),
        "loadavg_1m_before_after": [load_before[0], os.getloadavg()[0]],
        "backend_call_s": metrics.get("OutputGraph.call_user_compiler"),
    }
    if backend_name == "seqweave":
        passes_ms = sum(run.millis for graph in backend.graphs for run in graph.passes)
        record["seqweave"] = {
            "stages_s": stages,
            "stage_functions_wrapped": wrapped,
            "own_stages_s": sum(stages.values()),
            "pass_pipeline_ms": passes_ms,
            "pass_pipeline_wall_ms": stages.get("run_pipeline", 0.0) * 1e3,  # includes per-pass verification
            "passes": [{"graph": graph.kind, "pass": run.name, "ms": run.millis}
                       for graph in backend.graphs for run in graph.passes],
            "compiled_graphs": [graph.kind for graph in backend.graphs],
            "attention_replaced": len(backend.reports),
        }
    return record


# --------------------------------------------------------------------------------------------- parent

def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)  # the worker and its Inductor compile workers
    except ProcessLookupError:
        pass


def run_one(layers: int, mode: str, backend: str, repeats: int, threads: int, timeout: float) -> dict[str, Any]:
    env = dict(os.environ)
    with tempfile.TemporaryDirectory(prefix="sw-bench-inductor-") as cache:
        env["TORCHINDUCTOR_CACHE_DIR"] = cache
        env.setdefault("TRITON_CACHE_DIR", os.path.join(cache, "triton"))
        command = [sys.executable, os.path.abspath(__file__), "--worker", "--layers", str(layers),
                   "--modes", mode, "--backends", backend, "--repeats", str(repeats),
                   "--threads", str(threads)]
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env=env, start_new_session=True)
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(process)
            process.communicate()
            return {"layers": layers, "mode": mode, "backend": backend, "status": "timeout",
                    "detail": f"worker passed the {timeout:.0f} s limit", "worker_s": time.perf_counter() - start}
        except BaseException:
            _kill_group(process)
            raise
    wall = time.perf_counter() - start
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if process.returncode != 0 or not lines:
        tail = "\n".join(stderr.strip().splitlines()[-15:])
        return {"layers": layers, "mode": mode, "backend": backend, "status": "error",
                "detail": f"worker exited {process.returncode}:\n{tail}", "worker_s": wall}
    record = json.loads(lines[-1])
    record["worker_s"] = wall
    return record


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def aggregate(records: list[dict[str, Any]]) -> dict[tuple[str, int, str], dict[str, Any]]:
    """Per (mode, layers, backend) over rounds: the fastest first call (and that round's stage times),
    steady-state as min compiled / min uncompiled; a config none of whose rounds succeeded keeps its status."""
    groups: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault((record["mode"], record["layers"], record["backend"]), []).append(record)
    out = {}
    for key, group in groups.items():
        ok = [r for r in group if r["status"] == "ok"]
        if not ok:
            out[key] = {"status": group[-1]["status"], "detail": group[-1].get("detail")}
            continue
        best = min(ok, key=lambda r: r["first_call_s"])
        steady = min(r["steady_s"] for r in ok)
        uncompiled = min(r["uncompiled_steady_s"] for r in ok)
        out[key] = {
            "status": "ok", "rounds": len(ok),
            "first_call_s": best["first_call_s"], "first_call_all_s": [r["first_call_s"] for r in ok],
            "first_forward_s": best["first_forward_s"], "first_backward_s": best["first_backward_s"],
            "steady_s": steady, "uncompiled_steady_s": uncompiled, "steady_vs_uncompiled": steady / uncompiled,
            "seqweave": best.get("seqweave"),
        }
    return out


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (mode, layers): first-call seconds per backend and seqweave's ratios against each."""
    best = aggregate(records)
    rows = []
    keys = sorted({(m, l) for m, l, _ in best}, key=lambda k: (k[0] != "inference", k[1]))
    for mode, layers in keys:
        by_backend = {b: v for (m, l, b), v in best.items() if (m, l) == (mode, layers)}

        def get(name: str, field: str) -> float | None:
            entry = by_backend.get(name)
            return entry[field] if entry and entry["status"] == "ok" else None

        sw = get("seqweave", "seqweave") or {}
        sw_first, dynamo_first = get("seqweave", "first_call_s"), get(BASELINE, "first_call_s")
        rows.append({
            "mode": mode, "layers": layers,
            "status": {name: entry["status"] for name, entry in by_backend.items()},
            "first_call_s": {name: get(name, "first_call_s") for name in by_backend},
            "first_call_all_s": {name: get(name, "first_call_all_s") for name in by_backend},
            "seqweave_over": {name: _ratio(sw_first, get(name, "first_call_s"))
                              for name in by_backend if name != "seqweave"},
            "seqweave_minus_dynamo_s": (sw_first - dynamo_first
                                        if sw_first is not None and dynamo_first is not None else None),
            "seqweave_own_stages_s": sw.get("own_stages_s"),
            "seqweave_stages_s": sw.get("stages_s"),
            "seqweave_pass_pipeline_ms": sw.get("pass_pipeline_ms"),
            "steady_vs_uncompiled": {name: get(name, "steady_vs_uncompiled") for name in by_backend},
            "steady_s": {name: get(name, "steady_s") for name in by_backend},
            "uncompiled_steady_s": {name: get(name, "uncompiled_steady_s") for name in by_backend},
        })
    return rows


def _fmt(value: float | None, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def _label(name: str) -> str:
    return "dynamo-only" if name == BASELINE else name


def render_table(rows: list[dict[str, Any]], backends: list[str]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, body) for the tables printed and written to the README."""
    every = [BASELINE, *backends]
    others = [name for name in every if name != "seqweave"]

    def status_or(row: dict, name: str, text: str) -> str:
        status = row["status"].get(name)
        if status is None:
            return "not run"
        return text if status == "ok" else status

    first_header = ["mode", "layers", *[f"{_label(n)} s" for n in every]]
    first_body = [[row["mode"], str(row["layers"]),
                   *[status_or(row, n, _fmt(row["first_call_s"].get(n), ".2f")) for n in every]] for row in rows]

    ratio_header = ["mode", "layers", *[f"sw/{_label(n)}" for n in others],
                    "sw - dynamo s", "sw stages s", "passes ms"]
    ratio_body = []
    for row in rows:
        seqweave_ok = row["status"].get("seqweave") == "ok"
        ratios = [status_or(row, n, _fmt(row["seqweave_over"].get(n), ".2f")) if seqweave_ok else "-" for n in others]
        ratio_body.append([row["mode"], str(row["layers"]), *ratios,
                           _fmt(row["seqweave_minus_dynamo_s"], ".2f"), _fmt(row["seqweave_own_stages_s"], ".2f"),
                           _fmt(row["seqweave_pass_pipeline_ms"], ".1f")])

    steady_header = ["mode", "layers", *[_label(n) for n in [*backends, BASELINE]], "uncompiled ms"]
    steady_body = []
    for row in rows:
        uncompiled = [v for v in row["uncompiled_steady_s"].values() if v is not None]
        steady_body.append([row["mode"], str(row["layers"]),
                            *[status_or(row, n, _fmt(row["steady_vs_uncompiled"].get(n), ".2f"))
                              for n in [*backends, BASELINE]],
                            _fmt(min(uncompiled) * 1e3 if uncompiled else None, ".1f")])
    tables = [("First call (capture + compile + one run), seconds", first_header, first_body),
              ("seqweave first call as a ratio of each backend's (same run)", ratio_header, ratio_body),
              ("Steady state: compiled call / uncompiled call", steady_header, steady_body)]
    stage_rows = [row for row in rows if row.get("seqweave_stages_s")]
    if stage_rows:
        stage_header = ["mode", "layers", *[f"{name} s" for name in SEQWEAVE_STAGES], "passes ms"]
        stage_body = [[row["mode"], str(row["layers"]),
                       *[_fmt(row["seqweave_stages_s"].get(name), ".2f") for name in SEQWEAVE_STAGES],
                       _fmt(row["seqweave_pass_pipeline_ms"], ".1f")] for row in stage_rows]
        tables.append(("seqweave's own stages in the first call, seconds (run_pipeline includes its per-pass "
                       "verification; passes ms is the passes alone)", stage_header, stage_body))
    return tables


def print_tables(tables: list[tuple[str, list[str], list[list[str]]]]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        for title, header, body in tables:
            widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(header)]
            print(f"\n{title}")
            print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
            for line in body:
                print("  ".join(c.rjust(w) for c, w in zip(line, widths)))
        return
    console = Console(width=max(Console().width, 120))
    for title, header, body in tables:
        table = Table(title=title)
        for index, name in enumerate(header):
            table.add_column(name, justify="left" if index == 0 else "right", no_wrap=True)
        for line in body:
            table.add_row(*line)
        console.print(table)


def markdown_tables(tables: list[tuple[str, list[str], list[list[str]]]]) -> str:
    out = []
    for title, header, body in tables:
        out.append(f"**{title}**\n")
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
        out.extend("| " + " | ".join(line) + " |" for line in body)
        out.append("")
    return "\n".join(out)


def machine_info() -> dict[str, Any]:
    import torch
    info: dict[str, Any] = {
        "platform": platform.platform(), "machine": platform.machine(), "processor": platform.processor(),
        "python": platform.python_version(), "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
    }
    try:
        info["usable_cpus"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    for package in ("transformers", "seqweave"):
        try:
            info[package] = __import__(package).__version__
        except Exception:  # noqa: BLE001 - informational only
            pass
    return info


def code_state() -> dict[str, Any]:
    """The commit and the uncommitted changes under seqweave/ (the package may be edited while this runs)."""
    root = os.path.dirname(HERE)

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    status = git("status", "--porcelain", "--", "seqweave")
    return {"commit": git("rev-parse", "HEAD"),
            "seqweave_uncommitted": status.splitlines() if status else ([] if status is not None else None)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 8, 32])
    parser.add_argument("--modes", nargs="+", choices=["inference", "train"], default=["inference", "train"])
    parser.add_argument("--backends", nargs="+", choices=["seqweave", "aot_eager", "inductor", BASELINE],
                        default=["seqweave", "aot_eager", "inductor"],
                        help="compared backends; the dynamo-only baseline (backend 'eager') always runs")
    parser.add_argument("--out", default=DEFAULT_OUT, help="JSON results path (written atomically)")
    parser.add_argument("--skip-inductor-above", type=int, default=None, metavar="N",
                        help="skip Inductor for models with more than N layers (quick runs)")
    parser.add_argument("--timeout", type=float, default=360.0,
                        help="seconds allowed for one run's worker; past it the run is reported as 'timeout'")
    parser.add_argument("--repeats", type=int, default=5, help="steady-state calls timed per worker (median)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="times the whole plan is run (interleaved); the table keeps each config's fastest "
                             "first call, which filters out noise from other load on the machine")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads in each worker (0: torch's default); 1 keeps timings stable "
                             "on a small shared machine")
    parser.add_argument("--report", metavar="JSON", help="print the tables of a saved result instead of running")
    parser.add_argument("--markdown", action="store_true", help="with --report: print the tables as Markdown")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.report:
        with open(args.report) as handle:
            saved = json.load(handle)
        ran = list(dict.fromkeys(r["backend"] for r in saved["runs"] if r["backend"] != BASELINE))
        tables = render_table(summarize(saved["runs"]), ran)
        print(markdown_tables(tables)) if args.markdown else print_tables(tables)
        return 0

    if args.worker:
        record = worker(args.layers[0], args.modes[0], args.backends[0], args.repeats, args.threads)
        print(json.dumps(record))
        return 0

    backends = [name for name in dict.fromkeys(args.backends) if name != BASELINE]
    plan = [(mode, layers, backend) for mode in args.modes for layers in args.layers
            for backend in [BASELINE, *backends]]
    records: list[dict[str, Any]] = []
    given_up: set[tuple[str, int, str]] = set()
    started = _dt.datetime.now(_dt.timezone.utc)
    code_at_start = code_state()
    total = len(plan) * args.rounds
    step = 0
    for round_index in range(1, args.rounds + 1):
        for mode, layers, backend in plan:
            step += 1
            label = f"[{step}/{total} round {round_index}] {mode:9s} layers={layers:<3d} {backend:9s}"
            if backend == "inductor" and args.skip_inductor_above is not None and layers > args.skip_inductor_above:
                if round_index == 1:
                    records.append({"layers": layers, "mode": mode, "backend": backend, "status": "skipped",
                                    "detail": f"--skip-inductor-above {args.skip_inductor_above}"})
                _log(f"{label} skipped (--skip-inductor-above {args.skip_inductor_above})")
                continue
            if (mode, layers, backend) in given_up:
                _log(f"{label} not rerun (timed out in an earlier round)")
                continue
            _log(f"{label} ...")
            record = run_one(layers, mode, backend, args.repeats, args.threads, args.timeout)
            record["round"] = round_index
            records.append(record)
            if record["status"] == "ok":
                extra = ""
                if backend == "seqweave":
                    sw = record["seqweave"]
                    extra = f", own stages {sw['own_stages_s']:.2f} s, passes {sw['pass_pipeline_ms']:.1f} ms"
                _log(f"{label} first call {record['first_call_s']:.2f} s, steady x{record['steady_vs_uncompiled']:.2f}"
                     f" of uncompiled{extra} (worker {record['worker_s']:.0f} s,"
                     f" load {record['loadavg_1m_before_after'][0]:.1f})")
            else:
                if record["status"] == "timeout":
                    given_up.add((mode, layers, backend))
                _log(f"{label} {record['status']}: {record.get('detail', '')}")

    rows = summarize(records)
    tables = render_table(rows, [name for name in backends])
    print_tables(tables)
    payload = {
        "benchmark": "compile_overhead",
        "command": " ".join(shlex.quote(part) for part in [os.path.relpath(sys.argv[0]), *(argv or sys.argv[1:])]),
        "started_utc": started.isoformat(timespec="seconds"),
        "finished_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "code": {"at_start": code_at_start, "at_end": code_state()},
        "model": {**MODEL, "warmup_model": WARMUP_MODEL},
        "settings": {"repeats": args.repeats, "rounds": args.rounds, "threads": args.threads,
                     "timeout_s": args.timeout,
                     "skip_inductor_above": args.skip_inductor_above,
                     "compile": "torch.compile(model, backend=X, fullgraph=True, dynamic=False)",
                     "dynamo_only_backend": BASELINE},
        "summary": rows,
        "tables_markdown": markdown_tables(tables),
        "runs": records,
    }
    write_json_atomic(args.out, payload)
    _log(f"wrote {args.out}")
    failed = [r for r in records if r["status"] == "error"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
