"""Built-in detection and segmentation trials killed and rerun end with exactly the metrics (and the fine-tuned
weights) of an uninterrupted trial on CPU.

The kills are in-process and exact: the test wraps the engine's functions and raises :class:`Killed` at the n-th
training step, inside PreciseBN, while a checkpoint is being written (after the temporary file, before its
rename), and in the middle of the evaluation. ``Killed`` is a BaseException, which no ``except Exception`` of the
suite catches: like SIGKILL, it records no failure and writes no metrics.json; what a SIGKILL leaves on disk that
a raise would clean up (the temporary checkpoint file) is put back, and every attempt starts from the same global
RNG state, as a fresh process does. Each rerun must continue rather than restart: the test counts the training
and PreciseBN steps every attempt runs.
"""
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import tiny  # tests/tiny.py
from transfer.data.synthetic.voc import make_vocdevkit

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

PHASES = ("train", "precise_bn", "save", "eval")


class Killed(BaseException):
    """Stands in for SIGKILL (see the module docstring)."""


class Driver:
    """Runs ``transfer/run_all.py``'s main in this process with the engine's functions wrapped: counts the calls
    per phase, and kills the attempt at the n-th call of one phase (train and precise_bn: the n-th step of that
    phase; save: the n-th rename onto checkpoint.pth; eval: the n-th evaluated image)."""

    def __init__(self, monkeypatch):
        from transfer.engines.torchvision.detection import trainer
        from transfer.engines.torchvision.segmentation import semseg
        from transfer.evaluation import semseg as semseg_eval, voc as voc_eval

        self.phase, self.kill, self.at, self.counts, self.left_behind = "train", "none", 0, {}, None
        self._replace = os.replace

        def counted(fn, name):
            def wrapper(*a, **k):
                self._tick(self.phase if name is None else name)
                return fn(*a, **k)
            return wrapper

        def precise_bn(*a, **k):
            self.phase = "precise_bn"
            return original_pbn(*a, **k)

        def replace(src, dst):
            if str(dst).endswith("checkpoint.pth"):
                self._tick("save", keep=src)
            return self._replace(src, dst)

        original_pbn = trainer.precise_bn
        monkeypatch.setattr(trainer, "train_step", counted(trainer.train_step, None))
        monkeypatch.setattr(semseg, "_train_step", counted(semseg._train_step, None))
        monkeypatch.setattr(voc_eval.VOCDetectionEvaluator, "process",
                            counted(voc_eval.VOCDetectionEvaluator.process, "eval"))
        monkeypatch.setattr(semseg_eval.SemSegEvaluator, "process", counted(semseg_eval.SemSegEvaluator.process, "eval"))
        monkeypatch.setattr(trainer, "precise_bn", precise_bn)
        monkeypatch.setattr(os, "replace", replace)

    def _tick(self, name, keep=None):
        self.counts[name] += 1
        if name == self.kill and self.counts[name] == self.at:
            if keep is not None:  # the temporary file a SIGKILL leaves behind (atomic_path's finally removes it)
                self.left_behind = (Path(str(keep) + ".kept"), Path(keep))
                shutil.copyfile(keep, self.left_behind[0])
            raise Killed(f"{name} #{self.at}")

    def attempt(self, args, kill: str = "none", at: int = 0) -> dict:
        """Run the suite once; returns the steps it ran per phase and whether it was killed."""
        from transfer.run_all import main

        self.phase, self.kill, self.at, self.left_behind = "train", kill, at, None
        self.counts = dict.fromkeys(PHASES, 0)
        torch.manual_seed(0), random.seed(0), np.random.seed(0)  # a fresh process's RNGs are all the same
        try:
            main(args)
            killed = False
        except Killed:
            killed = True
        assert killed == (kill != "none"), (kill, at, self.counts)
        if self.left_behind is not None:
            self._replace(*self.left_behind)
        return {"killed": killed, **self.counts}


@pytest.fixture
def driver(monkeypatch):
    return Driver(monkeypatch)


ITERS, PERIOD, PBN = 6, 2, 3


def _voc_args(data: Path, out: Path, *extra: str):
    return ["--weights", "random", "--arch", "resnet18", "--tasks", "voc07_det", "--preset", "smoke",
            "--data-root", str(data), "--output", str(out), "--no-report", *tiny.overrides("voc07_det"),
            "input.min_size_train=[48]", "input.min_size_test=48",
            f"solver.iterations={ITERS}", "solver.steps=[4]", "solver.warmup_iters=2",
            f"solver.checkpoint_period={PERIOD}", f"precise_bn.num_iters={PBN}", "log_period=1",
            "data.max_unreadable_fraction=0.125", *extra]  # the one truncated JPEG of 8 (voc_root) is allowed


def _trial(out: Path, task: str) -> Path:
    return out / "random-resnet18" / task / "torchvision" / "trial0"


def _record(out: Path, task: str) -> dict:
    rec = json.loads((_trial(out, task) / "metrics.json").read_text())
    assert rec["status"] == "ok", rec.get("error")
    return rec


def _metrics(out: Path, task: str) -> dict:
    return _record(out, task)["metrics"]


def _weights(out: Path, task: str) -> dict:
    return torch.load(_trial(out, task) / "checkpoint.pth", weights_only=True)["model"]


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc")
    devkit = make_vocdevkit(root / "VOCdevkit", seed=0, trainval_2007=8, test_2007=4, trainval_2012=2,
                            image_size=(64, 48))
    # one truncated training JPEG: read (and counted) only before the first kill, so the count must survive it
    first = (devkit / "VOC2007" / "ImageSets" / "Main" / "trainval.txt").read_text().split()[0]
    jpeg = devkit / "VOC2007" / "JPEGImages" / f"{first}.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[:200])
    return root


def test_a_detection_trial_killed_four_times_ends_as_an_uninterrupted_one_and_refuses_another_protocol(
        voc_root, tmp_path, driver):
    ref_out, out = tmp_path / "ref", tmp_path / "killed"
    ref = driver.attempt(_voc_args(voc_root, ref_out))
    assert (ref["train"], ref["precise_bn"], ref["eval"]) == (ITERS, PBN, 4)

    # 1. mid-schedule: step 5 dies; checkpoints were written after steps 2 and 4
    a = driver.attempt(_voc_args(voc_root, out), "train", 5)
    assert (a["train"], a["save"]) == (5, 2)
    assert not (_trial(out, "voc07_det") / "metrics.json").exists()  # a kill records nothing
    # a rerun with another protocol is refused with the reason and touches nothing
    refused = driver.attempt(_voc_args(voc_root, out, "solver.base_lr=0.01"))
    assert refused["train"] == refused["save"] == 0
    rec = json.loads((_trial(out, "voc07_det") / "metrics.json").read_text())
    assert rec["status"] == "failed"
    assert rec["error"].startswith("ProtocolChangedError") and "config.solver.base_lr" in rec["error"]
    # 2. the rerun continues at step 5 (not 1) and dies writing the end-of-schedule checkpoint (its first
    # rename); the checkpoint period is a run setting, not part of the protocol: changing it is no reason to refuse
    b = driver.attempt(_voc_args(voc_root, out, "solver.checkpoint_period=3"), "save", 1)
    assert b["train"] == ITERS - 4 and b["precise_bn"] == 0
    assert len(list(_trial(out, "voc07_det").glob(".checkpoint.pth.*"))) == 1  # the killed write's temporary file
    # 3. that checkpoint never landed: the rerun trains steps 5-6 again, then dies inside PreciseBN
    c = driver.attempt(_voc_args(voc_root, out), "precise_bn", 2)
    assert c["train"] == ITERS - 4 and c["precise_bn"] == 2
    # 4. PreciseBN starts over from the end of the schedule (no training); the run dies in the evaluation
    d = driver.attempt(_voc_args(voc_root, out), "eval", 3)
    assert (d["train"], d["precise_bn"], d["eval"]) == (0, PBN, 3)
    # 5. straight to the evaluation
    e = driver.attempt(_voc_args(voc_root, out))
    assert (e["train"], e["precise_bn"], e["eval"]) == (0, 0, 4)

    assert _metrics(out, "voc07_det") == _metrics(ref_out, "voc07_det")
    assert not list(_trial(out, "voc07_det").glob(".checkpoint.pth.*"))  # the write killed in 2. left nothing
    assert _record(out, "voc07_det")["unreadable_images"] == _record(ref_out, "voc07_det")["unreadable_images"] == 1
    mine, theirs = _weights(out, "voc07_det"), _weights(ref_out, "voc07_det")
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    # and a finished trial is skipped, as before
    f = driver.attempt(_voc_args(voc_root, out))
    assert (f["train"], f["eval"]) == (0, 0)


def test_a_segmentation_trial_killed_in_training_and_in_evaluation_ends_as_an_uninterrupted_one(tmp_path, driver):
    from transfer.data.synthetic.voc_seg import make_voc_seg

    data = tmp_path / "data"
    make_voc_seg(data / "VOCdevkit", seed=0, train=6, sbd_only=2, val=3, size_range=(48, 64))
    args = lambda out: ["--weights", "random", "--arch", "resnet18", "--tasks", "voc_semseg",  # noqa: E731
                        "--preset", "smoke", "--data-root", str(data), "--output", str(out), "--no-report",
                        *tiny.overrides("voc_semseg"), "solver.iterations=5", "solver.steps=[3]",
                        "solver.checkpoint_period=2", "log_period=1"]
    ref = driver.attempt(args(tmp_path / "ref"))
    assert (ref["train"], ref["precise_bn"], ref["eval"]) == (5, 0, 3)
    out = tmp_path / "killed"
    assert driver.attempt(args(out), "train", 4)["train"] == 4
    resumed = driver.attempt(args(out), "eval", 2)  # from the checkpoint after step 2; no PreciseBN here
    assert (resumed["train"], resumed["eval"]) == (3, 2)
    assert driver.attempt(args(out))["train"] == 0
    assert _metrics(out, "voc_semseg") == _metrics(tmp_path / "ref", "voc_semseg")
    mine, theirs = _weights(out, "voc_semseg"), _weights(tmp_path / "ref", "voc_semseg")
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)


# ----- two processes: every rank gets its own RNG state back -------------------------------------------------

class _Noisy(torch.utils.data.Dataset):
    """Fixed images plus random noise (an augmentation drawn from the global RNGs, as the real datasets do)."""

    def __len__(self):
        return 12

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return torch.rand(3, 8, 8, generator=g) + 0.1 * torch.rand(3, 8, 8), i % 3


def _fit_worker(rank: int, world: int, init: str, out: str) -> None:
    """In one process group: an uninterrupted run (``ref``), a run stopped at step 5 and its rerun (``killed``)."""
    from dataclasses import dataclass, field

    import torch.distributed as torch_dist
    import torch.nn.functional as F
    from torch import nn

    from transfer.context import TrialContext
    from transfer.engines.torchvision.detection import trainer
    from transfer.tasks.detection import PreciseBNConfig, PrecisionConfig, SolverConfig

    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)

    @dataclass(frozen=True)
    class Data:
        num_workers: int = 0

    @dataclass(frozen=True)
    class Cfg:
        solver: SolverConfig = field(default_factory=lambda: SolverConfig(
            batch_size=4, base_lr=0.1, iterations=6, steps=[4], warmup_iters=1, checkpoint_period=2))
        data: Data = field(default_factory=Data)
        precise_bn: PreciseBNConfig = field(default_factory=lambda: PreciseBNConfig(num_iters=2))
        precision: PrecisionConfig = field(default_factory=PrecisionConfig)
        log_period: int = 1

    def attempt(folder: str, fail_at: int = 0) -> None:
        calls = [0]

        def step(model, batch):
            calls[0] += 1
            if calls[0] == fail_at:
                raise KeyboardInterrupt  # stands in for the kill: both ranks stop before the step's all-reduce
            x, y = batch
            return {"loss": F.cross_entropy(model(x), y)}

        torch.manual_seed(100 + rank)  # per-rank streams: the dropout masks differ between ranks
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
        d = Path(out) / folder
        ctx = TrialContext(task="t", trial=0, seed=7, engine="torchvision", device=torch.device("cpu"),
                           data_root=d, output_dir=d, cache_dir=d, world_size=world, rank=rank)
        try:
            model, _ = trainer.fit(model, _Noisy(), torch.utils.data.default_collate, Cfg(), ctx, 2, step)
            torch.save(trainer.loop.unwrap(model).state_dict(), d / f"final{rank}.pt")
        except KeyboardInterrupt:
            torch.save(torch.load(d / "checkpoint.pth", weights_only=True), d / f"stopped{rank}.pt")
        torch_dist.barrier()

    attempt("ref")
    attempt("killed", fail_at=5)  # checkpoints after steps 2 and 4 (one file, written by rank 0)
    attempt("killed")
    torch_dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_two_processes_resume_each_with_its_own_rng_state(tmp_path):
    import torch.multiprocessing as mp

    for d in ("ref", "killed"):
        (tmp_path / d).mkdir()
    mp.start_processes(_fit_worker, args=(2, str(tmp_path / "init"), str(tmp_path)),
                       nprocs=2, join=True, start_method="fork")
    stopped = torch.load(tmp_path / "killed" / "stopped0.pt", weights_only=True)
    assert stopped["iteration"] == 4 and len(stopped["rng"]) == 2
    assert not torch.equal(stopped["rng"][0]["torch"], stopped["rng"][1]["torch"])
    for rank in range(2):
        mine = torch.load(tmp_path / "killed" / f"final{rank}.pt", weights_only=True)
        ref = torch.load(tmp_path / "ref" / f"final{rank}.pt", weights_only=True)
        assert all(torch.equal(mine[k], ref[k]) for k in ref)
