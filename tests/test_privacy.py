"""DP-SGD (privacy=dp) with real Opacus: per-example gradients, Poisson sampling, the
epsilon against Opacus' own accountant, the budget stop, DP-DDP on 2 processes over gloo,
resume after SIGKILL, PEFT adapters that really train, and every refusal."""
import json
import math
import signal
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

pytest.importorskip("opacus")

from opacus.accountants import create_accountant  # noqa: E402

from distft.errors import ConfigError  # noqa: E402
from distft.trainer import Trainer, check_config  # noqa: E402

from conftest import ROOT, TINY, compose_cfg, losses, read_metrics, run_torchrun, wait_for_step  # noqa: E402

N_TRAIN = 96  # TINY's data.num_train
DP = ["privacy=dp", "trainer.eval_every=0", "trainer.lr=3e-3"]


def summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


def opacus_epsilon(accountant, noise, sample_rate, steps, delta):
    """Opacus' accountant stepped as its own PrivacyEngine would, one call per step."""
    acc = create_accountant(accountant)
    for _ in range(steps):
        acc.step(noise_multiplier=noise, sample_rate=sample_rate)
    return acc.get_epsilon(delta=delta)


def train(cfg_for, tmp_path, name, *overrides):
    cfg = cfg_for(*DP, *overrides)
    cfg.run_dir = str(tmp_path / name)
    t = Trainer(cfg).setup()
    out = t.train()
    return t, out


# ---------------------------------------------------------------- per-example gradients
def _per_example_reference(model, task_inputs, example_loss):
    """Each example's gradient by plain autograd, one example at a time."""
    grads = []
    for i in range(task_inputs["input_ids"].size(0)):
        model.zero_grad()
        one = {k: v[i : i + 1] for k, v in task_inputs.items()}
        example_loss(model, one).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    model.zero_grad()
    return grads


def _check_grad_samples(model, inputs, example_loss, mode="hooks"):
    from distft.config import DPPrivacyConfig
    from distft.privacy.dp import DifferentialPrivacy

    reference = _per_example_reference(model, inputs, example_loss)
    dp = DifferentialPrivacy(OmegaConf.structured(DPPrivacyConfig(grad_sample_mode=mode)))
    wrapped = dp.wrap_model(model)
    example_loss(wrapped, inputs).sum().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad_sample is not None, name
            for i, ref in enumerate(reference):
                torch.testing.assert_close(p.grad_sample[i], ref[name], rtol=1e-4, atol=1e-6,
                                           msg=f"{name}, example {i}")


def test_per_example_gradients_of_a_bert_with_trainable_position_embeddings():
    """Every trainable tensor's per-example gradient equals autograd's on that example
    alone, position embeddings included (opacus #841: broadcast position ids gave every
    example the first one's gradient)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=3,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForSequenceClassification(config)
    inputs = {"input_ids": torch.randint(1, 50, (4, 7)), "attention_mask": torch.ones(4, 7, dtype=torch.long),
              "labels": torch.tensor([0, 2, 1, 2])}
    inputs["attention_mask"][1, 5:] = 0

    def example_loss(m, batch):
        batch = dict(batch)
        labels = batch.pop("labels")
        return torch.nn.functional.cross_entropy(m(**batch).logits, labels, reduction="none")

    _check_grad_samples(model, inputs, example_loss)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_pooled_head_over_a_bert_leaves_its_unused_pooler_alone(mode):
    """task.head=pooled over a BERT: the backbone runs its pooler on every forward, the head
    never reads it. Under DP it is frozen (it would take noise only); ghost clipping failed
    on the second forward without that (the pooler's activations, never consumed by a
    backward, read as tied weights). Per-example gradients stay exact on the rest."""
    from transformers import BertConfig, BertModel

    from distft.config import DPPrivacyConfig
    from distft.models.head_model import MlpHeadConfig, MlpHeadForSequenceClassification
    from distft.privacy.dp import DifferentialPrivacy

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = MlpHeadForSequenceClassification(
        MlpHeadConfig(backbone=config, head_hidden=(), head_dropout=0.0, pooling="mean", normalize=True,
                      num_labels=2), backbone=BertModel(config))
    inputs = {"input_ids": torch.randint(1, 50, (4, 7)), "attention_mask": torch.ones(4, 7, dtype=torch.long),
              "labels": torch.tensor([0, 1, 1, 0])}

    def example_loss(m, batch):
        batch = dict(batch)
        labels = batch.pop("labels")
        return torch.nn.functional.cross_entropy(m(**batch).logits, labels, reduction="none")

    if mode == "hooks":
        _check_grad_samples(model, inputs, example_loss)
    else:
        wrapped = DifferentialPrivacy(OmegaConf.structured(DPPrivacyConfig(grad_sample_mode=mode))).wrap_model(model)
        for _ in range(2):
            example_loss(wrapped, inputs).sum().backward()
            assert all(p._norm_sample is not None for p in model.parameters() if p.requires_grad)
            for p in model.parameters():
                p.grad, p._norm_sample = None, None
    assert not any(p.requires_grad for p in model.backbone.pooler.parameters())
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.startswith("backbone.pooler"))


@pytest.mark.parametrize("mode,tied", [("hooks", False), ("functorch", False), ("hooks", True)])
def test_per_example_gradients_of_a_llama_with_hf_rmsnorm(mode, tied):
    """Full fine-tuning of a Llama: its RMSNorm is HF's own class, not nn.RMSNorm, so the
    hooks mode computes its per-example gradients with torch.func; both modes match
    autograd on every tensor. Tied input and output embeddings (SmolLM2's) get the sum of
    both uses' per-example gradients."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                         tie_word_embeddings=tied)
    model = LlamaForCausalLM(config)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    inputs = {"input_ids": torch.randint(0, 40, (3, 6)), "attention_mask": torch.ones(3, 6, dtype=torch.long)}

    def example_loss(m, batch):
        logits = m(**batch).logits[:, :-1]
        targets = batch["input_ids"][:, 1:]
        token = torch.nn.functional.cross_entropy(logits.reshape(-1, 40), targets.reshape(-1), reduction="none")
        return token.view(targets.shape).mean(1)

    _check_grad_samples(model, inputs, example_loss, mode)


@pytest.mark.parametrize("strategy", ["full", "lora"])
def test_ghost_clipping_takes_the_steps_of_per_example_gradients(cfg_for, tmp_path, strategy):
    """Ghost clipping (norms only, two backward passes) and materialised per-example
    gradients clip the same way: without noise, the same losses step by step, with a clip
    small enough to bind and two micro-batches a step."""
    runs = []
    for mode in ("hooks", "ghost"):
        _, out = train(cfg_for, tmp_path, mode, f"strategy={strategy}", f"privacy.grad_sample_mode={mode}",
                       "privacy.noise_multiplier=0", "privacy.target_epsilon=null", "privacy.max_grad_norm=0.05",
                       "trainer.batch_size=4", "privacy.logical_batch_size=8", "trainer.max_steps=5",
                       *(["strategy.dropout=0.0"] if strategy == "lora" else []))
        runs.append(losses(tmp_path / mode))
    assert runs[0] == pytest.approx(runs[1], rel=1e-4)


def test_auto_mode_and_tied_weights(cfg_for, tmp_path, caplog):
    """auto: ghost clipping under full fine-tuning, hooks under LoRA; ghost clipping with
    trainable tied embeddings is refused with the reason."""
    import logging

    from distft.models.lean import DropoutLinear

    caplog.set_level(logging.INFO, logger="distft")
    for strategy, expected in (("full", "ghost"), ("lora", "hooks")):
        cfg = cfg_for(*DP, f"strategy={strategy}", "trainer.max_steps=1")
        cfg.run_dir = str(tmp_path / strategy)
        t = Trainer(cfg).setup()
        assert t.privacy.mode == expected
        # Opacus reads each layer's own input: no fused LoRA dropout (distft/models/lean.py)
        assert not any(isinstance(m, DropoutLinear) for m in t.model.modules())
    assert "lean activations off: privacy=dp" in caplog.text
    cfg = cfg_for(*DP, "strategy=full", "privacy.grad_sample_mode=ghost", "model.from_config.tie_word_embeddings=true")
    cfg.run_dir = str(tmp_path / "tied")
    with pytest.raises(ConfigError, match="tied input and output embeddings"):
        Trainer(cfg).setup()
    cfg = cfg_for(*DP, "strategy=full", "model.from_config.tie_word_embeddings=true", "trainer.max_steps=2")
    cfg.run_dir = str(tmp_path / "tied-auto")
    t = Trainer(cfg).setup()
    assert t.privacy.mode == "hooks"  # auto falls back to per-layer hooks, which handle tied weights
    t.train()


# ---------------------------------------------------------------- sampling
def test_poisson_sampling_varies_splits_into_physical_batches_and_resumes(cfg_for):
    from types import SimpleNamespace

    from distft.samplers.poisson import PoissonSampler

    def sampler(rank, world, logical=40):
        cfg = cfg_for("privacy=dp", f"privacy.logical_batch_size={logical}", "trainer.batch_size=8")
        s = PoissonSampler(cfg)
        s.setup(SimpleNamespace(cfg=cfg, train_examples=[None] * 200,
                                backend=SimpleNamespace(rank=rank, world_size=world)))
        return s

    one = sampler(0, 1)
    assert one.sample_rate == pytest.approx(0.2)
    steps = [one.next_step() for _ in range(200)]
    sizes = [sum(len(mb) for mb in step) for step in steps]
    assert len(set(sizes)) > 5  # Poisson: the batch size varies
    assert sum(sizes) / len(sizes) == pytest.approx(40, rel=0.05)
    assert all(len(mb) <= 8 for step in steps for mb in step)  # physical micro-batches
    seen = [i for step in steps for mb in step for i in mb]
    assert len(set(seen)) == 200  # with replacement across steps, every example turns up

    # Two ranks draw the same global batch and keep disjoint shares of it.
    a, b = sampler(0, 2), sampler(1, 2)
    reference = sampler(0, 1)
    for _ in range(5):
        whole = sorted(i for mb in reference.next_step() for i in mb)
        share_a = [i for mb in a.next_step() for i in mb]
        share_b = [i for mb in b.next_step() for i in mb]
        assert sorted(share_a + share_b) == whole and not set(share_a) & set(share_b)

    # The state continues the same draws.
    s = sampler(0, 1)
    for _ in range(3):
        s.next_step()
    state = json.loads(json.dumps(s.state_dict()))
    expected = [s.next_step() for _ in range(4)]
    t = sampler(0, 1)
    t.load_state_dict(state)
    assert [t.next_step() for _ in range(4)] == expected


# ---------------------------------------------------------------- accounting
@pytest.mark.parametrize("accountant", ["prv", "rdp", "gdp"])
def test_epsilon_equals_opacus_accountant(cfg_for, tmp_path, accountant):
    """A fixed noise multiplier: the epsilon in the summary and the metrics is Opacus'
    accountant's for the same sample rate, steps and noise."""
    t, out = train(cfg_for, tmp_path, accountant, "privacy.noise_multiplier=1.1", "privacy.target_epsilon=null",
                   f"privacy.accountant={accountant}", "trainer.max_steps=6")
    q = 8 / N_TRAIN
    expected = opacus_epsilon(accountant, 1.1, q, 6, 1e-5)
    assert out["privacy/epsilon"] == pytest.approx(expected, rel=1e-6)
    assert out["privacy/sample_rate"] == pytest.approx(q) and out["privacy/noisy_steps"] == 6
    evals = [e for e in read_metrics(t.run_dir) if "privacy/epsilon" in e]
    assert evals and evals[-1]["privacy/epsilon"] == pytest.approx(expected, rel=1e-6)
    assert all("grad_norm" not in e for e in read_metrics(t.run_dir))  # the unclipped norm is not private
    card = (t.run_dir / "final" / "README.md").read_text()
    assert "Differential privacy" in card and f"{expected:.3f}" in card


def test_target_epsilon_calibrates_the_noise(cfg_for, tmp_path):
    """The noise is calibrated to the target; the epsilon reaches W&B (an offline run)."""
    t, out = train(cfg_for, tmp_path, "target", "privacy.target_epsilon=4", "trainer.max_steps=10", "logger=wandb",
                   "logger.wandb.mode=offline", "logger.progress_bar=false", "logger.plots=false")
    q = 8 / N_TRAIN
    spent = opacus_epsilon("prv", out["privacy/noise_multiplier"], q, 10, 1e-5)
    assert out["privacy/epsilon"] == pytest.approx(spent, rel=1e-6)
    assert 3.8 < spent <= 4.0 + 1e-9  # close to the target, never above it
    assert out["steps"] == 10 and out["stop_reason"] is None
    records = b"".join(f.read_bytes() for f in (t.run_dir / "wandb").rglob("*.wandb"))
    assert b"privacy/epsilon" in records


def test_budget_stops_before_the_step_that_would_exceed_it(cfg_for, tmp_path):
    """With both the noise and the budget given, the run ends (checkpoint, summary, a
    clear reason) at the last step whose epsilon stays within target_epsilon."""
    q, noise, budget = 8 / N_TRAIN, 1.0, 3.0
    allowed = max(k for k in range(1, 60) if opacus_epsilon("rdp", noise, q, k, 1e-5) <= budget)
    t, out = train(cfg_for, tmp_path, "budget", f"privacy.noise_multiplier={noise}", f"privacy.target_epsilon={budget}",
                   "privacy.accountant=rdp", "trainer.max_steps=60", "trainer.save_every=0")
    assert 0 < allowed < 60
    assert out["steps"] == allowed and out["stopped_early"] is True
    assert "privacy budget" in out["stop_reason"] and "target_epsilon=3.0" in out["stop_reason"]
    assert out["privacy/epsilon"] <= budget < opacus_epsilon("rdp", noise, q, allowed + 1, 1e-5)
    assert (t.run_dir / "checkpoints" / f"step-{allowed}").is_dir()


# ---------------------------------------------------------------- strategies
@pytest.mark.parametrize("strategy,task", [("lora", "causal_lm"), ("bitfit", "classification"),
                                           ("partial", "classification"), ("full", "instruction")])
def test_every_trainable_tensor_trains(cfg_for, tmp_path, strategy, task):
    """DP-SGD reaches every trainable tensor (opacus #820 / peft #3409: adapters whose
    hooks were attached before their parameters moved trained nothing). Noise 0 and a
    clip no example reaches: the update is the gradient's alone."""
    cfg = cfg_for(*DP, f"strategy={strategy}", f"task={task}", "privacy.noise_multiplier=0",
                  "privacy.target_epsilon=null", "trainer.max_steps=3", "privacy.max_grad_norm=1e6",
                  *(["strategy.dropout=0.0"] if strategy == "lora" else []))
    cfg.run_dir = str(tmp_path / "run")
    t = Trainer(cfg).setup()
    model = t.backend.unwrap(t.model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    t.train()
    after = dict(model.named_parameters())
    unchanged = [n for n, p in before.items() if torch.equal(p, after[n].detach())]
    assert before and not unchanged


def test_exported_lora_adapter_gives_distft_logits_with_plain_peft(cfg_for, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = cfg_for(*DP, "strategy=lora", "strategy.dropout=0.0", "trainer.max_steps=3", "privacy.target_epsilon=8")
    cfg.run_dir = str(tmp_path / "run")
    t = Trainer(cfg).setup()
    t.train()
    model = t.backend.unwrap(t.model).eval()
    ids = torch.tensor([[5, 17, 33, 9, 70, 12]])
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(t.base_dir)
        theirs = PeftModel.from_pretrained(base, str(t.run_dir / "final")).eval()(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
    assert "Differential privacy" in (t.run_dir / "final" / "README.md").read_text()


# ---------------------------------------------------------------- group-wise clipping
def test_group_clipping_bounds_the_head_and_the_rest_apart():
    """privacy.head_max_grad_norm: each example's head part and the rest are clipped to
    their own bounds (checked against autograd one example at a time), and the noise is
    scaled to the root of the sum of the bounds squared."""
    from opacus.grad_sample import GradSampleModule

    from distft.privacy.dp import _dp_optimizer

    torch.manual_seed(0)
    body, head = torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)
    model = torch.nn.Sequential(body, torch.nn.Tanh(), head)
    x, y = torch.randn(6, 4) * 3, torch.tensor([0, 1, 1, 0, 1, 0])
    loss = lambda m, xs, ys: torch.nn.functional.cross_entropy(m(xs), ys, reduction="sum")  # noqa: E731
    bounds = {"rest": 0.2, "head": 0.05}
    expected = {id(p): torch.zeros_like(p) for p in model.parameters()}
    clipped_somewhere = False
    for i in range(len(y)):
        model.zero_grad()
        loss(model, x[i : i + 1], y[i : i + 1]).backward()
        for group, params in (("rest", list(body.parameters())), ("head", list(head.parameters()))):
            norm = torch.stack([p.grad.norm() for p in params]).norm()
            factor = min(1.0, bounds[group] / (float(norm) + 1e-6))
            clipped_somewhere |= factor < 1.0
            for p in params:
                expected[id(p)] += factor * p.grad
    assert clipped_somewhere
    model.zero_grad()

    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    groups = ({**{id(p): 0 for p in body.parameters()}, **{id(p): 1 for p in head.parameters()}},
              [bounds["rest"], bounds["head"]], None)
    sensitivity = math.hypot(bounds["rest"], bounds["head"])
    optimizer = _dp_optimizer(torch.optim.SGD(model.parameters(), lr=1.0), False, False, groups=groups,
                              noise_multiplier=0.0, max_grad_norm=sensitivity, expected_batch_size=6,
                              loss_reduction="mean")
    loss(wrapped, x, y).backward()
    optimizer.pre_step()
    for p in model.parameters():
        torch.testing.assert_close(p.grad, expected[id(p)] / 6, rtol=1e-5, atol=1e-7)
    assert optimizer.max_grad_norm == sensitivity  # Opacus' noise std is noise_multiplier x this


def test_head_noise_share_sizes_each_groups_noise_to_its_bound():
    """privacy.head_noise_share: the heads take noise noise_multiplier x C_head / sqrt(share),
    the rest noise_multiplier x C / sqrt(1 - share) (the same sensitivity 1 once each group is
    divided by its scale); the share C_head^2 / (C^2 + C_head^2) is Opacus' one scale."""
    from opacus.grad_sample import GradSampleModule

    from distft.privacy.dp import _dp_optimizer

    def noisy_step(share, seed=7):
        torch.manual_seed(0)
        body, head = torch.nn.Linear(64, 64), torch.nn.Linear(64, 32)
        model = torch.nn.Sequential(body, torch.nn.Tanh(), head)
        bounds = [0.1, 1.0]
        scales = None if share is None else [bounds[0] / math.sqrt(1 - share), bounds[1] / math.sqrt(share)]
        groups = ({**{id(p): 0 for p in body.parameters()}, **{id(p): 1 for p in head.parameters()}}, bounds, scales)
        optimizer = _dp_optimizer(torch.optim.SGD(model.parameters(), lr=1.0), False, False, groups=groups,
                                  noise_multiplier=0.5, max_grad_norm=math.hypot(*bounds), expected_batch_size=1,
                                  loss_reduction="mean", generator=torch.Generator().manual_seed(seed))
        x, y = torch.randn(4, 64), torch.tensor([0, 1, 2, 3])
        torch.nn.functional.cross_entropy(GradSampleModule(model)(x), y, reduction="sum").backward()
        optimizer.pre_step()
        noise = {}
        for name, part in (("rest", body), ("head", head)):
            noise[name] = torch.cat([(p.grad - p.summed_grad).flatten() for p in part.parameters()])
        return noise

    noise = noisy_step(0.5)
    assert float(noise["rest"].std()) == pytest.approx(0.5 * 0.1 / math.sqrt(0.5), rel=0.05)
    assert float(noise["head"].std()) == pytest.approx(0.5 * 1.0 / math.sqrt(0.5), rel=0.05)
    uniform, as_share = noisy_step(None), noisy_step(1.0 / (0.01 + 1.0))
    for name in ("rest", "head"):
        assert float(uniform[name].std()) == pytest.approx(0.5 * math.hypot(0.1, 1.0), rel=0.05)
        torch.testing.assert_close(as_share[name], uniform[name])


def test_head_clip_bound_runs_is_reported_and_resumes_only_unchanged(cfg_for, tmp_path):
    common = ["task=classification", "strategy=lora", "trainer.max_steps=2", "trainer.save_every=2",
              "privacy.head_max_grad_norm=0.05", "privacy.target_epsilon=8"]
    t, out = train(cfg_for, tmp_path, "run", *common)
    assert out["privacy/head_max_grad_norm"] == 0.05
    assert t.privacy.sensitivity == pytest.approx(math.hypot(1.0, 0.05))
    assert "clipped apart to 0.05" in (t.run_dir / "final" / "README.md").read_text()
    cfg = cfg_for(*DP, *common[:-3], "privacy.head_max_grad_norm=0.1", "privacy.target_epsilon=8",
                  "trainer.max_steps=4", f"resume={t.run_dir / 'checkpoints' / 'step-2'}")
    cfg.run_dir = str(tmp_path / "resumed")
    with pytest.raises(ConfigError, match="head_max_grad_norm 0.05 -> 0.1"):
        Trainer(cfg).setup()
    cfg = cfg_for(*DP, "privacy.head_max_grad_norm=0.1")  # a causal LM: no task head to clip apart
    cfg.run_dir = str(tmp_path / "no-head")
    with pytest.raises(ConfigError, match="no trainable task head"):
        Trainer(cfg).setup()


def test_head_noise_share_runs_is_reported_and_resumes_only_unchanged(cfg_for, tmp_path):
    common = ["task=classification", "strategy=lora", "trainer.max_steps=2", "trainer.save_every=2",
              "privacy.head_max_grad_norm=1.0", "privacy.max_grad_norm=0.1", "privacy.target_epsilon=8"]
    t, out = train(cfg_for, tmp_path, "run", *common, "privacy.head_noise_share=0.5")
    assert out["privacy/head_noise_share"] == 0.5
    assert t.privacy.noise_scales == pytest.approx([0.1 / math.sqrt(0.5), 1.0 / math.sqrt(0.5)])
    assert "noise scale 0.1414 on the rest, 1.414 on the heads" in (t.run_dir / "final" / "README.md").read_text()
    cfg = cfg_for(*DP, *common, "privacy.head_noise_share=0.2", "trainer.max_steps=4",
                  f"resume={t.run_dir / 'checkpoints' / 'step-2'}")
    cfg.run_dir = str(tmp_path / "resumed")
    with pytest.raises(ConfigError, match="head_noise_share 0.5 -> 0.2"):
        Trainer(cfg).setup()


# ---------------------------------------------------------------- resume
def test_resume_after_sigkill_continues_losses_and_accounting(cfg_for, tmp_path):
    overrides = [*TINY, *DP, "privacy.target_epsilon=6", "trainer.max_steps=14", "trainer.save_every=2",
                 "trainer.batch_size=4", "privacy.logical_batch_size=8"]  # two physical micro-batches per step
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    from distft.train import run as run_training

    run_training(compose_cfg(ref_dir, overrides))
    reference = losses(ref_dir)

    cmd = [sys.executable, "-m", "distft.train", *overrides, f"run_dir={cut_dir}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_step(proc, cut_dir, 7)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (cut_dir / "summary.json").exists()

    run_training(compose_cfg(cut_dir, overrides))
    resumed = losses(cut_dir)
    assert sorted(resumed) == list(range(1, 15))
    for step in range(1, 15):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5), f"step {step}"
    assert summary(cut_dir)["privacy/epsilon"] == pytest.approx(summary(ref_dir)["privacy/epsilon"], rel=1e-9)
    assert summary(cut_dir)["privacy/noisy_steps"] == 14


def test_resume_with_other_privacy_settings_is_refused(cfg_for, tmp_path):
    common = ["trainer.max_steps=2", "trainer.save_every=2"]
    t, _ = train(cfg_for, tmp_path, "dp", *common, "privacy.noise_multiplier=1.0", "privacy.target_epsilon=null")
    checkpoint = t.run_dir / "checkpoints" / "step-2"
    for other, match in [(["privacy.noise_multiplier=1.0", "privacy.target_epsilon=null", "privacy.max_grad_norm=0.5"],
                          "max_grad_norm 1.0 -> 0.5"),
                         (["privacy.noise_multiplier=2.0", "privacy.target_epsilon=null"], "noise_multiplier"),
                         (["privacy=none"], "written with privacy=dp")]:
        cfg = cfg_for(*[o for o in DP if o != "privacy=dp"], *(["privacy=dp"] if other[0] != "privacy=none" else []),
                      *other, "trainer.max_steps=4", f"resume={checkpoint}")
        cfg.run_dir = str(tmp_path / f"resumed-{len(match)}")
        with pytest.raises(ConfigError, match=match):
            Trainer(cfg).setup()

    plain = cfg_for("trainer.max_steps=2", "trainer.save_every=2", "trainer.eval_every=0")
    plain.run_dir = str(tmp_path / "plain")
    Trainer(plain).setup().train()
    cfg = cfg_for(*DP, "trainer.max_steps=4", f"resume={tmp_path / 'plain' / 'checkpoints' / 'step-2'}")
    cfg.run_dir = str(tmp_path / "plain-then-dp")
    with pytest.raises(ConfigError, match="written without privacy=dp"):
        Trainer(cfg).setup()


# ---------------------------------------------------------------- DP-DDP
def _one_and_two_processes_same_losses(tmp_path, overrides, steps):
    """One process, then 2 under torchrun (ddp): the same loss at every step. Their run dirs."""
    from distft.train import run as run_training

    one, two = tmp_path / "one", tmp_path / "two"
    run_training(compose_cfg(one, overrides))
    run_torchrun(2, *overrides, "backend=ddp", f"run_dir={two}")
    la, lb = losses(one), losses(two)
    assert sorted(la) == sorted(lb) == list(range(1, steps + 1))
    for step in la:
        assert lb[step] == pytest.approx(la[step], rel=1e-5), f"step {step}"
    return one, two


@pytest.mark.slow
def test_dp_ddp_two_processes_match_one(tmp_path):
    """Opacus' DP-DDP on 2 processes over gloo: the same epsilon as one process; with noise
    0 the same updates (both draw the same Poisson batches, each rank clips its share and
    the optimizer sums them), so the same losses and exported weights."""
    # SGD: an update linear in the gradient. The two runs sum the same clipped gradients in
    # another order; Adam divides each coordinate by its own scale, which turns the rounding
    # of a near-zero gradient into a visible step (1 of 8,288 weights off by 3e-6).
    noiseless = [*TINY, *DP, "privacy.noise_multiplier=0", "privacy.target_epsilon=null", "privacy.max_grad_norm=0.5",
                 "trainer.max_steps=6", "privacy.logical_batch_size=16", "trainer.batch_size=4",
                 "optimizer._target_=torch.optim.SGD", "~optimizer.betas", "~optimizer.eps", "trainer.lr=0.3"]
    one, two = _one_and_two_processes_same_losses(tmp_path, noiseless, steps=6)
    a, b = load_file(str(one / "final" / "model.safetensors")), load_file(str(two / "final" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=k)

    noisy = [o for o in noiseless if not o.startswith("privacy.noise_multiplier") and "target_epsilon" not in o]
    one_n, two_n = tmp_path / "one-noisy", tmp_path / "two-noisy"
    from distft.train import run as run_training

    run_training(compose_cfg(one_n, [*noisy, "privacy.target_epsilon=5"]))
    run_torchrun(2, *noisy, "privacy.target_epsilon=5", "backend=ddp", f"run_dir={two_n}")
    sa, sb = summary(one_n), summary(two_n)
    assert sb["privacy/epsilon"] == pytest.approx(sa["privacy/epsilon"], rel=1e-9)
    assert sb["privacy/noise_multiplier"] == sa["privacy/noise_multiplier"] and sb["processes"] == 2
    assert math.isfinite(sb["eval/loss"])


@pytest.mark.slow
def test_dp_ddp_head_noise_share_adds_each_groups_noise_once(tmp_path):
    """privacy.head_noise_share on 2 processes: rank 0 adds each group's noise, the other rank
    none, so the noisy updates are the one-process run's (same noise generator, the same
    clipped sums; SGD keeps the update linear in them; no dropout, whose masks differ by rank)."""
    common = [*TINY, *DP, "task=classification", "strategy=lora", "privacy.max_grad_norm=0.1",
              "strategy.dropout=0.0", "task.head_dropout=0.0", "model.dropout=0.0",
              "privacy.head_max_grad_norm=1.0", "privacy.head_noise_share=0.5", "privacy.noise_multiplier=1.0",
              "privacy.target_epsilon=null", "trainer.max_steps=4", "privacy.logical_batch_size=16",
              "trainer.batch_size=4", "optimizer._target_=torch.optim.SGD", "~optimizer.betas", "~optimizer.eps",
              "trainer.lr=0.3"]
    _, two = _one_and_two_processes_same_losses(tmp_path, common, steps=4)
    assert summary(two)["privacy/head_noise_share"] == 0.5


# ---------------------------------------------------------------- refusals
@pytest.mark.parametrize("overrides,match", [
    (["backend=zero1"], "ZeRO partitions"),
    (["backend=zero2"], "ZeRO partitions"),
    (["backend=zero3"], "ZeRO partitions"),
    (["backend=fsdp"], "FSDP shards"),
    (["data.packing=true"], "packed row holds several examples"),
    (["data=mixture", "task=classification", "+data.tasks.a.data.train=x.jsonl", "+data.tasks.a.data.validation=y.jsonl",
      "+data.tasks.b.data.train=z.jsonl", "+data.tasks.b.data.validation=w.jsonl"], "Poisson sampling"),
    (["trainer.precision=fp16"], None),  # refused on CPU for fp16 itself; under DP on GPU for the scaler
    (["trainer.compile=true"], "compiled blocks"),
    (["trainer.activation_checkpointing=true"], "twice"),
    (["privacy.target_epsilon=null"], "set privacy.target_epsilon"),
    (["privacy.delta=1.5"], "privacy.delta"),
    (["privacy.max_grad_norm=0"], "clipping bound"),
    (["privacy.head_max_grad_norm=0"], "heads' clipping bound"),
    (["privacy.head_max_grad_norm=0.1", "privacy.grad_sample_mode=ghost"], "group-wise clipping needs each"),
    (["privacy.head_noise_share=0.5"], "set it too"),
    (["privacy.head_max_grad_norm=0.1", "privacy.head_noise_share=1"], "within \\(0, 1\\)"),
    (["privacy.accountant=moments"], "privacy.accountant"),
    (["privacy.logical_batch_size=32", "trainer.grad_accum=2"], "set one"),
    (["plugins=[component_plugins]", "regularizer.name=zero_penalty"], "clipped and noised"),
], ids=lambda v: v[0] if isinstance(v, list) else "")
def test_refused_at_config_time(cfg_for, overrides, match, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "tests"))
    with pytest.raises(ConfigError, match=match):
        check_config(cfg_for("privacy=dp", *overrides))


def test_delta_above_one_over_n_is_refused(cfg_for, tmp_path):
    cfg = cfg_for("privacy=dp", "privacy.delta=0.02")  # 1 / 96 training examples is 0.0104
    cfg.run_dir = str(tmp_path / "run")
    with pytest.raises(ConfigError, match="not below 1 / 96"):
        Trainer(cfg).setup()
