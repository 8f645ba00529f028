"""Attention kernels on GPU: seqweave's Triton flash attention against flash SDPA and FlexAttention.

For each mask (causal, a sliding window of 4k tokens, packed documents), head dim d and length N it
times forward and forward+backward (triton.testing.do_bench, median, after a first call that compiles)
and reports TFLOP/s of *useful* FLOPs: those of the (q, kv) pairs the mask allows, 4·B·H·d·pairs
forward and 3.5x that for forward+backward (FlashAttention's convention: backward = 2.5x forward).
Flash SDPA cannot express the window or document masks: in those rows it runs dense causal attention
(SDPA*, its TFLOP/s counted on the causal pairs it does) and "sw/SDPA" is a speedup in time. Shapes
follow FlashAttention's benchmark: B = tokens // N, H = model_dim // d (16k tokens, 2048), so
B·H·N = 2^19 at d=64 and 2^18 at d=128 up to N = 16k. Numerics are checked once per (mask, d), at the
smallest N: max |error| against fp32 math SDPA with the same dense mask.

    python benchmarks/attention_gpu.py                                    # d 64 128, N 1k..32k, 3 masks
    python benchmarks/attention_gpu.py --head-dims 128 --lengths 16384 32768 --masks causal sliding_window
    python benchmarks/attention_gpu.py --smoke                            # CPU, Triton interpreter, tiny
    python benchmarks/attention_gpu.py --report benchmarks/results/attention_gpu.json --markdown
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shlex
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Callable

import results_io  # benchmarks/ is on sys.path when a script runs
from results_io import markdown_tables, print_tables, write_json_atomic

import torch  # does not import triton: the interpreter can still be switched on below

LEFT_COLUMNS = ("mask", "target", "result")  # the rest align right

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join("benchmarks", "results", "attention_gpu.json")
MASK_KINDS = ("causal", "sliding_window", "documents")
BASELINES = ("sdpa_flash", "flex")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
FWD_BWD_FACTOR = 3.5  # forward + backward FLOPs over forward FLOPs (backward = 2.5x)
FLOP_CONVENTION = ("useful FLOPs: fwd = 4*B*H*d*pairs, fwd+bwd = 3.5x fwd (FlashAttention's convention); "
                   "pairs = (q, kv) pairs the mask allows")
TFLOP = 1e12
DOC_SPREAD = 16  # document lengths uniform in [N/16, 3N/16]: N/8 on average
CPU_REPS = 2  # smoke timings: a first call, then the median of this many
TARGET_FWD = ("causal", 128, 16384, 1.0)  # causal fwd at d=128, N=16k: >= 1.0x flash SDPA
TARGET_WINDOW_N, TARGET_WINDOW = 32768, 4.0  # window 4k at 32k: >= 4x faster than dense causal
TARGET_FWD_BWD = 0.8  # causal fwd+bwd: >= 0.8x flash SDPA
SMOKE = dict(head_dims=[32], lengths=[40, 64], tokens=64, model_dim=64, window=16, dtype="float32",
             flex_compile=False)


@dataclass(frozen=True)
class Config:
    """One measured point: mask kind, head dim, length and the batch / heads that go with them."""

    mask: str
    d: int
    n: int
    batch: int
    heads: int


@dataclass
class Problem:
    """Inputs of one config: q, k, v, dout [B, H, N, d], the mask's operands and its allowed pairs."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    dout: torch.Tensor
    seg: torch.Tensor | None  # document ids [B, N] (documents only)
    pairs: int  # allowed (q, kv) pairs, summed over batch and heads

    @property
    def operands(self) -> tuple[torch.Tensor, ...]:
        return () if self.seg is None else (self.seg,)


def mask_text(kind: str, window: int) -> str:
    """The MaskSpec text of a mask kind (window = visible tokens, the query's own included)."""
    return {"causal": "causal", "sliding_window": f"sliding_window({window - 1}, 0)",
            "documents": "causal & document($0)"}[kind]


# ----------------------------------------------------------------------------- problems and FLOPs


def document_ids(batch: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """[B, N] int32 ids of packed documents of random lengths in [N/16, 3N/16] (the last one cut)."""
    low, high = max(1, n // DOC_SPREAD), max(2, 3 * n // DOC_SPREAD)
    rows = []
    for _ in range(batch):
        lengths: list[int] = []
        while sum(lengths) < n:
            drawn = int(torch.randint(low, high + 1, (1,), generator=gen))
            lengths.append(min(drawn, n - sum(lengths)))
        rows.append(torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)))
    return torch.stack(rows).to(torch.int32)


def allowed_pairs(kind: str, batch: int, n: int, window: int, seg: torch.Tensor | None) -> int:
    """Allowed (q, kv) pairs of one head, summed over the batch, analytically."""
    if kind == "documents":  # causal within each contiguous document of length L: L(L+1)/2
        counts = [torch.unique_consecutive(row, return_counts=True)[1] for row in seg.cpu()]
        return sum(int((c * (c + 1) // 2).sum()) for c in counts)
    w = n if kind == "causal" else min(window, n)  # the query at p sees min(p + 1, w) keys
    return batch * (w * (w + 1) // 2 + (n - w) * w)


def dense_pairs(mask, batch: int, n: int, operands: tuple) -> int:
    """Allowed pairs of one head, counted from the dense mask (small N only: it is N x N)."""
    from seqweave.ir.mask import dense_mask
    return int(dense_mask(mask, n, n, operands).expand(batch, -1, -1, -1).sum())


def make_problem(cfg: Config, dtype: torch.dtype, device: torch.device, window: int, seed: int) -> Problem:
    """Random inputs for `cfg` on `device`; document ids drawn on the host."""
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (cfg.batch, cfg.heads, cfg.n, cfg.d)
    q, k, v, dout = (torch.randn(shape, generator=gen, device=device, dtype=dtype) for _ in range(4))
    seg = document_ids(cfg.batch, cfg.n, torch.Generator().manual_seed(seed)).to(device) \
        if cfg.mask == "documents" else None
    pairs = cfg.heads * allowed_pairs(cfg.mask, cfg.batch, cfg.n, window, seg)
    return Problem(q, k, v, dout, seg, pairs)


# ----------------------------------------------------------------------------- implementations


Fns = tuple[Callable[[], object], Callable[[], object]]  # (forward, forward + backward)


def seqweave_fns(p: Problem, mask, scale: float, row: dict) -> Fns:
    """seqweave's Triton kernels, schedules built beforehand (their host seconds go in the row)."""
    from seqweave.codegen.triton import attention as sw
    from seqweave.ir.mask_parser import parse_score_mod
    call = sw.make_call(p.q, p.k, p.v, mask, parse_score_mod("none"), scale, p.operands, 0, 0)
    began = time.perf_counter()
    fwd_schedule = sw.schedule_for(call, call.spec.forward)
    bwd_schedule = sw.schedule_for(call, call.spec.backward)
    row["schedule_s"] = time.perf_counter() - began

    def fwd():
        return sw.forward(call, fwd_schedule)[0]

    def fwd_bwd():
        out, lse, _ = sw.forward(call, fwd_schedule)
        return sw.backward(call, p.dout, out, lse, bwd_schedule)[:3]
    return fwd, fwd_bwd


def _leaves(p: Problem) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_() for t in (p.q, p.k, p.v)]


def sdpa_fns(p: Problem, scale: float) -> Fns:
    """Flash SDPA, causal (the only mask here it can express); the flash backend is forced."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    leaves = _leaves(p)

    def fwd():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(p.q, p.k, p.v, is_causal=True, scale=scale)

    def fwd_bwd():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            out = F.scaled_dot_product_attention(*leaves, is_causal=True, scale=scale)
        return torch.autograd.grad(out, leaves, p.dout)
    return fwd, fwd_bwd


def flex_mask_mod(kind: str, window: int, seg: torch.Tensor | None) -> Callable:
    """The FlexAttention mask_mod of a mask kind (same pairs as `mask_text`)."""
    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    def sliding(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

    def documents(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (seg[b, q_idx] == seg[b, kv_idx])
    return {"causal": causal, "sliding_window": sliding, "documents": documents}[kind]


def flex_fns(p: Problem, cfg: Config, window: int, scale: float, compiled: bool) -> Fns:
    """FlexAttention with a block mask of the same mask, compiled (fresh dynamo state) unless told not."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    batch = cfg.batch if p.seg is not None else None
    block_mask = create_block_mask(flex_mask_mod(cfg.mask, window, p.seg), batch, None, cfg.n, cfg.n,
                                   device=p.q.device)
    if compiled:
        torch._dynamo.reset()  # every config compiles afresh: no recompile limit is ever reached
    else:
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile")
    attend = torch.compile(flex_attention, dynamic=False) if compiled else flex_attention
    leaves = _leaves(p)

    def fwd():
        return attend(p.q, p.k, p.v, block_mask=block_mask, scale=scale)

    def fwd_bwd():
        return torch.autograd.grad(attend(*leaves, block_mask=block_mask, scale=scale), leaves, p.dout)
    return fwd, fwd_bwd


# ----------------------------------------------------------------------------- timing and numerics


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _do_bench(fn: Callable, warmup_ms: int, rep_ms: int) -> float:
    """Median ms from triton.testing.do_bench (return_mode where this Triton has it)."""
    from triton.testing import do_bench
    try:
        result = do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    except TypeError:  # an older do_bench without return_mode
        result = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5])
    return float(result[0] if isinstance(result, (list, tuple)) else result)


def time_ms(fn: Callable, device: torch.device, args: argparse.Namespace) -> tuple[float, float]:
    """(median ms per call, seconds of the first call, which compiles)."""
    began = time.perf_counter()
    fn()
    _sync(device)
    first = time.perf_counter() - began
    if device.type == "cuda":
        return _do_bench(fn, args.warmup_ms, args.rep_ms), first
    samples = [_seconds(fn) for _ in range(CPU_REPS)]
    return 1e3 * statistics.median(samples), first


def _seconds(fn: Callable) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def _failure(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300] if text else ''}"


def measure(name: str, fns: Fns, device: torch.device, args: argparse.Namespace, row: dict) -> None:
    """Time both modes of one implementation into the row; a failure becomes a note."""
    for mode, fn in zip(("fwd", "fwd_bwd"), fns):
        try:
            ms, first = time_ms(fn, device, args)
        except Exception as error:  # noqa: BLE001 - a baseline that fails is reported, not fatal
            row["notes"].append(f"{name} {mode} failed: {_failure(error)}")
            row["failed"] += [f"{name} {mode}"] if name == "seqweave" else []
            _empty_cache(device)
            continue
        row["ms"].setdefault(name, {})[mode] = ms
        row["first_call_s"].setdefault(name, {})[mode] = first


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def math_reference(p: Problem, mask, scale: float) -> tuple[torch.Tensor, ...]:
    """(out, dq, dk, dv) of fp32 math SDPA with the dense mask: the numerics' reference."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from seqweave.ir.mask import dense_mask
    allowed = dense_mask(mask, p.q.shape[2], p.k.shape[2], p.operands).to(p.q.device)
    leaves = [t.detach().float().requires_grad_() for t in (p.q, p.k, p.v)]
    with sdpa_kernel(SDPBackend.MATH):
        out = F.scaled_dot_product_attention(*leaves, attn_mask=allowed, scale=scale)
    return (out.detach(), *torch.autograd.grad(out, leaves, p.dout.float()))


def _max_errors(names: tuple[str, ...], produce: Callable, want: tuple[torch.Tensor, ...]) -> dict:
    """{name: max |error|} of what `produce()` returns, or {name: "failed: ..."} when it raises."""
    try:
        got = produce()
    except Exception as error:  # noqa: BLE001 - e.g. Flex has no backward on CPU
        return {name: f"failed: {_failure(error)}" for name in names}
    return {name: float((a.float() - b).abs().max()) for name, a, b in zip(names, got, want)}


def numerics(p: Problem, mask, scale: float, built: dict[str, Fns], same_mask: set[str]) -> dict:
    """Max |error| of out, dq, dk, dv of each built implementation that runs this mask."""
    want = math_reference(p, mask, scale)
    found: dict = {}
    for name, (fwd, fwd_bwd) in built.items():
        if name not in same_mask:
            found[name] = "n/a: runs dense causal"
            continue
        found[name] = {**_max_errors(("out",), lambda: (fwd(),), want[:1]),
                       **_max_errors(("dq", "dk", "dv"), fwd_bwd, want[1:])}
    return found


# ----------------------------------------------------------------------------- one config


def _build(name: str, build: Callable[[], Fns], row: dict) -> Fns | None:
    try:
        return build()
    except Exception as error:  # noqa: BLE001 - e.g. no FlexAttention in this torch
        row["notes"].append(f"{name} unavailable: {_failure(error)}")
        row["failed"] += [f"{name} build"] if name == "seqweave" else []
        return None


def run_config(cfg: Config, args: argparse.Namespace, device: torch.device, check: bool) -> dict:
    """Time seqweave, flash SDPA and Flex on one config; check numerics and pairs when `check`."""
    from seqweave.ir.mask_parser import parse_mask
    p = make_problem(cfg, DTYPES[args.dtype], device, args.window, args.seed)
    mask, scale = parse_mask(mask_text(cfg.mask, args.window)), cfg.d ** -0.5
    causal_pairs = cfg.heads * allowed_pairs("causal", cfg.batch, cfg.n, args.window, None)
    row = {**asdict(cfg), "mask_text": str(mask), "pairs": p.pairs, "flops_fwd": 4.0 * cfg.d * p.pairs,
           "sdpa_mask": "causal" if cfg.mask == "causal" else "causal (dense: flash SDPA cannot express the mask)",
           "sdpa_flops_fwd": 4.0 * cfg.d * causal_pairs, "ms": {}, "first_call_s": {}, "notes": [], "failed": []}
    builders = {"seqweave": lambda: seqweave_fns(p, mask, scale, row), "sdpa_flash": lambda: sdpa_fns(p, scale),
                "flex": lambda: flex_fns(p, cfg, args.window, scale, args.flex_compile)}
    chosen = ["seqweave", *args.baselines]
    built = {name: fns for name in chosen if (fns := _build(name, builders[name], row)) is not None}
    for name, fns in built.items():
        measure(name, fns, device, args, row)
    if check:
        row["pairs_dense"] = cfg.heads * dense_pairs(mask, cfg.batch, cfg.n, p.operands)
        same = {"seqweave", "flex"} | ({"sdpa_flash"} if cfg.mask == "causal" else set())
        row["numerics"] = numerics(p, mask, scale, built, same)
    row.update(derive(row))
    return row


def derive(row: dict) -> dict:
    """TFLOP/s of each implementation and mode, and seqweave's speedup in time over flash SDPA."""
    flops = {"fwd": row["flops_fwd"], "fwd_bwd": FWD_BWD_FACTOR * row["flops_fwd"]}
    sdpa = {"fwd": row["sdpa_flops_fwd"], "fwd_bwd": FWD_BWD_FACTOR * row["sdpa_flops_fwd"]}
    tflops = {name: {mode: (sdpa if name == "sdpa_flash" else flops)[mode] / (ms * 1e-3) / TFLOP
                     for mode, ms in modes.items()} for name, modes in row["ms"].items()}
    sw, base = row["ms"].get("seqweave", {}), row["ms"].get("sdpa_flash", {})
    speedup = {mode: base[mode] / sw[mode] for mode in ("fwd", "fwd_bwd") if mode in sw and mode in base}
    return {"tflops": tflops, "speedup_vs_sdpa": speedup}


# ----------------------------------------------------------------------------- targets


def _target(name: str, short: str, row: dict, value: float | None, threshold: float, missing: str = "") -> dict:
    """One target's verdict (`short`: its label in the main table); a miss says by how much."""
    found = {"target": name, "short": short, "key": [row["mask"], row["d"], row["n"]], "value": value,
             "threshold": threshold}
    if value is None:
        return {**found, "met": None, "detail": f"not measured{': ' + missing if missing else ''}"}
    met = value >= threshold
    short = f"MISSED by {100 * (1 - value / threshold):.0f}%" if not met else "met"
    return {**found, "met": met, "detail": f"{short} ({value:.2f}x vs {threshold:.1f}x)"}


def _ratio(numerator: dict, denominator: dict, mode: str) -> float | None:
    """numerator[mode] / denominator[mode] when both were measured."""
    return numerator[mode] / denominator[mode] if mode in numerator and mode in denominator else None


def _window_targets(row: dict, causal: dict | None) -> list[dict]:
    """Window 4k at N=32k: >= 4x faster in time than dense causal flash SDPA and seqweave causal."""
    found, sw = [], row["ms"].get("seqweave", {})
    for mode in ("fwd", "fwd_bwd"):
        found.append(_target(f"sliding window {mode} vs dense causal flash SDPA (time)", f"{mode} vs SDPA", row,
                             _ratio(row["ms"].get("sdpa_flash", {}), sw, mode), TARGET_WINDOW))
        dense = None if causal is None else causal["ms"].get("seqweave", {})
        found.append(_target(f"sliding window {mode} vs seqweave causal (time)", f"{mode} vs sw causal", row,
                             None if dense is None else _ratio(dense, sw, mode), TARGET_WINDOW,
                             "" if causal else "no causal row at this d and N"))
    return found


def evaluate_targets(rows: list[dict]) -> list[dict]:
    """The issue's targets, for whichever of their configs were run."""
    index = {(r["mask"], r["d"], r["n"]): r for r in rows}
    found = []
    mask, d, n, threshold = TARGET_FWD
    if (mask, d, n) in index:
        row = index[mask, d, n]
        found.append(_target("causal fwd vs flash SDPA", "fwd", row, row["speedup_vs_sdpa"].get("fwd"), threshold))
    for row in rows:
        if row["mask"] == "sliding_window" and row["n"] == TARGET_WINDOW_N:
            found += _window_targets(row, index.get(("causal", row["d"], row["n"])))
        if row["mask"] == "causal":
            found.append(_target("causal fwd+bwd vs flash SDPA", "fwd_bwd", row, row["speedup_vs_sdpa"].get("fwd_bwd"),
                                 TARGET_FWD_BWD))
    return found


# ----------------------------------------------------------------------------- tables


def _cell(value: float | None, mark: str = "") -> str:
    """TFLOP/s to 0.1 (to 2 significant digits below 1: the CPU smoke run)."""
    return "-" if value is None else f"{value:.1f}{mark}" if value >= 1 else f"{value:.2g}{mark}"


def _perf_line(row: dict, targets: list[dict]) -> list[str]:
    """One line of the main table: TFLOP/s, speedups, and the verdicts of the targets on this config."""
    tf, star, speedup = row["tflops"], "" if row["mask"] == "causal" else "*", row["speedup_vs_sdpa"]
    get = lambda name, mode: tf.get(name, {}).get(mode)  # noqa: E731
    speed = lambda mode: f"{speedup[mode]:.2f}{star}" if mode in speedup else "-"  # noqa: E731
    mine = [t for t in targets if t["key"] == [row["mask"], row["d"], row["n"]]]
    verdict = "; ".join(f"{t['short']}: {t['detail']}" for t in mine) or "-"
    return [row["mask"], str(row["d"]), str(row["n"]), f"{row['batch']}x{row['heads']}",
            _cell(get("seqweave", "fwd")), _cell(get("sdpa_flash", "fwd"), star), _cell(get("flex", "fwd")),
            speed("fwd"), _cell(get("seqweave", "fwd_bwd")), _cell(get("sdpa_flash", "fwd_bwd"), star),
            _cell(get("flex", "fwd_bwd")), speed("fwd_bwd"), verdict]


def _errors_cell(found: object) -> str:
    """"out / dq / dk / dv" max errors; a failure shows as its exception's name (the JSON has the text)."""
    if not isinstance(found, dict):
        return str(found)
    shown = [f"{v:.1e}" if isinstance(v, float) else v.split(":")[1].strip() + "!" for v in
             (found[key] for key in ("out", "dq", "dk", "dv"))]
    return " / ".join(shown)


def render(payload: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of every table."""
    rows, targets, dtype = payload["rows"], payload["targets"], payload["settings"]["dtype"]
    device = payload["machine"].get("device")
    header = ["mask", "d", "N", "BxH", "sw fwd", "SDPA fwd", "Flex fwd", "sw/SDPA fwd", "sw fwd+bwd",
              "SDPA fwd+bwd", "Flex fwd+bwd", "sw/SDPA fwd+bwd", "target"]
    tables = [(f"TFLOP/s on {device}, {dtype} ({FLOP_CONVENTION}); SDPA* = dense causal flash SDPA (cannot "
               "express the mask), TFLOP/s on its causal pairs; sw/SDPA = SDPA time / seqweave time",
               header, [_perf_line(r, targets) for r in rows])]
    checked = [r for r in rows if "numerics" in r]
    if checked:
        body = [[r["mask"], str(r["d"]), str(r["n"]), *(_errors_cell(r["numerics"].get(name, "-"))
                for name in ("seqweave", "sdpa_flash", "flex")), "ok" if r["pairs_dense"] == r["pairs"]
                else f"MISMATCH {r['pairs_dense']} != {r['pairs']}"] for r in checked]
        tables.append((f"Max |error| out / dq / dk / dv vs fp32 math SDPA, same dense mask ({dtype} inputs)",
                       ["mask", "d", "N", "seqweave", "SDPA flash", "Flex", "pairs vs dense mask"], body))
    if targets:
        tables.append(("Targets", ["target", "mask", "d", "N", "value", "threshold", "result"],
                       [[t["target"], *map(str, t["key"]), "-" if t["value"] is None else f"{t['value']:.2f}x",
                         f"{t['threshold']:.1f}x", t["detail"]] for t in targets]))
    return tables


# ----------------------------------------------------------------------------- main


def machine_info(device: torch.device) -> dict:
    """Where the numbers come from: the device by name, library versions and the commit."""
    info = {**results_io.machine_info(HERE), "torch": torch.__version__, "cuda": torch.version.cuda,
            "device": "cpu (Triton interpreter)"}
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        info.update(device=torch.cuda.get_device_name(device), capability=f"sm{major}{minor}")
    from seqweave.codegen.cache import triton_version
    info["triton"] = triton_version()
    return info


def prepare(args: argparse.Namespace) -> torch.device:
    """Pick the device and Triton's mode, before anything imports triton: the interpreter for --smoke."""
    if args.smoke:
        os.environ.setdefault("SEQWEAVE_TRITON_INTERPRET", "1")  # import seqweave maps it to TRITON_INTERPRET
        vars(args).update(SMOKE)
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        raise SystemExit("attention_gpu: no CUDA device here; run with --smoke for a CPU check of the script")
    else:
        if os.environ.pop("TRITON_INTERPRET", None) not in (None, "", "0"):
            print("attention_gpu: unset TRITON_INTERPRET (kernels must compile for the GPU)", file=sys.stderr)
        device = torch.device("cuda")
    import seqweave  # noqa: F401 - applies SEQWEAVE_TRITON_INTERPRET before triton loads
    return device


def plan(args: argparse.Namespace) -> list[Config]:
    """Every (mask, d, N): first those the targets read, then the numerics checks (smallest N), then the
    rest, so that a time budget cuts the least telling configs."""
    configs = [Config(m, d, n, max(1, args.tokens // n), max(1, args.model_dim // d))
               for m in args.masks for d in args.head_dims for n in args.lengths]

    def rank(c: Config) -> int:
        targeted = (c.mask, c.d, c.n) == TARGET_FWD[:3] or (c.mask != "documents" and c.n == TARGET_WINDOW_N)
        return 0 if targeted else 1 if c.n == min(args.lengths) else 2
    return sorted(configs, key=rank)


def run(args: argparse.Namespace, argv: list[str], device: torch.device) -> dict:
    """Measure every planned config, rewriting the JSON after each so a killed run keeps its rows."""
    started = _dt.datetime.now(_dt.timezone.utc)
    settings = {k: getattr(args, k) for k in ("dtype", "head_dims", "lengths", "masks", "tokens", "model_dim",
                                              "window", "warmup_ms", "rep_ms", "baselines", "flex_compile", "smoke")}
    payload = {"benchmark": "attention_gpu", "command": " ".join(shlex.quote(a) for a in
                                                                  [os.path.relpath(sys.argv[0]), *argv]),
               "started_utc": started.isoformat(timespec="seconds"), "machine": machine_info(device),
               "settings": {**settings, "flop_convention": FLOP_CONVENTION}, "rows": [], "targets": [], "skipped": []}
    deadline = time.monotonic() + args.budget_s if args.budget_s > 0 else None
    for cfg in plan(args):
        if deadline is not None and time.monotonic() > deadline:
            payload["skipped"].append({**asdict(cfg), "why": f"time budget of {args.budget_s:.0f} s spent"})
            continue
        print(f"attention_gpu: {cfg}", file=sys.stderr, flush=True)
        payload["rows"].append(run_config(cfg, args, device, check=cfg.n == min(args.lengths)))
        payload["rows"].sort(key=lambda r: (MASK_KINDS.index(r["mask"]), r["d"], r["n"]))
        payload.update(targets=evaluate_targets(payload["rows"]),
                       finished_utc=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
        write_json_atomic(args.out, payload)
        _empty_cache(device)
    write_json_atomic(args.out, payload)
    return payload


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--masks", nargs="+", choices=MASK_KINDS, default=list(MASK_KINDS))
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--tokens", type=int, default=16384, help="B*N per config: B = max(1, tokens // N)")
    parser.add_argument("--model-dim", type=int, default=2048, help="H*d per config: H = model_dim // d")
    parser.add_argument("--window", type=int, default=4096, help="sliding window, the query's own token included")
    parser.add_argument("--warmup-ms", type=int, default=25, help="do_bench warmup")
    parser.add_argument("--rep-ms", type=int, default=100, help="do_bench measuring time")
    parser.add_argument("--budget-s", type=float, default=0, help="start no config after this many seconds (0: none)")
    parser.add_argument("--baselines", nargs="*", choices=BASELINES, default=list(BASELINES))
    parser.add_argument("--no-flex-compile", dest="flex_compile", action="store_false",
                        help="run FlexAttention eagerly (it materialises the scores: small N only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, tiny shapes: checks the script")
    parser.add_argument("--out", default=DEFAULT_OUT, help="JSON results path (written atomically)")
    parser.add_argument("--report", metavar="JSON", help="print the tables of a saved result instead of running")
    parser.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.report:
        with open(args.report) as handle:
            payload = json.load(handle)
    else:
        payload = run(args, argv, prepare(args))
        print(f"wrote {args.out}", file=sys.stderr)
    tables = render(payload)
    print(markdown_tables(tables, LEFT_COLUMNS)) if args.markdown else print_tables(tables, LEFT_COLUMNS)
    failed = [f"{r['mask']} d={r['d']} N={r['n']}: {', '.join(r['failed'])}" for r in payload["rows"] if r["failed"]]
    for line in failed:
        print(f"attention_gpu: seqweave failed on {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
