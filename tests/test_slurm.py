"""A real Slurm: a single-node cluster (Debian's slurm-wlm and munge) started on this machine by the test,
loopback only, runs the default DAG's main run through workflow/profiles/slurm with 2 shards (the
`second_run` fixture, conftest.py); every job runs as a Slurm job on its partition and the results equal the
local run's (`default_run`).

The cluster: munged with a fresh key, slurmctld and slurmd as daemons, everything (config, key, sockets,
state, spool, pid files, logs) in one temporary folder, the config named by SLURM_CONF; two partitions on
the one node (2 CPUs here, its memory as `slurmd -C` reports it) named as the test's config names them
(config `cluster`); the node has no GPU, so the run sets cluster.request_gpus false and the GPU rules go to
the GPU partition asking for none. Without the Slurm binaries, or not as root (slurmd runs each job as
its user), the test is skipped, except under CI (CI set), where it fails: .ci/run installs slurm-wlm and
munge, and CI runs as root.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from test_workflow import ROOT, SNAKEMAKE, write_config

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "sinfo", "scontrol", "scancel")
PARTITIONS = {"cpu_partition": "aas-ci-cpu", "gpu_partition": "aas-ci-gpu"}
GPU_RULES = {"generate", "segment"}
START_TIMEOUT_S = 60        # until the node is idle in sinfo
RUN_TIMEOUT_S = 30 * 60     # the main run's DAG (24 Slurm jobs)


def in_ci() -> bool:
    return os.environ.get("CI", "") not in ("", "0", "false")


def missing_for_slurm() -> str | None:
    """Why this machine cannot start the single-node Slurm, or None when it can."""
    missing = [name for name in BINARIES if shutil.which(name) is None]
    if missing:
        return (f"no {', '.join(missing)} on PATH (Debian: apt-get install slurm-wlm munge; "
                ".ci/run installs them)")
    if os.geteuid() != 0:
        return "the single-node Slurm needs root (slurmd runs each job as its user); CI runs as root"
    return None


def slurm_available() -> bool:
    return missing_for_slurm() is None


def slurm_or_skip() -> None:
    """Skip without the Slurm and munge binaries or root, except in CI (CI set), where it fails."""
    message = missing_for_slurm()
    if message:
        if in_ci():
            pytest.fail(f"CI: {message}")
        pytest.skip(message)


def test_without_slurm_the_slurm_test_skips_except_in_ci(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no munged, slurmctld"):
        slurm_or_skip()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI: no munged"):
        slurm_or_skip()


def free_ports(count: int) -> list[int]:
    """`count` distinct loopback ports free now (another test's Slurm may run beside this one)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def node_line() -> str:
    """This machine as a Slurm node named localhost (CPUs, sockets, cores, threads and RealMemory as
    `slurmd -C` measures them, so slurmd registers it without draining it), reached over loopback."""
    measured = subprocess.run(["slurmd", "-C"], check=True, capture_output=True, text=True,
                              timeout=30).stdout.splitlines()[0]
    fields = [field for field in measured.split() if not field.startswith("NodeName=")]
    return " ".join(["NodeName=localhost", "NodeAddr=127.0.0.1", *fields, "State=UNKNOWN"])


class SingleNodeSlurm:
    """munged + slurmctld + slurmd on this machine, all files in `root`; `env` is what a client (sbatch,
    squeue, snakemake) needs. Stopping cancels the jobs, then ends the daemons by their pid files."""

    def __init__(self, root: Path, partitions: dict[str, str]):
        self.root = root
        self.conf = root / "slurm.conf"
        self.partitions = partitions
        self.pid_files = {name: root / f"{name}.pid" for name in ("munged", "slurmctld", "slurmd")}
        # The slurm-jobstep plugin drops SLURM_* variables, SLURM_CONF among them, before its srun inside
        # the job (snakemake-executor-plugin-slurm issue #164): a cluster whose slurm.conf is not at
        # /etc/slurm/slurm.conf, as this one, gives the job an srun that names it.
        self.bin = root / "bin"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf),
                    "PATH": f"{self.bin}{os.pathsep}{os.environ['PATH']}"}

    def write_config(self) -> None:
        root = self.root
        for folder in ("munge", "state", "spool", "log", "bin"):
            (root / folder).mkdir(mode=0o755)
        key = root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        cpu, gpu = self.partitions["cpu_partition"], self.partitions["gpu_partition"]
        controller_port, node_port = free_ports(2)
        self.conf.write_text("\n".join([
            "ClusterName=aas-ci",
            "SlurmctldHost=localhost(127.0.0.1)",
            f"SlurmctldPort={controller_port}",
            f"SlurmdPort={node_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={root}/munge/munge.socket",
            f"StateSaveLocation={root}/state",
            f"SlurmdSpoolDir={root}/spool",
            f"SlurmctldPidFile={self.pid_files['slurmctld']}",
            f"SlurmdPidFile={self.pid_files['slurmd']}",
            f"SlurmctldLogFile={root}/log/slurmctld.log",
            f"SlurmdLogFile={root}/log/slurmd.log",
            # No cgroups (a container may have none to give): processes tracked by their parent ids,
            # no task binding, no per-job accounting gathered.
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            # No slurmdbd: sacct has nothing to ask ("accounting storage is disabled"), so the run asks
            # squeue for job states (--slurm-status-command squeue), which keeps finished jobs MinJobAge s.
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MinJobAge=3600",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            "SchedulerType=sched/backfill",
            "MpiDefault=none",
            "ReturnToService=2",
            node_line(),
            f"PartitionName={cpu} Nodes=localhost Default=YES MaxTime=INFINITE State=UP",
            f"PartitionName={gpu} Nodes=localhost MaxTime=INFINITE State=UP",
            "",
        ]))
        srun = self.bin / "srun"
        srun.write_text(f'#!/bin/sh\nexport SLURM_CONF="{self.conf}"\nexec "{shutil.which("srun")}" "$@"\n')
        srun.chmod(0o755)

    def start(self) -> None:
        self.write_config()
        munge = self.root / "munge"
        self._run("munged", f"--socket={munge}/munge.socket", f"--key-file={munge}/munge.key",
                  f"--pid-file={self.pid_files['munged']}", f"--log-file={munge}/munged.log",
                  f"--seed-file={munge}/munged.seed")
        self._run("slurmctld")
        self._run("slurmd", "-N", "localhost")
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            state = self.client("sinfo", "--noheader", "--nodes=localhost", "--format=%T", check=False).stdout
            if state.split() and all(line.strip() == "idle" for line in state.split()):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"the node is not idle after {START_TIMEOUT_S} s ({state.strip()!r}):\n"
                                     + self.logs())
            time.sleep(0.5)

    def _run(self, *command: str) -> None:
        """Start a daemon (each forks and writes its pid file)."""
        result = subprocess.run(command, check=False, env=self.env, capture_output=True, text=True, timeout=30)
        if result.returncode != 0:
            raise AssertionError(f"{' '.join(command)} failed: {result.stdout}{result.stderr}\n" + self.logs())

    def client(self, *command: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=60, check=check)

    def logs(self) -> str:
        parts = []
        for path in sorted(self.root.glob("**/*.log")):
            parts.append(f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-20:]))
        return "\n".join(parts)

    def jobs(self) -> list[dict[str, str]]:
        """Every job the controller knows (finished ones stay MinJobAge s): scontrol's fields."""
        out = self.client("scontrol", "--oneliner", "show", "jobs").stdout
        return [dict(re.findall(r"(\S+?)=(\S*)", line)) for line in out.splitlines() if line.startswith("JobId=")]

    def cancel_jobs(self) -> None:
        """Jobs left by a failed run end before the daemons (at most 30 s)."""
        if not self.pid_files["slurmctld"].exists():
            return
        self.client("scancel", "--user=root", check=False)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            left = self.client("squeue", "--noheader", "--states=PENDING,RUNNING,COMPLETING", check=False)
            if left.returncode != 0 or not left.stdout.strip():
                return
            time.sleep(0.5)

    def stop(self) -> None:
        try:
            self.cancel_jobs()
        except subprocess.SubprocessError:
            pass
        for name in ("slurmd", "slurmctld", "munged"):
            path = self.pid_files[name]
            if not path.exists():
                continue
            pid = int(path.read_text().split()[0])
            try:
                os.kill(pid, signal.SIGTERM)
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline:
                    os.kill(pid, 0)
                    time.sleep(0.2)
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def second_run_config(workdir: Path) -> dict:
    """The config of the second run (conftest.py): the default DAG's, FAST toy training and 2 shards as the
    `default_run` fixture, without the controls (they add jobs, not cases: the variants' code runs in the
    default run), on the test cluster's partitions, the GPU rules asking for no GPU (the node has none)."""
    return write_config(workdir, shards=2, variants={}, cluster={**PARTITIONS, "request_gpus": False})


def run_on_slurm(workdir: Path) -> tuple[list[dict[str, str]], float]:
    """Start the single-node Slurm, run the workflow of ``workdir`` through workflow/profiles/slurm, sized to
    the one node (1 CPU and 1-2 GB a job, 30 min), statuses from squeue; stop the cluster. Returns every job
    the controller ran (scontrol's fields) and the run's wall time in seconds."""
    # munged wants every folder above its socket open to all: /tmp, not pytest's private tmp_path.
    root = Path(tempfile.mkdtemp(prefix="aas-slurm-", dir="/tmp"))
    root.chmod(0o755)
    cluster = SingleNodeSlurm(root, PARTITIONS)
    command = [
        *SNAKEMAKE, "--directory", str(workdir), "--profile", str(ROOT / "workflow" / "profiles" / "slurm"),
        "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "1",
        "--default-resources", "runtime=30", "mem_mb=1000", "cpus_per_task=1",
        "--set-resources", "generate:mem_mb=2000", "generate:cpus_per_task=1",
        "segment:mem_mb=2000", "segment:cpus_per_task=1",
    ]
    try:
        cluster.start()
        started = time.monotonic()
        try:
            result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
                                    env={**cluster.env, "HF_HUB_OFFLINE": "1"})
        except subprocess.TimeoutExpired as error:
            raise AssertionError(f"the Slurm run took over {RUN_TIMEOUT_S} s:\n{(error.stderr or b'')[-6000:]!r}\n"
                                 + cluster.logs()) from error
        elapsed = time.monotonic() - started
        output = result.stdout[-6000:] + result.stderr[-6000:]
        assert result.returncode == 0, f"snakemake on Slurm failed:\n{output}\n{cluster.logs()}"
        return cluster.jobs(), elapsed
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_default_dag_on_a_single_node_slurm_matches_the_local_run(second_run, default_run):
    """The default DAG's main run through workflow/profiles/slurm (conftest.py, `second_run`): every job ran
    as a Slurm job and completed, the GPU rules on the config's GPU partition asking for no GPU, the rest on
    its CPU partition; its summary equals the local run's. (Its every table, store and metrics file equals
    the local run's too: tests/test_workflow.py, the second-run test.)"""
    slurm_or_skip()
    assert second_run.executor == "slurm", second_run
    jobs = second_run.jobs
    rules = [re.match(r"rule_([a-z_]+?)(?:_wildcards_|$)", job.get("Comment", "")) for job in jobs]
    assert all(rules), [job.get("Comment") for job in jobs]
    by_rule: dict[str, list[dict[str, str]]] = {}
    for match, job in zip(rules, jobs):
        by_rule.setdefault(match.group(1), []).append(job)
    datasets, shards = 2, 2
    assert len(by_rule["generate"]) == len(by_rule["phrases"]) == len(by_rule["segment"]) == datasets * shards
    assert {"synthetic_data", "train_lmm", "random_lmm", "train_sam", "toy_diagnostics", "manifest",
            "evaluate_instance_seg", "evaluate_gcg", "visualize", "summary"} <= set(by_rule), by_rule.keys()
    for rule, rule_jobs in by_rule.items():
        expected = PARTITIONS["gpu_partition" if rule in GPU_RULES else "cpu_partition"]
        for job in rule_jobs:
            assert job["JobState"] == "COMPLETED", (rule, job["JobId"], job["JobState"])
            assert job["Partition"] == expected, (rule, job["Partition"])
            assert "gpu" not in job.get("TresPerJob", "") + job.get("TresPerNode", "") + job["TRES"], job

    summary = json.loads((second_run.workdir / "results" / "summary.json").read_text())
    local = json.loads((default_run / "results" / "summary.json").read_text())
    assert summary == [row for row in local if row["run"] == "main"]
    print(f"Slurm run: {len(jobs)} jobs in {second_run.seconds:.0f} s")
