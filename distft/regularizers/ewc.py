from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List

import torch

from distft.errors import ConfigError
from distft.regularizers import REGULARIZERS
from distft.regularizers.anchored import AnchoredPenalty, penalized_names

log = logging.getLogger("distft")

ARTIFACT = "ewc"  # the name under which a stage hands its estimate on (summary "artifacts")


@REGULARIZERS.register("ewc")
class EWC(AnchoredPenalty):
    """Elastic Weight Consolidation (Kirkpatrick et al., 2017), online form (Schwarz et
    al., 2018): strength/2 * sum_i F_i (theta_i - theta*_i)^2, F a diagonal Fisher.

    At the end of a run the Fisher of its own task is estimated on its training data (the
    mean over examples of each example's squared loss gradient, at the final weights, in
    eval mode) and written with the weights it anchors to, as ewc.safetensors; a
    sequential recipe hands that file to the next stage (cfg.inputs.ewc), which
    penalises moving away from those weights. With more stages the estimates combine
    online: F <- decay * F_before + F_this_stage, anchored at the latest stage's weights
    (decay 1: the plain sum over earlier tasks). A run handed nothing adds no penalty."""

    def check(self, cfg) -> None:
        super().check(cfg)
        if cfg.backend.name == "fsdp":
            raise ConfigError("regularizer=ewc with backend=fsdp: the Fisher estimate needs each example's gradient "
                              "of the whole weights, and FSDP holds only shards of them; use backend=ddp or single "
                              "(regularizer=l2sp and replay run on fsdp)")
        if self.cfg.fisher_examples is not None and self.cfg.fisher_examples < 1:
            raise ConfigError(f"regularizer.fisher_examples={self.cfg.fisher_examples}: give a count >= 1 or null "
                              "for every training example")
        if not 0 <= self.cfg.decay <= 1:
            raise ConfigError(f"regularizer.decay={self.cfg.decay}: must be in [0, 1]")

    def setup(self, run):
        self.run = run
        self.before = {}
        path = run.cfg.inputs.get(ARTIFACT)
        self._placed = False
        if not path:
            log.info("EWC: no earlier estimate handed in (a first stage): no penalty in this run")
            return
        from safetensors.torch import load_file

        if not Path(path).is_file():
            raise ConfigError(f"inputs.{ARTIFACT}={path}: no such file (an earlier stage's ewc.safetensors)")
        saved = load_file(str(path))
        names = set(penalized_names(run.model))
        fisher = {k[len("fisher."):]: v for k, v in saved.items() if k.startswith("fisher.")}
        unknown = sorted(set(fisher) - set(dict(run.model.named_parameters())))
        if unknown:
            raise ConfigError(f"inputs.{ARTIFACT}={path}: {unknown[0]} is not a parameter of this model "
                              "(estimated for another model or strategy?)")
        self.before = {n: (fisher[n], saved[f"anchor.{n}"]) for n in fisher}
        self.weights = {n: f.float() for n, (f, _) in self.before.items() if n in names}
        self.anchors = {n: self.before[n][1] for n in self.weights}
        log.info("EWC: penalty on %d tensors from %s (strength %g)", len(self.anchors), path, self.cfg.strength)

    def artifacts(self, run) -> Dict[str, str]:
        module = run.backend.unwrap(run.model)
        names = penalized_names(module)
        fisher = fisher_diagonal(run, module, names, self.cfg.fisher_examples, run.cfg.seed)
        params = dict(module.named_parameters())
        # Anchored where the next stage starts: the exported weights (best/ when the run
        # exports its best step; the Fisher is of the final weights either way).
        exported = {}
        weights_file = Path(run.exported_weights) / "weights.safetensors"
        if weights_file.is_file():
            from safetensors.torch import load_file

            exported = load_file(str(weights_file))
        out = {}
        for n in names:
            f = fisher[n]
            if n in self.before:  # online EWC: the earlier tasks' information, decayed
                f = f + self.cfg.decay * self.before[n][0].to(f.device)
            out[f"fisher.{n}"] = f.cpu().contiguous()
            anchor = exported[n] if n in exported else params[n].detach()
            out[f"anchor.{n}"] = anchor.float().cpu().contiguous()
        path = run.run_dir / "ewc.safetensors"
        if run.main:
            from safetensors.torch import save_file

            tmp = path.with_suffix(".tmp")
            save_file(out, str(tmp))
            tmp.replace(path)
        return {ARTIFACT: str(path)}


def fisher_diagonal(run, module, names: List[str], limit, seed: int) -> Dict[str, torch.Tensor]:
    """The empirical diagonal Fisher: mean over training examples of each example's
    squared gradient of its own loss (true labels), in eval mode. One example per backward
    (exact per-example gradients for any model, no padding); the examples are a seeded
    choice of `limit` (null: all), split across processes and summed.

    torch.autograd.grad, not .backward(): the gradients never reach .grad, so the
    optimizer's state and DDP's gradient hooks are left alone."""
    import torch.distributed as dist

    params = dict(module.named_parameters())
    targets = [params[n] for n in names]
    n_all = len(run.train_examples)
    order = torch.randperm(n_all, generator=torch.Generator().manual_seed(seed + 104729)).tolist()
    chosen = order[: limit or n_all]
    rank, world = run.backend.rank, run.backend.world_size
    sums = [torch.zeros_like(p, dtype=torch.float32) for p in targets]
    was_training = module.training
    module.eval()
    try:
        for i in chosen[rank::world]:
            batch = run._to_device(run.task.collate([run.train_examples[i]]))
            with run._autocast():
                logits = module(**run.task.model_kwargs(batch)).logits
            loss = run.task.example_losses(logits, batch)[0]
            grads = torch.autograd.grad(loss, targets, allow_unused=True)
            for s, g in zip(sums, grads):
                if g is not None:
                    s.add_(g.float() ** 2)
    finally:
        module.train(was_training)
    if world > 1:
        flat = torch.cat([s.flatten() for s in sums])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        sums = [t.view_as(s) for t, s in zip(flat.split([s.numel() for s in sums]), sums)]
    log.info("EWC: Fisher estimated on %d training examples", len(chosen))
    return {n: s / len(chosen) for n, s in zip(names, sums)}
