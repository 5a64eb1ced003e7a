"""Attention on CPU by two bf16 matmuls and a softmax, the probabilities kept for backward.

`trainer.cpu_attention=matmul` (the default; `flash` turns it off). On CPU, SDPA runs
PyTorch's flash kernel: it keeps only q, k, v, the output and one log-sum-exp a row, and
its backward recomputes the probabilities block by block, most of a step's attention time
on 2 cores of an AMX Xeon. The same work as whole bf16 matmuls (AMX tiles) and one softmax,
keeping the probabilities, was 1.9x faster forward and backward at SmolLM2-135M's 9 query /
3 key-value heads and 8 packed rows of 256 tokens (6.3 against 12.1 ms a layer), 1.5-1.7x
at 512 to 2048 keys (`python bench/attention.py`, BENCHMARKS.md). The price is memory: the
probabilities are kept in bf16, heads x keys x 2 bytes a token and layer (4.5 KiB at 9
heads and 256 keys; SmolLM2 LoRA packed bf16's peak RSS 2033 -> 2272 MiB in
bench/vs_hf_trainer.py). So this path runs only where that is small:

- training (grad enabled), on CPU, computing in bf16 (autocast's dtype or the inputs');
- at most `MAX_KEYS` keys (512), a bool mask as transformers passes to sdpa, no
  attention dropout, no sinks or position bias (plain attention);
- not inside a compiled region (`trainer.compile`: the compiler makes its own attention
  there; traced into the compiled blocks this path made SmolLM2's step slower, 3.4
  against 2.4 s).

Everything else (eval, fp32, long contexts, GPUs) keeps SDPA as before. Grouped-query
attention runs without repeated key/value heads: the query heads that share a key/value
head are one matrix of G x T rows (transformers' and SDPA's head order, h // G).

Numbers: the scores are rounded to bf16 before the softmax (as transformers' eager
attention computes them under autocast); the flash kernel keeps them in fp32. Against an
fp32 reference the output's relative error was 0.8% here against 0.5% for flash in bf16
(tests/test_matmul_attention.py holds it within twice flash's). Masked scores are the
dtype's lowest finite value, not -inf, so a row with nothing to attend to (left padding)
averages v instead of making NaN; its gradient is zero where the loss ignores that
position, as it does padding.

Written here because no library ships a CPU attention with a fast backward: the fused
kernels (flash-attn, xformers, Liger) are GPU kernels, and PyTorch's own CPU choices are
the flash kernel above and the math path (which repeats the key/value heads and keeps
scores and probabilities both).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

MAX_KEYS = 512
# The mark sdpa_attention looks for on an attention module (set by `mark`).
ATTR = "distft_cpu_attention"


class _MatmulAttentionFn(torch.autograd.Function):
    """softmax(scale q k^T + mask) v for q (B, H, T, D), k and v (B, KV, S, D), mask
    (B or 1, 1, T, S) additive, all one dtype; keeps q, k, v and the probabilities."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scale):
        b, h, t, d = q.shape
        kv, s = k.shape[1], k.shape[2]
        g = h // kv
        with torch.autocast(q.device.type, enabled=False):
            qg = q.contiguous().view(b, kv, g * t, d)
            scores = torch.matmul(qg, k.transpose(-1, -2)).view(b, kv, g, t, s)
            # one pass for the scale and the mask: scores = mask + scale * scores
            torch.add(mask.unsqueeze(1), scores, alpha=scale, out=scores)
            probs = torch.softmax(scores, -1).view(b, kv, g * t, s)
            del scores
            out = torch.matmul(probs, v).view(b, h, t, d)
        ctx.scale = scale
        ctx.save_for_backward(qg, k, v, probs)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        qg, k, v, probs = ctx.saved_tensors
        b, kv, gt, d = qg.shape
        with torch.autocast(qg.device.type, enabled=False):
            go = grad_out.to(qg.dtype).contiguous().view(b, kv, gt, d)
            grad_v = torch.matmul(probs.transpose(-1, -2), go)  # sums over the G query heads
            grad_p = torch.matmul(go, v.transpose(-1, -2))
            grad_s = torch._softmax_backward_data(grad_p, probs, -1, probs.dtype)
            del grad_p
            grad_q = torch.matmul(grad_s, k).mul_(ctx.scale).view(grad_out.shape)
            grad_k = torch.matmul(grad_s.transpose(-1, -2), qg).mul_(ctx.scale)
        return grad_q, grad_k, grad_v, None, None


def _compute_dtype(query: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(query.device.type):
        return torch.get_autocast_dtype(query.device.type)
    return query.dtype


def applies(module: nn.Module, query, key, value, attention_mask, dropout: float, kwargs) -> bool:
    """Whether this call takes the matmul path (the conditions in the module docstring)."""
    return (getattr(module, ATTR, None) == "matmul" and query.device.type == "cpu"
            and torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and (query.requires_grad or key.requires_grad or value.requires_grad)
            and _compute_dtype(query) == torch.bfloat16
            and attention_mask is not None and attention_mask.dtype == torch.bool and attention_mask.dim() == 4
            and attention_mask.shape[1] == 1 and key.shape[-2] <= MAX_KEYS
            and not dropout and kwargs.get("s_aux") is None and kwargs.get("position_bias") is None
            and key.shape[1] == value.shape[1] and query.shape[1] % key.shape[1] == 0
            and key.shape[-1] == value.shape[-1] == query.shape[-1])


_MASK = []  # [bool mask, its version, dtype, additive form]: the one the layers of a forward share


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The bool mask as an additive one (0 / the dtype's lowest value), made once per forward."""
    if _MASK and _MASK[0] is mask and _MASK[1] == mask._version and _MASK[2] == dtype:
        return _MASK[3]
    additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
    _MASK[:] = [mask, mask._version, dtype, additive]
    return additive


def attend(query, key, value, attention_mask, scaling: Optional[float]) -> torch.Tensor:
    """The attention output in transformers' layout (B, T, H, D)."""
    dtype = _compute_dtype(query)
    mask = _additive(attention_mask, dtype)[:, :, :, : key.shape[-2]]
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    out = _MatmulAttentionFn.apply(query.to(dtype), key.to(dtype), value.to(dtype), mask, scale)
    return out.transpose(1, 2).contiguous()


def mark(model: nn.Module) -> int:
    """Let the attention modules of `model` that run transformers' sdpa take the matmul path
    where it applies; returns how many were marked."""
    from distft.models import lean

    marked = 0
    for module in model.modules():
        config = getattr(module, "config", None)
        if (type(module).__name__.endswith("Attention") and hasattr(module, "num_key_value_groups")
                and getattr(config, "_attn_implementation", None) == "sdpa"):
            setattr(module, ATTR, "matmul")
            marked += 1
    if marked:
        lean._register_sdpa()
    return marked
