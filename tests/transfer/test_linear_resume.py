"""The linear probe killed with SIGKILL at three moments (right after a mid-epoch checkpoint, before a later
checkpoint is written, during an evaluation) and resumed each time ends with exactly the history and metrics of
an uninterrupted run (CPU); a checkpoint of another protocol is refused.

The kill points are exact: a driver process wraps the probe's checkpoint writer and evaluation and kills itself
at the n-th call (polling the checkpoint file from outside misses points that last milliseconds)."""
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrain.data.synthetic import make_imagenet_folders
from transfer.run_all import main

ROOT = Path(__file__).resolve().parents[2]
EPOCHS, ITERS = 15, 4  # 16 train images, batch 4

# argv: WHERE N then run_all's arguments; WHERE: after_save / before_save (the n-th checkpoint write) or eval
DRIVER = r"""
import os, signal, sys
where, n = sys.argv[1], int(sys.argv[2])
from transfer.engines.torchvision.classification import linear

calls = {"save": 0, "eval": 0}
def die():
    os.kill(os.getpid(), signal.SIGKILL)

save, evaluate = linear.atomic_torch_save, linear.evaluate
def counted_save(*a, **k):
    calls["save"] += 1
    if where == "before_save" and calls["save"] == n:
        die()
    save(*a, **k)
    if where == "after_save" and calls["save"] == n:
        die()
def counted_eval(*a, **k):
    calls["eval"] += 1
    if where == "eval" and calls["eval"] == n:
        die()
    return evaluate(*a, **k)
linear.atomic_torch_save, linear.evaluate = counted_save, counted_eval

from transfer.run_all import main
sys.exit(main(sys.argv[3:]))
"""


def _args(data: Path, out: Path, *extra: str):
    return ["--weights", "random", "--arch", "resnet18", "--tasks", "imagenet_linear", "--preset", "smoke",
            "--data-root", str(data), "--output", str(out), "--no-report", "data.image_size=16",
            "data.resize_size=16", "solver.batch_size=4", f"solver.epochs={EPOCHS}", "solver.steps=[10]",
            "solver.eval_period_epochs=3", "solver.checkpoint_period=1", *extra]


def _position(ckpt: Path):
    c = torch.load(ckpt, weights_only=True)
    return int(c["epoch"]), int(c["iteration"])


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _killed(args, where: str, n: int) -> None:
    proc = subprocess.run([sys.executable, "-c", DRIVER, where, str(n), *args], cwd=ROOT, timeout=240,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]


@pytest.mark.timeout(300)
def test_killed_three_times_and_resumed_equals_uninterrupted(tmp_path):
    data = make_imagenet_folders(tmp_path / "data" / "imagenet", num_classes=2, train_per_class=8,
                                 val_per_class=8, image_size=16).parent
    assert main(_args(data, tmp_path / "ref")) == 0
    trial = "random-resnet18/imagenet_linear/torchvision/trial0"
    ref = json.loads((tmp_path / "ref" / trial / "history.json").read_text())

    out = tmp_path / "killed"
    ckpt = out / trial / "linear_checkpoint.pth"
    _killed(_args(data, out), "after_save", 2)  # right after a mid-epoch checkpoint
    assert _position(ckpt) == (0, 2)
    # resumed at (0, 2): one write per iteration and one per epoch end; the 21st would hold (4, 3): killed before it
    _killed(_args(data, out), "before_save", 21)
    assert _position(ckpt) == (4, 2)
    # the last iteration of epoch 9 is saved, then its evaluation runs (eval_every 3): kill there
    _killed(_args(data, out), "eval", 2)  # this run's second evaluation: epochs 6 and 9
    assert _position(ckpt) == (8, ITERS)
    assert main(_args(data, out)) == 0
    log = (out / trial / "log.txt").read_text()
    assert log.count("resumed linear training") == 3

    assert json.loads((out / trial / "history.json").read_text()) == ref  # losses, lrs and accuracies, exactly
    a, b = (json.loads((d / trial / "metrics.json").read_text())["metrics"] for d in (tmp_path / "ref", out))
    assert a == b


def test_a_checkpoint_of_another_protocol_is_refused(tmp_path):
    data = make_imagenet_folders(tmp_path / "data" / "imagenet", num_classes=2, train_per_class=2,
                                 val_per_class=1, image_size=16).parent
    out = tmp_path / "out"
    trial = out / "random-resnet18" / "imagenet_linear" / "torchvision" / "trial0"
    quick = ["solver.epochs=2", "solver.steps=[1]"]
    assert main(_args(data, out, *quick)) == 0
    (trial / "metrics.json").unlink()  # as if killed before the end: the checkpoint stays
    assert main(_args(data, out, *quick, "solver.base_lr=0.5")) == 1
    err = json.loads((trial / "metrics.json").read_text())["error"]
    assert err.startswith("ProtocolChangedError") and "differs in: config" in err and "choose another --output" in err
