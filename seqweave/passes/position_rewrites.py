"""Rewrites of what an attention sees: its span of keys and the positions its rotary reads.

Each pass edits the `mask` and `positions` attributes of `attn.sdpa` and `attn.sdpa_backward`
alike (a training step's forward and backward graphs are compiled apart and rewritten the
same way). Positions must have been lifted by the frontend (`seqweave explain` says so per
attention); a pass that needs them and finds an attention without them stops with the reason
rather than rewrite some layers and not others. `layers="0+5"` limits a pass to those
attention layers (their index in the captured model, as `explain` numbers them).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Callable, Iterator

from seqweave.errors import PassError
from seqweave.ir.attribute_form import in_form_of
from seqweave.ir.graph import Graph, Node
from seqweave.ir.mask import And, Causal, DistanceAtLeast, MaskSpec, QueriesBefore, QueriesFrom, Sinks, SlidingWindow
from seqweave.ir.mask_parser import parse_mask
from seqweave.ir.ops.attn import positions_of
from seqweave.ir.positions import Rope, yarn_scaling
from seqweave.passes.base import Pass, PassResult

ATTENTION_OPS = ("attn.sdpa", "attn.sdpa_backward")
SCALE_RULES = ("default", "linear", "dynamic", "yarn", "llama3")
RULE_ALIASES = {"ntk": "dynamic"}  # HF's "dynamic" is the dynamic NTK-aware rule


def parse_layers(text: object, option: str = "layers") -> frozenset[int] | None:
    """`""` -> None (every layer); `3` or `"0+5"` -> {0, 5}."""
    if text in ("", None):
        return None
    try:
        return frozenset(int(part) for part in str(text).split("+"))
    except ValueError:
        raise PassError(f"{option}={text!r} is not a list of layer indices",
                        hint="join layer indices with '+', e.g. full=0+5") from None


def attentions(graph: Graph, layers: frozenset[int] | None = None) -> Iterator[Node]:
    """The attention nodes of `graph`, those of `layers` only when given."""
    for node in graph.nodes:
        if node.op in ATTENTION_OPS and (layers is None or node.kwargs.get("layer", -1) in layers):
            yield node


def _rotary(node: Node, pass_name: str) -> Rope:
    spec = positions_of(node)
    if not isinstance(spec, Rope):
        raise PassError(f"attention layer {node.kwargs.get('layer', '?')} ({node.loc or node.op}) carries no lifted "
                        "rotary embedding, so its positions cannot be rewritten", pass_name=pass_name,
                        hint="`seqweave explain` says per attention whether its rotary was lifted and, if not, why "
                             "(for generate(), pass past_key_values=seqweave.StreamingCache(model, sinks, window): "
                             "its keys never outgrow the span); or limit the pass with layers=...")
    return spec


def _unrewritten_rotary(node: Node, pass_name: str) -> Rope:
    """The lifted rotary, refusing one a streaming / lm-infinite rewrite already split in two."""
    spec = _rotary(node, pass_name)
    if spec.far:
        raise PassError(f"attention layer {node.kwargs.get('layer', '?')} was already rewritten with a far rotation "
                        f"({spec.far})", pass_name=pass_name, hint="use one of streaming / lm-infinite, once")
    return spec


def _key_length(node: Node) -> object:
    return node.args[1 if node.op == "attn.sdpa" else 2].type.shape[2]


def _bounded_by_cache(node: Node, span: int) -> bool:
    """Keys from a cache that holds at most `span` of them (a rolling `StreamingCache`, or the
    first decode steps): the keys are already the ones the method keeps, at the distances the
    cache gave them, so the attention is left as it is."""
    length = _key_length(node)  # a sympy Integer when static
    static = bool(getattr(length, "is_Integer", isinstance(length, int)))
    return static and int(length) <= span and not isinstance(positions_of(node), Rope)


def _set(node: Node, mask: MaskSpec | None = None, positions: Rope | None = None) -> None:
    """Set the attributes, in the form (text or typed) the node holds them in."""
    if mask is not None:
        node.kwargs = {**node.kwargs, "mask": in_form_of(node.kwargs["mask"], mask)}
    if positions is not None:
        node.kwargs = {**node.kwargs, "positions": in_form_of(node.kwargs.get("positions", "none"), positions)}


def _changed(nodes: list[Node], rewrite: Callable[[Node], None]) -> int:
    """Rewrite each node; how many came out different (0 on a graph already rewritten: idempotent)."""
    before = [dict(node.kwargs) for node in nodes]
    for node in nodes:
        rewrite(node)
    return sum(node.kwargs != old for node, old in zip(nodes, before))


def _layers_text(nodes: list[Node]) -> str:
    return "+".join(str(layer) for layer in sorted({node.kwargs.get("layer", -1) for node in nodes}))


class _ChangesTheModel(Pass):
    """A rewrite that changes what the model computes, by design: what it promises is exactly what
    it writes into each attention's attributes, so its declared semantics is the rewrite applied
    to the whole graph, which later passes (shard-sequence) must then compute exactly."""

    def declared_semantics(self, graph: Graph) -> Graph:
        promised = copy.deepcopy(graph)
        self.run(promised)
        return promised


@dataclass(frozen=True)
class RopeScale(_ChangesTheModel):
    """Change the rotary frequencies, as HF's `rope_parameters` would for the same rule.

    `rule=default` with `base=B` is ABF (a new base theta); `linear` divides the frequencies by
    `factor`; `dynamic` (or `ntk`: HF's dynamic NTK) grows the base once positions pass `original_max`; `yarn` blends
    interpolation and extrapolation between the `beta_fast` / `beta_slow` corrections and sets
    the attention scaling to 0.1 ln(factor) + 1; `llama3` divides long wavelengths by `factor`,
    keeps short ones and interpolates between (`low_freq_factor`, `high_freq_factor`).
    `base=0` keeps the lifted base.
    """

    name = "rope-scale"
    base: float = 0.0
    factor: float = 1.0
    rule: str = "default"
    original_max: int = 0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    layers: object = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "rule", RULE_ALIASES.get(self.rule, self.rule))
        if self.rule not in SCALE_RULES:
            raise PassError(f"rule={self.rule!r} is not a rotary scaling rule", pass_name=self.name,
                            hint=f"use one of {SCALE_RULES} (ntk = dynamic)")
        if self.rule in ("dynamic", "yarn", "llama3") and self.original_max <= 0:
            raise PassError(f"rule={self.rule} needs original_max (the context length the model was trained at)",
                            pass_name=self.name, hint=f"e.g. rope-scale{{rule={self.rule},factor=8,original_max=8192}}")

    def run(self, graph: Graph) -> PassResult:
        nodes = list(attentions(graph, parse_layers(self.layers)))
        changed = _changed(nodes, lambda node: _set(node, positions=self.scaled(_rotary(node, self.name), node)))
        return PassResult(changed, f"rule {self.rule} on layers {_layers_text(nodes)}")

    def scaled(self, spec: Rope, node: Node) -> Rope:
        base = self.base or spec.base
        if base <= 0:
            raise PassError(f"attention layer {node.kwargs.get('layer', '?')}: its rotary frequencies are a table "
                            "(not base^(-2i/d)), so there is no base to scale", pass_name=self.name,
                            hint="give the base explicitly, e.g. rope-scale{base=10000,rule=linear,factor=4}")
        low, high = (self.beta_slow, self.beta_fast) if self.rule == "yarn" else \
            (self.low_freq_factor, self.high_freq_factor)
        scaling = yarn_scaling(self.factor) if self.rule == "yarn" else 1.0
        return replace(spec, rule=self.rule, base=float(base), freqs=-1, factor=float(self.factor),
                       original_max=int(self.original_max), low=float(low), high=float(high), scaling=scaling)


@dataclass(frozen=True)
class RopeFp32(_ChangesTheModel):
    """Rotate q and k in fp32 and cast back (AnchorAttention: bf16 rotary tables and products
    lose relative positions at long context). Exact no-op in fp32 models."""

    name = "rope-fp32"
    layers: object = ""

    def run(self, graph: Graph) -> PassResult:
        nodes = list(attentions(graph, parse_layers(self.layers)))
        fp32 = lambda node: _set(node, positions=replace(_rotary(node, self.name), compute="float32"))  # noqa: E731
        changed = _changed(nodes, fp32)
        return PassResult(changed, f"fp32 rotary on layers {_layers_text(nodes)}")


def _causal(mask: MaskSpec) -> MaskSpec:
    """`mask & causal`, without repeating a causal term the mask already has."""
    parts = mask.parts if isinstance(mask, And) else (mask,)
    return mask if Causal() in parts else mask & Causal()


def _span(sinks: int, window: int) -> MaskSpec:
    """Each query sees the first `sinks` keys and itself with the `window - 1` keys before it."""
    return Sinks(sinks) | SlidingWindow(window - 1, 0) if sinks else SlidingWindow(window - 1, 0)


def _check_span(pass_name: str, sinks: object, window: object) -> None:
    if not isinstance(sinks, int) or not isinstance(window, int) or sinks < 0 or window < 1:
        raise PassError(f"sinks={sinks!r}, window={window!r}: need whole numbers, sinks >= 0 and window >= 1",
                        pass_name=pass_name, hint=f"e.g. {pass_name}{{sinks=4,window=1024}}")


@dataclass(frozen=True)
class _SpanRewrite(_ChangesTheModel):
    """Shared by streaming and lm-infinite: the Λ-shaped span (the first `sinks` keys and the
    last `window`, itself included) on every attention with a lifted rotary, whose pairs each
    subclass splits into near (true positions) and far (another rotation)."""

    idempotent = False  # a second run refuses the far rotation the first one wrote
    sinks: int = 4
    window: int = 1024
    layers: object = ""

    def __post_init__(self) -> None:
        _check_span(self.name, self.sinks, self.window)

    def run(self, graph: Graph) -> PassResult:
        nodes = [node for node in attentions(graph, parse_layers(self.layers))
                 if not _bounded_by_cache(node, self.sinks + self.window)]
        for node in nodes:
            spec = _unrewritten_rotary(node, self.name)  # a rotary left in the graph would see wrong distances
            mask, positions = self.split(_causal(parse_mask(node.kwargs["mask"])), spec)
            _set(node, mask=mask, positions=positions)
        return PassResult(len(nodes), f"{self.describe()} on layers {_layers_text(nodes)}")

    def split(self, causal: MaskSpec, spec: Rope) -> tuple[MaskSpec, Rope]:
        """(near mask, spec with the far pairs) from the attention's own mask made causal."""
        raise NotImplementedError

    def describe(self) -> str:
        return f"sinks {self.sinks}, window {self.window}"


@dataclass(frozen=True)
class Streaming(_SpanRewrite):
    """StreamingLLM: each query sees the first `sinks` tokens and the last `window` (itself
    included), with positions taken inside that cache: once a query is past `sinks + window`
    tokens, the cache holds the sinks and the window, the query sits at slot sinks+window-1 and
    the keys at their slots, so window keys keep their true distance and a sink key j is seen
    at distance sinks+window-1-j. Written as the near pairs (true positions) and the far pairs
    `sinks(s) & queries_from(s+w)` (query rotated at s+w-1). Positions are token indices."""

    name = "streaming"

    def split(self, causal: MaskSpec, spec: Rope) -> tuple[MaskSpec, Rope]:
        seen = causal & _span(self.sinks, self.window)
        if not self.sinks:
            return seen, spec
        cache = self.sinks + self.window
        near = seen & (SlidingWindow(self.window - 1, 0) | QueriesBefore(cache))
        far = seen & Sinks(self.sinks) & QueriesFrom(cache)
        return near, replace(spec, far=str(far), far_q=cache - 1, far_k=-1)


@dataclass(frozen=True)
class LmInfinite(_SpanRewrite):
    """LM-Infinite: the Λ-shaped mask (first `sinks` tokens and the last `window`) and a limit
    on the distance RoPE sees: a pair further apart than `max_distance` (default: the window)
    is scored as if exactly `max_distance` apart (query rotated at max_distance, key at 0)."""

    name = "lm-infinite"
    max_distance: int = 0

    def split(self, causal: MaskSpec, spec: Rope) -> tuple[MaskSpec, Rope]:
        limit = self.max_distance or self.window
        seen = causal & _span(self.sinks, self.window)
        near = seen & SlidingWindow(limit, 0)
        # Past the window only sinks are seen: saying so lets the ring skip every other key block.
        far = (causal & Sinks(self.sinks) if limit >= self.window - 1 else seen) & DistanceAtLeast(limit + 1)
        return near, replace(spec, far=str(far), far_q=limit, far_k=0)

    def describe(self) -> str:
        return f"{super().describe()}, max distance {self.max_distance or self.window}"


@dataclass(frozen=True)
class MixedSpans(_ChangesTheModel):
    """MASFormer: full attention in the layers listed in `full` (indices joined by '+'), a
    sliding window elsewhere; `window=W` means each query sees itself and the W - 1 tokens
    before it (HF's `sliding_window=W`)."""

    name = "mixed-spans"
    window: int = 1024
    full: object = ""

    def __post_init__(self) -> None:
        if not isinstance(self.window, int) or self.window < 1:
            raise PassError(f"window={self.window!r} must be a whole number >= 1", pass_name=self.name,
                            hint="e.g. mixed-spans{window=4096,full=0+5}")

    def run(self, graph: Graph) -> PassResult:
        full = parse_layers(self.full, "full") or frozenset()
        window = SlidingWindow(self.window - 1, 0)
        # an attention that already has this window as a conjunct keeps its mask: a second run changes nothing
        nodes = [node for node in attentions(graph) if node.kwargs.get("layer", -1) not in full
                 and not _has_conjunct(parse_mask(node.kwargs["mask"]), window)]
        for node in nodes:
            if "layer" not in node.kwargs:
                raise PassError(f"{node.op} ({node.loc}) has no layer index", pass_name=self.name,
                                hint="this attention was not captured by seqweave's frontend; report this graph")
            if isinstance(positions_of(node), Rope) and positions_of(node).far:
                raise PassError("mixed-spans after streaming / lm-infinite would cut their far pairs",
                                pass_name=self.name, hint="put mixed-spans first in the pipeline")
            _set(node, mask=parse_mask(node.kwargs["mask"]) & window)
        return PassResult(len(nodes), f"window {self.window} on layers {_layers_text(nodes)}; full on "
                                      f"{'+'.join(map(str, sorted(full))) or 'none'}")


def _has_conjunct(mask: MaskSpec, part: MaskSpec) -> bool:
    """Is `part` the mask itself or one of the parts of its `&`?"""
    return mask == part or (isinstance(mask, And) and part in mask.parts)
