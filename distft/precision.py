"""The precision a run computes in, decided once: `trainer.precision=auto|fp32|bf16|fp16`.

`auto` (the default) takes bf16 autocast where the hardware runs bf16 matmuls natively
and fp32 elsewhere. On a CPU without a bf16 kernel (AVX2 only: no AVX512-BF16, no AMX)
oneDNN emulates bf16 at a few hundred times fp32's cost, so the README's "bf16 is
faster" holds only on some machines; the log says which was picked and why.

To see what a machine without native bf16 does, limit oneDNN and ATen to AVX2
(`ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2`): the check below honours it, and
bf16 matmuls then really run on the slow path.
"""
from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

from distft.errors import ConfigError

log = logging.getLogger("distft")

CHOICES = ("auto", "fp32", "bf16", "fp16")
# Everything that depends on the precision asks the Precision below: the loop's autocast
# and loss scaler, FSDP's mixed-precision policy, DeepSpeed's bf16/fp16 blocks, and which
# frozen weights are held in bf16.
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    name: str  # what runs: fp32 | bf16 | fp16
    requested: str  # what the config asked for
    reason: str
    native_bf16: Optional[bool] = None  # None when not asked (fp32/fp16 asked for)

    @property
    def dtype(self) -> Optional[torch.dtype]:
        """The autocast dtype, None for fp32."""
        return DTYPES.get(self.name)

    def autocast(self, device_type: str):
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(device_type=device_type, dtype=self.dtype)

    def grad_scaler(self, device_type: str, sharded: bool = False):
        """fp16's dynamic loss scaling (gradients underflow in fp16 without it), else None.
        `sharded`: FSDP's variant, which finds infs across the shards of every rank."""
        if self.name != "fp16":
            return None
        if sharded:
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            return ShardedGradScaler(device_type)
        return torch.amp.GradScaler(device_type)

    def fsdp_policy(self, device_type: str):
        """FSDP2's mixed precision: compute in the autocast dtype, reduce gradients in
        fp32. Only on GPU; on CPU FSDP keeps fp32 and the loop's autocast does the casting."""
        if self.dtype is None or device_type != "cuda":
            return None
        from torch.distributed.fsdp import MixedPrecisionPolicy

        return MixedPrecisionPolicy(param_dtype=self.dtype, reduce_dtype=torch.float32)

    def deepspeed_sections(self) -> dict:
        """DeepSpeed's precision blocks. fp16 uses DeepSpeed's own dynamic loss scaling
        (the loop's scaler is not used under ZeRO)."""
        return {"bf16": {"enabled": self.name == "bf16"}, "fp16": {"enabled": self.name == "fp16"}}

    def hold_frozen(self, model: torch.nn.Module, stream: bool = False) -> int:
        """Under bf16, keep frozen weights in bf16; trainable weights and the optimizer state
        stay fp32. Autocast caches its casts only for weights that require grad, so a frozen
        fp32 weight is cast again at every matmul.

        Without `stream`, only the frozen weights of nn.Linear layers: embeddings (and a head
        tied to them) and norms keep their dtype, so the residual stream stays fp32 and every
        layer's input is cast to bf16 by each matmul that reads it (q, k, v, gate and up each
        cast the same norm output). With `stream` (what the loop asks for where lean
        activations apply, whose RMSNorm keeps bf16 inputs for backward instead of fp32
        copies), also every module whose own parameters are all frozen: embeddings, norms,
        a tied head. The residual stream is then bf16, as in a model loaded in bf16, and
        those casts go: SmolLM2 LoRA packed 855 -> 929 tokens/s on an AMX Xeon, peak RSS
        2220 -> 2029 MiB (`python bench/ab.py trainer.bf16_stream false true`).
        Returns how many parameters were cast."""
        if self.name != "bf16":
            return 0
        embeddings = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
        n = 0
        for module in model.modules():
            own = list(module.parameters(recurse=False))
            if isinstance(module, torch.nn.Linear):
                cast = [p for p in own if not p.requires_grad and (stream or id(p) not in embeddings)]
            elif stream and own and not any(p.requires_grad for p in own):
                cast = own
            else:
                cast = []
            for p in cast:
                if p.dtype == torch.float32:
                    p.data = p.data.to(torch.bfloat16)
                    n += p.numel()
        return n  # buffers (rotary frequencies, ...) keep their dtype


FP32 = Precision("fp32", "fp32", "the default")


def _cpu_features() -> dict:
    """What cpuinfo reports of this CPU (empty on torch releases without the call)."""
    return dict(torch.cpu.get_capabilities()) if hasattr(torch.cpu, "get_capabilities") else {}


def cpu_capability() -> str:
    """ATen's vector ISA (AVX2, AVX512, ...) with the bf16 extensions the CPU reports."""
    caps = _cpu_features()
    extras = [name.upper() for name in ("avx512_bf16", "amx_bf16") if caps.get(name)]
    return "+".join([torch.backends.cpu.get_cpu_capability(), *extras])


def cpu_has_native_bf16() -> Tuple[bool, str]:
    """Whether this CPU's matmuls have a bf16 kernel, and why (or why not).

    x86 needs AVX512-BF16 or AMX-BF16 (plain AVX-512 emulates the dot products), and
    oneDNN allowed to use them (ONEDNN_MAX_CPU_ISA); elsewhere oneDNN's own check decides
    (Arm's BF16 extension)."""
    cap = cpu_capability()
    onednn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    caps = _cpu_features()
    if caps.get("architecture", "x86_64") in ("x86_64", "x86", "i386", "AMD64"):
        has_isa = bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))
        if not has_isa:
            return False, f"this CPU ({cap}) has no AVX512-BF16 or AMX-BF16 matmul kernel"
        if not onednn:
            return False, f"oneDNN's bf16 kernels are switched off on this CPU ({cap}; ONEDNN_MAX_CPU_ISA?)"
        return True, f"this CPU ({cap}) has native bf16 matmuls"
    if not onednn:
        return False, f"oneDNN has no bf16 kernel for this CPU ({cap})"
    return True, f"oneDNN has bf16 kernels for this CPU ({cap})"


def gpu_has_native_bf16() -> Tuple[bool, str]:
    name = torch.cuda.get_device_name()
    if torch.cuda.is_bf16_supported(including_emulation=False):
        return True, f"the GPU ({name}) runs bf16 natively"
    return False, f"the GPU ({name}) has no native bf16"


def native_bf16_here() -> Tuple[bool, str]:
    """The check `auto` uses, for this machine's device (the benchmarks skip bf16 on it)."""
    return gpu_has_native_bf16() if torch.cuda.is_available() else cpu_has_native_bf16()


def measured_matmul_gflops(dtype: torch.dtype, n: int = 256, budget_s: float = 0.3) -> float:
    """GFLOP/s of an n x n matmul on the CPU in `dtype`: the best of up to 20 calls within
    about `budget_s` seconds (the first calls can be slow while threads start)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    best, spent = float("inf"), 0.0
    for _ in range(20):
        started = time.perf_counter()
        a @ b
        took = time.perf_counter() - started
        best, spent = min(best, took), spent + took
        if spent > budget_s:
            break
    return 2 * n**3 / best / 1e9


def resolve(requested: str, on_gpu: Optional[bool] = None,
            native_bf16: Optional[Callable[[], Tuple[bool, str]]] = None) -> Precision:
    """Turn the config's choice into what runs. `on_gpu` and `native_bf16` default to
    this machine's (a test passes its own to fake a capability)."""
    if requested not in CHOICES:
        raise ConfigError(f"trainer.precision={requested!r}: choose one of {list(CHOICES)}")
    on_gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
    if requested == "fp16":
        if not on_gpu:
            raise ConfigError("trainer.precision=fp16 needs a GPU; use bf16 or fp32 on CPU")
        return Precision("fp16", requested, "asked for")
    if requested == "fp32":
        return Precision("fp32", requested, "asked for")
    native, why = (native_bf16 or (gpu_has_native_bf16 if on_gpu else cpu_has_native_bf16))()
    if requested == "auto":
        return Precision("bf16" if native else "fp32", requested, why, native)
    # bf16 asked for: it runs either way, but hardware without the kernel pays for it.
    return Precision("bf16", requested, why, native)


def report(p: Precision, device_type: str) -> None:
    """Log the decision; warn once, with measured numbers, when bf16 was asked for on a CPU
    that emulates it."""
    if p.requested == "auto":
        log.info("precision auto -> %s: %s", p.name, p.reason)
    elif p.name == "bf16" and p.native_bf16 is False:
        log.warning(slow_bf16_warning(p.reason) if device_type == "cpu" else
                    f"trainer.precision=bf16: {p.reason}; it is emulated and slower than fp32 there")
    else:
        log.info("precision %s (asked for)", p.name)


def slow_bf16_warning(reason: str) -> str:
    fp32, bf16 = measured_matmul_gflops(torch.float32), measured_matmul_gflops(torch.bfloat16)
    return (f"trainer.precision=bf16 on a CPU without native bf16: {reason}; a 256x256 matmul ran at "
            f"{bf16:.2f} GFLOP/s in bf16 against {fp32:.1f} in fp32 ({fp32 / max(bf16, 1e-9):.0f}x slower). "
            "trainer.precision=auto (or fp32) picks fp32 here.")


__all__ = ["CHOICES", "Precision", "cpu_capability", "cpu_has_native_bf16", "measured_matmul_gflops",
           "native_bf16_here", "report",
           "resolve", "slow_bf16_warning"]


def main(argv=None) -> int:
    """`python -m distft.precision [N]`: this machine's bf16 check and its matmul rates."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    n = int(args[0]) if args else 1024
    on_gpu = torch.cuda.is_available()
    native, why = native_bf16_here()
    print(f"cpu capability: {cpu_capability()}")
    print(f"native bf16: {native} ({why})")
    print(f"precision=auto picks: {resolve('auto').name}")
    if not on_gpu:
        fp32 = measured_matmul_gflops(torch.float32, n, budget_s=2.0)
        bf16 = measured_matmul_gflops(torch.bfloat16, n, budget_s=2.0)
        print(f"{n}x{n} matmul: fp32 {fp32:.1f} GFLOP/s, bf16 {bf16:.2f} GFLOP/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
