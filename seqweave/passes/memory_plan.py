"""Where each saved activation waits for its backward: kept, offloaded, recomputed or stored in 8 bits.

The solver behind the `activation-memory` pass. It knows nothing about graphs: it is handed the
saved activations of one training step ("candidates") on one integer timeline (the forward
program's nodes, then the backward's), the device bytes the plan cannot change (`base`), and a
device budget. For each candidate it picks one of four options so that the predicted extra step
time is least while the device bytes stay within the budget at every point of the timeline:

* KEEP: the value stays on the device from its production to its last backward use; free.
* OFFLOAD: copied to the host after its last forward use, brought back at `prefetch_at`. The
  copies overlap compute: each lands in an overlap window whose compute seconds hide copies, and
  all copies of one window share the host link, so only a window's excess is exposed time.
* OFFLOAD_AT_USE: offloaded the same way, brought back only at its first backward use: it holds
  no device bytes ahead of its use (what tight budgets need), and its prefetch hides behind nothing.
* RECOMPUTE: dropped after the forward, recomputed for the backward from values that must then
  still be there (`recompute_needs`, which must be KEPT); costs its FLOPs.
* QUANTIZE: an 8-bit copy waits instead of the value; costs a quantize and a dequantize pass
  through device memory.

The choice is a small MILP (one binary a candidate and option, one continuous exposed time a
window) solved exactly by HiGHS through `scipy.optimize.milp`. The memory rows would be one per
timeline point, thousands; but the candidates' bytes only change where one of their intervals
starts or ends, so the timeline is cut into segments between such points and each segment keeps
one row with its largest `base`. Floats in the MILP are scaled for conditioning, so the plan it
returns is checked again in exact integers before it is handed out.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from itertools import accumulate
from typing import Iterable, Mapping, Sequence

import numpy as np

from seqweave.errors import SeqweaveError

log = logging.getLogger(__name__)

KEEP = "keep"
OFFLOAD = "offload"
OFFLOAD_AT_USE = "offload-at-use"
RECOMPUTE = "recompute"
QUANTIZE = "quantize"
OPTIONS = (KEEP, OFFLOAD, OFFLOAD_AT_USE, RECOMPUTE, QUANTIZE)
#: the options that copy a value to the host and back
OFFLOADS = (OFFLOAD, OFFLOAD_AT_USE)

#: HiGHS' absolute MIP gap is 1e-6 (not settable through scipy): costs are scaled so the largest
#: single option costs this many objective units, which keeps the gap far below any real difference
#: (larger scales make HiGHS' own check of its exposure rows fail at 1e-6, "Solve error")
_COST_SCALE = 1e4
#: objective units added to every option but KEEP (and up to twice that for the biggest offload), so
#: that of two equally cheap plans the one that keeps more and moves fewer bytes wins, deterministically;
#: 1e-9 of the largest option's cost, 10x HiGHS' gap
_TIE_BREAK = 1e-5
#: the largest byte count becomes about 2**_BYTE_BITS MILP units (bytes are scaled by a power of two)
_BYTE_BITS = 16
#: times a plan that misses the budget in exact integers is re-solved under a budget tightened by its overshoot
_MAX_TIGHTENINGS = 5


class InfeasibleBudget(SeqweaveError, ValueError):
    """No choice of options keeps the device bytes within the budget at every timeline point."""

    def __init__(self, message: str, *, budget: int, least_peak: int, bottleneck: int, hint: str = "") -> None:
        self.budget, self.least_peak, self.bottleneck = budget, least_peak, bottleneck
        super().__init__(message, hint=hint, pass_name="activation-memory")


@dataclass(frozen=True)
class Machine:
    """The cost model's constants."""

    host_bandwidth: float = 50e9       # bytes/s each way between device and host (PCIe Gen5 ~50 GB/s)
    flop_rate: float = 100e12          # FLOP/s a recomputation runs at
    memory_bandwidth: float = 2e12     # bytes/s of device memory, for the quantize and dequantize passes

    def __post_init__(self) -> None:
        for name in ("host_bandwidth", "flop_rate", "memory_bandwidth"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Machine.{name} must be positive, got {getattr(self, name)}")


@dataclass(frozen=True)
class Candidate:
    """One saved activation: its size, when it is used, and which options it allows.

    Timeline indices; every interval is inclusive. An offloaded value is back on the device from
    `prefetch_at`; a recomputed or dequantized one from `first_backward_use`.
    """

    name: str
    nbytes: int
    layer: int
    produced: int
    last_forward_use: int
    first_backward_use: int
    last_backward_use: int
    prefetch_at: int
    recompute_flops: float | None = None      # None: cannot be recomputed
    recompute_needs: tuple[str, ...] = ()     # candidates that must be KEPT for it to be recomputed
    quantized_nbytes: int | None = None       # None: cannot be stored in 8 bits
    offloadable: bool = True
    offload_window: int | None = None         # overlap window its device->host copy hides in (default: layer)
    prefetch_window: int | None = None        # overlap window its host->device copy hides in (default: layer)

    def __post_init__(self) -> None:
        order = (self.produced, self.last_forward_use, self.prefetch_at, self.first_backward_use,
                 self.last_backward_use)
        if not (0 <= order[0] <= order[1] < order[2] <= order[3] <= order[4]):
            raise ValueError(f"candidate {self.name!r}: needs 0 <= produced <= last_forward_use < prefetch_at <= "
                             f"first_backward_use <= last_backward_use, got {order}")
        if self.nbytes < 0 or (self.quantized_nbytes is not None and self.quantized_nbytes < 0):
            raise ValueError(f"candidate {self.name!r}: byte counts must be >= 0")
        if self.recompute_flops is not None and self.recompute_flops < 0:
            raise ValueError(f"candidate {self.name!r}: recompute_flops must be >= 0")
        if self.name in self.recompute_needs:
            raise ValueError(f"candidate {self.name!r} lists itself in recompute_needs")

    @property
    def offload_window_id(self) -> int:
        return self.layer if self.offload_window is None else self.offload_window

    @property
    def prefetch_window_id(self) -> int:
        return self.layer if self.prefetch_window is None else self.prefetch_window


@dataclass(frozen=True)
class Plan:
    """The chosen option of every candidate, and what the plan costs and saves."""

    choice: dict[str, str]       # candidate name -> option, in candidate order
    predicted_seconds: float     # the cost model's extra step time of this choice (tie-breaks excluded)
    peak_bytes: int              # max over the timeline of base + candidates under this choice
    bytes_moved: int             # host<->device bytes: 2 * nbytes per offloaded value
    recompute_flops: float

    def of(self, option: str) -> list[str]:
        """Names of the candidates that take `option`, in candidate order."""
        return [name for name, chosen in self.choice.items() if chosen == option]


# ------------------------------------------------------------------ the cost and memory model


def allowed_options(candidate: Candidate) -> tuple[str, ...]:
    """The options `candidate` may take (KEEP always)."""
    return tuple(option for option, allowed in ((KEEP, True), (OFFLOAD, candidate.offloadable),
                                                (OFFLOAD_AT_USE, candidate.offloadable),
                                                (RECOMPUTE, candidate.recompute_flops is not None),
                                                (QUANTIZE, candidate.quantized_nbytes is not None)) if allowed)


def _intervals(candidate: Candidate, option: str) -> tuple[tuple[int, int, int], ...]:
    """(first, last, bytes) of each stretch the candidate occupies on the device under `option`."""
    c = candidate
    forward = (c.produced, c.last_forward_use, c.nbytes)
    if option == KEEP:
        return ((c.produced, c.last_backward_use, c.nbytes),)
    if option == OFFLOAD:
        return forward, (c.prefetch_at, c.last_backward_use, c.nbytes)
    if option == OFFLOAD_AT_USE:
        return forward, (c.first_backward_use, c.last_backward_use, c.nbytes)
    if option == RECOMPUTE:
        return forward, (c.first_backward_use, c.last_backward_use, c.nbytes)
    if option == QUANTIZE:
        # the 8-bit copy is made while the full value still exists, and lives until the last backward use
        return (forward, (c.last_forward_use, c.last_backward_use, c.quantized_nbytes or 0),
                (c.first_backward_use, c.last_backward_use, c.nbytes))
    raise ValueError(f"unknown option {option!r}; the options are {OPTIONS}")


def _chosen(choice: Mapping[str, str], candidate: Candidate) -> str:
    if candidate.name not in choice:
        raise ValueError(f"the choice has no option for candidate {candidate.name!r}")
    return choice[candidate.name]


def device_bytes(candidates: Sequence[Candidate], base: Sequence[int], choice: Mapping[str, str]) -> list[int]:
    """Device bytes at each timeline point under `choice`, in exact integers."""
    delta = [0] * (len(base) + 1)
    for candidate in candidates:
        for first, last, nbytes in _intervals(candidate, _chosen(choice, candidate)):
            if last >= len(base):
                raise ValueError(f"candidate {candidate.name!r} reaches timeline point {last}, "
                                 f"past the timeline's {len(base)} points")
            delta[first] += nbytes
            delta[last + 1] -= nbytes
    return [int(b) + live for b, live in zip(base, accumulate(delta))]


def _copy_seconds(candidate: Candidate, machine: Machine) -> float:
    """Seconds one copy of the value (device->host or back) takes on the host link."""
    return candidate.nbytes / machine.host_bandwidth


def _compute_seconds(candidate: Candidate, option: str, machine: Machine) -> float:
    """Seconds an option costs on its own; offload copies are costed per window instead."""
    if option == RECOMPUTE:
        return (candidate.recompute_flops or 0.0) / machine.flop_rate
    if option == QUANTIZE:
        return 2 * (candidate.nbytes + (candidate.quantized_nbytes or 0)) / machine.memory_bandwidth
    if option == OFFLOAD_AT_USE:
        return _copy_seconds(candidate, machine)  # the prefetch, in full view; its offload is costed per window
    return 0.0


def _windows_of(candidate: Candidate, option: str) -> tuple[int, ...]:
    """The overlap windows an option's copies land in (a prefetch at the use lands in none)."""
    if option == OFFLOAD:
        return candidate.offload_window_id, candidate.prefetch_window_id
    return (candidate.offload_window_id,) if option == OFFLOAD_AT_USE else ()


def _copies_by_window(candidates: Iterable[Candidate], choice: Mapping[str, str], machine: Machine) -> dict[int, float]:
    """Copy seconds that land in each overlap window, offloads and prefetches together."""
    load: dict[int, float] = {}
    for candidate in candidates:
        for window in _windows_of(candidate, choice[candidate.name]):
            load[window] = load.get(window, 0.0) + _copy_seconds(candidate, machine)
    return load


def predicted_seconds(candidates: Sequence[Candidate], choice: Mapping[str, str],
                      windows: Mapping[int, float] | None = None, machine: Machine = Machine()) -> float:
    """Extra step time of `choice`: recompute and quantize seconds plus each window's exposed copy time."""
    windows = windows or {}
    compute = sum(_compute_seconds(c, _chosen(choice, c), machine) for c in candidates)
    chosen = {c.name: _chosen(choice, c) for c in candidates}
    exposed = sum(max(0.0, load - windows.get(window, 0.0))
                  for window, load in _copies_by_window(candidates, chosen, machine).items())
    return compute + exposed


def _recomputable_needs(candidates: Sequence[Candidate]) -> set[str]:
    """Names some recomputable candidate needs kept."""
    return {need for c in candidates if c.recompute_flops is not None for need in c.recompute_needs}


def fixed_policy(candidates: Sequence[Candidate], option: str) -> dict[str, str]:
    """Every candidate takes `option` where it may, else KEEP: the baselines a plan should beat.

    Under RECOMPUTE a candidate that a recomputable candidate needs stays kept (even if it could be
    recomputed itself), so every recomputation finds what it needs.
    """
    if option not in OPTIONS:
        raise ValueError(f"unknown option {option!r}; the options are {OPTIONS}")
    needed = _recomputable_needs(candidates) if option == RECOMPUTE else set()
    return {c.name: option if option in allowed_options(c) and c.name not in needed else KEEP for c in candidates}


def _needs_respected(candidates: Sequence[Candidate], choice: Mapping[str, str]) -> bool:
    return all(choice.get(need) == KEEP for c in candidates if choice.get(c.name) == RECOMPUTE
               for need in c.recompute_needs)


def plan_fits(candidates: Sequence[Candidate], base: Sequence[int], choice: Mapping[str, str], budget: int) -> bool:
    """Whether `choice` is a valid plan within `budget`: every candidate takes an option it allows, every
    recomputed candidate's needs are kept, and the device bytes never exceed the budget."""
    if any(choice.get(c.name) not in allowed_options(c) for c in candidates):
        return False
    return _needs_respected(candidates, choice) and max(device_bytes(candidates, base, choice), default=0) <= budget


def _plan(candidates: Sequence[Candidate], base: Sequence[int], choice: Mapping[str, str],
          windows: Mapping[int, float], machine: Machine) -> Plan:
    chosen = {c.name: choice[c.name] for c in candidates}
    return Plan(choice=chosen, predicted_seconds=predicted_seconds(candidates, chosen, windows, machine),
                peak_bytes=max(device_bytes(candidates, base, chosen), default=0),
                bytes_moved=sum(2 * c.nbytes for c in candidates if chosen[c.name] in OFFLOADS),
                recompute_flops=float(sum(c.recompute_flops or 0.0 for c in candidates
                                          if chosen[c.name] == RECOMPUTE)))


def _check_inputs(candidates: Sequence[Candidate], base: Sequence[int]) -> None:
    """Names unique, needs among the candidates, every interval on the timeline."""
    names = [c.name for c in candidates]
    if len(set(names)) != len(names):
        raise ValueError(f"candidate names must be unique, got {sorted(n for n in set(names) if names.count(n) > 1)}")
    for c in candidates:
        unknown = sorted(set(c.recompute_needs) - set(names))
        if unknown:
            raise ValueError(f"candidate {c.name!r} needs {unknown}, which are not candidates")
        if c.last_backward_use >= len(base):
            raise ValueError(f"candidate {c.name!r} is used at timeline point {c.last_backward_use}, "
                             f"past the timeline's {len(base)} points")


# ------------------------------------------------------------------ the MILP


@dataclass(frozen=True)
class _Model:
    """The MILP's pieces that do not depend on the budget.

    Columns: x[len(OPTIONS)*i + k] is candidate i taking OPTIONS[k]; then one exposed time e_w a window.
    Segment rows: `segment_matrix @ x <= (budget - segment_base) / byte_unit`.
    """

    candidates: tuple[Candidate, ...]
    objective: np.ndarray
    upper: np.ndarray
    integrality: np.ndarray
    segment_starts: tuple[int, ...]
    segment_matrix: object            # scipy.sparse.csr_array, segments x columns
    segment_base: np.ndarray          # largest base in each segment, int64
    byte_unit: int
    fixed_rows: tuple                 # LinearConstraints that hold for any budget (one-hot, needs, windows)


def _byte_unit(candidates: Sequence[Candidate]) -> int:
    """A power of two that brings the largest byte count to about 2**_BYTE_BITS; exact in binary floats."""
    largest = max((max(c.nbytes, c.quantized_nbytes or 0) for c in candidates), default=1)
    return 2 ** max(0, int(largest).bit_length() - _BYTE_BITS)


def _cost_unit(candidates: Sequence[Candidate], machine: Machine) -> float:
    """Seconds per objective unit: the dearest single option (a fully exposed offload at worst) is _COST_SCALE."""
    dearest = max((2 * _copy_seconds(c, machine) if option in OFFLOADS else _compute_seconds(c, option, machine)
                   for c in candidates for option in allowed_options(c)), default=0.0)
    return dearest / _COST_SCALE if dearest > 0 else 1.0


def _objective(candidates: Sequence[Candidate], windows: Sequence[int], machine: Machine) -> np.ndarray:
    unit = _cost_unit(candidates, machine)
    largest = max((c.nbytes for c in candidates), default=0) or 1
    objective = np.zeros(len(OPTIONS) * len(candidates) + len(windows))
    for i, c in enumerate(candidates):
        for k, option in enumerate(OPTIONS):
            if option != KEEP:
                tie_break = _TIE_BREAK * (1 + (c.nbytes / largest if option in OFFLOADS else 0))
                objective[len(OPTIONS) * i + k] = _compute_seconds(c, option, machine) / unit + tie_break
    objective[len(OPTIONS) * len(candidates):] = 1.0  # e_w is in objective units already
    return objective


def _segment_rows(candidates: Sequence[Candidate], base: Sequence[int], columns: int, byte_unit: int):
    """One memory row per stretch of timeline on which no allowed interval starts or ends."""
    from scipy.sparse import coo_array

    placed = [(len(OPTIONS) * i + k, _intervals(c, option)) for i, c in enumerate(candidates)
              for k, option in enumerate(OPTIONS) if option in allowed_options(c)]
    cuts = sorted({0, len(base)} | {point for _, intervals in placed for first, last, _ in intervals
                                    for point in (first, last + 1)})
    starts = cuts[:-1]
    segment_of = {start: index for index, start in enumerate(cuts)}
    rows, cols, data = [], [], []
    for column, intervals in placed:
        for first, last, nbytes in intervals:
            for segment in range(segment_of[first], segment_of[last + 1]):
                rows.append(segment)
                cols.append(column)
                data.append(nbytes / byte_unit)
    matrix = coo_array((data, (rows, cols)), shape=(len(starts), columns)).tocsr()  # duplicates are summed
    segment_base = np.maximum.reduceat(np.asarray(base, dtype=np.int64), starts)
    return tuple(starts), matrix, segment_base


def _fixed_rows(candidates: Sequence[Candidate], window_ids: Sequence[int], windows: Mapping[int, float],
                machine: Machine, columns: int) -> tuple:
    """Rows that hold for any budget: one option a candidate; a recomputation's needs kept; each window's
    exposed time at least its copies' seconds less the compute that hides them."""
    from scipy.optimize import LinearConstraint
    from scipy.sparse import lil_array

    width, index, unit = len(OPTIONS), {c.name: i for i, c in enumerate(candidates)}, _cost_unit(candidates, machine)
    one_hot = lil_array((len(candidates), columns))
    for i in range(len(candidates)):
        one_hot[i, width * i:width * (i + 1)] = 1
    rows = [LinearConstraint(one_hot.tocsr(), 1, 1)]
    pairs = [(i, index[need]) for i, c in enumerate(candidates) for need in c.recompute_needs]
    if pairs:
        needs = lil_array((len(pairs), columns))
        for row, (i, j) in enumerate(pairs):  # x[i, RECOMPUTE] - x[j, KEEP] <= 0
            needs[row, width * i + OPTIONS.index(RECOMPUTE)] = 1
            needs[row, width * j + OPTIONS.index(KEEP)] = -1
        rows.append(LinearConstraint(needs.tocsr(), -np.inf, 0))
    if window_ids:
        row_of = {window: row for row, window in enumerate(window_ids)}
        exposure = lil_array((len(window_ids), columns))
        for i, c in enumerate(candidates):
            for option in OFFLOADS:
                for window in _windows_of(c, option):
                    exposure[row_of[window], width * i + OPTIONS.index(option)] += _copy_seconds(c, machine) / unit
        for row in range(len(window_ids)):  # sum of copies - e_w <= capacity
            exposure[row, width * len(candidates) + row] = -1
        capacity = np.array([windows.get(window, 0.0) / unit for window in window_ids])
        rows.append(LinearConstraint(exposure.tocsr(), -np.inf, capacity))
    return tuple(rows)


def _build_model(candidates: Sequence[Candidate], base: Sequence[int], windows: Mapping[int, float],
                 machine: Machine) -> _Model:
    window_ids = sorted({w for c in candidates for w in (c.offload_window_id, c.prefetch_window_id)})
    columns = len(OPTIONS) * len(candidates) + len(window_ids)
    upper = np.full(columns, np.inf)  # e_w >= 0 unbounded above; a disallowed option's x is held at 0
    for i, c in enumerate(candidates):
        upper[len(OPTIONS) * i:len(OPTIONS) * (i + 1)] = [option in allowed_options(c) for option in OPTIONS]
    integrality = np.zeros(columns)
    integrality[:len(OPTIONS) * len(candidates)] = 1
    byte_unit = _byte_unit(candidates)
    starts, matrix, segment_base = _segment_rows(candidates, base, columns, byte_unit)
    return _Model(tuple(candidates), _objective(candidates, window_ids, machine), upper, integrality,
                  starts, matrix, segment_base, byte_unit,
                  _fixed_rows(candidates, window_ids, windows, machine, columns))


def _choice_from(model: _Model, x: np.ndarray) -> dict[str, str]:
    """Each candidate's option: the largest of its (near 0/1) option variables."""
    width = len(OPTIONS)
    return {c.name: OPTIONS[int(np.argmax(x[width * i:width * (i + 1)]))] for i, c in enumerate(model.candidates)}


def _run_milp(objective, integrality, lower, upper, constraints, time_limit: float):
    """x of HiGHS' best plan, or None when there is none; a time-limited plan is taken with a warning."""
    from scipy.optimize import Bounds, milp

    def run(presolve: bool):
        return milp(objective, integrality=integrality, bounds=Bounds(lower, upper), constraints=constraints,
                    options={"time_limit": time_limit, "mip_rel_gap": 0.0, "presolve": presolve})

    result = run(presolve=True)
    if result.status == 4:  # HiGHS' check after undoing presolve can fail at 1e-6 on a sound plan; solve it whole
        log.info("activation-memory: HiGHS %s; solving again without presolve", result.message)
        result = run(presolve=False)
    if result.status == 2:
        return None
    if result.status == 1 and result.x is not None:
        log.warning("activation-memory: no proof of the cheapest plan within %.1f s; using the best found "
                    "(gap %s)", time_limit, result.get("mip_gap"))
        return result.x
    if result.status != 0 or result.x is None:
        raise RuntimeError(f"activation-memory: HiGHS found no plan ({result.message}); "
                           "raise time_limit or give fewer candidates")
    return result.x


def _cheapest_choice(model: _Model, budget: int, time_limit: float) -> dict[str, str] | None:
    """The MILP's cheapest choice whose device bytes stay within `budget`; None when none does."""
    from scipy.optimize import LinearConstraint

    memory = LinearConstraint(model.segment_matrix, -np.inf, (budget - model.segment_base) / model.byte_unit)
    x = _run_milp(model.objective, model.integrality, np.zeros_like(model.upper), model.upper,
                  [*model.fixed_rows, memory], time_limit)
    return None if x is None else _choice_from(model, x)


def _least_peak_choice(model: _Model, time_limit: float) -> dict[str, str]:
    """A choice with the least device peak any valid plan reaches (costs ignored): one more column, the peak."""
    from scipy.optimize import LinearConstraint
    from scipy.sparse import hstack

    columns = model.segment_matrix.shape[1]
    peak_column = np.full((model.segment_matrix.shape[0], 1), -1.0)
    memory = LinearConstraint(hstack([model.segment_matrix, peak_column]).tocsr(), -np.inf,
                              -model.segment_base / model.byte_unit)
    widened = [LinearConstraint(hstack([row.A, np.zeros((row.A.shape[0], 1))]).tocsr(), row.lb, row.ub)
               for row in model.fixed_rows]
    objective = np.zeros(columns + 1)
    objective[-1] = 1.0
    x = _run_milp(objective, np.append(model.integrality, 0), np.zeros(columns + 1),
                  np.append(model.upper, np.inf), [*widened, memory], time_limit)
    if x is None:  # cannot happen: keeping everything is always a plan
        raise RuntimeError("activation-memory: the least-peak MILP has no solution")
    return _choice_from(model, x)


def _infeasible(model: _Model, base: Sequence[int], budget: int, time_limit: float) -> InfeasibleBudget:
    """The error for a budget no plan meets: the least peak any plan reaches, and where it is reached."""
    candidates = model.candidates
    choice = _least_peak_choice(model, time_limit) if candidates else {}
    timeline = device_bytes(candidates, base, choice)
    at = max(range(len(timeline)), key=lambda t: (timeline[t], base[t]))  # of the points at the peak, the most fixed
    least = timeline[at]
    there = [c.name for c in candidates if any(first <= at <= last for first, last, _ in _intervals(c, choice[c.name]))]
    shown = ", ".join(there[:8]) + (f" and {len(there) - 8} more" if len(there) > 8 else "")
    return InfeasibleBudget(
        f"activation-memory: no plan fits the device budget of {budget} bytes; the least peak any plan reaches is "
        f"{least} bytes, at timeline point {at} (the bottleneck: {base[at]} bytes no plan can move"
        + (f", plus {shown}, on the device there even under that plan" if there else "") + ")",
        budget=budget, least_peak=least, bottleneck=at,
        hint="raise the budget, or shard the sequence over more ranks so each holds less")


# ------------------------------------------------------------------ solve


def solve(candidates: Sequence[Candidate], base: Sequence[int], budget: int, windows: Mapping[int, float] | None = None,
          machine: Machine = Machine(), time_limit: float = 30.0) -> Plan:
    """The cheapest plan whose device bytes stay within `budget` at every timeline point.

    `windows` maps an overlap window to the compute seconds that can hide copies in it (missing: 0).
    Raises InfeasibleBudget when no plan fits. A budget that keeping everything meets gets that plan
    at once, without the solver.
    """
    candidates, windows = tuple(candidates), dict(windows or {})
    if not base:
        raise ValueError("the timeline is empty: base needs one entry a timeline point")
    _check_inputs(candidates, base)
    keep_all = fixed_policy(candidates, KEEP)
    if max(device_bytes(candidates, base, keep_all)) <= budget:
        return _plan(candidates, base, keep_all, windows, machine)
    model = _build_model(candidates, base, windows, machine)
    if max(base) > budget:
        raise _infeasible(model, base, budget, time_limit)
    target = budget
    for _ in range(_MAX_TIGHTENINGS):
        choice = _cheapest_choice(model, target, time_limit)
        if choice is None:
            if target == budget:
                raise _infeasible(model, base, budget, time_limit)
            raise RuntimeError(f"activation-memory: the MILP's plans overshoot the budget of {budget} bytes in exact "
                               f"arithmetic and none fits the budget tightened to {target}; numerical trouble")
        overshoot = max(device_bytes(candidates, base, choice)) - budget
        if overshoot <= 0 and plan_fits(candidates, base, choice, budget):
            return _plan(candidates, base, choice, windows, machine)
        if overshoot <= 0:
            raise RuntimeError(f"activation-memory: the MILP returned an invalid plan {choice} "
                               "(an option a candidate does not allow, or a recomputation without its needs)")
        log.info("activation-memory: plan overshoots by %d bytes in exact arithmetic; re-solving tighter", overshoot)
        target -= overshoot
    raise RuntimeError(f"activation-memory: after {_MAX_TIGHTENINGS} re-solves the MILP's plan still exceeds "
                       f"the budget of {budget} bytes in exact arithmetic")
