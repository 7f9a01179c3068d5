"""The linear probe interrupted at three moments (right after a mid-epoch checkpoint, before a later checkpoint
is written, during an evaluation) and resumed each time ends with exactly the history and metrics of an
uninterrupted run (CPU); so does one resumed from the checkpoint layout older code wrote; a checkpoint of
another protocol is refused.

The interruptions are exact and in-process: the trial checkpoint's writer or the probe's evaluation raises
:class:`Killed` (not an ``Exception``: the suite's runner records no result, as for a killed process) at its
n-th call; the next run in the same process resumes from the files alone. A real kill of a whole job (SIGUSR2,
requeue) is tests/transfer/test_slurm.py's."""
import json
from pathlib import Path

import pytest
import torch

from pretrain.data.synthetic import make_imagenet_folders
from transfer.engines.torchvision import trial_checkpoint
from transfer.engines.torchvision.classification import linear
from transfer.run_all import main

EPOCHS, ITERS = 5, 4  # 16 train images, batch 4; evaluations after epochs 2, 4 and 5
TRIAL = Path("random-resnet18/imagenet_linear/torchvision/trial0")

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class Killed(BaseException):
    """Stands for SIGKILL: no ``except Exception`` catches it."""


def _args(data: Path, out: Path, *extra: str):
    return ["--weights", "random", "--arch", "resnet18", "--tasks", "imagenet_linear", "--preset", "smoke",
            "--data-root", str(data), "--output", str(out), "--no-report", "data.image_size=16",
            "data.resize_size=16", "solver.batch_size=4", f"solver.epochs={EPOCHS}", "solver.steps=[3]",
            "solver.eval_period_epochs=2", "solver.checkpoint_period=1", *extra]


def _position(ckpt: Path):
    c = torch.load(ckpt, weights_only=True)
    return int(c["extra"]["epoch"]), int(c["iteration"])


def _killed(monkeypatch, args, where: str, n: int) -> None:
    """One run of the suite, interrupted at the n-th checkpoint write (``before_save``: the file is not written;
    ``after_save``: it is) or at the n-th evaluation (``eval``)."""
    calls = {"save": 0, "eval": 0}
    save, evaluate = trial_checkpoint.atomic_torch_save, linear.evaluate

    def counted_save(*a, **k):
        calls["save"] += 1
        if where == "before_save" and calls["save"] == n:
            raise Killed
        save(*a, **k)
        if where == "after_save" and calls["save"] == n:
            raise Killed

    def counted_eval(*a, **k):
        calls["eval"] += 1
        if where == "eval" and calls["eval"] == n:
            raise Killed
        return evaluate(*a, **k)

    with monkeypatch.context() as m:
        m.setattr(trial_checkpoint, "atomic_torch_save", counted_save)
        m.setattr(linear, "evaluate", counted_eval)
        with pytest.raises(Killed):
            main(args)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return make_imagenet_folders(root / "imagenet", num_classes=2, train_per_class=8, val_per_class=8,
                                 image_size=16).parent


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The uninterrupted run's history and metrics."""
    out = tmp_path_factory.mktemp("ref")
    assert main(_args(data, out)) == 0
    return (json.loads((out / TRIAL / "history.json").read_text()),
            json.loads((out / TRIAL / "metrics.json").read_text())["metrics"])


def _same_as(reference, out: Path) -> None:
    history, metrics = reference
    assert json.loads((out / TRIAL / "history.json").read_text()) == history  # losses, lrs, accuracies, exactly
    assert json.loads((out / TRIAL / "metrics.json").read_text())["metrics"] == metrics


def test_killed_three_times_and_resumed_equals_uninterrupted(tmp_path, data, reference, monkeypatch):
    out = tmp_path / "killed"
    ckpt = out / TRIAL / linear.CHECKPOINT
    _killed(monkeypatch, _args(data, out), "after_save", 2)  # right after a mid-epoch checkpoint
    assert _position(ckpt) == (0, 2)
    # resumed at (0, 2): one write per iteration and one per epoch end; the 11th would hold (2, 3): lost
    _killed(monkeypatch, _args(data, out), "before_save", 11)
    assert _position(ckpt) == (2, 2)
    # the last iteration of epoch 4 is saved, then its evaluation runs: interrupted there
    _killed(monkeypatch, _args(data, out), "eval", 1)
    assert _position(ckpt) == (3, ITERS)
    assert main(_args(data, out)) == 0
    assert (out / TRIAL / "log.txt").read_text().count("resumed linear training") == 3
    _same_as(reference, out)


def test_a_killed_trial_of_the_older_checkpoint_layout_resumes(tmp_path, data, reference, monkeypatch):
    out = tmp_path / "old"
    ckpt = out / TRIAL / linear.CHECKPOINT
    _killed(monkeypatch, _args(data, out), "after_save", 7)  # (1, 2)
    new = torch.load(ckpt, weights_only=True)
    e = new["extra"]
    # what the probe wrote before it used trial checkpoints (its save(), key for key)
    torch.save({"epoch": e["epoch"], "iteration": new["iteration"], "fc": new["model"],
                "optimizer": new["optimizer"], "backbone_digest": e["backbone_digest"], "history": e["history"],
                "loss_sum": e["loss_sum"], "seen": e["seen"], "protocol": new["protocol"]}, ckpt)
    assert main(_args(data, out)) == 0
    log = (out / TRIAL / "log.txt").read_text()
    assert "has an older layout" in log and "resumed linear training" in log and "after 1 epochs and 2 " in log
    _same_as(reference, out)
    assert "stage" in torch.load(ckpt, weights_only=True)  # rewritten in today's layout


def test_a_checkpoint_of_another_protocol_is_refused(tmp_path):
    data = make_imagenet_folders(tmp_path / "data" / "imagenet", num_classes=2, train_per_class=2,
                                 val_per_class=1, image_size=16).parent
    out = tmp_path / "out"
    trial = out / TRIAL
    quick = ["solver.epochs=2", "solver.steps=[1]"]
    assert main(_args(data, out, *quick)) == 0
    (trial / "metrics.json").unlink()  # as if killed before the end: the checkpoint stays
    assert main(_args(data, out, *quick, "solver.base_lr=0.5")) == 1
    err = json.loads((trial / "metrics.json").read_text())["error"]
    assert err.startswith("ProtocolChangedError") and "differs in: config" in err and "choose another --output" in err
