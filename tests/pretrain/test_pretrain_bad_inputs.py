"""Bad input gives one clear message and damages nothing: folders, images, config keys, K, checkpoints."""
from __future__ import annotations

import shutil

import pytest
import torch

from pretrain_helpers import SMOKE, load_cli, tiny_config
from pretrain import checkpoint as ckpt_io
from pretrain.checkpoint_writer import CheckpointWriter
from pretrain.config import check_run, load_pretrain_config
from pretrain.data.augment import TwoCropsTransform, build_augmentation
from pretrain.data.folder import ClassFolderPairs
from pretrain.engine import train_one_epoch
from pretrain.main import main
from pretrain.moco import build_moco
from pretrain.utils.config import ConfigError
from pretrain.utils.io import CheckpointError

AUG = TwoCropsTransform(build_augmentation("v2", 32))


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"not found: .*nope/train .*ROOT/train/<class>/\*\.JPEG"):
        ClassFolderPairs(tmp_path / "nope", AUG)
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no class folders"):
        ClassFolderPairs(tmp_path / "empty", AUG)
    (tmp_path / "empty" / "train" / "n0").mkdir()
    (tmp_path / "empty" / "train" / "n0" / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="no images"):
        ClassFolderPairs(tmp_path / "empty", AUG)


def test_corrupt_images_are_skipped_and_counted(tmp_path, tiny_folders):
    root = tmp_path / "data"
    shutil.copytree(tiny_folders, root)
    first = sorted((root / "train" / "n00000000").iterdir())
    first[0].write_bytes(first[0].read_bytes()[:200])  # truncated JPEG
    first[1].write_bytes(b"not an image at all")
    ds = ClassFolderPairs(root, AUG)
    im_q, im_k, skipped = ds[(0, 0)]
    assert int(skipped) == 2 and im_q.shape == (3, 32, 32)  # the next readable image stands in
    assert int(ds[(1, 0)][2]) == 0  # known bad files are not counted twice
    summary = main(tiny_config(root, tmp_path / "out", "solver.epochs=1", "model.arch=resnet18"))
    assert summary["stats"]["skipped_images"] == 2  # each file once, logged as a warning by the loop


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="queue_sizee"):
        load_pretrain_config(SMOKE, ["model.queue_sizee=3"])
    with pytest.raises(ConfigError, match="data.aug='v3'"):
        load_pretrain_config(SMOKE, ["data.aug=v3"])
    with pytest.raises(ConfigError, match="run.last_period_epochs=0: must be at least 1"):
        load_pretrain_config(SMOKE, ["run.last_period_epochs=0"])
    cfg = load_pretrain_config(SMOKE, ["model.queue_size=100", "solver.batch_size=32"])
    with pytest.raises(ConfigError, match="queue_size=100 must be a multiple of the global batch"):
        check_run(cfg, world_size=1)
    assert load_cli()(["--config", str(SMOKE), "optim.lrr=1"]) == 2  # one line on stderr, exit code 2


def test_a_wrong_type_names_the_key_the_value_and_the_type(tmp_path, capsys):
    for override, kind in [("solver.iterations=abc", "int"), ("solver.base_lr=fast", "float"),
                           ("model.mlp=maybe", "bool"), ("solver.steps=[1,x]", "list of int"), ("solver=3", "mapping")]:
        with pytest.raises(ConfigError) as e:
            load_pretrain_config(SMOKE, [override])
        assert str(e.value) == f"{override}: expected {kind}"
    assert load_cli()(["--config", str(SMOKE), "solver.iterations=abc"]) == 2
    assert capsys.readouterr().err == "error: solver.iterations=abc: expected int\n"
    (tmp_path / "bad.yaml").write_text("solver:\n  iterations: abc\n")  # in a file: the file and the key
    with pytest.raises(ConfigError, match=rf"^invalid config \(from {tmp_path / 'bad.yaml'}\): solver\.iterations: "
                                          r"Value 'abc' of type 'str' could not be converted to Integer$"):
        load_pretrain_config(tmp_path / "bad.yaml")


def _saved(tmp_path, *overrides):
    cfg = tiny_config(tmp_path, tmp_path, *overrides)
    model = build_moco(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / f"ckpt_{len(overrides)}.pth"
    ckpt_io.save_checkpoint(path, model=model, optimizer=opt, epoch=3, arch=cfg.model.arch, config={},
                            global_step=12, sampler={"epoch": 3, "start_iter": 0})
    return path, model


def test_checkpoint_of_another_arch_or_layout(tmp_path):
    path, _ = _saved(tmp_path)  # resnet18, v2 MLP head
    other = build_moco(tiny_config(tmp_path, tmp_path, "model.arch=resnet34"))
    with pytest.raises(CheckpointError, match="arch is 'resnet18' but model.arch is 'resnet34'"):
        ckpt_io.load_checkpoint(path, other, None, "resnet34")
    v1 = build_moco(tiny_config(tmp_path, tmp_path, "model.mlp=false"))
    with pytest.raises(CheckpointError, match="check model.mlp"):
        ckpt_io.load_checkpoint(path, v1, None, "resnet18")
    big_queue = build_moco(tiny_config(tmp_path, tmp_path, "model.queue_size=64"))
    with pytest.raises(CheckpointError, match="shapes differ"):
        ckpt_io.load_checkpoint(path, big_queue, None, "resnet18")
    v3 = tmp_path / "v3.pth"
    torch.save({"epoch": 1, "state_dict": {"module.base_encoder.conv1.weight": torch.zeros(1)}}, v3)
    with pytest.raises(CheckpointError, match="MoCo v3 layout"):
        ckpt_io.load_checkpoint(v3, v1, None, "resnet18")
    before = path.read_bytes()
    (tmp_path / "trunc.pth").write_bytes(before[: len(before) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        ckpt_io.load_checkpoint(tmp_path / "trunc.pth", v1, None, "resnet18")
    assert path.read_bytes() == before  # nothing already written is damaged


@pytest.mark.parametrize("head", ["model.mlp=false", "model.mlp=true"])  # v1 linear head, v2 MLP head
def test_official_checkpoint_loads(tmp_path, head):
    """A checkpoint with only the official keys (epoch/arch/state_dict/optimizer) resumes at its epoch."""
    path, model = _saved(tmp_path, head)
    full = torch.load(path, weights_only=True)
    official = {k: full[k] for k in ("epoch", "arch", "state_dict", "optimizer")}
    torch.save(official, tmp_path / "official.pth")
    fresh = build_moco(tiny_config(tmp_path, tmp_path, head))
    opt = torch.optim.SGD(fresh.parameters(), lr=0.1)
    point = ckpt_io.load_checkpoint(tmp_path / "official.pth", fresh, opt, "resnet18", iters_per_epoch=4)
    assert (point.epoch, point.start_iter, point.global_step, point.official) == (3, 0, 12, True)
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v)


class _NanAt(torch.nn.Module):
    """A stand-in for MoCo: logits (B, 2) from one weight; the batch whose images are nan gives a nan loss."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))

    def forward(self, im_q, im_k):
        x = im_q.mean(dim=(1, 2, 3)) * self.w
        return torch.stack([x, -x], dim=1), torch.zeros(im_q.shape[0], dtype=torch.long)


def test_a_non_finite_loss_stops_the_epoch_naming_its_iteration():
    good, bad = torch.ones(2, 3, 4, 4), torch.full((2, 3, 4, 4), float("nan"))
    batches = [(b, b, torch.zeros(2)) for b in (good, bad, good, good)]
    model = _NanAt()
    with pytest.raises(FloatingPointError, match=r"^loss became nan at epoch 3 iteration 7 \(step 27\); "
                                                 r"seen at iteration 8$"):
        train_one_epoch(model, batches, torch.optim.SGD(model.parameters(), lr=0.1), epoch=3, num_iters=4,
                        start_iter=5, global_step=25, lr_fn=lambda e, s: 0.1, device=torch.device("cpu"),
                        log_period=3)
    stats, step = train_one_epoch(model := _NanAt(), batches[:1] * 3, torch.optim.SGD(model.parameters(), lr=0.1),
                                  epoch=0, num_iters=3, start_iter=0, global_step=0, lr_fn=lambda e, s: 0.1,
                                  device=torch.device("cpu"), log_period=3)
    assert step == 3 and stats["iterations"] == 3  # finite losses: no error


def test_a_diverged_run_exits_1_and_keeps_the_last_good_checkpoint(tmp_path, tiny_folders, capsys):
    """lr 1e12: step 1 is finite (checkpointed), step 2's loss is nan: the run stops, nothing nan is written."""
    out = tmp_path / "out"
    args = [f"data.root={tiny_folders}", f"run.output_dir={out}", "data.image_size=16", "solver.batch_size=4",
            "data.num_workers=0", "model.queue_size=8", "model.mlp_hidden=64", "solver.iterations=2",
            "solver.checkpoint_period=1", "log_period=1", "run.tensorboard=false", "knn.period_epochs=0",
            "solver.base_lr=1e12"]
    assert load_cli()(["--config", str(SMOKE), *args]) == 1
    last = out / ckpt_io.LAST
    err = "error: " + capsys.readouterr().err.rpartition("error: ")[2].strip()  # after the progress bar
    assert err == (f"error: loss became nan at epoch 0 iteration 2 (step 2); the last good checkpoint is kept: {last} "
                   f"(rerun with --resume auto, e.g. with a lower solver.base_lr)")
    kept = torch.load(last, weights_only=True)
    assert kept["global_step"] == 1 and sorted(p.name for p in out.glob("*.pth")) == [ckpt_io.LAST]
    assert all(torch.isfinite(v).all() for v in kept["state_dict"].values() if v.is_floating_point())


def test_non_finite_weights_are_never_written(tmp_path):
    cfg = tiny_config(tmp_path, tmp_path / "out")
    model = build_moco(cfg)
    writer = CheckpointWriter(cfg, model, torch.optim.SGD(model.parameters(), lr=0.1), num_epochs=2)
    writer.write(ckpt_io.LAST, 0, 1, 1)
    before = writer.last.read_bytes()
    with torch.no_grad():
        model.encoder_q.conv1.weight[0, 0, 0, 0] = float("inf")
        model.queue[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"^2 tensor\(s\) became non-finite by step 2, e.g. "
                                                 r"\['queue', 'encoder_q.conv1.weight'\]; checkpoint not written$"):
        writer.write(ckpt_io.LAST, 0, 2, 2)
    assert writer.last.read_bytes() == before
    assert writer.kept() == (f"the last good checkpoint is kept: {writer.last} (rerun with --resume auto, "
                             f"e.g. with a lower solver.base_lr)")
    fresh = tiny_config(tmp_path, tmp_path / "fresh")
    assert CheckpointWriter(fresh, model, writer.optimizer, 2).kept() == "no checkpoint was written"
