"""Run the transfer suite for one set of backbone weights.

    python transfer/run_all.py --weights W [--name NAME] [--tasks voc0712_det,voc07_det] [--trials N]
        [--engine auto|torchvision|detectron2] [--preset full|smoke] [--data-root DIR] [--output DIR]
        [--seed S] [key=value ...]

W: a converter output, a raw pretraining checkpoint, a torchvision state dict, or ``random``.
key=value overrides apply to every selected task's config (e.g. ``solver.iterations=100``).
Several GPUs / nodes: ``torchrun --nproc_per_node=8 transfer/run_all.py ...`` (nothing is rescaled:
set ``solver.batch_size`` yourself if needed; effective values are recorded with every result).
"""
from __future__ import annotations

import os
import sys

# Started as a script, Python puts transfer/ first on sys.path, where its module names could shadow
# top-level packages; the project root goes there instead so that ``import transfer`` works uninstalled.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import argparse  # noqa: E402
import logging  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import List, Optional  # noqa: E402

from pretrain.utils import dist  # noqa: E402
from pretrain.utils.logs import setup_logging  # noqa: E402
from transfer.registry import load_builtin_tasks  # noqa: E402
from transfer.runner import PRESETS, SuiteOptions, format_summary, run_suite, write_report  # noqa: E402

log = logging.getLogger("transfer.run_all")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, help="checkpoint / converter output / torchvision file, or 'random'")
    p.add_argument("--name", default=None, help="weights name used in results/ (default: from the weights)")
    p.add_argument("--arch", default=None, help="ResNet depth when it cannot be inferred (e.g. with 'random')")
    p.add_argument("--encoder", default="query", choices=("query", "key"), help="which MoCo encoder to transfer")
    p.add_argument("--tasks", default="all", help="comma-separated task names, or 'all' (every registered task)")
    p.add_argument("--trials", type=int, default=None,
                   help="trials per task (default: the protocol's, e.g. 5 for VOC; 1 with --preset smoke)")
    p.add_argument("--engine", default="auto", choices=("auto", "torchvision", "detectron2"))
    p.add_argument("--preset", default="full", choices=PRESETS)
    p.add_argument("--data-root", type=Path, default=None)
    p.add_argument("--output", type=Path, default=Path("results"))
    p.add_argument("--seed", type=int, default=None, help="base seed; trial k uses seed + k")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--no-report", action="store_true", help="do not write the tables at the end")
    p.add_argument("overrides", nargs="*", help="key=value config overrides for every selected task")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    """Returns 0 when every trial finished ok, 1 when some failed, 2 when nothing could start."""
    args = parse_args(argv)
    device = dist.select_device(args.device)
    dist.init_distributed(device)
    setup_logging(args.output / "run_all.log")
    try:
        known = load_builtin_tasks()
        tasks = sorted(known) if args.tasks == "all" else [t for t in args.tasks.split(",") if t]
        unknown = [t for t in tasks if t not in known]
        if unknown or (args.trials is not None and args.trials < 1):
            log.error("unknown tasks %s (known: %s) or --trials < 1", unknown, ", ".join(sorted(known)))
            return 2
        from transfer.weights import load_backbone_weights

        try:
            weights = load_backbone_weights(args.weights, name=args.name, arch=args.arch, encoder=args.encoder)
        except Exception as e:  # a bad --weights stops everything: no task could use it
            log.error("cannot load --weights %s: %s: %s", args.weights, type(e).__name__, e)
            return 2
        opts = SuiteOptions(tasks=tasks, trials=args.trials, engine=args.engine, preset=args.preset,
                            output=args.output, data_root=args.data_root, seed=args.seed, overrides=args.overrides)
        records = run_suite(weights, opts, device)
        if dist.is_main():
            print(format_summary(records))
            if not args.no_report:
                write_report(args.output)
        return 0 if all(r.get("status") == "ok" for r in records if dist.is_main()) else 1
    finally:
        dist.cleanup_distributed()


if __name__ == "__main__":
    sys.exit(main())
