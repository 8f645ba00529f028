"""Run `seqweave fuzz` against every planted bug: which ones does the fuzzer find on its own?

    .venv/bin/python tests/mutations/fuzz_mutants.py [--examples 40] [ids...]

For each mutation, a mutated copy of the package (`mutations.make_copy`) comes first on
PYTHONPATH and `python -m seqweave.cli fuzz` runs once per mesh/strategy below; a mutation is
found when any run exits 1 (a failing program written), missed when all exit 0. Any other exit
status is an error in the harness and is printed. Not run by the test suite (minutes per
mutation); the results are recorded in this directory's README.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mutations import by_id, make_copy  # noqa: E402

#: (pipeline, mesh): one ring, one Ulysses, one auto, one hybrid run per mutation
RUNS = (("canonicalize,shard-sequence{attention=ring}", "3"),
        ("shard-sequence{attention=ulysses}", "2"),
        ("shard-sequence{attention=auto}", "4"),
        ("shard-sequence{attention=hybrid}", "4x2"))


def fuzz_copy(root: Path, pipeline: str, mesh: str, examples: int, seed: int) -> int:
    env = {**os.environ, "PYTHONPATH": str(root)}
    command = [sys.executable, "-m", "seqweave.cli", "fuzz", "--pipeline", pipeline, "--mesh", mesh,
               "--examples", str(examples), "--seed", str(seed), "--out", str(root / "failures")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=root)
    if done.returncode not in (0, 1):
        print(done.stdout[-800:] + done.stderr[-1500:])
    return done.returncode


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("ids", nargs="*")
    parser.add_argument("--examples", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write {mutation: found run or null} here")
    args = parser.parse_args()
    results = {}
    for mutation in by_id(args.ids or None):
        start = time.monotonic()
        with tempfile.TemporaryDirectory() as directory:
            root = make_copy(mutation, Path(directory))
            found = None
            for pipeline, mesh in RUNS:
                status = fuzz_copy(root, pipeline, mesh, args.examples, args.seed)
                if status == 1:
                    found = f"{pipeline} --mesh {mesh}"
                    break
        results[mutation.id] = found
        print(f"{'found' if found else 'MISSED':6} {mutation.id:28} {time.monotonic() - start:6.1f} s  {found or ''}",
              flush=True)
    print(f"{sum(1 for f in results.values() if f)} of {len(results)} found")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
