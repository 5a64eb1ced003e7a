"""Structured configs: the schema every Hydra composition is checked against.

Each config group has a dataclass registered in Hydra's ConfigStore; the YAML files in
conf/ extend them, so a misspelled key or a value of the wrong type fails when the config
is composed, before any data is read or any model is built.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf


@dataclass
class ModelConfig:
    name: str = MISSING
    # A local folder or hub id (hf); filled in from the installed package for minilm/smollm2.
    path: Optional[str] = None
    gguf_file: Optional[str] = None
    # LlamaConfig keyword arguments for a model built from scratch (tiny_llama).
    from_config: Optional[Dict[str, Any]] = None
    tokenizer: Optional[str] = None  # "bytes" for the built-in byte tokenizer, else a path/id
    dtype: str = "float32"  # weights dtype: float32 | bfloat16 | float16
    attn_implementation: str = "auto"  # auto | sdpa | eager | flash_attention_2
    dropout: Optional[float] = None  # overrides every *dropout* probability of the config
    trust_remote_code: bool = False
    # Under backends that shard parameters (fsdp, zero3): build the model with its weights
    # mapped from safetensors, so each process reads only its shard (distft.models.lazy).
    # auto | on (also a small model built from a config) | off (load whole everywhere)
    sharded_loading: str = "auto"


@dataclass
class DataConfig:
    name: str = MISSING  # synthetic | files | hub
    # files: a path (JSONL, CSV, TSV, Parquet, or a folder saved with datasets' save_to_disk);
    # hub: a dataset id on the Hugging Face hub.
    train: Optional[str] = None
    validation: Optional[str] = None
    format: str = "auto"  # auto (from the file name) | jsonl | csv | tsv | parquet | disk
    hub_config: Optional[str] = None  # hub: the dataset's configuration name
    train_split: str = "train"  # hub / disk: the split to train on
    # hub / disk: the split to validate on; null for hub holds out data.validation_split instead
    validation_split_name: Optional[str] = "validation"
    # Field mapping: which column holds what.
    text_field: str = "text"
    label_field: str = "label"
    instruction_field: str = "instruction"
    input_field: str = "input"
    output_field: str = "output"
    messages_field: str = "messages"  # chat: a list of {role, content}
    tokens_field: str = "tokens"  # token_classification: the words, a list of strings
    tags_field: str = "tags"  # token_classification: one BIO tag (a string) per word
    max_length: int = 128  # tokens per example
    too_long: str = "truncate"  # truncate | drop examples longer than max_length
    min_tokens: int = 0  # drop examples with fewer tokens
    dedup: bool = False  # drop exact duplicates (same mapped fields), keeping the first
    drop_empty: bool = False  # drop examples with an empty text field instead of stopping
    # causal_lm / instruction: pack training examples into rows of max_length tokens
    # (no attention across examples; trainer.batch_size then counts rows)
    packing: bool = False
    # Held-out share of train used for validation when no validation file is given.
    validation_split: float = 0.1
    max_train_examples: Optional[int] = None
    # Keep a seeded random share of the (first max_train_examples) training examples: a
    # count or a fraction (regularizer=replay's rehearsal buffer uses them).
    sample_train_examples: Optional[int] = None
    sample_train_fraction: Optional[float] = None
    max_validation_examples: Optional[int] = None
    # Tokenised examples are cached here, keyed by a hash of data + tokenizer + settings;
    # null turns the cache off.
    cache_dir: Optional[str] = "${oc.env:DISTFT_DATA_CACHE,${oc.env:HOME,.}/.cache/distft/data}"
    # synthetic data only
    num_train: int = 2000
    num_validation: int = 200
    # mixture only: NAME -> {data: {...}, task: {...}, weight: w}, each merged over the
    # settings above / the top-level task; and how the tasks are sampled.
    tasks: Dict[str, Any] = field(default_factory=dict)
    sampler: str = "proportional"  # proportional | temperature | uniform | weights
    temperature: float = 2.0  # sampler=temperature: p ~ size^(1/T)


@dataclass
class TaskConfig:
    name: str = MISSING
    num_labels: Optional[int] = None  # classification: inferred from the training labels if unset
    mask_prompt: bool = True  # instruction: loss only on the response tokens
    template: str = "alpaca"  # instruction: alpaca (instruction/input/output) | chat (messages)
    # classification: `model` is the model's own sequence-classification head (BERT's reads
    # the [CLS] token through its pooler); `pooled` pools the last hidden states
    # (task.pooling) into a new head of task.head_hidden layers, as sentence encoders are
    # trained to be read (MiniLM's embeddings are mean-pooled). Mixtures always pool.
    head: str = "model"  # model | pooled
    head_hidden: List[int] = field(default_factory=list)  # pooled: hidden widths ([] = linear)
    pooling: str = "mean"  # mean | first | last
    # pooled: scale each pooled vector to unit length before the head (sentence-transformers'
    # Normalize; all-MiniLM's embeddings are read so). It also bounds the new head's
    # per-example gradient, which DP-SGD clips.
    normalize: bool = False
    # pooled, linear head: start the head from the embeddings of one text per class (in
    # label order, e.g. ["This is a negative review.", "This is a positive review."]),
    # pooled as the head reads them: a zero-shot classifier before the first step, learned
    # from no training example (so it costs DP nothing). Logits are label_text_scale times
    # the features' dot product with each class's centred embedding.
    label_texts: Optional[List[str]] = None
    label_text_scale: float = 20.0
    # pooled: false keeps the head as built (e.g. from label_texts) and trains only what the
    # strategy trains in the backbone.
    train_head: bool = True
    head_dropout: float = 0.1
    # token_classification: the tag set, as a list or a file of one tag per line (null: O,
    # then the tags of the training data sorted); label order = the head's output order.
    labels: Optional[Any] = None
    subtoken_labels: str = "first"  # first: only a word's first sub-token is labelled | all (B- continued as I-)
    repair_iob: bool = False  # read an I-X that follows neither B-X nor I-X as B-X instead of refusing it
    metric: str = "loss"  # the eval metric that early stopping and best-checkpoint use
    greater_is_better: bool = False


@dataclass
class StrategyConfig:
    name: str = MISSING


@dataclass
class FullStrategyConfig(StrategyConfig):
    name: str = "full"


@dataclass
class BitFitStrategyConfig(StrategyConfig):
    name: str = "bitfit"


@dataclass
class LoraStrategyConfig(StrategyConfig):
    name: str = "lora"
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    # null: peft's default modules for the architecture; ["all-linear"] for every linear.
    target_modules: Optional[List[str]] = None
    merge_on_export: bool = False  # also write final/merged, a plain HF model
    # false: A stays at its random init and only B trains (LoRA-FA; FFA-LoRA under DP: half
    # the coordinates take noise, and no product of two noisy factors).
    train_a: bool = True


@dataclass
class PartialStrategyConfig(StrategyConfig):
    name: str = "partial"
    unfreeze_top_layers: int = 0  # 0 = the whole pretrained network stays frozen
    # auto: mlp for classification, block otherwise
    # mlp: pooled features -> MLP -> labels (classification only)
    # block: one new transformer block on top of the network, plus the task's own head
    head: str = "auto"
    head_hidden: List[int] = field(default_factory=lambda: [256])
    head_dropout: float = 0.1
    pooling: str = "mean"  # mean | first | last (mlp head)


@dataclass
class ClassifierConfig:
    """strategy=feature's scikit-learn classifier (distft/features.py)."""

    name: str = "logistic"  # logistic | svm (linear) | mlp
    # Any scikit-learn classifier class instead (e.g. sklearn.ensemble.RandomForestClassifier),
    # built with `params`; saved with skops, as it cannot be a model head.
    _target_: Optional[str] = None
    # A list is searched by stratified cross-validation (cv folds, `scoring`), a number is used as is.
    C: Any = field(default_factory=lambda: [0.01, 0.1, 1.0, 10.0])  # logistic / svm: inverse L2 strength
    alpha: Any = 1e-4  # mlp: L2 strength
    hidden: List[int] = field(default_factory=lambda: [256])  # mlp: hidden widths
    activation: str = "relu"  # mlp: relu | tanh | logistic | identity
    early_stopping: bool = True  # mlp: hold out 10% and stop when it stops improving
    standardize: bool = True  # scale features to zero mean and unit variance first (folded into an exported head)
    class_weight: Optional[str] = None  # null | balanced
    max_iter: int = 2000
    cv: int = 5
    scoring: Optional[str] = None  # null: accuracy (sequence tasks), f1_macro (token tasks)
    n_jobs: Optional[int] = None  # cross-validation folds in parallel (null: 1, -1: every core)
    params: Dict[str, Any] = field(default_factory=dict)  # further keyword arguments of the classifier


@dataclass
class FeatureStrategyConfig(StrategyConfig):
    name: str = "feature"
    pooling: str = "mean"  # mean | first | last (sequence tasks; token tasks read each word's first sub-token)
    layer: int = -1  # which hidden_states entry (0 = embeddings, -1 = last layer)
    last_k: int = 1  # > 1: the mean of the last k layers instead
    batch_size: int = 64  # examples per forward pass while embedding
    # Embeddings are cached here (safetensors), keyed by model, data, pooling, layers and max
    # length; null turns the cache off.
    cache_dir: Optional[str] = "${oc.env:DISTFT_FEATURE_CACHE,${oc.env:HOME,.}/.cache/distft/features}"
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)


@dataclass
class RegularizerConfig:
    name: str = "none"  # none | l2sp | ewc | replay (distft/regularizers/)


@dataclass
class L2SPRegularizerConfig(RegularizerConfig):
    name: str = "l2sp"
    strength: float = 0.1  # strength/2 * ||theta - theta_start||^2 over trainable non-head tensors


@dataclass
class EWCRegularizerConfig(RegularizerConfig):
    name: str = "ewc"
    strength: float = 5000.0  # strength/2 * sum F (theta - theta*)^2
    fisher_examples: Optional[int] = 1000  # training examples the Fisher is estimated on (null: all)
    decay: float = 1.0  # online EWC: F <- decay * F_earlier + F_this_stage


@dataclass
class ReplayRegularizerConfig(RegularizerConfig):
    name: str = "replay"
    # Examples kept of each earlier stage's training data and mixed into later stages:
    # a count, or a fraction of that stage's training set; chosen from the seed.
    size: Optional[int] = 1000
    fraction: Optional[float] = None


@dataclass
class PrivacyConfig:
    name: str = "none"  # none | dp (distft/privacy/)


@dataclass
class DPPrivacyConfig(PrivacyConfig):
    """DP-SGD with Opacus (conf/privacy/dp.yaml explains each key)."""

    name: str = "dp"
    target_epsilon: Optional[float] = 8.0
    delta: float = 1e-5
    noise_multiplier: Optional[float] = None
    max_grad_norm: float = 1.0
    head_max_grad_norm: Optional[float] = None
    head_noise_share: Optional[float] = None
    accountant: str = "prv"
    logical_batch_size: Optional[int] = None
    grad_sample_mode: str = "auto"
    secure_mode: bool = False


@dataclass
class BackendConfig:
    name: str = "single"
    timeout_minutes: int = 30  # collective timeout (process group)
    # DeepSpeed ZeRO (backend=zero1|zero2|zero3)
    stage: int = 0
    offload_optimizer: bool = False
    offload_param: bool = False  # stage 3 only
    config_file: Optional[str] = None  # a DeepSpeed JSON; batch/accumulation/clipping come from distft


@dataclass
class WandbConfig:
    enabled: bool = False  # conf/logger/wandb.yaml turns it on
    mode: str = "offline"  # offline | online | disabled
    project: str = "distft"
    entity: Optional[str] = None
    name: Optional[str] = None
    tags: List[str] = field(default_factory=list)


@dataclass
class LoggerConfig:
    # The chosen logger (or the last of several: logger=[wandb,tensorboard]); each
    # conf/logger/*.yaml only turns its own output on, so choices combine.
    name: str = "wandb"
    log_every: int = 1
    csv: bool = False
    tensorboard: bool = False  # event files in run_dir/tensorboard (pip install tensorboard)
    progress_bar: bool = True
    plots: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class EarlyStoppingConfig:
    patience: int = 0  # evals without improvement before stopping; 0 = off
    min_delta: float = 0.0


@dataclass
class TrainerConfig:
    max_steps: int = -1  # optimizer steps; -1 = derive from epochs
    epochs: float = 1.0
    lr: float = 5e-4
    # The task heads' learning rate (a new classification head, a pooled head, a mixture's
    # heads); null: trainer.lr. The schedule scales it as it scales trainer.lr.
    head_lr: Optional[float] = None
    batch_size: int = 16  # examples per micro-batch
    grad_accum: int = 1
    # Examples per eval forward; null: trainer.batch_size, so an eval never holds more
    # activations than a training micro-batch (at 64, SmolLM2 LoRA with activation
    # checkpointing peaked 290 MiB higher in its eval than in training).
    eval_batch_size: Optional[int] = None
    weight_decay: float = 0.01
    adam_betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    warmup_ratio: float = 0.0
    warmup_steps: int = 0  # used when > 0, else warmup_ratio * total steps
    max_grad_norm: float = 1.0  # <= 0 disables clipping
    eval_every: int = 0  # 0 = only at the end
    eval_before_training: bool = False  # also evaluate the starting weights (logged as step 0)
    save_every: int = 0  # 0 = only at the end
    keep_checkpoints: int = 2
    # auto: bf16 autocast where the hardware has native bf16 matmuls (a bf16 GPU; a CPU
    # with AVX512-BF16/AMX), else fp32 (distft/precision.py); fp32 | bf16 | fp16 (GPU only)
    precision: str = "auto"
    # With precision bf16 and a strategy that freezes weights (lora, bitfit, partial): keep
    # the frozen weights in bf16 (trainable ones and the optimizer state stay fp32), so
    # autocast stops casting them at every matmul. single/ddp backends.
    frozen_in_bf16: bool = True
    # With frozen_in_bf16 and lean activations: the frozen embeddings and norms in bf16 too,
    # so the residual stream between layers is bf16 (as in a model loaded in bf16) and the
    # norms are lean ones that keep bf16 inputs; false keeps an fp32 stream, cast to bf16
    # by every matmul that reads it.
    bf16_stream: bool = True
    activation_checkpointing: bool = False  # recompute block activations in backward (any backend)
    # Keep fewer tensors from forward for backward, same forward values (distft/models/lean.py):
    # LoRA's dropout fused into lora_A, SwiGLU keeping gate and up only, grouped-query
    # attention without repeated key/value heads on CPU. Not under privacy=dp.
    lean_activations: bool = True
    # How the fused LoRA dropout draws its masks: fast (16 random bits an element, a quarter
    # of bernoulli_'s draws; rate round(65536 p) / 65536) | torch (bernoulli_, the
    # random stream of nn.Dropout: the same values as lean_activations=false)
    lean_dropout_rng: str = "fast"
    # Attention in bf16 training on CPU: matmul (two bf16 matmuls and a softmax, the
    # probabilities kept for backward; about twice the flash kernel's speed forward and
    # backward, heads x keys x 2 bytes more a token and layer; up to 512 keys, else flash;
    # distft/models/matmul_attention.py) | flash (SDPA's CPU flash kernel throughout)
    cpu_attention: str = "matmul"
    # The lean norms' and SwiGLUs' element-wise work in bf16 training on CPU: compiled (each
    # forward and backward one loop compiled by torch.compile's inductor, a few seconds at
    # the first step; eager where compiling fails) | eager (a pass over memory per op)
    cpu_elementwise: str = "compiled"
    # torch.compile each transformer block in place (regional compilation: one compiled
    # block reused by all, parameter names unchanged); the first steps pay the compile time.
    compile: bool = False
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    export_best: bool = True  # export the weights of the best eval, when there was an eval
    threads: Optional[int] = None  # torch intra-op threads on CPU
    # glibc's malloc: give every freed block over 128 KiB back to the OS (its threshold
    # fixed with mallopt) so the resident set follows the live tensors, and on CPU the pages
    # of smaller freed blocks after each optimizer step (malloc_trim); off: glibc's defaults
    release_freed_memory: bool = True
    # Language-model loss over chunks of this many target tokens, without the full logits
    # tensor (distft/chunked_loss.py); 0 computes all logits at once. 256 rows of a 49k
    # vocabulary are 48 MiB of fp32 logits: SmolLM2 LoRA + checkpointing peaks 0.78 GiB
    # lower than with 1024 at about the same tokens/s (bench/vs_hf_trainer.py).
    loss_chunk_size: int = 256
    # Signals that stop the run after the current step with a checkpoint (SLURM's warning
    # signal, the scheduler's or launcher's SIGTERM); resume=auto continues from it.
    stop_signals: List[str] = field(default_factory=lambda: ["SIGUSR1", "SIGTERM"])
    # A step whose loss or gradient norm is not finite is skipped (weights and optimizer
    # state untouched, counted as bad_steps in the metrics); this many in a row stop the run.
    max_bad_steps: int = 5


@dataclass
class ExperimentConfig:
    name: str = "single"  # single | sequential
    # sequential: one entry per stage, each {name, data: {...}, task: {...}, overrides: [k=v, ...]}
    stages: List[Any] = field(default_factory=list)


@dataclass
class SweepConfig:
    """A hyperparameter search (distft-sweep, distft/sweep.py); distft-train ignores it.
    conf/sweep/*.yaml hold ready-made ones."""

    name: Optional[str] = None  # the study's name; the folder's when unset
    dir: Optional[str] = None  # the study, trials.csv, best.yaml, the trials' run folders; default sweeps/<name>
    # nested like the config: trainer: {lr: {type: float|int|categorical, low, high, log, step, choices, values}}
    space: Dict[str, Any] = field(default_factory=dict)
    sampler: str = "tpe"  # tpe | gp | random | grid
    n_trials: Optional[int] = None  # trials of the whole study (all workers); grid: every point, this is ignored
    # tpe / gp: random trials before the model-based ones; tpe default min(10, max(2, n_trials // 3)), gp 10
    startup_trials: Optional[int] = None
    pruner: str = "none"  # none | median | percentile | successive_halving | hyperband | threshold
    pruner_startup_trials: int = 4  # median, percentile: trials that finish before any is pruned
    # percentile: a trial goes on while its best eval so far is in the top this-many percent of
    # the other trials' evals at the same step (50: the median pruner; 70 prunes only the bottom 30%)
    pruner_percentile: float = 50.0
    pruner_warmup_evals: int = 1  # a trial can be pruned from its n-th eval on (never at its last step)
    # successive_halving (asynchronous, ASHA; Optuna's SuccessiveHalvingPruner): rungs at
    # min_resource * reduction_factor^(k + min_early_stopping_rate) steps; at each a trial goes
    # on only while in the top 1/reduction_factor of the trials that reached it.
    # min_resource null: trainer.eval_every (the first eval). hyperband keeps Optuna's defaults.
    pruner_min_resource: Optional[int] = None
    pruner_reduction_factor: int = 3
    pruner_min_early_stopping_rate: int = 0
    # threshold (Optuna's ThresholdPruner): a trial stops at its first eval worse than this
    # value, whatever the other trials did: above it for the loss (prune_on=loss) or a
    # minimised objective, below it for a maximised one. E.g. 0.68 with prune_on=loss stops
    # the binary classifiers still at chance (ln 2 = 0.693); pruner_warmup_evals says when.
    pruner_threshold: Optional[float] = None
    # What each eval reports to the pruner: objective (task.metric, what the trial is ranked
    # by) | loss (the eval loss, negated when the study maximises: early in training a loss
    # tells trials apart while an accuracy can sit at chance for all of them).
    prune_on: str = "objective"
    seed: int = 0  # the sampler's (worker i uses seed + i); trials keep the run's own seed
    workers: int = 1  # worker processes this command starts on this machine
    worker: Optional[int] = None  # this worker's index; SLURM_ARRAY_TASK_ID when unset
    nproc: int = 1  # processes per trial (torchrun --nproc_per_node; backend=ddp or another)
    # A running trial whose worker is gone (dead process on this host, or no heartbeat for
    # this long from another host) is marked failed and retried from its last checkpoint.
    stale_after_s: float = 60.0
    max_failures: int = 3  # trials failing on their own (not killed) before the sweep stops


@dataclass
class TrainConfig:
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    task: TaskConfig = MISSING
    strategy: Any = MISSING
    # The optimizer class and its arguments (conf/optimizer/), built with
    # hydra.utils.instantiate(optimizer, param_groups) through the backend.
    optimizer: Any = MISSING
    # The learning-rate schedule (conf/scheduler/), built with
    # hydra.utils.instantiate(scheduler, optimizer, total_steps=N).
    scheduler: Any = MISSING
    regularizer: Any = MISSING
    privacy: Any = MISSING
    backend: BackendConfig = MISSING
    logger: LoggerConfig = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    run_dir: str = MISSING
    seed: int = 42
    resume: str = "auto"  # auto | never | a checkpoint folder
    # Start from the weights of an earlier run: a folder holding weights.safetensors (one of
    # its checkpoints, or best/). New parameters (e.g. a new task head) keep their init.
    init_from: Optional[str] = None
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    # Python modules imported before the run is built: their @register decorators add
    # strategies, samplers, regularizers, ... without a change to distft.
    plugins: List[str] = field(default_factory=list)
    # Artifacts an earlier stage handed to this run (name -> path), e.g. a Fisher estimate
    # for EWC; sequential recipes fill it, a regularizer reads it in setup.
    inputs: Dict[str, Any] = field(default_factory=dict)
    sweep: SweepConfig = field(default_factory=SweepConfig)


STRATEGY_SCHEMAS = {
    "full": FullStrategyConfig,
    "partial": PartialStrategyConfig,
    "lora": LoraStrategyConfig,
    "bitfit": BitFitStrategyConfig,
    "feature": FeatureStrategyConfig,
}
# Per-choice schemas of the axes whose node differs by choice; a choice a plugin registers
# without a schema here is checked by its own `check`.
REGULARIZER_SCHEMAS = {"none": RegularizerConfig, "l2sp": L2SPRegularizerConfig, "ewc": EWCRegularizerConfig,
                       "replay": ReplayRegularizerConfig}
PRIVACY_SCHEMAS = {"none": PrivacyConfig, "dp": DPPrivacyConfig}
_PER_CHOICE = {"strategy": STRATEGY_SCHEMAS, "regularizer": REGULARIZER_SCHEMAS, "privacy": PRIVACY_SCHEMAS}


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="data", name="data_schema", node=DataConfig)
    cs.store(group="task", name="task_schema", node=TaskConfig)
    cs.store(group="backend", name="backend_schema", node=BackendConfig)
    cs.store(group="logger", name="logger_schema", node=LoggerConfig)
    cs.store(group="experiment", name="experiment_schema", node=ExperimentConfig)
    for group, schemas in _PER_CHOICE.items():
        for name, node in schemas.items():
            cs.store(group=group, name=f"{name}_schema", node=node)


register_configs()

# ${bundled:NAME/FILE}: a file of the data shipped inside the package (distft/bundled/), so
# a config names it wherever the command runs.
BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
if not OmegaConf.has_resolver("bundled"):
    OmegaConf.register_new_resolver("bundled", lambda rel: str(BUNDLED_DIR / rel))


def validate_schema(cfg) -> None:
    """Re-check a composed config against the schema. Hydra lets `+key=value` add keys
    that the schema does not know; a misspelled key must not be silently ignored."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from distft.errors import ConfigError

    data = OmegaConf.to_container(cfg, resolve=False)
    data.pop("hydra", None)
    nodes = {group: data.pop(group, {}) or {} for group in _PER_CHOICE}
    data.pop("optimizer", None)  # any class's keyword arguments: checked when it is built
    data.pop("scheduler", None)
    try:
        OmegaConf.merge(OmegaConf.structured(TrainConfig), data)
        for group, node in nodes.items():
            schema = _PER_CHOICE[group].get(node.get("name"))
            if schema is not None:
                try:
                    OmegaConf.merge(OmegaConf.structured(schema), node)
                except OmegaConfBaseException as e:
                    e.full_key = f"{group}.{getattr(e, 'full_key', '') or '?'}"
                    raise
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or ""
        raise ConfigError(f"config key {key or '?'}: {str(e).splitlines()[0]}") from None


def compose_train(overrides):
    """conf/train.yaml composed with Hydra overrides outside a Hydra app (distft-eval and
    distft-plan), resolved and checked against the schema."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from distft.paths import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    validate_schema(cfg)
    return cfg
