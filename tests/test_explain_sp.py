"""`explain(world=P)` names outputs gathered whole on every rank when one is the largest tensor a
rank holds (HF logits), and stays quiet for a model whose output is small."""
import torch

from seqweave.explain import explain
from seqweave.testing.models import SampleSpec, build_sample


def test_logits_are_named_as_the_largest_gathered_output():
    model, inputs = build_sample(SampleSpec("llama-tiny", seq_len=64, layers=1))
    inputs.pop("labels")
    totals = explain(model.eval(), inputs, world=4).totals
    (logits,) = [o for o in totals["gathered_outputs"] if o["largest_per_rank"]]
    assert logits["shape"] == [2, 64, 128] and logits["bytes"] == 2 * 64 * 128 * 4


def test_a_pooled_output_is_not_a_gathered_output():
    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv = torch.nn.Linear(8, 24)

        def forward(self, x):
            q, k, v = self.qkv(x).view(1, 16, 3, 2, 4).permute(2, 0, 3, 1, 4)
            return torch.nn.functional.scaled_dot_product_attention(q, k, v).mean(dim=2)

    totals = explain(Pooled(), (torch.randn(1, 16, 8),), world=2).totals
    assert totals["gathered_outputs"] == []


def test_explain_names_ops_that_would_run_on_gathered_operands():
    """A running sum over the attention's output tokens (cumsum) has no sharding rule: explain
    --sp says, by name and before anything runs, that it would run on gathered operands."""
    class RunningSum(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv = torch.nn.Linear(8, 24)

        def forward(self, x):
            q, k, v = self.qkv(x).view(1, 16, 3, 2, 4).permute(2, 0, 3, 1, 4)
            return torch.nn.functional.scaled_dot_product_attention(q, k, v).cumsum(dim=2)

    warnings = explain(RunningSum(), (torch.randn(1, 16, 8),), world=2).totals["sp_warnings"]
    assert any("core.cumsum" in w and "gathered" in w for w in warnings), warnings


def test_a_hybrid_model_shows_softmax_and_linear_strategies_with_lasp2_bytes():
    from seqweave.passes.cost import lasp2_bytes
    from seqweave.testing.linear_models import TinyLM

    layers = explain(TinyLM("sl").eval(), (torch.randint(0, 64, (2, 40)),), world=4, balance="none").layers
    softmax, linear = [layer for layer in layers if layer["found"]]
    assert softmax["form"] != "linear" and softmax["sp"]["strategy"] in ("ring", "ulysses", "halo")
    assert linear["form"] == "linear" and linear["sp"]["strategy"] == "lasp2"
    # B=2, H=2, d=16, Dv=16+1 (the row normaliser's column), fp32 states, one run per rank
    assert linear["sp"]["forward_bytes"] == int(lasp2_bytes(batch=2, heads=2, head_dim=16, value_dim=17, world=4))
    assert linear["sp"]["backward_bytes"] == 2 * linear["sp"]["forward_bytes"]
