"""`seqweave fuzz`: nothing found on main; a deliberately broken pass is found, shrunk, written
as an IR file that parses back, and replaying that file reproduces the failure."""
from dataclasses import dataclass

from seqweave.fuzz import MeshShape, check_program, fuzz, read_failure
from seqweave.ir.graph import Graph
from seqweave.ir.mask_parser import parse_mask
from seqweave.passes.base import Pass, PassResult
from seqweave.passes.registry import register_pass
from seqweave.passes.shard_sequence import ShardSequence
from seqweave.testing.programs import generate_program

SHARDED_ATTENTION = ("attn.ring", "attn.ring_backward", "attn.ulysses", "attn.ulysses_backward")


@register_pass
@dataclass(frozen=True)
class ForgetCausal(Pass):
    """A planted bug: sharded attention forgets that its mask is causal."""

    name = "test-forget-causal"

    def run(self, graph: Graph) -> PassResult:
        hit = 0
        for node in graph.nodes:
            if node.op in SHARDED_ATTENTION and "causal" in str(node.kwargs["mask"]):
                forgotten = parse_mask(str(node.kwargs["mask"]).replace("causal", "full"))
                node.kwargs = {**node.kwargs, "mask": forgotten if not isinstance(node.kwargs["mask"], str)
                               else str(forgotten)}
                hit += 1
        return PassResult(hit)


def test_fuzz_finds_nothing_on_main(tmp_path):
    lines = []
    status = fuzz("canonicalize,shard-sequence{world=2}", 30, 5, "3", str(tmp_path), echo=lines.append)
    assert status == 0, "\n".join(lines)
    assert lines[-1] == "30/30 checked, 0 failing" and "25/30 checked, 0 failing" in lines
    assert not list(tmp_path.iterdir())


def test_fuzz_finds_shrinks_and_replays_a_broken_pass(tmp_path):
    pipeline = "shard-sequence{world=2},test-forget-causal"
    lines = []
    status = fuzz(pipeline, 12, 0, None, str(tmp_path), echo=lines.append)
    assert status == 1
    written = sorted(tmp_path.glob("*.ir"))
    assert written and any(line.startswith("FAIL") and "outputs" in line for line in lines)
    replay = next(line for line in lines if "replay:" in line)
    assert f"--replay {written[0]}" in replay and "--mesh 2" in replay
    graph, notes = read_failure(str(written[0]))
    assert notes["problem"].startswith("rank ") and notes["length"].isdigit()
    shrunk_nodes = [line for line in lines if "shrunk to" in line][0]
    before, after = int(shrunk_nodes.split("(from ")[1].split(")")[0]), len(graph.nodes)
    assert after < before and graph.count("attn.sdpa") + graph.count("attn.sdpa_backward") >= 1
    replayed = []
    assert fuzz(pipeline, 1, 0, None, str(tmp_path), echo=replayed.append, replay=str(written[0])) == 1  # its mesh
    assert "rank " in replayed[0] and "outputs" in replayed[0]
    assert fuzz("shard-sequence{world=2}", 1, 0, None, str(tmp_path), echo=replayed.append,
                replay=str(written[0])) == 0  # the shrunk program is fine without the broken pass


def test_check_program_sees_a_wrong_world_split():
    """The per-program check compares every simulated rank with the whole program."""
    program = generate_program(3)
    passes = [ShardSequence(world=2, length=program.length), ForgetCausal()]
    problem = check_program(passes, program.graph, program.length, 0, MeshShape(2))
    assert problem is None or problem.startswith("rank ")
    assert check_program(passes[:1], program.graph, program.length, 0, MeshShape(2)) is None
