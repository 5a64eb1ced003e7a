"""Sharded loading: build the model with its weights left on disk, so that a backend that
shards parameters (fsdp, zero3) copies only each process's shard into memory.

Loading whole on every process and then sharding costs every process a full copy at the
start, and the allocator keeps those pages for the rest of the run: with 8 processes on a
node, 8 copies of the model in host memory before the first step. Here the model is built
with its parameters on the meta device (accelerate's `init_empty_weights`; buffers stay
real), then each parameter becomes a zero-copy view of its tensor in a safetensors file
(`safe_open(...).get_tensor` maps the file; pages are read only when touched, and writes
are private copy-on-write). When the backend shards a parameter it copies this process's
slice and drops the view, so only the slices are ever read into this process.

Where the weights come from:
- a local transformers folder with safetensors files: directly. Parameters the checkpoint
  lacks (a new task head) are initialised by transformers' own `_initialize_missing_keys`,
  exactly as `from_pretrained` does, so the values and the random state afterwards are
  the ones a whole load gives (tested);
- anything else (a model built from a config, a GGUF file, a hub id): a child process
  builds it exactly as a whole load would (`load_model`, same seed), writes it as
  safetensors with the random state after the build, and exits, taking its memory with
  it; each process then maps that file. Small models built from a config skip the child
  (`model.sharded_loading=auto`): below 256 MB of weights a full copy costs less than a
  child process's start.
Either way a sharded run starts from the same weights and random state as one process.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import torch

from distft.errors import ConfigError

log = logging.getLogger(__name__)

CHILD_BUILD_MIN_BYTES = 256 * 2**20
_RNG = "rng_state.pt"
_SPEC = "spec.json"
# What the child can build: the heads load_model knows.
BUILT_IN_CHILD = ("next_tokens", "label", "token_labels")


@dataclass
class WeightsSource:
    """Where a lazily built model takes its weights from."""
    folder: str
    # The random state a whole load leaves behind (the child's); None when the load here
    # draws its own (missing keys initialised in this process).
    rng_state: Optional[torch.Tensor] = None
    temporary: bool = False  # written for this run (the child's output): removed once mapped


def safetensors_files(folder: str) -> list:
    root = Path(folder)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        return sorted({str(root / f) for f in json.loads(index.read_text())["weight_map"].values()})
    return sorted(str(p) for p in root.glob("*.safetensors"))


def plan_source(model_cfg, param_bytes: Optional[int]) -> str:
    """How a sharded run loads this model: `file` (map a local folder's safetensors),
    `child` (a child process builds it and writes safetensors) or `whole` (as without
    sharding). `param_bytes` is the model's weight size, when known before loading."""
    from distft.models.loading import check_model_source, resolve_model_path

    mode = str(model_cfg.get("sharded_loading", "auto"))
    if mode not in ("auto", "on", "off"):
        raise ConfigError(f"model.sharded_loading={mode!r}: choose auto, on or off")
    if mode == "off":
        return "whole"
    path = resolve_model_path(model_cfg)
    if model_cfg.from_config is None and not model_cfg.gguf_file and path and check_model_source(path) \
            and safetensors_files(path):
        return "file"
    if model_cfg.from_config is not None and mode == "auto" and (param_bytes or 0) < CHILD_BUILD_MIN_BYTES:
        return "whole"
    return "child"


def build_in_child(folder: Path, model_cfg, predicts: str, num_labels, seed: int, label_names) -> WeightsSource:
    """Run `load_model` in a child process and write its model to `folder` as safetensors,
    with the random state it leaves. The caller runs it on one process and shares the
    folder (the same filesystem as the run directory)."""
    from omegaconf import OmegaConf

    folder.mkdir(parents=True, exist_ok=True)
    spec = {"model": OmegaConf.to_container(model_cfg, resolve=True), "predicts": predicts,
            "num_labels": num_labels, "seed": seed, "label_names": label_names}
    (folder / _SPEC).write_text(json.dumps(spec))
    env = {**os.environ}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # the child is a plain single process, not a member of the job
    proc = subprocess.run([sys.executable, "-m", "distft.models.lazy", str(folder)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"sharded loading: building the model in a child process failed:\n{tail}")
    return source_in(folder, temporary=True)


def source_in(folder: Path, temporary: bool = False) -> WeightsSource:
    rng = torch.load(folder / _RNG) if (folder / _RNG).is_file() else None
    return WeightsSource(str(folder), rng, temporary)


def _child_main(folder: str) -> int:
    from omegaconf import OmegaConf

    from distft.models.loading import load_model, load_tokenizer, resolve_model_path

    out = Path(folder)
    spec = json.loads((out / _SPEC).read_text())
    cfg = OmegaConf.create(spec["model"])
    tokenizer = load_tokenizer(cfg, resolve_model_path(cfg))
    model = load_model(cfg, spec["predicts"], tokenizer, spec["num_labels"], seed=spec["seed"],
                       label_names=spec["label_names"])
    rng = torch.get_rng_state()
    model.save_pretrained(out, safe_serialization=True)
    torch.save(rng, out / _RNG)
    return 0


def _key_map(model_keys, file_keys, prefix: str) -> Dict[str, str]:
    """Model state key -> checkpoint key, allowing for the base-model prefix on either
    side (a base model's checkpoint loaded under a task head, or the reverse), as
    transformers' loader does."""
    mapping = {}
    for key in model_keys:
        if key in file_keys:
            mapping[key] = key
        elif prefix and key.startswith(prefix + ".") and key[len(prefix) + 1:] in file_keys:
            mapping[key] = key[len(prefix) + 1:]
        elif prefix and f"{prefix}.{key}" in file_keys:
            mapping[key] = f"{prefix}.{key}"
    return mapping


def build_lazily(auto_cls, config, dtype: torch.dtype, attn: str, source: WeightsSource):
    """The model of `auto_cls` for `config`, its parameters views of `source`'s files."""
    from accelerate import init_empty_weights
    from safetensors import safe_open

    cls = auto_cls._model_mapping[type(config)] if hasattr(auto_cls, "_model_mapping") else auto_cls
    with init_empty_weights(include_buffers=False):
        model = cls._from_config(config, dtype=dtype, attn_implementation=attn)
    tensors = {}
    for path in safetensors_files(source.folder):
        handle = safe_open(path, framework="pt")  # maps the file; the views keep it mapped
        for key in handle.keys():
            tensors[key] = handle.get_tensor(key)
    expected = model.state_dict()  # meta tensors (and the real buffers)
    mapping = _key_map(expected, tensors, getattr(model, "base_model_prefix", ""))
    state, converted = {}, 0
    for key, file_key in mapping.items():
        value = tensors[file_key]
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ConfigError(f"{source.folder}: {file_key} has shape {tuple(value.shape)}, the model expects "
                              f"{tuple(expected[key].shape)}")
        if value.dtype != expected[key].dtype and value.is_floating_point():
            value, converted = value.to(expected[key].dtype), converted + 1  # a copy: no view to keep
        state[key] = value
    model.load_state_dict(state, strict=False, assign=True)
    if converted:
        log.info("sharded loading: %d tensors converted to %s on load (read whole)", converted, dtype)
    params = dict(model.named_parameters(remove_duplicate=False))
    for key in state:
        if key in params:  # what from_pretrained marks, so transformers' init leaves it alone
            params[key]._is_hf_initialized = True
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        if source.rng_state is not None:
            raise ConfigError(f"{source.folder}: the written model lacks {missing[:3]}")
        # A new head: materialise it and let transformers initialise what the checkpoint
        # lacks, as from_pretrained does (the same draws from the same random state).
        owners = {n.rpartition(".")[0] for n in missing}
        for owner in owners:
            module = model.get_submodule(owner) if owner else model
            module.to_empty(device="cpu", recurse=False)
        for module in model.modules():  # built, not loaded: post_init marked every module done
            module.__dict__.pop("_is_hf_initialized", None)
        model._initialize_missing_keys(is_quantized=False)
        log.info("sharded loading: initialised %d parameters the checkpoint lacks (%s)", len(missing),
                 ", ".join(missing[:4]))
    if source.rng_state is not None:
        torch.set_rng_state(source.rng_state)
    return model


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1]))
