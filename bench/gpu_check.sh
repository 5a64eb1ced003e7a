#!/usr/bin/env bash
# GPU paths in one short run, for a machine with one or more NVIDIA GPUs:
# NCCL, bf16, the attention choice (flash-attention 2 when installed), fp16 with its scaler,
# DP-SGD on one process and across all, and every backend training the tiny model in bf16;
# prints tokens/s and peak memory per backend.
#   bash bench/gpu_check.sh            # after scripts/setup.sh with a CUDA build of torch
# Not yet run on a GPU: no session so far had a device machine.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
echo "== devices: $NGPU"; nvidia-smi -L || true
OUT=${OUT:-/tmp/distft-gpu-check}
rm -rf "$OUT" "$OUT-auto"
"$PY" - <<'PY'
import importlib.util, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "bf16", torch.cuda.is_bf16_supported())
print("flash_attn installed:", importlib.util.find_spec("flash_attn") is not None)
from distft.models import choose_attn_implementation
print("attention for bf16:", choose_attn_implementation("auto", torch.bfloat16))
from distft import precision
p = precision.resolve("auto")
print("precision auto ->", p.name, "(", p.reason, ")")
assert p.name == ("bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"), p
PY
# The default precision (auto) on the GPU: the log must say bf16 and why.
"$PY" -m distft.train trainer.max_steps=2 logger=csv logger.progress_bar=false "run_dir=$OUT-auto" \
  2>&1 | grep -h "precision auto ->" || echo "precision auto: no decision logged (FAILED)"
# fp16 with its loss scaler: the scale is logged per step, inf steps are skipped, the run ends finite.
"$PY" -m distft.train trainer.precision=fp16 trainer.max_steps=30 logger=csv logger.progress_bar=false \
  "run_dir=$OUT-fp16" > "$OUT.fp16.log" 2>&1 && "$PY" - "$OUT-fp16" <<'PY' || { echo "fp16 FAILED"; tail -20 "$OUT.fp16.log"; }
import json, math, sys
ev = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl")]
steps = [e for e in ev if "loss_scale" in e]
skipped = max(e.get("skipped_steps", 0) for e in steps)
assert len(steps) == 30 and all(math.isfinite(e["loss"]) for e in steps), "fp16: missing or non-finite steps"
print("fp16 ok: loss scale", steps[0]["loss_scale"], "->", steps[-1]["loss_scale"], "skipped", skipped,
      "final loss %.4f" % steps[-1]["loss"])
PY
# bf16 LoRA with frozen weights held in bf16 (the log names how many)
"$PY" -m distft.train strategy=lora trainer.precision=bf16 trainer.max_steps=10 logger=csv logger.progress_bar=false \
  "run_dir=$OUT-bf16-lora" 2>&1 | grep -h "frozen weights held in bf16" || echo "bf16 frozen weights: not logged (FAILED)"
# DP-SGD (Opacus) on the GPU, bf16 autocast: LoRA on one process, then DP-DDP over NCCL on
# every GPU (the noise added once, on rank 0); each reports the epsilon it spent.
for nproc in 1 $([ "$NGPU" -gt 1 ] && echo "$NGPU"); do
  backend=$([ "$nproc" = 1 ] && echo single || echo ddp)
  "$PY" -m torch.distributed.run --standalone --nproc_per_node "$nproc" -m distft.train privacy=dp strategy=lora \
    privacy.target_epsilon=8 trainer.precision=bf16 trainer.max_steps=10 logger=csv logger.progress_bar=false \
    "backend=$backend" "run_dir=$OUT-dp-$nproc" > "$OUT.dp-$nproc.log" 2>&1 \
    && "$PY" -c "import json,math,sys; s=json.load(open(sys.argv[1])); assert s['privacy/noisy_steps'] == 10 and math.isfinite(s['eval/loss']); print('dp', sys.argv[2], 'processes ok: epsilon %.3f' % s['privacy/epsilon'], 'noise', round(s['privacy/noise_multiplier'], 4), 'tokens/s %.0f' % s['tokens_per_second'], 'loss %.4f' % s['eval/loss'])" \
      "$OUT-dp-$nproc/summary.json" "$nproc" \
    || { echo "dp on $nproc processes FAILED"; tail -20 "$OUT.dp-$nproc.log"; }
done
for backend in single ddp fsdp zero1 zero2 zero3; do
  args=(task=instruction strategy=full model.dtype=bfloat16 trainer.precision=bf16 trainer.max_steps=30
        trainer.batch_size=16 trainer.eval_every=0 logger=csv logger.progress_bar=false
        "backend=$backend" "run_dir=$OUT/$backend")
  if [ "$backend" = single ]; then
    "$PY" -m distft.train "${args[@]}" > "$OUT.$backend.log" 2>&1
  else
    "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NGPU" -m distft.train "${args[@]}" \
      > "$OUT.$backend.log" 2>&1
  fi
  rc=$?
  grep -h "attention=" "$OUT.$backend.log" | head -1
  if [ $rc -eq 0 ]; then
    "$PY" -c "import json,sys; s=json.load(open(sys.argv[1])); print(sys.argv[2], 'ok', 'tokens/s=%.0f' % s['tokens_per_second'], 'peak MB', s['peak_memory_mb_per_process'], 'loss', s.get('eval/loss'))" \
      "$OUT/$backend/summary.json" "$backend"
  else
    echo "$backend FAILED (rc=$rc):"; tail -20 "$OUT.$backend.log"
  fi
done
