"""MoCo pretraining entry point (one process, or one of many under torchrun / tools/pretrain.sh).

    python tools/train_moco.py --config configs/pretrain/moco_v2.yaml [--resume auto] key=value ...
    python tools/train_moco.py --launcher slurm --nodes 8 --gpus-per-node 8 --partition P --time 4320 \
        [--account A] [--constraint C] [--dry-run] --config configs/pretrain/moco_v2.yaml key=value ...

With ``--launcher slurm`` one job runs the pretraining (a process per GPU, as torchrun would) and is
requeued on preemption and time-out with ``--resume auto``; see ``pretrain/utils/slurm.py``.
One writer per ``run.output_dir`` (its ``.lock``, taken by rank 0): a second run on the same folder stops at once
(exit 2). Ctrl-C prints where the run stopped and which checkpoint ``--resume auto`` continues from (exit 130).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import record

from pretrain.config import load_pretrain_config
from pretrain.main import main
from pretrain.utils import dist
from pretrain.utils.config import ConfigError
from pretrain.utils.io import CheckpointError, WriteError
from pretrain.utils.logs import print_error_line
from pretrain.utils.outputs import OutputDirError
from pretrain.utils.slurm import add_launcher_args, slurm_options, strip_launcher_args, submit


@record  # under torchrun: the failing rank's exception goes into torchrun's error summary
def cli(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML under configs/pretrain/")
    p.add_argument("--resume", default=None, help='checkpoint path or "auto" (same as run.resume=...)')
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. solver.base_lr=0.06 data.num_workers=4")
    add_launcher_args(p)
    argv = list(sys.argv[1:] if argv is None else argv)
    a = p.parse_args(argv)
    overrides = list(a.overrides) + ([f"run.resume={a.resume}"] if a.resume else [])
    try:
        cfg = load_pretrain_config(a.config, overrides)
        if a.launcher == "slurm":  # one job; requeued with --resume auto (the last checkpoint in output_dir)
            submit([("moco_pretrain", strip_launcher_args(argv))], slurm_options(a), Path(cfg.run.output_dir),
                   str(Path(__file__).resolve()), resume_args=["--resume", "auto"], dry_run=a.dry_run, function="cli")
            return 0
        main(cfg)
    except (ConfigError, CheckpointError, FileNotFoundError, OutputDirError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (FloatingPointError, WriteError) as e:  # diverged, or the disk is full: the last good checkpoint is kept
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # one line instead of the traceback (pretrain.main.PretrainInterrupted)
        if dist.is_main():
            print_error_line(f"interrupted: {e}" if str(e) else "interrupted before training started")
        return 130
    finally:
        dist.cleanup_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(cli())
