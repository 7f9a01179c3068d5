"""The run's checkpoint files: ``checkpoint_last.pth`` every ``solver.checkpoint_period`` steps within an epoch
and every ``run.last_period_epochs`` epochs, ``checkpoint_%04d.pth`` every ``run.keep_period_epochs`` epochs; both
after the last epoch, and ``checkpoint_last.pth`` with every kept file, so that it is never older than one.
Weights with non-finite values are never written: a diverged run keeps its last good checkpoint.
Layout: :mod:`pretrain.checkpoint`."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pretrain import checkpoint as ckpt_io
from pretrain.config import PretrainConfig
from pretrain.data.shards import StreamTracker
from pretrain.utils import dist
from pretrain.utils.config import config_to_dict


class CheckpointWriter:
    """Every method is a collective (tar shards gather every rank's stream positions); rank 0 writes,
    atomically, and every rank waits for the file."""

    def __init__(self, cfg: PretrainConfig, moco: nn.Module, optimizer: torch.optim.Optimizer, num_epochs: int,
                 tracker: StreamTracker | None = None):
        self.out, self.moco, self.optimizer, self.tracker = Path(cfg.run.output_dir), moco, optimizer, tracker
        self.arch, self.config = cfg.model.arch, config_to_dict(cfg)
        self.period, self.keep, self.num_epochs = cfg.solver.checkpoint_period, cfg.run.keep_period_epochs, num_epochs
        self.last_period = cfg.run.last_period_epochs
        self.last_written: tuple[str, int] | None = None  # (file name, global step) of this run's last write

    def check_finite(self, global_step: int) -> None:
        """Raise FloatingPointError if a weight, buffer or queue entry is nan or inf (every rank: they are equal
        under DDP). One host sync per checkpoint; the names are listed only on failure."""
        state = {k: v for k, v in self.moco.state_dict().items() if v.is_floating_point()}
        if bool(torch.stack([torch.isfinite(v).all() for v in state.values()]).all()):
            return
        bad = [k for k, v in state.items() if not bool(torch.isfinite(v).all())]
        raise FloatingPointError(f"{len(bad)} tensor(s) became non-finite by step {global_step}, e.g. {bad[:3]}; "
                                 f"checkpoint not written")

    def kept(self) -> str:
        """Where a failed run can continue from: the last checkpoint on disk (every one written was finite)."""
        last = ckpt_io.find_last_checkpoint(self.out)
        if last is None:
            return "no checkpoint was written"
        return f"the last good checkpoint is kept: {last} (rerun with --resume auto, e.g. with a lower solver.base_lr)"

    def write(self, name: str, epoch: int, start_iter: int, global_step: int) -> None:
        """``<output_dir>/name`` resuming at iteration ``start_iter`` of ``epoch``."""
        self.check_finite(global_step)
        position = {"epoch": epoch, "start_iter": start_iter}
        if self.tracker is not None:
            position["streams"] = self.tracker.state()  # a collective: every rank's stream positions
        if dist.is_main():
            ckpt_io.save_checkpoint(self.out / name, model=self.moco, optimizer=self.optimizer, epoch=epoch,
                                    arch=self.arch, config=self.config, global_step=global_step, sampler=position)
        dist.barrier()
        self.last_written = (name, global_step)

    def after_step(self, epoch: int, done: int, global_step: int, epoch_len: int) -> None:
        """After iteration ``done`` of ``epoch`` (of ``epoch_len``): the last checkpoint when the period is due
        (not at the epoch's end, which :meth:`after_epoch` saves)."""
        if self.period > 0 and global_step % self.period == 0 and done < epoch_len:
            self.write(ckpt_io.LAST, epoch, done, global_step)

    def after_epoch(self, epochs_done: int, global_step: int) -> None:
        final = epochs_done == self.num_epochs
        keep = epochs_done % self.keep == 0 or final
        if keep or epochs_done % self.last_period == 0:
            self.write(ckpt_io.LAST, epochs_done, 0, global_step)
        if keep:
            self.write(f"checkpoint_{epochs_done:04d}.pth", epochs_done, 0, global_step)

    @property
    def last(self) -> Path:
        return self.out / ckpt_io.LAST
