"""Sequential fine-tuning: stages start from the previous stage's weights, and every
earlier task is evaluated after each stage (the forgetting matrix)."""
import json

import pytest
from safetensors.torch import load_file

from conftest import TINY, read_metrics, run_cli
from test_multitask import write_tasks


def stages_args(tmp_path):
    write_tasks(tmp_path)
    return [
        "experiment=sequential", "task=classification",
        f"experiment.stages=[{{name: sent, data: {{train: {tmp_path / 'sent_train.jsonl'}, "
        f"validation: {tmp_path / 'sent_val.jsonl'}}}}}, "
        f"{{name: color, data: {{train: {tmp_path / 'color_train.jsonl'}, "
        f"validation: {tmp_path / 'color_val.jsonl'}, text_field: sentence}}, overrides: ['trainer.lr=2e-3']}}]",
    ]


def test_two_stages_report_the_forgetting_matrix(tmp_path):
    run = tmp_path / "run"
    proc = run_cli(*TINY, *stages_args(tmp_path), "trainer.max_steps=30", "trainer.lr=3e-3",
                   f"run_dir={run}")
    result = json.loads((run / "forgetting.json").read_text())
    assert result["tasks"] == ["sent", "color"] and result["metric"] == "accuracy"
    (a11, a12), (a21, a22) = result["matrix"]
    assert a12 is None and None not in (a11, a21, a22)
    assert a11 > 0.8, "stage 1 learns its task"
    assert result["forgetting"]["sent"] == pytest.approx(a11 - a21)
    assert (run / "forgetting.png").stat().st_size > 1000
    top = json.loads((run / "summary.json").read_text())
    assert top["drop"] == result["forgetting"] and top["new_task"] == "color"
    assert top["new_task_accuracy"] == pytest.approx(a22) and top["regularizer"]["name"] == "none"
    assert "forgetting matrix" in proc.stdout + proc.stderr

    stage1, stage2 = run / "stages" / "1-sent", run / "stages" / "2-color"
    # Stage 2 trained only on its own data, evaluated both, and started from stage 1's
    # encoder: its first step's weights are not a fresh init.
    ev = [e for e in read_metrics(stage2) if "eval/accuracy" in e][-1]
    assert ev["eval/sent/accuracy"] == pytest.approx(a21) and ev["eval/color/accuracy"] == pytest.approx(a22)
    report = json.loads((stage2 / "data_report.json").read_text())
    assert report["mixture"]["sizes"] == [0, 120]
    cfg2 = (stage2 / "config.yaml").read_text()
    assert "init_from: " + str(stage1) in cfg2 and "lr: 0.002" in cfg2
    first = load_file(str(stage1 / "checkpoints" / "step-30" / "weights.safetensors"))
    assert any(k.startswith("heads.0") for k in first) and not any(k.startswith("heads.1") for k in first)
    assert (stage2 / "final" / "sent" / "config.json").is_file() and (stage2 / "final" / "color").is_dir()

    # The last stage's model cards (the export root and each task's folder) hold the matrix.
    cards = sorted((stage2 / "final").rglob("README.md"))
    assert len(cards) == 3
    for card in cards:
        text = card.read_text()
        assert text.startswith("---\n") and f"| sent | {a11:.4f} |  |" in text, card
        assert f"| color | {a21:.4f} | {a22:.4f} |" in text and text.index("## Forgetting") < text.index("## Configuration")

    # Run again: finished stages are not trained again, and each card keeps one matrix.
    again = run_cli(*TINY, *stages_args(tmp_path), "trainer.max_steps=30", "trainer.lr=3e-3",
                    f"run_dir={run}")
    assert "already finished" in again.stdout + again.stderr
    assert (stage2 / "final" / "README.md").read_text().count("## Forgetting") == 1


def test_empty_stages_refused(tmp_path):
    proc = run_cli(*TINY, "experiment=sequential", "task=classification", f"run_dir={tmp_path / 'r'}", check=False)
    assert proc.returncode == 2 and "experiment.stages is empty" in proc.stderr


def test_a_stage_hands_the_next_its_artifacts(tmp_path):
    """Weights and the regularizer's artifacts (a plugin's note here; EWC's Fisher later)
    pass from one stage to the next, and the summary carries the objective."""
    import os
    import sys

    from conftest import compose_cfg
    from distft.train import run as train

    sys.path.insert(0, os.path.dirname(__file__))
    run = tmp_path / "run"
    summary = train(compose_cfg(run, [*TINY, *stages_args(tmp_path), "trainer.max_steps=4",
                                      "plugins=[component_plugins]", "regularizer.name=leaves_note"]))
    first, second = run / "stages" / "1-sent", run / "stages" / "2-color"
    note1 = json.loads((first / "note.json").read_text())
    note2 = json.loads((second / "note.json").read_text())
    assert note1["received"] == {} and note2["received"] == {"note": str(first / "note.json")}
    s1 = json.loads((first / "summary.json").read_text())
    assert s1["artifacts"] == {"weights": str(first / "checkpoints" / "step-4"), "note": str(first / "note.json")} \
        or s1["artifacts"]["weights"] == str(first / "best")
    import yaml

    assert yaml.safe_load((second / "config.yaml").read_text())["init_from"] == s1["artifacts"]["weights"]
    assert summary["objective"] == summary["eval/color/accuracy"] and summary["objective_direction"] == "maximize"
