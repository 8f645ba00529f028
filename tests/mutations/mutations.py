"""Planted bugs: small source mutations of `seqweave`, each with the fast tests that must catch it.

Each `Mutation` replaces one exact piece of source text (it must occur exactly once, so a
refactor that moves the code makes the harness fail loudly, naming the mutation) in a copy of
the package in a temporary directory. The catching tests then run in pytest, forked from a
`Runner` process, with that copy first on sys.path (and PYTHONPATH, for ranks they spawn); a
small plugin (`-p _mutant_check`, written next to the copy) refuses to run unless `seqweave`
was imported from the copy, so the editable install in .venv cannot silently win. Caught means
pytest exits 1 (a test failed): a collection error, a usage error or "no tests ran" means the
harness or the table is broken, not that the bug was caught.

Run it by hand: `python tests/mutations/mutations.py [mutation ids...]` prints each verdict.
"""
from __future__ import annotations

import functools
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "seqweave"
#: The fast tier: what CI runs on every change. A catching test marked slow is deselected, so
#: it cannot count as a catch (the subprocess would report "no tests ran").
FAST_TIER = "not slow"
PYTEST_FLAGS = ("-x", "-q", "-p", "no:cacheprovider", "-m", FAST_TIER, "-o", "addopts=")
#: pytest exit codes: 0 all passed, 1 some test failed; anything else is not a verdict.
PASSED, FAILED = 0, 1
CHECK_PLUGIN = "_mutant_check"
ROOT_ENV = "SEQWEAVE_MUTANT_ROOT"
PLUGIN_SOURCE = f'''"""Refuse to run tests unless seqweave is imported from the copy under ${ROOT_ENV}."""
import os
from pathlib import Path

import pytest


def pytest_configure(config):
    import seqweave
    where = Path(seqweave.__file__).resolve()
    root = Path(os.environ["{ROOT_ENV}"]).resolve()
    if root not in where.parents:
        raise pytest.UsageError(f"seqweave was imported from {{where}}, not from the copy under {{root}}")
'''


@dataclass(frozen=True)
class Mutation:
    """One planted bug: replace `old` (exactly once) by `new` in seqweave/`path`."""

    id: str
    description: str
    path: str  # relative to the seqweave package
    old: str
    new: str
    tests: tuple[str, ...]  # pytest node ids (relative to the repository root) that must catch it


MUTATIONS: tuple[Mutation, ...] = (
    Mutation(
        "lse-merge-sign", "ring LSE merge weights the second partial by exp(max - lse) instead of exp(lse - max)",
        "ir/ops/attn_reference.py",
        "weight_b = torch.exp(lse_b.to(acc) - safe)", "weight_b = torch.exp(safe - lse_b.to(acc))",
        ("tests/ir/test_attention_blockwise.py::test_zigzag_shards_merged_over_kv_blocks_equal_full_attention",)),
    Mutation(
        "q-offset-off-by-one", "generated kernels get each query run's global offset one too large",
        "codegen/attention_kernels.py",
        "scale, operands, q_run[2], kv_run[2])", "scale, operands, q_run[2] + 1, kv_run[2])",
        ("tests/codegen/test_attention_kernels.py::test_zigzag_positions_match_the_float64_reference",)),
    Mutation(
        "missing-wait", "Pending.wait_one hands back the receive buffers without waiting for the transfers",
        "runtime/comm.py",
        "received = self.wait()\n", "received = self._received\n",
        ("tests/runtime/test_comm_delivery.py::test_a_receive_waits_for_a_late_send",)),
    Mutation(
        "swapped-send-recv", "ring shift sends to rank-1 and receives from rank+1 (K/V travel the wrong way)",
        "runtime/comm.py",
        "sends = [] if tensor is None else [((self.rank + 1) % self.world, tensor)]\n"
        "        recvs = [] if recv_like is None else [((self.rank - 1) % self.world, recv_like)]",
        "sends = [] if tensor is None else [((self.rank - 1) % self.world, tensor)]\n"
        "        recvs = [] if recv_like is None else [((self.rank + 1) % self.world, recv_like)]",
        ("tests/runtime/test_comm_delivery.py::test_a_shift_receives_from_the_previous_rank",)),
    Mutation(
        "ring-runtime-step-skipped", "the ring attention forward runs P-1 steps: the last source's K/V, which "
        "the mask needs, is never attended to",
        "runtime/sequence_parallel.py",
        "    for step in range(comm.world):\n        pending = _shift_kv(comm, plan, held, like, step,",
        "    for step in range(comm.world - 1):\n        pending = _shift_kv(comm, plan, held, like, step,",
        ("tests/testing/test_simulate.py::test_sharded_forward_on_simulated_ranks_equals_the_whole_graph",)),
    Mutation(
        "kv-replica-grads-averaged", "Ulysses/hybrid average the dK/dV of K/V heads replicated over the ranks "
        "instead of summing them",
        "runtime/sequence_parallel.py",
        "(heads.kv_heads, heads.kv_repeat)).sum(2)", "(heads.kv_heads, heads.kv_repeat)).mean(2)",
        ("tests/testing/test_simulate.py::test_sharded_backward_on_simulated_ranks_equals_the_whole_graph",)),
    Mutation(
        "dropped-grad-all-reduce", "a partial sum (a weight gradient, a summed loss) leaves the sharded graph "
        "without its all-reduce",
        "passes/shard_sequence.py",
        "if builder.partial(mapped):  # a partial sum leaves the graph only all-reduced\n"
        "                mapped = builder.gathered(mapped)",
        "if builder.partial(mapped):  # a partial sum leaves the graph only all-reduced\n"
        "                pass",
        ("tests/passes/test_shard_sequence.py::test_a_sum_over_the_sequence_is_partial_then_all_reduced",)),
    Mutation(
        "halo-one-token-short", "each contiguous run of a shard ends one token early, so a window's reach into "
        "the neighbouring shard (its halo) misses the last token and the pair is classified EMPTY",
        "ir/sharding.py",
        "int(positions[b - 1]) + 1) for a, b", "int(positions[b - 1])) for a, b",
        ("tests/ir/test_sharding.py::test_pair_class_never_contradicts_dense_mask",)),
    Mutation(
        "ring-step-skipped", "the ring plan stops forwarding a K/V shard one rank before the last rank that "
        "needs it",
        "ir/sharding.py",
        "later = later[: (source - holder - 1) % world]", "later = later[: (source - holder - 2) % world]",
        ("tests/ir/test_sharding.py::test_ring_plan_delivers_exactly_what_is_needed",)),
    Mutation(
        "mask-lift-without-probes", "mask lifting accepts a spec that reproduces the mask on the example inputs "
        "alone (its random probes are never compared)",
        "frontend/mask_lift.py",
        "    for values in rounds:\n", "    for values in rounds[:1]:\n",
        ("tests/frontend/test_mask_lift_probes.py",)),
    Mutation(
        "auto-picks-costlier", "attention='auto' takes the candidate with the most bytes instead of the fewest",
        "passes/strategy.py",
        "best = found[costs.index(min(costs))]", "best = found[costs.index(max(costs))]",
        ("tests/passes/test_auto_strategy_cost.py",)),
    Mutation(
        "tile-rule-off-by-one", "the causal block rule calls a tile EMPTY when its first key is the last query's "
        "own position (the diagonal)",
        "ir/mask.py",
        "all_false=kv[0] > q[1] - 1)", "all_false=kv[0] >= q[1] - 1)",
        ("tests/ir/test_mask.py::test_structured_block_class_exact_on_every_small_block",)),
    Mutation(
        "grid-tile-rule-off-by-one", "the generated kernels' causal tile-grid rule (tile_grid.py) calls the "
        "diagonal tile EMPTY",
        "codegen/triton/tile_grid.py",
        "b.kv_first > b.q_last)", "b.kv_first >= b.q_last)",
        ("tests/codegen/test_schedule.py::test_structured_grid_rules_equal_block_class",)),
    Mutation(
        "zigzag-chunk-off-by-one", "zigzag gives rank r chunk 2P-2-r instead of 2P-1-r as its second chunk",
        "ir/sharding.py",
        "first, second = rank * chunk, (2 * world - 1 - rank) * chunk",
        "first, second = rank * chunk, (2 * world - 2 - rank) * chunk",
        ("tests/ir/test_sharding.py::test_positions_partition_the_sequence",)),
    Mutation(
        "loss-count-not-all-reduced", "a sharded mean nll/cross-entropy loss divides the global sum by this "
        "rank's count of non-ignored targets",
        "passes/sharding_rules.py",
        "total, count = ctx.all_reduce(total), ctx.all_reduce(count)",
        "total, count = ctx.all_reduce(total), count",
        ("tests/passes/test_sharded_loss_count.py",)),
)


@dataclass(frozen=True)
class Verdict:
    """What a pytest subprocess said: its exit code, seconds, and the end of its output."""

    name: str
    returncode: int
    seconds: float
    output: str

    @property
    def caught(self) -> bool:
        return self.returncode == FAILED


def by_id(ids: list[str] | None = None) -> list[Mutation]:
    known = {m.id: m for m in MUTATIONS}
    unknown = [i for i in ids or [] if i not in known]
    if unknown:
        raise KeyError(f"unknown mutation ids {unknown}; known: {sorted(known)}")
    return [known[i] for i in ids] if ids else list(MUTATIONS)


def mutated_source(mutation: Mutation, package: Path = PACKAGE) -> str:
    """The mutated text of the file; AssertionError (naming the mutation) unless `old` occurs once."""
    source = (package / mutation.path).read_text()
    found = source.count(mutation.old)
    assert found == 1, (f"mutation {mutation.id!r}: the text to replace occurs {found} times in seqweave/"
                        f"{mutation.path} (expected once); update its `old` in tests/mutations/mutations.py")
    return source.replace(mutation.old, mutation.new)


def make_copy(mutation: Mutation | None, into: Path) -> Path:
    """A copy of the package under `into` (mutated unless `mutation` is None), with the check plugin."""
    shutil.copytree(PACKAGE, into / "seqweave", ignore=shutil.ignore_patterns("__pycache__"))
    if mutation is not None:
        (into / "seqweave" / mutation.path).write_text(mutated_source(mutation))
    return with_check_plugin(into)


def with_check_plugin(root: Path) -> Path:
    (root / f"{CHECK_PLUGIN}.py").write_text(PLUGIN_SOURCE)
    return root


class Runner:
    """A process that has imported what every test run needs (torch, dynamo, pytest...) but not
    seqweave, and forks one child per run: each run then costs its tests, not a fresh interpreter
    importing torch (several seconds each, on two cores). Jobs and replies are JSON lines."""

    def __init__(self) -> None:
        # -P: the working directory (the repository, holding the real seqweave) is not put on sys.path
        self._process = subprocess.Popen([sys.executable, "-P", __file__, "--serve"], cwd=REPO, text=True,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         env={k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"})

    def run(self, name: str, root: Path, tests: tuple[str, ...], *extra: str, env: dict[str, str] | None = None,
            timeout_s: int = 240) -> Verdict:
        """Run `tests` with the package under `root` first on sys.path; the plugin checks which one loaded."""
        log = root / f"pytest-{name}.log"
        # the fixed CI profile unless asked otherwise: a catch must not depend on this run's examples
        job = {"root": str(root), "log": str(log), "timeout_s": timeout_s,
               "env": {"HYPOTHESIS_PROFILE": "ci", **(env or {})},
               "args": [*PYTEST_FLAGS, "-p", CHECK_PLUGIN, *extra, *tests]}
        start = time.monotonic()
        self._process.stdin.write(json.dumps(job) + "\n")
        self._process.stdin.flush()
        reply = self._process.stdout.readline()
        code = json.loads(reply)["returncode"] if reply else -1
        output = log.read_text() if log.exists() else "(no output)"
        return Verdict(name, code, time.monotonic() - start, output[-3000:])

    def close(self) -> None:
        self._process.stdin.close()
        self._process.wait(timeout=30)


def serve() -> None:
    """The Runner's side: preload, then fork a pytest child per job line on stdin."""
    import torch
    if not torch.cuda.is_available():  # as tests/conftest.py, before dynamo imports triton.language
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import hypothesis  # noqa: F401
    import pytest  # noqa: F401
    import sympy  # noqa: F401
    import torch._dynamo  # noqa: F401
    assert not any(name.split(".")[0] == "seqweave" for name in sys.modules), "the runner must not import seqweave"
    for line in sys.stdin:
        job = json.loads(line)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            _child(job)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), flush=True)


def _child(job: dict) -> None:
    """Run pytest on the job's package copy, output to its log; never returns."""
    code = 3
    try:
        log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        signal.alarm(job["timeout_s"])  # a hung run ends as killed by SIGALRM: not a verdict
        root = job["root"]
        sys.path.insert(0, root)
        os.environ.update(job["env"])
        os.environ.update({ROOT_ENV: root, "PYTHONDONTWRITEBYTECODE": "1",
                           "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)})
        import pytest
        code = int(pytest.main(job["args"]))
    except BaseException:  # noqa: BLE001 - whatever happened, the parent must get an exit code
        import traceback
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_mutation(runner: Runner, mutation: Mutation) -> Verdict:
    with tempfile.TemporaryDirectory(prefix=f"mutant-{mutation.id}-") as tmp:
        return runner.run(mutation.id, make_copy(mutation, Path(tmp)), mutation.tests)


def run_baseline(runner: Runner, name: str, tests: tuple[str, ...]) -> Verdict:
    """Catching tests on the unmutated package (a copy, through the same checks): all must pass."""
    with tempfile.TemporaryDirectory(prefix="mutant-baseline-") as tmp:
        return runner.run(name, make_copy(None, Path(tmp)), tests)


def baseline_chunks(mutations: list[Mutation], chunks: int = 3) -> dict[str, tuple[str, ...]]:
    """Every catching test once, in a few jobs, so that no single job holds up the others."""
    tests = list(dict.fromkeys(t for m in mutations for t in m.tests))
    return {f"baseline-{i + 1}": tuple(tests[i::chunks]) for i in range(min(chunks, len(tests)))}


def run_all(mutations: list[Mutation], runners: list[Runner] | None = None) -> dict[str, Verdict]:
    """Every mutation and the baseline chunks (names starting "baseline"), one job per runner at a time
    (default: two new runners, closed at the end)."""
    for mutation in mutations:
        mutated_source(mutation)  # fail fast, naming the mutation, before anything runs
    jobs: queue.Queue = queue.Queue()
    for name, tests in baseline_chunks(mutations).items():
        jobs.put(functools.partial(run_baseline, name=name, tests=tests))
    for mutation in mutations:
        jobs.put(functools.partial(run_mutation, mutation=mutation))
    verdicts: dict[str, Verdict] = {}

    def work(runner: Runner) -> None:
        while True:
            try:
                job = jobs.get_nowait()
            except queue.Empty:
                return
            verdict = job(runner)
            verdicts[verdict.name] = verdict

    own = runners is None
    runners = [Runner(), Runner()] if own else runners
    try:
        with ThreadPoolExecutor(len(runners)) as pool:
            for future in [pool.submit(work, runner) for runner in runners]:
                future.result()
    finally:
        for runner in runners if own else []:
            runner.close()
    return verdicts


def main(ids: list[str]) -> int:
    start = time.monotonic()
    verdicts = run_all(by_id(ids))
    for verdict in verdicts.values():
        expected = PASSED if verdict.name.startswith("baseline") else FAILED
        status = "ok" if verdict.returncode == expected else "WRONG"
        print(f"{status:5} {verdict.name:28} exit {verdict.returncode}  {verdict.seconds:5.1f} s")
        if status != "ok":
            print("      " + verdict.output[-1500:].replace("\n", "\n      "))
    print(f"total {time.monotonic() - start:.1f} s")
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        serve()
    else:
        raise SystemExit(main(sys.argv[1:]))
