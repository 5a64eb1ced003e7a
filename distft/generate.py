"""`distft-generate`: answers of a fine-tuned model, and of its base for comparison.

    distft-generate RUN_DIR/final --prompt "Name three primary colours." --before
    distft-generate RUN_DIR/final --prompts-file prompts.txt --max-new-tokens 96

The model folder is what a run exported: a full model, or a LoRA adapter (loaded with
peft onto the base it names). Prompts are formatted as in training: the run's
`task.template` (read from RUN_DIR/config.yaml) selects the Alpaca prompt or the
tokenizer's chat template. `--before` also answers with the base model (the adapter
switched off, or `--base PATH` for a full fine-tune). Greedy decoding by default, so the
answers are reproducible.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import torch


def _template(model_dir: Path, given: Optional[str]) -> str:
    if given:
        return given
    cfg = model_dir.parent / "config.yaml"
    if cfg.is_file():
        from omegaconf import OmegaConf

        task = OmegaConf.load(cfg).get("task", {})
        if task.get("name") == "instruction":
            return task.get("template", "alpaca")
        return "none"
    return "alpaca"


def format_prompt(tokenizer, template: str, prompt: str) -> str:
    if template == "chat":
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    if template == "alpaca":
        from distft.tasks.causal_lm import ALPACA_PROMPT

        return ALPACA_PROMPT.format(ctx="", instruction=prompt, input_block="")
    return prompt


def not_a_causal_lm(model_dir: Path) -> Optional[str]:
    """Why the folder cannot generate text, or None when it holds a causal LM (or an
    adapter over one)."""
    if not model_dir.is_dir():
        return "no such folder"
    adapter, config = model_dir / "adapter_config.json", model_dir / "config.json"
    if adapter.is_file():
        task = json.loads(adapter.read_text()).get("task_type")
        return None if task in (None, "CAUSAL_LM") else f"an adapter for {task}, not a causal language model"
    if not config.is_file():
        return "not an exported model or adapter folder (no config.json)"
    archs = json.loads(config.read_text()).get("architectures") or []
    if archs and not any(a.endswith("ForCausalLM") for a in archs):
        return f"a {archs[0]} model, not a causal language model (distft-predict classifies)"
    return None


def load(model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if (model_dir / "adapter_config.json").is_file():
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(model_dir)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir)
    return model.eval(), tokenizer


@torch.no_grad()
def answer(model, tokenizer, text: str, max_new_tokens: int, temperature: float) -> str:
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    kwargs = {"do_sample": temperature > 0, "max_new_tokens": max_new_tokens,
              "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
              "eos_token_id": tokenizer.eos_token_id}
    if temperature > 0:
        kwargs["temperature"] = temperature
    out = model.generate(**enc, **kwargs)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="distft-generate", description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="an exported model or adapter folder (RUN_DIR/final)")
    ap.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    ap.add_argument("--prompts-file", help="one prompt per line")
    ap.add_argument("--template", choices=["alpaca", "chat", "none"], help="default: the run's task.template")
    ap.add_argument("--before", action="store_true", help="also answer with the base model")
    ap.add_argument("--base", help="the base model folder for --before with a full fine-tune")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    args = ap.parse_args(argv)

    model_dir = Path(args.model)
    why = not_a_causal_lm(model_dir)
    if why:
        print(f"distft-generate: error: {model_dir}: {why}", file=sys.stderr)
        return 2
    prompts = list(args.prompt)
    if args.prompts_file:
        prompts += [line.strip() for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
    if not prompts:
        print("distft-generate: error: give --prompt or --prompts-file", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.manual_seed(0)
    model, tokenizer = load(model_dir)
    template = _template(model_dir, args.template)
    base = None
    if args.before and args.base:
        base, _ = load(Path(args.base))
    elif args.before and not hasattr(model, "disable_adapter"):
        print("distft-generate: error: --before with a full model needs --base PATH", file=sys.stderr)
        return 2
    for prompt in prompts:
        text = format_prompt(tokenizer, template, prompt)
        result = {"prompt": prompt}
        if args.before:
            if base is not None:
                result["before"] = answer(base, tokenizer, text, args.max_new_tokens, args.temperature)
            else:
                with model.disable_adapter():
                    result["before"] = answer(model, tokenizer, text, args.max_new_tokens, args.temperature)
        result["after"] = answer(model, tokenizer, text, args.max_new_tokens, args.temperature)
        if args.json:
            print(json.dumps(result))
        else:
            print(f"### {prompt}")
            if "before" in result:
                print(f"--- before:\n{result['before']}")
            print(f"--- after:\n{result['after']}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
