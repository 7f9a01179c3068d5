"""One Detectron2 trial: build, load the backbone exactly, train with Detectron2's own trainer and hooks
(the hooks of its ``DefaultTrainer``: LR schedule, PreciseBN, periodic checkpoints, metric writers), then
evaluate with a Detectron2 evaluator.

Why not ``DefaultTrainer`` itself: it loads ``MODEL.WEIGHTS`` through matching heuristics that leave
unmatched layers silently random, and wraps DDP with ``device_ids`` even on CPU. Here the suite loads the
backbone (:func:`.modeling.load_backbone`) and DDP is built for the run's device. Under torchrun every
process runs this (one per GPU); Detectron2's ``comm`` gets its local process group here.
Checkpoints go to ``<trial>/d2_checkpoints``; a rerun of a killed trial resumes from the last one when its
Detectron2 config is the same (``config_key.txt``), else starts over.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from torch.nn.parallel import DistributedDataParallel

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.engine import SimpleTrainer, hooks
from detectron2.evaluation import DatasetEvaluator, inference_on_dataset
from detectron2.modeling import build_model
from detectron2.solver import build_lr_scheduler, build_optimizer
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import CommonMetricPrinter, JSONWriter

from pretrain.utils.io import atomic_write_json, atomic_write_text
from transfer.context import TrialContext
from transfer.engines.detectron2.config import effective_values
from transfer.engines.detectron2.modeling import load_backbone
from transfer.weights.resolve import BackboneWeights

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "d2_checkpoints"


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
                       make_evaluator: Callable[[str], DatasetEvaluator], log_period: int = 20,
                       train_mapper: Any = None, test_mapper: Any = None,
                       build_train_loader: Callable = build_detection_train_loader,
                       build_test_loader: Callable = build_detection_test_loader) -> Dict[str, Any]:
    """Train ``cfg`` from ``weights`` and evaluate on ``cfg.DATASETS.TEST[0]``; returns (rank 0)
    ``{"results": <the evaluator's dict>, "final_loss": float, "missing": [head keys]}``, ``{}`` elsewhere.
    ``build_*_loader``: Detectron2's, or a project's with the same signature (DensePose's)."""
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
    checkpointer = DetectionCheckpointer(model, str(ckpt_dir), trainer=trainer)
    hook_list = [hooks.IterationTimer(), hooks.LRScheduler(optimizer=optimizer,
                                                           scheduler=build_lr_scheduler(cfg, optimizer))]
    if cfg.TEST.PRECISE_BN.ENABLED:
        # its own loader, as DefaultTrainer: statistics of NUM_ITER training batches, after the last iteration
        hook_list.append(hooks.PreciseBN(0, model, build_train_loader(cfg, mapper=train_mapper),
                                         cfg.TEST.PRECISE_BN.NUM_ITER))
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
        checkpointer.resume_or_load("", resume=True)
        start_iter = trainer.iter + 1
        log.info("resuming the killed trial from %s at iteration %d", checkpointer.get_checkpoint_file(), start_iter)
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
    final_loss: Optional[float] = None
    history = trainer.storage.histories().get("total_loss") if start_iter < cfg.SOLVER.MAX_ITER else None
    if history is not None:
        final_loss = float(history.median(min(20, len(history.values()))))
    atomic_write_text(out / "d2_results.json", json.dumps(results, indent=1, default=float))
    return {"results": results, "final_loss": final_loss, "missing": missing}
