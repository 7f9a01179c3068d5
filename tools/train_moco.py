"""MoCo pretraining entry point (one process, or one of many under torchrun / tools/pretrain.sh).

    python tools/train_moco.py --config configs/pretrain/moco_v2.yaml [--resume auto] key=value ...
"""
from __future__ import annotations

import argparse
import sys

from torch.distributed.elastic.multiprocessing.errors import record

from pretrain.config import load_pretrain_config
from pretrain.main import main
from pretrain.utils import dist
from pretrain.utils.config import ConfigError
from pretrain.utils.io import CheckpointError


@record  # under torchrun: the failing rank's exception goes into torchrun's error summary
def cli(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML under configs/pretrain/")
    p.add_argument("--resume", default=None, help='checkpoint path or "auto" (same as run.resume=...)')
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.base_lr=0.06 data.workers=4")
    a = p.parse_args(argv)
    overrides = list(a.overrides) + ([f"run.resume={a.resume}"] if a.resume else [])
    try:
        cfg = load_pretrain_config(a.config, overrides)
        main(cfg)
    except (ConfigError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        dist.cleanup_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(cli())
