"""``main(cfg)``: wire device, process group, model, data, optimizer, the resume point
(:mod:`pretrain.resume`), the checkpoint writer (:mod:`pretrain.checkpoint_writer`) and the epoch loop
(:mod:`pretrain.loop`) together."""
from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from pretrain.checkpoint_writer import CheckpointWriter
from pretrain.config import PretrainConfig, batch_per_process, check_run, effective_lr, effective_summary
from pretrain.data.loader import build_pretrain_loader
from pretrain.loop import EpochLoop, EpochPlan
from pretrain.moco import build_moco
from pretrain.resume import restart_streams, resume_point
from pretrain.utils import dist
from pretrain.utils.config import config_to_yaml
from pretrain.utils.env import collect_env
from pretrain.utils.io import atomic_write_json, atomic_write_text
from pretrain.utils.logs import setup_logging
from pretrain.utils.outputs import DirLock, OutputDirError, check_output_dir

log = logging.getLogger(__name__)


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _build_model(cfg: PretrainConfig, world_size: int, device: torch.device):
    """``(moco, model, optimizer)``: the bare MoCo module, what trains (DDP-wrapped on several processes) and SGD."""
    on_gpu = device.type == "cuda"
    moco = build_moco(cfg, world_size).to(device)
    if cfg.precision.channels_last and on_gpu:
        moco = moco.to(memory_format=torch.channels_last)
    # SyncBN is deliberately not used: shuffle BN is the point (App. A.9).
    model = DistributedDataParallel(moco, device_ids=[device.index] if on_gpu else None) if world_size > 1 else moco
    # all parameters, as the official code, so its optimizer state dicts load; f_k has no grads so SGD skips it
    optimizer = torch.optim.SGD(moco.parameters(), lr=effective_lr(cfg), momentum=cfg.solver.momentum,
                                weight_decay=cfg.solver.weight_decay)
    return moco, model, optimizer


def main(cfg: PretrainConfig) -> dict:
    """Run (or resume) one pretraining; returns a summary with the last epoch's stats and checkpoint path.

    One writer per ``run.output_dir``: rank 0 holds ``<output_dir>/.lock`` (:class:`pretrain.utils.outputs.DirLock`)
    for the whole run and every rank learns its verdict, so a second pretraining on the same folder stops with
    :class:`OutputDirError` before writing anything; a lock left by a killed run of this host is taken over."""
    device = dist.select_device(cfg.run.device)
    out = Path(cfg.run.output_dir)
    check_output_dir(out, "run.output_dir")
    dist.init_distributed(device)
    lock = DirLock(out) if dist.is_main() else None  # rank 0 only: the other ranks are its own
    holder = dist.broadcast_object(lock.acquire() if lock is not None else None)
    if holder is not None:
        raise OutputDirError(f"run.output_dir {out} is being written by another pretraining: {holder}; wait for it "
                             "to end or choose another run.output_dir")
    try:
        return _run(cfg, device, out, lock)
    finally:
        if lock is not None:
            lock.release()


def _run(cfg: PretrainConfig, device: torch.device, out: Path, lock: DirLock | None) -> dict:
    setup_logging(out / "log.txt")
    if lock is not None and lock.taken_over:
        log.warning("%s", lock.taken_over)
    ws = dist.world_size()
    check_run(cfg, ws)
    _seed_everything(cfg.seed + dist.rank())
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes; CPU runs stay bit-deterministic
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", config_to_yaml(cfg))
        atomic_write_json(out / "env.json", collect_env(device))

    moco, model, optimizer = _build_model(cfg, ws, device)
    loader, sampler, dataset = build_pretrain_loader(cfg, batch_per_process(cfg, ws))
    plan = EpochPlan.of(cfg, sampler.iters_per_epoch if sampler is not None else None)
    start, source = resume_point(cfg, moco, optimizer, plan.iters_per_epoch)
    # shard streams continue where the consumed batches stopped (data/shards.py)
    tracker = restart_streams(dataset, cfg.data.num_workers, start, source) if sampler is None else None

    eff = effective_summary(cfg, ws, plan.iters_per_epoch, str(device))
    log.info("effective: %s", eff)
    if dist.is_main():
        atomic_write_json(out / "effective.json", eff)
    checkpoints = CheckpointWriter(cfg, moco, optimizer, plan.num_epochs, tracker)
    loop = EpochLoop(cfg, model, moco, optimizer, loader, sampler, plan, checkpoints, device, tracker)
    try:
        return loop.run(start)
    except KeyboardInterrupt:  # Ctrl-C: one line saying where it stopped and how to resume
        raise PretrainInterrupted(cfg, loop, source) from None


class PretrainInterrupted(KeyboardInterrupt):
    """Ctrl-C during the epochs; ``str()`` is the line ``tools/train_moco.py`` prints: where the run stopped,
    and which checkpoint the rerun resumes from."""

    def __init__(self, cfg: PretrainConfig, loop: EpochLoop, source: str):
        out, plan = Path(cfg.run.output_dir), loop.plan
        where = "before its first iteration"
        if loop.position is not None:
            epoch, done, step = loop.position
            where = f"in epoch {epoch + 1}/{plan.num_epochs} after iteration {done}/{plan.epoch_len(epoch)} " \
                    f"(global step {step})"
        rerun = "rerun the same command" + ("" if cfg.run.resume == "auto" else " with --resume auto")
        written = loop.checkpoints.last_written
        if written is not None:
            resume = f"{rerun} to resume it from {out / written[0]} (global step {written[1]})"
        elif source:
            resume = f"no checkpoint written since {source}: rerun the same command to resume from it again"
        else:
            resume = "no checkpoint written yet: rerun the same command to start it again"
        super().__init__(f"pretraining in {out} stopped {where}; {resume}")
