"""`double-sparsity{table=path, tokens=K}`: decode attention restricted to the K keys a
calibrated subset of channels picks (Double Sparsity; see `seqweave.double_sparsity`).

Only inference graphs' single-query attentions (decode steps) are rewritten: the prefill and
every training graph stay exact. An approximation, by declaration: the calibration reports
its recall.
"""
from __future__ import annotations

from dataclasses import dataclass

from seqweave.errors import PassError
from seqweave.ir.graph import Graph
from seqweave.ir.ops.attn_sparsity import ChannelTable
from seqweave.passes.base import Pass, PassResult


@dataclass(frozen=True)
class DoubleSparsityPass(Pass):
    """Each decode query attends to the `tokens` keys with the best scores over the channels of
    `table` (a JSON file from `seqweave.double_sparsity.calibrate`; `tokens=0` keeps its K)."""

    name = "double-sparsity"
    table: str = ""
    tokens: int = 0

    def run(self, graph: Graph) -> PassResult:
        if not self.table:
            raise PassError("double-sparsity needs its calibration table", pass_name=self.name,
                            hint="calibrate with seqweave.double_sparsity.calibrate(model, inputs).save('ds.json'), "
                                 "then double-sparsity{table=ds.json,tokens=64}")
        if graph.name != "inference":
            return PassResult(0, f"{graph.name} graph left exact")
        table = ChannelTable.load(self.table)
        rewritten = 0
        for node in graph.nodes:
            queries = node.args[0].type.shape[2] if node.op == "attn.sdpa" else None
            if queries != 1:
                continue
            layer = node.kwargs.get("layer", -1)
            if layer not in table.channels:
                raise PassError(f"the table has no channels for attention layer {layer}", pass_name=self.name,
                                hint="calibrate on the same model (its layers: 0 .. n-1 in capture order)")
            node.kwargs = {**node.kwargs, "sparsity": str(table.sparsity(layer, self.tokens))}
            rewritten += 1
        return PassResult(rewritten, f"{rewritten} decode attentions, K = {self.tokens or table.tokens}")
