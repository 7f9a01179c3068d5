"""The suite runner end to end on CPU (synthetic VOCdevkit, random resnet18), and its schedule pieces."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrain.schedule import warmup_multistep_lr
from transfer.engines.torchvision.detection import loop as eu
from transfer.engines.torchvision.detection.samplers import GroupedBatchSampler, InfiniteSampler
from transfer.engines.torchvision.detection.sync_bn import convert_naive_sync_bn
from transfer.data.synthetic.voc import make_vocdevkit
from transfer.registry import get_task
from transfer.run_all import main
from transfer.registry import resolve
from transfer.runner import SuiteOptions, config_path, num_trials

import tiny  # tests/tiny.py

ROOT = Path(__file__).resolve().parents[2]
def test_warmup_multistep_lr():
    lr = lambda it: warmup_multistep_lr(it, 0.02, [18000, 22000], 0.1, 100, 0.001)  # noqa: E731
    assert lr(0) == pytest.approx(0.02 * 0.001)
    assert lr(50) == pytest.approx(0.02 * (0.001 * 0.5 + 0.5))
    assert lr(100) == pytest.approx(0.02) and lr(17999) == pytest.approx(0.02)
    assert lr(18000) == pytest.approx(0.002) and lr(22000) == pytest.approx(0.0002)


def test_sgd_has_no_weight_decay_on_norms():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    opt = eu.build_sgd(model, 0.1, 0.9, 1e-4, 0.0)
    decays = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decays[id(model[0].weight)] == 1e-4 and decays[id(model[1].weight)] == 0.0


def test_configs_and_engine_resolution():
    spec = get_task("voc07_det")
    assert config_path(spec, "smoke").parent.name == "smoke" and config_path(spec, "smoke").is_file()
    assert config_path(spec, "full").is_file()
    assert resolve(spec, "auto")[0] in ("torchvision", "detectron2")


@pytest.mark.slow
def test_trials_default_to_the_protocol():
    voc, knn = get_task("voc0712_det"), get_task("imagenet_knn")
    assert num_trials(voc, SuiteOptions(tasks=["voc0712_det"])) == 5  # MoCo: VOC is the mean of 5 trials
    assert num_trials(knn, SuiteOptions(tasks=["imagenet_knn"])) == 1
    assert num_trials(voc, SuiteOptions(tasks=["voc0712_det"], preset="smoke")) == 1
    assert num_trials(voc, SuiteOptions(tasks=["voc0712_det"], trials=2)) == 2


def test_smoke_suite_end_to_end(tmp_path):
    data = tmp_path / "data"
    make_vocdevkit(data / "VOCdevkit", seed=0, trainval_2007=4, test_2007=3, trainval_2012=2, image_size=(96, 72))
    shutil.rmtree(data / "VOCdevkit" / "VOC2012")  # voc0712_det must fail, voc07_det must still run
    out = tmp_path / "results"
    args = ["--weights", "random", "--arch", "resnet18", "--tasks", "voc0712_det,voc07_det", "--preset", "smoke",
            "--data-root", str(data), "--output", str(out), "--engine", "torchvision", "--no-report",
            *tiny.overrides("voc0712_det", "voc07_det"), "log_period=1"]
    assert main(args) == 1  # one task failed

    bad = json.loads((out / "random-resnet18" / "voc0712_det" / "torchvision" / "trial0" / "metrics.json").read_text())
    assert bad["status"] == "failed" and bad["metrics"] == {}
    assert "VOC2012" in bad["error"] and "expected the standard layout" in bad["error"]
    assert (out / "random-resnet18" / "voc0712_det" / "torchvision" / "trial0" / "error.log").read_text().startswith("Traceback")

    trial = out / "random-resnet18" / "voc07_det" / "torchvision" / "trial0"
    rec = json.loads((trial / "metrics.json").read_text())
    assert rec["status"] == "ok" and rec["engine"] == "torchvision" and rec["preset"] == "smoke"
    assert {"AP", "AP50", "AP75"} <= set(rec["metrics"]) and all(0 <= rec["metrics"][k] <= 100 for k in ("AP", "AP50"))
    assert rec["effective"]["batch_size"] == 2 and rec["effective"]["iterations"] == 2
    assert rec["effective"]["world_size"] == 1 and rec["effective"]["device"] == "cpu"
    assert rec["weights_info"]["arch"] == "resnet18" and rec["seed"] == 0 and rec["protocol_hash"]
    assert (trial / "config.yaml").is_file() and json.loads((trial / "env.json").read_text())["seed"] == 0
    assert any((trial / "tensorboard").iterdir())
    mtime = (trial / "metrics.json").stat().st_mtime

    # rerun: the finished trial is skipped, and --engine detectron2 without detectron2 fails clearly
    assert main(args) == 1
    assert (trial / "metrics.json").stat().st_mtime == mtime
    # a different config in the same output is refused, not mixed in or overwritten
    assert main(args + ["solver.base_lr=0.01"]) == 1
    assert (trial / "metrics.json").stat().st_mtime == mtime
    try:
        import detectron2  # noqa: F401
    except ImportError:
        d2 = [a if a != "torchvision" else "detectron2" for a in args if not a.startswith("voc0712_det.")]
        d2[d2.index(str(out))] = str(tmp_path / "d2")
        d2[d2.index("voc0712_det,voc07_det")] = "voc07_det"
        assert main(d2) == 1
        rec = json.loads((tmp_path / "d2" / "random-resnet18" / "voc07_det" / "detectron2" / "trial0" / "metrics.json").read_text())
        assert rec["status"] == "failed" and "detectron2 is not importable" in rec["error"]


def test_run_all_works_as_a_script(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "transfer" / "run_all.py"), "--help"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--weights" in proc.stdout


def _sync_bn_worker(rank: int, world: int, init_file: str, x: torch.Tensor, queue) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        bn = convert_naive_sync_bn(torch.nn.Sequential(torch.nn.BatchNorm2d(3)))[0]
        part = x.chunk(world)[rank].clone().requires_grad_(True)
        y = bn(part)
        (y * torch.arange(1.0, 4.0).reshape(1, 3, 1, 1)).sum().backward()
        # numpy arrays travel by value: a tensor would travel as a shared-memory handle that the parent
        # may try to open after this process has exited (ConnectionResetError under load)
        queue.put((rank, y.detach().numpy(), part.grad.numpy(), bn.running_mean.numpy()))
    finally:
        torch.distributed.destroy_process_group()


def test_naive_sync_bn_matches_bn_on_the_whole_batch(tmp_path):
    """Two gloo processes with half a batch each give BN over the whole batch (outputs and gradients)."""
    import torch.multiprocessing as mp

    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5) * 3 + 1
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_sync_bn_worker, args=(r, 2, str(tmp_path / "pg"), x, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    ref_bn, ref_x = torch.nn.BatchNorm2d(3), x.clone().requires_grad_(True)
    ref = ref_bn(ref_x)
    (ref * torch.arange(1.0, 4.0).reshape(1, 3, 1, 1)).sum().backward()
    y = torch.cat([torch.from_numpy(r[1]) for r in results])
    grad = torch.cat([torch.from_numpy(r[2]) for r in results])
    assert torch.allclose(y, ref.detach(), atol=1e-5)
    assert torch.allclose(grad, ref_x.grad, atol=1e-4)
    assert torch.allclose(torch.from_numpy(results[0][3]), ref_bn.running_mean, atol=1e-5)


def test_grouped_batches_share_orientation_and_resume_mid_stream():
    groups = [0, 1, 1, 0, 1, 0, 0, 1, 1, 1]
    batches = GroupedBatchSampler(InfiniteSampler(len(groups), seed=0), groups, 3)
    it = iter(batches)
    for _ in range(20):
        b = next(it)
        assert len(b) == 3 and len({groups[i] for i, _ in b}) == 1
    # keys carry each index's place in the stream; a resumed sampler continues the same stream exactly
    full = [next(it) for _ in range(10)]
    places = [p for b in full for _, p in b]
    assert len(set(places)) == len(places)
    resumed = iter(GroupedBatchSampler(InfiniteSampler(len(groups), seed=0), groups, 3, start_batch=27))
    assert [next(resumed) for _ in range(3)] == full[7:10]
