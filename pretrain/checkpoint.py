"""Checkpoints interchangeable with the official MoCo code.

Layout: ``{"epoch", "arch", "state_dict" (module.encoder_q.*, module.encoder_k.*, module.queue,
module.queue_ptr), "optimizer"}`` plus this project's extras ``config``, ``global_step``, ``rng`` and
``sampler`` (class folders: epoch and iteration; tar shards also ``streams``: every stream's position,
see ``pretrain/data/shards.py``). The ``module.`` prefix is always written (the official code saves a
DDP-wrapped model). Only tensors and plain containers are stored, so ``weights_only=True`` loading works.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pretrain.utils.io import CheckpointError, atomic_torch_save, safe_torch_load

PREFIX = "module."
LAST = "checkpoint_last.pth"
PERIODIC = re.compile(r"checkpoint_(\d{4,})\.pth$")


def to_official_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """MoCo (unwrapped) state dict with the official ``module.`` prefix."""
    return {PREFIX + k: v for k, v in model.state_dict().items()}


def rng_state() -> dict:
    """torch / CUDA / numpy / python RNG states as tensors and plain types (``weights_only``-safe)."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_version, "internal": list(py_internal), "gauss": py_gauss},
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))


def save_checkpoint(path: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int, arch: str,
                    config: dict, global_step: int, sampler: dict) -> None:
    """Write atomically (a full disk raises :class:`~pretrain.utils.io.WriteError`, the previous file intact).
    ``epoch`` follows the official meaning: the epoch to start from on resume."""
    atomic_torch_save({
        "epoch": epoch, "arch": arch, "state_dict": to_official_state_dict(model),
        "optimizer": optimizer.state_dict(), "config": config, "global_step": global_step,
        "rng": rng_state(), "sampler": sampler,
    }, path, what="checkpoint", hint="free space and rerun with --resume auto")


def find_last_checkpoint(output_dir: str | Path) -> Path | None:
    """``checkpoint_last.pth`` if present, else the highest-numbered ``checkpoint_%04d.pth``."""
    out = Path(output_dir)
    if (out / LAST).is_file():
        return out / LAST
    numbered = sorted((int(m.group(1)), p) for p in out.glob("checkpoint_*.pth") if (m := PERIODIC.search(p.name)))
    return numbered[-1][1] if numbered else None


def _strip(state_dict: dict, path: Path) -> dict[str, torch.Tensor]:
    """Official/DDP layout -> MoCo module keys; one clear error for any other layout."""
    keys = list(state_dict)
    if any(k.startswith(("module.base_encoder.", "module.momentum_encoder.")) for k in keys):
        raise CheckpointError(f"{path}: MoCo v3 layout (base_encoder/momentum_encoder); this stage reads MoCo v1/v2")
    stripped = {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in state_dict.items()}
    if not any(k.startswith("encoder_q.") for k in stripped) or "queue" not in stripped:
        raise CheckpointError(f"{path}: not a MoCo v1/v2 pretraining checkpoint (expected keys module.encoder_q.*, "
                              f"module.encoder_k.*, module.queue; found e.g. {keys[:3]})")
    return stripped


def _check_compatible(model: nn.Module, state: dict[str, torch.Tensor], path: Path, arch: str | None,
                      want_arch: str) -> None:
    if arch is not None and arch != want_arch:
        raise CheckpointError(f"{path}: checkpoint arch is {arch!r} but model.arch is {want_arch!r}")
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        hint = ""
        if any(".fc.0." in k for k in unexpected + missing) or any(k.endswith("fc.weight") for k in unexpected + missing):
            hint = " (v1 linear head vs v2 MLP head: check model.mlp)"
        raise CheckpointError(f"{path}: layout differs from model {want_arch}{hint}: missing {missing[:4]}, "
                              f"unexpected {unexpected[:4]}")
    bad = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if state[k].shape != v.shape]
    if bad:
        raise CheckpointError(f"{path}: tensor shapes differ from model {want_arch} (another architecture, "
                              f"model.dim or model.queue_size?): {bad[:3]}")


@dataclass(frozen=True)
class ResumePoint:
    epoch: int  # epoch to continue
    start_iter: int  # iteration within that epoch
    global_step: int
    official: bool  # made by the official code (no extras)
    streams: dict | None = None  # tar-shard runs: StreamTracker.state() of the last consumed batches


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, arch: str,
                    iters_per_epoch: int | None = None) -> ResumePoint:
    """Load a checkpoint into ``model`` (unwrapped MoCo) and ``optimizer``; restore RNG states if present.

    Official checkpoints (epoch/arch/state_dict/optimizer only) resume at the start of ``epoch``.
    """
    path = Path(path)
    ckpt = safe_torch_load(path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "epoch" not in ckpt:
        raise CheckpointError(f"{path}: expected a dict with 'epoch' and 'state_dict' (official MoCo layout)")
    state = _strip(ckpt["state_dict"], path)
    _check_compatible(model, state, path, ckpt.get("arch"), arch)
    model.load_state_dict(state, strict=True)
    if optimizer is not None and "optimizer" in ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
    if "rng" in ckpt:
        set_rng_state(ckpt["rng"])
    sampler = ckpt.get("sampler") or {}
    epoch, start_iter = int(sampler.get("epoch", ckpt["epoch"])), int(sampler.get("start_iter", 0))
    default_step = epoch * iters_per_epoch if iters_per_epoch else 0
    return ResumePoint(epoch, start_iter, int(ckpt.get("global_step", default_step)), "config" not in ckpt,
                       sampler.get("streams"))
