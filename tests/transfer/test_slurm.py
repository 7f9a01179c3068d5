"""``--launcher slurm`` through submitit: what a dry run would submit, and with submitit's local executor (no
SLURM here) a job that is preempted and requeued resumes from its checkpoint."""
import json
import os
import runpy
import signal
import time
from pathlib import Path

import pytest
import torch

from pretrain.data.synthetic import make_imagenet_folders
from pretrain.utils import slurm
from transfer.run_all import main

pytest.importorskip("submitit")


def test_dry_run_prints_one_job_per_task_and_submits_nothing(tmp_path, capsys):
    code = main(["--weights", "random", "--tasks", "voc07_det,imagenet_knn", "--output", str(tmp_path),
                 "--launcher", "slurm", "--nodes", "2", "--gpus-per-node", "8", "--partition", "learnfair",
                 "--time", "600", "--account", "moco", "--constraint", "volta32gb", "--dry-run",
                 "solver.iterations=10"])
    out = capsys.readouterr().out
    assert code == 0 and not (tmp_path / "slurm").exists()
    jobs = [line for line in out.splitlines() if line.startswith("job ")]
    assert [j.split(":")[0] for j in jobs] == ["job voc07_det", "job imagenet_knn"]
    assert "--tasks voc07_det --weights random" in jobs[0] and "--launcher" not in jobs[0] and "--dry-run" not in out
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=learnfair", "#SBATCH --time=600", "#SBATCH --account=moco",
                 "#SBATCH --constraint=volta32gb", "#SBATCH --signal=USR2@120"):
        assert line in out


def test_per_trial_jobs(tmp_path, capsys):
    assert main(["--weights", "random", "--tasks", "voc07_det", "--output", str(tmp_path), "--launcher", "slurm",
                 "--slurm-per", "trial", "--dry-run"]) == 0
    jobs = [line for line in capsys.readouterr().out.splitlines() if line.startswith("job ")]
    assert len(jobs) == 5 and "--only-trial 4" in jobs[-1]  # VOC's protocol: 5 trials, a job each


def test_all_tasks_submits_only_what_an_engine_here_can_run(tmp_path, capsys):
    from transfer.registry import task_order

    assert main(["--weights", "random", "--tasks", "all", "--output", str(tmp_path), "--launcher", "slurm",
                 "--engine", "torchvision", "--dry-run"]) == 0
    captured = capsys.readouterr()
    jobs = [line.split(":")[0][len("job "):] for line in captured.out.splitlines() if line.startswith("job ")]
    assert "coco_densepose" in task_order() and "voc07_det" in jobs
    assert "coco_densepose" not in jobs  # Detectron2-only: never on --engine torchvision
    assert "not submitted: coco_densepose" in captured.err
    assert sorted(jobs + ["coco_densepose"]) == sorted(task_order())


def test_strip_launcher_args():
    argv = ["--weights", "w", "--launcher=slurm", "--nodes", "2", "--dry-run", "--partition", "p", "a.b=1"]
    assert slurm.strip_launcher_args(argv) == ["--weights", "w", "a.b=1"]


@pytest.mark.timeout(240)
def test_local_executor_job_preempted_requeued_and_resumed(tmp_path, monkeypatch):
    data = make_imagenet_folders(tmp_path / "data" / "imagenet", num_classes=2, train_per_class=2, val_per_class=1,
                                 image_size=16).parent
    handles = []

    def local_submit(*args, **kwargs):
        handles.extend(submit(*args, **kwargs, cluster="local"))
        return handles

    submit = slurm.submit
    monkeypatch.setattr(slurm, "submit", local_submit)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the job inherits it: no oversubscription of a shared CPU
    out = tmp_path / "res"
    epochs = 300  # about 15 ms each: the preemption below, past the middle, lands seconds before the job ends
    assert main(["--weights", "random", "--arch", "resnet18", "--tasks", "imagenet_linear", "--preset", "smoke",
                 "--data-root", str(data), "--output", str(out), "--no-report", "--launcher", "slurm",
                 "--gpus-per-node", "1", "data.image_size=16", "data.resize_size=16",
                 f"solver.epochs={epochs}", "solver.steps=[1000]"]) == 0
    (job,) = handles
    try:
        _preempt_and_check(job, out, epochs)
    finally:
        job.cancel(check=False)  # never leave the job running after a failed assertion


def _epochs_done(ckpt: Path) -> int:
    """The epochs a linear probe's trial checkpoint holds (0 before the first; it is replaced atomically)."""
    return int(torch.load(ckpt, weights_only=True)["extra"]["epoch"]) if ckpt.is_file() else 0


def _preempt_and_check(job, out, epochs):
    trial = out / "random-resnet18" / "imagenet_linear" / "torchvision" / "trial0"
    ckpt, deadline = trial / "linear_checkpoint.pth", time.time() + 150
    # preempted past the middle: the requeued job redoes few epochs (a test's seconds), yet has many left
    while _epochs_done(ckpt) < epochs // 2 and time.time() < deadline:
        time.sleep(0.02)
    assert _epochs_done(ckpt) >= epochs // 2, job.stderr()
    # what SLURM does on preemption: USR2 to the job's task (submitit's local executor runs it as a child of
    # its controller process); submitit checkpoints, and the controller starts the requeued job
    (task,) = [int(p) for p in Path(f"/proc/{job._process.pid}/task/{job._process.pid}/children").read_text().split()]
    os.kill(task, signal.SIGUSR2)
    job.wait()
    log = (trial / "log.txt").read_text()
    assert "resumed linear training" in log, job.stdout()
    assert "preempted" in job.stderr() and "Requeued" in job.stderr()
    rec = json.loads((trial / "metrics.json").read_text())
    assert rec["status"] == "ok"
    assert [h["epoch"] for h in json.loads((trial / "history.json").read_text())] == list(range(epochs))
    sub = json.loads((out / "slurm" / "submissions.jsonl").read_text().splitlines()[0])
    assert sub["job_id"] == job.job_id and "--tasks imagenet_linear" in sub["command"]


def test_pretraining_is_one_job_requeued_with_resume_auto(tmp_path, capsys):
    root = Path(__file__).resolve().parents[2]
    script = root / "tools" / "train_moco.py"
    ns = runpy.run_path(str(script), run_name="__submitit__")  # the entry point as the job loads it
    argv = ["--config", str(root / "configs" / "pretrain" / "smoke.yaml"), f"run.output_dir={tmp_path}"]
    assert ns["cli"](["--launcher", "slurm", "--nodes", "4", "--dry-run", *argv]) == 0
    out = capsys.readouterr().out
    assert out.count("job moco_pretrain:") == 1 and "#SBATCH --nodes=4" in out
    requeued = slurm.EntryJob(str(script), argv, ["--resume", "auto"], "cli").checkpoint()
    assert requeued.function.argv == ["--resume", "auto", *argv] and requeued.function.function == "cli"
    # requeued twice: --resume auto is not repeated
    assert requeued.function.checkpoint().function.argv == requeued.function.argv
