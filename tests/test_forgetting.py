"""Guards against forgetting (regularizer=l2sp|ewc|replay): the penalty's exact value and
gradient on 1 and 2 processes, EWC's Fisher against a hand computation, replay's buffer,
resume after SIGKILL mid-stage, and the refusals."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, TINY, compose_cfg, losses, read_metrics, run_cli, run_torchrun, wait_for_step
from test_sequential import stages_args

STEPS = 8
COMMON = [*TINY, "task=classification", f"trainer.max_steps={STEPS}", "trainer.lr=3e-3", "trainer.eval_every=4",
          "trainer.save_every=0"]


@pytest.fixture(scope="module")
def ewc_estimate(tmp_path_factory):
    """A finished classification run with regularizer=ewc: its ewc.safetensors is what a
    next stage gets (inputs.ewc)."""
    from distft.train import run as train

    run_dir = tmp_path_factory.mktemp("ewc") / "run"
    summary = train(compose_cfg(run_dir, [*COMMON, "regularizer=ewc", "regularizer.fisher_examples=null"]))
    return run_dir, summary


def test_ewc_fisher_is_the_mean_of_per_example_squared_gradients(ewc_estimate, cfg_for):
    """The saved Fisher equals a hand computation: each training example alone through the
    trained model (eval mode), its loss backpropagated, the squared gradients averaged.
    The anchor is the exported weights, and no head is in it."""
    from distft.trainer import Trainer

    run_dir, summary = ewc_estimate
    assert summary["artifacts"]["ewc"] == str(run_dir / "ewc.safetensors")
    saved = load_file(summary["artifacts"]["ewc"])
    names = sorted(k[len("fisher."):] for k in saved if k.startswith("fisher."))
    assert names and not any("score" in n or "classifier" in n for n in names)

    trainer = Trainer(compose_cfg(run_dir.parent / "again", [*COMMON, "trainer.max_steps=1",
                                                            f"init_from={summary['artifacts']['weights']}"])).setup()
    model = trainer.model.eval()
    params = dict(model.named_parameters())
    hand = {n: torch.zeros_like(params[n]) for n in names}
    for example in trainer.train_examples:
        batch = trainer.task.collate([example])
        model.zero_grad()
        trainer.task.loss_sum(model(**trainer.task.model_kwargs(batch)).logits, batch).backward()
        for n in names:
            hand[n] += params[n].grad ** 2
    exported = load_file(str(run_dir / "final" / "model.safetensors"))
    for n in names:
        torch.testing.assert_close(saved[f"fisher.{n}"], hand[n] / len(trainer.train_examples), rtol=1e-4, atol=1e-10)
        torch.testing.assert_close(saved[f"anchor.{n}"], exported[n])
    assert max(float(saved[f"fisher.{n}"].max()) for n in names) > 0


def _penalty_args(kind, ewc_estimate):
    """L2-SP from the start; EWC as a second stage would run it, from the first run's
    weights and Fisher."""
    if kind == "l2sp":
        return ["regularizer=l2sp", "regularizer.strength=2.0"]
    artifacts = ewc_estimate[1]["artifacts"]
    return ["regularizer=ewc", "regularizer.strength=5000", f"+inputs.ewc={artifacts['ewc']}",
            f"init_from={artifacts['weights']}"]


@pytest.mark.parametrize("kind", ["l2sp", "ewc"])
def test_zero_strength_leaves_the_losses_bit_identical(kind, ewc_estimate, reference):
    args = _penalty_args(kind, ewc_estimate)
    start = [a for a in args if a.startswith("init_from")]
    plain = losses(reference(*COMMON, *start))
    zero = losses(reference(*COMMON, *args, "regularizer.strength=0"))
    assert zero == plain  # bit-identical, every step
    pulled = losses(reference(*COMMON, *args))
    assert pulled[1] == plain[1] and pulled[STEPS] != plain[STEPS], "a nonzero strength changes the training"
    # Counted twice (what the 2-process test guards against), the losses move well beyond
    # that test's tolerance.
    strength = float(next(a for a in args if a.startswith("regularizer.strength=")).split("=")[1])
    doubled = losses(reference(*COMMON, *args, f"regularizer.strength={2 * strength}"))
    assert max(abs(doubled[s] / pulled[s] - 1) for s in pulled) > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("kind,backend", [("l2sp", "ddp"), ("l2sp", "fsdp"), ("ewc", "ddp")])
def test_two_processes_count_the_penalty_once(kind, backend, ewc_estimate, reference, tmp_path):
    """Each rank adds R / N and the gradient exchange sums: 2 processes give the losses of 1
    (counted twice, the pulled weights would drift apart from step 2 on)."""
    args = [*COMMON, *_penalty_args(kind, ewc_estimate)]
    one = losses(reference(*args))
    two = tmp_path / "two"
    run_torchrun(2, *args, f"backend={backend}", "trainer.batch_size=4", f"run_dir={two}")
    got = losses(two)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in one:
        assert got[step] == pytest.approx(one[step], rel=1e-4), f"step {step}"


@pytest.mark.slow
def test_sigkill_mid_stage_then_resume(tmp_path, reference):
    """A sequential EWC run killed in its second stage and started again goes on from that
    stage's checkpoint (its Fisher from stage 1 read again) with the uninterrupted losses."""
    args = [*TINY, *stages_args(tmp_path), "trainer.max_steps=12", "trainer.lr=3e-3", "trainer.save_every=3",
            "model.dropout=0.1", "regularizer=ewc", "regularizer.strength=1000"]
    ref = reference(*args)
    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "distft.train", *args, f"run_dir={cut}"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stage2 = cut / "stages" / "2-color"
    try:
        while proc.poll() is None and not (stage2 / "metrics.jsonl").exists():
            pass
        wait_for_step(proc, stage2, 7)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (stage2 / "summary.json").exists(), "stage 2 finished before it could be killed"
    run_cli(*args, f"run_dir={cut}")
    want, got = losses(ref / "stages" / "2-color"), losses(stage2)
    assert sorted(got) == list(range(1, 13))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-7), f"step {step}"
    assert json.loads((cut / "forgetting.json").read_text())["matrix"] == \
        json.loads((ref / "forgetting.json").read_text())["matrix"]


def test_replay_trains_a_seeded_buffer_of_the_earlier_stage(tmp_path):
    run = tmp_path / "run"
    run_cli(*TINY, *stages_args(tmp_path), "trainer.max_steps=6", "regularizer=replay", "regularizer.size=30",
            f"run_dir={run}")
    report = json.loads((run / "stages" / "2-color" / "data_report.json").read_text())
    assert report["mixture"]["sizes"] == [30, 120], "30 examples of stage 1 train again in stage 2"
    batches = [e for e in read_metrics(run / "stages" / "2-color") if "loss" in e]
    assert len(batches) == 6

    from omegaconf import OmegaConf

    from distft.config import DataConfig
    from distft.data import load_records

    def buffer(seed, **kw):
        cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), {"name": "files", "train": str(tmp_path / "sent_train.jsonl"),
                                                                 "validation": str(tmp_path / "sent_val.jsonl"), **kw})
        return [r["text"] for r in load_records(cfg, "classification", seed)[0]]

    first = buffer(0, sample_train_examples=30)
    assert len(first) == 30 and first == buffer(0, sample_train_examples=30) and first != buffer(1, sample_train_examples=30)
    assert len(buffer(0, sample_train_fraction=0.25)) == 30
    assert set(buffer(0, max_train_examples=40, sample_train_examples=30)) <= set(buffer(0, max_train_examples=40))


@pytest.mark.parametrize("extra,needle", [
    (["regularizer=ewc", "backend=fsdp"], "FSDP holds only shards"),
    (["regularizer=l2sp", "backend=zero2"], "DeepSpeed owns the parameters"),
    (["regularizer=l2sp", "regularizer.strength=-1"], "must be >= 0"),
    (["regularizer=replay"], "needs experiment=sequential"),
    (["regularizer=replay", "regularizer.fraction=0.1"], "one of them"),
    (["regularizer=ewc", "regularizer.decay=2"], "regularizer.decay"),
    (["regularizer=ewc", "+inputs.ewc=/nonexistent/ewc.safetensors"], "no such file"),
])
def test_refusals(tmp_path, extra, needle):
    proc = run_cli(*COMMON, *extra, f"run_dir={tmp_path / 'r'}", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert needle in proc.stderr
