"""Double Sparsity: calibration, the decode rewrite, and its declared semantics.

- A table keeping every channel and K >= the context is exact: generate() gives eager's tokens.
- With fewer channels and K keys, one decode step equals a plain-torch reference written here
  (label scores on the table's channels, top-K visible keys, softmax over those only).
- Prefill and training graphs are never rewritten; bad tables are refused with what to do.
"""
import json

import pytest
import torch

import seqweave
from seqweave.double_sparsity import calibrate, important_channels
from seqweave.errors import SeqweaveError
from seqweave.ir.ops.attn_sparsity import ChannelTable
from seqweave.passes.manager import run_pipeline
from seqweave.testing.strategies import AttentionShape, attention_graph
from seqweave.testing.models import SampleSpec, build_sample

PROMPT, NEW = 24, 12


def _model():
    model, inputs = build_sample(SampleSpec("llama-tiny", seq_len=PROMPT + NEW, batch=1))
    return model.eval(), inputs["input_ids"][:, :PROMPT]


def _generate(model, prompt, pipeline=None):
    forward = model.forward
    backend = seqweave.backend(pipeline=pipeline) if pipeline else None
    if backend:
        model.forward = torch.compile(forward, backend=backend, fullgraph=True)
    out = model.generate(prompt, max_new_tokens=NEW, do_sample=False, pad_token_id=0,
                         return_dict_in_generate=True, output_logits=True)
    model.forward = forward
    return out, backend


def test_every_channel_and_enough_tokens_is_exact(tmp_path):
    model, prompt = _model()
    table = ChannelTable({layer: [list(range(16))] * 2 for layer in range(2)}, tokens=PROMPT + NEW)
    table.save(str(tmp_path / "all.json"))
    expected, _ = _generate(model, prompt)
    got, backend = _generate(model, prompt, f"canonicalize,double-sparsity{{table={tmp_path / 'all.json'}}}")
    assert torch.equal(got.sequences, expected.sequences)
    details = [graph.passes[-1].result.detail for graph in backend.graphs]
    assert details[0].startswith("0 decode") and all(d.startswith("2 decode") for d in details[1:])


def _reference_step(q, k, v, channels, tokens):
    """softmax over the top-`tokens` keys by q[C] . k[C], per query head (GQA groups share C)."""
    group = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    for head in range(q.shape[1]):
        kv = head // group
        c = torch.tensor(channels[kv])
        labels = k[0, kv][:, c] @ q[0, head, 0, c]
        keep = labels.topk(min(tokens, k.shape[2])).indices
        scores = k[0, kv][keep] @ q[0, head, 0] / q.shape[-1] ** 0.5
        out[0, head, 0] = scores.softmax(-1) @ v[0, kv][keep]
    return out


def test_one_decode_step_equals_the_plain_reference(tmp_path):
    from seqweave.ir.mask import Full
    from seqweave.ir.ops.attn_reference import attention_forward
    from seqweave.ir.ops.attn_sparsity import parse_sparsity, sparse_attend
    from seqweave.ir.score_mod import NoScoreMod

    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 30, 16), torch.randn(1, 2, 30, 16)
    channels = [[1, 5, 9], [0, 2, 15]]
    sparsity = parse_sparsity(f"double(tokens=7, channels={json.dumps(channels)})")
    kernel = lambda q_, k_, v_, mask, ops: attention_forward(q_, k_, v_, mask, NoScoreMod(), 16 ** -0.5, ops)  # noqa: E731
    got, _ = sparse_attend(kernel, [], sparsity)(q, k, v, Full())
    torch.testing.assert_close(got, _reference_step(q, k, v, channels, 7), atol=1e-5, rtol=1e-5)


def test_calibration_reports_recall_and_picks_the_loud_channels(tmp_path):
    model, prompt = _model()
    table = calibrate(model, {"input_ids": prompt, "use_cache": False}, channels=16, tokens=8)
    assert table.recall == pytest.approx(1.0)  # every channel: the label scores are the scores
    fewer = calibrate(model, {"input_ids": prompt, "use_cache": False}, channels=2, tokens=8)
    assert 0.0 < fewer.recall < 1.0 and sorted(fewer.channels) == [0, 1]
    q, k = torch.randn(1, 4, 10, 8), torch.randn(1, 2, 10, 8)
    q[:, :2, :, 3] *= 50  # the first KV head's queries are loud on channel 3
    k[:, 1, :, 6] *= 50
    assert 3 in important_channels(q, k, 1)[0] and 6 in important_channels(q, k, 1)[1]
    path = tmp_path / "t.json"
    fewer.save(str(path))
    assert ChannelTable.load(str(path)).channels == fewer.channels


def test_training_graphs_stay_exact_and_bad_tables_are_refused(tmp_path):
    model, prompt = _model()
    table = ChannelTable({0: [[0, 1]] * 2}, tokens=4)
    table.save(str(tmp_path / "one.json"))
    model.train()
    backend = seqweave.backend(pipeline=f"canonicalize,double-sparsity{{table={tmp_path / 'one.json'}}}")
    out = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)(prompt, labels=prompt, use_cache=False)
    out.loss.backward()
    sparsity = [run for g in backend.graphs for run in g.passes if run.name == "double-sparsity"]
    assert [run.result.rewrites for run in sparsity] == [0, 0]
    decode = attention_graph(AttentionShape(1, 2, 2, 1, 9, 16), "full")
    decode.name = "inference"
    decode.nodes[0].kwargs["layer"] = 1
    with pytest.raises(SeqweaveError, match="no channels for attention layer 1"):
        run_pipeline(decode, f"double-sparsity{{table={tmp_path / 'one.json'}}}")
    with pytest.raises(SeqweaveError, match="cannot read the double-sparsity table"):
        run_pipeline(decode, f"double-sparsity{{table={tmp_path / 'missing.json'}}}")
