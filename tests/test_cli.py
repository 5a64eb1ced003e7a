"""The README's default run through the real CLI: progress, loss, eval metric, outputs."""
import json

import pytest

from conftest import read_metrics, run_cli

pytestmark = pytest.mark.slow


def test_default_run_end_to_end(tmp_path):
    run_dir = tmp_path / "default"
    proc = run_cli(f"run_dir={run_dir}", env={"WANDB_SILENT": "false"})
    out = proc.stdout + proc.stderr
    assert "train: 100%" in out, "a progress bar"
    assert "eval/loss=" in out and "loss=" in out
    assert f"model in {run_dir}/final" in out
    # The default precision follows the hardware and says so (test_precision.py fakes both kinds).
    from distft.precision import native_bf16_here

    picked = "bf16" if native_bf16_here()[0] else "fp32"
    assert f"precision auto -> {picked}: " in out

    for name in ("config.yaml", "metrics.jsonl", "summary.json", "plots/curves.png", "final/model.safetensors",
                 "final/tokenizer.json"):
        assert (run_dir / name).is_file(), name
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and any(offline[0].rglob("*.wandb")), "an offline W&B run"

    events = read_metrics(run_dir)
    train = [e["loss"] for e in events if "loss" in e]
    evals = [e["eval/loss"] for e in events if "eval/loss" in e]
    assert len(train) == 125  # 2,000 generated examples, batch 16, one epoch
    assert sum(train[-10:]) / 10 < 0.5 * sum(train[:10]) / 10
    assert evals[-1] < evals[0]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["trainable_params"] == summary["total_params"] > 0
    assert summary["tokens_per_second"] > 0 and summary["precision"] == picked
    # CPU: the resident set's high-water mark since training began, above the process's bare imports
    assert summary["memory_kind"] == "cpu_peak_rss" and summary["peak_memory_mb_per_process"][0] > 200


def test_csv_and_tensorboard_loggers_and_lora_override(tmp_path):
    run_dir = tmp_path / "lora"
    run_cli(f"run_dir={run_dir}", "strategy=lora", "logger=[csv,tensorboard]", "trainer.max_steps=5",
            "trainer.eval_every=2", "task=classification", "trainer.precision=fp32")
    assert (run_dir / "metrics.csv").read_text().startswith("step,")
    assert not (run_dir / "wandb").exists()
    # TensorBoard's own event reader finds every logged scalar at its step.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    events = read_metrics(run_dir)
    for key in ("loss", "lr", "eval/accuracy", "eval/loss"):
        logged = [(e["step"], e[key]) for e in events if key in e]
        assert logged and [(s.step, s.value) for s in board.Scalars(key)] == [
            (step, pytest.approx(value, rel=1e-6)) for step, value in logged], key
    assert (run_dir / "final" / "adapter_config.json").is_file()
    assert (run_dir / "base_model" / "config.json").is_file()


@pytest.mark.realmodel
def test_quickstart_fine_tunes_minilm_on_the_bundled_reviews(tmp_path):
    """`bash scripts/train.sh`'s run (conf/quickstart.yaml), as the README shows it: the real
    MiniLM on the 800 bundled review sentences, evaluated before and after."""
    run_dir = tmp_path / "quickstart"
    proc = run_cli("--config-name", "quickstart", f"run_dir={run_dir}", "trainer.precision=fp32",
                   "logger=csv", "logger.progress_bar=false")
    out = proc.stdout + proc.stderr
    events = read_metrics(run_dir)
    assert events[0]["step"] == 0 and "loss" not in events[0], "the starting weights are evaluated first"
    before, after = events[0]["eval/accuracy"], events[-1]["eval/accuracy"]
    assert before < 0.7 and after >= 0.85, (before, after)
    assert f"eval/accuracy: {before:.4f} before training -> {after:.4f} after" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["before"]["accuracy"] == before and summary["steps"] == 50  # 800 examples, batch 16
    card = (run_dir / "final" / "README.md").read_text()
    assert f"| accuracy | {before:.4f} | {after:.4f} |" in card
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(run_dir / "final", trust_remote_code=True)
    assert model.config.num_labels == 2
