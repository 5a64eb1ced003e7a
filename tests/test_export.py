"""Exported models load with plain transformers/peft, in a process that never imports
distft, and give the logits distft's trained model gave."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import TINY
from distft.trainer import Trainer

LOADER = r"""
import json, sys, torch
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoModelForTokenClassification,
                          AutoTokenizer)
spec = json.loads(sys.argv[1])
path, kind = spec["path"], spec["kind"]
auto = {"classification": AutoModelForSequenceClassification,
        "token_classification": AutoModelForTokenClassification}.get(spec["task"], AutoModelForCausalLM)
tok = AutoTokenizer.from_pretrained(path, trust_remote_code=spec.get("remote", False))
if kind == "adapter":
    from peft import PeftModel, PeftConfig
    base = auto.from_pretrained(PeftConfig.from_pretrained(path).base_model_name_or_path)
    model = PeftModel.from_pretrained(base, path)
else:
    model = auto.from_pretrained(path, trust_remote_code=spec.get("remote", False))
model.eval()
enc = tok(spec["texts"], padding=True, return_tensors="pt")
with torch.no_grad():
    logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
assert not any(m == "distft" or m.startswith("distft.") for m in sys.modules), "distft was imported"
print(json.dumps(logits.tolist()))
"""

TEXTS = ["the film was quite great", "12 plus 7 is 19."]


def reload_logits(path, task, kind, remote=False):
    spec = json.dumps({"path": str(path), "task": task, "kind": kind, "remote": remote, "texts": TEXTS})
    out = subprocess.run([sys.executable, "-c", LOADER, spec], capture_output=True, text=True, timeout=300,
                         cwd="/")
    assert out.returncode == 0, out.stderr[-3000:]
    return torch.tensor(json.loads(out.stdout.strip().splitlines()[-1]))


def distft_logits(trainer):
    model = trainer.backend.unwrap(trainer.model).eval()
    enc = trainer.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits


@pytest.mark.parametrize(
    "strategy,task,extra",
    [
        ("full", "causal_lm", []),
        ("bitfit", "classification", []),
        ("partial", "classification", []),  # MLP head: exported with its own modeling file
        ("partial", "causal_lm", ["strategy.unfreeze_top_layers=1"]),  # a new block: plain LlamaForCausalLM
        ("lora", "causal_lm", ["strategy.merge_on_export=true"]),
        ("lora", "classification", ["strategy.merge_on_export=true"]),
        # a head on pooled hidden states: written whole (adapters folded in), its own modeling file
        ("lora", "classification", ["task.head=pooled", "task.head_hidden=[16]"]),
        ("full", "classification", ["task.head=pooled", "task.pooling=first"]),
        ("lora", "classification", ["task.head=pooled", "task.normalize=true"]),  # unit-length pooled features
        ("bitfit", "token_classification", []),
        ("lora", "token_classification", ["strategy.merge_on_export=true"]),  # peft TOKEN_CLS, its head saved
    ],
)
def test_export_reloads_without_distft(cfg_for, strategy, task, extra):
    cfg = cfg_for(f"strategy={strategy}", f"task={task}", "trainer.max_steps=6", "trainer.lr=1e-2",
                  "trainer.eval_every=3", *extra)
    trainer = Trainer(cfg).setup()
    summary = trainer.train()
    final = trainer.run_dir / "final"
    expected = distft_logits(trainer)
    pooled = "task.head=pooled" in extra
    if strategy == "lora" and not pooled:
        assert (final / "adapter_model.safetensors").is_file()
        got = reload_logits(final, task, "adapter")
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
        merged = reload_logits(final / "merged", task, "full")
        torch.testing.assert_close(merged, expected, rtol=1e-3, atol=1e-4)
    else:
        assert (final / "model.safetensors").is_file()
        remote = pooled or (strategy == "partial" and task == "classification")
        got = reload_logits(final, task, "full", remote=remote)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert summary["final_dir"] == str(final)
    assert json.loads((trainer.run_dir / "summary.json").read_text())["trainable_params"] == trainer.trainable
    # The model card: front matter the hub reads, the final eval in model-index.
    front, body = model_card(final)
    assert front["library_name"] == ("peft" if strategy == "lora" and not pooled else "transformers")
    assert {"distft", strategy, task} <= set(front["tags"])
    [result] = front["model-index"][0]["results"]
    values = {m["type"]: m["value"] for m in result["metrics"]}
    metric = cfg.task.metric
    assert values[metric] == pytest.approx(summary[f"eval/{metric}"], rel=1e-5)
    assert f"{trainer.trainable:,} of {trainer.total:,} parameters trained" in body
    assert "train 96/96 kept" in body and "```yaml" in body and "strategy:" in body


def model_card(folder):
    """(front matter, body) of folder/README.md; the front matter must be valid YAML."""
    import yaml

    text = (folder / "README.md").read_text()
    assert text.startswith("---\n"), text[:200]
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def test_hf_model_from_a_local_folder(cfg_for, tmp_path):
    """model=hf takes any local folder: here the export of a previous run, fine-tuned further
    with LoRA (its tokenizer comes from the same folder)."""
    first = Trainer(cfg_for("trainer.max_steps=3")).setup()
    first.train()
    not_model = [o for o in TINY if not o.startswith("model.")]
    cfg = cfg_for(*not_model, "model=hf", f"model.path={first.run_dir / 'final'}", "strategy=lora",
                  "trainer.max_steps=3", tiny=False)
    cfg.run_dir = str(tmp_path / "second")
    second = Trainer(cfg).setup()
    assert type(second.model.get_base_model()).__name__ == "LlamaForCausalLM"
    assert len(second.tokenizer) == len(first.tokenizer)
    summary = second.train()
    assert summary["steps"] == 3
    from peft import PeftConfig

    assert PeftConfig.from_pretrained(second.run_dir / "final").base_model_name_or_path == str(first.run_dir / "final")
