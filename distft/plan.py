"""`distft-plan`: will a run fit, how fast will it go, and what to change when it does not,
before a cluster job is spent.

    distft-plan model=smollm2 backend=zero3 trainer.batch_size=8 data.max_length=2048 \\
        plan.gpu=h100 plan.nodes=2 plan.gpus_per_node=8 plan.tokens=2e9
    distft-plan ... --json                 # the same as JSON, for scripts
    distft-plan --check outputs/run        # the plan of a finished run against what it measured

It takes distft-train's overrides and builds the model on the meta device (no weight is
read) with the strategy applied, so the parameter counts are exact: total, trainable, the
largest block. Memory per process, by part:
- weights, gradients and optimizer state, divided as the backend shards them (ddp: none;
  zero1: optimizer state; zero2: + gradients; zero3 and fsdp: + parameters), with the
  extra copies each keeps (DDP's gradient buckets, ZeRO's fp32 partition, the gathered
  block of fsdp/zero3) and optimizer offload moving the state to host memory;
- activations of one micro-batch, counted from the tensors a decoder block saves for
  backward (the count is checked against autograd's saved tensors in the tests), with or
  without activation checkpointing, plus the logits and their gradient (or the chunked
  loss's slice);
- the runtime's own memory (CUDA context and NCCL buffers on a GPU; on CPU the resident
  set of this process once torch, transformers and the backend's library are imported).
Time per step from the FLOPs (6 x parameters x tokens for full fine-tuning, 4x with frozen
weights, + attention, + a forward again under checkpointing) at an assumed MFU, and the
backend's communication volume over the interconnect, added (no overlap assumed: an upper
bound). When the total does not fit the device, it tries the usual changes and prints the
overrides of the first that fits.

No library answers this for a whole run (accelerate's estimate counts weights, DeepSpeed's
estimators model states only), which is why it is written here.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional

import torch

from distft.backends import supports
from distft.backends.zero import sub_group_elements
from distft.errors import ConfigError, DistftError
from distft.models import lean
from distft.privacy import PRIVACY

log = logging.getLogger(__name__)

GB = 1e9
MB = 2**20


@dataclass(frozen=True)
class Device:
    name: str
    memory_gb: float  # usable per device
    bf16_tflops: float  # dense peak
    fp32_tflops: float  # without TF32 (torch's default for matmuls)
    intra_gbs: float  # GB/s per direction between devices of one node
    inter_gbs: float  # GB/s per device between nodes
    runtime_gb: float = 1.0  # the CUDA context, NCCL buffers, the allocator's slack


# Vendor datasheet figures (dense, no sparsity); inter-node as one NIC per GPU
# (400 Gb/s NDR InfiniBand for H100/H200, 200 Gb/s HDR for A100, 100 GbE for L40S).
DEVICES = {
    "h100": Device("NVIDIA H100 SXM 80GB", 80, 989, 67, 450, 50),
    "h200": Device("NVIDIA H200 SXM 141GB", 141, 989, 67, 450, 50),
    "a100-80": Device("NVIDIA A100 SXM 80GB", 80, 312, 19.5, 300, 25),
    "a100-40": Device("NVIDIA A100 SXM 40GB", 40, 312, 19.5, 300, 25),
    "l40s": Device("NVIDIA L40S 48GB", 48, 362, 91.6, 32, 12.5),
}
ADAM_STATES = 2  # exp_avg and exp_avg_sq, fp32


@dataclass
class Counts:
    """What the meta-device model says."""
    total: int
    trainable: int
    frozen: int
    largest_block: int  # parameters of the largest transformer block
    layers: int
    hidden: int
    intermediate: int
    kv_dim: int
    heads: int
    vocab: int
    predicts: str
    largest_tensor: int = 0  # elements of the largest trainable tensor (the optimizer's temporaries)
    saved_delta: int = 0  # per token, beyond saved_per_token's fully trained count (frozen layers, adapters)


@dataclass
class Shape:
    """What the config says about the run, besides the model."""
    backend: str
    processes: int
    nodes: int
    micro_batch: int
    seq_len: int
    grad_accum: int
    precision: str  # fp32 | bf16 | fp16
    weight_bytes: int  # of the trainable weights (model.dtype)
    frozen_bytes: int  # of the frozen ones (2 when held in bf16)
    checkpointing: bool
    loss_chunk: int
    offload_optimizer: bool
    offload_param: bool
    attention: str  # sdpa | eager | flash_attention_2
    foreach_optimizer: bool = False  # torch's AdamW steps all tensors at once (its default on CUDA)


@dataclass
class Plan:
    device: str
    memory_gb: float
    parts_gb: Dict[str, float]
    host_gb: Dict[str, float]
    total_gb: float
    fits: bool
    step_seconds: float
    compute_seconds: float
    comm_seconds: float
    comm_gb: float
    tokens_per_step: int
    tokens_per_second: float
    epoch_hours: Optional[float]
    gpu_hours: Optional[float]
    mfu: float
    transient: Optional[List[List[str]]] = None  # groups of parts never held at once: the peak has the largest
    suggestion: Optional[List[str]] = None
    suggestion_total_gb: Optional[float] = None
    counts: Dict = field(default_factory=dict)
    shape: Dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- model states
def model_states_bytes(params: int, processes: int, stage: int, mixed: bool = True) -> float:
    """Model-state memory per device with Adam, as the ZeRO paper counts it: 16-bit weights
    and gradients (2 + 2 bytes) and fp32 master weights, momentum and variance (K = 12) when
    `mixed`; fp32 weights and gradients and Adam's two states (4 + 4 + 8) otherwise.
    Stage 0: all replicated; 1: optimizer state partitioned; 2: + gradients; 3: + weights.
    (The paper's accounting; memory_parts follows what each backend allocates.)"""
    w, g, k = (2, 2, 12) if mixed else (4, 4, 8)
    n = processes
    weights = w * params / (n if stage >= 3 else 1)
    grads = g * params / (n if stage >= 2 else 1)
    optim = k * params / (n if stage >= 1 else 1)
    return weights + grads + optim


def _stage(backend: str) -> int:
    return {"single": 0, "ddp": 0, "zero1": 1, "zero2": 2, "zero3": 3, "fsdp": 3}[backend]


def memory_parts(c: Counts, s: Shape) -> tuple[Dict[str, float], Dict[str, float]]:
    """Bytes per process on the device, and in host memory (offload), by part, as each
    backend allocates them (T trainable, F frozen, L the largest block, n processes):
    - single/ddp: weights in model.dtype (frozen ones in bf16 when held so), under bf16
      autocast a bf16 copy of the fp32 weights (autocast's cast cache), gradients in the
      weights' dtype (DDP: a second copy in its all-reduce buckets), Adam 8T and the
      optimizer step's temporaries (the gradients and those are transient_groups);
    - fsdp: a 1/n shard of the weights plus two blocks gathered in the compute dtype (the
      current one and the prefetched next), fp32 gradient shards plus one block unsharded,
      Adam 8T/n;
    - zero1/2/3 (DeepSpeed's own multipliers, as its estimators count them): 16-bit (or
      fp32) weights, whole or 1/n with two blocks gathered under zero3; the gradients in
      the weights' dtype (whole for zero1, 1/n for zero2, none kept for zero3) and an fp32
      gradient partition 4T/n; an fp32 master partition 4T/n (none for an fp32 module under
      zero3: its partition is the master) and Adam 8T/n. Optimizer offload moves the
      partition's fp32 state (and zero2's gradient partitions) to host."""
    n, stage = s.processes, _stage(s.backend)
    T, F, L = c.trainable, c.frozen, c.largest_block
    half = s.precision in ("bf16", "fp16")
    parts, host = {}, {}
    if s.backend.startswith("zero"):
        p16 = 2 if half else s.weight_bytes  # DeepSpeed holds the module in 16 bits under bf16/fp16
        if stage == 3:
            parts["weights"] = (T + F) * p16 / n + 2 * L * p16
            if s.offload_param:
                host["weights"], parts["weights"] = (T + F) * p16 / n, 2 * L * p16
        else:
            parts["weights"] = (T + F) * p16
        grads16 = {1: T * p16, 2: T * p16 / n, 3: 0.0}[stage]
        state = 4 * T / n + 4 * T / n + ADAM_STATES * 4 * T / n  # fp32 gradients, master weights, Adam
        if s.offload_optimizer:
            host["optimizer"] = state + (grads16 if stage == 2 else 0.0)
            parts["gradients"] = grads16 if stage != 2 else 0.0
            parts["optimizer"] = 0.0
        else:
            parts["gradients"] = grads16 + 4 * T / n
            # Under zero3 an fp32 module's partition is the master partition itself
            # (zero.share_fp32_master).
            master = 0.0 if stage == 3 and not half else 4 * T / n
            parts["optimizer"] = master + ADAM_STATES * 4 * T / n
            # torch's AdamW steps DeepSpeed's flat fp32 partition as one tensor (stage 3: one
            # sub-group at a time, sized as zero.size_buffers_to_model does): its temporaries
            # (below) the size of that tensor
            flat = min(T / n, sub_group_elements(c.hidden)) if stage == 3 else T / n
            parts["step temporaries"] = (1 if s.foreach_optimizer else 2) * 4 * flat
    elif s.backend == "fsdp":
        compute = 2 if half else s.weight_bytes
        parts["weights"] = (T * s.weight_bytes + F * s.frozen_bytes) / n + 2 * L * compute
        parts["gradients"] = 4 * T / n + L * compute
        parts["optimizer"] = ADAM_STATES * 4 * T / n
    else:
        parts["weights"] = T * s.weight_bytes + F * s.frozen_bytes
        if half:  # autocast's cache of bf16 copies of the weights it casts, for the whole forward
            parts["weights"] += 2 * (T if s.weight_bytes == 4 else 0) + 2 * (F if s.frozen_bytes == 4 else 0)
        parts["gradients"] = T * s.weight_bytes
        if s.backend == "ddp":  # its all-reduce buckets, held for the whole run
            parts["buckets"] = T * s.weight_bytes
        parts["optimizer"] = ADAM_STATES * 4 * T
        # torch's AdamW: on CUDA (foreach) sqrt(v) for every tensor at once, 4T; on CPU tensor
        # by tensor, sqrt(v) and its quotient, two temporaries the size of the largest tensor
        parts["step temporaries"] = 4 * T if s.foreach_optimizer else 2 * 4 * c.largest_tensor
    parts["activations"] = activation_bytes(c, s)
    parts["logits"] = logits_bytes(c, s)
    return parts, host


def transient_groups(s: Shape) -> Optional[List[List[str]]]:
    """Parts that are never held at the same time, so the peak holds only the larger group.
    single/ddp: the gradients are freed at each step (zero_grad(set_to_none=True)) and made
    during backward as the activations are released, so the peak is either the forward's
    end (activations and logits, no gradients yet) or the optimizer step (all gradients and
    Adam's temporaries, no activations). zero1/2 alike (their reduced gradient partitions
    live from the backward to the step); zero3 keeps its gradient partitions, so only the
    step's temporaries alternate with the activations. FSDP2's gradient shards, the root
    it keeps unsharded and its reduce-scatter buffers coexist with the activations: its
    parts add up. (Checked against measured runs: bench/results/plan_check.md.)"""
    if s.backend in ("single", "ddp", "zero1", "zero2"):
        return [["activations", "logits"], ["gradients", "step temporaries"]]
    if s.backend == "zero3":  # its gradient partitions are one buffer, kept from step to step
        return [["activations", "logits"], ["step temporaries"]]
    return None


def peak_bytes(parts: Dict[str, float], groups: Optional[List[List[str]]]) -> float:
    total = sum(parts.values())
    if groups:
        sizes = [sum(parts.get(k, 0.0) for k in g) for g in groups]
        total -= sum(sizes) - max(sizes)
    return total


def saved_per_token(c: Counts) -> int:
    """Elements one decoder block saves for backward per token (Llama-style: RMSNorm,
    q/k/v with rotary embeddings, SDPA, o_proj, SwiGLU MLP): the norms' inputs and outputs
    (4h), q and k before and after the rotary embedding (2h + 2kv), v (kv), the attention
    output (h), the residual sum (h), the MLP's gate, up, activation and product (4i)."""
    h, kv, i = c.hidden, c.kv_dim, c.intermediate
    return 7 * h + 3 * kv + 4 * i + c.saved_delta


# A Llama-style block's inputs that are saved only for a weight gradient (measured with
# autograd's saved-tensor hooks, tests/test_plan.py): the attention's and the MLP's input
# (h each), the down projection's (i), each norm's normalised input (h). o_proj's input is
# kept for SDPA's backward anyway. A bias (BitFit) needs no input to get its gradient.
_WEIGHT_INPUTS = {("q_proj", "k_proj", "v_proj"): "h", ("gate_proj", "up_proj"): "h", ("down_proj",): "i",
                  ("input_layernorm",): "h", ("post_attention_layernorm",): "h"}
_NORMS = {("input_layernorm",), ("post_attention_layernorm",)}  # a trained 1-D weight needs the input


def saved_delta_per_token(block, hidden: int, intermediate: int) -> int:
    """Elements per token a block saves beyond saved_per_token's fully trained count: less
    where frozen layers need not keep their input for a weight gradient (LoRA, BitFit,
    partial); more for each LoRA adapter with dropout, which keeps the dropped-out input
    and the dropout's fp32 noise (2 x its input) instead of sharing the layer's input; plus
    each adapter's rank-r output. With lean activations (distft/models/lean.py) a fused LoRA
    dropout keeps the shared input and its mask as bits (1/32 of an fp32 element), and the
    SwiGLU keeps gate and up but not silu(gate) (one i less). 0 for blocks that are not
    Llama-style."""
    modules = dict(block.named_modules())
    delta = 0
    if any(lean.keeps_gate_and_up(m) for m in modules.values()):
        delta -= intermediate
    for names, size in _WEIGHT_INPUTS.items():
        width = hidden if size == "h" else intermediate
        found = [m for n, m in modules.items() if n.rsplit(".", 1)[-1] in names]
        if not found:
            return 0  # not the layout the count assumes
        shares_input = False
        for m in found:
            base = getattr(m, "base_layer", m)
            if any(p.requires_grad and (p.ndim >= 2 or names in _NORMS) for p in base.parameters()):
                shares_input = True
            for adapter, rank in getattr(m, "r", {}).items():  # peft's LoRA layers
                drop = m.lora_dropout[adapter]
                if isinstance(drop, torch.nn.Dropout) and drop.p > 0:
                    delta += 2 * width
                else:
                    shares_input = True
                    if isinstance(m.lora_A[adapter], lean.DropoutLinear):
                        delta += width // 32  # its mask, a bit an element
                delta += rank
        if not shares_input:
            delta -= width
    return delta


def activation_bytes(c: Counts, s: Shape) -> float:
    if c.layers == 0:
        return 0.0
    tokens = s.micro_batch * s.seq_len
    a = 2 if s.precision in ("bf16", "fp16") else 4
    per_layer = tokens * saved_per_token(c) * a
    if s.attention == "eager":  # the score matrix and its softmax are saved
        per_layer += 2 * s.micro_batch * c.heads * s.seq_len**2 * a
    if s.checkpointing:  # each block keeps its input; one block's activations at a time
        return c.layers * tokens * c.hidden * a + per_layer
    return c.layers * per_layer


def logits_bytes(c: Counts, s: Shape) -> float:
    """The output layer: fp32 logits, their log-softmax and their gradient (three
    [tokens, vocab] tensors at the peak), or the chunked loss's slice of them."""
    if c.predicts != "next_tokens":
        return 0.0
    tokens = s.micro_batch * s.seq_len
    rows = min(s.loss_chunk, tokens) if s.loss_chunk else tokens  # a chunk holds loss_chunk target rows
    return 3 * rows * c.vocab * 4


# ----------------------------------------------------------------------------- time
def flops_per_token(c: Counts, s: Shape) -> float:
    """6 N per token for full fine-tuning (forward 2N, backward 4N); frozen weights skip
    the backward's weight gradients (2N); attention scores add 12 L h s; checkpointing
    runs the forward again."""
    n_all, n_train = c.total, c.trainable
    if c.predicts != "next_tokens":
        n_all -= c.vocab * c.hidden  # the embedding is a lookup; no output layer over the vocab
    forward = 2 * n_all + 4 * c.layers * c.hidden * s.seq_len
    backward = 2 * forward - 2 * (n_all - min(n_train, n_all))
    return forward * (2 if s.checkpointing else 1) + backward


def comm_bytes(c: Counts, s: Shape) -> float:
    """Bytes each process sends per optimizer step (ring collectives: (n-1)/n of the
    buffer per all-gather or reduce-scatter, twice that per all-reduce)."""
    n = s.processes
    if n == 1:
        return 0.0
    ring = (n - 1) / n
    grads = 4 * c.trainable
    stage = _stage(s.backend)
    if stage == 3:  # all-gather the weights for forward and backward, reduce-scatter gradients
        weights = c.trainable * s.weight_bytes + c.frozen * s.frozen_bytes
        return ring * (2 * weights * s.grad_accum + grads)
    return 2 * ring * grads  # all-reduce (ddp), or reduce-scatter + all-gather (zero1/2)


def device_for(name: str) -> Device:
    if name == "cpu":
        return measure_cpu()
    if name not in DEVICES:
        raise ConfigError(f"plan.gpu={name!r}: choose one of {sorted(DEVICES) + ['cpu']}")
    return DEVICES[name]


def measure_cpu() -> Device:
    """This machine, measured on the spot: fp32 and bf16 matmul throughput on all its
    threads, memory from /proc/meminfo; processes talk over loopback (gloo)."""
    def tflops(dtype):
        a = torch.randn(1024, 1024, dtype=dtype)
        b = torch.randn(1024, 1024, dtype=dtype)
        a @ b
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 0.3:
            a @ b
            reps += 1
        return 2 * 1024**3 * reps / (time.perf_counter() - t0) / 1e12

    mem_kb = int(next(line for line in open("/proc/meminfo") if line.startswith("MemTotal")).split()[1])
    return Device(f"this CPU ({os.cpu_count()} threads)", mem_kb * 1024 / GB, tflops(torch.bfloat16),
                  tflops(torch.float32), 5.0, 1.0, runtime_gb=0.0)


def runtime_bytes_cpu(backend: str) -> float:
    """What a training process holds before any model: this process's resident set with
    distft's trainer imported (torch, transformers, datasets, peft and the rest it pulls
    in), and DeepSpeed for zero*."""
    import distft.trainer  # noqa: F401

    if backend.startswith("zero"):
        import deepspeed  # noqa: F401
    from distft.memory import rss_bytes

    return rss_bytes()


# ----------------------------------------------------------------------------- the plan
def plan(c: Counts, s: Shape, dev: Device, mfu: float, tokens: Optional[float] = None,
         runtime: Optional[float] = None, suggest: bool = True) -> Plan:
    parts, host = memory_parts(c, s)
    parts["runtime"] = dev.runtime_gb * GB if runtime is None else runtime
    groups = transient_groups(s)
    total = peak_bytes(parts, groups)
    peak = (dev.bf16_tflops if s.precision in ("bf16", "fp16") else dev.fp32_tflops) * 1e12
    tokens_step = s.micro_batch * s.seq_len * s.grad_accum * s.processes
    compute = flops_per_token(c, s) * tokens_step / s.processes / (peak * mfu)
    volume = comm_bytes(c, s)
    bandwidth = (dev.inter_gbs if s.nodes > 1 else dev.intra_gbs) * GB
    comm = volume / bandwidth if volume else 0.0
    step = compute + comm
    tps = tokens_step / step
    epoch_h = tokens / tps / 3600 if tokens else None
    p = Plan(dev.name, dev.memory_gb, {k: v / GB for k, v in parts.items()}, {k: v / GB for k, v in host.items()},
             total / GB, total <= dev.memory_gb * GB, step, compute, comm, volume / GB, tokens_step, tps, epoch_h,
             epoch_h * s.processes if epoch_h else None, mfu, transient=groups, counts=asdict(c), shape=asdict(s))
    if suggest and not p.fits:
        fix = suggest_fix(c, s, dev, mfu, runtime)
        if fix:
            p.suggestion, p.suggestion_total_gb = fix
    return p


_SHAPE_KEYS = {"trainer.activation_checkpointing": ("checkpointing", lambda v: v == "true"),
               "backend": ("backend", str), "trainer.batch_size": ("micro_batch", int),
               "trainer.grad_accum": ("grad_accum", int), "trainer.loss_chunk_size": ("loss_chunk", int),
               "backend.offload_optimizer": ("offload_optimizer", lambda v: v == "true")}


def shape_with(s: Shape, overrides: List[str]) -> Shape:
    """`s` with distft-train overrides applied (those the suggestions use)."""
    changes = {}
    for item in overrides:
        key, _, value = item.partition("=")
        field_name, convert = _SHAPE_KEYS[key]
        changes[field_name] = convert(value)
    return replace(s, **changes)


def suggest_fix(c: Counts, s: Shape, dev: Device, mfu: float, runtime) -> Optional[tuple]:
    """The first of the usual changes (one, then two together) that makes the plan fit:
    ([overrides], the new total in GB). LoRA comes last: it changes what is trained."""
    options = []
    if not s.checkpointing:
        options.append(["trainer.activation_checkpointing=true"])
    options += [[f"backend={b}"] for b in ("zero2", "zero3", "fsdp") if _stage(b) > _stage(s.backend)]
    if s.micro_batch > 1:
        half = s.micro_batch // 2
        options.append([f"trainer.batch_size={half}", f"trainer.grad_accum={s.grad_accum * s.micro_batch // half}"])
    if s.backend.startswith("zero") and not s.offload_optimizer:
        options.append(["backend.offload_optimizer=true"])
    if c.predicts == "next_tokens" and not s.loss_chunk and supports(s.backend, "chunked_loss"):
        options.append(["trainer.loss_chunk_size=1024"])
    for combo in [o for o in options] + [a + b for i, a in enumerate(options) for b in options[i + 1:]]:
        shape = shape_with(s, combo)
        if shape.offload_optimizer and not shape.backend.startswith("zero"):
            continue  # offload is ZeRO's
        if not supports(shape.backend, "chunked_loss"):
            shape = replace(shape, loss_chunk=0)  # that backend computes the full logits
        p = plan(c, shape, dev, mfu, runtime=runtime, suggest=False)
        if p.fits:
            return combo, p.total_gb
    if c.frozen == 0:  # LoRA r=8 on the attention projections trains about 0.5% of the weights
        lora = max(1, c.total // 200)
        p = plan(replace(c, trainable=lora, frozen=c.total - lora), s, dev, mfu, runtime=runtime, suggest=False)
        if p.fits:
            return ["strategy=lora"], p.total_gb
    return None


# ----------------------------------------------------------------------------- from a config
def count_model(cfg) -> Counts:
    """Build the run's model on the meta device, apply its strategy, count."""
    from distft.models.loading import _model_config, load_tokenizer, resolve_model_path
    from distft.strategies import build_strategy
    from distft.strategies.base import find_layer_stack
    from distft.tasks import task_class

    task_cls = task_class(cfg)
    info = task_cls.info_for(cfg)
    num_labels = info.num_labels or 2
    tokenizer = load_tokenizer(cfg.model, resolve_model_path(cfg.model))
    predicts = task_cls.predicts if task_cls.predicts in ("next_tokens", "label", "token_labels") else "label"
    auto_cls, config, dtype, attn, _ = _model_config(cfg.model, predicts, tokenizer, num_labels, None)
    with torch.device("meta"):
        model = auto_cls.from_config(config, dtype=dtype, attn_implementation=attn)
        model = build_strategy(cfg.strategy).apply(model, replace(info, num_labels=num_labels))
        if cfg.trainer.lean_activations and not PRIVACY.get(cfg.privacy.name).per_example:
            lean.apply(model, cfg.trainer.lean_dropout_rng)
    seen, total, trainable, largest_tensor = set(), 0, 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
            largest_tensor = max(largest_tensor, p.numel())
    try:
        blocks = list(find_layer_stack(getattr(model, "backbone", model)))
    except ConfigError:
        blocks = []
    largest = max((sum(p.numel() for p in b.parameters()) for b in blocks), default=0)
    hc = getattr(config, "text_config", config)
    heads = getattr(hc, "num_attention_heads", 1)
    hidden = getattr(hc, "hidden_size", 0)
    kv = getattr(hc, "num_key_value_heads", heads) * getattr(hc, "head_dim", hidden // max(1, heads))
    return Counts(total, trainable, total - trainable, largest, len(blocks), hidden,
                  getattr(hc, "intermediate_size", 4 * hidden), kv, heads, getattr(hc, "vocab_size", len(tokenizer)),
                  predicts, largest_tensor,
                  saved_delta_per_token(blocks[0], hidden, getattr(hc, "intermediate_size", 4 * hidden)) if blocks else 0)


def shape_of(cfg, processes: int, nodes: int, device_is_gpu: bool) -> Shape:
    t = cfg.trainer
    precision = t.precision
    if precision == "auto":
        precision = "bf16" if device_is_gpu else "fp32"
    weight_bytes = 2 if cfg.model.dtype in ("bfloat16", "float16") else 4
    frozen = 2 if (t.frozen_in_bf16 and precision == "bf16" and cfg.backend.name in ("single", "ddp")) else weight_bytes
    attention = cfg.model.attn_implementation
    if attention == "auto":
        attention = "flash_attention_2" if device_is_gpu and precision in ("bf16", "fp16") else "sdpa"
    return Shape(cfg.backend.name, processes, nodes, t.batch_size, cfg.data.max_length, t.grad_accum, precision,
                 weight_bytes, frozen, bool(t.activation_checkpointing),
                 int(t.loss_chunk_size) if supports(cfg.backend.name, "chunked_loss") else 0,
                 bool(cfg.backend.get("offload_optimizer", False)), bool(cfg.backend.get("offload_param", False)),
                 attention, device_is_gpu)


PLAN_KEYS = {"gpu": "h100", "nodes": 1, "gpus_per_node": None, "tokens": None, "mfu": None}


def split_overrides(args: List[str]) -> tuple[Dict, List[str]]:
    keys, rest = dict(PLAN_KEYS), []
    for item in args:
        key, sep, value = item.partition("=")
        if key.startswith("plan."):
            name = key[len("plan."):]
            if name not in PLAN_KEYS or not sep:
                raise ConfigError(f"{item!r}: plan keys are {', '.join('plan.' + k for k in PLAN_KEYS)}")
            keys[name] = value
        else:
            rest.append(item)
    return keys, rest


def compose(overrides: List[str]):
    from distft.config import compose_train

    return compose_train(overrides)


def plan_config(cfg, keys: Dict) -> Plan:
    gpu = str(keys["gpu"])
    dev = device_for(gpu)
    nodes = int(keys["nodes"])
    per_node = int(keys["gpus_per_node"]) if keys["gpus_per_node"] else (1 if gpu == "cpu" else 8)
    processes = nodes * per_node
    if cfg.backend.name == "single" and processes > 1:
        raise ConfigError(f"backend=single runs one process; plan.nodes x plan.gpus_per_node is {processes} "
                          "(choose backend=ddp, fsdp or zero1-3)")
    s = shape_of(cfg, processes, nodes, gpu != "cpu")
    mfu = float(keys["mfu"]) if keys["mfu"] else (0.4 if gpu != "cpu" else 0.5)
    runtime = runtime_bytes_cpu(s.backend) if gpu == "cpu" else None
    tokens = float(keys["tokens"]) if keys["tokens"] else None
    return plan(count_model(cfg), s, dev, mfu, tokens, runtime)


def render(p: Plan) -> str:
    c, s = p.counts, p.shape
    lines = [f"model: {c['total']:,} parameters, {c['trainable']:,} trainable ({100 * c['trainable'] / c['total']:.2f}%),"
             f" {c['layers']} blocks (largest {c['largest_block']:,})",
             f"run: backend={s['backend']} on {s['processes']} process(es) over {s['nodes']} node(s), "
             f"micro-batch {s['micro_batch']} x {s['seq_len']} tokens, grad_accum {s['grad_accum']}, {s['precision']}"
             + (", activation checkpointing" if s["checkpointing"] else ""),
             f"device: {p.device}, {p.memory_gb:.1f} GB", "", "memory per process (GB):"]
    for k, v in p.parts_gb.items():
        lines.append(f"  {k:<16} {v:9.3f}")
    lines.append(f"  {'peak':<16} {p.total_gb:9.3f}  of {p.memory_gb:.1f}: "
                 + ("fits" if p.fits else "DOES NOT FIT"))
    if p.transient:
        lines.append("  (" + " and ".join("+".join(g) for g in p.transient)
                     + " are not held at once: the peak counts the larger)")
    for k, v in p.host_gb.items():
        lines.append(f"  host {k:<11} {v:9.3f}  (offloaded, per process)")
    lines += ["", f"step: {p.step_seconds:.3f} s ({p.compute_seconds:.3f} compute at {p.mfu:.0%} MFU + "
              f"{p.comm_seconds:.3f} communication, {p.comm_gb:.3f} GB sent per process)",
              f"throughput: {p.tokens_per_second:,.0f} tokens/s ({p.tokens_per_step:,} tokens a step)"]
    if p.epoch_hours is not None:
        lines.append(f"an epoch: {p.epoch_hours:.2f} h, {p.gpu_hours:.1f} device-hours")
    if not p.fits:
        if p.suggestion:
            lines += ["", f"to fit ({p.suggestion_total_gb:.2f} GB): " + " ".join(p.suggestion)]
        else:
            lines += ["", "no single change or pair of the usual ones (checkpointing, a higher ZeRO stage, offload, "
                      "a smaller micro-batch, chunked loss, LoRA) makes it fit: more devices or a smaller model"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- --check
def check_run(run_dir: str) -> Dict:
    """The plan of a finished run (its config, on this CPU or the GPU it ran on) against
    its summary.json: planned and measured peak memory per process and tokens/s."""
    from omegaconf import OmegaConf

    run = Path(run_dir)
    if not (run / "summary.json").is_file() or not (run / "config.yaml").is_file():
        raise ConfigError(f"{run}: not a finished run (no summary.json and config.yaml)")
    summary = json.loads((run / "summary.json").read_text())
    cfg = OmegaConf.load(run / "config.yaml")
    on_gpu = summary.get("memory_kind") == "cuda_max_allocated"
    keys = dict(PLAN_KEYS, gpu=os.environ.get("DISTFT_PLAN_GPU", "h100") if on_gpu else "cpu",
                gpus_per_node=summary.get("processes", 1))
    p = plan_config(cfg, keys)
    if on_gpu:  # the allocator's peak: no CUDA context in it
        p.total_gb -= p.parts_gb.pop("runtime")
    measured_mb = max(summary["peak_memory_mb_per_process"])
    planned_mb = p.total_gb * GB / MB
    out = {"run_dir": str(run), "backend": summary.get("backend"), "processes": summary.get("processes"),
           "planned_peak_mb": planned_mb, "measured_peak_mb": measured_mb,
           "memory_error": planned_mb / measured_mb - 1,
           "planned_parts_mb": {k: v * GB / MB for k, v in p.parts_gb.items()},
           "planned_tokens_per_second": p.tokens_per_second, "measured_tokens_per_second": summary.get("tokens_per_second")}
    if out["measured_tokens_per_second"]:
        out["time_error"] = out["measured_tokens_per_second"] / p.tokens_per_second - 1
    return out


def main(argv: Optional[List[str]] = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="distft-plan", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="distft-train overrides and plan.gpu|nodes|gpus_per_node|tokens|mfu")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    ap.add_argument("--check", metavar="RUN_DIR", help="hold the plan against a finished run's summary.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    # With --json, stdout carries the JSON alone: what the libraries print on import
    # (DeepSpeed's accelerator notice) goes to stderr.
    quiet = contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()
    try:
        if args.check:
            with quiet:
                result = check_run(args.check)
            if args.json:
                print(json.dumps(result, indent=2))
            else:
                print(f"{result['run_dir']}: peak memory per process planned {result['planned_peak_mb']:.0f} MB, "
                      f"measured {result['measured_peak_mb']:.0f} MB ({result['memory_error']:+.1%}); tokens/s planned "
                      f"{result['planned_tokens_per_second']:.1f}, measured {result['measured_tokens_per_second'] or 0:.1f}"
                      + (f" ({result['time_error']:+.1%})" if "time_error" in result else ""))
            return 0
        keys, overrides = split_overrides(args.overrides)
        with quiet:
            p = plan_config(compose(overrides), keys)
    except DistftError as e:
        print(f"distft-plan: {e}", file=sys.stderr)
        return 2
    print(json.dumps(asdict(p), indent=2) if args.json else render(p))
    return 0 if p.fits else 1


if __name__ == "__main__":
    sys.exit(main())
