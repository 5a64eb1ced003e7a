"""Sharded loading (distft.models.lazy): the model built with its weights mapped from
safetensors gives exactly the weights and random state of a whole load, reads almost
nothing into anonymous memory, and a 2-process fsdp / zero3 run started that way has the
losses of one process."""
import gc

import pytest
import torch
from omegaconf import OmegaConf

from conftest import ROOT, TINY, losses, read_metrics, run_torchrun

from distft.config import ModelConfig
from distft.errors import ConfigError
from distft.models import lazy
from distft.models.loading import load_model, load_tokenizer, parameter_bytes_on_meta, resolve_model_path

# conf/model/tiny_llama.yaml with the TINY overrides.
_YAML = OmegaConf.load(ROOT / "conf" / "model" / "tiny_llama.yaml")
TINY_MODEL = {"name": "tiny_llama", "tokenizer": "bytes",
              "from_config": {**_YAML.from_config,
                              **{k.split(".")[-1]: int(v) for k, v in (o.split("=") for o in TINY)
                                 if k.startswith("model.from_config.")}}}


def model_cfg(**kw):
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), kw)


def rss_anon_mb():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no RssAnon in /proc/self/status")


def assert_same_load(whole, mapped):
    a, b = whole.state_dict(), mapped.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert whole.training == mapped.training


@pytest.mark.parametrize("predicts,num_labels", [("label", 3), ("token_labels", 5)])
def test_mapped_minilm_equals_a_whole_load_new_head_included(predicts, num_labels):
    cfg = model_cfg(name="minilm")
    assert lazy.plan_source(cfg, None) == "file"
    tok = load_tokenizer(cfg, resolve_model_path(cfg))
    whole = load_model(cfg, predicts, tok, num_labels, seed=3)
    after_whole = torch.rand(4)
    gc.collect()
    before = rss_anon_mb()
    mapped = load_model(cfg, predicts, tok, num_labels, seed=3,
                        source=lazy.WeightsSource(resolve_model_path(cfg)))
    grown = rss_anon_mb() - before
    after_mapped = torch.rand(4)
    assert_same_load(whole, mapped)  # the classifier the checkpoint lacks: the same draw
    assert torch.equal(after_whole, after_mapped), "the random state after loading differs"
    size_mb = sum(p.numel() * p.element_size() for p in mapped.parameters()) / 2**20
    # A whole load copies the 87 MB into this process; the mapped one reads pages on touch.
    assert grown < 0.25 * size_mb, (grown, size_mb)


def test_child_build_equals_a_whole_load(tmp_path):
    cfg = model_cfg(**TINY_MODEL)
    tok = load_tokenizer(cfg, None)
    whole = load_model(cfg, "next_tokens", tok, seed=5)
    after_whole = torch.rand(4)
    torch.manual_seed(123)  # whatever the state before: the child's state after the build wins
    source = lazy.build_in_child(tmp_path / "w", cfg, "next_tokens", None, 5, None)
    mapped = load_model(cfg, "next_tokens", tok, seed=5, source=source)
    assert_same_load(whole, mapped)
    assert torch.equal(after_whole, torch.rand(4))


def test_which_source_a_model_gets():
    tiny = model_cfg(**TINY_MODEL)
    size = parameter_bytes_on_meta(tiny, "next_tokens", load_tokenizer(tiny, None))
    assert size == 4 * sum(p.numel() for p in load_model(tiny, "next_tokens", load_tokenizer(tiny, None)).parameters())
    assert lazy.plan_source(tiny, size) == "whole"  # tiny: a child's start costs more than the copy
    assert lazy.plan_source(tiny, lazy.CHILD_BUILD_MIN_BYTES) == "child"
    assert lazy.plan_source(model_cfg(**TINY_MODEL, sharded_loading="on"), size) == "child"
    assert lazy.plan_source(model_cfg(name="smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"), None) == "child"
    assert lazy.plan_source(model_cfg(name="minilm", sharded_loading="off"), None) == "whole"
    with pytest.raises(ConfigError, match="model.sharded_loading='maybe'"):
        lazy.plan_source(model_cfg(name="minilm", sharded_loading="maybe"), None)


STEPS = 6
SAME = [*TINY, f"trainer.max_steps={STEPS}", "trainer.lr=3e-3", "trainer.eval_every=3", "trainer.save_every=0",
        "strategy=lora", "strategy.dropout=0.0"]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["fsdp", "zero3"])
def test_two_processes_loaded_sharded_match_one_process(tmp_path, reference, backend):
    """model.sharded_loading=on: rank 0's child builds the tiny model, both processes map
    it; the LoRA adapters drawn afterwards and every loss are those of one process."""
    one = reference(*SAME, "trainer.batch_size=8")
    run_dir = tmp_path / "run"
    proc = run_torchrun(2, *SAME, f"backend={backend}", "model.sharded_loading=on", "trainer.batch_size=4",
                        f"run_dir={run_dir}")
    assert "building the model once in a child process" in proc.stdout + proc.stderr
    assert not (run_dir / ".sharded_load").exists(), "the child's files are removed once mapped"
    ref, got = losses(one), losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert [got[s] for s in sorted(ref)] == pytest.approx([ref[s] for s in sorted(ref)], rel=1e-4)
    ev = lambda d: [e["eval/loss"] for e in read_metrics(d) if "eval/loss" in e]  # noqa: E731
    assert ev(run_dir) == pytest.approx(ev(one), rel=1e-4)
