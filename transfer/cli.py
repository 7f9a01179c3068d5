"""``python transfer/run_all.py``: run the transfer suite for one set of backbone weights.

    python transfer/run_all.py --weights W [--name NAME] [--tasks voc0712_det,voc07_det] [--trials N]
        [--engine auto|torchvision|detectron2|...] [--preset full|smoke] [--data-root DIR] [--output DIR]
        [--seed S] [--device auto|cpu|cuda|cuda:N] [--plugins MODULE,...] [key=value ...] [task.key=value ...]

W: a converter output, a raw pretraining checkpoint, a torchvision state dict, an MSRA caffe2 .pkl, ``random``,
or a supervised counterpart by name: ``supervised`` (= ``supervised_tv``: torchvision's IMAGENET1K_V1 ResNet of
``--arch``, from the torch hub cache or downloaded; ``supervised_tv=FILE`` offline) or
``supervised_msra=R-50.pkl`` (Detectron2's MSRA caffe2 ResNet: BGR, std 1, stride in the 1x1 conv).
``--engine auto`` runs each task on the most preferred engine installed here that accepts the trial (Detectron2,
else the built-in torchvision engine); ``--plugins`` imports modules that register more tasks or engines
(also ``$MOCO_TRANSFER_PLUGINS`` and the ``moco_transfer.plugins`` entry points; CONTRIBUTING.md).
``key=value`` overrides go to every selected task whose config has that key; ``task.key=value`` to that
task only (``voc07_det.solver.iterations=100``); an override no selected task accepts is an error.
``--watch PRETRAIN_DIR [--every N] [--poll S] [--once]`` instead of ``--weights``: evaluate each new checkpoint
of a running pretraining (``transfer/watch.py``). ``--launcher slurm``: submit with submitit instead of running
here (``pretrain/utils/slurm.py``).
Several GPUs / nodes: ``torchrun --nproc_per_node=8 transfer/run_all.py ...`` (nothing is rescaled:
set ``solver.batch_size`` yourself if needed; effective values are recorded with every result).
One output, one writer: a trial another process is running (its ``trial<k>/.lock``) is skipped and shown as
``held`` in the summary (exit 1); under torchrun only rank 0 takes the locks. Ctrl-C names the trial it stopped
and exits 130: rerunning the same command resumes it.
"""
from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path
from typing import List, Optional

from pretrain.utils import dist
from pretrain.utils.logs import print_error_line, setup_logging
from pretrain.utils.outputs import OutputDirError, check_output_dir
from pretrain.utils.slurm import add_launcher_args

log = logging.getLogger("transfer.run_all")

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def _device(text: str) -> str:
    if not _DEVICE.match(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not one of auto, cpu, cuda, cuda:N")
    return text


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    from transfer.runner import PRESETS

    p = argparse.ArgumentParser(prog="transfer/run_all.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=None,
                   help="checkpoint / converter output / torchvision or caffe2 file, 'random', 'supervised' "
                        "(= supervised_tv), 'supervised_tv=FILE' or 'supervised_msra=FILE'")
    p.add_argument("--watch", type=Path, default=None, metavar="PRETRAIN_DIR",
                   help="instead of --weights: evaluate each new checkpoint of a running pretraining "
                        "(transfer/watch.py)")
    p.add_argument("--every", type=_positive, default=1, help="--watch: checkpoints of epochs that are multiples of N")
    p.add_argument("--poll", type=float, default=300.0, help="--watch: seconds between looks for new checkpoints")
    p.add_argument("--once", action="store_true", help="--watch: evaluate what is there now, then stop")
    p.add_argument("--name", default=None, help="weights name used in results/ (default: from the weights)")
    p.add_argument("--arch", default=None, help="ResNet depth when it cannot be inferred (e.g. with 'random')")
    p.add_argument("--encoder", default=None,
                   help="which encoder of the checkpoint to transfer (default: its layout's, e.g. MoCo's query "
                        "encoder, DINO's teacher); also FILE:encoder=NAME. Names: README 'Conversion'")
    p.add_argument("--tasks", default="all", help="comma-separated task names, or 'all' (every registered task)")
    p.add_argument("--trials", type=_positive, default=None,
                   help="trials per task (default: the protocol's, e.g. 5 for VOC; 1 with --preset smoke)")
    p.add_argument("--engine", default="auto",
                   help="auto (default), or a registered engine: torchvision, detectron2, or a plug-in's")
    p.add_argument("--plugins", default="", help="comma-separated modules that register more tasks or engines")
    p.add_argument("--preset", default="full", choices=PRESETS)
    p.add_argument("--data-root", type=Path, default=None)
    p.add_argument("--output", type=Path, default=Path("results"))
    p.add_argument("--seed", type=int, default=None, help="base seed; trial k uses seed + k")
    p.add_argument("--device", type=_device, default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--no-report", action="store_true", help="do not write the tables at the end")
    p.add_argument("--only-trial", type=int, default=None, help="run this trial index only (one job per trial)")
    p.add_argument("--slurm-per", default="task", choices=("task", "trial"),
                   help="--launcher slurm: one job per task (its trials in sequence) or per (task, trial)")
    add_launcher_args(p)
    p.add_argument("overrides", nargs="*", help="key=value or task.key=value config overrides")
    args = p.parse_args(argv)
    if (args.weights is None) == (args.watch is None):
        p.error("give exactly one of --weights W and --watch PRETRAIN_DIR")
    return args


def _without(argv: List[str], flag: str) -> List[str]:
    """``argv`` without ``flag VALUE`` / ``flag=VALUE``."""
    out, skip = [], False
    for a in argv:
        if skip or a == flag or a.startswith(flag + "="):
            skip = a == flag and not skip
            continue
        out.append(a)
    return out


def submit_to_slurm(args: argparse.Namespace, argv: List[str], tasks: List[str]) -> int:
    """One job per task (or per (task, trial) with ``--slurm-per trial``), each rerunning this command for its
    part: a requeued job skips finished trials and resumes the running one from its checkpoint."""
    from transfer.registry import get_task
    from transfer.runner import SuiteOptions, num_trials
    from pretrain.utils.slurm import slurm_options, strip_launcher_args, submit

    base = _without(_without(strip_launcher_args(argv), "--tasks"), "--slurm-per")
    jobs = []
    for t in tasks:
        if args.slurm_per == "task":
            jobs.append((f"{t}", ["--tasks", t] + base))  # options first: overrides stay one positional run
            continue
        n = num_trials(get_task(t), SuiteOptions(tasks=[t], trials=args.trials, preset=args.preset))
        jobs += [(f"{t}-trial{k}", ["--tasks", t, "--only-trial", str(k)] + _without(base, "--only-trial"))
                 for k in range(n)]
    script = str(Path(__file__).resolve().parent / "run_all.py")
    submit(jobs, slurm_options(args), args.output, script, dry_run=args.dry_run)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Returns 0 when every trial finished ok, 1 when some failed or are held by another process, 2 when nothing
    could start, 130 when interrupted (Ctrl-C)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    from transfer.plugins import load_plugins
    from transfer.registry import ENGINES, TASKS, get_task, task_order, unavailable_everywhere

    try:
        load_plugins(m for m in args.plugins.split(",") if m)
        check_output_dir(args.output, "--output")
    except (ImportError, OutputDirError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.engine != "auto" and args.engine not in ENGINES:
        print(f"error: unknown --engine {args.engine!r}; known: auto, {', '.join(sorted(ENGINES))}", file=sys.stderr)
        return 2
    if args.launcher == "slurm":
        tasks = list(task_order()) if args.tasks == "all" else [t for t in args.tasks.split(",") if t]
        if [t for t in tasks if t not in TASKS] or not tasks:
            print(f"error: unknown task(s) in {args.tasks!r}; known: {', '.join(task_order())}", file=sys.stderr)
            return 2
        if args.tasks == "all":  # as a local run: a task no engine here can run is not submitted
            for t in list(tasks):
                reason = unavailable_everywhere(get_task(t))
                if reason is not None:
                    print(f"not submitted: {t}: {reason} (name it in --tasks to submit it anyway)", file=sys.stderr)
                    tasks.remove(t)
        return submit_to_slurm(args, argv, tasks)
    from pretrain.utils.config import ConfigError
    from transfer.runner import (SuiteOptions, TrialInterrupted, format_summary, one_line_error, route_overrides,
                                 run_suite, write_report)
    from transfer.weights.resolve import load_backbone_weights

    try:
        device = dist.select_device(args.device)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dist.init_distributed(device)
    setup_logging(args.output / "run_all.log")
    try:
        tasks = list(task_order()) if args.tasks == "all" else [t for t in args.tasks.split(",") if t]
        unknown = [t for t in tasks if t not in TASKS]
        if unknown or not tasks:
            log.error("unknown task(s) %s; known: %s", ", ".join(unknown) or "(none given)", ", ".join(task_order()))
            return 2
        try:
            route_overrides(tasks, args.overrides)
        except ConfigError as e:
            log.error("%s", e)
            return 2
        if args.watch is not None:
            from transfer.watch import watch

            watch(args.watch, SuiteOptions(tasks=tasks, trials=args.trials, engine=args.engine, preset=args.preset,
                                           output=args.output, data_root=args.data_root, seed=args.seed,
                                           overrides=args.overrides, skip_unrunnable=args.tasks == "all"),
                  device, every=args.every, poll_s=args.poll, once=args.once, arch=args.arch, encoder=args.encoder)
            return 0
        try:
            weights = load_backbone_weights(args.weights, name=args.name, arch=args.arch, encoder=args.encoder)
        except Exception as e:  # a bad --weights stops everything: no task could use it
            log.error("cannot load --weights %s: %s", args.weights, one_line_error(e))
            return 2
        opts = SuiteOptions(tasks=tasks, trials=args.trials, engine=args.engine, preset=args.preset,
                            output=args.output, data_root=args.data_root, seed=args.seed, overrides=args.overrides,
                            only_trial=args.only_trial, skip_unrunnable=args.tasks == "all")
        records = run_suite(weights, opts, device)
        if dist.is_main():
            print(format_summary(records))
            if not args.no_report:
                write_report(args.output)
        return 0 if all(r.get("status") == "ok" for r in records if dist.is_main()) else 1
    except KeyboardInterrupt as e:  # one line instead of the traceback; finished trials are kept
        if dist.is_main():
            print_error_line(f"interrupted: {e}" if isinstance(e, TrialInterrupted) else
                             "interrupted (no trial was running: finished trials are kept); rerun the same command "
                             "to go on")
        return 130
    finally:
        dist.cleanup_distributed()
