"""Multi-task mixtures: the samplers, per-task heads and metrics, export per task, resume."""
import json
import random
from collections import Counter

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from conftest import TINY, losses, read_metrics, run_cli
from distft.multitask import MixtureOrder, task_probabilities
from distft.trainer import EpochBatches
from test_export import model_card


def test_sampler_probabilities():
    sizes = [900, 100]
    assert task_probabilities(sizes, [1, 1], "proportional", 2.0) == pytest.approx([0.9, 0.1])
    assert task_probabilities(sizes, [1, 1], "temperature", 2.0) == pytest.approx([0.75, 0.25])  # 30:10
    assert task_probabilities(sizes, [1, 1], "uniform", 2.0) == pytest.approx([0.5, 0.5])
    assert task_probabilities(sizes, [1, 3], "weights", 2.0) == pytest.approx([0.25, 0.75])


def test_mixture_order_follows_the_probabilities_and_is_seeded():
    order = MixtureOrder([0, 900], [900, 100], [0.5, 0.5], seed=1)
    epoch0 = order(0)
    assert len(epoch0) == 1000 and epoch0 == order(0) and epoch0 != order(1)
    share = sum(1 for i in epoch0 if i >= 900) / 1000
    assert share == pytest.approx(0.5, abs=0.05)
    small = Counter(i for i in epoch0 if i >= 900)
    assert len(small) == 100 and max(small.values()) - min(small.values()) <= 1, "the small task cycles evenly"


def test_mixture_batches_split_across_ranks_without_overlap():
    order = MixtureOrder([0, 50], [50, 30], [0.6, 0.4], seed=3)
    one = EpochBatches(80, 8, 3, 0, 1, order)
    ranks = [EpochBatches(80, 4, 3, r, 2, order) for r in range(2)]
    for (e1, b1, idx), *per_rank in zip(one.from_position(0, 0), *(r.from_position(0, 0) for r in ranks)):
        assert sorted(idx) == sorted(per_rank[0][2] + per_rank[1][2])
        assert not set(per_rank[0][2]) & set(per_rank[1][2])
        if e1 == 1:
            break


def write_tasks(tmp_path):
    rng = random.Random(0)
    colors = ["red", "green", "blue"]
    for split, n in (("train", 120), ("val", 30)):
        with open(tmp_path / f"sent_{split}.jsonl", "w") as f:
            for _ in range(n):
                y = rng.randint(0, 1)
                f.write(json.dumps({"text": f"it was {'good' if y else 'bad'} {rng.randint(0, 99)}", "label": y}) + "\n")
        with open(tmp_path / f"color_{split}.jsonl", "w") as f:
            for _ in range(n):
                y = rng.randint(0, 2)
                f.write(json.dumps({"sentence": f"the sky is {colors[y]} {rng.randint(0, 99)}", "label": y}) + "\n")
    return [
        "task=classification", "data=mixture",
        f"+data.tasks.sent.data.train={tmp_path / 'sent_train.jsonl'}",
        f"+data.tasks.sent.data.validation={tmp_path / 'sent_val.jsonl'}",
        f"+data.tasks.color.data.train={tmp_path / 'color_train.jsonl'}",
        f"+data.tasks.color.data.validation={tmp_path / 'color_val.jsonl'}",
        "+data.tasks.color.data.text_field=sentence",
    ]


def test_two_classification_tasks_one_encoder_two_heads(tmp_path):
    args = [*TINY, *write_tasks(tmp_path), "trainer.max_steps=40", "trainer.eval_every=20", "trainer.lr=3e-3"]
    run = tmp_path / "run"
    run_cli(*args, f"run_dir={run}")
    last = [e for e in read_metrics(run) if "eval/accuracy" in e][-1]
    assert last["eval/sent/accuracy"] > 0.8 and last["eval/color/accuracy"] > 0.6
    assert last["eval/accuracy"] == pytest.approx((last["eval/sent/accuracy"] + last["eval/color/accuracy"]) / 2)

    # Each task's model loads with plain transformers and scores its own validation set
    # as the run reported.
    for name, field, n_labels in (("sent", "text", 2), ("color", "sentence", 3)):
        folder = run / "final" / name
        model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True).eval()
        tok = AutoTokenizer.from_pretrained(folder)
        rows = [json.loads(line) for line in (tmp_path / f"{name}_val.jsonl").read_text().splitlines()]
        correct = 0
        with torch.no_grad():
            for r in rows:
                logits = model(**tok(r[field], return_tensors="pt")).logits
                assert logits.shape[-1] == n_labels
                correct += int(logits.argmax(-1).item() == r["label"])
        assert correct / len(rows) == pytest.approx(last[f"eval/{name}/accuracy"])
        # Its own model card, with its own metrics.
        front, body = model_card(folder)
        [result] = front["model-index"][0]["results"]
        accuracy = {m["type"]: m["value"] for m in result["metrics"]}["accuracy"]
        assert accuracy == pytest.approx(last[f"eval/{name}/accuracy"], rel=1e-5)
        assert front["library_name"] == "transformers" and f": {name}" in body.splitlines()[1]

    # Resumed from a mid-run checkpoint, the mixture continues with the same losses.
    again = tmp_path / "again"
    run_cli(*args, "trainer.save_every=10", "trainer.keep_checkpoints=0", f"run_dir={tmp_path / 'ref'}")
    run_cli(*args, f"resume={tmp_path / 'ref' / 'checkpoints' / 'step-20'}", f"run_dir={again}")
    ref, got = losses(tmp_path / "ref"), losses(again)
    assert sorted(got) == list(range(21, 41))
    for step in got:
        assert got[step] == pytest.approx(ref[step], rel=1e-5)


def test_mixture_refusals(tmp_path, cfg_for):
    # Refused at config time, before any data or model (how the CLI turns such an error
    # into one line and exit code 2 is tested in test_bad_input.py).
    from distft.errors import ConfigError
    from distft.trainer import check_config

    args = write_tasks(tmp_path)
    for extra, message in ((["data.sampler=bogus"], "data.sampler='bogus'"),
                           (["+data.tasks.color.task.name=causal_lm"], "need different models")):
        with pytest.raises(ConfigError, match=message):
            check_config(cfg_for(*args, *extra))
    with pytest.raises(ConfigError, match="data.tasks is empty"):
        check_config(cfg_for("task=classification", "data=mixture"))


def test_sentence_and_token_tasks_share_one_encoder(tmp_path):
    """A sentence task beside a named-entity task: one encoder, a pooled head and a
    per-token head; each reports its own metrics, and each exports as a model of its kind
    that scores its validation set as the run did (the token one a stock
    AutoModelForTokenClassification)."""
    from transformers import AutoModelForTokenClassification

    from distft.data.synthetic import generate

    args = write_tasks(tmp_path)[:4]  # task=classification, data=mixture, the sentiment task
    for split, n, seed in (("train", 160, 0), ("val", 40, 1)):
        with open(tmp_path / f"ner_{split}.jsonl", "w") as f:
            for r in generate("token_classification", n, seed):
                f.write(json.dumps({"tokens": r["tokens"], "tags": r["tags"]}) + "\n")
    args += [f"+data.tasks.ner.data.train={tmp_path / 'ner_train.jsonl'}",
             f"+data.tasks.ner.data.validation={tmp_path / 'ner_val.jsonl'}",
             "+data.tasks.ner.task.name=token_classification", "task.head_dropout=0.0",
             "task.metric=ner/f1"]  # accuracy, the classification default, is not what a token task reports
    run = tmp_path / "run"
    run_cli(*TINY, *args, "trainer.max_steps=100", "trainer.eval_every=50", "trainer.lr=1e-2", f"run_dir={run}")
    last = [e for e in read_metrics(run) if "eval/loss" in e][-1]
    assert last["eval/sent/accuracy"] > 0.8 and last["eval/ner/f1"] > 0.5, last
    assert {"eval/ner/f1_strict", "eval/ner/f1/person", "eval/ner/token_accuracy"} <= set(last)
    assert last["eval/loss"] == pytest.approx((last["eval/sent/loss"] + last["eval/ner/loss"]) / 2)

    folder = run / "final" / "ner"
    model = AutoModelForTokenClassification.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    assert set(model.config.id2label.values()) == {"O", "B-person", "I-person", "B-location", "I-location"}
    from seqeval.metrics import f1_score

    rows = [json.loads(line) for line in (tmp_path / "ner_val.jsonl").read_text().splitlines()]
    gold, pred = [], []
    with torch.no_grad():
        for r in rows:
            enc = tok(r["tokens"], is_split_into_words=True, return_tensors="pt")
            ids = model(**enc).logits[0].argmax(-1).tolist()
            firsts = {}
            for pos, w in enumerate(enc.word_ids(0)):
                if w is not None:
                    firsts.setdefault(w, pos)
            pred.append([model.config.id2label[ids[firsts[w]]] for w in range(len(r["tokens"]))])
            gold.append(r["tags"])
    assert f1_score(gold, pred) == pytest.approx(last["eval/ner/f1"])
    assert (run / "final" / "sent" / "config.json").is_file()


def test_language_model_mixture_reports_each_task(tmp_path):
    for name, word in (("plus", "plus"), ("minus", "minus")):
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            for i in range(60):
                f.write(json.dumps({"text": f"{i} {word} 1 is {i + 1 if word == 'plus' else i - 1}."}) + "\n")
    run = tmp_path / "run"
    run_cli(*TINY, "task=causal_lm", "data=mixture", "data.sampler=weights", "trainer.max_steps=6",
            f"+data.tasks.plus.data.train={tmp_path / 'plus.jsonl'}", "+data.tasks.plus.weight=3",
            f"+data.tasks.minus.data.train={tmp_path / 'minus.jsonl'}", f"run_dir={run}")
    last = [e for e in read_metrics(run) if "eval/loss" in e][-1]
    assert {"eval/plus/loss", "eval/minus/loss", "eval/plus/perplexity"} <= set(last)
    assert last["eval/loss"] == pytest.approx((last["eval/plus/loss"] + last["eval/minus/loss"]) / 2)
    assert (run / "final" / "model.safetensors").is_file()


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    return write_tasks(folder)


@pytest.mark.parametrize("backend", ["fsdp", "zero2", "zero3"])
def test_classification_mixture_on_sharding_backends_matches_one_process(tmp_path, reference, task_files, backend):
    """One encoder, a head per task, on backends that shard it: the same losses as one
    process, and each task's exported model (gathered from the shards) as well."""
    from conftest import run_torchrun
    from safetensors.torch import load_file

    args = [*TINY, *task_files, "trainer.max_steps=4", "trainer.lr=3e-3", "model.dropout=0.0", "task.head_dropout=0.0"]
    one = reference(*args, "trainer.batch_size=8")
    two = tmp_path / "two"
    run_torchrun(2, *args, "trainer.batch_size=4", f"backend={backend}", f"run_dir={two}")
    ref, got = losses(one), losses(two)
    assert sorted(got) == [1, 2, 3, 4]
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-4), f"step {step}"
    for name in ("sent", "color"):
        a = load_file(str(one / "final" / name / "model.safetensors"))
        b = load_file(str(two / "final" / name / "model.safetensors"))
        assert a.keys() == b.keys() and any(k.startswith("head.") for k in a)
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)


def test_packing_inside_a_mixture_is_refused(tmp_path, cfg_for):
    from distft.errors import ConfigError
    from distft.trainer import check_config

    with pytest.raises(ConfigError, match="data.tasks.sent: packing is not available inside a mixture"):
        check_config(cfg_for(*write_tasks(tmp_path), "+data.tasks.sent.data.packing=true"))
