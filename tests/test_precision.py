"""trainer.precision=auto follows the hardware: bf16 where matmuls have a native bf16
kernel, fp32 elsewhere; bf16 asked for on a CPU without it runs, with one measured
warning. The capability is faked for the decision; a real AVX2-only CPU is emulated by
limiting oneDNN and ATen to AVX2 (what CI runs on, whatever the machine)."""
import json
import math
import os
import subprocess
import sys

import pytest

from conftest import ROOT, TINY, run_cli
from distft import precision
from distft.errors import ConfigError

# What a CPU without AVX512-BF16/AMX looks like to torch (and bf16 matmuls really run
# on oneDNN's slow path under it).
AVX2_ONLY = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def native(answer):
    return lambda: (answer, "faked capability")


@pytest.mark.parametrize("on_gpu,has_bf16,expected", [
    (False, False, "fp32"),  # AVX2-only CPU
    (False, True, "bf16"),   # AVX512-BF16 / AMX CPU
    (True, True, "bf16"),    # A100, H100
    (True, False, "fp32"),   # a GPU without bf16 (V100, T4)
])
def test_auto_follows_the_hardware(on_gpu, has_bf16, expected):
    p = precision.resolve("auto", on_gpu=on_gpu, native_bf16=native(has_bf16))
    assert (p.name, p.requested, p.native_bf16) == (expected, "auto", has_bf16)
    assert p.reason == "faked capability"


def test_explicit_choices():
    assert precision.resolve("fp32", on_gpu=False).name == "fp32"
    # bf16 asked for runs even without the kernel (the warning says what it costs)
    p = precision.resolve("bf16", on_gpu=False, native_bf16=native(False))
    assert (p.name, p.native_bf16) == ("bf16", False)
    assert precision.resolve("fp16", on_gpu=True).name == "fp16"
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        precision.resolve("fp16", on_gpu=False)
    with pytest.raises(ConfigError, match=r"trainer.precision='half': choose one of \['auto', 'fp32', 'bf16', 'fp16'\]"):
        precision.resolve("half", on_gpu=False)


def test_autocast_dtype():
    import torch

    with precision.Precision("bf16", "auto", "", True).autocast("cpu"):
        assert (torch.ones(4, 4) @ torch.ones(4, 4)).dtype == torch.bfloat16
    with precision.Precision("fp32", "auto", "", False).autocast("cpu"):
        assert (torch.ones(4, 4) @ torch.ones(4, 4)).dtype == torch.float32


def test_avx2_only_cpu_is_recognised():
    """In a process limited to AVX2 the check says no, and measures bf16 far below fp32."""
    code = ("from distft import precision; import torch, json; ok, why = precision.cpu_has_native_bf16(); "
            "print(json.dumps({'ok': ok, 'why': why, 'cap': precision.cpu_capability(), "
            "'bf16': precision.measured_matmul_gflops(torch.bfloat16), "
            "'fp32': precision.measured_matmul_gflops(torch.float32)}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, **AVX2_ONLY})
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["ok"] is False and got["cap"].startswith("AVX2"), got
    assert "bf16" in got["why"].lower() and "AVX2" in got["why"], got
    assert got["bf16"] > 0 and got["fp32"] > 0


def test_runs_say_what_they_picked(tmp_path):
    """On an AVX2-only CPU the default picks fp32 and says why; bf16 asked for runs,
    warning once with the measured matmul rates."""
    args = [a for a in TINY if not a.startswith("trainer.precision=")] + ["trainer.max_steps=2"]
    proc = run_cli(*args, f"run_dir={tmp_path / 'auto'}", env=AVX2_ONLY)
    log = proc.stdout + proc.stderr
    # a real AVX2 CPU lacks the instructions; an emulated one has them switched off
    assert ("precision auto -> fp32: this CPU (AVX2) has no AVX512-BF16 or AMX-BF16 matmul kernel" in log
            or "precision auto -> fp32: oneDNN's bf16 kernels are switched off on this CPU (AVX2+" in log), log[-3000:]
    assert json.loads((tmp_path / "auto" / "summary.json").read_text())["precision"] == "fp32"

    proc = run_cli(*args, "trainer.precision=bf16", f"run_dir={tmp_path / 'bf16'}", env=AVX2_ONLY)
    log = proc.stdout + proc.stderr
    assert log.count("trainer.precision=bf16 on a CPU without native bf16") == 1, log[-3000:]
    assert "GFLOP/s in bf16 against" in log
    assert json.loads((tmp_path / "bf16" / "summary.json").read_text())["precision"] == "bf16"


def test_fp16_loss_scaler_skips_inf_steps_and_lowers_the_scale():
    """The loop's fp16 path through Backend.step, with the scaler fp16 builds (on CPU, where
    torch's GradScaler also runs; the end-to-end fp16 run needs CUDA, below)."""
    import torch

    from distft.backends.single import SingleBackend

    p16 = precision.Precision("fp16", "fp16", "asked for")
    backend = SingleBackend(None)
    backend.scaler = p16.grad_scaler("cpu")
    assert isinstance(backend.scaler, torch.amp.GradScaler) and backend.scales_loss
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 4)
    scale0 = backend.scaler.get_scale()

    backend.backward(model(x).pow(2).mean())
    assert model.weight.grad.abs().max() > 0  # scaled by 65536, not underflowed
    before = model.weight.detach().clone()
    norm, stepped = backend.step(model, opt, max_grad_norm=1.0)
    assert stepped and math.isfinite(norm) and not torch.equal(before, model.weight)
    assert backend.scaler.get_scale() == scale0  # no overflow: the scale holds (until growth_interval)

    backend.backward(model(x).pow(2).mean() * float("inf"))  # an overflowing step
    before = model.weight.detach().clone()
    norm, stepped = backend.step(model, opt, max_grad_norm=1.0)
    assert not stepped and torch.equal(before, model.weight)
    assert backend.scaler.get_scale() == scale0 / 2


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="fp16 training needs CUDA (bench/gpu_check.sh runs it)")
def test_fp16_run_uses_the_scaler(tmp_path):
    from conftest import read_metrics

    run = tmp_path / "run"
    run_cli(*TINY, "trainer.precision=fp16", "trainer.max_steps=20", f"run_dir={run}")
    scales = [e["loss_scale"] for e in read_metrics(run) if "loss_scale" in e]
    assert len(scales) == 20 and all(math.isfinite(e["loss"]) for e in read_metrics(run) if "loss" in e)


def test_fp16_is_refused_on_cpu():
    with pytest.raises(ConfigError, match="trainer.precision=fp16 needs a GPU"):
        precision.resolve("fp16", on_gpu=False)


def test_bf16_holds_frozen_weights_in_bf16(cfg_for):
    """LoRA under bf16 with an fp32 stream (trainer.bf16_stream=false): frozen matmul
    weights bf16, adapters and their optimizer state fp32; the run trains and exports an
    fp32 adapter."""
    import torch

    from distft.trainer import Trainer

    trainer = Trainer(cfg_for("strategy=lora", "trainer.precision=bf16", "trainer.max_steps=3",
                              "trainer.lr=1e-2", "trainer.bf16_stream=false")).setup()
    linear = {id(p) for m in trainer.model.modules() if isinstance(m, torch.nn.Linear) for p in m.parameters()}
    embedding = {id(m.weight) for m in trainer.model.modules() if isinstance(m, torch.nn.Embedding)}
    params = list(trainer.model.parameters())
    frozen_linear = [p for p in params if not p.requires_grad and id(p) in linear - embedding]
    assert frozen_linear and {p.dtype for p in frozen_linear} == {torch.bfloat16}
    # The residual stream stays fp32: embeddings (and a head tied to them) and norms keep theirs.
    others = [p for p in params if id(p) not in linear or id(p) in embedding]
    assert others and {p.dtype for p in others} == {torch.float32}
    assert {p.dtype for p in params if p.requires_grad} == {torch.float32}
    summary = trainer.train()
    assert math.isfinite(summary["eval/loss"])
    assert all(s["exp_avg"].dtype == torch.float32 for s in trainer.optimizer.state.values())
    from safetensors.torch import load_file

    adapter = load_file(str(trainer.run_dir / "final" / "adapter_model.safetensors"))
    assert adapter and {t.dtype for t in adapter.values()} == {torch.float32}
    # Off: every weight stays fp32.
    off = Trainer(cfg_for("strategy=lora", "trainer.precision=bf16", "trainer.max_steps=1",
                          "trainer.frozen_in_bf16=false", "run_dir=" + str(trainer.run_dir) + "-off")).setup()
    assert {p.dtype for p in off.model.parameters()} == {torch.float32}


def test_bf16_stream_holds_every_frozen_weight_in_bf16(cfg_for, tmp_path):
    """The default under bf16: embeddings and norms too, so the residual stream is bf16;
    the norms are lean ones; trainable weights and the export stay fp32; the losses are an
    fp32 stream's within bf16's rounding."""
    import torch
    from safetensors.torch import load_file

    from conftest import compose_cfg, losses
    from distft.models import lean
    from distft.trainer import Trainer

    run = ["strategy=lora", "trainer.precision=bf16", "trainer.max_steps=4", "trainer.lr=1e-2"]
    trainer = Trainer(cfg_for(*run)).setup()
    params = list(trainer.model.parameters())
    assert {p.dtype for p in params if not p.requires_grad} == {torch.bfloat16}
    assert {p.dtype for p in params if p.requires_grad} == {torch.float32}
    norms = [m for m in trainer.model.modules() if type(m).__name__ == "LlamaRMSNorm"]
    assert norms and all(lean.lean_rms_norm(m) for m in norms)
    summary = trainer.train()
    assert math.isfinite(summary["eval/loss"])
    adapter = load_file(str(trainer.run_dir / "final" / "adapter_model.safetensors"))
    assert adapter and {t.dtype for t in adapter.values()} == {torch.float32}
    fp32_stream = Trainer(compose_cfg(tmp_path / "fp32-stream", [*TINY, *run, "trainer.bf16_stream=false"])).setup()
    fp32_stream.train()
    got, want = losses(trainer.run_dir), losses(tmp_path / "fp32-stream")
    assert list(got) == [1, 2, 3, 4] and got == pytest.approx(want, rel=2e-2)
