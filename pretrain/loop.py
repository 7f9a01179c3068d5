"""The epoch loop: train epochs from a resume point, checkpoint, the kNN monitor, TensorBoard and the logs."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pretrain.checkpoint import ResumePoint
from pretrain.checkpoint_writer import CheckpointWriter
from pretrain.config import PretrainConfig, effective_lr
from pretrain.data.shards import StreamTracker
from pretrain.engine import train_one_epoch
from pretrain.resnet import PooledBackbone
from pretrain.schedule import lr_at
from pretrain.utils import dist
from pretrain.utils.io import atomic_write_json
from pretrain.utils.logs import format_epoch_summary

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EpochPlan:
    """The schedule's steps cut into "epochs": loader epochs, or for iteration-based runs chunks of
    ``solver.checkpoint_period`` steps (one chunk when it is 0)."""

    total_steps: int
    chunk: int
    iters_per_epoch: int | None  # class folders; None on tar shards

    @classmethod
    def of(cls, cfg: PretrainConfig, iters_per_epoch: int | None) -> "EpochPlan":
        s = cfg.solver
        total = s.iterations if s.iterations > 0 else iters_per_epoch * s.epochs
        return cls(total, iters_per_epoch or (s.checkpoint_period or total), iters_per_epoch)

    @property
    def num_epochs(self) -> int:
        return -(-self.total_steps // self.chunk)

    def epoch_len(self, epoch: int) -> int:
        return min(self.chunk, self.total_steps - epoch * self.chunk)


def knn_monitor(cfg: PretrainConfig, moco, device: torch.device, epoch: int) -> dict | None:
    """kNN monitor with the query backbone (pooled features): every rank extracts its share of the
    images, rank 0 scores (App. A.9's monitor). Returns the metrics on rank 0, None elsewhere."""
    m = cfg.knn
    if m.period_epochs <= 0 or epoch % m.period_epochs:
        return None
    from pretrain.knn import knn_eval

    backbone = PooledBackbone(moco.encoder_q)  # the bare module: DDP's forward would sync buffers
    result = knn_eval(backbone, Path(m.train_root), Path(m.val_root), device, cfg.data.image_size,
                      k=m.k, temperature=m.temperature, batch_size=m.batch_per_process,
                      workers=min(cfg.data.num_workers, 4))
    moco.train()
    dist.barrier()
    return result


class EpochLoop:
    """:meth:`run` trains the epochs from a resume point to the end of the schedule. ``model`` is what trains
    (DDP-wrapped on several processes), ``moco`` the bare module; ``sampler`` is None on tar shards, whose
    batches pass through ``tracker``."""

    def __init__(self, cfg: PretrainConfig, model: nn.Module, moco: nn.Module, optimizer: torch.optim.Optimizer,
                 loader, sampler, plan: EpochPlan, checkpoints: CheckpointWriter, device: torch.device,
                 tracker: StreamTracker | None = None):
        self.cfg, self.model, self.moco, self.optimizer = cfg, model, moco, optimizer
        self.loader, self.sampler, self.tracker, self.plan = loader, sampler, tracker, plan
        self.checkpoints, self.device = checkpoints, device
        self.base_lr = effective_lr(cfg)
        self.position: tuple[int, int, int] | None = None  # (epoch, iterations done in it, global step): the last step

    def lr(self, epoch: int, step: int) -> float:
        o = self.cfg.solver
        return lr_at(o.schedule, self.base_lr, epoch=epoch, epochs=o.epochs, iteration=step,
                     iterations=o.iterations, steps=o.steps, gamma=o.gamma, step_period=o.step_period)

    def _after_step(self, epoch: int, done: int, step: int) -> None:
        self.position = (epoch, done, step)
        self.checkpoints.after_step(epoch, done, step, self.plan.epoch_len(epoch))

    def run(self, start: ResumePoint) -> dict:
        """Returns the last epoch's stats, the global step, the images skipped over the run's epochs, the last
        checkpoint's path and the output folder."""
        cfg, plan, out = self.cfg, self.plan, Path(self.cfg.run.output_dir)
        on_gpu = self.device.type == "cuda"
        writer = None
        if cfg.run.tensorboard and dist.is_main():
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(out / "tb"))
        shard_batches = self.tracker.consume(iter(self.loader)) if self.tracker is not None else None
        step, skipped, stats = start.global_step, 0, {}
        run_start = time.perf_counter()
        try:
            for epoch in range(start.epoch, plan.num_epochs):
                start_iter = start.start_iter if epoch == start.epoch else 0
                if self.sampler is not None:
                    self.sampler.set_epoch(epoch, start_iter)
                stats, step = train_one_epoch(
                    self.model, self.loader if self.sampler is not None else shard_batches, self.optimizer,
                    epoch=epoch, num_iters=plan.epoch_len(epoch) - start_iter, start_iter=start_iter,
                    global_step=step, lr_fn=self.lr, device=self.device, amp_bf16=cfg.precision.amp_bf16 and on_gpu,
                    channels_last=cfg.precision.channels_last and on_gpu, log_period=cfg.log_period, writer=writer,
                    on_iter_end=self._after_step,
                )
                skipped += stats["skipped_images"]
                self.checkpoints.after_epoch(epoch + 1, step)
                knn = knn_monitor(cfg, self.moco, self.device, epoch + 1)
                if knn:
                    stats.update(knn)
                    if writer is not None:
                        for k, v in knn.items():
                            writer.add_scalar(f"monitor/{k}", v, step)
                eta = (time.perf_counter() - run_start) / (epoch + 1 - start.epoch) * (plan.num_epochs - epoch - 1)
                log.info("%s", format_epoch_summary(epoch + 1, plan.num_epochs, stats, eta))
                if dist.is_main():
                    atomic_write_json(out / "last_stats.json", {"epoch": epoch + 1, "global_step": step, **stats})
        except FloatingPointError as e:  # a diverged run: no checkpoint of it was written (CheckpointWriter)
            raise FloatingPointError(f"{e}; {self.checkpoints.kept()}") from None
        finally:
            if writer is not None:
                writer.close()
        return {"stats": stats, "global_step": step, "skipped_images_total": skipped,
                "checkpoint": str(self.checkpoints.last), "output_dir": str(out)}
