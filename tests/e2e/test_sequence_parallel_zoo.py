"""Sequence parallelism for models written the way users write them (seqweave.testing.sp_zoo):
attention alone on q, k, v inputs with grouped KV heads (causal, a window, packed documents),
float latents trained with MSE, a ViT classifier with mean pooling and the loss outside, a GPT
with einsum attention, nn.TransformerEncoder (batch-first and not) with causal and key padding
masks, every usual loss inside the graph, HF Llama returning logits with the loss outside and
fed float `inputs_embeds`; on
2, 3 and 4 gloo ranks under ring (zigzag, striped, none), Ulysses, hybrid and auto, with
outputs gathered and sharded (DTensors), at lengths that split and that do not.

Each case pins the attention op that ran and that no op fell back to gathered operands, and
compares output, loss and every gradient (parameters and float inputs) with one eager process.
One process per rank runs all of a world's cases: compiling dominates, not starting ranks.
"""
import pytest

import seqweave
from seqweave.testing.distributed import run_ranks
from seqweave.testing.sp_zoo import sp_steps

TOLERANCE = 1e-5

# (zoo entry, length, options, the distributed attention op it must run as)
CASES = {
    2: [("dit", 9, {"attention": "ring", "balance": "zigzag"}, "attn.ring"),
        ("vit", 9, {"attention": "ring", "balance": "striped"}, "attn.ring"),
        ("einsum-gpt", 9, {"attention": "ring", "balance": "zigzag"}, "attn.ring"),
        ("losses", 9, {"attention": "ring", "balance": "striped"}, "attn.ring"),
        ("encoder-seq-first", 9, {"attention": "ring", "balance": "none", "outputs": "sharded"}, "attn.ring"),
        ("hf-llama-logits", 8, {"attention": "ring", "balance": "zigzag", "outputs": "sharded"}, "attn.ring"),
        ("attention-documents", 9, {"attention": "ring", "balance": "zigzag"}, "attn.ring")],
    3: [("attention-window", 11, {"attention": "ring", "balance": "none", "outputs": "sharded"}, "attn.ring"),
        ("vit", 10, {"attention": "ring", "balance": "none"}, "attn.ring"),
        ("encoder-batch-first", 12, {"attention": "ring", "balance": "zigzag", "outputs": "sharded"}, "attn.ring"),
        ("hf-llama-logits", 10, {"attention": "ring", "balance": "none", "outputs": "sharded"}, "attn.ring"),
        ("hf-llama-embeds", 11, {"attention": "ring", "balance": "none"}, "attn.ring")],
    4: [("dit", 8, {"attention": "ulysses", "balance": "zigzag"}, "attn.ulysses"),
        ("einsum-gpt", 8, {"attention": "ulysses", "balance": "striped"}, "attn.ulysses"),
        ("vit", 8, {"attention": "hybrid", "mesh": seqweave.Mesh(ulysses=2, ring=2)}, "attn.hybrid"),
        ("losses", 8, {"attention": "auto", "balance": "zigzag"}, None),
        ("hf-llama-logits", 8, {"attention": "auto", "balance": "zigzag"}, None),
        ("attention-causal", 16, {"attention": "ulysses", "balance": "striped"}, "attn.ulysses")],
}

#: the MaskSpec each bare attention must be lifted to (documents from a caller's tensor stay dense: exact)
MASKS = {"attention-causal": "causal", "attention-window": "causal & sliding_window(2, 0)",
         "attention-documents": "dense($0)"}


@pytest.mark.parametrize("world", sorted(CASES))
def test_zoo_trains_one_step_like_eager(world):
    cases = CASES[world]
    results = run_ranks(world, sp_steps, [(name, n, options) for name, n, options, _ in cases], timeout_s=600)
    for rank, per_case in enumerate(results):
        for (name, n, options, op), result in zip(cases, per_case):
            label = (rank, name, n, options)
            worst = max(result["errors"].items(), key=lambda item: item[1])
            assert worst[1] <= TOLERANCE, (label, worst)
            assert name not in MASKS or result["masks"] == [MASKS[name]], (label, result["masks"])
            fallbacks = [w for w in result["warnings"] if "ran on operands gathered" in w]
            assert not fallbacks, (label, fallbacks)
            distributed = [o for o in result["ops"] if o in ("attn.ring", "attn.ulysses", "attn.hybrid")]
            assert distributed and (op is None or distributed == [op]), (label, result["ops"])


def sharded_inference(rank: int, world: int) -> tuple:
    """HF Llama logits under no_grad with outputs="sharded": a DTensor of this rank's rows whose
    unshard equals eager."""
    import torch
    from seqweave.testing.sp_zoo import ZOO

    model, (ids,) = ZOO["hf-llama-logits"].build(8)
    model.eval()
    backend = seqweave.backend(mesh=seqweave.Mesh(sp=world), outputs="sharded", balance="zigzag", timeout=60)
    with torch.no_grad():
        out = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)(ids)
        expected = model(ids)
    error = float((seqweave.unshard(out, "zigzag") - expected).abs().max() / expected.abs().max())
    return type(out).__name__, tuple(out.to_local().shape), error, [c.kind for c in backend.graphs]


def test_sharded_outputs_without_grad_are_dtensors_of_each_ranks_rows():
    for kind, local_shape, error, graphs in run_ranks(2, sharded_inference, timeout_s=300):
        assert (kind, local_shape, graphs) == ("DTensor", (2, 4, 128), ["inference"])
        assert error <= TOLERANCE
