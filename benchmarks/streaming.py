"""Decoding far past the window: dense attention vs streaming, lm-infinite and double-sparsity.

A tiny random-weight Llama (the built-in sample, eval, fp32, 1 thread) decodes `factor` x the
window after a short prompt, generate() through seqweave in every row:

- dense: HF's DynamicCache, the default pipeline;
- streaming: `streaming{sinks,window}` + `seqweave.StreamingCache` (rolling sinks + window slots);
- lm-infinite: `lm-infinite{sinks,window,max_distance}` + `StreamingCache(max_distance=...)`;
- double-sparsity: `double-sparsity{table,tokens}` on a DynamicCache, the table calibrated on
  another sequence (its recall is the calibration's, on held-out tokens).

Every method is teacher-forced with dense's greedy tokens, so the logits compare the same
history: drift is mean / max |logit - dense logit| and the share of steps with the same
argmax. Memory is the cache's bytes after 1x, 2x, 4x and 8x the window (flat = the same);
decode time per token is a ratio to dense measured in the same run (compiles excluded).

    python benchmarks/streaming.py                          # sinks 4, window 256, 8x past it
    python benchmarks/streaming.py --window 32 --factor 2   # quick
    python benchmarks/streaming.py --report benchmarks/results/streaming.json --markdown
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import shlex
import sys
import tempfile
import time
import warnings

import torch

import results_io

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results", "streaming.json")
LEFT_COLUMNS = ("method",)
METHODS = ("dense", "streaming", "lm-infinite", "double-sparsity")
CHECKPOINTS = (1, 2, 4, 8)


def _model(args: argparse.Namespace):
    from seqweave.testing.models import SampleSpec, build_sample
    total = args.prompt + args.factor * args.window
    model, inputs = build_sample(SampleSpec("llama-tiny", seq_len=total, batch=1, hidden=args.hidden,
                                            layers=args.layers))
    return model.eval(), inputs["input_ids"][:, :args.prompt]


def _cache_bytes(cache) -> int:
    if hasattr(cache, "cache_bytes"):
        return cache.cache_bytes()
    return sum(t.numel() * t.element_size() for layer in cache.layers if getattr(layer, "is_initialized", False)
               for t in (layer.keys, layer.values))


class _Forced:
    """A logits processor: records the cache's bytes each step and, given tokens, forces them."""

    def __init__(self, cache, forced: torch.Tensor | None, prompt: int) -> None:
        self.cache, self.forced, self.prompt, self.bytes = cache, forced, prompt, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.bytes.append(_cache_bytes(self.cache))
        if self.forced is None:
            return scores
        step = input_ids.shape[1] - self.prompt
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.forced[0, self.prompt + step]] = 0.0
        return forced


def _pipeline_and_cache(method: str, model, args: argparse.Namespace, table: str):
    import seqweave
    from transformers import DynamicCache
    if method == "streaming":
        return (f"canonicalize,streaming{{sinks={args.sinks},window={args.window}}}",
                lambda: seqweave.StreamingCache(model, sinks=args.sinks, window=args.window))
    if method == "lm-infinite":
        limit = args.window
        return (f"canonicalize,lm-infinite{{sinks={args.sinks},window={args.window},max_distance={limit}}}",
                lambda: seqweave.StreamingCache(model, sinks=args.sinks, window=args.window, max_distance=limit))
    if method == "double-sparsity":
        return (f"canonicalize,double-sparsity{{table={table},tokens={args.tokens}}}",
                lambda: DynamicCache(config=model.config))
    return "canonicalize", lambda: DynamicCache(config=model.config)


def _generate(model, prompt, cache, new_tokens: int, forced: torch.Tensor | None):
    from transformers import LogitsProcessorList
    recorder = _Forced(cache, forced, prompt.shape[1])
    started = time.perf_counter()
    with torch.no_grad():
        out = model.generate(prompt, past_key_values=cache, max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=0, return_dict_in_generate=True, output_logits=True,
                             logits_processor=LogitsProcessorList([recorder]))
    return out, time.perf_counter() - started, recorder.bytes


def measure(method: str, args: argparse.Namespace, table: str, dense: dict | None) -> dict:
    import seqweave
    torch._dynamo.reset()
    model, prompt = _model(args)
    pipeline, new_cache = _pipeline_and_cache(method, model, args, table)
    backend = seqweave.backend(pipeline=pipeline)
    model.forward = torch.compile(model.forward, backend=backend, fullgraph=True)
    new_tokens = args.factor * args.window
    forced = dense["sequences"] if dense else None
    _generate(model, prompt, new_cache(), 3, forced)  # compiles prefill and decode graphs
    out, seconds, cache_bytes = _generate(model, prompt, new_cache(), new_tokens, forced)
    logits = torch.stack(out.logits, dim=1)
    row = {"method": method, "pipeline": pipeline, "graphs": len(backend.graphs), "seconds": seconds,
           "per_token_s": seconds / new_tokens, "sequences": out.sequences, "logits": logits,
           "cache_bytes": {f"{k}x": cache_bytes[min(len(cache_bytes), k * args.window) - 1] for k in CHECKPOINTS
                           if k <= args.factor}}
    if dense:
        delta = (logits - dense["logits"]).abs()
        row.update(drift_mean=float(delta.mean()), drift_max=float(delta.max()),
                   same_argmax=float((logits.argmax(-1) == dense["logits"].argmax(-1)).float().mean()))
    return row


def _calibrate(args: argparse.Namespace, path: str) -> dict:
    """Channels from another random sequence of the same length as the decode context."""
    from seqweave.double_sparsity import calibrate
    model, _ = _model(args)
    generator = torch.Generator().manual_seed(123)
    ids = torch.randint(1, 128, (1, args.prompt + args.factor * args.window), generator=generator)
    table = calibrate(model, {"input_ids": ids, "use_cache": False}, channels=args.channels, tokens=args.tokens)
    table.save(path)
    return {"channels": args.channels, "head_dim": table.head_dim, "tokens": args.tokens, "recall": table.recall}


def _kv_read_fraction(args: argparse.Namespace, head_dim: int) -> float:
    """Share of K/V bytes one decode step reads, averaged over the decoded lengths: label
    channels of every key, plus K whole keys and values, against every key and value."""
    lengths = range(args.prompt + 1, args.prompt + args.factor * args.window + 1)
    read = [min(1.0, (t * args.channels + 2 * min(args.tokens, t) * head_dim) / (2 * t * head_dim)) for t in lengths]
    return sum(read) / len(read)


def run(args: argparse.Namespace, argv: list[str]) -> dict:
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)  # past_key_values= is also cache= in newer HF
    started = _dt.datetime.now(_dt.timezone.utc)
    rows, dense = [], None
    with tempfile.TemporaryDirectory() as scratch:
        table = os.path.join(scratch, "double_sparsity.json")
        print("calibrating double sparsity ...", file=sys.stderr, flush=True)
        sparsity = _calibrate(args, table)
        for method in METHODS:
            print(f"decoding {args.factor * args.window} tokens with {method} ...", file=sys.stderr, flush=True)
            row = measure(method, args, table, dense)
            dense = dense or row
            rows.append(row)
    for row in rows:
        row["per_token_vs_dense"] = row["per_token_s"] / rows[0]["per_token_s"]
        row.pop("sequences"), row.pop("logits")
    rows[-1].update(recall=sparsity["recall"], kv_read_fraction=_kv_read_fraction(args, sparsity["head_dim"]))
    return {"benchmark": "streaming",
            "command": " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0]), *argv]),
            "started_utc": started.isoformat(timespec="seconds"),
            "finished_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": {**results_io.machine_info(HERE), "torch": torch.__version__},
            "settings": {k: getattr(args, k) for k in ("prompt", "sinks", "window", "factor", "hidden", "layers",
                                                       "channels", "tokens", "threads")},
            "double_sparsity": sparsity, "rows": rows}


def render(payload: dict) -> list[results_io.TableData]:
    s = payload["settings"]
    marks = [k for k in payload["rows"][0]["cache_bytes"]]
    header = ["method", *[f"cache KiB @{m}" for m in marks], "bytes/token @end", "decode/token vs dense",
              "drift mean", "drift max", "same argmax", "KV read", "recall"]
    total = s["prompt"] + s["factor"] * s["window"]
    body = []
    for r in payload["rows"]:
        final = list(r["cache_bytes"].values())[-1]
        body.append([r["method"], *[f"{r['cache_bytes'][m] / 1024:.0f}" for m in marks], f"{final / total:,.0f}",
                     f"{r['per_token_vs_dense']:.2f}x", f"{r.get('drift_mean', 0):.3g}", f"{r.get('drift_max', 0):.3g}",
                     f"{r.get('same_argmax', 1):.0%}", f"{r['kv_read_fraction']:.0%}" if "kv_read_fraction" in r else "-",
                     f"{r['recall']:.0%}" if "recall" in r else "-"])
    title = (f"decoding {s['factor']}x past a window of {s['window']} (sinks {s['sinks']}, prompt {s['prompt']}), "
             f"tiny Llama hidden {s['hidden']}, {s['layers']} layers, double sparsity {s['channels']} channels / "
             f"{s['tokens']} tokens, {s['threads']} thread")
    return [(title, header, body)]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--factor", type=int, default=8, help="decode factor x window tokens")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--channels", type=int, default=4, help="double sparsity: label channels per KV head")
    parser.add_argument("--tokens", type=int, default=64, help="double sparsity: keys attended per query")
    parser.add_argument("--threads", type=int, default=1)
    results_io.add_output_arguments(parser, DEFAULT_OUT)
    args = parser.parse_args(argv)
    payload = results_io.run_or_report(args, lambda: run(args, argv), render, LEFT_COLUMNS)
    flat = [r for r in payload["rows"] if r["method"] in ("streaming", "lm-infinite")]
    grew = [r["method"] for r in flat if len(set(r["cache_bytes"].values())) != 1]
    for method in grew:
        print(f"NOT FLAT: {method}'s cache grew while decoding", file=sys.stderr)
    return 1 if grew else 0


if __name__ == "__main__":
    sys.exit(main())
