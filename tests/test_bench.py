"""The benchmark scripts' smoke modes run end to end and say something true: the same work
through transformers.Trainer and distft reaches the same held-out loss."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT, shared_data
sys.path.insert(0, str(ROOT))
from bench import vs_hf_trainer as vs  # noqa: E402
from distft import precision  # noqa: E402
from distft.precision import native_bf16_here  # noqa: E402

pytestmark = pytest.mark.slow


def run_bench(script: str, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """bench/<script> with `args` in a fresh interpreter; fails the test with its output's tail
    unless it exits 0."""
    proc = subprocess.run([sys.executable, f"bench/{script}", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def test_vs_hf_trainer_quick(tmp_path):
    shared_data("alpaca")  # skips when ../shared is absent
    run_bench("vs_hf_trainer.py", "--quick", "--out", str(tmp_path))
    data = json.loads((tmp_path / "vs_hf_trainer.json").read_text())
    mean = data["mean"]
    bf16, why = native_bf16_here()
    assert {m["runner"] for m in mean.values()} == {"hf", "distft"}
    assert sorted(mean) == sorted(vs.case_name(*c) for c in vs.cases_for(["tiny"], quick=True, bf16=bf16))
    assert len(mean) == (14 if bf16 else 8)
    for name, m in mean.items():
        assert m["tokens_per_second"] > 0 and m["peak_rss_mb"] > 0, name
    runs = {r["name"]: r for r in data["runs"]}
    # The same examples and steps: both runners train on the same rows and end at the
    # same held-out loss.
    for strategy in ("lora", "full"):
        hf, d = runs[f"hf-tiny-{strategy}-padded-fp32"], runs[f"distft-tiny-{strategy}-padded-fp32"]
        assert hf["rows"] == d["rows"] >= 60  # of 64 read; cleaning drops the same ones
        assert d["heldout_loss"] == pytest.approx(hf["heldout_loss"], rel=0.01)
    # Activation checkpointing recomputes the same numbers (dropout masks included): the
    # same training losses, on both runners.
    for runner, strategy in (("distft", "lora"), ("hf", "lora"), ("distft", "full")):
        plain, ac = runs[f"{runner}-tiny-{strategy}-padded-fp32"], runs[f"{runner}-tiny-{strategy}-padded-fp32-ac"]
        assert ac["train_loss"] == pytest.approx(plain["train_loss"], rel=1e-4), (runner, strategy)
    share = lambda r: 1 - r["tokens"] / r["padded_tokens"]  # noqa: E731
    assert share(runs["distft-tiny-lora-packed-fp32"]) < share(runs["distft-tiny-lora-padded-fp32"]), \
        "packed rows hold less padding"
    md = (tmp_path / "BENCHMARKS.md").read_text()
    assert "distft LoRA / full fine-tuning peak memory, both with activation checkpointing" in md and "python bench/vs_hf_trainer.py --quick" in md
    assert precision.cpu_capability() in md and (f"bf16 cases skipped: {why}" in md) != bf16
    assert (tmp_path / "vs_hf_trainer.png").stat().st_size > 5000


def test_vs_hf_trainer_only_runs_the_named_cases_alternating(tmp_path):
    shared_data("alpaca")
    pair = ["hf-tiny-lora-padded-fp32", "distft-tiny-lora-packed-fp32"]
    run_bench("vs_hf_trainer.py", "--quick", "--only", ",".join(pair), "--repeats", "2", "--out", str(tmp_path))
    data = json.loads((tmp_path / "vs_hf_trainer.json").read_text())
    assert [(r["name"], r["repeat"]) for r in data["runs"]] == [(n, k) for k in (0, 1) for n in pair]
    assert "tiny LoRA, fp32: distft packed / HF padded tokens/s" in {r["what"] for r in data["ratios"]}

    def refused(*args):
        proc = subprocess.run([sys.executable, "bench/vs_hf_trainer.py", "--quick", *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
        return proc.stderr

    assert "--only: no case named hf-tiny-lora-padded-f32 here" in refused("--only", "hf-tiny-lora-padded-f32",
                                                                          "--out", str(tmp_path / "x"))
    # A partial table never replaces the committed one.
    assert "give it its own --out" in refused("--only", pair[0])
    assert not (tmp_path / "x").exists()


def test_mfu_quick(tmp_path):
    shared_data("alpaca")
    run_bench("mfu.py", "--quick", "--out", str(tmp_path))
    data = json.loads((tmp_path / "mfu.json").read_text())
    # bf16 cases only where bf16 is native here, and the table says when they were skipped
    bf16, why = native_bf16_here()
    cases = ["full padded fp32", "full padded bf16", "lora packed fp32", "lora packed bf16"]
    assert [r["case"] for r in data["rows"]] == [c for c in cases if bf16 or "bf16" not in c]
    assert sorted(data["peak_gflops"]) == (["bf16", "fp32"] if bf16 else ["fp32"])
    assert all(v > 0 for v in data["peak_gflops"].values())
    for r in data["rows"]:
        assert 0 < r["mfu"] < 1, r
    md = (tmp_path / "BENCHMARKS.md").read_text()
    assert "Model FLOPs utilisation" in md and precision.cpu_capability() in md
    assert (f"bf16 cases skipped: {why}" in md) != bf16


def test_privacy_cost_quick(tmp_path):
    """bench/privacy.py's cost part: a non-private and a DP-SGD LoRA run at the same
    physical batch, both measured, the DP one with its epsilon."""
    shared_data("sst2")
    run_bench("privacy.py", "--quick", "--only", "cost", "--out", str(tmp_path))
    cost = json.loads((tmp_path / "privacy-quick.json").read_text())["cost"]
    for run in ("non-private", "dp"):
        assert cost[run]["step_s"] > 0 and cost[run]["peak_mb"] > 0 and cost[run]["s_per_example"] > 0
    assert cost["step_time_ratio"] > 0 and cost["peak_memory_ratio"] > 0
    dp = json.loads((tmp_path / "runs" / "privacy-cost-dp" / "summary.json").read_text())
    assert dp["privacy/epsilon"] > 0 and dp["privacy/noisy_steps"] == 6
    assert "DP / non-private: step time" in (tmp_path / "privacy-quick.md").read_text()


def test_sequential_quick(tmp_path):
    """bench/sequential.py --quick: a shared stage 1, then replay (LoRA) and the 3-stage EWC
    run, each with its forgetting matrix in the table."""
    shared_data("trec")
    run_bench("sequential.py", "--quick", "--strategies", "lora", "--settings", "replay",
              "--three-settings", "ewc", "--out", str(tmp_path))
    rows = json.loads((tmp_path / "sequential-quick.json").read_text())["rows"]
    two = {r["setting"]: r for r in rows if len(r["tasks"]) == 2}
    three = {r["setting"]: r for r in rows if len(r["tasks"]) == 3}
    assert sorted(two) == ["replay"] and sorted(three) == ["ewc"]
    # Every setting starts stage 2 from the same stage 1.
    assert len({r["matrix"][0][0] for r in rows}) == 1
    assert all(len(r["matrix"]) == 3 and None not in r["matrix"][2] for r in three.values())
    table = (tmp_path / "sequential-quick.md").read_text()
    assert "| replay |" in table and "SST-2, AG News, TREC" in table
    assert all((tmp_path / r["png"]).stat().st_size > 1000 for r in rows)


def test_features_quick(tmp_path):
    """bench/features.py --quick: three classifiers on one feature choice (the first embeds,
    the others read the cache), each exported head scoring as scikit-learn did, and
    distft's embeddings equal to sentence-transformers' for the throughput comparison."""
    shared_data("sst2")
    run_bench("features.py", "--quick", "--only", "accuracy", "throughput", "--out", str(tmp_path))
    result = json.loads((tmp_path / "features-quick.json").read_text())
    rows = result["accuracy"]
    assert [r["cache_hit"] for r in rows] == [False, True, True]
    for r in rows:
        assert r["exported_as"].startswith("head")
        assert r["exported_head_accuracy"] == pytest.approx(r["accuracy"], abs=0.011)  # at most 1 of 100 flips
    t = result["throughput"]
    assert t["max_cosine_gap"] < 1e-4 and min(t["texts_per_second"].values()) > 0
    assert "sentence-transformers `encode`" in (tmp_path / "features-quick.md").read_text()


def test_ner_quick(tmp_path):
    """bench/ner.py --quick: the feature row and the transformers.Trainer row, scored with
    seqeval on words."""
    shared_data("ner")
    run_bench("ner.py", "--quick", "--rows", "feature", "hf_trainer", "--out", str(tmp_path))
    rows = {r["row"]: r for r in json.loads((tmp_path / "ner-quick.json").read_text())["rows"]}
    assert sorted(rows) == ["feature", "hf_trainer"]
    assert all(0 <= r["f1"] <= 1 for r in rows.values())
    assert set(rows["feature"]["per_type_f1"]) == {"corporation", "creative-work", "group", "location", "person",
                                                   "product"}


def test_ab_quick(tmp_path):
    """bench/ab.py on the tiny model: each value run in its own process, alternating, with
    the override really applied (other dropout masks, other training losses)."""
    proc = run_bench("ab.py", "trainer.lean_dropout_rng", "fast", "torch", "--model", "tiny", "--repeats", "1",
                     "--steps", "3", "--precision", "fp32", "--layout", "padded", "--out", str(tmp_path), timeout=600)
    result = json.loads((tmp_path / "ab-trainer.lean_dropout_rng.json").read_text())
    assert [r["value"] for r in result["rows"]] == ["fast", "torch"]
    assert all(r["tokens_per_second"] > 0 for r in result["rows"]) and set(result["mean_tokens_per_second"]) == {"fast", "torch"}
    fast, torch_rng = (r["train_loss"] for r in result["rows"])
    assert len(fast) == 3 and fast != torch_rng


def test_sweep_quick(tmp_path):
    """bench/sweep.py --quick on the tiny model, 2 trials a search: the plain run, TPE, one
    pruned TPE row and the replay of TPE's curves (each search row is three interpreters, so
    the grid and median rows, the same code with other keys, are only composed: below)."""
    run_bench("sweep.py", "--quick", "--rows", "default", "tpe", "tpe_percentile", "replay",
              "--out", str(tmp_path))
    rows = {r["row"]: r for r in json.loads((tmp_path / "sweep-quick.json").read_text())["rows"]}
    assert list(rows) == ["default", "tpe", "tpe_percentile", "replay"]
    assert all(r["states"]["fail"] == 0 for n, r in rows.items() if n not in ("default", "replay"))
    assert (tmp_path / "sweep-tpe-quick.png").stat().st_size > 5000
    md = (tmp_path / "sweep-quick.md").read_text()
    assert "Pruned (tpe_pruned)" not in md and "Pruned (tpe_percentile) against unpruned TPE" in md
    # the replay of tpe's curves: the unpruned steps are the tpe row's, a pruner never adds steps
    replay = rows["replay"]
    assert replay["trials"] == 2 and replay["unpruned_steps"] == rows["tpe"]["steps"]
    assert all(r["steps"] <= replay["unpruned_steps"] for r in replay["results"])
    assert [r["settings"].get("prune_on", "objective") for r in replay["results"]] == ["objective", "loss"]
    assert replay["bound_steps"] <= replay["unpruned_steps"] and "## Pruners replayed" in md


def test_every_sweep_row_composes(tmp_path):
    """Each row of bench/sweep.py, quick and full, gives a config distft-sweep accepts: its
    space's corners compose and its pruner builds (what a sweep checks before its first trial)."""
    from bench import sweep as bench_sweep
    from distft import sweep

    for quick, table in ((True, bench_sweep.QUICK_ROWS), (False, bench_sweep.ROWS)):
        for name, extra in table.items():
            overrides = [*bench_sweep.base(quick), *extra, f"sweep.dir={tmp_path / name}"]
            cfg = sweep.compose(overrides)
            params = sweep.parse_space(cfg)
            assert params, name
            sweep.check_trial_configs(params, overrides)
            sweep.build_pruner(cfg.sweep, cfg.trainer.eval_every)
            if name == "grid" and quick:
                assert [p.grid() for p in params] == [[1e-3, 1e-2]]


def test_plan_check_quick(tmp_path):
    """bench/plan_check.py --quick: a real zero3 run on 2 processes, planned by `distft-plan
    --check` in its own process; the table holds it with the errors (what each backend
    shards is tested in test_plan.py)."""
    proc = run_bench("plan_check.py", "--quick", "--out", str(tmp_path))
    rows = json.loads((tmp_path / "plan_check-quick.json").read_text())["rows"]
    assert [r["row"] for r in rows] == ["tiny-full-zero3"]
    for r in rows:
        assert r["processes"] == 2 and r["backend"] == r["row"].split("-")[2]
        assert r["planned_peak_mb"] > 0 and r["measured_peak_mb"] > 0
        assert r["memory_error"] == pytest.approx(r["planned_peak_mb"] / r["measured_peak_mb"] - 1)
    md = (tmp_path / "plan_check-quick.md").read_text()
    assert "| tiny | full | zero3 | no | 2 |" in md and "cases within 20%" in md


def test_profile_step_quick(tmp_path):
    shared_data("alpaca")
    run_bench("profile_step.py", "--quick", "--out", str(tmp_path))
    data = json.loads((tmp_path / "profile_step.json").read_text())
    assert data["profiled_steps"] == 1 and data["precision"] == "fp32"
    from bench.profile_step import OTHER, kind_of
    assert [kind_of(n) for n in ("aten::mm", "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
                                 "aten::_to_copy", "aten::random_", "aten::_log_softmax", "aten::to_dense", "aten::add")] \
        == ["matmul", "attention", "casts and copies", "random numbers", "softmax, cross-entropy", OTHER, OTHER]
    kinds = {k["kind"]: k for k in data["kinds"]}
    # every operator's own time lands in exactly one kind, and a LoRA step does matmuls and attention
    assert sum(k["share"] for k in data["kinds"]) == pytest.approx(1.0)
    assert kinds["matmul"]["self_s"] > 0 and kinds["attention"]["self_s"] > 0
    assert data["top_ops"] and all(o["self_s"] > 0 for o in data["top_ops"])
    md = (tmp_path / "BENCHMARKS.md").read_text()
    assert "Where a step's time goes" in md and "python bench/profile_step.py --quick" in md


def test_chunked_loss_quick(tmp_path):
    """The frozen output layer's loss both ways on a small shape, in fp32 and bf16: both run,
    the gradient taken in the forward is as close to the fp32 one as the recomputed path's,
    the table is written."""
    run_bench("chunked_loss.py", "--quick", "--out", str(tmp_path))
    data = json.loads((tmp_path / "chunked_loss.json").read_text())
    assert [r["precision"] for r in data["rows"]] == ["fp32", "bf16"]
    for r in data["rows"]:
        assert r["recomputed_ms"] > 0 and r["in_forward_ms"] > 0, r
        limit = 1e-5 if r["precision"] == "fp32" else 2e-2
        assert r["in_forward_grad_error"] < limit and r["recomputed_grad_error"] < limit, r
    md = (tmp_path / "BENCHMARKS.md").read_text()
    assert "gradient in the forward against recomputed logits" in md and "python bench/chunked_loss.py --quick" in md


def test_attention_quick(tmp_path):
    """Flash against matmul attention on small shapes (bf16 even where it is slow: the shapes
    are tiny): both run, what each keeps is counted, the table is written; the profile
    counts the matmul path's batched matmuls and softmax as attention."""
    run_bench("attention.py", "--quick", "--out", str(tmp_path))
    data = json.loads((tmp_path / "attention.json").read_text())
    assert [(r["batch"], r["length"]) for r in data["rows"]] == [(2, 64), (1, 128)]
    for r in data["rows"]:
        assert r["flash_ms"] > 0 and r["matmul_ms"] > 0 and r["matmul_in_training"]
        # the matmul path keeps the bf16 probabilities besides q, k and v: batch x heads x length^2 x 2 bytes
        probs = r["batch"] * 4 * r["length"] ** 2 * 2 / 2**20
        assert r["matmul_kept_mb"] == pytest.approx(probs + r["batch"] * r["length"] * (4 + 2 + 2) * 16 * 2 / 2**20)
        assert r["matmul_whole_ms"] > 0 and r["matmul_whole_kept_mb"] == pytest.approx(r["matmul_kept_mb"])
    md = (tmp_path / "BENCHMARKS.md").read_text()
    assert "CPU attention in bf16 training" in md and "python bench/attention.py --quick" in md
    from bench.profile_step import kind_of
    assert [kind_of(n) for n in ("aten::bmm", "aten::_softmax", "aten::_softmax_backward_data", "aten::addmm")] \
        == ["attention", "attention", "attention", "matmul"]
