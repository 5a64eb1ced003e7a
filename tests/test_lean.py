"""Lean activations (distft/models/lean.py): the values autograd's own ops give, fewer saved tensors."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import compose_cfg, losses, run_torchrun, TINY
from distft.models import lean


def saved_bytes(fn, *args):
    """Run fn(*args) under saved-tensor hooks: the bytes of the distinct storages it keeps
    for backward, parameters left out (they exist anyway), and its output."""
    seen = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return sum(seen.values()), out


def grads(out, *tensors):
    torch.manual_seed(7)
    return torch.autograd.grad(out, tensors, torch.randn_like(out))


@pytest.mark.parametrize("autocast,shape", [(False, (3, 7, 24)), (True, (3, 7, 24)), (False, (3, 5, 7))])
def test_dropout_linear_gives_dropout_then_linear(autocast, shape):
    """With torch's rng (trainer.lean_dropout_rng=torch) bit for bit nn.Dropout then nn.Linear,
    also where the mask's element count is not a multiple of 8 (its bits padded)."""
    torch.manual_seed(0)
    x = torch.randn(*shape, requires_grad=True)
    plain = torch.nn.Linear(shape[-1], 4, bias=False)
    fused = lean.DropoutLinear.fuse(plain, 0.3, torch_rng=True)
    assert fused.weight is plain.weight and [n for n, _ in fused.named_parameters()] == ["weight"]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        torch.manual_seed(1)
        want = plain(F.dropout(x, 0.3, training=True))
        torch.manual_seed(1)  # the same random stream: the same mask
        got = fused(x)
    assert got.dtype == want.dtype and torch.equal(got, want)
    for g, w in zip(grads(got, x, plain.weight), grads(want, x, plain.weight)):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    fused.eval()  # no dropout, the plain linear
    assert torch.equal(fused(x), plain(x))


@pytest.mark.parametrize("autocast,shape", [(False, (3, 7, 24)), (True, (3, 7, 24)), (False, (3, 5, 7))])
def test_dropout_linear_with_the_fast_mask_is_linear_of_the_masked_input(autocast, shape):
    """The fast mask (the default): the output and gradients of linear(x * mask / (1 - rate))
    for the mask `_fast_keep` draws from the same seed."""
    torch.manual_seed(0)
    x = torch.randn(*shape, requires_grad=True)
    plain = torch.nn.Linear(shape[-1], 4, bias=False)
    fused = lean.DropoutLinear.fuse(plain, 0.3)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        torch.manual_seed(1)
        mask = lean._fast_keep(x, 0.3)
        want = plain(x * mask / (1 - lean.fast_rate(0.3)))
        torch.manual_seed(1)
        got = fused(x)
    assert got.dtype == want.dtype
    tol = dict(rtol=2e-2, atol=1e-2) if autocast else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got, want, **tol)
    got_grads = grads(got, x, plain.weight)
    for g, w in zip(got_grads, grads(want, x, plain.weight)):
        torch.testing.assert_close(g, w, **tol)
    assert torch.equal(got_grads[0] == 0, ~mask)  # the dropped elements get no gradient


@pytest.mark.parametrize("p", [0.05, 0.1, 0.3, 0.5])
def test_fast_mask_drops_at_the_rate_asked(p):
    """Each element dropped with probability fast_rate(p) (within 1/65536 of p), in each of
    the four int16 lanes of a 64-bit draw alike; seeded; a new draw each call."""
    assert abs(lean.fast_rate(p) - p) <= 0.5 / 65536
    like = torch.empty(1000, 1001)
    torch.manual_seed(0)
    mask = lean._fast_keep(like, p)
    assert mask.shape == like.shape and mask.dtype == torch.bool
    sigma = (p * (1 - p) / like.numel()) ** 0.5
    assert abs((~mask).float().mean().item() - p) < 5 * sigma
    lanes = (~mask).reshape(-1)[: like.numel() // 4 * 4].view(-1, 4).float().mean(0)
    assert (lanes - p).abs().max().item() < 5 * 2 * sigma
    torch.manual_seed(0)
    assert torch.equal(lean._fast_keep(like, p), mask)
    assert not torch.equal(lean._fast_keep(like, p), mask)


def test_modules_reading_one_input_keep_it_once():
    """q, k and v's adapters read the same x: kept once, plus a mask of bits each, instead of
    a dropped copy and an fp32 noise tensor each."""
    torch.manual_seed(0)
    x = torch.randn(4, 32, 64, requires_grad=True)
    linears = [torch.nn.Linear(64, 8, bias=False) for _ in range(3)]
    fused = [lean.DropoutLinear.fuse(m, 0.1) for m in linears]
    plain_bytes, _ = saved_bytes(lambda: [m(F.dropout(x, 0.1, True)) for m in linears])
    lean_bytes, _ = saved_bytes(lambda: [m(x) for m in fused])
    assert plain_bytes >= 6 * x.nbytes
    assert lean_bytes == x.nbytes + 3 * x.numel() // 8  # x, three masks of one bit an element


def test_swiglu_keeps_gate_and_up_only():
    torch.manual_seed(0)
    gate, up = torch.randn(2, 9, 40, requires_grad=True), torch.randn(2, 9, 40, requires_grad=True)
    plain_bytes, want = saved_bytes(lambda: F.silu(gate) * up)
    lean_bytes, got = saved_bytes(lean.swiglu, gate, up)
    assert torch.equal(got, want)
    for g, w in zip(grads(got, gate, up), grads(want, gate, up)):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    assert plain_bytes == 3 * gate.nbytes and lean_bytes == 2 * gate.nbytes


@pytest.mark.parametrize("x_dtype,w_dtype,trainable", [(torch.bfloat16, torch.bfloat16, False),
                                                      (torch.bfloat16, torch.float32, True),
                                                      (torch.float32, torch.float32, True)])
def test_lean_rms_norm_gives_transformers_values_keeping_its_input_and_one_scale_a_row(x_dtype, w_dtype, trainable):
    """A bf16 stream with a frozen bf16 norm (LoRA under bf16), a trainable fp32 norm on a
    bf16 stream (partial training), fp32 throughout: transformers' forward values, its
    gradients (bf16's rounding apart), and x plus one fp32 scale a row kept for backward."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    plain = LlamaRMSNorm(48, eps=1e-5)
    plain.weight.data = (1 + 0.1 * torch.randn(48)).to(w_dtype)
    plain.weight.requires_grad_(trainable)
    norm = LlamaRMSNorm(48, eps=1e-5)
    norm.load_state_dict(plain.state_dict())
    norm.weight.data = norm.weight.data.to(w_dtype)
    norm.weight.requires_grad_(trainable)
    assert lean.apply(norm, norms=True) == ["RMSNorm keeping its input and one scale a row in 1 norms"]
    assert lean.lean_rms_norm(norm) and lean.apply(norm, norms=True) == []  # once
    x = (3 * torch.randn(4, 10, 48)).to(x_dtype).requires_grad_()
    plain_bytes, want = saved_bytes(plain, x)
    lean_bytes, got = saved_bytes(norm, x)
    assert got.dtype == want.dtype and torch.equal(got, want)
    assert lean_bytes == x.nbytes + 4 * 10 * 4 < plain_bytes
    wanted = [x, plain.weight] if trainable else [x]
    tol = {"rtol": 2e-2, "atol": 2e-2} if x_dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-6}
    got_grads = grads(got, *([x, norm.weight] if trainable else [x]))
    for g, w in zip(got_grads, grads(want, *wanted)):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g.float(), w.float(), **tol)
    with torch.no_grad():  # without grad: transformers' own forward
        assert torch.equal(norm(x), plain(x))


def test_lora_model_on_a_bf16_stream_runs_with_and_without_autocast():
    """Frozen weights, embeddings and norms in bf16 (Precision.hold_frozen's stream), lean
    applied: peft's cast of each adapter's input to fp32 is off, the adapters cast their
    input themselves where autocast does not; the logits match peft's own modules."""
    from peft import LoraConfig, get_peft_model

    from distft.precision import Precision

    def build():
        model = get_peft_model(tiny_gqa_llama(), LoraConfig(r=4, lora_dropout=0.0,
                                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
        Precision("bf16", "bf16", "test").hold_frozen(model, stream=True)
        return model.eval()

    ids = torch.randint(0, 100, (3, 12), generator=torch.Generator().manual_seed(2))
    plain, fused = build(), build()
    lean.apply(fused, norms=True)
    assert all(isinstance(m, lean.DropoutLinear) for n, m in fused.named_modules() if n.endswith("lora_A.default"))
    assert not any(getattr(m, "cast_input_dtype_enabled", False) for m in fused.modules())
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            want, got = plain(input_ids=ids).logits, fused(input_ids=ids).logits
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def tiny_gqa_llama():
    cfg = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.config._attn_implementation = "sdpa"
    return model


def gqa_attention_inputs():
    """A grouped-query attention layer (8 query, 2 key/value heads) with q, k, v and a causal
    bool mask whose first row is left-padded; lean's SDPA registered."""
    attn = tiny_gqa_llama().model.layers[0].self_attn
    torch.manual_seed(1)
    q = torch.randn(2, 8, 10, 8, requires_grad=True)
    k, v = torch.randn(2, 2, 10, 8, requires_grad=True), torch.randn(2, 2, 10, 8, requires_grad=True)
    mask = torch.ones(10, 10, dtype=torch.bool).tril().expand(2, 1, 10, 10).clone()
    mask[0, :, :, :3] = False  # left padding in the first row
    mask[0, :, :3, 0] = True
    lean._register_sdpa()
    return attn, q, k, v, mask


def test_gqa_attention_on_cpu_keeps_the_key_value_heads_unrepeated():
    attn, q, k, v, mask = gqa_attention_inputs()
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    plain_bytes, (want, _) = saved_bytes(sdpa_attention_forward, attn, q, k, v, mask)
    lean_bytes, (got, _) = saved_bytes(lean.sdpa_attention, attn, q, k, v, mask)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for g, w in zip(grads(got, q, k, v), grads(want, q, k, v)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    # transformers repeats k and v to 8 heads (2 x 3 x q's size more); here they stay at 2
    assert plain_bytes - lean_bytes >= 2 * 3 * k.nbytes
    # the layers of one forward share one additive float mask (SDPA would make one each)
    assert lean._additive(mask, q.dtype) is lean._additive(mask, q.dtype)
    two_layers, _ = saved_bytes(lambda: [lean.sdpa_attention(attn, q, k, v, mask)[0] for _ in range(2)])
    assert two_layers == 2 * lean_bytes - q.nbytes - k.nbytes - v.nbytes - mask.numel() * 4  # q/k/v are the same too
    # without a mask (or off CPU) transformers' own function runs
    _, (no_mask, _) = saved_bytes(lean.sdpa_attention, attn, q, k, v, None)
    torch.testing.assert_close(no_mask, sdpa_attention_forward(attn, q, k, v, None)[0], rtol=0, atol=0)



def test_gqa_attention_under_bf16_autocast_keeps_one_mask_for_every_layer():
    """Under CPU autocast SDPA computes in bf16: the additive mask is made once in bf16, so
    the layers of a forward keep one mask for backward, not a bf16 cast each."""
    attn, q, k, v, mask = gqa_attention_inputs()
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kept = []

    def pack(t):
        kept.append((tuple(t.shape), t.dtype, t.data_ptr()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        outs = [lean.sdpa_attention(attn, q, k, v, mask)[0] for _ in range(3)]
    masks = {(dtype, ptr) for shape, dtype, ptr in kept if shape == tuple(mask.shape)}
    assert len(masks) == 1 and next(iter(masks))[0] == torch.bfloat16, masks
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = sdpa_attention_forward(attn, q, k, v, mask)[0]
    assert outs[0].dtype == torch.bfloat16
    torch.testing.assert_close(outs[0], want, rtol=0, atol=0)

def test_apply_on_a_lora_model_same_logits_and_gradients():
    from peft import LoraConfig, get_peft_model

    def build():
        model = get_peft_model(tiny_gqa_llama(), LoraConfig(r=4, lora_dropout=0.1,
                                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
        model.train()
        return model

    ids = torch.randint(0, 100, (3, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    plain, fused = build(), build()
    done = lean.apply(fused, "torch")  # nn.Dropout's random stream: the same values as peft's modules
    assert done == ["LoRA dropout fused into lora_A on 8 modules (masks from torch's bernoulli_)",
                    "SwiGLU keeping gate and up only in 2 MLPs",
                    "grouped-query attention without repeated key/value heads (CPU SDPA)"]
    assert sorted(plain.state_dict()) == sorted(fused.state_dict())
    assert lean.apply(fused) == done[1:]  # again: nothing more to fuse
    out = {}
    for name, model in (("plain", plain), ("lean", fused)):
        torch.manual_seed(3)
        nbytes, logits = saved_bytes(lambda: model(input_ids=ids, attention_mask=mask).logits)
        logits.float().pow(2).mean().backward()
        out[name] = nbytes, logits, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    torch.testing.assert_close(out["lean"][1], out["plain"][1], rtol=1e-6, atol=1e-6)
    for n, g in out["plain"][2].items():
        torch.testing.assert_close(out["lean"][2][n], g, rtol=1e-4, atol=1e-7)
    # SmolLM2 at 8 x 256 tokens: 0.65 (bench/vs_hf_trainer.py); this model's MLP is narrow
    assert out["lean"][0] < 0.8 * out["plain"][0]


def test_training_with_and_without_lean_activations_gives_the_same_losses(tmp_path, caplog):
    from distft.train import run as train

    lora = ["strategy=lora", "strategy.dropout=0.1", "strategy.target_modules=[q_proj,k_proj,v_proj,o_proj]",
            "trainer.max_steps=4", "trainer.eval_every=0", "trainer.save_every=0"]
    with caplog.at_level("INFO", logger="distft"):
        train(compose_cfg(tmp_path / "lean", [*TINY, *lora, "trainer.lean_dropout_rng=torch"]))
    assert "lean activations: LoRA dropout fused into lora_A on 8 modules (masks from torch's" in caplog.text
    train(compose_cfg(tmp_path / "plain", [*TINY, *lora, "trainer.lean_activations=false"]))
    got, want = losses(tmp_path / "lean"), losses(tmp_path / "plain")
    assert list(got) == list(want) == [1, 2, 3, 4]
    assert got == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("backend", ["fsdp", "zero3"])
def test_fused_lora_dropout_on_sharded_backends_gives_the_same_losses(tmp_path, backend):
    """FSDP2 and ZeRO-3 gather lora_A's weight for DropoutLinear's forward and backward as
    for a plain Linear: two processes, the same losses with and without lean activations."""
    run = [*TINY, f"backend={backend}", "strategy=lora", "strategy.dropout=0.1", "trainer.max_steps=3",
           "trainer.eval_every=0", "trainer.save_every=0"]
    run_torchrun(2, *run, "trainer.lean_dropout_rng=torch", f"run_dir={tmp_path / 'lean'}")
    run_torchrun(2, *run, "trainer.lean_activations=false", f"run_dir={tmp_path / 'plain'}")
    got, want = losses(tmp_path / "lean"), losses(tmp_path / "plain")
    assert list(got) == [1, 2, 3] and got == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("numel", [1, 7, 8, 9, 64, 1001])
def test_mask_bits_round_trip(numel):
    torch.manual_seed(numel)
    mask = torch.rand(numel) > 0.3
    bits = lean._pack(mask)
    assert bits.dtype == torch.uint8 and bits.numel() == (numel + 7) // 8
    assert [bool(bits[i // 8] >> (i % 8) & 1) for i in range(numel)] == mask.tolist()  # bit j of byte i: 8i + j
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        like = torch.empty(numel, dtype=dtype)
        assert torch.equal(lean._unpack_noise(bits, like, 0.3), mask.to(dtype).div_(0.7))


def test_unknown_dropout_rng_is_refused(tmp_path):
    from distft.errors import ConfigError
    from distft.trainer import check_config

    with pytest.raises(ConfigError, match="trainer.lean_dropout_rng='bits': choose fast or torch"):
        check_config(compose_cfg(tmp_path / "bad", [*TINY, "trainer.lean_dropout_rng=bits"]))


def test_lora_layers_add_through_lora_b_and_fall_back_to_peft_when_merged_or_disabled():
    """After apply, lora_B adds its scaled product to the frozen output in one addmm (the
    same logits as peft's forward, checked above); with the adapters disabled, or merged
    into the base weights, peft's own forward runs and gives its own results."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_gqa_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for p in model.parameters():  # non-zero lora_B, so the adapters change the logits
        torch.nn.init.normal_(p, std=0.2)
    lean.apply(model)
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q.lora_B["default"], lean.AddmmLinear) and "lora_B.default.weight" in dict(q.named_parameters())
    model.eval()
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        model.merge_adapter()
        merged = model(input_ids=ids).logits
        model.unmerge_adapter()
        again = model(input_ids=ids).logits
    assert not torch.allclose(adapted, base, atol=1e-3)
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(again, adapted, rtol=1e-5, atol=1e-5)


def test_lean_norms_outlast_eval_and_train_on_a_model_loaded_from_a_folder(tmp_path):
    """transformers 5 kernelizes what from_pretrained loads when the `kernels` package is
    installed, and each train()/eval() of the model then kernelizes it again, which resets
    forwards set on module instances to their class's: lean's norms were undone by the
    first evaluation of a run. distft loads without kernels; the norms stay lean."""
    from types import SimpleNamespace

    from distft.models import load_model

    tiny_gqa_llama().save_pretrained(tmp_path / "model")
    cfg = compose_cfg(tmp_path / "run", ["model=hf", f"model.path={tmp_path / 'model'}"])
    model = load_model(cfg.model, "next_tokens", SimpleNamespace(pad_token_id=0))
    lean.apply(model, norms=True)
    norms = [m for m in model.modules() if type(m).__name__ == "LlamaRMSNorm"]
    assert len(norms) == 5 and all(map(lean.lean_rms_norm, norms))
    model.eval()
    model.train()
    assert all(map(lean.lean_rms_norm, norms))
    assert not getattr(model, "use_kernels", False)


@pytest.mark.parametrize("trainable", [False, True])
def test_compiled_rms_norm_gives_the_eager_lean_norms_values_and_keeps_as_little(trainable):
    """cpu_elementwise=compiled: the norm's forward and input gradient as compiled kernels.
    On a bf16 stream (frozen bf16 weight, or a trainable fp32 one) the values and gradients
    of RMSNormFn within one bf16 rounding, and the same tensors kept for backward."""
    torch.manual_seed(0)
    w = (1 + 0.1 * torch.randn(48)).to(torch.float32 if trainable else torch.bfloat16).requires_grad_(trainable)
    x = (3 * torch.randn(4, 10, 48)).bfloat16().requires_grad_()
    eager_bytes, want = saved_bytes(lean.RMSNormFn.apply, x, w, 1e-5)
    compiled_bytes, got = saved_bytes(lean.RMSNormFn.apply, x, w, 1e-5, True)
    assert lean.kernels_work() and lean._rms_norm_fwd.compiled is not None
    assert compiled_bytes == eager_bytes and got.dtype == want.dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)
    wrt = [x, w] if trainable else [x]
    for g, e in zip(grads(got, *wrt), grads(want, *wrt)):
        assert g.dtype == e.dtype
        torch.testing.assert_close(g.float(), e.float(), rtol=2e-2, atol=2e-2)


def test_compiled_swiglu_gives_the_eager_values_and_keeps_gate_and_up_only():
    torch.manual_seed(0)
    gate, up = (torch.randn(2, 9, 40).bfloat16().requires_grad_() for _ in range(2))
    eager_bytes, want = saved_bytes(lean.swiglu, gate, up)
    compiled_bytes, got = saved_bytes(lean.swiglu, gate, up, True)
    assert lean.kernels_work() and lean._swiglu_bwd.compiled is None  # backward not run yet
    assert compiled_bytes == eager_bytes == 2 * gate.nbytes
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)
    for g, e in zip(grads(got, gate, up), grads(want, gate, up)):
        torch.testing.assert_close(g.float(), e.float(), rtol=2e-2, atol=2e-2)
    assert lean._swiglu_bwd.compiled is not None


def test_a_kernel_that_cannot_be_compiled_runs_eager_after_one_warning():
    """A machine without a working C++ compiler (here: inductor pointed at one that does not
    exist, in a process of its own: inductor caches the compiler it found): the eager
    function's values, one warning, and every kernel eager from then on."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import logging, torch
        import torch._inductor.config as inductor_config
        from distft.models import lean
        inductor_config.cpp.cxx = ("/nonexistent/c++",)
        inductor_config.fx_graph_cache = False
        logging.basicConfig(level=logging.WARNING, format="LOG %(message)s")

        def axpb(a, b):
            return a * b + 0.5

        kernel = lean._Kernel(axpb)
        a, b = torch.randn(64), torch.randn(64)
        assert torch.equal(kernel(a, b), axpb(a, b)) and torch.equal(kernel(a, b), axpb(a, b))
        print("WORKS", lean.kernels_work())
    """)
    # An error of the arithmetic itself (mismatched shapes) is raised, not taken for a
    # compiler that does not work: the kernels stay on.
    kernel = lean._Kernel(lambda a, b: a * b)
    with pytest.raises(RuntimeError, match="size of tensor a"):
        kernel(torch.randn(3), torch.randn(4))
    assert lean.kernels_work()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=str(Path(__file__).resolve().parent.parent))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "WORKS False" in proc.stdout
    assert proc.stderr.count("LOG compiled element-wise kernels unavailable, eager instead") == 1, proc.stderr[-3000:]


def test_training_in_bf16_with_compiled_and_eager_elementwise(tmp_path, caplog):
    """bf16 on CPU compiles the lean norms' and SwiGLUs' element-wise work by default (the log
    says so), cpu_elementwise=eager does not; the same losses within bf16 rounding, and the
    norms stay compiled across evaluations. fp32 runs compile nothing; an unknown choice is
    refused at config time."""
    from distft.errors import ConfigError
    from distft.train import run as train
    from distft.trainer import check_config

    run = [*TINY, "trainer.precision=bf16", "strategy=lora", "strategy.dropout=0.1", "trainer.max_steps=4",
           "trainer.eval_every=2", "trainer.save_every=0"]
    with caplog.at_level("INFO", logger="distft"):
        train(compose_cfg(tmp_path / "compiled", run))
    assert "RMSNorm keeping its input and one scale a row in 5 norms, compiled" in caplog.text
    assert "SwiGLU keeping gate and up only in 2 MLPs, compiled" in caplog.text
    assert lean.kernels_work() and lean._rms_norm_grad_x.compiled is not None
    caplog.clear()
    with caplog.at_level("INFO", logger="distft"):
        train(compose_cfg(tmp_path / "eager", [*run, "trainer.cpu_elementwise=eager"]))
    assert "RMSNorm keeping its input and one scale a row in 5 norms\n" in caplog.text + "\n"
    assert ", compiled" not in caplog.text
    got, want = losses(tmp_path / "compiled"), losses(tmp_path / "eager")
    assert list(got) == list(want) == [1, 2, 3, 4]
    assert got == pytest.approx(want, rel=2e-2)
    caplog.clear()
    with caplog.at_level("INFO", logger="distft"):
        train(compose_cfg(tmp_path / "fp32", [*run, "trainer.precision=fp32"]))
    assert "SwiGLU keeping gate and up only in 2 MLPs" in caplog.text and ", compiled" not in caplog.text
    with pytest.raises(ConfigError, match="trainer.cpu_elementwise='fused': choose compiled or eager"):
        check_config(compose_cfg(tmp_path / "bad", [*TINY, "trainer.cpu_elementwise=fused"]))
