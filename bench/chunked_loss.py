"""The chunked loss with a frozen output layer (LoRA, BitFit, partial): each chunk's gradient
taken in the forward (distft/chunked_loss.py's `_FrozenHeadLossFn`, what training does)
against the checkpointed chunks that compute the logits again in backward.

    python bench/chunked_loss.py --malloc tcmalloc   # SmolLM2-135M's output layer, 8 x 256 targets
    python bench/chunked_loss.py --quick             # a small shape, a few repeats: a smoke run

The loss of 8 rows of 257 positions (2,048 targets, all of them targets) through SmolLM2-135M's
tied output layer (49,152 x 576, frozen) in chunks of 256 rows (`trainer.loss_chunk_size`),
forward and backward with the trainer's 1/targets factor, in fp32 and, where bf16 matmuls are
native (AVX512-BF16/AMX), under bf16 autocast with the layer held in bf16 (as a LoRA run with
`trainer.precision=bf16` holds it). The two paths run alternately; the median of the repeats,
and how far each one's gradient is from an fp32 one of the same bf16-rounded inputs.
Writes bench/results/chunked_loss.json.
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


def measure(rows: int, length: int, hidden: int, vocab: int, chunk: int, precision: str, repeats: int) -> dict:
    import torch
    import torch.nn.functional as F

    from distft import chunked_loss

    gen = torch.Generator().manual_seed(0)
    bf16 = precision == "bf16"
    head = torch.nn.Linear(hidden, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, hidden, generator=gen) * hidden ** -0.5)
    head.requires_grad_(False)
    if bf16:
        head.to(torch.bfloat16)
    states = torch.randn(rows, length + 1, hidden, generator=gen)
    if bf16:  # the reference sees the inputs the bf16 paths compute with
        states = states.bfloat16().float()
    states.requires_grad_()
    labels = torch.randint(0, vocab, (rows, length + 1), generator=gen)
    targets = rows * length

    def step(recompute: bool):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = chunked_loss.loss_sum(states, head, labels, chunk, recompute=recompute)
        (loss / targets).backward()
        grad, states.grad = states.grad, None
        return grad

    logits = states[:, :-1].reshape(-1, hidden) @ head.weight.float().T
    (F.cross_entropy(logits, labels[:, 1:].reshape(-1), reduction="sum") / targets).backward()
    reference, states.grad = states.grad, None
    paths = {"recomputed": True, "in_forward": False}
    error = {name: float((step(flag) - reference).norm() / reference.norm()) for name, flag in paths.items()}
    times = {name: [] for name in paths}
    for _ in range(repeats):
        for name, flag in paths.items():
            start = time.perf_counter()
            step(flag)
            times[name].append(time.perf_counter() - start)
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    return {"precision": precision, "rows": rows, "length": length, "hidden": hidden, "vocab": vocab, "chunk": chunk,
            "recomputed_ms": ms["recomputed"], "in_forward_ms": ms["in_forward"],
            "speedup": ms["recomputed"] / ms["in_forward"], "recomputed_grad_error": error["recomputed"],
            "in_forward_grad_error": error["in_forward"]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="a small shape, 3 repeats")
    vs.add_process_args(ap)
    args = ap.parse_args()
    if args.one:
        return vs.measure_shapes(args.one, measure)
    from distft.precision import native_bf16_here

    bf16, why = native_bf16_here()
    precisions = ["fp32"] + (["bf16"] if bf16 or args.quick else [])
    if not bf16:
        print(f"bf16 matmuls are not native here ({why}): " + ("bf16 on the small shape only" if args.quick
                                                               else "fp32 only"), file=sys.stderr)
    shape = (2, 31, 32, 300, 16) if args.quick else (8, 256, 576, 49152, 256)
    rows = vs.shapes_in_a_fresh_process(args, __file__, "chunked_loss", [(*shape, p) for p in precisions],
                                        3 if args.quick else args.repeats)
    if rows is None:
        return 1
    for r in rows:
        print(f"{r['precision']}: recomputed {r['recomputed_ms']:.1f} ms, in forward {r['in_forward_ms']:.1f} ms "
              f"({r['speedup']:.2f}x); gradient error {r['recomputed_grad_error']:.2e} / {r['in_forward_grad_error']:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
