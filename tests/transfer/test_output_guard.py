"""No silent failure around run_all's outputs: a directory as --weights, an --output below a file, Ctrl-C in a
trial, and one writer per trial folder (a lock another live process holds skips the trial; a dead one's is taken
over). The trials are a test engine's, registered for the test: each takes milliseconds."""
from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest
import torch

from pretrain.utils.outputs import LOCK_NAME, DirLock
from transfer.engines.torchvision.trial_checkpoint import TrialCheckpoint
from transfer.registry import TASKS, Engine, TaskSpec, register_engine, register_task
from transfer.run_all import main


def _ok(cfg, weights, ctx):
    return {"top1": 1.0}


def _ctrl_c_after_checkpoint(cfg, weights, ctx):
    TrialCheckpoint(ctx.output_dir / "checkpoint.pth", None).save(torch.nn.Linear(1, 1), None, stage="train",
                                                                  iteration=3, losses={})
    raise KeyboardInterrupt


def _ctrl_c_at_once(cfg, weights, ctx):
    raise KeyboardInterrupt


RECIPES = {"guard_ok": _ok, "guard_ctrl_c": _ctrl_c_after_checkpoint, "guard_ctrl_c_early": _ctrl_c_at_once}


@pytest.fixture
def guard_tasks(restore_registry):
    knn = TASKS["imagenet_knn"]
    register_engine(Engine("guard", "the test's engine: one recipe per task", dict(RECIPES)))
    for name in RECIPES:
        register_task(TaskSpec(name=name, family="classification", schema=knn.schema, config_file=knn.config_file,
                               metrics=("top1",), recipe=name))


def _args(out: Path, task: str):
    return ["--weights", "random", "--arch", "resnet18", "--tasks", task, "--preset", "smoke", "--engine", "guard",
            "--output", str(out), "--data-root", str(out), "--no-report"]


def _trial(out: Path, task: str) -> Path:
    return out / "random-resnet18" / task / "guard" / "trial0"


def test_a_directory_as_weights_is_named_as_such(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    assert main(["--weights", str(folder), "--output", str(tmp_path / "out"), "--tasks", "voc07_det"]) == 2
    assert f"cannot load --weights {folder}: CheckpointError: {folder} is a directory, not a checkpoint file\n" \
        in (tmp_path / "out" / "run_all.log").read_text()


def test_an_output_below_a_file_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "somefile").write_text("x")
    out = tmp_path / "somefile" / "results"
    assert main(["--weights", "random", "--output", str(out)]) == 2
    assert capsys.readouterr().err == (f"error: --output {out} cannot be created: {tmp_path / 'somefile'} is a file, "
                                       "not a folder (choose another --output or move that file)\n")


@pytest.mark.parametrize("task, where", [
    ("guard_ctrl_c", "; rerun the same command to resume it from its checkpoint at iteration 3 (train, checkpoint.pth)"),
    ("guard_ctrl_c_early", " before its first checkpoint; rerun the same command to run it again"),
])
def test_ctrl_c_in_a_trial_names_it_and_exits_130(guard_tasks, tmp_path, capsys, task, where):
    out = tmp_path / "out"
    assert main(_args(out, task)) == 130
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == f"interrupted: {task} trial 0 (engine guard) stopped{where}"
    assert "Traceback" not in err
    assert not (_trial(out, task) / "metrics.json").exists()  # not finished: the rerun resumes it
    assert not (_trial(out, task) / LOCK_NAME).exists()  # released


def test_a_trial_locked_by_a_live_process_is_skipped_and_said(guard_tasks, tmp_path, capsys):
    out = tmp_path / "out"
    lock = _trial(out, "guard_ok") / LOCK_NAME
    lock.parent.mkdir(parents=True)
    held = {"host": socket.gethostname(), "pid": os.getpid(), "started_at": "2024-01-01T00:00:00+00:00"}
    lock.write_text(json.dumps(held))
    assert main(_args(out, "guard_ok")) == 1  # not finished here
    holder = f"host {held['host']} pid {os.getpid()} since 2024-01-01T00:00:00+00:00 ({lock})"
    assert (f"guard_ok trial 0 (engine guard): another process is running this trial: {holder}; skipped here\n"
            in (out / "run_all.log").read_text())
    [line] = [x for x in capsys.readouterr().out.splitlines() if x.startswith("guard_ok")]
    assert line.split()[:3] == ["guard_ok", "0", "held"] and f"pid {os.getpid()}" in line
    assert not (lock.parent / "metrics.json").exists()
    assert json.loads(lock.read_text()) == held  # the holder's lock is left alone


def test_a_dead_processes_lock_is_taken_over_and_released(guard_tasks, tmp_path):
    out = tmp_path / "out"
    lock = _trial(out, "guard_ok") / LOCK_NAME
    lock.parent.mkdir(parents=True)
    proc = subprocess.Popen(["true"])
    proc.wait()  # its PID now names no process
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": proc.pid, "started_at": "T0"}))
    assert main(_args(out, "guard_ok")) == 0
    assert (f"{lock}: stale lock of host {socket.gethostname()} pid {proc.pid} since T0 (that process no longer "
            "runs): taken over\n") in (out / "run_all.log").read_text()
    assert json.loads((lock.parent / "metrics.json").read_text())["status"] == "ok"
    assert not lock.exists()


def test_a_lock_of_another_host_is_never_taken(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": "elsewhere", "pid": 1, "started_at": "T0"}))
    assert DirLock(tmp_path).acquire() == f"host elsewhere pid 1 since T0 ({tmp_path / LOCK_NAME})"
    mine = DirLock(tmp_path / "free")
    assert mine.acquire() is None and json.loads(mine.path.read_text())["pid"] == os.getpid()
    assert DirLock(tmp_path / "free").acquire().startswith(f"host {socket.gethostname()} pid {os.getpid()} since ")
    mine.release()
    assert not mine.path.exists()


def test_a_lock_of_an_earlier_run_of_this_slurm_job_is_taken_over(tmp_path, monkeypatch):
    """A requeued SLURM job keeps its job id and may start on another node: its earlier lock is stale."""
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": "elsewhere", "pid": 1, "slurm_job_id": "4242"}))
    lock = DirLock(tmp_path)
    assert lock.acquire() is None and lock.taken_over == (
        f"{tmp_path / LOCK_NAME}: stale lock of host elsewhere pid 1 since ? (an earlier run of this SLURM job 4242): "
        "taken over")
    assert json.loads(lock.path.read_text())["slurm_job_id"] == "4242"
    monkeypatch.setenv("SLURM_JOB_ID", "7")  # another job's lock holds
    assert DirLock(tmp_path).acquire() == f"host {socket.gethostname()} pid {os.getpid()} since " \
        f"{json.loads(lock.path.read_text())['started_at']} ({lock.path})"


def test_watch_evaluates_a_checkpoint_again_while_another_process_holds_a_trial(guard_tasks, tmp_path):
    import torchvision

    from pretrain.utils.io import sha256_file

    run = tmp_path / "pretrain"
    run.mkdir()
    (run / "config.yaml").write_text("optim:\n  epochs: 1\n  iterations: 0\n")
    sd = torchvision.models.resnet18().state_dict()
    torch.save({"epoch": 1, "arch": "resnet18", "state_dict": {f"module.encoder_q.{k}": v for k, v in sd.items()}},
               run / "checkpoint_0001.pth")
    out = tmp_path / "watch"
    name = f"ep0001-{sha256_file(run / 'checkpoint_0001.pth')[:8]}"
    lock = out / name / "guard_ok" / "guard" / "trial0" / LOCK_NAME
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started_at": "T0"}))
    args = ["--watch", str(run), "--once", "--tasks", "guard_ok", "--engine", "guard", "--preset", "smoke",
            "--output", str(out), "--data-root", str(out), "--no-report"]
    assert main(args) == 0
    assert "trials held by another process; evaluated again at the next look" in (out / "run_all.log").read_text()
    assert not (out / "watch_state.json").exists()  # not recorded as evaluated
    lock.unlink()  # the other process ended (without finishing this trial)
    assert main(args) == 0
    [rec] = json.loads((out / "watch_state.json").read_text())["evaluated"].values()
    assert rec["metrics"] == {"guard_ok": {"top1": 1.0}}
