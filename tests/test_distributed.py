"""DDP, FSDP2 and DeepSpeed ZeRO 1/2/3 through the real torchrun launcher, 2 processes over gloo: the same
losses and exported weights as one process with the same global batch (so a LoRA adapter
saved under FSDP is complete), and SIGKILL + resume."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import distft.backends

from conftest import ROOT, TINY, losses, read_metrics, run_cli, torchrun_cmd, wait_for_step

pytestmark = pytest.mark.slow

STEPS = 8
COMMON = [*TINY, f"trainer.max_steps={STEPS}", "trainer.lr=3e-3", "trainer.eval_every=4", "trainer.save_every=2"]


def children(pid):
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def torchrun(nproc, *args, script=False):
    """Run torchrun directly, or through launch/torchrun.sh as a user would."""
    cmd = ["bash", "launch/torchrun.sh", *args] if script else torchrun_cmd(nproc, *args)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "NPROC": str(nproc), "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


# Every registered multi-process backend: a new one joins the parity, resume and refusal tests.
BACKENDS = [name for name in distft.backends.BACKENDS if name != "single"]


def same_numbers(strategy):
    """The settings of the parity runs. No dropout: N processes draw other dropout masks
    than one process does."""
    return [*COMMON, f"strategy={strategy}"] + (["strategy.dropout=0.0"] if strategy == "lora" else [])


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """A 2-process run through launch/torchrun.sh as a user starts it, once per (backend,
    strategy) in this module: the parity test checks it, the resume and refusal tests
    continue from its checkpoints (all kept). Returns (run_dir, the launcher's output)."""
    done = {}

    def run(backend, strategy):
        if (backend, strategy) not in done:
            run_dir = tmp_path_factory.mktemp(f"two-{backend}-{strategy}") / "run"
            proc = torchrun(2, *same_numbers(strategy), "trainer.keep_checkpoints=0", f"backend={backend}",
                            "trainer.batch_size=4", f"run_dir={run_dir}", script=True)
            done[(backend, strategy)] = (run_dir, proc)
        return done[(backend, strategy)]

    return run


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("strategy,weights", [("full", "model.safetensors"), ("lora", "adapter_model.safetensors")])
def test_two_processes_match_one_process(reference, two_process_run, backend, strategy, weights):
    one = reference(*same_numbers(strategy), "trainer.batch_size=8")
    two, proc = two_process_run(backend, strategy)
    assert proc.stdout.count("step 8: eval/") == 1, "only rank 0 reports"
    assert proc.stdout.count("done: 8 steps") == 1
    log_text = (two / "train.log").read_text()
    if backend == "zero3":  # fp32 weights: no second fp32 copy of the partition (zero.share_fp32_master)
        assert "fp32 master partition is the module's own" in log_text
    if backend.startswith("zero"):  # zero.skip_muon_import
        assert "Muon module not imported" in log_text
    if distft.backends.supports(backend, "chunked_loss"):  # zero3 too: its hooks gather the output layer
        assert "loss in chunks of" in log_text

    ref, got = losses(one), losses(two)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-4), f"step {step}"
    ev_ref = [e["eval/loss"] for e in read_metrics(one) if "eval/loss" in e]
    ev_got = [e["eval/loss"] for e in read_metrics(two) if "eval/loss" in e]
    assert ev_got == pytest.approx(ev_ref, rel=1e-4)

    a, b = load_file(str(one / "final" / weights)), load_file(str(two / "final" / weights))
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("backend,strategy", [("ddp", "full"), ("fsdp", "lora"), ("zero3", "lora"), ("zero2", "full")])
def test_sigkill_then_resume(tmp_path, backend, strategy):
    overrides = [*COMMON, "trainer.max_steps=16", "model.dropout=0.1", f"backend={backend}",
                 f"strategy={strategy}", "trainer.batch_size=4"]
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    torchrun(2, *overrides, f"run_dir={ref_dir}")
    reference = losses(ref_dir)

    proc = subprocess.Popen(torchrun_cmd(2, *overrides, f"run_dir={cut_dir}"), cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        wait_for_step(proc, cut_dir, 7)
    finally:
        # torchrun starts each worker in its own session: kill them by parent pid, then
        # the launcher, as a node failure would.
        for pid in children(proc.pid):
            os.kill(pid, signal.SIGKILL)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    time.sleep(0.5)
    assert not children(proc.pid)
    assert not (cut_dir / "summary.json").exists()

    torchrun(2, *overrides, f"run_dir={cut_dir}")
    resumed = losses(cut_dir)
    assert sorted(resumed) == list(range(1, 17))
    for step in range(1, 17):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5), f"step {step}"


@pytest.mark.parametrize("backend,strategy,before,after", [
    ("ddp", "full", 2, 1),     # whole torch optimizer state
    ("fsdp", "full", 2, 1),    # DCP resharded
    ("fsdp", "lora", 1, 2),
    ("zero2", "full", 2, 1),   # converted to a DeepSpeed universal checkpoint
    ("zero3", "lora", 1, 2),
])
def test_resume_on_another_process_count(tmp_path, reference, two_process_run, backend, strategy, before, after):
    """Checkpoint at step 4 on `before` processes, continue on `after` with the same global
    batch: steps 5-8 give the losses of one uninterrupted process. Step 5's loss depends
    only on the weights; steps 6-8 also on the optimizer moments, so a lost or mis-sharded
    optimizer state shows."""
    same = same_numbers(strategy)
    extra = [*same, "trainer.keep_checkpoints=0"]
    second = tmp_path / "second"
    ref = reference(*same, "trainer.batch_size=8")  # keep_checkpoints changes no number
    if before == 2:
        first, _ = two_process_run(backend, strategy)  # the parity test's run
    else:
        first = tmp_path / "first"
        torchrun(before, *extra, f"backend={backend}", f"trainer.batch_size={8 // before}", f"run_dir={first}")

    resume = f"resume={first / 'checkpoints' / 'step-4'}"
    if backend == "ddp":
        # Another global batch would be another data order and schedule: refused, with the
        # fix (distft checks the checkpoint's state before a backend loads it: the same code
        # for every backend, so one shows it).
        proc = subprocess.run(torchrun_cmd(after, *extra, f"backend={backend}", f"trainer.batch_size={16 // after}",
                                           resume, f"run_dir={tmp_path / 'refused'}"),
                              cwd=ROOT, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode != 0
        assert f"set trainer.batch_size={8 // after} trainer.grad_accum=1" in proc.stderr + proc.stdout

    proc = torchrun(after, *extra, f"backend={backend}", f"trainer.batch_size={8 // after}", resume,
                    f"run_dir={second}")
    assert f"written by {before} process(es), continued on {after}" in proc.stdout + proc.stderr
    expected, got = losses(ref), losses(second)
    assert sorted(got) == [5, 6, 7, 8]
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=1e-4), f"step {step}"
    assert not list((second / "checkpoints").glob(".resharded-*")), "the converted copy is removed"


def test_checkpoint_of_another_backend_is_refused(tmp_path, two_process_run):
    run_dir, _ = two_process_run("fsdp", "full")
    proc = run_cli(*COMMON, "trainer.max_steps=4", f"resume={run_dir / 'checkpoints' / 'step-2'}",
                   f"run_dir={tmp_path / 'again'}", check=False)
    assert proc.returncode == 2
    assert "holds fsdp optimizer state" in proc.stderr and "backend=fsdp" in proc.stderr


def test_ddp_without_a_launcher_says_how_to_start_it(tmp_path):
    proc = run_cli(f"run_dir={tmp_path / 'run'}", "backend=ddp", check=False,
                   env={"WORLD_SIZE": "", "RANK": ""})
    assert proc.returncode == 2 and "torchrun --nproc_per_node" in proc.stderr


@pytest.mark.parametrize("via_script", [True, False])
def test_deepspeed_launcher(tmp_path, reference, via_script):
    """The deepspeed launcher: through launch/deepspeed.sh, and raw without --no_local_rank
    (it then appends --local_rank=N, which distft strips before Hydra parses)."""
    two = tmp_path / "two"
    extra = ["strategy=lora", "strategy.dropout=0.0"]
    one = reference(*COMMON, *extra, "trainer.batch_size=8")
    args = [*COMMON, *extra, "backend=zero3", "trainer.batch_size=4", f"run_dir={two}"]
    if via_script:
        cmd = ["bash", "launch/deepspeed.sh", *args]
    else:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--module", "distft.train", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "NPROC": "2", "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ref, got = losses(one), losses(two)
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-4), f"step {step}"


def test_local_rank_flag_is_stripped():
    from distft.train import _strip_local_rank

    assert _strip_local_rank(["prog", "--local_rank=1", "a=1", "--local_rank", "0", "b=2"]) == ["prog", "a=1", "b=2"]


def test_mixture_on_two_processes_matches_one(tmp_path):
    """A classification mixture (two heads) under DDP: each rank its share of the sampler's
    global batches, the same losses as one process (a head absent from a rank's batch still
    joins the graph, as DDP requires)."""
    from test_multitask import write_tasks

    args = [*COMMON, *write_tasks(tmp_path), "task.head_dropout=0.0"]  # one RNG stream vs two
    run_cli(*args, "trainer.batch_size=8", f"run_dir={tmp_path / 'one'}")
    torchrun(2, *args, "backend=ddp", "trainer.batch_size=4", f"run_dir={tmp_path / 'two'}")
    ref, got = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-4), f"step {step}"


@pytest.mark.parametrize("backend", ["ddp", "fsdp", "zero2"])
def test_compiled_blocks_on_two_processes(tmp_path, reference, backend):
    """trainer.compile under each wrapping it supports (zero3 is refused at config time):
    the losses and the exported adapter of an eager one-process run."""
    two = tmp_path / "two"
    extra = [*TINY, "trainer.max_steps=4", "trainer.lr=3e-3", "strategy=lora", "strategy.dropout=0.0"]
    one = reference(*extra, "trainer.batch_size=8")
    proc = torchrun(2, *extra, f"backend={backend}", "trainer.batch_size=4", "trainer.compile=true", f"run_dir={two}")
    assert "torch.compile: 2 blocks compiled in place" in proc.stdout + proc.stderr
    assert "recompile_limit" not in proc.stderr, "compiled blocks fell back to eager"
    ref, got = losses(one), losses(two)
    assert sorted(got) == [1, 2, 3, 4]
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-3), f"step {step}"
    a = load_file(str(one / "final" / "adapter_model.safetensors"))
    b = load_file(str(two / "final" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4, msg=k)



def test_zero_optimizer_offload_keeps_the_parameter_groups(tmp_path, two_process_run):
    """With backend.offload_optimizer the run's own AdamW (no decay on biases and norms,
    its betas and eps) steps the offloaded partitions: the losses are those of the run
    without offload."""
    ref, _ = two_process_run("zero2", "full")
    run = tmp_path / "offload"
    torchrun(2, *same_numbers("full"), "backend=zero2", "backend.offload_optimizer=true", "trainer.batch_size=4",
             "trainer.eval_every=0", "trainer.save_every=0", f"run_dir={run}")
    want, got = losses(ref), losses(run)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-5), f"step {step}"


def test_zero_engines_do_not_import_deepspeeds_muon():
    """DeepSpeed's ZeRO engines import its Muon module to ask whether the optimizer is a Muon;
    that import compiles kernels (torch's inductor and networkx). distft's stand-in answers no
    for its own optimizers and hands any other name over to the real module."""
    code = """
import sys, torch
from distft.backends.zero import skip_muon_import
assert skip_muon_import() and not skip_muon_import()
from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam
import deepspeed.runtime.zero.stage3, deepspeed.runtime.zero.stage_1_and_2
assert not isinstance(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))]), MuonWithAuxAdam)
assert "torch._inductor.compile_fx" not in sys.modules, "the real Muon module was imported"
import deepspeed.runtime.zero.muon.muon_optimizer as muon
assert callable(muon.muon_update)  # another name: the real module, imported now
assert "torch._inductor.compile_fx" in sys.modules
assert sys.modules["deepspeed.runtime.zero.muon.muon_optimizer"].muon_update is muon.muon_update
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
