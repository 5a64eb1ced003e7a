"""The loop: accumulation equals one large batch, determinism, early stopping, best weights."""
import json

import pytest
import torch

from distft.models import choose_attn_implementation
from distft.trainer import EpochBatches, Trainer


def step_losses(trainer):
    return [e["loss"] for e in trainer.metrics.history if "loss" in e]


def test_grad_accum_matches_one_large_batch(cfg_for, tmp_path):
    """batch 8 x accum 1 and batch 4 x accum 2 see the same examples per step and, with the
    loss normalised over all target tokens of the step (not per micro-batch), take the same
    steps, although the micro-batches hold different numbers of tokens."""
    common = ["trainer.max_steps=6", "trainer.lr=3e-3", "trainer.eval_every=0", "trainer.max_grad_norm=0"]
    a = Trainer(cfg_for(*common, "trainer.batch_size=8", "trainer.grad_accum=1")).setup()
    a.train()
    la = step_losses(a)
    b_cfg = cfg_for(*common, "trainer.batch_size=4", "trainer.grad_accum=2")
    b_cfg.run_dir = str(tmp_path / "accum")
    b = Trainer(b_cfg).setup()
    b.train()
    lb = step_losses(b)
    assert la == pytest.approx(lb, rel=1e-5)
    for (na, pa), (nb, pb) in zip(a.model.named_parameters(), b.model.named_parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=na)


def test_same_seed_same_run_other_seed_other_run(cfg_for, tmp_path):
    runs = []
    for i, seed in enumerate([1, 1, 2]):
        cfg = cfg_for("trainer.max_steps=4", f"seed={seed}", "model.dropout=0.1")
        cfg.run_dir = str(tmp_path / f"r{i}")
        t = Trainer(cfg).setup()
        t.train()
        runs.append(step_losses(t))
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_epoch_batches_cover_every_example_once_per_epoch():
    batches = EpochBatches(10, 4, seed=3)
    stream = batches.from_position(0, 0)
    epoch0 = [next(stream) for _ in range(batches.per_epoch)]
    assert sorted(i for _, _, idx in epoch0 for i in idx) == list(range(10))
    # Resuming at (0, 1) yields exactly what followed the first batch.
    resumed = batches.from_position(0, 1)
    assert [next(resumed)[2] for _ in range(2)] == [epoch0[1][2], epoch0[2][2]]
    assert next(stream)[0] == 1  # then the next epoch, reshuffled


def test_early_stopping_and_best_weights(cfg_for):
    """lr=0 never improves the eval metric: the run stops after `patience` evals and exports
    the weights of the best (first) eval."""
    cfg = cfg_for("task=classification", "trainer.max_steps=20", "trainer.lr=0", "trainer.eval_every=2",
                  "trainer.early_stopping.patience=2")
    t = Trainer(cfg).setup()
    summary = t.train()
    assert summary["stopped_early"] is True
    assert summary["steps"] == 6  # evals at 2 (best), 4 and 6 (no improvement) -> stop
    assert summary["best_step"] == 2
    best = json.loads((t.run_dir / "best" / "state.json").read_text())
    assert best["step"] == 2
    assert (t.run_dir / "checkpoints" / "step-6" / "state.json").is_file()


def test_weight_decay_and_dropout_reach_the_model(cfg_for):
    t = Trainer(cfg_for("model.dropout=0.25", "trainer.weight_decay=0.1", "trainer.max_steps=1")).setup()
    assert t.model.config.attention_dropout == 0.25
    decays = sorted(g["weight_decay"] for g in t.optimizer.param_groups)
    assert decays == [0.0, 0.1]
    no_decay = next(g for g in t.optimizer.param_groups if g["weight_decay"] == 0.0)
    assert all(p.ndim < 2 for p in no_decay["params"])


def test_attention_choice(monkeypatch):
    assert choose_attn_implementation("auto", torch.float32) == "sdpa"
    assert choose_attn_implementation("eager", torch.bfloat16) == "eager"
    # No GPU or flash-attn exists here; pretend both do to check the rule itself.
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object() if n == "flash_attn" else real(n, *a))
    assert choose_attn_implementation("auto", torch.bfloat16) == "flash_attention_2"
    assert choose_attn_implementation("auto", torch.float32) == "sdpa"


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_schedule_warms_up_then_decays(kind):
    from distft.schedules import warmup_decay

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_decay(opt, total_steps=20, shape=kind, warmup_steps=4)
    lrs = []
    for _ in range(20):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])  # linear warmup to the peak
    if kind == "constant":
        assert lrs[4:] == pytest.approx([1.0] * 16)
    else:
        assert all(a >= b for a, b in zip(lrs[4:], lrs[5:])) and lrs[-1] < 0.1


def test_schedule_is_a_config_node(cfg_for, tmp_path):
    """scheduler=linear with a floor ends at min_lr_ratio * lr; a torch scheduler without
    total_steps is built from its node too; a bad target is refused at config time."""
    from distft.errors import ConfigError
    from distft.trainer import check_config

    cfg = cfg_for("scheduler=linear", "scheduler.min_lr_ratio=0.1", "trainer.max_steps=6", "trainer.warmup_steps=0",
                  "trainer.lr=1e-2")
    cfg.run_dir = str(tmp_path / "linear")
    t = Trainer(cfg).setup()
    t.train()
    lrs = [e["lr"] for e in t.metrics.history if "lr" in e]
    assert lrs[0] == pytest.approx(1e-2) and lrs[-1] == pytest.approx(1e-2 * (0.1 + 0.9 / 6))
    t.close()

    cfg = cfg_for("scheduler._target_=torch.optim.lr_scheduler.StepLR", "~scheduler.shape", "~scheduler.warmup_steps",
                  "~scheduler.warmup_ratio", "~scheduler.min_lr_ratio", "+scheduler.step_size=2",
                  "+scheduler.gamma=0.5", "trainer.max_steps=4", "trainer.lr=1e-2")
    cfg.run_dir = str(tmp_path / "steplr")
    t = Trainer(cfg).setup()
    t.train()
    assert [e["lr"] for e in t.metrics.history if "lr" in e] == pytest.approx([1e-2, 1e-2, 5e-3, 5e-3])
    t.close()

    with pytest.raises(ConfigError, match="scheduler._target_=no.such.fn"):
        check_config(cfg_for("scheduler._target_=no.such.fn"))


@pytest.mark.parametrize("strategy", ["full", "lora"])
def test_activation_checkpointing_changes_memory_not_numbers(cfg_for, tmp_path, strategy):
    runs = []
    for ac in (False, True):
        cfg = cfg_for(f"strategy={strategy}", "trainer.max_steps=4", f"trainer.activation_checkpointing={ac}")
        cfg.run_dir = str(tmp_path / f"ac{ac}")
        t = Trainer(cfg).setup()
        t.train()
        runs.append(step_losses(t))
    assert runs[0] == pytest.approx(runs[1], rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("strategy,extra", [("full", []), ("lora", []), ("lora", ["trainer.activation_checkpointing=true"])],
                         ids=["full", "lora", "lora-ac"])
def test_compiled_blocks_train_like_eager(cfg_for, tmp_path, strategy, extra):
    """trainer.compile compiles every block in place: the same losses as eager (inductor
    reorders float sums, and Adam's first steps magnify that on LoRA's near-zero
    gradients, hence rel 1e-3), the same parameter names, and the blocks really compiled."""
    runs, names = [], []
    for compiled in (False, True):
        cfg = cfg_for(f"strategy={strategy}", "trainer.max_steps=4", "trainer.eval_every=2",
                      f"trainer.compile={compiled}", *extra)
        cfg.run_dir = str(tmp_path / f"c{compiled}")
        t = Trainer(cfg).setup()
        t.train()
        runs.append(step_losses(t) + [e["eval/loss"] for e in t.metrics.history if "eval/loss" in e])
        names.append(list(t.model.state_dict()))
        blocks = [m for m in t.model.modules() if getattr(m, "_compiled_call_impl", None) is not None]
        assert len(blocks) == (2 if compiled else 0)
    assert runs[1] == pytest.approx(runs[0], rel=1e-3)
    assert names[0] == names[1]


@pytest.mark.parametrize("extra", [[], ["task.head=pooled"], ["privacy=dp", "privacy.noise_multiplier=0.5",
                                                                "privacy.target_epsilon=null"]])
def test_head_lr_trains_the_head_at_its_own_rate(cfg_for, extra):
    """trainer.head_lr: the task head in its own parameter groups. With trainer.lr=0 only the
    head moves (also through Opacus' wrapper under DP)."""
    from distft.strategies.base import declared_heads

    trainer = Trainer(cfg_for("task=classification", "strategy=full", "trainer.lr=0.0", "trainer.head_lr=1e-2",
                              "trainer.max_steps=3", *extra)).setup()
    model = trainer.backend.unwrap(trainer.model)
    while hasattr(model, "_module"):
        model = model._module
    heads = {id(p) for p in declared_heads(model)}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert sorted(g["lr"] for g in trainer.optimizer.param_groups if g["params"])[-1] == pytest.approx(1e-2)
    trainer.train()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert moved and moved == {n for n, p in model.named_parameters() if id(p) in heads}


def test_head_lr_needs_a_head(cfg_for):
    from distft.errors import ConfigError

    with pytest.raises(ConfigError, match="trainer.head_lr"):
        Trainer(cfg_for("trainer.head_lr=1e-2", "trainer.max_steps=1")).setup()


@pytest.mark.parametrize("eval_batch, expected", [(None, 4), (7, 7)])
def test_eval_batches_default_to_the_training_micro_batch(cfg_for, tmp_path, eval_batch, expected):
    """Unset, trainer.eval_batch_size is the training micro-batch (an eval never holds more
    activations than a training step); set, it is honoured; the metrics do not depend on it."""
    extra = [] if eval_batch is None else [f"trainer.eval_batch_size={eval_batch}"]
    cfg = cfg_for("trainer.max_steps=1", "trainer.batch_size=4", *extra)
    cfg.run_dir = str(tmp_path / "run")
    t = Trainer(cfg).setup()
    sizes = []
    hook = t.model.register_forward_pre_hook(lambda m, a, kw: sizes.append(len(kw["input_ids"])), with_kwargs=True)
    metrics = t.evaluate()
    hook.remove()
    n = len(t.val_examples)
    assert n > expected and sizes == [min(expected, n - i) for i in range(0, n, expected)]
    whole = Trainer(cfg_for("trainer.max_steps=1", "trainer.batch_size=4", f"trainer.eval_batch_size={n}",
                            f"run_dir={tmp_path / 'whole'}")).setup().evaluate()
    assert metrics == pytest.approx(whole, rel=1e-5)
