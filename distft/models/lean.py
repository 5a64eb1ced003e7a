"""Leaner activations: the same forward numbers, fewer tensors kept from forward for backward.

`trainer.lean_activations=true` (the default). What autograd keeps per token and layer is
most of a step's memory, and three places keep more than backward needs:

- **LoRA's dropout.** peft computes `lora_B(lora_A(dropout(x)))` on each target module.
  Autograd then keeps, per module, the fp32 dropout mask (torch's CPU dropout multiplies
  by a float noise tensor) and the dropped copy of x for lora_A's weight gradient. On
  q/k/v/o that is eight activation-sized tensors per layer, though q, k and v read the
  same x. `DropoutLinear` (lora_A with its dropout fused) keeps x itself, shared by the
  modules that read it, and the mask as bits (an eighth of a bool mask); the dropped copy
  is rebuilt in backward (one multiply). The mask is drawn from 16 random bits an element,
  four elements from each 64-bit draw (`trainer.lean_dropout_rng=fast`, the default):
  torch's `bernoulli_` draws one number an element, and SmolLM2 LoRA packed bf16 ran at
  743 tokens/s with it, 943 this way (an AMX Xeon, 2 cores; `python bench/ab.py
  trainer.lean_dropout_rng fast torch --repeats 3 --malloc tcmalloc`). Elements drop at
  rate round(65536 p) / 65536 (p = 0.05: 0.0500031) and the kept ones are scaled by the
  inverse of its complement, so the dropped input is unbiased as with nn.Dropout; the
  values differ from nn.Dropout's random stream. `trainer.lean_dropout_rng=torch` draws
  with `bernoulli_` as nn.Dropout does: the same forward values as the unfused modules.
  Not about what is kept, but on the same modules: lora_B adds its scaled product to the
  frozen layer's output in one addmm (`AddmmLinear`), where peft's `result + lora_B(h) *
  scaling` made three passes over the output forward and one backward.
- **RMSNorm.** transformers' `weight * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(x.dtype)`
  keeps the fp32 copy of x and the normalized fp32 x for backward; with a bf16 residual
  stream (`Precision.hold_frozen`'s `stream`) that is four bytes an element kept twice per
  norm, against the two of x. `RMSNormFn` keeps x as it came and one fp32 scale a row,
  and recomputes the normalized x in backward: the same forward values, at about
  autograd's speed (forward and backward of 8 x 256 x 576 in bf16: 3.2-4.2 ms against
  3.6 on 2 CPU cores).
- **SwiGLU.** `down(silu(gate) * up)` keeps gate (for silu), silu(gate) and up (for the
  product); `SwiGLU` keeps gate and up and recomputes silu in backward (element-wise).
- **Grouped-query attention on CPU.** transformers repeats the key/value heads to the
  query heads' count whenever a mask is passed (CUDA's SDPA kernels fall back to the math
  path for GQA with a mask), and SDPA keeps the repeated copies. PyTorch's CPU flash
  kernel takes GQA with a mask directly (`enable_gqa`), faster and without the copies;
  `sdpa_attention` uses it on CPU and leaves every other case to transformers' own
  function. It also turns the bool mask into SDPA's additive float mask once per forward,
  which the layers then share (given the bool mask, each layer kept its own float copy).
  It is registered under transformers' "sdpa" name (its AttentionInterface), so configs
  and exported models still say sdpa.
- **Compiled element-wise work** (`trainer.cpu_elementwise=compiled`, the default; bf16
  training on CPU only). Eager, the norm and SwiGLU are a pass over memory per op (about
  eight forward and ten backward for the norm); `RMSNormFn` and `_SwiGLUFn` with
  `compiled` run the same arithmetic with each forward and backward one loop that torch.compile
  (inductor) generates, the matmuls staying eager. SmolLM2 LoRA packed bf16 on an AMX
  Xeon, 2 cores: 563 against 509 tokens/s (`python bench/ab.py trainer.cpu_elementwise
  compiled eager --repeats 3 --malloc tcmalloc`). Values within a bf16 rounding of the eager ones
  (inductor keeps fp32 between ops where eager rounds to bf16), the same tensors kept.
  The first step compiles (a few seconds); where compiling fails, eager after a warning.

Written here because the libraries that fuse these (Liger's kernels, Unsloth) are Triton
kernels for GPUs and patch model classes wholesale; these are plain PyTorch autograd
functions put on the modules of one model, on CPU and GPU alike.

Not applied where per-example gradients are computed from module hooks (privacy=dp:
Opacus reads each nn.Linear's input, which DropoutLinear would hide behind its own op).
"""
from __future__ import annotations

import functools
import logging
import sys
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from distft.models import matmul_attention

log = logging.getLogger("distft")

# Modules marked with this attribute (`apply(..., compiled=True)`) run their element-wise work
# through the compiled kernels below.
COMPILED_ATTR = "distft_compiled_elementwise"


class _Kernel:
    """fn compiled by torch.compile at its first call (inductor: one loop over the tensors in
    place of a pass over memory per op; on CPU a C++ loop, vectorized). Shapes: static at
    first, a recompile with the changed dimension dynamic when another comes. Where
    compiling fails (no C++ compiler, a platform inductor lacks), every kernel runs its eager
    fn for the rest of the process, after one warning."""

    broken: Optional[str] = None

    def __init__(self, fn):
        self.fn, self.compiled = fn, None
        functools.update_wrapper(self, fn)

    def __call__(self, *args):
        if _Kernel.broken is None:
            if self.compiled is None:
                self.compiled = torch.compile(self.fn, fullgraph=True)
            try:
                return self.compiled(*args)
            except Exception as e:  # noqa: BLE001 - whatever the compiler raised
                # An error of the arithmetic itself raises here again, and the kernels stay on.
                out = self.fn(*args)
                _Kernel.broken = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"
                log.warning("compiled element-wise kernels unavailable, eager instead: %s", _Kernel.broken)
                return out
        return self.fn(*args)


def kernels_work() -> bool:
    """False once compiling a kernel has failed in this process."""
    return _Kernel.broken is None

# MLP classes whose forward is down_proj(act_fn(gate_proj(x)) * up_proj(x)) in transformers.
SWIGLU_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")
# Norm classes whose forward is LlamaRMSNorm's: weight * (x.float() * rsqrt(var + eps)).to(x.dtype)
# (not Gemma's, which scales by 1 + weight in fp32).
RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")


def _autocast_state(device_type: str):
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


# The mask as bits: 8 of its bytes (0 or 1) read as one little-endian int64 and multiplied by
# this constant put the 8 bits, in order, in the product's top byte (no carries reach it).
_GATHER_BITS = 0x0102040810204080
_LITTLE_ENDIAN = sys.byteorder == "little"


def _pack(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as one bit per element (uint8, bit j of byte i is element 8i + j); kept as
    it is where the bytes cannot be read that way."""
    if not _LITTLE_ENDIAN:
        return mask
    flat = mask.reshape(-1)
    if flat.numel() % 8:
        flat = F.pad(flat, (0, 8 - flat.numel() % 8))
    words = flat.view(torch.uint8).view(-1, 8).view(torch.int64).squeeze(-1)
    return ((words * _GATHER_BITS) >> 56).to(torch.uint8)


def _unpack_noise(bits: torch.Tensor, like: torch.Tensor, p: float) -> torch.Tensor:
    """The dropout noise (mask / (1 - p), in like's dtype and shape) from `_pack`'s bits: a
    lookup of each byte's 8 values, as fast as converting a bool mask."""
    if bits.dtype == torch.bool:
        return bits.to(like.dtype).div_(1 - p)
    table = _noise_table(p, like.dtype, bits.device)
    return table.index_select(0, bits.int()).view(-1)[: like.numel()].view(like.shape)


@functools.lru_cache(maxsize=None)
def _noise_table(p: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Row b: the 8 noise values byte b stands for (its bits, low first, / (1 - p)); made
    once per dropout rate, dtype and device, not at every backward."""
    table = (torch.arange(256, device=device).unsqueeze(-1) >> torch.arange(8, device=device)) & 1
    return table.to(dtype).div_(1 - p)


# The fast mask: 16 random bits an element, read as int16 (-32768..32767); an element is
# dropped when its value is among the lowest round(65536 p).
_LEVELS = 1 << 16


def fast_rate(p: float) -> float:
    """The dropout rate the fast mask really has for a requested p."""
    return round(p * _LEVELS) / _LEVELS


def _fast_keep(like: torch.Tensor, p: float) -> torch.Tensor:
    """A bool keep-mask of like's shape, each element kept with probability 1 - fast_rate(p):
    one 64-bit draw gives four elements their 16 bits (bernoulli_ costs one draw and a float
    compare an element)."""
    n = like.numel()
    words = _random_words((n + 3) // 4, like.device)
    return (words.view(torch.int16)[:n] >= -(1 << 15) + round(p * _LEVELS)).view(like.shape)


def _random_words(count: int, device: torch.device) -> torch.Tensor:
    """`count` uniformly random int64 words. random_(from, None) from the lowest int64 draws
    the 64 bits as they come; random_(from, to) over the same range took a 64-bit modulo a
    word (3.3 against 2.4 ms for 8 x 256 x 576 elements' words on an AMX Xeon)."""
    return torch.empty(count, dtype=torch.int64, device=device).random_(-(1 << 63), None)


class _DropoutLinearFn(torch.autograd.Function):
    """y = linear(x * noise, w), noise = keep mask / (1 - rate): with torch_rng the mask is
    torch's bernoulli_(1 - p), as nn.Dropout draws it (the same random stream and values as
    nn.Dropout then nn.Linear); else `_fast_keep`'s at rate fast_rate(p). Keeps x, the mask
    as bits and w."""

    @staticmethod
    def forward(ctx, x, weight, p, torch_rng=False):
        if torch_rng:
            mask = torch.empty_like(x).bernoulli_(1 - p).bool()
        else:
            mask, p = _fast_keep(x, p), fast_rate(p)
        # Under torch.compile the bool mask: compiled LoRA blocks keeping the bits trained
        # to NaN (torch 2.13, CPU inductor; test_trainer's compiled test), bool masks do not.
        bits = mask if torch.compiler.is_compiling() else _pack(mask)
        if torch_rng:  # nn.Dropout's own arithmetic: x * (mask / (1 - p))
            out = F.linear(x * mask.to(x.dtype).div_(1 - p), weight)
        else:  # the scale on the narrow output (lora_A's r columns), not on x
            out = F.linear(x * mask, weight) * (1 / (1 - p))
        ctx.p = p
        ctx.autocast = _autocast_state(x.device.type)
        ctx.save_for_backward(x, bits, weight)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, bits, weight = ctx.saved_tensors
        enabled, dtype = ctx.autocast
        noise = _unpack_noise(bits, x, ctx.p)
        # The matmuls of linear's own backward, under the forward's autocast.
        with torch.autocast(x.device.type, dtype=dtype, enabled=enabled):
            g2 = grad_out.reshape(-1, grad_out.shape[-1])
            grad_x = grad_w = None
            if ctx.needs_input_grad[0]:
                grad_x = (g2.mm(weight) * noise.reshape(-1, x.shape[-1])).view(x.shape).to(x.dtype)
            if ctx.needs_input_grad[1]:
                dropped = (x * noise).reshape(-1, x.shape[-1])
                grad_w = g2.t().mm(dropped).to(weight.dtype)
        return grad_x, grad_w, None, None


class DropoutLinear(nn.Linear):
    """peft's lora_A with the adapter's dropout fused in (`p`); the same weight parameter,
    so names, checkpoints and exported adapters do not change. `torch_rng`: draw the mask
    as nn.Dropout does (else the fast mask, `_fast_keep`)."""

    p: float = 0.0
    torch_rng: bool = False

    @classmethod
    def fuse(cls, linear: nn.Linear, p: float, torch_rng: bool = False) -> "DropoutLinear":
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.in_features, fused.out_features, fused.p = linear.in_features, linear.out_features, p
        fused.torch_rng = torch_rng
        fused.weight = linear.weight
        fused.register_parameter("bias", linear.bias)
        fused.train(linear.training)
        return fused

    def forward(self, x):
        # peft casts x to the adapter's dtype before lora_A; `apply` turns that off (x comes
        # from a bf16 residual stream under autocast, and the cast to fp32 was undone by
        # autocast at once), so without autocast the cast is made here.
        if x.dtype != self.weight.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.weight.dtype)
        if self.training and self.p > 0 and torch.is_grad_enabled() and self.bias is None:
            return _DropoutLinearFn.apply(x, self.weight, self.p, self.torch_rng)
        return F.linear(F.dropout(x, self.p, self.training) if self.p > 0 else x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dropout={self.p}{', torch rng' if self.torch_rng and self.p else ''}"


class AddmmLinear(nn.Linear):
    """peft's lora_B, which can also add its scaled product to the frozen layer's output in one
    addmm (`base + alpha * h @ W^T`): the product, the scaling and the sum were three passes
    over the layer's output forward and one backward (at 8 x 256 x 576 in bf16: 1.2 against
    1.9 ms forward and backward). The same weight parameter, so names, checkpoints and
    exported adapters do not change; called as a module, so the hooks of sharded backends
    (ZeRO-3 gathers each module's parameters in its forward's hooks) still run."""

    @classmethod
    def fuse(cls, linear: nn.Linear) -> "AddmmLinear":
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.in_features, fused.out_features = linear.in_features, linear.out_features
        fused.weight = linear.weight
        fused.register_parameter("bias", linear.bias)
        fused.train(linear.training)
        return fused

    def forward(self, h, base=None, alpha: float = 1.0):
        if base is None:
            return F.linear(h, self.weight, self.bias)
        autocast = torch.is_autocast_enabled(h.device.type)
        if self.bias is not None or not (autocast or base.dtype == h.dtype == self.weight.dtype):
            # peft's own arithmetic (mixed dtypes without autocast promote, as peft's sum does)
            return base + F.linear(h, self.weight, self.bias) * alpha
        flat = torch.addmm(base.reshape(-1, base.shape[-1]), h.reshape(-1, h.shape[-1]), self.weight.t(), alpha=alpha)
        return flat.view(*base.shape[:-1], flat.shape[-1])


def _is_peft_lora_linear(module: nn.Module) -> bool:
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError:
        return False
    return type(module) is Linear


def _lora_linear_forward(self, x, *args, **kwargs):
    """peft's LoRA Linear forward where every adapter is plain (no variant), unmerged and
    active for the whole batch: base(x) + scaling * lora_B(lora_A(x)) per adapter, the sum
    made by lora_B's addmm (AddmmLinear); any other case runs peft's own forward."""
    names = [name for name in self.active_adapters if name in self.lora_A]
    if (args or kwargs or self.disable_adapters or self.merged
            or any(name in self.lora_variant or not isinstance(self.lora_B[name], AddmmLinear) for name in names)):
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x)
    dtype = result.dtype
    for name in names:
        result = self.lora_B[name](self.lora_A[name](x), result, self.scaling[name])
    return result.to(dtype)


class RMSNormFn(torch.autograd.Function):
    """transformers' RMSNorm forward (`LlamaRMSNorm`): weight * (x.float() * r).to(x.dtype),
    r = rsqrt(mean(x.float()^2) + eps) per row. Keeps x, r (fp32, one a row) and the weight;
    backward recomputes the normalized x. compiled: the forward and the input gradient each
    one compiled kernel (`_Kernel`), the same arithmetic and the same tensors kept."""

    @staticmethod
    def forward(ctx, x, weight, eps, compiled=False):
        # Rows of the last dimension, so a compiled kernel sees one dimension that varies.
        y, r = (_rms_norm_fwd if compiled else _rms_norm_fwd_eager)(x.reshape(-1, x.shape[-1]), weight, eps)
        ctx.compiled = compiled
        ctx.save_for_backward(x, r, weight)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, grad):
        x, r, weight = ctx.saved_tensors
        x2, g2 = x.reshape(-1, x.shape[-1]), grad.reshape(-1, x.shape[-1])
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = (_rms_norm_grad_x if ctx.compiled else _rms_norm_grad_x_eager)(x2, r, weight, g2).view(x.shape)
        if ctx.needs_input_grad[1]:
            grad_w = (g2.float() * (x2.float() * r).to(x.dtype).float()).sum(0).to(weight.dtype)
        return grad_x, grad_w, None, None


def _rms_norm_fwd_eager(x, weight, eps: float):
    xf = x.float()
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (xf * r).to(x.dtype), r


def _rms_norm_grad_x_eager(x, r, weight, grad):
    # d/dx of x * r: r * (g - xhat * mean(g * xhat)), g the gradient at the normalized x
    xhat, g = x.float() * r, grad.float() * weight.float()
    return (r * (g - xhat * (g * xhat).mean(-1, keepdim=True))).to(x.dtype)


_rms_norm_fwd, _rms_norm_grad_x = _Kernel(_rms_norm_fwd_eager), _Kernel(_rms_norm_grad_x_eager)


def _rms_norm_forward(self, hidden_states):
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        compiled = getattr(self, COMPILED_ATTR, False) and kernels_work()
        return RMSNormFn.apply(hidden_states, self.weight, self.variance_epsilon, compiled)
    # Nothing kept without grad; compiled blocks leave what to keep to the compiler.
    return type(self).forward(self, hidden_states)


def lean_rms_norm(module: nn.Module) -> bool:
    """Whether `apply` gave this norm the lean forward."""
    return getattr(getattr(module, "forward", None), "__func__", None) is _rms_norm_forward


class _SwiGLUFn(torch.autograd.Function):
    """silu(gate) * up keeping gate and up; compiled: forward and backward each one compiled
    kernel (`_Kernel`), in fp32 between ops and rounded once."""

    @staticmethod
    def forward(ctx, gate, up, compiled=False):
        ctx.compiled = compiled
        ctx.save_for_backward(gate, up)
        return _swiglu_fwd(gate, up) if compiled else _swiglu_fwd_eager(gate, up)

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        if ctx.compiled:
            return (*_swiglu_bwd(gate, up, grad), None)
        # As autograd differentiates silu(gate) * up: the product rule, then silu's backward.
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        grad_up = grad * F.silu(gate) if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up, None


def _swiglu_fwd_eager(gate, up):
    return F.silu(gate) * up


def _swiglu_bwd_eager(gate, up, grad):
    # silu(g)' = s (1 + g (1 - s)), s = sigmoid(g); in fp32, rounded once at the end
    gf, s, gradf = gate.float(), torch.sigmoid(gate.float()), grad.float()
    grad_gate = gradf * up.float() * (s * (1 + gf * (1 - s)))
    return grad_gate.to(gate.dtype), (gradf * (gf * s)).to(up.dtype)


_swiglu_fwd, _swiglu_bwd = _Kernel(_swiglu_fwd_eager), _Kernel(_swiglu_bwd_eager)


def swiglu(gate: torch.Tensor, up: torch.Tensor, compiled: bool = False) -> torch.Tensor:
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return _SwiGLUFn.apply(gate, up, compiled and not torch.compiler.is_compiling() and kernels_work())
    return F.silu(gate) * up


def _swiglu_mlp_forward(self, x):
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x), getattr(self, COMPILED_ATTR, False)))


def keeps_gate_and_up(module: nn.Module) -> bool:
    """Whether `apply` gave this MLP the lean SwiGLU."""
    return getattr(getattr(module, "forward", None), "__func__", None) is _swiglu_mlp_forward


def _is_silu(act) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"  # transformers 4.x had its own class


_HF_SDPA = None


def sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' sdpa attention, with grouped-query attention passed to PyTorch's CPU
    kernel as is (no repeated key/value heads) when a mask is given; on modules marked by
    `matmul_attention.mark`, bf16 training on CPU takes that module's path."""
    if matmul_attention.applies(module, query, key, value, attention_mask, dropout, kwargs):
        return matmul_attention.attend(query, key, value, attention_mask, scaling), None
    plain = kwargs.get("s_aux") is None and kwargs.get("position_bias") is None
    if (query.device.type != "cpu" or attention_mask is None or key.shape[1] == query.shape[1] or not plain
            or key.shape[-1] != value.shape[-1]):
        return _HF_SDPA(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                        is_causal=is_causal, **kwargs)
    # Under CPU autocast SDPA computes in autocast's dtype (rotary embeddings hand it fp32 q
    # and k): the mask made in that dtype is the one every layer uses, not cast by each.
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else query.dtype
    mask = _additive(attention_mask, dtype)[:, :, :, : key.shape[-2]]
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling,
                                         enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


_ADDITIVE = []  # [bool mask, its version, its additive form]: the one the layers of a forward share


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask as SDPA's additive float mask (0 / -inf), made once per forward. Given
    the bool mask, SDPA converts it at every layer and each layer keeps its own float copy
    for backward (2 MB a layer at 8 x 256 tokens); given this one, they share it."""
    # Under torch.compile (first: dynamo must not trace the cache, which it would take as a
    # constant), without grad or under inference mode nothing is kept for backward.
    if torch.compiler.is_compiling() or mask.dtype != torch.bool or not torch.is_grad_enabled() or mask.is_inference():
        return mask
    if _ADDITIVE and _ADDITIVE[0] is mask and _ADDITIVE[1] == mask._version and _ADDITIVE[2].dtype == dtype:
        return _ADDITIVE[2]
    additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    _ADDITIVE[:] = [mask, mask._version, additive]
    return additive


def _register_sdpa() -> None:
    global _HF_SDPA
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if _HF_SDPA is None:
        _HF_SDPA = sdpa_attention_forward
        AttentionInterface.register("sdpa", sdpa_attention)


def apply(model: nn.Module, dropout_rng: str = "fast", norms: bool = False, compiled: bool = False) -> List[str]:
    """Put the lean versions on `model` where they apply; returns what was changed.
    dropout_rng: how the fused LoRA dropout draws its masks, fast | torch (see above).
    norms: the lean RMSNorm too (the loop asks for it; off, the norms are transformers').
    compiled: the norms' and SwiGLUs' element-wise work in compiled kernels (see above)."""
    if dropout_rng not in ("fast", "torch"):
        raise ValueError(f"dropout_rng={dropout_rng!r}: fast or torch")
    done = []
    fused = 0
    for module in model.modules():
        drops, lora_a = getattr(module, "lora_dropout", None), getattr(module, "lora_A", None)
        if not isinstance(drops, nn.ModuleDict) or not isinstance(lora_a, nn.ModuleDict):
            continue
        variants = getattr(module, "lora_variant", {}) or {}
        names = [name for name, drop in drops.items() if type(drop) in (nn.Dropout, nn.Identity)
                 and name not in variants and type(lora_a[name] if name in lora_a else None) is nn.Linear
                 and lora_a[name].bias is None]
        for name in names:
            p = drops[name].p if isinstance(drops[name], nn.Dropout) else 0.0
            lora_a[name] = DropoutLinear.fuse(lora_a[name], p, torch_rng=dropout_rng == "torch")
            drops[name] = nn.Identity()
            fused += p > 0
        if names and len(names) == len(drops):
            # Every adapter here casts its own input (DropoutLinear.forward), where needed.
            module.cast_input_dtype_enabled = False
            if _is_peft_lora_linear(module) and all(type(lora_b) is nn.Linear and lora_b.bias is None
                                                    for lora_b in module.lora_B.values()):
                for name in list(module.lora_B):
                    module.lora_B[name] = AddmmLinear.fuse(module.lora_B[name])
                module.forward = _lora_linear_forward.__get__(module)
    if fused:
        done.append(f"LoRA dropout fused into lora_A on {fused} modules"
                    + (" (masks from torch's bernoulli_)" if dropout_rng == "torch" else ""))
    lean_norms = 0
    for module in model.modules() if norms else ():
        if type(module).__name__ in RMS_NORMS and hasattr(module, "variance_epsilon") and not lean_rms_norm(module):
            module.forward = _rms_norm_forward.__get__(module)
            setattr(module, COMPILED_ATTR, compiled)
            lean_norms += 1
    if lean_norms:
        done.append(f"RMSNorm keeping its input and one scale a row in {lean_norms} norms"
                    + (", compiled" if compiled else ""))
    mlps = 0
    for module in model.modules():
        if type(module).__name__ in SWIGLU_MLPS and _is_silu(getattr(module, "act_fn", None)):
            module.forward = _swiglu_mlp_forward.__get__(module)
            setattr(module, COMPILED_ATTR, compiled)
            mlps += 1
    if mlps:
        done.append(f"SwiGLU keeping gate and up only in {mlps} MLPs" + (", compiled" if compiled else ""))
    gqa = any(getattr(m, "num_key_value_groups", 1) > 1 for m in model.modules())
    if gqa and any(getattr(getattr(m, "config", None), "_attn_implementation", None) == "sdpa"
                   for m in model.modules()):
        _register_sdpa()
        done.append("grouped-query attention without repeated key/value heads (CPU SDPA)")
    return done
