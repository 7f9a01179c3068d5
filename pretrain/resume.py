"""Where a pretraining run starts: the checkpoint ``run.resume`` names (a path, ``auto`` or none), loaded into
the model and optimizer, and on tar shards where the data streams restart (``pretrain/data/shards.py``)."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from pretrain import checkpoint as ckpt_io
from pretrain.config import PretrainConfig
from pretrain.data.shards import StreamTracker

log = logging.getLogger(__name__)

FRESH = ckpt_io.ResumePoint(0, 0, 0, False)


def resume_source(resume: str, output_dir: Path) -> str:
    """``run.resume`` as a checkpoint path: ``auto`` is the run's last checkpoint; '' starts fresh."""
    if resume != "auto":
        return resume
    found = ckpt_io.find_last_checkpoint(output_dir)
    if not found:
        log.info("resume=auto: no checkpoint in %s, starting fresh", output_dir)
    return str(found) if found else ""


def resume_point(cfg: PretrainConfig, moco: nn.Module, optimizer: torch.optim.Optimizer,
                 iters_per_epoch: int | None) -> tuple[ckpt_io.ResumePoint, str]:
    """Load the checkpoint to resume from (model, optimizer, RNG states) and return where the run continues
    and that checkpoint's path ('' and :data:`FRESH` for a fresh run)."""
    source = resume_source(cfg.run.resume, Path(cfg.run.output_dir))
    if not source:
        return FRESH, source
    start = ckpt_io.load_checkpoint(source, moco, optimizer, cfg.model.arch, iters_per_epoch)
    log.info("resumed from %s at epoch %d iter %d (step %d)%s", source, start.epoch, start.start_iter,
             start.global_step, " [official checkpoint]" if start.official else "")
    return start, source


def restart_streams(dataset, workers: int, start: ckpt_io.ResumePoint, source: str) -> StreamTracker:
    """Tar shards: a tracker of the consumed batches' positions, with ``dataset``'s streams set to continue
    where those of ``start`` stopped (from their beginning on a fresh run, or with a warning when the
    checkpoint ``source`` holds no positions)."""
    tracker = StreamTracker(workers)
    if start.streams is not None:
        tracker.load(start.streams, source)
    elif start.global_step:
        log.warning("%s has no shard stream positions: the streams start again from their beginning", source)
    dataset.set_position(tracker.positions, tracker.next_worker)
    return tracker
