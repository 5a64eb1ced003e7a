"""Tasks: prompt masking token by token, EOS kept as a target when pad == EOS,
and the causal-LM loss normalised over tokens."""
import math

import pytest
import torch
from omegaconf import OmegaConf

from distft.models.byte_tokenizer import build_byte_tokenizer
from distft.tasks import IGNORE, build_task

DATA = OmegaConf.create({"text_field": "text", "label_field": "label", "instruction_field": "instruction",
                         "input_field": "input", "output_field": "output", "messages_field": "messages",
                         "max_length": 512})


def task(name, tokenizer, mask_prompt=True, template="alpaca"):
    return build_task(OmegaConf.create({"name": name, "mask_prompt": mask_prompt, "template": template}), DATA, tokenizer)


def test_instruction_labels_mask_the_prompt_and_keep_response_and_eos():
    tok = build_byte_tokenizer()
    t = task("instruction", tok)
    [ex] = t.encode([{"instruction": "Add the two numbers.", "input": "2 plus 3", "output": "5"}])
    prompt = t.prompt("Add the two numbers.", "2 plus 3")
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert prompt.endswith("### Response:\n") and "### Input:\n2 plus 3" in prompt
    assert ex["input_ids"][n_prompt:] == [tok.convert_tokens_to_ids("5"), tok.eos_token_id]
    assert ex["labels"][:n_prompt] == [IGNORE] * n_prompt
    assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]

    unmasked = task("instruction", tok, mask_prompt=False).encode(
        [{"instruction": "Add the two numbers.", "input": "2 plus 3", "output": "5"}])[0]
    assert unmasked["labels"] == unmasked["input_ids"]


def test_eos_is_trained_when_pad_token_is_eos():
    tok = build_byte_tokenizer()
    tok.pad_token = tok.eos_token  # as SmolLM2 ships: pad == EOS
    t = task("instruction", tok)
    examples = t.encode([{"instruction": "Say hi.", "input": "", "output": "hi"},
                         {"instruction": "Say a much longer greeting please.", "input": "", "output": "hello there"}])
    batch = t.collate(examples)
    short = batch["labels"][0]
    n = len(examples[0]["input_ids"])
    assert short[n - 1] == tok.eos_token_id, "the EOS that ends the response must be a target"
    assert (short[n:] == IGNORE).all(), "padding (same id as EOS) must not be a target"
    assert batch["attention_mask"][0].sum() == n
    assert (batch["input_ids"][0, n:] == tok.eos_token_id).all()


def test_causal_lm_loss_sum_counts_targets_only():
    tok = build_byte_tokenizer()
    t = task("causal_lm", tok)
    batch = t.collate(t.encode([{"text": "abc"}, {"text": "abcdefg"}]))
    # "abc" + EOS -> 3 shifted targets; "abcdefg" + EOS -> 7
    assert t.count_targets(batch) == 3 + 7
    logits = torch.zeros(2, batch["input_ids"].shape[1], len(tok))
    assert t.loss_sum(logits, batch).item() == pytest.approx(10 * math.log(len(tok)), rel=1e-6)


def test_classification_collate():
    tok = build_byte_tokenizer()
    t = task("classification", tok)
    batch = t.collate(t.encode([{"text": "good", "label": 1}, {"text": "bad!!", "label": 0}]))
    assert batch["labels"].tolist() == [1, 0]
    assert batch["attention_mask"].sum(1).tolist() == [4, 5]


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 plus 3?"},
        {"role": "assistant", "content": "5"}, {"role": "user", "content": "and 4 plus 4?"},
        {"role": "assistant", "content": "8"}]


def targets(tok, ex):
    """The target tokens of an example, as runs of consecutive positions decoded to text."""
    runs, current = [], []
    for x in ex["labels"]:
        if x == IGNORE:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(x)
    if current:
        runs.append(current)
    return [tok.decode(r) for r in runs]


def test_chat_default_template_trains_every_assistant_turn_and_its_eos():
    tok = build_byte_tokenizer()  # no chat template of its own: the documented default is used
    t = task("instruction", tok, template="chat")
    [ex] = t.encode([{"messages": CHAT, "_file": "chat.jsonl", "_line": 1}])
    text = tok.decode(ex["input_ids"])
    assert text == ("<|system|>\nBe brief.\n<|user|>\n2 plus 3?\n<|assistant|>\n5</s>\n"
                    "<|user|>\nand 4 plus 4?\n<|assistant|>\n8</s>\n")
    # Token by token: exactly the two answers, each with the EOS that ends it (and the
    # template's newline after it), are targets.
    assert targets(tok, ex) == ["5</s>\n", "8</s>\n"]
    assert ex["labels"].count(tok.eos_token_id) == 2
    # The exported tokenizer carries the template, so inference formats prompts the same way.
    assert "<|assistant|>" in tok.chat_template

    [unmasked] = task("instruction", tok, mask_prompt=False, template="chat").encode([{"messages": CHAT}])
    assert unmasked["labels"] == unmasked["input_ids"]


def test_chat_records_are_validated():
    from distft.errors import DataError

    t = task("instruction", build_byte_tokenizer(), template="chat")
    bad = [({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
           ({"messages": [{"role": "bot", "content": "hi"}]}, "has role 'bot'"),
           ({"messages": "hi"}, "must be a non-empty list"),
           ({"text": "hi"}, "missing field 'messages'")]
    for record, message in bad:
        with pytest.raises(DataError, match=rf"chat\.jsonl:7: .*{message}"):
            t.encode([{**record, "_file": "chat.jsonl", "_line": 7}])
