"""strategy=feature: frozen embeddings + scikit-learn. The embedding cache hits and misses,
the exported head gives scikit-learn's own scores, per-token features for token
classification, skops for what cannot be a head (with the type review), torchrun."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import skops.io as sio
import torch

from distft.errors import ConfigError
from distft.train import run

from conftest import ROOT, TINY, run_cli, torchrun_cmd

FEATURE = ["strategy=feature", "task=classification", "data.num_train=160", "data.num_validation=48",
           "strategy.classifier.cv=3"]


def features_run(cfg_for, tmp_path, *overrides, name="run"):
    cfg = cfg_for(*FEATURE, f"strategy.cache_dir={tmp_path / 'features'}", *overrides)
    cfg.run_dir = str(tmp_path / name)
    return run(cfg)


def reviewed_load(path):
    """Load a skops file after checking its untrusted types are the ones expected here
    (numpy and scikit-learn internals), as a user reviewing them would."""
    untrusted = sio.get_untrusted_types(file=str(path))
    assert all(t.startswith(("numpy.", "sklearn.", "builtins.")) for t in untrusted), untrusted
    return sio.load(str(path), trusted=untrusted)


def test_second_classifier_reuses_the_cached_embeddings_and_a_changed_setting_does_not(cfg_for, tmp_path):
    first = features_run(cfg_for, tmp_path, name="a")
    assert first["features"]["cache_hit"] is False and first["features"]["examples_per_second"] > 0
    files = list((tmp_path / "features").glob("*.safetensors"))
    assert len(files) == 1
    again = features_run(cfg_for, tmp_path, "strategy.classifier.name=svm", "strategy.classifier.C=0.5", name="b")
    assert again["features"]["cache_hit"] is True and again["features"]["cache"] == str(files[0])
    assert again["classifier"] == "svm"
    for changed, setting in ((["strategy.pooling=first"], "pooling"), (["strategy.layer=1"], "layer"),
                             (["strategy.last_k=2"], "last_k"), (["data.max_length=16"], "max length")):
        got = features_run(cfg_for, tmp_path, *changed, name=f"c-{setting.replace(' ', '_')}")
        assert got["features"]["cache_hit"] is False, setting
    assert len(list((tmp_path / "features").glob("*.safetensors"))) == 5


@pytest.mark.parametrize("classifier", [
    ["strategy.classifier.name=logistic"],  # C searched by cross-validation
    ["strategy.classifier.name=svm", "strategy.classifier.C=0.3"],
    ["strategy.classifier.name=mlp", "strategy.classifier.hidden=[12]", "strategy.classifier.early_stopping=false",
     "strategy.classifier.activation=tanh"],
    ["strategy.classifier.name=logistic", "strategy.classifier.standardize=false", "strategy.last_k=2",
     "strategy.pooling=last"],
])
def test_exported_head_gives_the_classifiers_own_scores(cfg_for, tmp_path, classifier):
    """final/ loads with plain transformers (a process that never imports distft) and its
    logits equal scikit-learn's log-probabilities (its decision function for the SVM),
    up to the softmax's additive constant; accuracy is the same."""
    summary = features_run(cfg_for, tmp_path, *classifier)
    assert summary["exported_as"].startswith("head")
    pipe = reviewed_load(tmp_path / "run" / "classifier.skops")
    texts = ["the film was quite great", "the plot was honestly dull", "this movie was mostly brilliant"]
    loader = r"""
import json, sys, torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
path = sys.argv[1]
tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
model = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True).eval()
enc = tok(json.loads(sys.argv[2]), padding=True, return_tensors="pt")
with torch.no_grad():
    out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
assert not any(m == "distft" or m.startswith("distft.") for m in sys.modules)
print(json.dumps(out.logits.tolist()))
"""
    proc = subprocess.run([sys.executable, "-c", loader, str(tmp_path / "run" / "final"), json.dumps(texts)],
                          capture_output=True, text=True, cwd="/", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logits = torch.tensor(json.loads(proc.stdout.strip().splitlines()[-1]))

    from distft.features import class_scores
    from distft.predict import Predictor

    features = _features_of(tmp_path / "run" / "final", texts, summary)
    expected = torch.from_numpy(class_scores(pipe, features, 2)).float()
    shift = (logits - expected).mean(1, keepdim=True)  # softmax ignores a per-row constant
    torch.testing.assert_close(logits, expected + shift, rtol=1e-4, atol=1e-4)
    # distft-predict reads the same folder without remote code
    probs = [r["probabilities"] for r in Predictor(str(tmp_path / "run" / "final")).predict(texts)]
    torch.testing.assert_close(torch.tensor(probs), logits.softmax(-1), rtol=1e-4, atol=1e-5)


def _features_of(final, texts, summary):
    """The embeddings scikit-learn would see for `texts`, from the exported backbone."""
    from distft.features import pool
    from distft.models.head_model import MlpHeadForSequenceClassification
    from transformers import AutoTokenizer

    model = MlpHeadForSequenceClassification.from_pretrained(str(final)).eval()
    tok = AutoTokenizer.from_pretrained(str(final))
    enc = tok(texts, padding=True, return_tensors="pt")
    layers = summary["features"]["layers"]
    with torch.no_grad():
        out = model.backbone(**enc, output_hidden_states=True)
    hidden = out.last_hidden_state if not layers else torch.stack([out.hidden_states[i] for i in layers]).mean(0)
    return pool(hidden, enc["attention_mask"], summary["features"]["pooling"]).numpy()


def test_token_features_export_a_stock_token_head(cfg_for, tmp_path):
    """Per-word features (each word's first sub-token) + logistic regression on generated
    entities: entity F1 well above chance, and final/ is a plain
    LlamaForTokenClassification that tags as the classifier does."""
    summary = features_run(cfg_for, tmp_path, "task=token_classification", "strategy.classifier.C=1.0")
    assert summary["exported_as"] == "head (LlamaForTokenClassification)"
    assert summary["eval/f1"] > 0.5 and summary["features"]["train_rows"] > 160
    from distft.predict import Predictor

    words = [["alice", "flew", "to", "new", "york", "today"], ["nobody", "went", "out"]]
    tags = [r["tags"] for r in Predictor(str(tmp_path / "run" / "final")).predict(words)]
    assert [len(t) for t in tags] == [6, 3]
    from transformers import AutoModelForTokenClassification

    config = AutoModelForTokenClassification.from_pretrained(str(tmp_path / "run" / "final")).config
    assert set(config.id2label.values()) == {"O", "B-person", "I-person", "B-location", "I-location"}


def test_a_classifier_that_cannot_be_a_head_is_saved_with_skops_and_reviewed_on_load(cfg_for, tmp_path):
    summary = features_run(cfg_for, tmp_path, "strategy.classifier._target_=sklearn.neighbors.KNeighborsClassifier",
                           "+strategy.classifier.params.n_neighbors=[3,5]")
    assert summary["exported_as"] == "skops" and summary["search"]["best"]["n_neighbors"] in (3, 5)
    final = tmp_path / "run" / "final"
    assert (final / "classifier.skops").is_file() and (final / "backbone" / "model.safetensors").is_file()
    assert not list(final.rglob("*.pkl")) and not list(final.rglob("*.joblib"))
    inputs = tmp_path / "texts.jsonl"
    inputs.write_text(json.dumps({"text": "the cast was really superb"}) + "\n" + json.dumps({"text": "dull"}) + "\n")
    untrusted = sio.get_untrusted_types(file=str(final / "classifier.skops"))
    cmd = [sys.executable, "-m", "distft.predict", str(final), str(inputs), "--output", str(tmp_path / "out.jsonl")]
    if untrusted:  # without the review it refuses, naming each type
        refused = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        assert refused.returncode == 2 and all(t in refused.stderr for t in untrusted), refused.stderr
        cmd += [arg for t in untrusted for arg in ("--trust", t)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == ["the cast was really superb", "dull"]
    assert all(abs(sum(r["probabilities"]) - 1) < 1e-4 for r in rows)


def test_refusals(cfg_for, tmp_path):
    with pytest.raises(ConfigError, match="strategy=feature fits a classifier on embeddings: it needs"):
        features_run(cfg_for, tmp_path, "task=causal_lm")
    with pytest.raises(ConfigError, match="strategy.layer=1 and strategy.last_k=2: give one"):
        features_run(cfg_for, tmp_path, "strategy.layer=1", "strategy.last_k=2")
    with pytest.raises(ConfigError, match="strategy=feature with privacy=dp"):
        features_run(cfg_for, tmp_path, "privacy=dp")
    with pytest.raises(ConfigError, match="strategy=feature with backend=fsdp"):
        features_run(cfg_for, tmp_path, "backend=fsdp")
    with pytest.raises(ConfigError, match="strategy.classifier.name='forest'"):
        features_run(cfg_for, tmp_path, "strategy.classifier.name=forest")
    with pytest.raises(ConfigError, match="cannot be a stage of experiment=sequential"):
        features_run(cfg_for, tmp_path, "experiment=sequential")


@pytest.mark.slow
def test_two_processes_embed_what_one_does(tmp_path):
    """Under torchrun each rank embeds its share of the batches; rank 0 gathers them in
    example order: the cached features and the fitted classifier equal one process's."""
    args = [*TINY, *FEATURE, "strategy.classifier.C=1.0"]
    run_cli(*args, f"strategy.cache_dir={tmp_path / 'one-cache'}", f"run_dir={tmp_path / 'one'}")
    proc = subprocess.run(torchrun_cmd(2, *args, "backend=ddp", f"strategy.cache_dir={tmp_path / 'two-cache'}",
                                       f"run_dir={tmp_path / 'two'}"),
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr[-4000:]
    from safetensors.torch import load_file

    (one,), (two,) = (list((tmp_path / f"{n}-cache").glob("*.safetensors")) for n in ("one", "two"))
    a, b = load_file(str(one)), load_file(str(two))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5)
    s1, s2 = (json.loads((tmp_path / n / "summary.json").read_text()) for n in ("one", "two"))
    assert s2["processes"] == 2 and s1["eval/accuracy"] == s2["eval/accuracy"]
    assert np.isfinite(s2["eval/loss"])
