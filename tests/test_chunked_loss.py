"""The chunked language-model loss (distft/chunked_loss.py) gives the loss, the gradients
and the eval statistics of the full-logits loss, on a plain model and under PEFT LoRA."""
import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import TINY, losses, read_metrics, run_cli
from distft import chunked_loss
from distft.tasks.base import IGNORE


def tiny_llama(tied: bool):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg)


def tiny_lora(model):
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    for n, p in model.named_parameters():  # LoRA B starts at zero: make it matter
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    return model


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 300, (3, 17), generator=g)
    labels = ids.clone()
    labels[0, :5] = IGNORE     # a masked prompt
    labels[2, 11:] = IGNORE    # padding
    mask = torch.ones_like(ids)
    mask[2, 11:] = 0
    return ids, mask, labels


def full_loss(model, ids, mask, labels):
    logits = model(input_ids=ids, attention_mask=mask).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE, reduction="sum")


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("lora", [False, True])
def test_same_loss_gradients_and_eval_as_full_logits(tied, lora):
    model = tiny_llama(tied)
    if lora:
        model = tiny_lora(model)
    assert chunked_loss.why_not(model, "single") is None
    ids, mask, labels = batch()

    expected = full_loss(model, ids, mask, labels)
    expected.backward()
    expected_grads = grads(model)
    model.zero_grad(set_to_none=True)

    tap = chunked_loss.HiddenStateTap(model)
    out = model(input_ids=ids, attention_mask=mask, logits_to_keep=1)
    assert out.logits.shape[1] == 1, "the model computed one position's logits only"
    got = chunked_loss.loss_sum(tap.take(), tap.head, labels, chunk=7)
    got.backward()
    assert float(got.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    got_grads = grads(model)
    assert got_grads.keys() == expected_grads.keys() and got_grads
    for name in expected_grads:
        # Float sums in another order: within a millionth of the gradient's scale.
        scale = float(expected_grads[name].abs().max())
        torch.testing.assert_close(got_grads[name], expected_grads[name], rtol=1e-4, atol=1e-6 * scale, msg=name)

    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, logits_to_keep=1)
        sums = chunked_loss.eval_sums(tap.take(), tap.head, labels, chunk=5)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    keep = labels[:, 1:] != IGNORE
    assert sums["count"] == int(keep.sum())
    assert sums["loss_sum"] == pytest.approx(float(expected), rel=1e-6)
    assert sums["correct"] == int((logits.argmax(-1)[keep] == labels[:, 1:][keep]).sum())
    tap.remove()


def test_refused_where_the_output_layer_is_sharded():
    assert "shards the output layer" in chunked_loss.why_not(tiny_llama(True), "fsdp")
    # ZeRO-3's hooks gather the output layer for the chunks' calls (tests/test_distributed.py)
    assert chunked_loss.why_not(tiny_llama(True), "zero3") is None


def test_ranks_agree_on_the_number_of_output_layer_calls():
    """Under ZeRO-3 each call of the output layer is a collective: a rank with fewer target
    rows makes as many calls as the others, the extra ones on no rows, with the same loss,
    gradients and eval sums."""
    model = tiny_llama(True)
    ids, mask, labels = batch()
    tap = chunked_loss.HiddenStateTap(model)
    calls = []
    head = tap.head
    counted = head.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    n_rows = int((labels[:, 1:] != IGNORE).sum())

    def run(agree):
        model.zero_grad()
        calls.clear()
        model(input_ids=ids, attention_mask=mask, logits_to_keep=1)
        loss = chunked_loss.loss_sum(tap.take(), head, labels, chunk=7, agree=agree)
        loss.backward()
        model(input_ids=ids, attention_mask=mask, logits_to_keep=1)
        sums = chunked_loss.eval_sums(tap.take(), head, labels, chunk=7, agree=agree)
        return loss.detach(), grads(model), sums, list(calls)

    loss, g, sums, own = run(None)
    agreed = -(-n_rows // 7) + 3
    loss2, g2, sums2, more = run(lambda n: max(n, agreed))
    assert loss2 == loss and sums2 == sums
    assert g2.keys() == g.keys() and all(torch.equal(g[k], g2[k]) for k in g)
    # 1 call inside each model forward (logits_to_keep), then the chunks: in the forward, the
    # backward's recomputation and the evaluation
    assert own.count(0) == 0 and more.count(0) == 3 * 3
    assert len(more) - len(own) == 3 * 3
    counted.remove()
    tap.remove()


def test_frozen_output_layer_is_cast_once_under_autocast():
    """Under bf16 autocast a frozen fp32 output layer (LoRA's tied embedding) is cast once
    for all the chunks instead of by each chunk's call: the same loss, gradients and eval
    sums, bit for bit, as calling the layer chunk by chunk (the path sharded parameters
    take), without the per-chunk calls."""
    model = tiny_lora(tiny_llama(True))
    ids, mask, labels = batch()
    tap = chunked_loss.HiddenStateTap(model)
    head = tap.head
    assert not head.weight.requires_grad and head.weight.dtype == torch.float32
    calls = []
    counted = head.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))

    def run(agree):
        model.zero_grad()
        calls.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=ids, attention_mask=mask, logits_to_keep=1)
            loss = chunked_loss.loss_sum(tap.take(), head, labels, chunk=7, agree=agree)
        loss.backward()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=ids, attention_mask=mask, logits_to_keep=1)
            sums = chunked_loss.eval_sums(tap.take(), head, labels, chunk=7, agree=agree)
        return loss.detach(), grads(model), sums, len(calls)

    loss, g, sums, once = run(None)
    loss2, g2, sums2, each = run(lambda n: n)  # as where parameters are sharded: the module per chunk
    assert loss == loss2 and sums == sums2
    assert g.keys() == g2.keys() and g and all(torch.equal(g[k], g2[k]) for k in g)
    chunks = -(-int((labels[:, 1:] != IGNORE).sum()) // 7)
    assert once == 2 and each == 2 + 3 * chunks  # the two model forwards; then forward, recompute, eval
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert chunked_loss._cast_once(head, torch.zeros(1, 32), sharded=False).dtype == torch.bfloat16
        assert chunked_loss._cast_once(head, torch.zeros(1, 32), sharded=True) is None
    assert chunked_loss._cast_once(head, torch.zeros(1, 32), sharded=False) is None  # no autocast: as is
    counted.remove()
    tap.remove()


def test_frozen_output_layer_takes_its_gradient_in_the_forward():
    """A frozen output layer (LoRA, BitFit, partial) has each chunk's gradient computed right
    after its loss instead of the logits being recomputed in backward: the loss and the
    gradients of the full-logits loss under an upstream factor (the trainer's 1/tokens),
    in fp32 and within bf16 rounding under autocast; a trained output layer (full fine-tune)
    keeps the checkpointed chunks."""
    model = tiny_lora(tiny_llama(True))
    ids, mask, labels = batch()
    tap = chunked_loss.HiddenStateTap(model)
    (full_loss(model, ids, mask, labels) / 7).backward()
    expected = grads(model)
    for bf16 in (False, True):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model(input_ids=ids, attention_mask=mask, logits_to_keep=1)
            loss = chunked_loss.loss_sum(tap.take(), tap.head, labels, chunk=7)
        assert type(loss.grad_fn).__name__ == "_FrozenHeadLossFnBackward"
        (loss / 7).backward()
        got = grads(model)
        assert got.keys() == expected.keys() and got
        for name in expected:
            scale = float(expected[name].abs().max())
            tol = dict(rtol=0.05, atol=0.02 * scale) if bf16 else dict(rtol=1e-4, atol=1e-6 * scale)
            torch.testing.assert_close(got[name], expected[name], **tol, msg=name)
    tap.remove()

    full = tiny_llama(True)
    tap = chunked_loss.HiddenStateTap(full)
    full(input_ids=ids, attention_mask=mask, logits_to_keep=1)
    loss = chunked_loss.loss_sum(tap.take(), tap.head, labels, chunk=7)
    assert type(loss.grad_fn).__name__ != "_FrozenHeadLossFnBackward"
    tap.remove()


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["task=instruction", "data.packing=true"]], ids=["causal_lm", "instruction-packed"])
def test_training_run_matches_full_logits(tmp_path, reference, extra):
    common = [*TINY, "trainer.max_steps=6", "trainer.lr=3e-3", "logger.log_every=1", *extra]
    full_dir = reference(*common, "trainer.loss_chunk_size=0")
    proc = run_cli(*common, "trainer.loss_chunk_size=16", f"run_dir={tmp_path / 'chunked'}")
    assert "loss in chunks of 16 target tokens" in proc.stdout + proc.stderr
    full, chunked = losses(full_dir), losses(tmp_path / "chunked")
    assert sorted(chunked) == list(range(1, 7))
    for step in full:
        assert chunked[step] == pytest.approx(full[step], rel=1e-5), step
    ev = lambda d: [e["eval/loss"] for e in read_metrics(d) if "eval/loss" in e][-1]  # noqa: E731
    assert ev(tmp_path / "chunked") == pytest.approx(ev(full_dir), rel=1e-5)
