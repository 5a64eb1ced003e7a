"""CPU attention in bf16 training: SDPA's flash kernel against distft's matmul attention
(distft/models/matmul_attention.py, `trainer.cpu_attention`), forward + backward of one layer.

    python bench/attention.py --malloc tcmalloc   # SmolLM2-135M's heads, 2048 tokens at 256 .. 2048 keys
    python bench/attention.py --quick             # a small shape, a few repeats: a smoke run

Each shape holds 2048 tokens (batch x length) packed two documents a row (the block-diagonal
causal bool mask transformers passes for packed rows), with SmolLM2-135M's 9 query and 3
key/value heads of 64; q, k and v in transformers' layout (batch, heads, tokens, 64 as a
transposed view). Matmul whole: the matmul path computing every query against every key,
as it did before causal masks were split in two halves of queries (from
matmul_attention.SPLIT_FROM keys). They run alternately; the median of the repeats. Kept:
the bytes each keeps for backward (saved-tensor hooks), q, k and v included. The matmul path runs in
training only up to 512 keys (matmul_attention.MAX_KEYS); the longer shapes show what it
would cost. bf16 only where bf16 matmuls are native (a CPU with AVX512-BF16/AMX); elsewhere
the full run says so and stops (the quick run goes on, to check the code runs).
Writes bench/results/attention.json.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench import vs_hf_trainer as vs  # noqa: E402


def shape_inputs(batch: int, length: int, heads: int, kv_heads: int, dim: int, seed: int = 0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, length, heads, dim, generator=gen).bfloat16().transpose(1, 2).requires_grad_()
    k = torch.randn(batch, length, kv_heads, dim, generator=gen).bfloat16().transpose(1, 2).requires_grad_()
    v = torch.randn(batch, length, kv_heads, dim, generator=gen).bfloat16().transpose(1, 2).requires_grad_()
    grad = torch.randn(batch, length, heads, dim, generator=gen).bfloat16()
    mask = torch.zeros(batch, 1, length, length, dtype=torch.bool)
    for row in range(batch):
        cut = int(torch.randint(length // 4, 3 * length // 4, (1,), generator=gen))
        for start, end in ((0, cut), (cut, length)):
            mask[row, 0, start:end, start:end] = torch.ones(end - start, end - start, dtype=torch.bool).tril()
    return q, k, v, mask, grad


def measure(batch: int, length: int, heads: int, kv_heads: int, dim: int, repeats: int) -> dict:
    import torch
    import torch.nn.functional as F

    from distft.models import matmul_attention

    q, k, v, mask, grad = shape_inputs(batch, length, heads, kv_heads, dim)
    additive = torch.zeros(mask.shape, dtype=torch.bfloat16).masked_fill_(~mask, float("-inf"))

    def flash():  # transformers' sdpa on CPU with a GQA model (distft's lean sdpa): the flash kernel
        return F.scaled_dot_product_attention(q, k, v, attn_mask=additive, enable_gqa=True).transpose(1, 2)

    def matmul():
        return matmul_attention.attend(q, k, v, mask, None)

    def matmul_whole():  # every query against every key, as before causal masks were split
        additive = matmul_attention._additive(mask, torch.bfloat16)[0]
        return matmul_attention._MatmulAttentionFn.apply(q, k, v, additive, dim ** -0.5,
                                                         ((0, length, length),)).transpose(1, 2)

    paths = {"flash": flash, "matmul": matmul, "matmul_whole": matmul_whole}
    times = {name: [] for name in paths}
    kept = {}
    for name, fn in paths.items():  # warm-up, and what each keeps
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn()
        out.backward(grad)
        kept[name] = sum(seen.values())
    for _ in range(repeats):
        for name, fn in paths.items():
            start = time.perf_counter()
            fn().backward(grad)
            times[name].append(time.perf_counter() - start)
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    return {"batch": batch, "length": length, "flash_ms": ms["flash"], "matmul_ms": ms["matmul"],
            "speedup": ms["flash"] / ms["matmul"], "flash_kept_mb": kept["flash"] / 2**20,
            "matmul_kept_mb": kept["matmul"] / 2**20, "matmul_in_training": length <= matmul_attention.MAX_KEYS,
            "matmul_whole_ms": ms["matmul_whole"], "matmul_whole_kept_mb": kept["matmul_whole"] / 2**20}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=2048, help="batch x length of every shape")
    ap.add_argument("--quick", action="store_true", help="one small shape, 3 repeats")
    vs.add_process_args(ap)
    args = ap.parse_args()
    if args.one:
        return vs.measure_shapes(args.one, measure)
    from distft.precision import native_bf16_here

    bf16, why = native_bf16_here()
    if not bf16 and not args.quick:
        print(f"bf16 matmuls are not native here ({why}): nothing to measure", file=sys.stderr)
        return 1
    if args.quick:
        shapes, repeats = [(2, 64, 4, 2, 16), (1, 128, 4, 2, 16)], 3
    else:
        shapes = [(args.tokens // length, length, 9, 3, 64) for length in (256, 512, 1024, 2048)]
        repeats = args.repeats
    rows = vs.shapes_in_a_fresh_process(args, __file__, "attention", shapes, repeats, heads=shapes[0][2:])
    if rows is None:
        return 1
    for r in rows:
        print(f"{r['batch']} x {r['length']:5d}: flash {r['flash_ms']:7.2f} ms, matmul {r['matmul_ms']:7.2f} ms "
              f"({r['speedup']:.2f}x); kept {r['flash_kept_mb']:.1f} / {r['matmul_kept_mb']:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
