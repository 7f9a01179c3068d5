"""Split BN (one encoder pass, per-group statistics) against the slow reference it replaces: the encoder
with plain BN run once per contiguous chunk of the batch (one copy per chunk = one emulated GPU)."""
from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from pretrain.moco import MoCo, build_encoder
from pretrain.shuffle_bn import (SplitBatchNorm2d, balanced_shuffle, convert_split_bn, grouped_forward,
                                 shuffled_key_forward)

# fp32: the same kernels on the same numbers, so equal in practice; the tolerance only allows for a
# different reduction order inside BN. fp64 shows the two computations are the same function.
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float64: dict(atol=1e-10, rtol=1e-10)}
GRAD_RTOL = {torch.float32: 1e-4, torch.float64: 1e-9}


def tiny_resnet(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=8).to(dtype).train()


def chunked_reference(encoder: nn.Module, images: torch.Tensor, groups: list[torch.Tensor]):
    """Slow reference: plain-BN ``encoder`` copies, one per group of row indices (all starting from the same
    running stats) -> (features (N, D) in input order, the copies)."""
    copies = [copy.deepcopy(encoder) for _ in groups]
    out = None
    for enc, idx in zip(copies, groups):
        f = enc(images[idx])
        out = f.new_zeros(images.shape[0], f.shape[1]) if out is None else out
        out[idx] = f
    return out, copies


def bn_layers(m: nn.Module) -> dict[str, nn.BatchNorm2d]:
    return {n: x for n, x in m.named_modules() if isinstance(x, nn.BatchNorm2d)}


def test_one_split_is_exactly_plain_bn():
    torch.manual_seed(0)
    plain = nn.BatchNorm2d(5)
    nn.init.normal_(plain.weight)
    split = convert_split_bn(copy.deepcopy(plain), 1)
    assert isinstance(split, SplitBatchNorm2d) and split.num_splits == 1
    x = torch.randn(6, 5, 4, 4, requires_grad=True)
    for train in (True, False):
        plain.train(train), split.train(train)
        y_p, y_s = plain(x), split(x)
        assert torch.equal(y_p, y_s)
        g_p = torch.autograd.grad(y_p.square().sum(), [x, plain.weight])
        g_s = torch.autograd.grad(y_s.square().sum(), [x, split.weight])
        assert all(torch.equal(a, b) for a, b in zip(g_p, g_s))
    for key, value in plain.state_dict().items():
        assert torch.equal(value, split.state_dict()[key])
    assert MoCo(lambda: build_encoder("resnet18", 8, False), dim=8, queue_size=8, bn_splits=1) \
        .encoder_q.bn1.__class__ is nn.BatchNorm2d  # 1 split: the encoder is left as torchvision built it


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_state_dict_keys_and_shapes_unchanged(arch):
    ref = getattr(torchvision.models, arch)()
    split = convert_split_bn(getattr(torchvision.models, arch)(), 8)
    assert len(bn_layers(split)) == len(bn_layers(ref))
    assert all(isinstance(m, SplitBatchNorm2d) and m.num_splits == 8 for m in bn_layers(split).values())
    assert {k: v.shape for k, v in split.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    ref.load_state_dict(split.state_dict())  # strict: no missing or unexpected key, both ways
    split.load_state_dict(ref.state_dict())
    m8 = MoCo(lambda: build_encoder(arch, 16, True, 32), dim=16, queue_size=8, bn_splits=8).state_dict()
    m1 = MoCo(lambda: build_encoder(arch, 16, True, 32), dim=16, queue_size=8, bn_splits=1).state_dict()
    assert {k: v.shape for k, v in m8.items()} == {k: v.shape for k, v in m1.items()}
    assert "encoder_q.layer1.0.bn1.weight" in m8 and "encoder_k.layer1.0.bn1.running_mean" in m8


def check_queries(plain: nn.Module, x: torch.Tensor, groups: int, tol: dict, grad_rtol: float) -> None:
    """Features, gradients and running statistics of one split-BN pass equal the per-chunk computation."""
    split = convert_split_bn(copy.deepcopy(plain), groups)
    ref, copies = chunked_reference(plain, x, list(torch.arange(x.shape[0]).chunk(groups)))
    out = grouped_forward(split, x, groups)
    torch.testing.assert_close(out, ref, **tol)
    # gradients: the sum over chunks (one emulated GPU each, as DDP would all-reduce)
    w = torch.randn_like(ref)
    (out * w).sum().backward()
    (ref * w).sum().backward()
    for name, p in split.named_parameters():
        expected = sum(dict(c.named_parameters())[name].grad for c in copies)
        # a weight gradient sums over the batch, in another order here: tolerance relative to its largest
        # entry (at least 1: a conv bias before BN has an exactly-zero gradient, up to rounding)
        scale = max(float(expected.abs().max()), 1.0)
        torch.testing.assert_close(p.grad, expected, rtol=grad_rtol, atol=grad_rtol * scale)
    # running stats: the mean over groups of what each chunk's BN accumulated; one step counted
    for name, bn in bn_layers(split).items():
        refs = [bn_layers(c)[name] for c in copies]
        torch.testing.assert_close(bn.running_mean, torch.stack([r.running_mean for r in refs]).mean(0), **tol)
        torch.testing.assert_close(bn.running_var, torch.stack([r.running_var for r in refs]).mean(0), **tol)
        assert int(bn.num_batches_tracked) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("groups", [2, 4])
def test_queries_equal_chunked_reference(dtype, groups):
    torch.manual_seed(1)
    x = torch.randn(16, 3, 32, 32, dtype=dtype) * 2 + 0.5
    check_queries(tiny_resnet(dtype), x, groups, TOL[dtype], GRAD_RTOL[dtype])


def test_channels_last_queries_equal_chunked_reference():
    """channels_last takes the other path (through the NCHW view, a transposing copy each way). In fp64,
    so the check is exact: in fp32 its BN kernel sums in another order than the reference's channels_last
    kernel (~1e-7 per layer), which a ResNet-18 on batches of 4 at 32 px grows to ~1e-5 in the features."""
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2),
                        nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    enc = enc.double().to(memory_format=torch.channels_last)
    x = (torch.randn(12, 3, 10, 10, dtype=torch.float64) * 2 + 0.5).to(memory_format=torch.channels_last)
    check_queries(enc, x, 3, TOL[torch.float64], GRAD_RTOL[torch.float64])
    split = convert_split_bn(copy.deepcopy(enc[:2]), 3)
    assert split(x).is_contiguous(memory_format=torch.channels_last)  # the layout the next conv expects


def test_eval_mode_is_plain_bn_with_running_stats():
    split = convert_split_bn(tiny_resnet(), 4)
    torch.manual_seed(1)
    for _ in range(3):  # move the running stats away from their initial values
        split(torch.randn(8, 3, 32, 32) * 3 + 1)
    plain = torchvision.models.resnet18(num_classes=8)
    plain.load_state_dict(split.state_dict())
    split.eval(), plain.eval()
    x = torch.randn(6, 3, 32, 32)  # any batch size: no groups in eval mode
    assert torch.equal(split(x), plain(x))


def test_cumulative_average_no_running_stats_no_affine():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 5, 5)
    for kwargs in (dict(momentum=None), dict(track_running_stats=False), dict(affine=False)):
        plain = nn.BatchNorm2d(3, **kwargs)
        split = convert_split_bn(copy.deepcopy(plain), 2)
        ref, copies = chunked_reference(nn.Sequential(plain, nn.Flatten()), x, list(torch.arange(8).chunk(2)))
        out = grouped_forward(nn.Sequential(split, nn.Flatten()), x, 2)
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
        if plain.track_running_stats:
            torch.testing.assert_close(split.running_var, (copies[0][0].running_var + copies[1][0].running_var) / 2)
    # conversion keeps dtype and device, also with no affine parameters to read them from
    assert convert_split_bn(nn.BatchNorm2d(3, affine=False).double(), 2).running_mean.dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("splits", [2, 4])
def test_shuffled_keys_equal_chunked_reference(dtype, splits):
    """Keys: the shuffled batch in ``splits`` BN groups, encoded once, equals encoding each shuffled group
    on its own with plain BN; the keys come back in input order."""
    plain = tiny_resnet(dtype)
    split = convert_split_bn(copy.deepcopy(plain), splits)
    torch.manual_seed(1)
    x = torch.randn(16, 3, 32, 32, dtype=dtype)
    torch.manual_seed(7)
    keys = shuffled_key_forward(split, x, splits)
    torch.manual_seed(7)  # the same permutation as inside shuffled_key_forward
    perm = balanced_shuffle(splits, 16 // splits)
    with torch.no_grad():
        ref, copies = chunked_reference(plain, x, list(perm.chunk(splits)))
    torch.testing.assert_close(keys, ref, **TOL[dtype])
    for name, bn in bn_layers(split).items():
        refs = [bn_layers(c)[name] for c in copies]
        torch.testing.assert_close(bn.running_var, torch.stack([r.running_var for r in refs]).mean(0), **TOL[dtype])


def test_mismatched_encoder_is_an_error():
    plain = tiny_resnet()
    x = torch.randn(8, 3, 32, 32)
    with pytest.raises(ValueError, match=r"split the batch into \[1\] groups, not 4"):
        grouped_forward(plain, x, 4)
    with pytest.raises(ValueError, match=r"\[2\] groups, not 4"):
        shuffled_key_forward(convert_split_bn(plain, 2), x, 4)
    with pytest.raises(ValueError, match="cannot be split into 3 equal BN groups"):
        SplitBatchNorm2d(3, 3)(torch.randn(8, 3, 2, 2))


def test_balanced_shuffle_takes_a_generator():
    a = balanced_shuffle(4, 6, generator=torch.Generator().manual_seed(3))
    b = balanced_shuffle(4, 6, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and sorted(a.tolist()) == list(range(24))
