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

Under a causal mask (packed rows are causal too) from SPLIT_FROM keys on, the queries are
two halves and the first half meets the first half of the keys only: none of its scores
against the other half would survive the mask. 3/4 of the matmul and softmax work and of
the probabilities kept (one SmolLM2 layer, 8 x 256 tokens, on 2 EPYC cores with
AVX512-BF16: 14.1 against 18.1 ms, `python bench/attention.py`).

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


# Queries and keys from this many up, with a causal mask, are split in two halves of queries.
SPLIT_FROM = 256


class _MatmulAttentionFn(torch.autograd.Function):
    """softmax(scale q k^T + mask) v for q (B, H, T, D), k and v (B, KV, S, D), mask
    (B or 1, 1, T, S) additive, all one dtype; keeps q, k, v and the probabilities.

    `tiles`: (first query, end query, end key) of each block of queries, the keys past its
    end key all masked for every one of its queries (a causal mask: the first half of the
    queries sees the first half of the keys only), so those scores are never computed: at
    256 queries in two halves, 3/4 of the matmul and softmax work. Masked scores give
    probabilities of exactly 0, so leaving them out changes no value but the matmuls'
    order of summation; except at a query that sees no key at all (left padding), which
    averages v over its block's keys instead of all of them (ignored by the loss either way)."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scale, tiles):
        b, h, t, d = q.shape
        kv = k.shape[1]
        g = h // kv
        out = q.new_empty(b, h, t, d)
        kept = []
        with torch.autocast(q.device.type, enabled=False):
            for start, end, keys in tiles:
                qg = q[:, :, start:end].contiguous().view(b, kv, g * (end - start), d)
                scores = torch.matmul(qg, k[:, :, :keys].transpose(-1, -2)).view(b, kv, g, end - start, keys)
                # one pass for the scale and the mask: scores = mask + scale * scores
                torch.add(mask[:, :, start:end, :keys].unsqueeze(1), scores, alpha=scale, out=scores)
                probs = torch.softmax(scores, -1).view(b, kv, g * (end - start), keys)
                del scores
                out[:, :, start:end] = torch.matmul(probs, v[:, :, :keys]).view(b, h, end - start, d)
                kept += [qg, probs]
        ctx.scale, ctx.tiles, ctx.shape = scale, tiles, q.shape
        ctx.save_for_backward(k, v, *kept)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        k, v, *kept = ctx.saved_tensors
        b, h, t, d = ctx.shape
        kv = k.shape[1]
        g = h // kv
        grad_q, grad_k, grad_v = k.new_empty(b, h, t, d), torch.zeros_like(k), torch.zeros_like(v)
        with torch.autocast(k.device.type, enabled=False):
            go_all = grad_out.to(k.dtype)
            for (start, end, keys), qg, probs in zip(ctx.tiles, kept[0::2], kept[1::2]):
                go = go_all[:, :, start:end].contiguous().view(b, kv, g * (end - start), d)
                # sums over the G query heads
                grad_v[:, :, :keys] += torch.matmul(probs.transpose(-1, -2), go)
                grad_p = torch.matmul(go, v[:, :, :keys].transpose(-1, -2))
                grad_s = torch._softmax_backward_data(grad_p, probs, -1, probs.dtype)
                del grad_p
                grad_q[:, :, start:end] = torch.matmul(grad_s, k[:, :, :keys]).mul_(ctx.scale).view(b, h, end - start, d)
                grad_k[:, :, :keys] += torch.matmul(grad_s.transpose(-1, -2), qg).mul_(ctx.scale)
        return grad_q, grad_k, grad_v, None, None, None


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


_MASK = []  # [bool mask, its version, dtype, additive form, tiles]: what the layers of a forward share


def _tiles(mask: torch.Tensor) -> tuple:
    """The blocks of queries `_MatmulAttentionFn` computes (see there): two halves where the
    first half of the queries sees none of the last half of the keys, else all at once."""
    t, s = mask.shape[-2], mask.shape[-1]
    if t == s and t >= SPLIT_FROM and t % 2 == 0 and not mask[..., : t // 2, t // 2:].any():
        return ((0, t // 2, t // 2), (t // 2, t, t))
    return ((0, t, s),)


def _additive(mask: torch.Tensor, dtype: torch.dtype):
    """The bool mask as an additive one (0 / the dtype's lowest value) and its tiles, made once
    per forward."""
    if _MASK and _MASK[0] is mask and _MASK[1] == mask._version and _MASK[2] == dtype:
        return _MASK[3], _MASK[4]
    additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
    _MASK[:] = [mask, mask._version, dtype, additive, _tiles(mask)]
    return additive, _MASK[4]


def attend(query, key, value, attention_mask, scaling: Optional[float]) -> torch.Tensor:
    """The attention output in transformers' layout (B, T, H, D)."""
    dtype = _compute_dtype(query)
    additive, tiles = _additive(attention_mask, dtype)
    if additive.shape[-1] != key.shape[-2]:  # a longer mask than the keys: cut, computed whole
        additive, tiles = additive[:, :, :, : key.shape[-2]], ((0, query.shape[-2], key.shape[-2]),)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    out = _MatmulAttentionFn.apply(query.to(dtype), key.to(dtype), value.to(dtype), additive, scale, tiles)
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
