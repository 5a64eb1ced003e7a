"""Every strategy x task on a tiny model: the loss falls and only the intended
parameters change (frozen ones stay bit-identical)."""
import pytest
import torch

from distft.strategies import registered_strategies
from distft.trainer import Trainer

LR = {"full": 3e-3, "lora": 1e-2, "bitfit": 1e-2, "partial": 1e-2}
TASKS = ["causal_lm", "instruction", "classification", "token_classification"]
HEADED = ("classification", "token_classification")  # a new task head (score) that every strategy trains


def intended(strategy: str, task: str, name: str) -> bool:
    """Should parameter `name` train under this strategy and task?"""
    head = name.split(".")[0] in ("score", "classifier") or ".score." in name or "modules_to_save" in name
    if strategy == "full":
        return True
    if strategy == "bitfit":
        return name.endswith(".bias") or (task in HEADED and head)
    if strategy == "lora":
        # peft trains a copy of the head (modules_to_save) and keeps the original frozen
        return "lora_" in name or "modules_to_save" in name
    if strategy == "partial":
        if task == "classification":
            return name.startswith("head.")  # the new MLP head on pooled features
        # the new block on top of the 2-layer tiny model (and a token head)
        return ".layers.2." in name or (task in HEADED and head)


def test_all_strategies_registered():
    assert {"full", "partial", "lora", "bitfit"} <= set(registered_strategies())


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("strategy", ["full", "partial", "lora", "bitfit"])
def test_strategy_trains_only_intended_parameters(cfg_for, strategy, task):
    cfg = cfg_for(f"strategy={strategy}", f"task={task}", "trainer.max_steps=12", f"trainer.lr={LR[strategy]}",
                  "trainer.eval_every=0", "trainer.save_every=0", "trainer.weight_decay=0.0")
    trainer = Trainer(cfg).setup()
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()

    assert trainable, "nothing trains"
    assert trainable == {n for n in before if intended(strategy, task, n)}
    for name, p in trainer.model.named_parameters():
        if name in trainable:
            assert not torch.equal(before[name], p.detach()), f"{name} should have changed"
        else:
            assert torch.equal(before[name], p.detach()), f"frozen {name} changed"

    losses = [e["loss"] for e in trainer.metrics.history if "loss" in e]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    assert 0 < trainer.trainable <= trainer.total


@pytest.mark.parametrize("strategy", ["full", "partial", "lora", "bitfit"])
def test_pooled_head_with_every_strategy(cfg_for, strategy):
    """task.head=pooled: a new head on mean-pooled hidden states, trained by every strategy
    beside what the strategy itself trains of the backbone."""
    cfg = cfg_for(f"strategy={strategy}", "task=classification", "task.head=pooled", "task.head_hidden=[16]",
                  "trainer.max_steps=12", "trainer.lr=1e-2", "trainer.eval_every=0",
                  "trainer.save_every=0", "trainer.weight_decay=0.0")
    trainer = Trainer(cfg).setup()
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    backbone = {
        "full": lambda n: True, "partial": lambda n: False, "lora": lambda n: "lora_" in n,
        "bitfit": lambda n: n.endswith(".bias"),
    }[strategy]
    assert trainable == {n for n in before if n.startswith("head.") or backbone(n)}
    assert any(n.startswith("head.1.") for n in trainable)  # the hidden layer of head_hidden=[16]
    for name, p in trainer.model.named_parameters():
        assert torch.equal(before[name], p.detach()) != (name in trainable), name
    losses = [e["loss"] for e in trainer.metrics.history if "loss" in e]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses


def test_pooled_head_refusals(cfg_for):
    from distft.errors import ConfigError

    for extra, needle in ((["task.head=cls"], "task.head='cls'"), (["task.pooling=max", "task.head=pooled"], "task.pooling"),
                          (["task.head_hidden=[8]"], "task.head=pooled"),
                          (["task.normalize=true"], "task.head=pooled"),
                          (["task.label_texts=[no,yes]"], "task.head=pooled"),
                          (["task.head=pooled", "task.head_hidden=[8]", "task.label_texts=[no,yes]"], "head_hidden"),
                          (["task.head=pooled", "task.label_texts=[only]"], "one non-empty text per class"),
                          (["task.head=pooled", "task.num_labels=3", "task.label_texts=[no,yes]"], "num_labels=3"),
                          (["task.train_head=false"], "task.head=pooled"),
                          (["task.head=pooled", "strategy=partial", "strategy.head=mlp"], "brings its own heads")):
        with pytest.raises(ConfigError, match=needle.replace("[", r"\[")):
            Trainer(cfg_for("task=classification", *extra)).setup()


def test_pooled_head_normalize_feeds_unit_vectors(cfg_for):
    """task.normalize=true: the head reads each pooled vector scaled to length 1 (as
    sentence-transformers' Normalize does), which bounds its per-example gradient."""
    import torch

    trainer = Trainer(cfg_for("task=classification", "task.head=pooled", "task.normalize=true",
                              "trainer.max_steps=1")).setup()
    model = trainer.backend.unwrap(trainer.model)
    assert model.config.normalize is True
    seen = []
    model.head.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    batch = trainer.task.collate(trainer.val_examples[:4])
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    torch.testing.assert_close(seen[0].norm(dim=-1), torch.ones(4))


def test_head_from_label_texts_is_zero_shot_and_can_stay_frozen(cfg_for):
    """task.label_texts: the linear head starts as the label texts' centred embeddings, so
    each label text is classified as its own class before any step; task.train_head=false
    keeps that head while LoRA trains."""
    texts = ["the first kind of text", "something else entirely, longer"]
    cfg = cfg_for("task=classification", "task.head=pooled", "task.normalize=true", "strategy=lora",
                  f"task.label_texts=[{texts[0]!r},{texts[1]!r}]".replace("'", '"'), "task.label_text_scale=7.0",
                  "task.train_head=false", "trainer.max_steps=4", "trainer.lr=1e-2", "trainer.eval_every=0",
                  "trainer.save_every=0")
    trainer = Trainer(cfg).setup()
    model = trainer.backend.unwrap(trainer.model)
    batch = trainer.tokenizer(texts, padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        hidden = model.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        pooled = torch.nn.functional.normalize(model.pool(hidden.float(), batch["attention_mask"]), dim=-1)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    model.train()
    torch.testing.assert_close(model.head[-1].weight, 7.0 * (pooled - pooled.mean(0)))
    assert torch.equal(model.head[-1].bias, torch.zeros(2))
    assert logits.argmax(-1).tolist() == [0, 1]
    head = {n: p.detach().clone() for n, p in model.head.named_parameters()}
    assert not any(p.requires_grad for p in model.head.parameters())
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    trainer.train()
    assert all(torch.equal(head[n], p) for n, p in model.head.named_parameters())
    assert any(not torch.equal(lora[n], p) for n, p in model.named_parameters() if n in lora)


def test_lora_with_a_frozen_trains_b_only_and_exports_it(cfg_for, tmp_path):
    """strategy.train_a=false (LoRA-FA): A keeps its seeded init, B trains, and the exported
    adapter (A included) gives, loaded with plain peft, the logits distft had."""
    from peft import AutoPeftModelForCausalLM

    cfg = cfg_for("strategy=lora", "strategy.train_a=false", "task=causal_lm", "trainer.max_steps=6",
                  "trainer.lr=1e-2", "trainer.eval_every=0", "trainer.save_every=0")
    trainer = Trainer(cfg).setup()
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_B." in n for n in trainable)
    trainer.train()
    for name, p in trainer.model.named_parameters():
        assert torch.equal(before[name], p.detach()) != (name in trainable), name
    # the same A again from the same seed: a resumed run (which loads only trained weights) rebuilds it
    again = Trainer(cfg_for("strategy=lora", "strategy.train_a=false", "task=causal_lm", "trainer.max_steps=6",
                            f"run_dir={tmp_path / 'again'}"))
    again_model = again.setup().model
    a = {n: p for n, p in again_model.named_parameters() if ".lora_A." in n}
    assert a and all(torch.equal(before[n], p) for n, p in a.items())
    again.close()

    exported = AutoPeftModelForCausalLM.from_pretrained(str(trainer.run_dir / "final")).eval()
    ids = torch.randint(0, 64, (2, 9))
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids).logits, trainer.model(input_ids=ids).logits)
