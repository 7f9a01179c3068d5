"""One Detectron2 trial: build, load the backbone exactly, train with Detectron2's own trainer and hooks
(the hooks of its ``DefaultTrainer``: LR schedule, PreciseBN, periodic checkpoints, metric writers), then
evaluate with a Detectron2 evaluator.

Why not ``DefaultTrainer`` itself: it loads ``MODEL.WEIGHTS`` through matching heuristics that leave
unmatched layers silently random, and wraps DDP with ``device_ids`` even on CPU. Here the suite loads the
backbone (:func:`.modeling.load_backbone`) and DDP is built for the run's device. Under torchrun every
process runs this (one per GPU); Detectron2's ``comm`` gets its local process group here.
Checkpoints go to ``<trial>/d2_checkpoints``; a rerun of a killed trial resumes from the last one when its
Detectron2 config is the same (``config_key.txt``), else starts over. Resuming is exact (bit-identical metrics
on CPU, as the built-in engine's :mod:`transfer.engines.torchvision.trial_checkpoint`): Detectron2's checkpoint
holds the weights, optimizer, LR schedule and iteration; the data stream restarts at the checkpoint's batch
(:class:`.datasets.KeyedTrainLoader`: every sample augmented from its key); every process's RNG states (the
RPN and RoI samplers draw from torch's) and the last training losses (the final loss's window) are saved beside
them (:class:`ProcessStates`); PreciseBN reads its own keyed stream from its start.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
from torch.nn.parallel import DistributedDataParallel

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.data import build_detection_test_loader
from detectron2.engine import HookBase, SimpleTrainer, hooks
from detectron2.evaluation import DatasetEvaluator, inference_on_dataset
from detectron2.modeling import build_model
from detectron2.solver import build_lr_scheduler, build_optimizer
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import CommonMetricPrinter, JSONWriter

from pretrain.checkpoint import rng_state, set_rng_state
from pretrain.utils.io import atomic_write_json, atomic_write_text
from transfer.context import TrialContext
from transfer.engines.detectron2.config import effective_values
from transfer.engines.detectron2.datasets import KeyedTrainLoader, build_keyed_train_loader
from transfer.engines.detectron2.modeling import load_backbone
from transfer.weights.resolve import BackboneWeights

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "d2_checkpoints"
FINAL_LOSS_WINDOW = 20  # final_loss: the median total loss of the last this many iterations


class ProcessStates:
    """A Detectron2 checkpointable (``suite_states`` in each checkpoint): every process's RNG states (torch, CUDA,
    numpy, python) and rank 0's recent total losses, as they were after the checkpoint's iteration.

    :meth:`capture` is a collective (every process's states are gathered to rank 0, which alone writes the file);
    :meth:`load_state_dict` restores this process's states, so call the checkpointer's load last before training."""

    def __init__(self):
        self.losses: List[float] = []
        self.captured: Optional[dict] = None
        self.restored = False

    def capture(self) -> None:
        ranks = comm.all_gather(rng_state())
        self.captured = {"rng": ranks, "losses": list(self.losses[-FINAL_LOSS_WINDOW:])}

    def state_dict(self) -> dict:
        if self.captured is None:
            raise RuntimeError("the process states were not captured for this checkpoint")
        return self.captured

    def load_state_dict(self, state: dict) -> None:
        if len(state["rng"]) != comm.get_world_size():
            raise ValueError(f"the checkpoint holds RNG states of {len(state['rng'])} processes, this run has "
                             f"{comm.get_world_size()}")
        set_rng_state(state["rng"][comm.get_rank()])
        self.losses = [float(v) for v in state["losses"]]
        self.restored = True


class CaptureStates(HookBase):
    """Records each iteration's total loss (rank 0) and captures :class:`ProcessStates` at every iteration the
    checkpointer writes (fvcore's ``PeriodicCheckpointer.step``: ``(iter + 1) % period == 0`` and the last one).
    Registered before PreciseBN and the checkpointer, so the states are those of the training stream."""

    def __init__(self, states: ProcessStates, period: int, max_iter: int):
        self.states, self.period, self.max_iter = states, int(period), int(max_iter)

    def after_step(self) -> None:
        it = self.trainer.iter
        if comm.is_main_process():
            value, at = self.trainer.storage.latest()["total_loss"]
            if at != it:
                raise RuntimeError(f"no total loss was written at iteration {it} (the last one is of {at})")
            self.states.losses.append(float(value))
            del self.states.losses[:-FINAL_LOSS_WINDOW]
        if (it + 1) % self.period == 0 or it >= self.max_iter - 1:
            self.states.capture()


def setup_comm(world_size: int) -> None:
    """Detectron2's ``comm`` reads the global process group that the suite set up; it also needs a group
    of the processes on this machine (what its ``launch()`` would create)."""
    if world_size > 1 and comm._LOCAL_PROCESS_GROUP is None:
        comm.create_local_process_group(int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))


def _config_key(cfg: CfgNode) -> str:
    return hashlib.sha256(cfg.dump().encode()).hexdigest()


def _writers(cfg: CfgNode, out: Path):
    writers = [CommonMetricPrinter(cfg.SOLVER.MAX_ITER), JSONWriter(str(out / "d2_events.json"))]
    try:
        from detectron2.utils.events import TensorboardXWriter

        writers.append(TensorboardXWriter(str(out / "tensorboard")))
    except ImportError:  # tensorboard not installed: the JSON events remain
        pass
    return writers


def train_and_evaluate(cfg: CfgNode, weights: BackboneWeights, ctx: TrialContext,
                       make_evaluator: Callable[[str], DatasetEvaluator], log_period: Optional[int] = None,
                       train_mapper: Any = None, test_mapper: Any = None,
                       build_train_loader: Callable = build_keyed_train_loader,
                       build_test_loader: Callable = build_detection_test_loader) -> Dict[str, Any]:
    """Train ``cfg`` from ``weights`` and evaluate on ``cfg.DATASETS.TEST[0]``; returns (rank 0)
    ``{"results": <the evaluator's dict>, "final_loss": float, "missing": [head keys]}``, ``{}`` elsewhere.
    ``build_*_loader``: the engine's resumable one and Detectron2's test loader, or a project's with the same
    signature (a train loader that is no :class:`.datasets.KeyedTrainLoader` restarts its stream on resume).
    ``log_period``: the metric writers' (default ``SUITE.LOG_PERIOD``, the task config's)."""
    log_period = int(cfg.SUITE.LOG_PERIOD if log_period is None else log_period)
    setup_comm(ctx.world_size)
    seed_all_rng(ctx.seed + ctx.rank)
    out = Path(ctx.output_dir)
    ckpt_dir = out / CHECKPOINT_DIR
    if comm.is_main_process():
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "d2_config.yaml", cfg.dump())
        atomic_write_json(out / "d2_effective.json", effective_values(cfg, ctx.world_size))
    comm.synchronize()

    model = build_model(cfg)  # on cfg.MODEL.DEVICE
    missing = sorted(load_backbone(model, weights))
    optimizer = build_optimizer(cfg, model)
    train_model = model
    if ctx.world_size > 1:
        on_gpu = next(model.parameters()).device.type == "cuda"
        train_model = DistributedDataParallel(model, device_ids=[comm.get_local_rank()] if on_gpu else None,
                                              broadcast_buffers=False)
    loader = build_train_loader(cfg, mapper=train_mapper)
    trainer = SimpleTrainer(train_model, loader, optimizer)
    states = ProcessStates()
    checkpointer = DetectionCheckpointer(model, str(ckpt_dir), trainer=trainer, suite_states=states)
    hook_list = [hooks.IterationTimer(), hooks.LRScheduler(optimizer=optimizer,
                                                           scheduler=build_lr_scheduler(cfg, optimizer)),
                 CaptureStates(states, cfg.SOLVER.CHECKPOINT_PERIOD, cfg.SOLVER.MAX_ITER)]
    if cfg.TEST.PRECISE_BN.ENABLED:
        # its own loader, as DefaultTrainer: statistics of NUM_ITER training batches, after the last iteration
        # (the training indices from the start, augmented in a stream of their own)
        bn_loader = build_train_loader(cfg, mapper=train_mapper)
        if isinstance(bn_loader, KeyedTrainLoader):
            bn_loader.stream = 1
        hook_list.append(hooks.PreciseBN(0, model, bn_loader, cfg.TEST.PRECISE_BN.NUM_ITER))
    # the last two periodic checkpoints (Detectron2 keeps every one: 36 of them for a 2x schedule) and model_final
    hook_list.append(hooks.PeriodicCheckpointer(checkpointer, cfg.SOLVER.CHECKPOINT_PERIOD,
                                                max_iter=cfg.SOLVER.MAX_ITER, max_to_keep=2))
    if comm.is_main_process():
        hook_list.append(hooks.PeriodicWriter(_writers(cfg, out), period=log_period))
    trainer.register_hooks(hook_list)

    start_iter = 0
    key_file = ckpt_dir / "config_key.txt"
    resumable = checkpointer.has_checkpoint() and key_file.is_file() and key_file.read_text() == _config_key(cfg)
    resumable = bool(comm.all_gather(resumable)[0])
    if resumable:
        checkpointer.resume_or_load("", resume=True)  # last: it restores the RNG states (ProcessStates)
        start_iter = trainer.iter + 1
        log.info("resuming the killed trial from %s at iteration %d", checkpointer.get_checkpoint_file(), start_iter)
        if not states.restored:
            log.warning("the checkpoint holds no RNG states: the resumed trial will not repeat the killed one's")
        if isinstance(loader, KeyedTrainLoader):
            loader.start_iter = start_iter
        else:
            log.warning("%s restarts its data stream: the resumed trial will not repeat the killed one's",
                        type(loader).__name__)
    elif comm.is_main_process():
        (ckpt_dir / "last_checkpoint").unlink(missing_ok=True)  # another config's checkpoints: start over
        atomic_write_text(key_file, _config_key(cfg))
    comm.synchronize()
    if start_iter < cfg.SOLVER.MAX_ITER:
        trainer.train(start_iter, cfg.SOLVER.MAX_ITER)

    test_set = cfg.DATASETS.TEST[0]
    results = inference_on_dataset(model, build_test_loader(cfg, test_set, mapper=test_mapper),
                                   make_evaluator(test_set))
    if not comm.is_main_process():
        return {}
    # the median of the last iterations' total losses (those before a resume come from the checkpoint)
    final_loss = float(np.median(states.losses)) if states.losses else None
    atomic_write_text(out / "d2_results.json", json.dumps(results, indent=1, default=float))
    return {"results": results, "final_loss": final_loss, "missing": missing}
