"""A Detectron2-engine trial killed after a checkpoint and rerun ends with exactly the metrics (and the fine-tuned
weights) of an uninterrupted one on CPU, as the built-in engine's do (tests/transfer/test_trial_resume.py).

The kill is in-process and exact: Detectron2's checkpointer raises right after its n-th checkpoint file is
written, the runner records the trial as failed, and the rerun continues from that checkpoint. The keyed loader's
batches depend on their place in the stream alone (not on the start, not on the worker count). Skipped without
detectron2.
"""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from transfer.engines import detectron2 as d2_engine

needs_d2 = pytest.mark.skipif(not d2_engine.available(),
                              reason="detectron2 is not installed (no PyPI release; README 'Detectron2 engine')")

pytestmark = [needs_d2, pytest.mark.usefixtures("one_thread")]  # tests/conftest.py

# voc07_det's smoke preset, shrunk: 6 iterations, a checkpoint every 2, PreciseBN on 1 batch
_TINY = ["solver.iterations=6", "solver.steps=[4]", "solver.warmup_iters=1", "solver.checkpoint_period=2",
         "precise_bn.num_iters=1", "input.min_size_train=[64,80]", "input.min_size_test=64", "input.max_size_test=96",
         "model.roi_batch_size_per_image=16", "model.rpn_post_nms_topk_test=20"]


class Killed(Exception):
    """The injected fault."""


def _args(out):
    return ["--weights", "random", "--arch", "resnet18", "--tasks", "voc07_det", "--engine", "detectron2",
            "--preset", "smoke", "--output", str(out), "--device", "cpu", "--no-report", *_TINY]


def _trial(out):
    return out / "random-resnet18" / "voc07_det" / "detectron2" / "trial0"


def _final_weights(out):
    return torch.load(_trial(out) / "d2_checkpoints" / "model_final.pth", map_location="cpu",
                      weights_only=False)["model"]


def test_a_killed_trial_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    from fvcore.common.checkpoint import Checkpointer

    from transfer.cli import main

    assert main(_args(tmp_path / "whole")) == 0
    whole = json.loads((_trial(tmp_path / "whole") / "metrics.json").read_text())
    assert whole["status"] == "ok" and "final_loss" in whole["metrics"], whole

    writes = []
    save = Checkpointer.save

    def save_then_die(self, name, **kwargs):
        save(self, name, **kwargs)
        writes.append(name)
        if len(writes) == 2:  # model_0000003: iterations 0-3 done, 4-5 and PreciseBN to go
            raise Killed(f"killed after writing {name}")

    monkeypatch.setattr(Checkpointer, "save", save_then_die)
    out = tmp_path / "killed"
    assert main(_args(out)) == 1
    killed = json.loads((_trial(out) / "metrics.json").read_text())
    assert killed["status"] != "ok" and "killed after writing model_0000003" in killed["error"], killed
    monkeypatch.setattr(Checkpointer, "save", save)
    assert main(_args(out)) == 0
    again = json.loads((_trial(out) / "metrics.json").read_text())
    log = (_trial(out) / "log.txt").read_text()
    assert "resuming the killed trial" in log and "at iteration 4" in log and "continue at batch 4" in log
    assert again["metrics"] == whole["metrics"]  # bit-identical: AP, AP50, AP75 and the final loss
    a, b = _final_weights(tmp_path / "whole"), _final_weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), \
        [k for k in a if not torch.equal(a[k], b[k])][:5]


class _Draws:
    """A mapper that shows every RNG stream a sample's augmentation may draw from."""

    def __call__(self, d):
        return (d["image_id"], float(np.random.rand()), float(torch.rand(())), random.random())


def test_keyed_batches_depend_on_their_place_only(tmp_path):
    from detectron2.config import get_cfg

    from transfer.engines.detectron2.datasets import KeyedTrainLoader

    cfg = get_cfg()
    cfg.SOLVER.IMS_PER_BATCH, cfg.SEED = 3, 7
    dicts = [{"image_id": i, "width": 10 + (i % 3) * 5, "height": 15, "file_name": f"{i}.jpg"} for i in range(11)]

    def batches(start=0, workers=0, stream=0, n=6):
        loader = KeyedTrainLoader(cfg, _Draws(), dataset=dicts, stream=stream)
        loader.start_iter, loader.num_workers = start, workers
        it = iter(loader)
        return [next(it) for _ in range(n)]

    np.random.seed(0)
    ref = batches()
    np.random.rand(5), torch.rand(5), random.random()  # the global streams moved: no effect on the samples
    assert batches() == ref
    assert batches(start=2, n=4) == ref[2:]  # a resumed loader continues at its batch
    assert batches(workers=2) == ref  # not the worker count
    other = batches(stream=1)  # PreciseBN's: the same images, other augmentations
    assert [[s[0] for s in b] for b in other] == [[s[0] for s in b] for b in ref] and other != ref
    for b in ref:  # Detectron2's aspect-ratio groups: a batch is all landscape (w > h) or all not
        assert len({dicts[s[0]]["width"] > dicts[s[0]]["height"] for s in b}) == 1
