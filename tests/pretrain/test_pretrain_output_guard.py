"""No silent failure around a pretraining's output folder: run.resume naming a directory, run.output_dir below a
file, Ctrl-C mid-epoch (one line naming the checkpoint to resume from, exit 130), and one writer per run.output_dir."""
from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

from pretrain_helpers import SMOKE, load_cli
from pretrain.checkpoint_writer import CheckpointWriter
from pretrain.config import load_pretrain_config
from pretrain.utils.config import ConfigError
from pretrain.utils.outputs import LOCK_NAME

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _tiny(data_root: Path, out: Path) -> list[str]:
    """tools/train_moco.py's arguments for one epoch of 4 iterations (64 images, batch 16), a checkpoint every 2."""
    return ["--config", str(SMOKE), f"data.root={data_root}", f"run.output_dir={out}", "data.image_size=32",
            "solver.batch_size=16", "data.num_workers=0", "model.queue_size=32", "model.shuffle_bn_splits=2",
            "solver.epochs=1", "solver.checkpoint_period=2", "run.tensorboard=false", "knn.period_epochs=0",
            "run.device=cpu"]


def test_a_directory_as_resume_is_named_as_such(tmp_path, capsys):
    with pytest.raises(ConfigError) as e:
        load_pretrain_config(SMOKE, [f"run.resume={tmp_path}"])
    assert str(e.value) == (f"run.resume={str(tmp_path)!r}: {tmp_path} is a directory, not a checkpoint file "
                            "(run.resume=auto resumes from the last checkpoint in run.output_dir)")
    assert load_cli()(["--config", str(SMOKE), "--resume", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: {e.value}\n"


def test_an_output_dir_below_a_file_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "somefile").write_text("x")
    out = tmp_path / "somefile" / "run"
    assert load_cli()(_tiny(tmp_path / "no_data", out)) == 2
    assert capsys.readouterr().err == (f"error: run.output_dir {out} cannot be created: {tmp_path / 'somefile'} is "
                                       "a file, not a folder (choose another run.output_dir or move that file)\n")


def test_ctrl_c_says_where_it_stopped_and_what_resumes_it(tmp_path, tiny_folders, capsys, monkeypatch):
    after_step = CheckpointWriter.after_step

    def ctrl_c_at_step_3(self, epoch, done, global_step, epoch_len):
        after_step(self, epoch, done, global_step, epoch_len)
        if global_step == 3:
            raise KeyboardInterrupt

    out = tmp_path / "run"
    monkeypatch.setattr(CheckpointWriter, "after_step", ctrl_c_at_step_3)
    assert load_cli()(_tiny(tiny_folders, out)) == 130
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (f"interrupted: pretraining in {out} stopped in epoch 1/1 after iteration 3/4 (global step 3); "
                    f"rerun the same command with --resume auto to resume it from {out / 'checkpoint_last.pth'} "
                    "(global step 2)")
    assert "Traceback" not in err and not (out / LOCK_NAME).exists()
    assert (out / "checkpoint_last.pth").is_file()  # what --resume auto continues from (tests/pretrain/test_pretrain_run.py)


def test_a_run_output_dir_locked_by_a_live_process_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    held = {"host": socket.gethostname(), "pid": os.getpid(), "started_at": "T0"}
    (out / LOCK_NAME).write_text(json.dumps(held))
    assert load_cli()(_tiny(tmp_path / "no_data", out)) == 2
    assert capsys.readouterr().err == (
        f"error: run.output_dir {out} is being written by another pretraining: host {held['host']} pid {os.getpid()} "
        f"since T0 ({out / LOCK_NAME}); wait for it to end or choose another run.output_dir\n")
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing written, the holder's lock kept
    assert json.loads((out / LOCK_NAME).read_text()) == held


def test_a_dead_runs_lock_is_taken_over_and_released(tmp_path, tiny_folders):
    out = tmp_path / "run"
    out.mkdir()
    proc = subprocess.Popen(["true"])
    proc.wait()  # its PID now names no process
    (out / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": proc.pid, "started_at": "T0"}))
    assert load_cli()(_tiny(tiny_folders, out) + ["solver.iterations=1"]) == 0
    assert (f"{out / LOCK_NAME}: stale lock of host {socket.gethostname()} pid {proc.pid} since T0 (that process no "
            "longer runs): taken over") in (out / "log.txt").read_text()
    assert (out / "checkpoint_last.pth").is_file() and not (out / LOCK_NAME).exists()
