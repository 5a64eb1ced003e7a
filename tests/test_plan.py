"""distft-plan: exact parameter counts from the meta device, the published model-state
figures, DeepSpeed's own estimators, what each backend divides, the activation count
against autograd's saved tensors, and a plan that does not fit naming a change that does."""
import json
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import ROOT, TINY

from distft import plan
from distft.models import lean
from distft.models.loading import load_model, load_tokenizer, resolve_model_path
from distft.strategies import build_strategy, count_parameters
from distft.tasks import task_class


def real_counts(cfg):
    info = task_class(cfg).info_for(cfg)
    info = type(info)(info.name, info.num_labels or 2, info.predicts)
    tok = load_tokenizer(cfg.model, resolve_model_path(cfg.model))
    model = load_model(cfg.model, info.predicts, tok, info.num_labels)
    model = build_strategy(cfg.strategy).apply(model, info)
    return count_parameters(model)


@pytest.mark.parametrize("overrides", [
    [*TINY, "strategy=full"],
    [*TINY, "strategy=lora"],
    [*TINY, "strategy=bitfit"],
    ["model=minilm", "task=classification", "task.num_labels=3", "strategy=lora"],
])
def test_meta_device_counts_equal_the_real_model(overrides):
    cfg = plan.compose(overrides)
    c = plan.count_model(cfg)
    trainable, total = real_counts(cfg)
    assert (c.trainable, c.total) == (trainable, total)
    assert c.frozen == total - trainable and c.layers > 0 and c.largest_block > 0


def test_zero_paper_model_states_for_7_5b_on_64_gpus():
    # Rajbhandari et al., ZeRO (2020), Figure 1: 7.5B parameters, 64 GPUs, mixed-precision Adam.
    got = [plan.model_states_bytes(7.5e9, 64, stage) / 1e9 for stage in (0, 1, 2, 3)]
    for value, published in zip(got, [120, 31.4, 16.6, 1.9]):
        assert value == pytest.approx(published, rel=0.02)


@pytest.mark.parametrize("params,layer,per_node,nodes", [(1.3e9, 5.2e7, 8, 1), (13e9, 2.1e8, 8, 4)])
def test_model_states_agree_with_deepspeeds_estimators(params, layer, per_node, nodes):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    n = per_node * nodes
    c = plan.Counts(int(params), int(params), 0, int(layer), 24, 2048, 8192, 2048, 16, 50000, "next_tokens")
    for backend, offload in (("zero2", False), ("zero2", True), ("zero3", False), ("zero3", True)):
        s = plan.Shape(backend, n, nodes, 1, 1, 1, "bf16", 4, 4, False, 0, offload, False, "sdpa")
        parts, _ = plan.memory_parts(c, s)
        states = parts["weights"] + parts["gradients"] + parts["optimizer"]
        if backend == "zero2":
            _, gpu = estimate_zero2_model_states_mem_needs(int(params), per_node, nodes, cpu_offload=offload)
        else:
            _, gpu, _ = estimate_zero3_model_states_mem_needs(int(params), int(layer), per_node, nodes,
                                                              cpu_offload=offload, cpu_offload_params=False)
        assert states == pytest.approx(gpu, rel=0.02), (backend, offload)


def test_each_backend_divides_what_it_shards():
    c = plan.Counts(10**9, 10**9, 0, 10**7, 20, 2048, 8192, 512, 16, 32000, "next_tokens")

    def parts(backend, n):
        s = plan.Shape(backend, n, 1, 1, 512, 1, "fp32", 4, 4, False, 0, False, False, "sdpa")
        return plan.memory_parts(c, s)[0]

    one, eight = parts("ddp", 1), parts("ddp", 8)
    assert eight["weights"] == one["weights"] and eight["optimizer"] == one["optimizer"]
    for backend, sharded in (("zero1", {"optimizer"}), ("zero2", {"optimizer", "gradients"}),
                             ("zero3", {"optimizer", "gradients", "weights"}),
                             ("fsdp", {"optimizer", "gradients", "weights"})):
        two, four = parts(backend, 2), parts(backend, 4)
        for key in ("weights", "gradients", "optimizer"):
            if key in sharded:
                assert four[key] < 0.6 * two[key], (backend, key)
            else:  # whole (zero1 keeps only an fp32 partition of the gradients beside them)
                assert four[key] > 0.75 * two[key], (backend, key)
        assert two["activations"] == one["activations"]  # a micro-batch's activations are not sharded


@pytest.mark.parametrize("trained,lean_acts", [("all", False), ("lora", False), ("lora-nodropout", False),
                                               ("biases", False), ("none", False), ("all", True), ("lora", True)])
def test_activation_count_matches_autograds_saved_tensors(trained, lean_acts):
    # Frozen layers need not keep their inputs (LoRA keeps the attention's for its A matrices).
    cfg = LlamaConfig(vocab_size=300, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
                      attention_bias=True, mlp_bias=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.config._attn_implementation = "sdpa"
    if trained.startswith("lora"):
        from peft import LoraConfig, get_peft_model

        dropout = 0.0 if trained == "lora-nodropout" else 0.05  # distft's default
        model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"], lora_dropout=dropout)).base_model.model
    elif trained != "all":
        for name, p in model.named_parameters():
            p.requires_grad_(trained == "biases" and name.endswith(".bias"))
    if lean_acts:  # trainer.lean_activations (distft/models/lean.py)
        lean.apply(model)
    b, s = 2, 128
    ids = torch.randint(0, 300, (b, s))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:  # a weight kept for its gradient is no extra memory
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    hidden = model.model.embed_tokens(ids).detach().requires_grad_(True)  # a block after trained ones
    rope = model.model.rotary_emb(hidden, torch.arange(s)[None])
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model.layers[0](hidden, position_embeddings=rope, attention_mask=None)
    delta = plan.saved_delta_per_token(model.model.layers[0], 256, 688)
    assert (delta == 0) == (trained == "all" and not lean_acts)
    c = plan.Counts(0, 0, 0, 0, 1, 256, 688, 2 * 32, 8, 300, "next_tokens", 0, delta)
    shape = plan.Shape("single", 1, 1, b, s, 1, "fp32", 4, 4, False, 0, False, False, "sdpa")
    assert plan.activation_bytes(c, shape) == pytest.approx(sum(saved.values()), rel=0.1)


def test_a_plan_that_does_not_fit_names_a_change_that_does():
    c = plan.Counts(7 * 10**9, 7 * 10**9, 0, 2 * 10**8, 32, 4096, 11008, 4096, 32, 32000, "next_tokens")
    s = plan.Shape("ddp", 8, 1, 4, 2048, 1, "bf16", 4, 4, False, 0, False, False, "flash_attention_2")
    p = plan.plan(c, s, plan.DEVICES["h100"], 0.4)
    assert not p.fits and p.suggestion, p
    if p.suggestion != ["strategy=lora"]:
        assert plan.plan(c, plan.shape_with(s, p.suggestion), plan.DEVICES["h100"], 0.4, suggest=False).fits
    assert p.suggestion_total_gb <= 80


def test_cli_prints_a_plan_and_json(tmp_path):
    args = [sys.executable, "-m", "distft.plan", *TINY, "backend=fsdp", "plan.gpu=h100", "plan.nodes=2",
            "plan.gpus_per_node=8", "plan.tokens=1e9"]
    text = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    assert text.returncode == 0, text.stderr
    assert "memory per process (GB)" in text.stdout and "fits" in text.stdout and "device-hours" in text.stdout
    out = subprocess.run(args + ["--json"], cwd=ROOT, capture_output=True, text=True)
    data = json.loads(out.stdout)
    assert data["shape"]["processes"] == 16 and data["fits"] and data["epoch_hours"] > 0
    bad = subprocess.run([sys.executable, "-m", "distft.plan", *TINY, "plan.gpu=tpu"], cwd=ROOT,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "plan.gpu='tpu'" in bad.stderr


def test_peak_holds_the_forward_or_the_step_where_gradients_do_not_outlive_it():
    # single/ddp/zero1/zero2 make the gradients as backward releases the activations and
    # free them after the step: the peak is the larger phase. zero3 keeps its gradient
    # partition (only the step's temporaries alternate); fsdp's parts all add up.
    c = plan.Counts(10**8, 10**8, 0, 10**6, 12, 768, 3072, 768, 12, 50000, "next_tokens", 4 * 10**7)
    for backend, n in (("single", 1), ("ddp", 2), ("zero1", 2), ("zero2", 2), ("zero3", 2), ("fsdp", 2)):
        for batch, seq in ((1, 32), (16, 1024)):  # the step's phase larger, then the forward's
            s = plan.Shape(backend, n, 1, batch, seq, 1, "fp32", 4, 4, False, 0, False, False, "sdpa")
            parts, _ = plan.memory_parts(c, s)
            p = plan.plan(c, s, plan.DEVICES["h100"], 0.4, suggest=False)
            total = sum(parts.values()) + plan.DEVICES["h100"].runtime_gb * 1e9
            forward = parts["activations"] + parts["logits"]
            step = {"zero3": 0, "fsdp": 0}.get(backend, parts.get("gradients", 0)) + parts.get("step temporaries", 0)
            if backend == "fsdp":
                assert p.total_gb * 1e9 == pytest.approx(total)
                continue
            assert p.total_gb * 1e9 == pytest.approx(total - min(forward, step)), backend
            assert (forward > step) == (batch == 16), (backend, forward, step)
        if backend == "single":
            assert parts["step temporaries"] == 2 * 4 * c.largest_tensor  # torch's AdamW, tensor by tensor
        if backend == "zero2":
            assert parts["step temporaries"] == 2 * 4 * c.trainable / n  # one flat fp32 partition
    s = plan.Shape("ddp", 2, 1, 1, 1024, 1, "fp32", 4, 4, False, 0, False, False, "sdpa", True)
    assert plan.memory_parts(c, s)[0]["step temporaries"] == 4 * c.trainable  # foreach on CUDA: all at once
