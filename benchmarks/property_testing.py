"""How fast the pass author's checks run: `check_pass` throughput per pipeline, and what the static
collective-schedule checker adds to a compile.

- check_pass: generated programs (`testing.programs`, fixed seed) through each pipeline on its
  mesh, each program verified, re-run for idempotence, simulated on its ranks in float64 and
  compared with the whole program, bytes checked: programs per second, and time per program as a
  ratio to `canonicalize` alone, measured in the same run.
- schedule checker: `ir.schedule.check_sharded_program` on the sharded programs, as a ratio to the
  `shard-sequence` pass that made them (the compiler runs both when `verify` is on).

    python benchmarks/property_testing.py                 # 200 programs per pipeline
    python benchmarks/property_testing.py --programs 40   # quick
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import results_io  # noqa: E402

from seqweave.config import Mesh  # noqa: E402
from seqweave.errors import PassError  # noqa: E402
from seqweave.ir.schedule import check_sharded_program  # noqa: E402
from seqweave.passes.shard_sequence import ShardSequence  # noqa: E402
from seqweave.testing.check_pass import check_pass  # noqa: E402
from seqweave.testing.programs import ProgramSpec, generate_programs  # noqa: E402

DEFAULT_OUT = os.path.join(HERE, "results", "property_testing.json")
LEFT_COLUMNS = ("pipeline", "mesh")
SEED = 7
#: (pipeline, mesh, heads a multiple of): the bulk run's pipelines, one mesh each
PIPELINES = (("canonicalize", Mesh(sp=2), 1),
             ("shard-sequence{attention=ring}", Mesh(sp=4), 1),
             ("shard-sequence{attention=ulysses}", Mesh(sp=4), 4),
             ("shard-sequence{attention=hybrid}", Mesh(ulysses=2, ring=2), 2),
             ("streaming{sinks=2, window=5},shard-sequence{attention=ring}", Mesh(sp=4), 1))


def _spec(multiple: int, pipeline: str) -> ProgramSpec:
    return ProgramSpec(max_seq=24, max_steps=1, head_multiple=multiple,
                       rope="always" if pipeline.startswith("streaming") else "sometimes")


def check_rows(count: int) -> list[dict]:
    rows = []
    for pipeline, mesh, multiple in PIPELINES:
        programs = generate_programs(SEED, count, _spec(multiple, pipeline))
        report = check_pass(pipeline, programs=programs, seed=SEED, meshes=[mesh])
        rows.append({"pipeline": pipeline, "mesh": str(mesh.sp) + (f"x{mesh.ulysses}" if mesh.hybrid else ""),
                     "checked": report.checked, "failed": len(report.failures), "skipped": len(report.skipped),
                     "seconds": report.seconds, "per_program_s": report.seconds / max(report.checked, 1)})
    base = rows[0]["per_program_s"]
    for row in rows:
        row["vs_canonicalize"] = row["per_program_s"] / base
    return rows


def schedule_row(count: int, world: int) -> dict:
    """Seconds of shard-sequence and of the schedule checker over the same programs."""
    shard_s = check_s = 0.0
    checked = 0
    for program in generate_programs(SEED, count, _spec(1, "")):
        graph = copy.deepcopy(program.graph)
        start = time.perf_counter()
        try:
            ShardSequence(world=world, length=program.length, attention="ring").run(graph)
        except PassError:
            continue
        middle = time.perf_counter()
        check_sharded_program(graph, world, 1)
        shard_s, check_s = shard_s + middle - start, check_s + time.perf_counter() - middle
        checked += 1
    return {"programs": checked, "world": world, "shard_sequence_s": shard_s, "schedule_check_s": check_s,
            "check_vs_pass": check_s / shard_s}


def run(args: argparse.Namespace, argv: list[str]) -> dict:
    torch.set_num_threads(1)
    return {"command": "python benchmarks/property_testing.py " + " ".join(argv),
            "machine": {**results_io.machine_info(HERE), "torch": torch.__version__},
            "settings": {"programs": args.programs, "seed": SEED, "max_seq": 24, "threads": 1},
            "rows": check_rows(args.programs), "schedule": schedule_row(args.programs, 4)}


def render(payload: dict) -> list[results_io.TableData]:
    header = ["pipeline", "mesh", "checked", "failed", "skipped", "programs / s", "time / canonicalize"]
    body = [[r["pipeline"], r["mesh"], str(r["checked"]), str(r["failed"]), str(r["skipped"]),
             f"{1 / r['per_program_s']:.1f}", f"{r['vs_canonicalize']:.1f}"] for r in payload["rows"]]
    s = payload["schedule"]
    schedule = [[f"ring, {s['world']} ranks", str(s["programs"]), f"{s['check_vs_pass']:.2f}"]]
    return [(f"check_pass over generated programs (seed {payload['settings']['seed']}, 1 thread)", header, body),
            ("static schedule checker vs the shard-sequence pass, same programs", ["mesh", "programs",
                                                                                    "check time / pass time"],
             schedule)]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--programs", type=int, default=200, help="programs per pipeline")
    results_io.add_output_arguments(parser, DEFAULT_OUT)
    args = parser.parse_args(argv)
    payload = results_io.run_or_report(args, lambda: run(args, argv), render, LEFT_COLUMNS)
    return 1 if any(row["failed"] for row in payload["rows"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
