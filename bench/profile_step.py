"""Where a training step's time goes: torch.profiler over distft's own loop, by kind of work.

    python bench/profile_step.py --malloc tcmalloc   # SmolLM2-135M LoRA packed, bf16 where native
    python bench/profile_step.py --quick             # the tiny model, fp32: a smoke run

The case is bench/vs_hf_trainer.py's "distft LoRA packed" (same data, batch, length and
adapters) at the precision distft's `trainer.precision=auto` picks here. The profiler runs
over the optimizer steps after the first `vs_hf_trainer.WARMUP`; each operator's own time
(self CPU time, so nothing is counted twice) goes to one kind: matmuls, attention (SDPA's
kernels, or the batched matmuls and softmax of distft's matmul attention), casts
and copies (aten::copy_, mostly autocast's dtype casts), random numbers (LoRA's dropout
masks), softmax and cross-entropy, everything else (element-wise work, norms, the
optimizer). It says what a faster step has to shrink; the MFU table says how far the step
is from the matmul peak.
Writes bench/results/profile_step.json and regenerates BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench import vs_hf_trainer as vs  # noqa: E402

# Operator name -> kind; the first rule that matches wins. Names are aten's (and autograd
# functions' own, whose self time is the Python around their aten calls).
# Attention: SDPA's kernels, or distft's matmul attention (trainer.cpu_attention=matmul),
# whose batched matmuls and softmax are the only aten::bmm and aten::_softmax of these
# models' steps (their linear layers run aten::mm/addmm, the loss aten::_log_softmax).
KINDS = [
    ("attention", ("scaled_dot_product", "aten::bmm", "aten::_softmax", "aten::_softmax_backward_data")),
    ("matmul", ("aten::mm", "aten::addmm", "aten::baddbmm", "aten::matmul", "aten::linear")),
    ("casts and copies", ("aten::copy_", "aten::_to_copy", "aten::to")),
    ("random numbers", ("aten::random_", "aten::bernoulli_", "aten::uniform_", "aten::normal_")),
    ("softmax, cross-entropy", ("softmax", "nll_loss", "cross_entropy")),
]
OTHER = "element-wise and the rest"


def kind_of(name: str) -> str:
    for kind, keys in KINDS:
        if any(name == k or (not k.startswith("aten::") and k in name) for k in keys):
            return kind
    return OTHER


def profile(case: dict, steps_profiled: int) -> dict:
    """Run the case in this process with the profiler over `steps_profiled` optimizer steps
    after the warm-up ones; self CPU time by kind and the top operators."""
    import torch
    from torch.profiler import ProfilerActivity, profile as torch_profile, schedule

    from distft.trainer import Trainer

    torch.set_num_threads(case["threads"])
    run_dir = Path(case["out"]) / "runs" / "profile_step"
    shutil.rmtree(run_dir, ignore_errors=True)
    trainer = Trainer(vs.compose(case, run_dir)).setup()
    prof = torch_profile(activities=[ProfilerActivity.CPU],
                         schedule=schedule(wait=vs.WARMUP - 1, warmup=1, active=steps_profiled, repeat=1),
                         record_shapes=True)
    step = trainer.backend.step

    def step_and_tick(*args, **kwargs):  # the profiler's schedule advances at each optimizer step
        out = step(*args, **kwargs)
        prof.step()
        return out

    trainer.backend.step = step_and_tick
    prof.start()
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    prof.stop()
    by_kind: dict[str, float] = {}
    ops = []
    for e in prof.key_averages():
        marker = e.key.startswith("ProfilerStep")  # its own time is the loop's Python: "the rest"
        kind = OTHER if marker else kind_of(e.key)
        by_kind[kind] = by_kind.get(kind, 0.0) + e.self_cpu_time_total / 1e6
        if not marker:
            ops.append({"op": e.key, "kind": kind, "self_s": e.self_cpu_time_total / 1e6, "calls": e.count})
    total = sum(by_kind.values())
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = [e for e in events if "step_seconds" in e][vs.WARMUP:vs.WARMUP + steps_profiled]
    ops.sort(key=lambda o: -o["self_s"])
    return {"precision": trainer.precision.name, "profiled_steps": len(timed), "self_cpu_s": total,
            "step_seconds": [e["step_seconds"] for e in timed], "tokens": [e["tokens"] for e in timed],
            "kinds": [{"kind": k, "self_s": s, "share": s / total} for k, s in
                      sorted(by_kind.items(), key=lambda kv: -kv[1])],
            "top_ops": [{**o, "share": o["self_s"] / total} for o in ops[:12]], "train_wall_s": wall}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps profiled, after the warm-up ones")
    ap.add_argument("--quick", action="store_true", help="the tiny model, 1 profiled step, fp32: a smoke run")
    vs.add_process_args(ap)
    args = ap.parse_args()
    if args.one:
        one = json.loads(args.one)
        print("RESULT " + json.dumps(profile(one["case"], one["steps"])), flush=True)
        return 0
    if not vs.ALPACA.is_file():
        print(f"{vs.ALPACA} not found: this benchmark needs ../shared/data beside the checkout", file=sys.stderr)
        return 1
    rows, max_length = 500, 256
    if args.quick:
        args.model, args.steps, rows, max_length = "tiny", 1, 64, 512
    out = Path(args.out)
    train, heldout = vs.split_data(out, rows)
    from distft.precision import native_bf16_here

    bf16, why = native_bf16_here()
    precision = "bf16" if bf16 and not args.quick else "fp32"
    case = {"name": "profile", "runner": "distft", "model": args.model, "strategy": "lora", "layout": "packed",
            "precision": precision, "repeat": "profile", "steps": vs.WARMUP + args.steps, "batch": 8,
            "max_length": max_length, "seed": 0, "threads": args.threads, "train": str(train),
            "heldout": str(heldout), "out": str(out)}
    if args.quick:
        result = profile(case, args.steps)  # a smoke run: the interpreter start would be most of it
    else:  # a fresh process on the chosen allocator, as the other benchmarks measure
        result = vs.one_in_a_fresh_process({"case": case, "steps": args.steps}, args.malloc, script=__file__)
        if result is None:
            return 1
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile_step.json").write_text(json.dumps(
        {"machine": f"{vs.machine_line(args.threads)}, allocator {args.malloc}",
         "command": "python bench/profile_step.py " + " ".join(sys.argv[1:]),
         "case": f"{args.model} LoRA packed {precision}, batch 8 x {max_length} tokens",
         "bf16_skipped": None if bf16 else why, **result}, indent=2))
    for k in result["kinds"]:
        print(f"{k['kind']:28s} {k['self_s']:7.2f} s  {k['share']:6.1%}")
    from bench.report import write_benchmarks_md

    write_benchmarks_md(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
