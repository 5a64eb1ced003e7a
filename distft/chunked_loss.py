"""Next-token loss without the full logits tensor.

With a large vocabulary the logits are the largest tensor of a step: SmolLM2's 49,152
tokens make a batch of 8 x 256 hold 100M floats (400 MB in fp32, and as much again for
their gradient). Here the model is asked for the logits of one position only
(`logits_to_keep=1`), the decoder's final hidden states are taken from a forward hook, and
the output layer is applied to the target positions alone, a chunk of rows at a time.
Each chunk runs under non-reentrant activation checkpointing, so only one chunk's logits
exist at any moment, in forward and in backward. Positions that are not targets (prompt
tokens under task.mask_prompt, padding) never reach the output layer at all.
Where the output layer is frozen (LoRA, BitFit, partial: the tied embedding) the chunks
need no checkpointing: each chunk's gradient with respect to its rows is computed in the
forward, right after its loss, and its logits are dropped (`_FrozenHeadLossFn`), so they
are computed once a step, not twice.

Written here because the libraries that do this either need Triton kernels on a GPU
(Liger's fused linear cross-entropy) or come with their own trainer (torchtune's chunked
loss); this one is plain PyTorch, runs on CPU and GPU, and sits behind transformers'
`logits_to_keep`.
"""
from __future__ import annotations

import inspect
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from distft.tasks.base import IGNORE


def _causal_lm(model):
    """The transformers model under the PEFT/backend wrappers (DDP and DeepSpeed keep it in
    .module, PEFT in .base_model.model)."""
    from transformers import PreTrainedModel

    seen = model
    for _ in range(8):
        if isinstance(seen, PreTrainedModel) and seen.get_output_embeddings() is not None:
            return seen
        # .model before .base_model: on a transformers model .base_model is the decoder.
        seen = getattr(seen, "module", None) or getattr(seen, "model", None) or getattr(seen, "base_model", None)
        if seen is None:
            break
    return None


class HiddenStateTap:
    """Keeps the decoder's last output (after its final norm) from each forward."""

    def __init__(self, model):
        hf = _causal_lm(model)
        self.head = hf.get_output_embeddings()
        self.hidden: Optional[torch.Tensor] = None
        self._handle = hf.get_decoder().register_forward_hook(self._keep)

    def _keep(self, module, args, output):
        self.hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    def take(self) -> torch.Tensor:
        hidden, self.hidden = self.hidden, None
        if hidden is None:
            raise RuntimeError("the decoder's forward hook saw no hidden states")
        return hidden

    def remove(self) -> None:
        self._handle.remove()


def why_not(model, backend: str) -> Optional[str]:
    """None when the chunked loss can run on this model and backend, else the reason."""
    from distft.backends import supports

    # FSDP2 gathers the output layer only inside the root module's forward.
    if not supports(backend, "chunked_loss"):
        return f"backend={backend} shards the output layer outside the forward pass"
    hf = _causal_lm(model)
    if hf is None:
        return "the model is not a transformers causal LM"
    if "logits_to_keep" not in inspect.signature(hf.forward).parameters:
        return f"{type(hf).__name__}.forward has no logits_to_keep"
    head = hf.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        return f"its output layer is a {type(head).__name__}, not a Linear"
    return None


def _logits(head, weight: Optional[torch.Tensor], hidden: torch.Tensor) -> torch.Tensor:
    # Without a cast weight the layer is called as a module, not through its weight: under
    # ZeRO-3 the weight is a shard outside a module call, and the call's hooks gather it
    # (Backend.call_outside_forward keeps it gathered for the backward's recomputation).
    return (head(hidden) if weight is None else F.linear(hidden, weight, head.bias)).float()


def _chunk_loss(head, weight, hidden, targets):
    return F.cross_entropy(_logits(head, weight, hidden), targets, reduction="sum")


def _cast_once(head, hidden: torch.Tensor, sharded: bool) -> Optional[torch.Tensor]:
    """The output layer's frozen weight in autocast's dtype, cast once for all the chunks of
    a step; None where the layer must be called as is. Autocast caches its casts only for
    weights that require grad, so a frozen fp32 weight (the tied embedding of a LoRA run:
    49,152 x 576 in SmolLM2, 6 ms a cast on 2 CPU cores) was cast again by every chunk, in
    forward and in the backward's recomputation. Sharded parameters are gathered by the
    module call itself: left alone."""
    device = hidden.device.type
    weight = head.weight
    if sharded or weight.requires_grad or type(weight) is not torch.nn.Parameter or not torch.is_autocast_enabled(device):
        return None
    dtype = torch.get_autocast_dtype(device)
    return weight.to(dtype) if weight.dtype != dtype and weight.is_floating_point() else None


def _targets(hidden: torch.Tensor, labels: torch.Tensor):
    """The hidden state of each position whose next token is a target, and that token."""
    targets = labels[:, 1:]
    keep = targets != IGNORE
    return hidden[:, :-1][keep], targets[keep]


def _chunks(rows: int, chunk: int, agree: Optional[Callable[[int], int]]) -> range:
    """Where each chunk starts. Under ZeRO-3 each call of the output layer gathers its weight
    in a collective, so every rank must call it as often as the others: `agree` turns this
    rank's count into the largest over the ranks, and the calls past its own rows take no
    rows."""
    calls = -(-rows // chunk)
    if agree is not None:
        calls = agree(calls)
    return range(0, calls * chunk, chunk)


class _FrozenHeadLossFn(torch.autograd.Function):
    """The summed cross-entropy of `rows @ weight.T` against `targets`, a chunk of rows at a
    time, for a frozen output layer: each chunk's gradient with respect to its rows is
    computed in the forward, right after its loss, and kept (rows x hidden values) instead
    of its logits. The checkpointed path computes every chunk's logits twice, in forward and
    again in the backward's recomputation; here they are computed once, which saves a third
    of the output layer's matmul work of a step (at SmolLM2's 49,152 x 576 output layer, a
    fifth of the model's forward FLOPs a token). The gradient comes from the same kernels
    as autograd's (cross-entropy's backward, then the layer's input gradient in the
    weight's dtype), so with an upstream gradient of 1 it is the checkpointed path's bit for
    bit; otherwise that factor is applied after the matmul instead of before it.

    Only where nothing is learnt in the output layer (LoRA, BitFit and partial runs; a full
    fine-tune trains it) and it is not sharded; the caller checks."""

    @staticmethod
    def forward(ctx, rows, weight, targets, chunk):
        device = rows.device.type
        grad_rows = torch.empty_like(rows)
        total = rows.new_zeros((), dtype=torch.float32)
        with torch.autocast(device, enabled=False):
            for i in range(0, rows.shape[0], chunk):
                x = rows[i:i + chunk].to(weight.dtype)
                with torch.enable_grad():
                    logits = F.linear(x, weight).float().requires_grad_()
                    loss = F.cross_entropy(logits, targets[i:i + chunk], reduction="sum")
                    (grad_logits,) = torch.autograd.grad(loss, logits)
                total += loss.detach()
                grad_rows[i:i + chunk] = torch.mm(grad_logits.to(weight.dtype), weight)
        ctx.save_for_backward(grad_rows)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad_rows,) = ctx.saved_tensors
        # The factor in fp32: rounded to bf16 it would scale every gradient by up to 0.4% off.
        return (grad_rows.float() * grad_total).to(grad_rows.dtype), None, None, None


def _frozen_head_weight(head, rows: torch.Tensor, sharded: bool) -> Optional[torch.Tensor]:
    """The weight `_FrozenHeadLossFn` computes with (cast once to autocast's dtype where it
    is on), or None where the checkpointed chunks must run: a trained or sharded output
    layer, one with a bias, no gradient wanted."""
    weight = head.weight
    if (sharded or weight.requires_grad or type(weight) is not torch.nn.Parameter or head.bias is not None
            or not weight.is_floating_point() or not torch.is_grad_enabled() or not rows.requires_grad):
        return None
    cast = _cast_once(head, rows, sharded)
    return weight if cast is None else cast


def loss_sum(hidden: torch.Tensor, head: torch.nn.Linear, labels: torch.Tensor, chunk: int,
             agree: Optional[Callable[[int], int]] = None, recompute: bool = False) -> torch.Tensor:
    """The summed loss of the target positions. `recompute` makes a frozen output layer take
    the checkpointed chunks too (bench/chunked_loss.py compares the two)."""
    rows, targets = _targets(hidden, labels)
    frozen = None if recompute else _frozen_head_weight(head, rows, agree is not None)
    if frozen is not None:
        return _FrozenHeadLossFn.apply(rows, frozen, targets, chunk)
    total = hidden.new_zeros((), dtype=torch.float32)
    weight = _cast_once(head, rows, agree is not None)
    for i in _chunks(rows.shape[0], chunk, agree):
        total = total + checkpoint(_chunk_loss, head, weight, rows[i:i + chunk], targets[i:i + chunk],
                                   use_reentrant=False)
    return total


@torch.no_grad()
def eval_sums(hidden: torch.Tensor, head: torch.nn.Linear, labels: torch.Tensor, chunk: int,
              agree: Optional[Callable[[int], int]] = None):
    rows, targets = _targets(hidden, labels)
    loss, correct = 0.0, 0
    weight = _cast_once(head, rows, agree is not None)
    for i in _chunks(rows.shape[0], chunk, agree):
        logits = _logits(head, weight, rows[i:i + chunk])
        loss += float(F.cross_entropy(logits, targets[i:i + chunk], reduction="sum"))
        correct += int((logits.argmax(-1) == targets[i:i + chunk]).sum())
    return {"loss_sum": loss, "correct": float(correct), "count": float(targets.numel())}
