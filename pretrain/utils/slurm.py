"""``--launcher slurm``: submit a command-line entry point as SLURM jobs with submitit, requeued on
preemption and time-out.

Each job runs one process per GPU (``tasks_per_node = gpus_per_node``), each given the environment torchrun
would give it (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), so the entry runs
unchanged (``pretrain.utils.dist.init_distributed`` reads ``env://``). When SLURM signals a preemption or the
time limit, submitit calls :meth:`EntryJob.checkpoint`, which requeues the same command with
``resume_args`` added (pretraining: ``--resume auto``; the transfer suite needs none: a rerun skips finished
trials and resumes a trial from its own checkpoint). The job ids, the submitted command and the parameters go
to ``<output>/slurm/submissions.jsonl`` and submitit's logs to ``<output>/slurm/<job id>_*.out|err``.
Shared by ``tools/train_moco.py`` and ``transfer/run_all.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import runpy
import shlex
import sys
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, List, Optional, Sequence

# flags added by add_launcher_args, with whether they take a value (to strip them from the job's command)
_FLAGS = {"--launcher": True, "--nodes": True, "--gpus-per-node": True, "--partition": True, "--time": True,
          "--account": True, "--constraint": True, "--cpus-per-task": True, "--mem-gb": True, "--dry-run": False}


@dataclass(frozen=True)
class SlurmOptions:
    nodes: int = 1
    gpus_per_node: int = 8
    partition: Optional[str] = None
    time_min: int = 72 * 60
    account: Optional[str] = None
    constraint: Optional[str] = None
    cpus_per_task: int = 10
    mem_gb: Optional[int] = None
    signal_delay_s: int = 120  # SLURM warns this long before the time limit: time to requeue
    max_requeues: int = 20  # preemptions are not counted by submitit; time-outs are, up to this


def add_launcher_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("launcher (--launcher slurm: submit with submitit instead of running here)")
    g.add_argument("--launcher", default="local", choices=("local", "slurm"))
    g.add_argument("--nodes", type=int, default=1)
    g.add_argument("--gpus-per-node", type=int, default=8, help="one process per GPU (slurm launcher)")
    g.add_argument("--partition", default=None)
    g.add_argument("--time", type=int, default=72 * 60, help="time limit per job, minutes (requeued after it)")
    g.add_argument("--account", default=None)
    g.add_argument("--constraint", default=None)
    g.add_argument("--cpus-per-task", type=int, default=10)
    g.add_argument("--mem-gb", type=int, default=None)
    g.add_argument("--dry-run", action="store_true", help="print what would be submitted, submit nothing")


def slurm_options(a: argparse.Namespace) -> SlurmOptions:
    return SlurmOptions(nodes=a.nodes, gpus_per_node=a.gpus_per_node, partition=a.partition, time_min=a.time,
                        account=a.account, constraint=a.constraint, cpus_per_task=a.cpus_per_task, mem_gb=a.mem_gb)


def strip_launcher_args(argv: Sequence[str]) -> List[str]:
    """``argv`` without the launcher flags (``--nodes 2``, ``--nodes=2``, ``--dry-run``): the job's own command."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in _FLAGS:
            skip = _FLAGS[name] and "=" not in a
            continue
        out.append(a)
    return out


def _torchrun_env() -> None:
    """The variables torchrun sets, from the SLURM (or submitit local) job environment."""
    import submitit

    env = submitit.JobEnvironment()
    try:
        master = env.hostnames[0]
    except Exception:  # noqa: BLE001  (the local executor has no node list)
        master = "127.0.0.1"
    os.environ.update(RANK=str(env.global_rank), LOCAL_RANK=str(env.local_rank), WORLD_SIZE=str(env.num_tasks),
                      MASTER_ADDR=master, MASTER_PORT=str(20000 + int(str(env.job_id).split("_")[0]) % 20000))


class EntryJob:
    """One submitted command: ``function(argv)`` of the Python ``script`` (its ``__main__`` block is not run),
    in every task of the job.

    A ``submitit.helpers.Checkpointable`` in behaviour (submitit calls :meth:`checkpoint` on preemption and
    time-out); written without subclassing it so that this module imports without submitit installed.
    """

    def __init__(self, script: str, argv: Sequence[str], resume_args: Sequence[str] = (), function: str = "main"):
        self.script, self.argv, self.resume_args, self.function = str(script), list(argv), list(resume_args), function

    def __call__(self) -> int:
        _torchrun_env()
        # the script's globals, not its __main__ block: submitit's requeue exits through SystemExit and
        # must not be mistaken for the entry's own exit status
        code = runpy.run_path(self.script, run_name="__submitit__")[self.function](self.argv)
        if code:
            raise RuntimeError(f"{self.script} {shlex.join(self.argv)} exited with status {code}")
        return int(code or 0)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Requeue the same command, resuming from its last checkpoint."""
        from submitit.helpers import DelayedSubmission

        argv = self.argv if set(self.resume_args) <= set(self.argv) else [*self.resume_args, *self.argv]
        return DelayedSubmission(EntryJob(self.script, argv, self.resume_args, self.function))


def make_executor(folder: Path, opts: SlurmOptions, name: str, cluster: Optional[str] = None) -> Any:
    """submitit's executor for ``opts`` (``cluster="local"``: its local executor, for tests)."""
    import submitit

    ex = submitit.AutoExecutor(folder=str(folder / "%j"), cluster=cluster, slurm_max_num_timeout=opts.max_requeues)
    params = dict(name=name, nodes=opts.nodes, tasks_per_node=opts.gpus_per_node, gpus_per_node=opts.gpus_per_node,
                  cpus_per_task=opts.cpus_per_task, timeout_min=opts.time_min)
    if ex.cluster == "slurm":
        params.update(slurm_signal_delay_s=opts.signal_delay_s, slurm_partition=opts.partition,
                      slurm_account=opts.account, slurm_constraint=opts.constraint)
        if opts.mem_gb:
            params["mem_gb"] = opts.mem_gb
    else:  # the local executor has no GPUs to share out, and no partition/account
        params.update(gpus_per_node=0, tasks_per_node=1)
    ex.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return ex


def describe(script: str, argv: Sequence[str], opts: SlurmOptions, name: str, folder: Path) -> str:
    """What ``--dry-run`` prints: the command and the sbatch header submitit would write."""
    command = f"{sys.executable} {script} {shlex.join(argv)}"
    text = f"job {name}: {command}\n"
    try:  # submitit's own sbatch writer (private API: fall back to the parameters if it moves)
        from submitit.slurm.slurm import _make_sbatch_string

        sbatch = _make_sbatch_string(command=command, folder=str(folder / "%j"), job_name=name,
                                     partition=opts.partition, time=opts.time_min, nodes=opts.nodes,
                                     ntasks_per_node=opts.gpus_per_node, gpus_per_node=opts.gpus_per_node,
                                     cpus_per_task=opts.cpus_per_task, account=opts.account,
                                     constraint=opts.constraint, signal_delay_s=opts.signal_delay_s,
                                     mem=f"{opts.mem_gb}GB" if opts.mem_gb else None)
        text += "\n".join(line for line in sbatch.splitlines() if line.startswith("#SBATCH")) + "\n"
    except Exception:  # noqa: BLE001
        text += json.dumps(asdict(opts)) + "\n"
    return text


def submit(jobs: Sequence[tuple], opts: SlurmOptions, output: Path, script: str, resume_args: Sequence[str] = (),
           dry_run: bool = False, cluster: Optional[str] = None, function: str = "main") -> List[Any]:
    """Submit ``jobs`` (``[(name, argv)]``) of ``script``; returns submitit's job handles (``[]`` on a dry run).

    Each submission is appended to ``output/slurm/submissions.jsonl``: job id, name, command, parameters.
    """
    folder = Path(output) / "slurm"
    if dry_run:
        for name, argv in jobs:
            print(describe(script, argv, opts, name, folder))
        return []
    folder.mkdir(parents=True, exist_ok=True)
    handles = []
    for name, argv in jobs:
        ex = make_executor(folder, opts, name, cluster)
        job = ex.submit(EntryJob(script, argv, resume_args, function))
        handles.append(job)
        rec = {"job_id": job.job_id, "name": name, "command": f"{script} {shlex.join(argv)}",
               "resume_args": list(resume_args), "options": asdict(opts), "logs": str(folder / str(job.job_id)),
               "submitted_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        with open(folder / "submissions.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(f"submitted {name}: job {job.job_id} (logs: {folder / str(job.job_id)})")
    return handles
