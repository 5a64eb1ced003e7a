"""The benchmark scripts' smoke modes run end to end and say something true: the same work
through transformers.Trainer and distft reaches the same held-out loss."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT, shared_data

pytestmark = pytest.mark.slow


def test_vs_hf_trainer_quick(tmp_path):
    shared_data("alpaca")  # skips when ../shared is absent
    proc = subprocess.run([sys.executable, "bench/vs_hf_trainer.py", "--quick", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    data = json.loads((tmp_path / "vs_hf_trainer.json").read_text())
    mean = data["mean"]
    assert {m["runner"] for m in mean.values()} == {"hf", "distft"} and len(mean) == 14
    for name, m in mean.items():
        assert m["tokens_per_second"] > 0 and m["peak_rss_mb"] > 0, name
    runs = {r["name"]: r for r in data["runs"]}
    # The same examples and steps: both runners train on the same rows and end at the
    # same held-out loss.
    for strategy in ("lora", "full"):
        hf, d = runs[f"hf-tiny-{strategy}-padded-fp32"], runs[f"distft-tiny-{strategy}-padded-fp32"]
        assert hf["rows"] == d["rows"] >= 60  # of 64 read; cleaning drops the same ones
        assert d["heldout_loss"] == pytest.approx(hf["heldout_loss"], rel=0.01)
    # Activation checkpointing recomputes the same numbers (dropout masks included): the
    # same training losses, on both runners.
    for runner, strategy in (("distft", "lora"), ("hf", "lora"), ("distft", "full")):
        plain, ac = runs[f"{runner}-tiny-{strategy}-padded-fp32"], runs[f"{runner}-tiny-{strategy}-padded-fp32-ac"]
        assert ac["train_loss"] == pytest.approx(plain["train_loss"], rel=1e-4), (runner, strategy)
    share = lambda r: 1 - r["tokens"] / r["padded_tokens"]  # noqa: E731
    assert share(runs["distft-tiny-lora-packed-fp32"]) < share(runs["distft-tiny-lora-padded-fp32"]), \
        "packed rows hold less padding"
    md = (tmp_path / "BENCHMARKS.md").read_text()
    assert "distft LoRA / full fine-tuning peak memory, both with activation checkpointing" in md and "python bench/vs_hf_trainer.py --quick" in md
    assert (tmp_path / "vs_hf_trainer.png").stat().st_size > 5000


def test_mfu_quick(tmp_path):
    shared_data("alpaca")
    proc = subprocess.run([sys.executable, "bench/mfu.py", "--quick", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    data = json.loads((tmp_path / "mfu.json").read_text())
    assert data["peak_gflops"]["fp32"] > 1 and data["peak_gflops"]["bf16"] > 1
    assert [r["case"] for r in data["rows"]] == ["full padded fp32", "full padded bf16", "lora packed bf16"]
    for r in data["rows"]:
        assert 0 < r["mfu"] < 1, r
    assert "Model FLOPs utilisation" in (tmp_path / "BENCHMARKS.md").read_text()
