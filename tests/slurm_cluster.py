"""A real SLURM cluster on localhost for the tests: Debian's slurmctld, two slurmd daemons
(nodes n1 and n2, both at 127.0.0.1 with their own ports) and munge.

    with LocalSlurm(tmp_path) as cluster:
        job = cluster.sbatch(["slurm/train.sbatch", "backend=ddp"], cwd=repo)
        cluster.wait_finished(job)

Every command gets SLURM_CONF pointing at this cluster's slurm.conf; the daemons are
stopped through their pid files. `ensure_installed()` installs the packages with apt when
they are missing (root only) and says why when it cannot.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
MUNGE_SOCKET = Path("/run/munge/munge.socket.2")


class ClusterUnavailable(RuntimeError):
    """SLURM cannot be installed or started here (not root, no apt)."""


def ensure_installed() -> None:
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    if os.geteuid() != 0:
        raise ClusterUnavailable("SLURM is not installed and installing it needs root")
    if not shutil.which("apt-get"):
        raise ClusterUnavailable("SLURM is not installed and apt-get is not available")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        # A fresh image may not have package lists yet.
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"apt-get install {' '.join(PACKAGES)} failed:\n{r.stderr[-2000:]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_munge() -> None:
    """munged as user munge with the package's key (created at install, mode 0400)."""
    if MUNGE_SOCKET.exists() and subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
        return  # already running
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        subprocess.run(["runuser", "-u", "munge", "--", "mungekey", "--create", "--keyfile", str(key)], check=True)
    shutil.chown(key, "munge", "munge")
    key.chmod(0o400)
    for d in ("/run/munge", "/var/log/munge", "/var/lib/munge"):
        Path(d).mkdir(parents=True, exist_ok=True)
        shutil.chown(d, "munge", "munge")
    subprocess.run(["runuser", "-u", "munge", "--", "munged", "--force"], check=True)
    for _ in range(100):
        if subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
            return
        time.sleep(0.1)
    raise RuntimeError("munged did not come up")


class LocalSlurm:
    NODES = ("n1", "n2")

    def __init__(self, root: Path, cpus: Optional[int] = None):
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.cpus = cpus or os.cpu_count() or 1
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    # ------------------------------------------------------------------ lifecycle
    def write_conf(self) -> None:
        host = socket.gethostname().split(".")[0]
        r = self.root
        (r / "state").mkdir(parents=True, exist_ok=True)
        nodes = "\n".join(
            f"NodeName={n} NodeAddr=127.0.0.1 NodeHostname={host} Port={_free_port()} "
            f"CPUs={self.cpus} RealMemory=1000 State=UNKNOWN"
            for n in self.NODES
        )
        self.conf.write_text(f"""\
ClusterName=distft-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits for its old credential to expire (default 120 s) before it starts again.
AuthInfo=cred_expire=10
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool-%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
MpiDefault=none
ReturnToService=2
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
KillWait=30
MinJobAge=600
InactiveLimit=0
{nodes}
PartitionName=debug Nodes={','.join(self.NODES)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
""")

    def start(self) -> "LocalSlurm":
        ensure_installed()
        _start_munge()
        self.write_conf()
        subprocess.run(["slurmctld", "-c"], env=self.env, check=True)
        for n in self.NODES:
            subprocess.run(["slurmd", "-N", n], env=self.env, check=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            out = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False).stdout.split()
            states = dict(zip(out[::2], out[1::2]))
            if all(states.get(n) == "idle" for n in self.NODES):
                return self
            time.sleep(0.3)
        raise RuntimeError(f"nodes did not become idle: {states}\n{self.logs()}")

    def stop(self) -> None:
        for pidfile in [self.root / f"slurmd-{n}.pid" for n in self.NODES] + [self.root / "slurmctld.pid"]:
            try:
                pid = int(pidfile.read_text().strip())
            except (OSError, ValueError):
                continue
            try:
                os.kill(pid, 15)
            except ProcessLookupError:
                continue
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)

    def __enter__(self) -> "LocalSlurm":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ commands
    def run(self, cmd: List[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
        r = subprocess.run(cmd, env={**self.env, **kw.pop("env", {})}, capture_output=True, text=True, **kw)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr}{r.stdout}")
        return r

    def sbatch(self, args: List[str], cwd: Path, env: Optional[Dict[str, str]] = None) -> int:
        out = self.run(["sbatch", "--parsable", *args], cwd=str(cwd), env=env or {}).stdout.strip()
        return int(out.split(";")[0])

    def job(self, job_id: int) -> Dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, NodeList, ...)."""
        r = self.run(["scontrol", "-o", "show", "job", str(job_id)], check=False)
        fields = {}
        for item in r.stdout.split():
            k, _, v = item.partition("=")
            fields.setdefault(k, v)
        return fields

    def array_jobs(self, job_id: int) -> List[Dict[str, str]]:
        r = self.run(["scontrol", "-o", "show", "job", str(job_id)], check=False)
        jobs = []
        for line in r.stdout.splitlines():
            jobs.append(dict(item.partition("=")[::2] for item in line.split()))
        return jobs

    def wait_state(self, job_id: int, states, timeout: float) -> Dict[str, str]:
        states = {states} if isinstance(states, str) else set(states)
        deadline = time.time() + timeout
        info: Dict[str, str] = {}
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not in {states} after {timeout:.0f}s: {info}\n{self.logs()}")

    def wait_finished(self, job_id: int, timeout: float = 600) -> Dict[str, str]:
        return self.wait_state(job_id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                                        "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}, timeout)

    def logs(self) -> str:
        parts = []
        for name in ["slurmctld.log"] + [f"slurmd-{n}.log" for n in self.NODES]:
            p = self.root / name
            if p.exists():
                parts.append(f"--- {name} (tail)\n" + "\n".join(p.read_text().splitlines()[-30:]))
        return "\n".join(parts)
