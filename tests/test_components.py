"""The loop's seams: every registered sampler, regularizer, privacy choice and strategy
under one shared contract (registering a new one puts it under these tests), and the
loop's own guarantees around them: a penalty that is zero changes nothing, a non-finite
step is skipped and a diverging run stops, old checkpoints still resume."""
import json
import math
import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
import component_plugins  # noqa: E402,F401  (registers zero_penalty and nan_at, as a user's plugin would)
from conftest import ROOT, TINY, compose_cfg, losses, read_metrics, torchrun_cmd  # noqa: E402

from distft.errors import ConfigError  # noqa: E402
from distft.multitask import MixtureOrder  # noqa: E402
from distft.privacy import PRIVACY  # noqa: E402
from distft.regularizers import REGULARIZERS  # noqa: E402
from distft.samplers import SAMPLERS  # noqa: E402
from distft.strategies import build_strategy, registered_strategies  # noqa: E402
from distft.strategies.base import TaskInfo, declared_heads  # noqa: E402
from distft.train import run as train  # noqa: E402

PLUGIN = ["plugins=[component_plugins]"]
PLUGIN_ENV = {"PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}


def fake_run(n=50, batch_size=4, grad_accum=2, rank=0, world_size=1, seed=3):
    """What a sampler reads of the Trainer, without a model."""
    cfg = OmegaConf.create({"seed": seed, "trainer": {"batch_size": batch_size, "grad_accum": grad_accum}})
    task = SimpleNamespace(order=lambda s: MixtureOrder([0, 30], [30, n - 30], [0.25, 0.75], s))
    return SimpleNamespace(cfg=cfg, train_examples=list(range(n)), task=task, step=0,
                           backend=SimpleNamespace(rank=rank, world_size=world_size))


@pytest.mark.parametrize("name", SAMPLERS.names())
def test_sampler_contract(name):
    cls = SAMPLERS.get(name)
    a = cls(None)
    a.setup(fake_run())
    assert a.steps_per_epoch >= 1
    for _ in range(4):
        step = a.next_step()
        # Micro-batches of at most trainer.batch_size valid examples; grad_accum of them a
        # step, unless the sampler's batches vary by design (Poisson sampling).
        assert all(step) and all(len(mb) <= 4 for mb in step) and all(0 <= i < 50 for mb in step for i in mb)
        assert len(step) == 2 or cls.variable_batch
    progress = a.epoch_progress()
    assert progress > 0
    # Its state (JSON, as the checkpoint keeps it) continues the very same order.
    state = json.loads(json.dumps(a.state_dict()))
    b = cls(None)
    b.setup(fake_run())
    b.load_state_dict(state)
    assert b.epoch_progress() == progress
    assert [b.next_step() for _ in range(12)] == [a.next_step() for _ in range(12)]
    # Two processes split each global micro-batch of the one-process order between them.
    one = cls(None)
    one.setup(fake_run(batch_size=4, grad_accum=1))
    ranks = [cls(None) for _ in range(2)]
    for r, s in enumerate(ranks):
        s.setup(fake_run(batch_size=2, grad_accum=1, rank=r, world_size=2))
    for _ in range(5):
        whole = [i for mb in one.next_step() for i in mb]
        parts = [[i for mb in s.next_step() for i in mb] for s in ranks]
        assert sorted(parts[0] + parts[1]) == sorted(whole) and not set(parts[0]) & set(parts[1])


@pytest.mark.parametrize("name", REGULARIZERS.names())
def test_regularizer_contract(name, cfg_for, tmp_path):
    """Checked, set up and asked for its penalty and artifacts by a real (tiny) run, as the
    loop does; its penalty is a scalar in the graph of the parameters; its state survives
    JSON. A sequential-only choice (replay) is checked inside a sequential experiment."""
    from distft.trainer import Trainer

    stages = ["experiment=sequential"] if name == "replay" else []
    # distft's own have a conf/regularizer file; the test plugins' are chosen by name
    choose = [f"regularizer={name}"] if (ROOT / "conf" / "regularizer" / f"{name}.yaml").is_file() \
        else [*PLUGIN, f"regularizer.name={name}"]
    cfg = cfg_for(*choose, *stages, "task=classification", "trainer.max_steps=2")
    reg = REGULARIZERS.build(cfg.regularizer)
    reg.check(cfg)
    if stages:  # what a stage's mixture becomes (distft/sequential.py)
        tasks = {"a": {"data": {}, "task": {}, "train": False}, "b": {"data": {}, "task": {}, "train": True}}
        reg.stage_data(tasks, 1)
        assert all(t["train"] for t in tasks.values())
        return
    run = Trainer(cfg).setup()
    reg.setup(run)
    module = run.backend.unwrap(run.model)
    penalty = reg.penalty(run.model, module)
    if penalty is not None:
        assert penalty.ndim == 0 and torch.isfinite(penalty)
        penalty.backward()  # it is in the graph of the parameters
        assert any(p.grad is not None for p in module.parameters())
    state = json.loads(json.dumps(reg.state_dict()))
    REGULARIZERS.build(cfg.regularizer).load_state_dict(state)
    run.train()
    assert isinstance(reg.artifacts(run), dict)


@pytest.mark.parametrize("name", PRIVACY.names())
def test_privacy_contract(name, cfg_for):
    """Built, checked and set up as the Trainer does (with the sampler it asks for), it
    decorates a model and an optimizer that then take a step through a backend; its
    metrics are numbers and its state survives JSON."""
    from distft.backends.single import SingleBackend

    cfg = cfg_for(f"privacy={name}")
    privacy = PRIVACY.build(cfg.privacy)
    privacy.check(cfg)
    sampler = SAMPLERS.get(privacy.sampler("epoch"))(cfg)
    backend = SingleBackend(None)
    run = SimpleNamespace(cfg=cfg, train_examples=list(range(200)), backend=backend, device=torch.device("cpu"),
                          main=True, step=0, max_steps=4)
    sampler.setup(run)
    run.sampler = sampler
    privacy.setup(run)
    model = torch.nn.Linear(3, 2)
    before = model.weight.detach().clone()
    wrapped, optimizer = backend.wrap(privacy.wrap_model(model),
                                      privacy.optimizer_factory(lambda m: torch.optim.SGD(m.parameters(), lr=0.1)))
    assert isinstance(optimizer, torch.optim.Optimizer)
    for last in (False, True):
        losses = wrapped(torch.randn(5, 3)).pow(2).sum(1)
        if privacy.per_example:
            privacy.backward(losses, optimizer, last)
        else:
            backend.backward(losses.sum())
    _, stepped = backend.step(wrapped, optimizer, 1.0)
    assert stepped and not torch.equal(model.weight, before)
    assert all(isinstance(v, float) for v in privacy.metrics().values())
    state = json.loads(json.dumps(privacy.state_dict()))
    privacy.load_state_dict(state)
    assert privacy.state_dict() == state


@pytest.mark.parametrize("name", registered_strategies())
@pytest.mark.parametrize("predicts", ["next_tokens", "label", "token_labels"])
def test_strategy_contract(name, predicts, cfg_for, tmp_path):
    """Every strategy serves every kind of head: something trains, the task's declared
    head trains, and the export writes a folder. A strategy that runs as its own recipe
    (not the gradient loop) refuses the loop, and at config time what it cannot serve."""
    from distft.errors import ConfigError
    from distft.models import load_model, load_tokenizer

    cfg = cfg_for(f"strategy={name}")
    strategy = build_strategy(cfg.strategy)
    info = TaskInfo("t", None if predicts == "next_tokens" else 3, predicts)
    if getattr(strategy, "recipe", None):
        from distft.recipes import RECIPES, recipe_name

        assert recipe_name(cfg) == strategy.recipe and strategy.recipe in RECIPES
        if predicts == "next_tokens":
            with pytest.raises(ConfigError):
                strategy.check(info)
            return
        strategy.check(info)
        with pytest.raises(ConfigError, match="own recipe"):
            strategy.apply(load_model(cfg.model, predicts, load_tokenizer(cfg.model, None), 3), info)
        return
    strategy.check(info)
    tokenizer = load_tokenizer(cfg.model, None)
    model = strategy.apply(load_model(cfg.model, predicts, tokenizer, info.num_labels), info)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    if predicts != "next_tokens":
        assert any(p.requires_grad for p in declared_heads(model)) or any("modules_to_save" in n for n in trainable)
    assert strategy.export(model, str(tmp_path / "out"), None)


def test_unknown_choices_name_what_is_registered(cfg_for):
    from distft.trainer import check_config

    with pytest.raises(ConfigError, match=r"regularizer='bogus' is unknown; registered: \[.*'none'"):
        check_config(cfg_for("regularizer.name=bogus"))
    with pytest.raises(ConfigError, match="plugins: cannot import 'no_such_module'"):
        check_config(cfg_for("plugins=[no_such_module]"))
    with pytest.raises(ConfigError, match="optimizer: cannot build torch.optim.Nope"):
        train(cfg_for("optimizer._target_=torch.optim.Nope", "trainer.max_steps=1"))


def test_zero_penalty_leaves_losses_bit_identical_and_its_state_is_checkpointed(tmp_path, reference):
    args = [*TINY, "trainer.max_steps=6", "trainer.save_every=3", "trainer.keep_checkpoints=0"]
    ref = reference(*args)
    got = tmp_path / "zero"
    train(compose_cfg(got, [*args, *PLUGIN, "regularizer.name=zero_penalty"]))
    assert losses(got) == losses(ref)  # exactly: adding 0 changes no bit
    assert {e["penalty"] for e in read_metrics(got) if "penalty" in e} == {0.0}
    a, b = (load_file(str(d / "final" / "model.safetensors")) for d in (ref, got))
    assert all(torch.equal(a[k], b[k]) for k in a)
    state = json.loads((got / "checkpoints" / "step-3" / "state.json").read_text())
    assert state["components"]["regularizer"] == {"calls": 3}
    assert state["components"]["sampler"]["batch"] == 3
    # Resumed, the component continues from its checkpointed state.
    again = tmp_path / "again"
    summary = train(compose_cfg(again, [*args, *PLUGIN, "regularizer.name=zero_penalty",
                                        f"resume={got / 'checkpoints' / 'step-3'}"]))
    assert summary["steps"] == 6
    assert json.loads((again / "checkpoints" / "step-6" / "state.json").read_text())["components"]["regularizer"] == \
        {"calls": 6}
    assert {s: v for s, v in losses(again).items()} == {s: v for s, v in losses(ref).items() if s > 3}


def test_checkpoint_from_before_components_resumes(tmp_path, reference):
    """A checkpoint written before the loop had components kept the data position as the
    trainer's own epoch/batch; it resumes to the same losses."""
    args = [*TINY, "trainer.max_steps=6", "trainer.save_every=3", "trainer.keep_checkpoints=0"]
    ref = reference(*args)
    old = tmp_path / "old-step-3"
    shutil.copytree(ref / "checkpoints" / "step-3", old)
    state = json.loads((old / "state.json").read_text())
    sampler = state.pop("components")["sampler"]
    for key in ("bad_steps", "skipped_steps"):
        state.pop(key)
    state.update(sampler)  # {"epoch": .., "batch": ..} at the top, as before
    (old / "state.json").write_text(json.dumps(state))
    got = tmp_path / "got"
    train(compose_cfg(got, [*args, f"resume={old}"]))
    ref_losses = losses(ref)
    assert losses(got) == {s: ref_losses[s] for s in (4, 5, 6)}


def _check_nan_run(run_dir, ref_losses, skipped_step, stop_from):
    """Skipped: the weights and optimizer state of `skipped_step` equal the step before;
    the run went on; it stopped after max_bad_steps=2 bad steps from `stop_from`, leaving
    finite checkpoints only."""
    ckpts = run_dir / "checkpoints"
    events = {e["step"]: e for e in read_metrics(run_dir) if "loss" in e}
    for s in range(1, skipped_step):
        assert events[s]["loss"] == pytest.approx(ref_losses[s], rel=1e-6)
    # The penalty made the gradient NaN (the logged loss is the task's own)
    assert math.isnan(events[skipped_step]["grad_norm"]) and events[skipped_step]["skipped_steps"] == 1
    assert events[skipped_step - 1]["skipped_steps"] == 0
    before, skipped = ckpts / f"step-{skipped_step - 1}", ckpts / f"step-{skipped_step}"
    wa, wb = (load_file(str(d / "weights.safetensors")) for d in (before, skipped))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    oa, ob = (torch.load(d / "optimizer.pt", weights_only=True)["optimizer"]["state"] for d in (before, skipped))
    assert all(torch.equal(oa[i][k], ob[i][k]) for i in oa for k in oa[i])
    after = load_file(str((ckpts / f"step-{skipped_step + 1}" / "weights.safetensors")))
    assert not all(torch.equal(wb[k], after[k]) for k in wb)  # the run went on training
    assert all(math.isfinite(events[s]["loss"]) for s in range(skipped_step + 1, stop_from))
    assert max(events) == stop_from + 1  # the second bad step in a row stops it
    newest = max(int(d.name.split("-")[1]) for d in ckpts.glob("step-*"))
    assert newest == stop_from  # the stopping step writes nothing
    weights = load_file(str(ckpts / f"step-{newest}" / "weights.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert not (run_dir / "summary.json").exists()


NAN_ARGS = [*TINY, *PLUGIN, "trainer.max_steps=10", "trainer.save_every=1", "trainer.keep_checkpoints=0",
            "trainer.max_bad_steps=2", "regularizer.name=nan_at", "+regularizer.steps=[3]", "+regularizer.from_step=6"]


def test_non_finite_steps_are_skipped_and_a_diverging_run_stops(tmp_path, reference):
    from distft.trainer import DivergedError

    ref = reference(*TINY, "trainer.max_steps=10")
    with pytest.raises(DivergedError, match=r"steps 6\.\.7: 2 optimizer steps in a row had a non-finite loss"):
        train(compose_cfg(tmp_path / "run", NAN_ARGS))
    _check_nan_run(tmp_path / "run", losses(ref), skipped_step=3, stop_from=6)


def test_non_finite_loss_on_one_rank_is_skipped_on_every_rank(tmp_path, reference):
    import subprocess

    ref = reference(*TINY, "trainer.max_steps=10", "trainer.batch_size=4", "backend=ddp", nproc=2)
    run = tmp_path / "run"
    proc = subprocess.run(torchrun_cmd(2, *NAN_ARGS, "trainer.batch_size=4", "backend=ddp", "+regularizer.rank=0",
                                       f"run_dir={run}"), cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **PLUGIN_ENV})
    assert proc.returncode != 0 and "2 optimizer steps in a row had a non-finite loss" in proc.stderr
    _check_nan_run(run, losses(ref), skipped_step=3, stop_from=6)


def test_an_eval_hook_sees_every_eval_and_can_stop_the_run(cfg_for):
    """on_eval(step, metrics): the one hook early stopping, the best weights and a search's
    pruner share."""
    from distft.trainer import Trainer

    trainer = Trainer(cfg_for("trainer.max_steps=10", "trainer.eval_every=2")).setup()
    seen = []
    trainer.add_eval_hook(lambda step, metrics: seen.append((step, metrics["loss"])) or step >= 4)
    summary = trainer.train()
    assert [s for s, _ in seen] == [2, 4] and summary["steps"] == 4 and summary["stopped_early"]
    assert summary["objective"] == summary["eval/loss"] == seen[-1][1]
    assert summary["objective_direction"] == "minimize"


@pytest.mark.parametrize("name", sorted(__import__("distft.backends", fromlist=["BACKENDS"]).BACKENDS))
def test_backend_declares_known_capabilities(name):
    """What the loop and the components ask of a backend is a declared capability, never
    its name (test_distributed.py runs every registered backend for parity and resume)."""
    from distft.backends import backend_class
    from distft.backends.base import FEATURES

    caps = backend_class(name).capabilities(name)
    assert caps <= set(FEATURES), caps - set(FEATURES)
