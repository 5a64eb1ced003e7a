"""DP-SGD with Opacus: `privacy=dp`.

What each part of Opacus does here, and what distft does around it:
- Poisson sampling (distft/samplers/poisson.py, Opacus' UniformWithReplacementSampler):
  the accountant's assumption holds, batch sizes vary.
- Per-example gradients: Opacus' GradSampleModule (its per-layer samplers; torch.func for
  trainable layers without one, such as HF's own RMSNorm classes).
- Clipping, noise once per logical step, averaging: Opacus' DPOptimizer, or its
  DistributedDPOptimizer on several processes (noise on rank 0 only, then the clipped sums
  are summed across ranks); the model is then not wrapped in DDP, whose averaging in
  backward would mix examples before clipping (the backend's private exchange).
- Accounting: Opacus' accountants (prv, rdp, gdp), one step per noisy step; the history is
  in the checkpoint, so a resumed run continues it.
What distft adds, because no library does it for a loop of its own: cutting a logical
batch into physical micro-batches (the loop calls `after_backward`, which clips and sums
each micro-batch's per-example gradients and frees them, as Opacus' BatchMemoryManager
does for a DataLoader), a noisy step even when a Poisson batch is empty, and the budget
stop.
"""
from __future__ import annotations

import inspect
import logging
import math
import warnings
from typing import Dict, List, Optional

import torch

from distft.errors import ConfigError
from distft.privacy import PRIVACY
from distft.privacy.base import Privacy
from distft.samplers.poisson import generator_state, set_generator_state

log = logging.getLogger("distft")

ACCOUNTANTS = ("prv", "rdp", "gdp")
GRAD_SAMPLE_MODES = ("auto", "hooks", "functorch", "ghost")
# Why a backend without the "dp" capability cannot run DP-SGD.
_ZERO = ("ZeRO partitions and reduces gradients inside DeepSpeed's engine, where Opacus cannot clip them per "
         "example; use backend=ddp or single")
_WHY_NOT = {
    "fsdp": "FSDP shards each gradient across processes before Opacus could clip it per example "
            "(Opacus' ghost_fsdp mode is not wired in yet); use backend=ddp or single",
    "zero1": _ZERO, "zero2": _ZERO, "zero3": _ZERO,
}


def _fill_missing_grad_samples(params) -> None:
    """A trainable tensor this micro-batch did not reach (or every tensor, when a Poisson
    batch is empty) contributes zero per-example gradients, so clipping and noise still
    cover every parameter and the noisy step happens as the accounting assumes."""
    present = [p.grad_sample for p in params if getattr(p, "grad_sample", None) is not None]
    first = present[0] if present else None
    rows = 0 if first is None else (len(first) if isinstance(first, torch.Tensor) else sum(len(g) for g in first))
    for p in params:
        if getattr(p, "grad_sample", None) is None:
            p.grad_sample = torch.zeros((rows, *p.shape), dtype=p.dtype, device=p.device)


class _GroupClipping:
    """Group-wise clipping for DPOptimizer: each example's gradient is cut into groups
    (here the task heads and the rest) and each part is clipped to its own bound. One
    example then moves the summed gradient by at most the root of the sum of the bounds'
    squares, which Opacus' noise (std noise_multiplier x max_grad_norm) is given as its
    max_grad_norm: the same sensitivity argument as Opacus' per-layer clipping
    (DPPerLayerOptimizer), over two groups instead of every tensor.

    Why: under flat clipping the largest part takes the bound. A fresh head's per-example
    gradient has norm near 1 against 0.1 for MiniLM's LoRA adapters (measured), so the
    adapters keep a tenth of the clipped signal while the noise on each of their
    coordinates is the full bound's. Opacus clips either everything at once or every tensor
    apart; not groups, hence this override of its clip_and_accumulate."""

    group_of: List[int]
    group_bounds: List[float]

    group_noise: Optional[List[float]] = None  # per group: its noise std / noise_multiplier

    def add_noise(self):
        """Under privacy.head_noise_share each group takes noise sized to its own bound.
        Why it is private: scale group g of the summed gradient by 1 / s_g (s_g its noise
        scale); one example then moves it by at most sqrt(sum_g (C_g / s_g)^2), which is 1
        when s_g = C_g / sqrt(w_g) with the shares w_g adding up to 1, and the noise there
        is noise_multiplier x 1 on every coordinate: Opacus' own mechanism at sensitivity 1,
        so the accountant is unchanged. With w_g = C_g^2 / sum C^2 this is Opacus' one noise
        scale over both groups. Opacus adds one std to every tensor; hence this override."""
        if self.group_noise is None or getattr(self, "rank", 0) != 0:  # DP-DDP: noise on rank 0 only
            return super().add_noise()
        from opacus.optimizers.optimizer import _check_processed_flag, _generate_noise, _mark_as_processed

        for p, g in zip(self.params, self.group_of):
            _check_processed_flag(p.summed_grad)
            noise = _generate_noise(std=self.noise_multiplier * self.group_noise[g], reference=p.summed_grad,
                                    generator=self.generator, secure_mode=self.secure_mode)
            p.grad = (p.summed_grad + noise).view_as(p)
            _mark_as_processed(p.summed_grad)

    def clip_and_accumulate(self):
        from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

        samples = self.grad_samples
        rows = len(samples[0])
        device = samples[0].device
        factors = []
        for g, bound in enumerate(self.group_bounds):
            norms = [s.reshape(rows, -1).norm(2, dim=-1) for s, k in zip(samples, self.group_of) if k == g]
            total = torch.stack(norms, 1).norm(2, dim=1) if norms and rows else torch.zeros(rows, device=device)
            factors.append((bound / (total + 1e-6)).clamp(max=1.0))
        for p, g in zip(self.params, self.group_of):
            _check_processed_flag(p.grad_sample)
            sample = self._get_flat_grad_sample(p).to(p.dtype)
            grad = torch.einsum("i,i...", factors[g].to(sample.device, p.dtype), sample)
            p.summed_grad = grad if p.summed_grad is None else p.summed_grad + grad
            _mark_as_processed(p.grad_sample)


def _dp_optimizer(optimizer, distributed: bool, ghost: bool, groups=None, **kwargs):
    """Opacus' DP optimizer for this run; `groups` (a group index per parameter, the
    bound of each group, each group's noise scale or None for Opacus' one scale) switches
    on group-wise clipping (_GroupClipping)."""
    from opacus.optimizers import (DistributedDPOptimizer, DistributedDPOptimizerFastGradientClipping,
                                   DPOptimizer, DPOptimizerFastGradientClipping)

    if ghost:
        base = DistributedDPOptimizerFastGradientClipping if distributed else DPOptimizerFastGradientClipping

        class StepsEvenWhenEmpty(base):
            # The step's clipped sum is already in summed_grad (DifferentialPrivacy.backward);
            # an empty Poisson batch adds zeros and still takes its noisy step.
            def pre_step(self, closure=None):
                for p in self.params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                return super().pre_step(closure)
    else:
        base = DistributedDPOptimizer if distributed else DPOptimizer

        class StepsEvenWhenEmpty(base):
            def pre_step(self, closure=None):
                _fill_missing_grad_samples(self.params)
                return super().pre_step(closure)

        if groups is not None:
            class StepsEvenWhenEmpty(_GroupClipping, StepsEvenWhenEmpty):  # noqa: F811
                pass

    built = StepsEvenWhenEmpty(optimizer, **kwargs)
    if groups is not None:
        by_id, built.group_bounds, built.group_noise = groups
        built.group_of = [by_id[id(p)] for p in built.params]
    return built


def _shared_trainable(model) -> list:
    """Names of trainable tensors used by more than one layer (tied embeddings)."""
    owners: Dict[int, list] = {}
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                owners.setdefault(id(p), []).append(f"{name}.{pname}" if name else pname)
    return [names for names in owners.values() if len(names) > 1]


def _positions_per_example(module, args, kwargs):
    # Opacus computes an embedding's per-example gradient from its input; position ids
    # broadcast from one row (a model's default) would give every example the first one's
    # (opacus #841). Pass them per example instead: the same values, batch-first.
    ids = kwargs.get("input_ids")
    if ids is None or kwargs.get("position_ids") is not None or kwargs.get("inputs_embeds") is not None:
        return args, kwargs
    positions = torch.arange(ids.size(1), device=ids.device).unsqueeze(0).expand(ids.size(0), -1).contiguous()
    return args, {**kwargs, "position_ids": positions}


def _takes_position_ids(model) -> bool:
    params = inspect.signature(model.forward).parameters
    return "position_ids" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


@PRIVACY.register("dp")
class DifferentialPrivacy(Privacy):
    """DP-SGD: per-example clipping, Gaussian noise once per logical step, Poisson
    sampling, and an accountant whose epsilon goes to the log, the summary, W&B and the
    exported model's README."""

    per_example = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.noise_multiplier: Optional[float] = cfg.noise_multiplier
        self.accountant = None
        self.noise_generator: Optional[torch.Generator] = None
        self.allowed_steps: Optional[int] = None
        self.run = None
        self._spent: Optional[tuple] = None  # (noisy steps, epsilon) last computed
        self.head_bound: Optional[float] = cfg.get("head_max_grad_norm")
        self.head_share: Optional[float] = cfg.get("head_noise_share")

    # ------------------------------------------------------------------ config time
    def check(self, cfg) -> None:
        try:
            import opacus  # noqa: F401
        except ImportError:
            raise ConfigError("privacy=dp needs Opacus: pip install 'distft[dp]'") from None
        from distft.backends import supports
        from distft.tasks import task_class

        p = cfg.privacy
        if p.target_epsilon is None and p.noise_multiplier is None:
            raise ConfigError("privacy=dp: set privacy.target_epsilon (the noise is calibrated to it) "
                              "or privacy.noise_multiplier")
        if p.target_epsilon is not None and p.target_epsilon <= 0:
            raise ConfigError(f"privacy.target_epsilon={p.target_epsilon}: must be > 0")
        if p.noise_multiplier is not None and p.noise_multiplier < 0:
            raise ConfigError(f"privacy.noise_multiplier={p.noise_multiplier}: must be >= 0")
        if not 0 < p.delta < 1:
            raise ConfigError(f"privacy.delta={p.delta}: must be within (0, 1), and below 1 / training examples")
        if p.max_grad_norm <= 0:
            raise ConfigError(f"privacy.max_grad_norm={p.max_grad_norm}: the per-example clipping bound must be > 0")
        head_bound = p.get("head_max_grad_norm")
        if head_bound is not None:
            if head_bound <= 0:
                raise ConfigError(f"privacy.head_max_grad_norm={head_bound}: the heads' clipping bound must be > 0")
            if p.grad_sample_mode == "ghost":
                raise ConfigError("privacy.head_max_grad_norm with privacy.grad_sample_mode=ghost: ghost clipping "
                                  "computes one clipping factor per example from the norms alone; group-wise "
                                  "clipping needs each example's gradient (hooks, functorch or auto)")
        share = p.get("head_noise_share")
        if share is not None:
            if head_bound is None:
                raise ConfigError("privacy.head_noise_share splits the noise between the heads and the rest, "
                                  "which are clipped apart only with privacy.head_max_grad_norm; set it too")
            if not 0 < share < 1:
                raise ConfigError(f"privacy.head_noise_share={share}: the heads' share must be within (0, 1)")
        if p.accountant not in ACCOUNTANTS:
            raise ConfigError(f"privacy.accountant={p.accountant!r}: choose one of {list(ACCOUNTANTS)}")
        if p.grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ConfigError(f"privacy.grad_sample_mode={p.grad_sample_mode!r}: choose one of "
                              f"{list(GRAD_SAMPLE_MODES)}")
        if p.logical_batch_size is not None:
            if p.logical_batch_size < 1:
                raise ConfigError(f"privacy.logical_batch_size={p.logical_batch_size}: must be >= 1")
            if cfg.trainer.grad_accum != 1:
                raise ConfigError("privacy.logical_batch_size and trainer.grad_accum both set the examples of a "
                                  "noisy step: under DP set one (the logical batch is cut into micro-batches of "
                                  "trainer.batch_size either way)")
        backend = cfg.backend.name
        if not supports(backend, "dp"):
            raise ConfigError(f"privacy=dp with backend={backend}: "
                              f"{_WHY_NOT.get(backend, 'this backend does not declare DP support')}")
        if cfg.data.get("packing"):
            raise ConfigError("privacy=dp with data.packing=true: a packed row holds several examples, so "
                              "clipping per row would no longer bound each example's influence; turn packing off")
        if task_class(cfg).sampler != "epoch":
            raise ConfigError(f"privacy=dp with task={cfg.task.name}: a mixture samples its datasets by weight, "
                              "not by the Poisson sampling the accountant assumes, and its members may share "
                              "examples; train one dataset at a time")
        if cfg.regularizer.name != "none":
            raise ConfigError(f"privacy=dp with regularizer={cfg.regularizer.name}: the penalty's gradient would "
                              "be clipped and noised with the examples'; not supported together")
        t = cfg.trainer
        if t.precision == "fp16":
            raise ConfigError("privacy=dp with trainer.precision=fp16: the loss scaler multiplies every per-example "
                              "gradient before clipping; use bf16 or fp32")
        if t.compile:
            raise ConfigError("privacy=dp with trainer.compile=true: Opacus' per-example hooks do not run "
                              "inside compiled blocks")
        if t.activation_checkpointing:
            raise ConfigError("privacy=dp with trainer.activation_checkpointing=true: the recomputed forward "
                              "would record each layer's activations twice for Opacus' per-example gradients")

    # ------------------------------------------------------------------ setup
    def sampler(self, default: str) -> str:
        return "poisson"

    def setup(self, run) -> None:
        from opacus.accountants import create_accountant

        self.run = run
        # Opacus' backward hooks sit on every trainable layer, the first ones included, whose
        # inputs need no gradient; torch warns then, but a layer's per-example gradient
        # comes from its output's gradient and its saved input, which are complete.
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with "
                                                  "respect to module outputs")
        # The accountants' search over RDP orders warns at the end of its range; the epsilon
        # reported is still a valid (if looser) bound.
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        n = len(run.train_examples)
        if self.cfg.delta >= 1.0 / n:
            raise ConfigError(f"privacy.delta={self.cfg.delta} is not below 1 / {n} training examples: "
                              "a mechanism that publishes one example whole would meet it; lower privacy.delta")
        self.sample_rate = run.sampler.sample_rate
        self.expected_batch = run.sampler.expected_batch
        self.world = run.backend.world_size
        run.backend.use_private_exchange()
        self.accountant = create_accountant(self.cfg.accountant)
        self.noise_generator = torch.Generator(device=run.device).manual_seed(run.cfg.seed + 104729)

    def grad_sample_mode(self, model) -> str:
        """`auto`: ghost clipping under full fine-tuning (per-example gradients of every
        weight would hold batch x model size; ghost clipping computes only their norms,
        at the cost of a second backward) unless trainable weights are tied, which ghost
        clipping cannot handle; per-layer hooks otherwise (LoRA, BitFit, partial: the
        per-example gradients are small and one backward is cheaper)."""
        mode = self.cfg.grad_sample_mode
        if mode != "auto":
            return mode
        if self.head_bound is not None:  # group-wise clipping clips per-example gradients, not their norms
            return "hooks"
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        return "ghost" if trainable > 0.5 * total and not _shared_trainable(model) else "hooks"

    def wrap_model(self, model):
        from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
        from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping
        from opacus.grad_sample.gsm_base import AbstractGradSampleModule

        from distft.backends.base import WRAPPERS

        for wrapper in ((AbstractGradSampleModule, "_module"), (DPDDP, "module")):
            if wrapper not in WRAPPERS:
                WRAPPERS.append(wrapper)
        if _takes_position_ids(model):
            model.register_forward_pre_hook(_positions_per_example, with_kwargs=True)
        # Weights the loss never reaches would take noise only, and ghost clipping refuses a
        # layer that runs forward without its backward (its activations pile up, read as
        # tied weights): they stay as they are.
        unused = [(n, p) for n, p in getattr(model, "unused_parameters", list)() if p.requires_grad]
        for _, p in unused:
            p.requires_grad_(False)
        if unused and run_main(self.run):
            log.info("DP-SGD: frozen, never read by the loss: %s", ", ".join(n for n, _ in unused))
        self.mode = mode = self.grad_sample_mode(model)
        if mode == "ghost":
            shared = _shared_trainable(model)
            if shared:
                raise ConfigError(
                    f"privacy.grad_sample_mode=ghost: trainable weights are shared by several layers ({shared[0]}, "
                    "e.g. tied input and output embeddings); ghost clipping computes each layer's gradient norm "
                    "on its own and would miss their cross term. Use privacy.grad_sample_mode=hooks, or untie them")
        samplers = GradSampleModuleFastGradientClipping.NORM_SAMPLERS if mode == "ghost" else GradSampleModule.GRAD_SAMPLERS
        by_torch_func = sorted({type(m).__name__ for m in model.modules()
                                if any(p.requires_grad for p in m.parameters(recurse=False))
                                and (mode == "functorch" or type(m) not in samplers)})
        try:
            if mode == "ghost":
                wrapped = GradSampleModuleFastGradientClipping(
                    model, batch_first=True, loss_reduction="sum", strict=True, max_grad_norm=self.cfg.max_grad_norm,
                    use_ghost_clipping=True)
            else:
                wrapped = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=True,
                                           force_functorch=mode == "functorch")
        except NotImplementedError as e:
            raise ConfigError(f"privacy=dp: Opacus cannot compute per-example gradients for this model: {e}") from None
        self.gsm = wrapped
        if run_main(self.run):
            how = {"hooks": "Opacus' per-layer samplers", "functorch": "torch.func",
                   "ghost": "ghost clipping (norms only, two backward passes)"}[mode]
            rest = (f"; per-example gradients by torch.func for layers without a per-layer sampler: "
                    f"{', '.join(by_torch_func)}" if by_torch_func and mode != "functorch" else "")
            log.info("DP-SGD: per-example clipping by %s (privacy.grad_sample_mode=%s)%s", how,
                     self.cfg.grad_sample_mode, rest)
        return wrapped

    @property
    def sensitivity(self) -> float:
        """How far one example can move a step's summed gradient: the clipping bound, or
        under group-wise clipping the root of the sum of the groups' bounds squared."""
        c = float(self.cfg.max_grad_norm)
        return c if self.head_bound is None else math.hypot(c, float(self.head_bound))

    @property
    def noise_scales(self) -> Optional[List[float]]:
        """Under privacy.head_noise_share, each group's noise std over noise_multiplier:
        [the rest, the heads] = [C / sqrt(1 - share), C_head / sqrt(share)]
        (_GroupClipping.add_noise says why that is as private as one scale)."""
        if self.head_share is None:
            return None
        return [float(self.cfg.max_grad_norm) / math.sqrt(1 - self.head_share),
                float(self.head_bound) / math.sqrt(self.head_share)]

    def _clip_groups(self, model):
        """(group index by parameter id, bounds, noise scales or None): 1 for the task
        heads, 0 for the rest."""
        from distft.backends.base import peel
        from distft.strategies.base import declared_heads

        heads = {id(p) for p in declared_heads(peel(model)) if p.requires_grad}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in heads]
        if not heads or not rest:
            raise ConfigError("privacy.head_max_grad_norm clips the task heads apart from the other trainable "
                              "weights, but this model has " + ("no trainable task head (a classification "
                              "task's task.head=pooled declares one)" if not heads else "nothing else training")
                              + "; drop privacy.head_max_grad_norm")
        return ({**{i: 1 for i in heads}, **{id(p): 0 for p in rest}},
                [float(self.cfg.max_grad_norm), float(self.head_bound)], self.noise_scales)

    def optimizer_factory(self, make):
        def build(model):
            self._calibrate(self.run.max_steps)
            groups = self._clip_groups(model) if self.head_bound is not None else None
            optimizer = _dp_optimizer(
                make(model), self.world > 1, self.mode == "ghost", groups=groups,
                noise_multiplier=self.noise_multiplier, max_grad_norm=self.sensitivity,
                expected_batch_size=self.expected_batch / self.world,
                loss_reduction="mean", generator=self.noise_generator, secure_mode=self.cfg.secure_mode)
            optimizer.attach_step_hook(self._account)
            return optimizer

        return build

    def _noise_words(self) -> str:
        if self.noise_scales is None:
            return f"noise scale {self.sensitivity:.4g} on both"
        rest, head = self.noise_scales
        return f"noise scale {rest:.4g} on the rest, {head:.4g} on the heads (head share {self.head_share:g})"

    def _calibrate(self, steps: int) -> None:
        p = self.cfg
        if self.noise_multiplier is None:
            from opacus.accountants.utils import get_noise_multiplier

            self.noise_multiplier = float(get_noise_multiplier(
                target_epsilon=p.target_epsilon, target_delta=p.delta, sample_rate=self.sample_rate, steps=steps,
                accountant=p.accountant))
        if p.target_epsilon is not None:
            self.allowed_steps = self._steps_within(p.target_epsilon, steps)
        if run_main(self.run):
            planned = self.epsilon_after(steps)
            clip = f"{p.max_grad_norm:g}" if self.head_bound is None else \
                f"{p.max_grad_norm:g} (heads apart at {self.head_bound:g}; {self._noise_words()})"
            log.info("DP-SGD: noise multiplier %.4f, per-example clip %s, sample rate %.5f (expected %d of %d "
                     "examples per step), %d steps: epsilon %.3f at delta %.2g (%s accountant)%s",
                     self.noise_multiplier, clip, self.sample_rate, self.expected_batch,
                     len(self.run.train_examples), steps, planned, p.delta, p.accountant,
                     "" if self.allowed_steps is None or self.allowed_steps >= steps
                     else f"; the budget epsilon {p.target_epsilon} allows only {self.allowed_steps} steps")
            if self.noise_multiplier == 0:
                log.warning("privacy.noise_multiplier=0: per-example clipping without noise gives no privacy "
                            "(epsilon is infinite)")

    def _account(self, optimizer) -> None:
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)

    # ------------------------------------------------------------------ epsilon
    def epsilon_after(self, steps: int) -> float:
        """The epsilon of `steps` noisy steps at this run's noise and sample rate."""
        from opacus.accountants import create_accountant

        accountant = create_accountant(self.cfg.accountant)
        accountant.history = [(self.noise_multiplier, self.sample_rate, steps)] if steps else []
        return self._epsilon_of(accountant)

    def _epsilon_of(self, accountant) -> float:
        if not accountant.history:
            return 0.0
        if self.noise_multiplier == 0:
            return math.inf
        return float(accountant.get_epsilon(delta=self.cfg.delta))

    def _steps_within(self, budget: float, planned: int) -> int:
        """The most steps (up to `planned`) whose epsilon stays within `budget`; epsilon
        grows with the steps, so a bisection finds it."""
        if self.epsilon_after(planned) <= budget:
            return planned
        lo, hi = 0, planned  # epsilon_after(lo) <= budget < epsilon_after(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.epsilon_after(mid) <= budget:
                lo = mid
            else:
                hi = mid
        return lo

    def epsilon(self) -> float:
        """The epsilon spent so far, from the accountant's history (asked once per number
        of noisy steps: the log, the summary and the model card of one step share it)."""
        steps = sum(h[2] for h in self.accountant.history)
        if self._spent is None or self._spent[0] != steps:
            self._spent = (steps, self._epsilon_of(self.accountant))
        return self._spent[1]

    # ------------------------------------------------------------------ the loop's hooks
    def backward(self, losses: torch.Tensor, optimizer, last: bool) -> None:
        if self.mode == "ghost":
            self._ghost_backward(losses, optimizer)
            return
        losses.sum().backward()
        if not last:
            # Clip this micro-batch's per-example gradients into the step's sum now and free
            # them; the last one is clipped in the optimizer's step, then noise is added once.
            _fill_missing_grad_samples(optimizer.params)
            optimizer.clip_and_accumulate()
            for p in optimizer.params:
                p.grad_sample = None

    def _ghost_backward(self, losses: torch.Tensor, optimizer) -> None:
        # Opacus' DPTensorFastGradientClipping.backward does these two passes for one batch
        # and zeroes the accumulated gradient in between, so with several micro-batches a
        # step the passes are made here and each micro-batch's clipped sum is accumulated.
        params = optimizer.params
        losses.sum().backward(retain_graph=True)  # the hooks compute per-example norms
        for p in params:
            p.grad = None  # the unclipped gradient of the first pass
            if getattr(p, "_norm_sample", None) is None:  # a tensor this micro-batch did not reach
                p._norm_sample = torch.zeros(len(losses), device=p.device)
        coef = self.gsm.get_clipping_coef().to(losses.device).detach()
        for p in params:
            p._norm_sample = None
        self.gsm.disable_hooks()
        try:
            (coef * losses).sum().backward()  # each example's gradient scaled to its clip
        finally:
            self.gsm.enable_hooks()
        for p in params:  # unreached (e.g. BERT's pooler under a mean-pooled head): a zero sum, as with hooks
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        optimizer.accumulate()  # into p.summed_grad; the step adds the noise once
        for p in params:
            p.grad = None

    def stop_reason(self) -> Optional[str]:
        if self.allowed_steps is None or self.run.step < self.allowed_steps:
            return None
        return (f"privacy budget: epsilon is {self.epsilon():.3f} after {self.run.step} steps and another step would "
                f"exceed privacy.target_epsilon={self.cfg.target_epsilon} (delta {self.cfg.delta:g})")

    def metrics(self) -> Dict[str, float]:
        return {"privacy/epsilon": self.epsilon(), "privacy/delta": float(self.cfg.delta),
                "privacy/noise_multiplier": float(self.noise_multiplier), "privacy/sample_rate": self.sample_rate,
                "privacy/max_grad_norm": float(self.cfg.max_grad_norm),
                **({"privacy/head_max_grad_norm": float(self.head_bound)} if self.head_bound is not None else {}),
                **({"privacy/head_noise_share": float(self.head_share)} if self.head_share is not None else {}),
                "privacy/noisy_steps": float(sum(h[2] for h in self.accountant.history))}

    def card(self) -> Optional[str]:
        m = self.metrics()
        return "\n".join([
            "## Differential privacy",
            "",
            f"Trained with DP-SGD (Opacus, distft `privacy=dp`): (epsilon = {m['privacy/epsilon']:.3f}, "
            f"delta = {self.cfg.delta:g})-differentially private with respect to one training example, "
            f"by the {self.cfg.accountant} accountant.",
            "",
            f"- noise multiplier: {self.noise_multiplier:.4f}",
            f"- per-example clipping norm: {self.cfg.max_grad_norm:g}" + (
                "" if self.head_bound is None else
                f" (the task head's gradient clipped apart to {self.head_bound:g}; {self._noise_words()})"),
            f"- Poisson sample rate: {self.sample_rate:.6f} (expected {self.expected_batch} examples per step)",
            f"- noisy steps: {int(m['privacy/noisy_steps'])}",
            "",
        ])

    # ------------------------------------------------------------------ checkpoint
    def _settings(self) -> Dict:
        return {"noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate,
                "max_grad_norm": float(self.cfg.max_grad_norm), "head_max_grad_norm": self.head_bound,
                "head_noise_share": self.head_share, "delta": float(self.cfg.delta),
                "accountant": self.cfg.accountant, "expected_batch": self.expected_batch}

    def state_dict(self) -> Dict:
        return {"settings": self._settings(), "history": [list(h) for h in self.accountant.history],
                "noise_generator": generator_state(self.noise_generator)}

    def load_state_dict(self, state: Dict) -> None:
        if not state or "settings" not in state:
            raise ConfigError("the checkpoint was written without privacy=dp: resuming it privately would leave "
                              "its earlier steps unaccounted; start a new run")
        saved, now = state["settings"], self._settings()
        changed = {k: (saved.get(k), v) for k, v in now.items()
                   if (saved.get(k) != v if not isinstance(v, float) else not math.isclose(saved.get(k) or 0.0, v,
                                                                                               rel_tol=1e-9))}
        if changed:
            raise ConfigError("resuming with other DP settings than the checkpoint's would break its accounting: "
                              + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()))
        self.accountant.history = [tuple(h) for h in state["history"]]
        set_generator_state(self.noise_generator, state["noise_generator"])


def run_main(run) -> bool:
    return run is None or run.main


__all__ = ["DifferentialPrivacy"]
