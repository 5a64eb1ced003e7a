"""Packing: every example once, rows within max_length, and the same per-example loss as
unpacked (no attention between the examples of a row)."""
import json

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import TINY, run_cli
from distft.data.packing import pack
from distft.models.byte_tokenizer import build_byte_tokenizer
from distft.tasks import IGNORE, build_task

DATA = OmegaConf.create({"text_field": "text", "instruction_field": "instruction", "input_field": "input",
                         "output_field": "output", "messages_field": "messages", "max_length": 64})


def instruction_examples(tok, n=12):
    t = build_task(OmegaConf.create({"name": "instruction", "mask_prompt": True, "template": "chat"}), DATA, tok)
    records = [{"messages": [{"role": "user", "content": "add " + "1 " * (i % 5)},
                             {"role": "assistant", "content": str(i) * (1 + i % 3)}]} for i in range(n)]
    examples = t.encode(records)
    for e in examples:
        e.pop("_full_length")
    return t, examples


def test_every_example_once_within_max_length():
    tok = build_byte_tokenizer()
    _, examples = instruction_examples(tok, 40)
    rows = pack(examples, 160, seed=0)
    assert all(len(r["input_ids"]) <= 160 for r in rows)
    assert len(rows) <= len(examples) / 3
    segments = []
    for r in rows:
        starts = [i for i, p in enumerate(r["position_ids"]) if p == 0] + [len(r["input_ids"])]
        segments += [tuple(r["input_ids"][a:b]) for a, b in zip(starts, starts[1:])]
    assert sorted(segments) == sorted(tuple(e["input_ids"]) for e in examples)
    assert pack(examples, 160, seed=0) == rows  # deterministic


def per_token_loss(model, task, batch):
    logits = model(**task.model_kwargs(batch)).logits
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                           ignore_index=IGNORE, reduction="none")
    return loss.view(logits.shape[0], -1)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_unpacked_per_example(attn):
    tok = build_byte_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                         attn_implementation=attn)).eval()
    task, examples = instruction_examples(tok)
    rows = pack(examples, 128, seed=0)
    assert any(r["position_ids"].count(0) > 2 for r in rows), "rows must hold several examples"

    with torch.no_grad():
        unpacked = per_token_loss(model, task, task.collate(examples))
        packed_batch = task.collate(rows)
        assert "attention_mask" not in task.model_kwargs(packed_batch)
        packed = per_token_loss(model, task, packed_batch)

    # Each example's target losses, in order, from both layouts.
    def by_example(loss, batch, ids):
        out = {}
        for b in range(loss.shape[0]):
            targets = batch["labels"][b, 1:]
            if "position_ids" in batch:
                pos = batch["position_ids"][b]
                starts = (pos == 0).nonzero().flatten().tolist() + [pos.numel()]
            else:
                starts = [0, int(batch["attention_mask"][b].sum())]
            for a, z in zip(starts, starts[1:]):
                key = tuple(batch["input_ids"][b, a:z].tolist())
                if key in ids:
                    keep = targets[a:z - 1] != IGNORE
                    out[key] = loss[b, a:z - 1][keep]
        return out

    ids = {tuple(e["input_ids"]) for e in examples}
    u, p = by_example(unpacked, task.collate(examples), ids), by_example(packed, packed_batch, ids)
    assert u.keys() == p.keys() == ids
    for k in ids:
        assert u[k].numel() > 0
        torch.testing.assert_close(p[k], u[k], rtol=1e-4, atol=1e-5)
    assert task.count_targets(packed_batch) == task.count_targets(task.collate(examples))


def test_packing_end_to_end(tmp_path):
    run = tmp_path / "run"
    run_cli(*TINY, "task=instruction", "task.template=chat", "data.packing=true", "data.max_length=128",
            "trainer.max_steps=30", "data.num_train=400",
            "trainer.eval_every=10", f"run_dir={run}")
    report = json.loads((run / "data_report.json").read_text())
    assert report["packing"]["rows"] < report["packing"]["examples"] / 2 and report["packing"]["fill"] > 0.8
    evals = [json.loads(line)["eval/loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if "eval/loss" in line]
    assert evals[-1] < evals[0]


def test_packing_is_refused_for_classification(tmp_path):
    proc = run_cli(*TINY, "task=classification", "data.packing=true", f"run_dir={tmp_path / 'r'}", check=False)
    assert proc.returncode == 2 and "data.packing=true needs task=causal_lm or task=instruction" in proc.stderr
