"""The on-disk kernel module cache: atomic entries, damaged or stale entries rebuilt, safe across processes."""
from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from seqweave.codegen.cache import HEADER_PREFIX, KernelCache, triton_version

SOURCE = '''\
SCALE = 3


def triple(x):
    return x * SCALE * FACTOR
'''


def entry_text(path: Path) -> str:
    return path.read_text()


def test_an_entry_is_written_once_and_loaded_with_its_namespace(tmp_path: Path):
    cache = KernelCache(tmp_path)
    module = cache.load(SOURCE, "interpreter", {"FACTOR": 2})
    assert module.triple(5) == 30
    path = cache.path_for(SOURCE, "interpreter")
    header, body = entry_text(path).split("\n", 1)
    assert header.startswith(HEADER_PREFIX) and f"triton={triton_version()}" in header
    assert body == SOURCE
    assert cache.load(SOURCE, "interpreter", {"FACTOR": 2}) is module  # executed once per process
    assert not list(path.parent.glob("*.tmp"))  # no temporary file left behind


def test_keys_differ_by_device_and_source(tmp_path: Path):
    cache = KernelCache(tmp_path)
    paths = {cache.path_for(SOURCE, "interpreter"), cache.path_for(SOURCE, "NVIDIA_H100-sm90"),
             cache.path_for(SOURCE + "\n", "interpreter")}
    assert len(paths) == 3


@pytest.mark.parametrize("damage", ["truncate", "garbage", "stale_triton", "binary"])
def test_damaged_or_stale_entries_are_rebuilt(tmp_path: Path, damage: str):
    KernelCache(tmp_path).load(SOURCE, "interpreter", {"FACTOR": 1})
    path = KernelCache(tmp_path).path_for(SOURCE, "interpreter")
    text = entry_text(path)
    if damage == "truncate":  # a writer killed half-way (without our atomic rename)
        path.write_text(text[: len(text) // 2])
    elif damage == "garbage":
        path.write_text(text.replace("x * SCALE", "x +* SCALE"))
    elif damage == "stale_triton":
        path.write_text(text.replace(f"triton={triton_version()}", "triton=0.0.1"))
    else:
        path.write_bytes(b"\xff\xfe\x00" * 10)
    fresh = KernelCache(tmp_path)  # a new process's view
    assert fresh.load(SOURCE, "interpreter", {"FACTOR": 1}).triple(2) == 6
    assert fresh.rebuilt == [path]
    assert entry_text(path) == text


def _compile_in_process(root: str, seed: int, queue) -> None:
    cache = KernelCache(Path(root))
    results = [cache.load(SOURCE, "interpreter", {"FACTOR": seed}).triple(1) for _ in range(3)]
    queue.put((seed, results, [str(p) for p in cache.rebuilt]))


def test_concurrent_compiles_from_several_processes(tmp_path: Path):
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [context.Process(target=_compile_in_process, args=(str(tmp_path), seed, queue)) for seed in range(4)]
    for worker in workers:
        worker.start()
    results = sorted(queue.get(timeout=120) for _ in workers)
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    assert [r[1] for r in results] == [[3 * seed] * 3 for seed in range(4)]
    assert all(r[2] == [] for r in results)  # nobody ever saw a partial entry
    entries = list(tmp_path.rglob("*.py"))
    assert len(entries) == 1 and not list(tmp_path.rglob("*.tmp"))
    assert entries[0].read_text().endswith(SOURCE)
