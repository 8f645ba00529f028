"""`memory_plan.solve`: a hand-checked plan, the keep-all fast path, budgets no plan meets, recompute
needs, and properties over random step timelines (never worse than a fixed policy that fits; the
brute-force optimum on tiny instances)."""
from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from seqweave.errors import SeqweaveError
from seqweave.passes import memory_plan
from seqweave.passes.memory_plan import (KEEP, OFFLOAD, OFFLOAD_AT_USE, OPTIONS, QUANTIZE, RECOMPUTE, Candidate, InfeasibleBudget,
                                         Machine, allowed_options, device_bytes, fixed_policy, plan_fits,
                                         predicted_seconds, solve)

V = 10**8  # bytes of one value (100 MB): one copy of it takes 2 ms over the default 50 GB/s host link


def _saved(name: str, layer: int, used: int, back: int, **options) -> Candidate:
    """A value used right where it is produced in the forward, and once at `back` in the backward."""
    return Candidate(name, V, layer, produced=used, last_forward_use=used, first_backward_use=back,
                     last_backward_use=back, prefetch_at=back, **options)


# forward 0..3 (the loss at 3 holds V more), backward 4..8 in reverse layer order
THREE = [_saved("a", 0, 0, 6), _saved("b", 1, 1, 5), _saved("c", 2, 2, 4)]
THREE_BASE = [0, 0, 0, V, 0, 0, 0, 0, 0]


def test_device_bytes_and_seconds_of_each_option():
    value = Candidate("v", 8, 0, produced=1, last_forward_use=2, first_backward_use=6, last_backward_use=7,
                      prefetch_at=5, recompute_flops=1.0, quantized_nbytes=2)
    timelines = {KEEP: [0, 8, 8, 8, 8, 8, 8, 8, 0], OFFLOAD: [0, 8, 8, 0, 0, 8, 8, 8, 0],
                 OFFLOAD_AT_USE: [0, 8, 8, 0, 0, 0, 8, 8, 0],
                 RECOMPUTE: [0, 8, 8, 0, 0, 0, 8, 8, 0], QUANTIZE: [0, 8, 10, 2, 2, 2, 10, 10, 0]}
    machine = Machine(host_bandwidth=4.0, flop_rate=2.0, memory_bandwidth=5.0)
    # offload-at-use: its offload hides 1 s of 2 in the window, its prefetch hides nothing (2 s)
    seconds = {KEEP: 0.0, OFFLOAD: 2 * 8 / 4 - 1.0, OFFLOAD_AT_USE: 8 / 4 - 1.0 + 8 / 4, RECOMPUTE: 1.0 / 2,
               QUANTIZE: 2 * (8 + 2) / 5}
    for option in OPTIONS:
        assert device_bytes([value], [0] * 9, {"v": option}) == timelines[option]
        assert predicted_seconds([value], {"v": option}, {0: 1.0}, machine) == seconds[option]


def test_one_offload_lands_in_the_widest_window():
    # keep-all peaks at 4 V at the loss; 3 V forces exactly one value off the device there. Each
    # offload puts 4 ms of copies in its layer's window: exposed 4 - 0, 4 - 1, 4 - 3 ms.
    windows = {0: 0.0, 1: 0.001, 2: 0.003}
    assert max(device_bytes(THREE, THREE_BASE, fixed_policy(THREE, KEEP))) == 4 * V
    plan = solve(THREE, THREE_BASE, 3 * V, windows=windows)
    assert plan.choice == {"a": KEEP, "b": KEEP, "c": OFFLOAD}
    assert plan.of(OFFLOAD) == ["c"] and plan.of(KEEP) == ["a", "b"]
    assert plan.peak_bytes == 3 * V
    assert plan.predicted_seconds == pytest.approx(0.001)
    assert plan.bytes_moved == 2 * V and plan.recompute_flops == 0.0
    # c's prefetch moved to window 0, which hides nothing: c exposes 2 ms there, still under b's 3 ms
    moved = [*THREE[:2], _saved("c", 2, 2, 4, prefetch_window=0)]
    assert solve(moved, THREE_BASE, 3 * V, windows=windows).predicted_seconds == pytest.approx(0.002)


def test_copies_in_one_window_share_the_link():
    # 2 V forces two offloads. Windows 1 and 2 hide 1 and 6 ms: {b, c} exposes 3 ms + 0, {a, c} 4 + 0.
    windows = {0: 0.0, 1: 0.001, 2: 0.006}
    assert solve(THREE, THREE_BASE, 2 * V, windows=windows).predicted_seconds == pytest.approx(0.003)
    # b's copies moved into window 2 with c's: 8 ms of copies share its 6 ms, 2 ms exposed in all
    shared = [THREE[0], _saved("b", 1, 1, 5, offload_window=2, prefetch_window=2), THREE[2]]
    plan = solve(shared, THREE_BASE, 2 * V, windows=windows)
    assert plan.of(KEEP) == ["a"] and plan.predicted_seconds == pytest.approx(0.002)


def test_offload_or_recompute_turns_on_the_window():
    # c can be recomputed for 3 ms or offloaded for 4 ms of copies less what its window hides
    c = _saved("c", 2, 2, 4, recompute_flops=3e11)
    for hidden, expected in ((0.0005, RECOMPUTE), (0.0015, OFFLOAD)):
        plan = solve([*THREE[:2], c], THREE_BASE, 3 * V, windows={0: 0.0, 1: 0.0, 2: hidden})
        assert plan.choice["c"] == expected and plan.of(KEEP) == ["a", "b"]
        assert plan.predicted_seconds == pytest.approx(min(0.003, 0.004 - hidden))


def test_free_offloads_are_not_taken():
    # windows hide every copy, so any offload costs nothing; the plan still moves only the smallest value
    sized = [_saved("a", 0, 0, 6), _saved("b", 1, 1, 5), _saved("c", 2, 2, 4)]
    sized = [Candidate(**{**vars(value), "nbytes": nbytes}) for value, nbytes in zip(sized, (V, 3 * V // 2, 2 * V))]
    plan = solve(sized, THREE_BASE, 5 * V - V // 2, windows={0: 1.0, 1: 1.0, 2: 1.0})
    assert plan.choice == {"a": OFFLOAD, "b": KEEP, "c": KEEP}
    assert plan.predicted_seconds == 0.0 and plan.bytes_moved == 2 * V


def test_keep_all_fits_returns_at_once(monkeypatch):
    def no_solver(*args, **kwargs):
        raise AssertionError("the fast path must not call the MILP")

    monkeypatch.setattr("scipy.optimize.milp", no_solver)
    plan = solve(THREE, THREE_BASE, 4 * V)
    assert plan.choice == {"a": KEEP, "b": KEEP, "c": KEEP}
    assert plan.predicted_seconds == 0.0 and plan.peak_bytes == 4 * V and plan.bytes_moved == 0


def test_budget_below_base_names_the_budget_and_the_bottleneck():
    with pytest.raises(InfeasibleBudget, match=f"budget of {V - 1} bytes") as raised:
        solve(THREE, THREE_BASE, V - 1)
    error = raised.value
    assert isinstance(error, SeqweaveError) and isinstance(error, ValueError)
    assert error.bottleneck == 3 and error.least_peak == V
    assert "shard the sequence" in str(error)


def test_budget_the_candidates_cannot_meet_names_the_least_peak():
    kept_only = [_saved(c.name, c.layer, c.produced, c.first_backward_use, offloadable=False) for c in THREE]
    kept_only[2] = _saved("c", 2, 2, 4, offloadable=False, quantized_nbytes=V // 4)
    with pytest.raises(InfeasibleBudget, match="least peak any plan reaches is 325000000 bytes") as raised:
        solve(kept_only, THREE_BASE, 3 * V)
    assert raised.value.bottleneck == 3 and raised.value.budget == 3 * V


def test_a_value_whose_need_is_offloaded_is_not_recomputed():
    # y must leave the device at the loss (offload only); x is cheap to recompute but needs y kept
    x = _saved("x", 1, 1, 4, recompute_flops=1e9, recompute_needs=("y",), quantized_nbytes=V // 2)
    y = _saved("y", 0, 0, 5)
    base = [0, 0, V, 0, 0, 0, 0]
    one_out = solve([x, y], base, 2 * V)
    assert one_out.choice == {"x": RECOMPUTE, "y": KEEP}  # 10 us of FLOPs beats any copy
    both_out = solve([x, y], base, V + V // 2)
    assert both_out.choice == {"x": QUANTIZE, "y": OFFLOAD}
    assert not plan_fits([x, y], base, {"x": RECOMPUTE, "y": OFFLOAD}, 10 * V)
    assert plan_fits([x, y], base, both_out.choice, V + V // 2)


def test_a_plan_that_overshoots_in_integers_is_resolved_tighter(monkeypatch):
    real, budgets = memory_plan._cheapest_choice, []

    def first_plan_overshoots(model, budget, time_limit):
        budgets.append(budget)
        return {"a": KEEP, "b": KEEP, "c": KEEP} if len(budgets) == 1 else real(model, budget, time_limit)

    monkeypatch.setattr(memory_plan, "_cheapest_choice", first_plan_overshoots)
    plan = solve(THREE, THREE_BASE, 3 * V + 5)
    assert budgets == [3 * V + 5, 2 * V + 10] and plan.peak_bytes <= 3 * V + 5


def test_long_timeline_is_cut_into_few_rows():
    length, layers = 4000, 40
    candidates = [Candidate(f"h{i}", V, i, produced=10 * i, last_forward_use=10 * i + 5,
                            first_backward_use=length - 10 * i - 5, last_backward_use=length - 10 * i - 1,
                            prefetch_at=length - 10 * i - 20, recompute_flops=1e10 * (1 + i % 3))
                  for i in range(layers)]
    base = [(t * 7919) % V for t in range(length)]
    model = memory_plan._build_model(candidates, base, {}, Machine())
    assert len(model.segment_starts) < 10 * layers
    plan = solve(candidates, base, 10 * V)
    assert plan_fits(candidates, base, plan.choice, 10 * V)


# ------------------------------------------------------------------ random step timelines


def _mostly(values: st.SearchStrategy) -> st.SearchStrategy:
    """A value three times in four, else None: an option most candidates allow."""
    return st.integers(0, 3).flatmap(lambda pick: values if pick else st.none())


@st.composite
def instances(draw, max_layers: int, max_per_layer: int):
    """Random saved activations of a random step: (candidates, base, windows, budget).

    Layer l produces its values around forward point 2l and reads them back around backward point
    2(L-1-l), as a stack of layers does; the random parts are the sizes, the exact points, the options
    each value allows, what its recomputation needs, which windows its copies land in and the base.
    """
    share = draw(st.integers(200, 1000))  # of the keep-all peak, in thousandths: hypothesis' floats crowd at the ends
    layers = draw(st.integers(min(2, max_layers), max_layers))
    forward = 2 * layers + 1  # the last forward point is the loss
    length = 2 * forward
    candidates: list[Candidate] = []
    for layer in range(layers):
        for _ in range(draw(st.integers(1, max_per_layer))):
            produced = 2 * layer + draw(st.integers(0, 1))
            last_forward = draw(st.integers(produced, min(produced + 2, forward - 1)))
            first_backward = forward + 2 * (layers - 1 - layer) + draw(st.integers(0, 1))
            prefetch = draw(st.integers(max(forward, first_backward - 3), first_backward))
            nbytes = draw(st.integers(1, 64)) * 2**20
            names = [c.name for c in candidates]
            candidates.append(Candidate(
                f"v{len(candidates)}", nbytes, layer, produced, last_forward, first_backward,
                draw(st.integers(first_backward, min(first_backward + 2, length - 1))), prefetch,
                recompute_flops=draw(_mostly(st.floats(1e8, 1e12))),
                recompute_needs=tuple(draw(st.sets(st.sampled_from(names), max_size=2))) if names else (),
                quantized_nbytes=draw(_mostly(st.sampled_from([nbytes // 2, nbytes // 4]))),
                offloadable=draw(_mostly(st.just(True))) is not None,
                offload_window=draw(st.none() | st.integers(0, layers - 1)),
                prefetch_window=draw(st.none() | st.integers(0, layers - 1))))
    base = draw(st.lists(st.integers(0, 16 * 2**20), min_size=length, max_size=length))
    windows = {layer: draw(st.floats(0.0, 3e-3)) for layer in range(layers) if draw(st.booleans())}
    keep_all_peak = max(device_bytes(candidates, base, fixed_policy(candidates, KEEP)))
    budget = keep_all_peak * share // 1000
    return candidates, base, windows, budget


@settings(deadline=None, max_examples=60)
@given(instances(max_layers=6, max_per_layer=4))
def test_never_worse_than_a_fixed_policy_that_fits(instance):
    candidates, base, windows, budget = instance
    fitting = [fixed_policy(candidates, option) for option in OPTIONS
               if plan_fits(candidates, base, fixed_policy(candidates, option), budget)]
    try:
        plan = solve(candidates, base, budget, windows=windows)
    except InfeasibleBudget as error:
        assert not fitting
        assert error.least_peak > budget and str(budget) in str(error)
        return
    assert plan_fits(candidates, base, plan.choice, budget)
    assert plan.peak_bytes == max(device_bytes(candidates, base, plan.choice)) <= budget
    for choice in fitting:
        assert plan.predicted_seconds <= predicted_seconds(candidates, choice, windows, Machine()) + 1e-9


@settings(deadline=None, max_examples=30)
@given(instances(max_layers=3, max_per_layer=2))
def test_cheapest_as_brute_force(instance):
    candidates, base, windows, budget = instance
    valid = [dict(zip([c.name for c in candidates], options))
             for options in itertools.product(*(allowed_options(c) for c in candidates))]
    valid = [choice for choice in valid if plan_fits(candidates, base, choice, 2**62)]
    fits = [choice for choice in valid if plan_fits(candidates, base, choice, budget)]
    try:
        plan = solve(candidates, base, budget, windows=windows)
    except InfeasibleBudget as error:
        assert not fits
        assert error.least_peak == min(max(device_bytes(candidates, base, choice)) for choice in valid)
        return
    cheapest = min(predicted_seconds(candidates, choice, windows) for choice in fits)
    assert plan.predicted_seconds == pytest.approx(cheapest, abs=1e-9)
