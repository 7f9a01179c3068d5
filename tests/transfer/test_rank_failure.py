"""No hung ranks: when one rank of a 2-process (gloo) trial raises inside training or evaluation, every rank
learns it within seconds (far below the 30-minute collective timeout), the trial is recorded as failed with
that rank's error, and the suite goes on to the next trial with a working process group."""
import json
import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

from pretrain.utils import dist
from transfer.registry import TASKS, Engine, TaskSpec, register_engine, register_task

STEPS = 50


def _train(cfg, weights, ctx):
    """A DDP-style loop: an all-reduce per step; rank 1 raises at step 3 while rank 0 waits in step 3's."""
    x = torch.ones(4)
    for step in range(STEPS):
        if ctx.rank == 1 and step == 3:
            raise ValueError("rank 1 broke in training")
        dist.all_reduce_sum(x)
    return {"top1": 1.0}


def _eval(cfg, weights, ctx):
    """Training ends; rank 0 waits to gather the detections while rank 1 raises in evaluation."""
    dist.all_reduce_sum(torch.ones(2))
    if ctx.rank == 1:
        time.sleep(0.5)
        raise KeyError("rank 1 broke in evaluation")
    gathered = dist.gather_objects({"dets": ctx.rank})
    return {"top1": float(len(gathered))}


def _fine(cfg, weights, ctx):
    return {"top1": float(dist.all_reduce_sum(torch.ones(1))[0])}  # the world size: the group works again


def _worker(rank: int, world: int, port: int, out: str, queue) -> None:
    try:
        queue.put(_run_ranks_suite(rank, world, port, out))
    except BaseException as e:  # a broken worker says why at once instead of leaving the test to time out
        import traceback

        queue.put((rank, f"worker crashed: {e!r}\n{traceback.format_exc()}", 0.0))
        raise


def _run_ranks_suite(rank: int, world: int, port: int, out: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    from transfer.plugins import load_plugins
    from transfer.runner import SuiteOptions, run_suite
    from transfer.weights.resolve import load_backbone_weights

    load_plugins()  # a spawned process: the registry starts empty
    knn = TASKS["imagenet_knn"]
    recipes = {"_fail_train": _train, "_fail_eval": _eval, "_after": _fine}
    register_engine(Engine("ranks", "the test's engine: one recipe per task", recipes))
    for name in recipes:
        register_task(TaskSpec(name=name, family="classification", schema=knn.schema, config_file=knn.config_file,
                               metrics=("top1",), recipe=name))
    device = torch.device("cpu")
    dist.init_distributed(device)
    weights = load_backbone_weights("random", arch="resnet18")
    opts = SuiteOptions(tasks=list(recipes), preset="smoke", output=out, data_root=out, engine="ranks")
    t0 = time.time()
    records = run_suite(weights, opts, device)
    dist.cleanup_distributed()
    return rank, [(r["task"], r["status"], r["error"], r["wall_time_s"]) for r in records], time.time() - t0


@pytest.mark.timeout(120)  # the collective timeout is 30 minutes: a hang would fail here
def test_a_rank_raising_in_training_or_evaluation_fails_the_trial_on_every_rank(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = mp.start_processes(_worker, args=(2, port, str(tmp_path), queue), nprocs=2, join=False,
                               start_method="fork")
    results = dict((r, (rec, wall)) for r, rec, wall in (queue.get(timeout=110) for _ in range(2)))
    procs.join()
    for rank in (0, 1):
        recs, wall = results[rank]
        assert not isinstance(recs, str), recs
        statuses = {task: (status, err, t) for task, status, err, t in recs}
        assert statuses["_fail_train"][0] == "failed" and statuses["_fail_eval"][0] == "failed"
        # every rank records the first (failing) rank's error, not its own "connection closed"
        assert statuses["_fail_train"][1] == "rank 1: ValueError: rank 1 broke in training"
        assert statuses["_fail_eval"][1] == "rank 1: KeyError: 'rank 1 broke in evaluation'"
        assert statuses["_fail_train"][2] < 10 and statuses["_fail_eval"][2] < 10  # seconds, not the timeout
        assert statuses["_after"][:2] == ("ok", None)
    rec = json.loads((tmp_path / "random-resnet18" / "_fail_eval" / "ranks" / "trial0" / "metrics.json").read_text())
    assert rec["status"] == "failed" and rec["error"].startswith("rank 1: KeyError")
    after = json.loads((tmp_path / "random-resnet18" / "_after" / "ranks" / "trial0" / "metrics.json").read_text())
    assert after["metrics"]["top1"] == 2.0
