"""A results tree written before the one-vocabulary rename (tests/fixtures/results_before_vocabulary, written by
commit d0cb4aa: old config names, trials in ``<task>/trial<k>``) keeps working: the same command skips its
finished trials, the tables average its trials with new ones, and a killed trial's checkpoint resumes."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from transfer.engines.torchvision import trial_checkpoint
from transfer.report import write_tables
from transfer.run_all import main

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "results_before_vocabulary"
OLD_ARGS = (FIXTURE / "COMMAND_ARGS.txt").read_text().split()  # in the old names (data.workers=0, optim.*, ...)
TASKS = "voc07_det,coco_c4_1x,voc_semseg,imagenet_linear,imagenet_knn"

pytestmark = pytest.mark.usefixtures("one_thread")


def _old_tree(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(FIXTURE / "random", out / "random")
    return out


def _run(out: Path, *args: str) -> int:
    """The fixture's command for the tasks of ``--tasks`` (with their overrides, in the old names)."""
    tasks = args[args.index("--tasks") + 1].split(",")
    mine = [a for a in OLD_ARGS if a.split(".")[0] in tasks or a.split(".")[0] not in TASKS.split(",")]
    flags = [a for a in args if a.startswith("--") or "=" not in a]
    overrides = [a for a in args if a not in flags]  # after the fixture's: these win
    return main(["--weights", "random", "--arch", "resnet18", "--name", "random", "--preset", "smoke",
                 "--output", str(out), "--engine", "torchvision", "--no-report", *flags, *mine, *overrides])


def _record(out: Path, task: str, trial: int) -> dict:
    [path] = [p for p in (out / "random" / task).glob(f"**/trial{trial}/metrics.json")]
    return json.loads(path.read_text())


def _log(out: Path) -> str:
    return (out / "run_all.log").read_text()


def test_the_same_command_skips_the_finished_trials(tmp_path):
    out = _old_tree(tmp_path)
    before = {t: _record(out, t, 0) for t in TASKS.split(",")}
    # no data at all: a trial that were not recognised as finished would fail its dataset check
    assert _run(out, "--tasks", TASKS, "--data-root", str(tmp_path / "no_data")) == 0
    for task, rec in before.items():
        assert f"{task} trial 0: finished before, skipped" in _log(out)
        assert _record(out, task, 0) == rec  # read where it is, never rewritten
    assert not list(out.glob("random/*/torchvision"))  # no second copy in today's folders


def test_old_and_new_trials_average_together(tmp_path):
    out = _old_tree(tmp_path)
    assert _run(out, "--tasks", "imagenet_knn", "--trials", "2") == 0
    old, new = _record(out, "imagenet_knn", 0), _record(out, "imagenet_knn", 1)
    assert "results_version" not in old and new["results_version"] >= 2 and new.get("skipped") is None
    assert (out / "random" / "imagenet_knn" / "torchvision" / "trial1" / "metrics.json").is_file()
    write_tables(out, reference=False)
    rows = pd.read_csv(out / "tables.csv")
    top1 = rows[(rows["task"] == "imagenet_knn") & (rows["metric"] == "top1")]
    assert top1["protocol_hash"].nunique() == 1  # one protocol group: the old trial and the new one
    stat = {s: top1[top1["statistic"] == s]["value"].tolist() for s in ("trial", "mean", "n")}
    assert stat["n"] == [2.0] and sorted(stat["trial"]) == sorted([old["metrics"]["top1"], new["metrics"]["top1"]])
    assert stat["mean"][0] == pytest.approx((old["metrics"]["top1"] + new["metrics"]["top1"]) / 2, abs=1e-6)


class _Killed(RuntimeError):
    pass


def test_a_killed_trial_of_the_old_tree_resumes(tmp_path, monkeypatch):
    """The fixture's killed ``voc07_det`` trial 1 held a checkpoint with the old names' protocol (its
    ``checkpoint_protocol.json``): a checkpoint written now, given that protocol, is continued, and the
    trial ends where an uninterrupted one does."""
    data = tmp_path / "data"
    args = ("--tasks", "voc07_det", "--trials", "2", "--only-trial", "1", "--data-root", str(data),
            "voc07_det.solver.checkpoint_period=1", "voc07_det.solver.iterations=3")  # as the killed trial ran
    clean = tmp_path / "clean"
    from transfer.tasks.voc_det import make_synthetic

    make_synthetic(data)
    assert _run(clean, *args) == 0
    want = _record(clean, "voc07_det", 1)

    out = _old_tree(tmp_path)
    save = trial_checkpoint.atomic_torch_save

    def save_then_die(obj, path):
        save(obj, path)
        raise _Killed("killed after the first checkpoint")

    monkeypatch.setattr(trial_checkpoint, "atomic_torch_save", save_then_die)
    assert _run(out, *args) == 1
    monkeypatch.setattr(trial_checkpoint, "atomic_torch_save", save)
    [ckpt] = list((out / "random" / "voc07_det").glob("**/trial1/checkpoint.pth"))
    old = json.loads((FIXTURE / "random" / "voc07_det" / "trial1" / "checkpoint_protocol.json").read_text())
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["iteration"] == old["iteration"] == 1
    state["protocol"] = old["protocol"]  # as the old code wrote it: train_sets, test_set, ...
    torch.save(state, ckpt)
    (out / "run_all.log").unlink()
    assert _run(out, *args) == 0
    assert "resuming the trial from" in _log(out) and "(train, iteration 1)" in _log(out)
    got = _record(out, "voc07_det", 1)
    assert got["status"] == "ok" and got["metrics"] == want["metrics"]
