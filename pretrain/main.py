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
    """Run (or resume) one pretraining; returns a summary with the last epoch's stats and checkpoint path."""
    device = dist.select_device(cfg.run.device)
    dist.init_distributed(device)
    out = Path(cfg.run.output_dir)
    setup_logging(out / "log.txt")
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
    return EpochLoop(cfg, model, moco, optimizer, loader, sampler, plan, checkpoints, device, tracker).run(start)
