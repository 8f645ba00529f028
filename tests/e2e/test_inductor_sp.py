"""Sequence parallelism with inner_backend="inductor" on real gloo ranks: each rank's forward
and backward are Inductor-compiled with ring / Ulysses / hybrid attention and the gathers as
extern calls, train one step like eager, and the ranks on this machine compile each program
once between them (the others read Inductor's cache)."""
import pytest

import seqweave
from seqweave.testing.distributed import run_ranks
from seqweave.testing.sp_zoo import sp_steps

TOLERANCE = 1e-5

CASES = {  # (zoo entry, length, options, the distributed attention op it must run as)
    2: [("dit", 9, {"attention": "ring", "balance": "zigzag"}, "attn.ring"),
        ("hf-llama-logits", 8, {"attention": "ulysses", "balance": "striped", "outputs": "sharded"}, "attn.ulysses")],
    4: [("vit", 8, {"attention": "hybrid", "mesh": seqweave.Mesh(ulysses=2, ring=2)}, "attn.hybrid")],
}


@pytest.mark.slow
@pytest.mark.parametrize("world", sorted(CASES))
def test_inductor_ranks_train_like_eager_and_compile_once(world):
    cases = CASES[world]
    runs = [(name, n, {**options, "inner_backend": "inductor"}) for name, n, options, _ in cases]
    results = run_ranks(world, sp_steps, runs, timeout_s=900)
    for index, (name, n, options, op) in enumerate(cases):
        per_rank = [results[rank][index] for rank in range(world)]
        for rank, result in enumerate(per_rank):
            worst = max(result["errors"].items(), key=lambda item: item[1])
            assert worst[1] <= TOLERANCE, (rank, name, worst)
            assert op in result["ops"] and f"{op}_backward" in result["ops"], (rank, name, result["ops"])
            assert {(kind, runner) for kind, runner, _ in result["runners"]} == \
                {("forward", "inductor"), ("backward", "inductor")}, (rank, name, result["runners"])
        for graph in range(len(per_rank[0]["runners"])):
            stats = [result["runners"][graph][2] for result in per_rank]
            assert all(s["extern_calls"] >= 2 for s in stats), (name, stats)  # attention + gathers
            compiled_here = sum(s["compiles"] - s["cache_hits"] for s in stats)
            assert compiled_here <= 1, (name, graph, stats)  # one rank compiled, the others read the cache
