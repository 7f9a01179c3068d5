"""What ran: versions, git SHA, device and world size, saved beside every checkpoint and result."""
from __future__ import annotations

import platform
import socket
import subprocess
import sys
from pathlib import Path

import torch

from pretrain.utils import dist


def git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5
        )
        sha = out.stdout.strip()
        if not sha:
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def collect_env(device: torch.device | None = None) -> dict:
    import torchvision

    info = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda_available": torch.cuda.is_available(),
        "git_sha": git_sha(),
        "world_size": dist.world_size(),
        "device": str(device) if device is not None else None,
    }
    if device is not None and device.type == "cuda":
        info["gpu_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    try:
        import detectron2  # noqa: F401

        info["detectron2"] = detectron2.__version__
    except ImportError:
        info["detectron2"] = None
    return info
