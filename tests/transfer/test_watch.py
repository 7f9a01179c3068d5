"""``run_all.py --watch``: each new checkpoint of a pretraining run evaluated once, restarts survived, a
table and a plot of the metric against the pretraining epoch."""
import csv
import json
from pathlib import Path

import pytest
import torch
import torchvision

from pretrain.data.synthetic import make_imagenet_folders
from transfer.run_all import main

import tiny  # tests/tiny.py


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _checkpoint(run: Path, epoch: int, seed: int) -> None:
    """A MoCo checkpoint in the official layout (query and key encoders of a ResNet-18)."""
    torch.manual_seed(seed)
    sd = torchvision.models.resnet18(num_classes=128).state_dict()
    state = {f"module.encoder_{e}.{k}": v for e in "qk" for k, v in sd.items()}
    torch.save({"epoch": epoch, "arch": "resnet18", "state_dict": state}, run / f"checkpoint_{epoch:04d}.pth")


def _table(out: Path) -> dict:
    rows = list(csv.DictReader(open(out / "watch.csv")))
    return {int(r["epoch"]): r for r in rows}


def test_watch_evaluates_new_checkpoints_once_and_survives_restarts(tmp_path):
    data = make_imagenet_folders(tmp_path / "data" / "imagenet", num_classes=2, train_per_class=3, val_per_class=2,
                                 image_size=16).parent
    run = tmp_path / "pretrain"
    run.mkdir()
    (run / "config.yaml").write_text("optim:\n  epochs: 3\n  iterations: 0\n")
    _checkpoint(run, 1, seed=1)
    _checkpoint(run, 2, seed=2)
    (run / "checkpoint_last.pth").write_bytes((run / "checkpoint_0002.pth").read_bytes())  # not periodic: ignored
    out = tmp_path / "watch"
    args = ["--watch", str(run), "--tasks", "imagenet_knn", "--preset", "smoke", "--data-root", str(data),
            "--output", str(out), "--no-report", "--poll", "0.1"]
    conf = [*tiny.overrides("imagenet_knn", prefixed=False), "knn.k=2", "knn.ks=[1,2]"]
    assert main(args + ["--once", *conf]) == 0
    state = json.loads((out / "watch_state.json").read_text())["evaluated"]
    assert sorted(r["epoch"] for r in state.values()) == [1, 2]
    first = {r["epoch"]: r["name"] for r in state.values()}
    assert set(_table(out)) == {1, 2} and (out / "watch.png").stat().st_size > 0
    assert _table(out)[2]["imagenet_knn/top1"] == str(state[next(s for s in state if state[s]["epoch"] == 2)]
                                                      ["metrics"]["imagenet_knn"]["top1"])
    ep1 = out / first[1] / "imagenet_knn" / "torchvision" / "trial0" / "metrics.json"
    mtime = ep1.stat().st_mtime

    # the pretraining restarts from scratch: epoch 2 is rewritten with other weights, then epoch 3 (the last)
    # appears; the watcher (restarted too) evaluates both, skips epoch 1, and stops after the last epoch
    _checkpoint(run, 2, seed=3)
    _checkpoint(run, 3, seed=4)
    assert main(args + conf) == 0
    state = json.loads((out / "watch_state.json").read_text())["evaluated"]
    assert sorted(r["epoch"] for r in state.values()) == [1, 2, 2, 3]
    assert ep1.stat().st_mtime == mtime  # not evaluated again
    names = {r["name"] for r in state.values() if r["epoch"] == 2}
    assert len(names) == 2  # the rewritten checkpoint is new weights, with its own results
    assert set(_table(out)) == {1, 2, 3}
    assert "| epoch | imagenet_knn/top1 | imagenet_knn/top5 |" in (out / "watch.md").read_text()


def test_watch_every_n_epochs(tmp_path):
    data = make_imagenet_folders(tmp_path / "data" / "imagenet", num_classes=2, train_per_class=2, val_per_class=1,
                                 image_size=16).parent
    run = tmp_path / "pretrain"
    run.mkdir()
    for e in (1, 2, 3):
        _checkpoint(run, e, seed=e)
    out = tmp_path / "watch"
    assert main(["--watch", str(run), "--every", "2", "--once", "--tasks", "imagenet_knn", "--preset", "smoke",
                 "--data-root", str(data), "--output", str(out), "--no-report",
                 *tiny.overrides("imagenet_knn", prefixed=False), "knn.k=1", "knn.ks=[1]"]) == 0
    assert set(_table(out)) == {2}
