"""`distft-predict`: classify new texts (or tag new sentences) with an exported model.

    distft-predict RUN_DIR/final texts.jsonl --output predictions.jsonl

Input: JSONL, CSV, TSV or Parquet with a `text` field (sequence classification) or a
`tokens` field, a list of words (token classification); --field names another. Output: one
JSON line per input, in input order: {"text", "label", "label_name", "probabilities"} for a
sequence, {"tokens", "tags"} for a token task.

Models: any final/ of a classification or token-classification run (a stock transformers
model, distft's pooled-head model, or a merged LoRA model); a peft adapter folder is loaded
over its base. A feature-based run whose classifier could not become a head left
final/classifier.skops: skops loads it only after the types it does not trust by default
are reviewed. They are listed, and each must be named with --trust TYPE; nothing is
loaded with trusted=True, nothing is unpickled.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch

from distft.errors import DistftError, DataError


def read_inputs(path: str, field: str, token_task: bool) -> List:
    from distft.data.sources import read_records, where

    out = []
    for r in read_records(path):
        value = r.get(field)
        ok = isinstance(value, list) and value and all(isinstance(w, str) for w in value) if token_task \
            else isinstance(value, str) and value.strip()
        if not ok:
            want = "a non-empty list of words" if token_task else "a non-empty string"
            raise DataError(f"{where(r)}: field {field!r} must be {want} (--field names another)")
        out.append(value)
    return out


def not_a_classifier(folder: Path) -> Optional[str]:
    """Why the folder cannot classify, or None (read from its config, before loading)."""
    if (folder / "classifier.skops").is_file():
        return None
    adapter, config = folder / "adapter_config.json", folder / "config.json"
    if adapter.is_file():
        task = json.loads(adapter.read_text()).get("task_type")
        return None if task in ("SEQ_CLS", "TOKEN_CLS") else f"an adapter for {task}, not a classifier"
    if not config.is_file():
        return "no config.json, adapter_config.json or classifier.skops here"
    raw = json.loads(config.read_text())
    archs = raw.get("architectures") or []
    if raw.get("model_type") == "distft_mlp_head" or any(
            a.endswith(("ForSequenceClassification", "ForTokenClassification")) for a in archs):
        return None
    return (f"a {archs[0] if archs else raw.get('model_type')} model, not a classifier "
            "(distft-generate answers prompts with a language model)")


class Predictor:
    """An exported model and what it needs to turn inputs into predictions."""

    def __init__(self, folder: str, trust: List[str] = ()):
        from transformers import AutoTokenizer

        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise DistftError(f"{folder}: no such model folder")
        why = not_a_classifier(self.folder)
        if why:
            raise DistftError(f"{folder}: {why}")
        # The tokenizer is a stock one even beside distft's head model (no remote code to run);
        # handed that model's config, transformers does not read it as an unknown model type.
        head_config = None
        config_file = self.folder / "config.json"
        if config_file.is_file() and json.loads(config_file.read_text()).get("model_type") == "distft_mlp_head":
            from distft.models.head_model import MlpHeadConfig

            head_config = MlpHeadConfig.from_pretrained(str(self.folder))
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.folder), trust_remote_code=False,
                                                       **({"config": head_config} if head_config else {}))
        self.skops = (self.folder / "classifier.skops").is_file()
        if self.skops:
            self.spec = json.loads((self.folder / "features.json").read_text())
            self.token_task = self.spec["task"] == "token_labels"
            self.classifier = load_skops(self.folder / "classifier.skops", trust)
            from transformers import AutoModel

            self.model = AutoModel.from_pretrained(str(self.folder / "backbone")).eval()
            self.labels = [str(x) for x in self.spec["labels"]]
            self.max_length = self.spec["max_length"]
            return
        if (self.folder / "adapter_config.json").is_file():
            from peft import AutoPeftModelForSequenceClassification, AutoPeftModelForTokenClassification, PeftConfig

            from transformers import PretrainedConfig

            task_type = str(PeftConfig.from_pretrained(str(self.folder)).task_type)
            self.token_task = "TOKEN" in task_type
            auto = AutoPeftModelForTokenClassification if self.token_task else AutoPeftModelForSequenceClassification
            kwargs = {}
            head = self.folder / "head_config.json"  # the label count and names of the adapter's head
            if head.is_file():
                labels = PretrainedConfig.from_json_file(str(head))
                kwargs = {"num_labels": labels.num_labels, "id2label": labels.id2label, "label2id": labels.label2id}
            self.model = auto.from_pretrained(str(self.folder), **kwargs).eval()
            config = self.model.config
        else:
            if not (self.folder / "config.json").is_file():
                raise DistftError(f"{folder}: no config.json, adapter_config.json or classifier.skops here")
            raw = json.loads((self.folder / "config.json").read_text())
            self.token_task = any(a.endswith("ForTokenClassification") for a in raw.get("architectures") or [])
            if raw.get("model_type") == "distft_mlp_head":  # distft's own head class: no remote code needed here
                from distft.models.head_model import MlpHeadForSequenceClassification

                self.model = MlpHeadForSequenceClassification.from_pretrained(str(self.folder)).eval()
            else:
                from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

                auto = AutoModelForTokenClassification if self.token_task else AutoModelForSequenceClassification
                self.model = auto.from_pretrained(str(self.folder)).eval()
            config = self.model.config
        id2label = getattr(config, "id2label", None) or {}
        self.labels = [str(id2label.get(i, id2label.get(str(i), i))) for i in range(len(id2label))]
        self.max_length = min(getattr(self.tokenizer, "model_max_length", 512) or 512, 512)

    @torch.inference_mode()
    def predict(self, inputs: List, batch_size: int = 64) -> List[Dict]:
        out: List[Dict] = []
        for i in range(0, len(inputs), batch_size):
            out += self._batch(inputs[i:i + batch_size])
        return out

    def _batch(self, items: List) -> List[Dict]:
        enc = self.tokenizer(items, is_split_into_words=self.token_task, truncation=True, max_length=self.max_length,
                             padding=True, return_tensors="pt")
        kwargs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if self.skops:
            scores = self._skops_scores(enc, kwargs, items)
        else:
            scores = self.model(**kwargs).logits.float()
        if not self.token_task:
            probs = scores.softmax(-1)
            return [{"text": text, "label": int(p.argmax()), "label_name": self.labels[int(p.argmax())] if self.labels else None,
                     "probabilities": [round(float(x), 6) for x in p]} for text, p in zip(items, probs)]
        results = []
        for j, words in enumerate(items):
            firsts = {}
            for pos, w in enumerate(enc.word_ids(j)):
                if w is not None and w not in firsts:
                    firsts[w] = pos
            tags = [self.labels[int(scores[j, firsts[w]].argmax())] if w in firsts else "O" for w in range(len(words))]
            results.append({"tokens": words, "tags": tags})
        return results

    def _skops_scores(self, enc, kwargs, items) -> torch.Tensor:
        from distft.features import class_scores, hidden_of, pool

        layers = self.spec["layers"]
        res = self.model(**kwargs, output_hidden_states=bool(layers))
        hidden = hidden_of(res, layers)
        n = len(self.labels)
        if not self.token_task:
            feats = pool(hidden.float(), kwargs["attention_mask"], self.spec["pooling"]).numpy()
            return torch.from_numpy(class_scores(self.classifier, feats, n))
        scores = torch.zeros(*hidden.shape[:2], n, dtype=torch.float64)
        flat = hidden.float().reshape(-1, hidden.size(-1)).numpy()
        scores.view(-1, n)[:] = torch.from_numpy(class_scores(self.classifier, flat, n))
        return scores


def load_skops(path: Path, trust: List[str]):
    """The fitted pipeline, loaded only when every type skops does not trust by default
    has been named by the user (--trust): the review skops asks for, never trusted=True."""
    import skops.io as sio

    untrusted = sio.get_untrusted_types(file=str(path))
    unreviewed = [t for t in untrusted if t not in set(trust)]
    if unreviewed:
        raise DistftError(f"{path}: holds types that skops does not trust by default: {unreviewed}. Review them "
                          "(a malicious file could run code through them) and, if you trust this file, pass "
                          + " ".join(f"--trust {t}" for t in unreviewed))
    return sio.load(str(path), trusted=list(untrusted))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="distft-predict", description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="an exported model folder (RUN_DIR/final)")
    ap.add_argument("input", help="JSONL, CSV, TSV or Parquet with the texts (or word lists)")
    ap.add_argument("--output", help="where to write the predictions (JSONL); default: stdout")
    ap.add_argument("--field", help="the input field (default: text, or tokens for a token-classification model)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--trust", action="append", default=[], metavar="TYPE",
                    help="a type in classifier.skops you reviewed and trust (repeat for each)")
    args = ap.parse_args(argv)
    try:
        predictor = Predictor(args.model, args.trust)
        inputs = read_inputs(args.input, args.field or ("tokens" if predictor.token_task else "text"),
                             predictor.token_task)
        rows = predictor.predict(inputs, args.batch_size)
    except DistftError as e:
        print(f"distft-predict: error: {e}", file=sys.stderr)
        return 2
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if args.output:
        tmp = Path(args.output).with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(args.output)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
