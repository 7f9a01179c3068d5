"""End-to-end pretraining on tiny synthetic data (CPU): checkpoint layout, kill-and-resume, shards, torchrun."""
from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import tarfile

import pytest
import torch

from pretrain_helpers import REPO, tiny_config
from pretrain import checkpoint as ckpt_io
from pretrain.data.synthetic import shard_pattern
from pretrain.main import main
from pretrain.utils.io import safe_torch_load


@pytest.mark.usefixtures("one_thread")  # tests/conftest.py: no oversubscribed CPU
def test_checkpoint_has_official_layout_and_resumes_exactly(tmp_path, tiny_folders, monkeypatch):
    small = "data.image_size=16"  # cheaper steps; the 32 px images are cropped smaller
    # uninterrupted: 2 epochs x 4 iterations
    main(tiny_config(tiny_folders, tmp_path / "full", small))
    full = safe_torch_load(tmp_path / "full" / ckpt_io.LAST)
    assert {"epoch", "arch", "state_dict", "optimizer", "config", "global_step", "rng", "sampler"} <= set(full)
    assert (full["epoch"], full["arch"], full["global_step"]) == (2, "resnet18", 8)
    keys = set(full["state_dict"])
    assert {"module.queue", "module.queue_ptr", "module.encoder_q.fc.0.weight", "module.encoder_q.fc.2.weight",
            "module.encoder_k.fc.0.weight", "module.encoder_q.conv1.weight"} <= keys
    assert all(k.startswith(("module.encoder_q.", "module.encoder_k.", "module.queue")) for k in keys)
    for name in ("config.yaml", "env.json", "effective.json", "checkpoint_0002.pth"):
        assert (tmp_path / "full" / name).is_file(), name
    assert json.loads((tmp_path / "full" / "effective.json").read_text())["iterations"] == 8

    # killed right after the mid-epoch checkpoint at step 6 (epoch 1, iteration 2) ...
    real_save = ckpt_io.save_checkpoint

    def save_then_die(path, **kw):
        real_save(path, **kw)
        if kw["global_step"] == 6:
            raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(ckpt_io, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        main(tiny_config(tiny_folders, tmp_path / "killed", small, "solver.checkpoint_period=3"))
    monkeypatch.setattr(ckpt_io, "save_checkpoint", real_save)
    assert safe_torch_load(tmp_path / "killed" / ckpt_io.LAST)["sampler"] == {"epoch": 1, "start_iter": 2}
    # ... and resumed: the same weights, queue and optimizer state as the uninterrupted run
    main(tiny_config(tiny_folders, tmp_path / "killed", small, "solver.checkpoint_period=3", "run.resume=auto"))
    resumed = safe_torch_load(tmp_path / "killed" / ckpt_io.LAST)
    assert resumed["global_step"] == 8
    for k, v in full["state_dict"].items():
        assert torch.allclose(resumed["state_dict"][k].float(), v.float(), atol=1e-6, rtol=0), k
    for a, b in zip(full["optimizer"]["state"].values(), resumed["optimizer"]["state"].values()):
        assert torch.allclose(a["momentum_buffer"], b["momentum_buffer"], atol=1e-6, rtol=0)


def _bad_shard(path, good_jpg: bytes) -> None:
    """A shard with one corrupt image among good ones."""
    with tarfile.open(path, "w") as tar:
        for key, payload in (("bad", b"\xff\xd8 not a jpeg"), ("ok1", good_jpg), ("ok2", good_jpg)):
            info = tarfile.TarInfo(f"{key}.jpg")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def test_shards_run_iteration_based(tmp_path, tiny_shards):
    with tarfile.open(tiny_shards[0]) as tar:
        good = tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith(".jpg"))).read()
    _bad_shard(tmp_path / "bad.tar", good)
    pattern = f"{shard_pattern(tiny_shards)},{tmp_path / 'bad.tar'}"
    cfg = tiny_config(tmp_path, tmp_path / "out", "data.kind=shards", f"data.pattern={pattern}",
                      "data.shuffle_buffer=8", "solver.iterations=3", "solver.schedule=exp_step",
                      "solver.step_period=2", "solver.gamma=0.5", "solver.checkpoint_period=2")
    summary = main(cfg)
    assert summary["global_step"] == 3
    assert summary["skipped_images_total"] >= 1  # the corrupt sample was skipped and counted
    ckpt = safe_torch_load(tmp_path / "out" / ckpt_io.LAST)
    assert ckpt["global_step"] == 3
    assert summary["stats"]["lr"] == pytest.approx(cfg.solver.base_lr * 0.5)  # step 2 is past the first decay
    eff = json.loads((tmp_path / "out" / "effective.json").read_text())
    assert eff["iterations"] == 3 and eff["schedule"] == "exp_step" and eff["epochs"] is None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_pretrain_sh_two_cpu_processes_and_names_the_failing_ranks_error(tmp_path, tiny_folders):
    """Two CPU processes under torchrun train an epoch; then every rank fails (the kNN monitor's val folder is
    missing) and torchrun's summary, which buries a rank's error, is followed by its first error line."""
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    cmd = ["bash", str(REPO / "tools" / "pretrain.sh"), "--nproc", "2", "--master-port", str(_free_port()),
           "--config", str(REPO / "configs" / "pretrain" / "smoke.yaml"),
           f"data.root={tiny_folders}", f"run.output_dir={out}", "run.device=cpu", "data.image_size=32",
           "solver.batch_size=16", "data.num_workers=0", "model.queue_size=32", "model.mlp_hidden=64",
           "model.shuffle_bn_splits=1", "solver.epochs=1", "run.tensorboard=false", "knn.period_epochs=1",
           f"knn.train_root={tiny_folders / 'train'}", f"knn.val_root={tmp_path / 'nowhere' / 'val'}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    eff = json.loads((out / "effective.json").read_text())
    assert (eff["world_size"], eff["batch_per_process"], eff["iters_per_epoch"]) == (2, 8, 4)
    ckpt = safe_torch_load(out / ckpt_io.LAST)  # written before the monitor ran
    assert ckpt["global_step"] == 4 and int(ckpt["state_dict"]["module.queue_ptr"]) == 0  # 4 x 16 keys wrapped K=32
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "failed first with: error: dataset folder not found" in last and "nowhere/val" in last, last


def test_training_steps_lower_the_loss(tmp_path, tiny_folders):
    """The project's step on real augmented views lowers Eq. 1 on that batch (fixed keys and queue)."""
    import torch.nn.functional as F

    from pretrain.data.loader import build_pretrain_loader
    from pretrain.engine import train_step
    from pretrain.moco import build_moco, info_nce_logits
    from pretrain.shuffle_bn import grouped_forward, shuffled_key_forward

    cfg = tiny_config(tiny_folders, tmp_path, "model.queue_size=64")
    torch.manual_seed(0)
    model = build_moco(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader, sampler, _ = build_pretrain_loader(cfg, 16)
    sampler.set_epoch(0)
    im_q, im_k, _ = next(iter(loader))
    queue0 = model.queue.clone()
    torch.manual_seed(1)
    with torch.no_grad():
        k = F.normalize(shuffled_key_forward(model.encoder_k, im_k, model.bn_splits), dim=1)

    def fixed_objective() -> float:
        with torch.no_grad():
            q = F.normalize(grouped_forward(model.encoder_q, im_q, model.bn_splits), dim=1)
            logits = info_nce_logits(q, k, queue0, model.temperature)
            return float(F.cross_entropy(logits, torch.zeros(16, dtype=torch.long)))

    before = fixed_objective()
    for _ in range(4):
        torch.manual_seed(1)  # the same key shuffle as ``k`` above
        train_step(model, opt, im_q, im_k, amp_bf16=False)
    after = fixed_objective()
    assert after < before - 0.1, (before, after)
