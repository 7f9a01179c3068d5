"""Linear protocol: frozen backbone stays bit-identical, the lr schedule, resume, the fast probe."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision.models import resnet18

from pretrain.schedule import step_lr
from transfer.tasks.imagenet import LinearSolverConfig
from transfer.engines.torchvision.classification.linear import (
    BackboneChangedError,
    attach_linear_head,
    backbone_digest,
    feature_stats,
    holdout_mask,
    probe_with_wd_sweep,
    train_linear,
)

CPU = torch.device("cpu")


def test_step_lr_is_the_paper_schedule():
    lrs = [step_lr(30.0, e, [60, 80]) for e in range(100)]
    assert lrs[:60] == [30.0] * 60
    assert lrs[60:80] == pytest.approx([3.0] * 20)
    assert lrs[80:] == pytest.approx([0.3] * 20)


def _model_and_loaders(num_classes=3, n=12, seed=0):
    torch.manual_seed(seed)
    model = resnet18(weights=None)
    # non-trivial BN statistics, so that a forward in train mode would visibly change them
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    attach_linear_head(model, num_classes)
    g = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, num_classes, (n,), generator=g))
    return model, DataLoader(data, batch_size=4, shuffle=True), DataLoader(data, batch_size=5)


def test_attach_linear_head():
    model, _, _ = _model_and_loaders()
    assert model.fc.out_features == 3 and model.fc.in_features == 512
    assert torch.all(model.fc.bias == 0) and 0.005 < model.fc.weight.std().item() < 0.015  # N(0, 0.01)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"fc.weight", "fc.bias"}


def test_backbone_bit_identical_and_lr_followed(tmp_path):
    model, train, val = _model_and_loaders()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optim = LinearSolverConfig(batch_size=4, base_lr=0.3, epochs=3, steps=[1, 2], eval_period_epochs=1)
    metrics, history = train_linear(model, train, val, optim, CPU, checkpoint=tmp_path / "ckpt.pth")
    after = model.state_dict()
    for k, v in before.items():
        if k.startswith("fc."):
            assert not torch.equal(v, after[k]), f"{k} did not train"
        else:
            assert torch.equal(v, after[k]), f"backbone tensor {k} changed"
    # lr as read from the optimizer during each epoch
    assert [h["lr"] for h in history] == pytest.approx([0.3, 0.03, 0.003])
    assert set(metrics) == {"top1", "top5"} and all("top1" in h for h in history)
    assert (tmp_path / "ckpt.pth").is_file()


def test_changed_bn_buffer_fails_the_run():
    model, train, val = _model_and_loaders()

    def sneaky(module, inputs, output):  # e.g. a BN accidentally left in train mode
        model.layer1[0].bn1.running_mean.add_(1e-3)

    model.layer2.register_forward_hook(sneaky)
    with pytest.raises(BackboneChangedError, match="BN buffer changed"):
        train_linear(model, train, val, LinearSolverConfig(batch_size=4, base_lr=0.1, epochs=1), CPU)


def test_resume_continues_the_schedule(tmp_path):
    ckpt = tmp_path / "ckpt.pth"
    model, train, val = _model_and_loaders()
    train_linear(model, train, val, LinearSolverConfig(base_lr=0.3, epochs=2, steps=[2]), CPU, ckpt)
    fc_after_2 = model.fc.weight.clone()

    model2, _, _ = _model_and_loaders()  # same backbone, fresh head: the checkpoint restores the head
    _, history = train_linear(model2, train, val, LinearSolverConfig(base_lr=0.3, epochs=3, steps=[2]), CPU, ckpt)
    assert [h["epoch"] for h in history] == [0, 1, 2]
    assert history[2]["lr"] == pytest.approx(0.03)
    assert not torch.equal(model2.fc.weight, fc_after_2)  # one more epoch trained from the restored head

    other, _, _ = _model_and_loaders(seed=1)  # another backbone must not pick up this checkpoint
    with pytest.raises(BackboneChangedError, match="different backbone"):
        train_linear(other, train, val, LinearSolverConfig(epochs=4), CPU, ckpt)


def test_backbone_digest_ignores_head_only():
    model, _, _ = _model_and_loaders()
    d = backbone_digest(model)
    with torch.no_grad():
        model.fc.weight.add_(1)
        assert backbone_digest(model) == d
        model.layer4[1].bn2.running_var.mul_(1.0001)
    assert backbone_digest(model) != d


def test_feature_stats_chunked():
    x = torch.randn(1000, 7) * 3 + 1
    mean, std = feature_stats(x.half(), chunk_size=128)
    torch.testing.assert_close(mean, x.half().float().mean(0), atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(std, x.half().float().std(0, unbiased=False), atol=1e-3, rtol=1e-3)


def test_fast_probe_learns_and_splits_by_image():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 3

    def blobs(n):
        y = torch.randint(0, 4, (n,), generator=g)
        return centres[y] + torch.randn(n, 16, generator=g), y

    x, y = blobs(200)
    vx, vy = blobs(100)
    # two "views" of each image: rows i and i + 200 share image id i
    out = probe_with_wd_sweep(torch.cat([x, x + 0.1]), y.repeat(2), vx, vy, 4, [1e-4, 1e-1], CPU,
                              holdout_fraction=0.2, max_iter=50, chunk_size=64, groups=torch.arange(200).repeat(2))
    assert out["top1"] > 90 and out["top5"] == 100.0
    assert out["weight_decay"] in (1e-4, 1e-1) and out["holdout_top1"] > 80


def test_holdout_keeps_views_of_an_image_together():
    groups = torch.arange(50).repeat(3)  # 3 views of 50 images
    held = holdout_mask(groups, 0.1, seed=3)
    assert held.sum() == 15  # 5 images x 3 views
    for i in range(50):
        assert len(set(held[groups == i].tolist())) == 1
    assert not torch.equal(held, holdout_mask(groups, 0.1, seed=4))


class _TinyNet(nn.Module):
    """A ResNet-shaped stand-in (``fc`` head, a BN in the backbone) that runs in milliseconds."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).relu().mean((2, 3)))


def _gloo_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as torch_dist
    from torch.utils.data import DistributedSampler

    from transfer.engines.torchvision.classification import feature_cache

    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    # sharded extraction: rank r computes shards r, r + world, ...; every rank then reads all of them
    calls = []
    real = feature_cache.extract_shard
    feature_cache.extract_shard = lambda m, loader, d: calls.append(loader.dataset.indices[0]) or real(m, loader, d)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(23, 3, 6, 6, generator=g), torch.randint(0, 3, (23,), generator=g))
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Flatten(), nn.Linear(108, 5))
    feats, _, _ = feature_cache.get_or_extract(enc, data, Path(out_dir) / "cache", {"m": 1}, CPU, batch_size=4,
                                               workers=0, shard_size=5, dtype="float32")
    torch.manual_seed(0)
    model = attach_linear_head(_TinyNet(), 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loader = DataLoader(data, batch_size=4, sampler=DistributedSampler(data, world, rank, seed=0))
    val = DataLoader(torch.utils.data.Subset(data, range(rank, 23, world)), batch_size=4)
    metrics, history = train_linear(model, loader, val, LinearSolverConfig(base_lr=0.5, epochs=2), CPU,
                                    Path(out_dir) / "ckpt.pth")
    same = all(torch.equal(v, model.state_dict()[k]) for k, v in before.items() if not k.startswith("fc."))
    torch.save({"calls": calls, "feats": feats, "fc": model.fc.weight.detach(), "metrics": metrics,
                "backbone_same": same}, Path(out_dir) / f"rank{rank}.pt")
    torch_dist.destroy_process_group()


def test_two_gloo_processes(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_gloo_worker, args=(2, str(tmp_path / "store"), str(tmp_path)),
                       nprocs=2, join=True, start_method="fork")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert r0["calls"] == [0, 10, 20] and r1["calls"] == [5, 15]  # each shard extracted by one rank
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Flatten(), nn.Linear(108, 5))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        expected = enc(torch.randn(23, 3, 6, 6, generator=g))
    torch.testing.assert_close(r0["feats"], expected)
    assert torch.equal(r0["feats"], r1["feats"])
    assert torch.equal(r0["fc"], r1["fc"])  # DDP kept the heads in sync
    assert r0["backbone_same"] and r1["backbone_same"]
    assert r0["metrics"] == r1["metrics"]  # val summed over both ranks' halves
