"""BENCHMARKS.md, generated from the JSON the benchmark scripts write (never typed by hand).

    python bench/report.py          # regenerate from bench/results/*.json
    python bench/report.py FOLDER   # FOLDER/BENCHMARKS.md from the JSON in FOLDER (another machine's runs)
"""
from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def run_rows(out: Path, stem: str, order: list, names: list, run_one, render) -> None:
    """Run the named rows of a benchmark, keeping the rows of earlier invocations: after each
    row, <stem>.json (machine, rows in `order`) and <stem>.md (`render(machine, rows)`)."""
    import os
    import platform

    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stem}.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    rows = {r["row"]: r for r in saved.get("rows", [])}
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    for name in names:
        rows[name] = run_one(name)
        print(json.dumps(rows[name]), flush=True)
        ordered = [rows[n] for n in order if n in rows]
        path.write_text(json.dumps({"machine": machine, "rows": ordered}, indent=2))
        (out / f"{stem}.md").write_text(render(machine, ordered))
    print((out / f"{stem}.md").read_text())


def _vs_hf(data: dict, folder: Path) -> list[str]:
    mem = data["memory"]
    mem_name = "peak CUDA MiB" if mem == "peak_cuda_mb" else "peak RSS MiB (training)"
    lines = ["## distft vs transformers.Trainer", "",
             f"Machine: {data['machine']}", "", f"Command: `{data['command']}`", "",
             f"Same model weights, tokenized Alpaca examples (first {data['args']['rows']} rows; the next 64 held out), "
             f"max_length {data['args']['max_length']}, batch {data['args']['batch']}, {data['args']['steps']} steps, "
             "AdamW, cosine schedule, seed 0. Throughput over the steps after the first two. "
             f"Mean of {data['args']['repeats']} repeat(s), cases alternating A B A B.", "",
             "AC: activation checkpointing (distft `trainer.activation_checkpointing=true`; the HF Trainer "
             "`gradient_checkpointing=True`, non-reentrant). compiled: distft `trainer.compile=true` (each block "
             "compiled in place; its compile time falls in the first two steps, left out).", "",
             f"| runner | model | strategy | layout | precision | AC / compile | non-pad tokens/s | steps/s | padding | {mem_name} "
             "| added by training (MiB) | held-out loss |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in sorted(data["mean"].values(), key=lambda m: (m["model"], m["strategy"], m["precision"],
                                                           m.get("variant", ""), m["runner"] != "hf", m["layout"])):
        lines.append(f"| {m['runner']} | {m['model']} | {m['strategy']} | {m['layout']} | {m['precision']} | "
                     f"{ {'ac': 'AC', 'compile': 'compiled'}.get(m.get('variant', ''), 'no')} | "
                     f"{m['tokens_per_second']:.1f} | {m['steps_per_second']:.3f} | {m['padding_share']:.0%} | "
                     f"{m[mem]:.0f} | {m.get('added_rss_mb', 0):.0f} | {m['heldout_loss']:.4f} |")
    if data.get("skipped"):
        lines += ["", f"{data['skipped']}."]
    lines += ["", "| ratio | value | target |", "|---|---|---|"]
    for r in data["ratios"]:
        lines.append(f"| {r['what']} | {r['value']:.2f} | {r['target']} |")
    if (folder / "vs_hf_trainer.png").is_file():
        lines += ["", f"![throughput and memory]({(folder / 'vs_hf_trainer.png').relative_to(ROOT)})"
                  if folder.is_relative_to(ROOT) else "![throughput and memory](vs_hf_trainer.png)"]
    return lines


def _mfu(data: dict) -> list[str]:
    lines = ["## Model FLOPs utilisation", "", f"Machine: {data['machine']}", "", f"Command: `{data['command']}`", "",
             "Matmul peak measured in the same run: "
             + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in data["peak_gflops"].items()) + "."
             + (f" {data['skipped']}." if data.get("skipped") else ""), "",
             "| case | non-pad tokens/s | model GFLOP/s | MFU |", "|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| {r['case']} | {r['tokens_per_second']:.1f} | {r['model_gflops']:.1f} | {r['mfu']:.1%} |")
    if data.get("notes"):
        lines += ["", *data["notes"]]
    return lines


def _profile(data: dict) -> list[str]:
    steps = data["step_seconds"]
    lines = ["## Where a step's time goes", "", f"Machine: {data['machine']}", "", f"Command: `{data['command']}`", "",
             f"{data['case']}: self CPU time of each operator over {data['profiled_steps']} optimizer steps "
             f"({sum(data['tokens']) / sum(steps):.0f} non-pad tokens/s under the profiler), by kind of work.", "",
             "| kind | seconds | share |", "|---|---|---|"]
    lines += [f"| {k['kind']} | {k['self_s']:.2f} | {k['share']:.1%} |" for k in data["kinds"]]
    lines += ["", "| operator | kind | calls | seconds | share |", "|---|---|---|---|---|"]
    lines += [f"| `{o['op']}` | {o['kind']} | {o['calls']} | {o['self_s']:.2f} | {o['share']:.1%} |"
              for o in data["top_ops"]]
    return lines


def _attention(data: dict) -> list[str]:
    lines = ["## CPU attention in bf16 training: flash kernel against matmuls", "", f"Machine: {data['machine']}", "",
             f"Command: `{data['command']}`", "",
             "Forward and backward of one layer's attention (heads, key/value heads, head width: "
             f"{', '.join(map(str, data['heads']))}), packed rows of two documents; median ms. Kept: "
             "what each keeps for backward, q, k and v included. distft trains with the matmul path up "
             "to 512 keys (`trainer.cpu_attention=matmul`, the default), with the flash kernel beyond. "
             "Matmul whole: every query against every key, where the matmul path splits a causal mask's "
             "queries in two halves (the first half needs the first half of the keys only).", "",
             "| batch x length | flash ms | matmul ms | speed-up | flash kept MiB | matmul kept MiB | matmul in training "
             "| matmul whole ms | matmul whole kept MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        whole = (f"{r['matmul_whole_ms']:.2f} | {r['matmul_whole_kept_mb']:.1f}" if "matmul_whole_ms" in r
                 else "- | -")  # results from before the split
        lines.append(f"| {r['batch']} x {r['length']} | {r['flash_ms']:.2f} | {r['matmul_ms']:.2f} | "
                     f"{r['speedup']:.2f}x | {r['flash_kept_mb']:.1f} | {r['matmul_kept_mb']:.1f} | "
                     f"{'yes' if r['matmul_in_training'] else 'no'} | {whole} |")
    return lines


def _chunked_loss(data: dict) -> list[str]:
    lines = ["## The loss through a frozen output layer: gradient in the forward against recomputed logits", "",
             f"Machine: {data['machine']}", "", f"Command: `{data['command']}`", "",
             "Forward and backward of the chunked next-token loss through a frozen output layer (LoRA, BitFit, "
             "partial). In forward: each chunk's gradient taken right after its loss (what training does); "
             "recomputed: the checkpointed chunks, whose logits are computed again in backward. Median ms; "
             "gradient error: relative to an fp32 gradient of the same inputs.", "",
             "| precision | targets | output layer | chunk | recomputed ms | in forward ms | speed-up | "
             "error recomputed | error in forward |", "|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| {r['precision']} | {r['rows']} x {r['length']} | {r['vocab']} x {r['hidden']} | {r['chunk']} | "
                     f"{r['recomputed_ms']:.1f} | {r['in_forward_ms']:.1f} | {r['speedup']:.2f}x | "
                     f"{r['recomputed_grad_error']:.2e} | {r['in_forward_grad_error']:.2e} |")
    return lines


def write_benchmarks_md(folder: Path = RESULTS) -> Path:
    """BENCHMARKS.md at the top of the checkout for bench/results, else beside the results."""
    target = ROOT / "BENCHMARKS.md" if folder.resolve() == RESULTS.resolve() else folder / "BENCHMARKS.md"
    lines = ["# Benchmarks", "", "Generated by the scripts in bench/ (`python bench/report.py` rebuilds it from "
             "bench/results/*.json); do not edit by hand.", ""]
    if (folder / "vs_hf_trainer.json").is_file():
        lines += _vs_hf(json.loads((folder / "vs_hf_trainer.json").read_text()), folder) + [""]
    if (folder / "mfu.json").is_file():
        lines += _mfu(json.loads((folder / "mfu.json").read_text())) + [""]
    if (folder / "profile_step.json").is_file():
        lines += _profile(json.loads((folder / "profile_step.json").read_text())) + [""]
    if (folder / "attention.json").is_file():
        lines += _attention(json.loads((folder / "attention.json").read_text())) + [""]
    if (folder / "chunked_loss.json").is_file():
        lines += _chunked_loss(json.loads((folder / "chunked_loss.json").read_text())) + [""]
    target.write_text("\n".join(lines))
    return target


if __name__ == "__main__":
    import sys

    print(write_benchmarks_md(Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS))
