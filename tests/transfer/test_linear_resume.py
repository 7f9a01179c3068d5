"""The linear probe killed with SIGKILL at three moments (right after a mid-epoch checkpoint, at an arbitrary
later moment, during an evaluation) and resumed each time ends with exactly the history and metrics of an
uninterrupted run (CPU); a checkpoint of another protocol is refused."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pretrain.data.synthetic import make_imagenet_folders
from transfer.run_all import main

ROOT = Path(__file__).resolve().parents[2]
EPOCHS, ITERS = 15, 4  # 16 train images, batch 4


def _args(data: Path, out: Path, *extra: str):
    return ["--weights", "random", "--arch", "resnet18", "--tasks", "imagenet_linear", "--preset", "smoke",
            "--data-root", str(data), "--output", str(out), "--no-report", "data.image_size=16",
            "data.resize_size=16", "optim.batch_size=4", f"optim.epochs={EPOCHS}", "optim.lr_steps=[10]",
            "optim.eval_every=3", "optim.checkpoint_every=1", *extra]


def _position(ckpt: Path):
    try:
        c = torch.load(ckpt, weights_only=True)
        return int(c["epoch"]), int(c["iteration"])
    except Exception:  # noqa: BLE001  (not written yet)
        return None


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _run_until(args, ckpt: Path, stop, delay: float = 0.0) -> None:
    """Start the suite, SIGKILL it as soon as ``stop(epoch, iteration)`` holds for its checkpoint."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "transfer" / "run_all.py"), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        while proc.poll() is None:
            pos = _position(ckpt)
            if pos is not None and stop(*pos):
                time.sleep(delay)
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return
            time.sleep(0.005)
        pytest.fail(f"the run ended (status {proc.returncode}) before its kill point")
    finally:
        proc.kill()


@pytest.mark.timeout(300)
def test_killed_three_times_and_resumed_equals_uninterrupted(tmp_path):
    data = make_imagenet_folders(tmp_path / "data" / "imagenet", num_classes=2, train_per_class=8,
                                 val_per_class=8, image_size=16).parent
    assert main(_args(data, tmp_path / "ref")) == 0
    trial = "random-resnet18/imagenet_linear/trial0"
    ref = json.loads((tmp_path / "ref" / trial / "history.json").read_text())

    out = tmp_path / "killed"
    ckpt = out / trial / "linear_checkpoint.pth"
    _run_until(_args(data, out), ckpt, lambda e, i: e == 0 and i >= 1)  # right after a mid-epoch checkpoint
    assert _position(ckpt)[0] == 0
    _run_until(_args(data, out), ckpt, lambda e, i: e >= 4, delay=random.Random(0).uniform(0, 0.05))  # anywhere
    # the last iteration of epoch 9 is saved, then its evaluation runs (eval_every 3): kill there
    _run_until(_args(data, out), ckpt, lambda e, i: e == 8 and i == ITERS)
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
    trial = out / "random-resnet18" / "imagenet_linear" / "trial0"
    quick = ["optim.epochs=2", "optim.lr_steps=[1]"]
    assert main(_args(data, out, *quick)) == 0
    (trial / "metrics.json").unlink()  # as if killed before the end: the checkpoint stays
    assert main(_args(data, out, *quick, "optim.base_lr=0.5")) == 1
    err = json.loads((trial / "metrics.json").read_text())["error"]
    assert err.startswith("ProtocolChangedError") and "differs in: config" in err and "choose another --output" in err
