"""``main(cfg)``: wire device, process group, model, data, optimizer, resume and the loop together."""
from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from pretrain import checkpoint as ckpt_io
from pretrain.config import PretrainConfig, check_run, effective_lr, effective_summary, batch_per_process
from pretrain.data.loader import build_pretrain_loader
from pretrain.data.shards import StreamTracker
from pretrain.engine import train_one_epoch
from pretrain.moco import build_moco
from pretrain.resnet import PooledBackbone
from pretrain.schedule import lr_at
from pretrain.utils import dist
from pretrain.utils.config import config_to_dict, config_to_yaml
from pretrain.utils.env import collect_env
from pretrain.utils.io import atomic_write_json, atomic_write_text
from pretrain.utils.logs import format_epoch_summary, setup_logging

log = logging.getLogger(__name__)


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _maybe_knn(cfg: PretrainConfig, moco, device: torch.device, epoch: int) -> dict | None:
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


def main(cfg: PretrainConfig) -> dict:
    """Run (or resume) one pretraining; returns a summary with the last epoch's stats and checkpoint path."""
    device = dist.select_device(cfg.run.device)
    dist.init_distributed(device)
    out = Path(cfg.run.output_dir)
    setup_logging(out / "log.txt")
    ws = dist.world_size()
    check_run(cfg, ws)
    _seed_everything(cfg.seed + dist.rank())
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.backends.cudnn.benchmark = True  # fixed input sizes; CPU runs stay bit-deterministic
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", config_to_yaml(cfg))
        atomic_write_json(out / "env.json", collect_env(device))

    moco = build_moco(cfg, ws).to(device)
    if cfg.precision.channels_last and on_gpu:
        moco = moco.to(memory_format=torch.channels_last)
    # SyncBN is deliberately not used: shuffle BN is the point (App. A.9).
    model = DistributedDataParallel(moco, device_ids=[device.index] if on_gpu else None) if ws > 1 else moco
    # all parameters, as the official code, so its optimizer state dicts load; f_k has no grads so SGD skips it
    optimizer = torch.optim.SGD(moco.parameters(), lr=effective_lr(cfg), momentum=cfg.solver.momentum,
                                weight_decay=cfg.solver.weight_decay)
    local_batch = batch_per_process(cfg, ws)
    loader, sampler, dataset = build_pretrain_loader(cfg, local_batch)
    iters_per_epoch = sampler.iters_per_epoch if sampler is not None else None
    iteration_based = cfg.solver.iterations > 0
    total_steps = cfg.solver.iterations if iteration_based else iters_per_epoch * cfg.solver.epochs
    # iteration-based runs are cut into chunks ("epochs") between periodic checkpoints
    chunk = iters_per_epoch or (cfg.solver.checkpoint_period or total_steps)
    num_epochs = -(-total_steps // chunk)

    start = ckpt_io.ResumePoint(0, 0, 0, False)
    resume = cfg.run.resume
    if resume == "auto":
        found = ckpt_io.find_last_checkpoint(out)
        resume = str(found) if found else ""
        if not found:
            log.info("resume=auto: no checkpoint in %s, starting fresh", out)
    if resume:
        start = ckpt_io.load_checkpoint(resume, moco, optimizer, cfg.model.arch, iters_per_epoch)
        log.info("resumed from %s at epoch %d iter %d (step %d)%s", resume, start.epoch, start.start_iter,
                 start.global_step, " [official checkpoint]" if start.official else "")
    tracker = StreamTracker(cfg.data.num_workers) if sampler is None else None
    if tracker is not None:  # shard streams continue where the consumed batches stopped (data/shards.py)
        if start.streams is not None:
            tracker.load(start.streams, resume)
        elif start.global_step:
            log.warning("%s has no shard stream positions: the streams start again from their beginning", resume)
        dataset.set_position(tracker.positions, tracker.next_worker)

    eff = effective_summary(cfg, ws, iters_per_epoch, str(device))
    log.info("effective: %s", eff)
    if dist.is_main():
        atomic_write_json(out / "effective.json", eff)
    writer = None
    if cfg.run.tensorboard and dist.is_main():
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tb"))

    o = cfg.solver
    base = effective_lr(cfg)

    def lr_fn(epoch: int, step: int) -> float:
        return lr_at(o.schedule, base, epoch=epoch, epochs=o.epochs, iteration=step,
                     iterations=o.iterations, steps=o.steps, gamma=o.gamma, step_period=o.step_period)

    config_dict = config_to_dict(cfg)
    state = {"step": start.global_step, "skipped": 0}

    def save(name: str, epoch: int, start_iter: int) -> None:
        position = {"epoch": epoch, "start_iter": start_iter}
        if tracker is not None:
            position["streams"] = tracker.state()  # a collective: every rank's stream positions
        if dist.is_main():
            ckpt_io.save_checkpoint(out / name, model=moco, optimizer=optimizer, epoch=epoch, arch=cfg.model.arch,
                                    config=config_dict, global_step=state["step"], sampler=position)
        dist.barrier()

    def epoch_len(epoch: int) -> int:
        return min(chunk, total_steps - epoch * chunk)

    def on_iter_end(epoch: int, it: int, step: int) -> None:
        state["step"] = step
        every = cfg.solver.checkpoint_period
        if every > 0 and step % every == 0 and it < epoch_len(epoch):  # the epoch end saves anyway
            save(ckpt_io.LAST, epoch, it)

    shard_iter = tracker.consume(iter(loader)) if tracker is not None else None
    stats: dict = {}
    run_start = time.perf_counter()
    for epoch in range(start.epoch, num_epochs):
        start_iter = start.start_iter if epoch == start.epoch else 0
        n_iters = epoch_len(epoch) - start_iter
        if sampler is not None:
            sampler.set_epoch(epoch, start_iter)
        batches = loader if sampler is not None else shard_iter
        stats, state["step"] = train_one_epoch(
            model, batches, optimizer, epoch=epoch, num_iters=n_iters, start_iter=start_iter,
            global_step=state["step"], lr_fn=lr_fn, device=device, amp_bf16=cfg.precision.amp_bf16 and on_gpu,
            channels_last=cfg.precision.channels_last and on_gpu, log_period=cfg.log_period, writer=writer,
            on_iter_end=on_iter_end,
        )
        state["skipped"] += stats["skipped_images"]
        save(ckpt_io.LAST, epoch + 1, 0)
        if (epoch + 1) % cfg.run.keep_period_epochs == 0 or epoch + 1 == num_epochs:
            save(f"checkpoint_{epoch + 1:04d}.pth", epoch + 1, 0)
        knn = _maybe_knn(cfg, moco, device, epoch + 1)
        if knn:
            stats.update(knn)
            if writer is not None:
                for k, v in knn.items():
                    writer.add_scalar(f"monitor/{k}", v, state["step"])
        done = epoch + 1 - start.epoch
        eta = (time.perf_counter() - run_start) / done * (num_epochs - epoch - 1)
        log.info("%s", format_epoch_summary(epoch + 1, num_epochs, stats, eta))
        if dist.is_main():
            atomic_write_json(out / "last_stats.json", {"epoch": epoch + 1, "global_step": state["step"], **stats})
    if writer is not None:
        writer.close()
    return {"stats": stats, "global_step": state["step"], "skipped_images_total": state["skipped"],
            "checkpoint": str(out / ckpt_io.LAST), "output_dir": str(out)}
