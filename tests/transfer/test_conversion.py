"""Conversion: every input layout, built here from random torchvision ResNets, converts tensor for tensor."""
from __future__ import annotations

import pickle
import re

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from transfer.weights.files import convert_file, load_checkpoint_file, load_pickle
from transfer.weights.conversion import (ARCHS, ConversionError, c2_to_tv_name, d2_to_tv_name, detect_layout,
                                 expected_shapes,
                                 extract_backbone, infer_arch, to_detectron2, to_torchvision, tv_to_d2_name,
                                 verify_backbone)


def random_resnet(arch: str, seed: int) -> nn.Module:
    """A torchvision ResNet with random weights *and* random BN statistics (eval mode)."""
    torch.manual_seed(seed)
    m = getattr(torchvision.models, arch)(weights=None)
    for k, v in m.state_dict().items():
        if k.endswith("running_var"):
            v.uniform_(0.5, 1.5)
        elif v.is_floating_point():
            v.normal_(0, 0.1)
    return m.eval()


HEADS = {  # MoCo heads as they appear in the encoder's state dict (dims shrunk)
    "v1": {"fc.weight": (16, 512), "fc.bias": (16,)},
    "v2": {"fc.0.weight": (32, 512), "fc.0.bias": (32,), "fc.2.weight": (16, 32), "fc.2.bias": (16,)},
    "v3": {"fc.0.weight": (32, 512), "fc.1.weight": (32,), "fc.1.running_mean": (32,), "fc.1.num_batches_tracked": (),
           "fc.3.weight": (16, 32)},
    "tv": {"fc.weight": (10, 512), "fc.bias": (10,)},
}


def encoder_sd(m: nn.Module, head: str) -> dict:
    """State dict of ``m`` whose ``fc`` is replaced by the given MoCo head."""
    sd = {k: v for k, v in m.state_dict().items() if not k.startswith("fc.")}
    return {**sd, **{k: torch.randn(shape) for k, shape in HEADS[head].items()}}


def backbone_of(m: nn.Module) -> dict:
    """Reference: the source tensors that must arrive (no fc, no num_batches_tracked)."""
    return {k: v for k, v in m.state_dict().items() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}


def ref_d2_name(k: str) -> str:
    """Slow reference for the Detectron2 name, written independently with regexes on whole tokens."""
    k = re.sub(r"^layer(\d)\.", lambda m: f"res{int(m.group(1)) + 1}.", k)
    k = k if k.startswith("res") else "stem." + k
    k = re.sub(r"(^|\.)bn(\d)\.", r"\1conv\2.norm.", k)
    return k.replace(".downsample.0.", ".shortcut.").replace(".downsample.1.", ".shortcut.norm.")


def prefixed(sd: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in sd.items()}


def build(layout: str, q_model: nn.Module, k_model: nn.Module):
    """(checkpoint object, file suffix, expected detected layout) for one input layout."""
    head = {"moco_v1": "v1", "moco_v3": "v3"}.get(layout, "v2" if layout.startswith(("moco", "project")) else "tv")
    q, k = encoder_sd(q_model, head), encoder_sd(k_model, head)
    queue = {"module.queue": torch.randn(16, 8), "module.queue_ptr": torch.zeros(1, dtype=torch.long)}
    if layout in ("moco_v1", "moco_v2"):  # official main_moco.py checkpoint
        sd = {**prefixed(q, "module.encoder_q."), **prefixed(k, "module.encoder_k."), **queue}
        return {"epoch": 200, "arch": "resnet18", "state_dict": sd, "optimizer": {"state": {}, "param_groups": []}}, \
            ".pth.tar", "moco_v1v2"
    if layout == "project":  # pretrain/checkpoint.py: the official layout plus extras
        sd = {**prefixed(q, "module.encoder_q."), **prefixed(k, "module.encoder_k."), **queue}
        return {"epoch": 3, "arch": "resnet18", "state_dict": sd, "optimizer": {}, "config": {"model": {"dim": 16}},
                "global_step": 12, "rng": {"torch": torch.get_rng_state()}, "sampler": {"epoch": 3}}, ".pth", "moco_v1v2"
    if layout == "moco_nodp":
        return {"state_dict": {**prefixed(q, "encoder_q."), **prefixed(k, "encoder_k."), "queue": torch.randn(16, 8)}}, \
            ".pth", "moco_v1v2"
    if layout == "moco_v3":
        sd = {**prefixed(q, "module.base_encoder."), **prefixed(k, "module.momentum_encoder."),
              "module.predictor.0.weight": torch.randn(32, 16), "module.predictor.3.weight": torch.randn(16, 32)}
        return {"epoch": 100, "arch": "resnet18", "state_dict": sd, "optimizer": {}, "scaler": {}}, ".pth.tar", "moco_v3"
    if layout == "torchvision":
        return q, ".pth", "torchvision"
    if layout == "torchvision_nested":
        return {"state_dict": q}, ".pth", "torchvision"
    if layout == "module_prefixed":
        return prefixed(q, "module."), ".pth", "torchvision"  # DataParallel's module. is a wrapper, removed
    if layout == "backbone_model":
        return {"model": prefixed(q, "backbone."), "iteration": 5}, ".pth", "backbone_prefixed"
    if layout == "detectron2_pkl":  # MoCo's own converter output, with its stray stem.fc.* names
        model = {ref_d2_name(n): v.numpy() for n, v in backbone_of(q_model).items()}
        model["stem.fc.0.weight"] = np.zeros((32, 512), np.float32)
        return {"model": model, "__author__": "MOCO", "matching_heuristics": True}, ".pkl", "detectron2"
    raise KeyError(layout)


LAYOUTS = ["moco_v1", "moco_v2", "project", "moco_nodp", "moco_v3", "torchvision", "torchvision_nested",
           "module_prefixed", "backbone_model", "detectron2_pkl"]
ON_DISK = {"project", "moco_v3", "torchvision", "detectron2_pkl"}
WITH_KEY_ENCODER = {"moco_v1", "moco_v2", "project", "moco_nodp", "moco_v3"}


@pytest.fixture(scope="module")
def encoders():
    return random_resnet("resnet18", 1), random_resnet("resnet18", 2)


def write(obj, path):
    if path.suffix == ".pkl":
        path.write_bytes(pickle.dumps(obj, protocol=4))
    else:
        torch.save(obj, path)
    return path


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_converts_tensor_for_tensor(layout, encoders, tmp_path):
    q, k = encoders
    obj, suffix, want_layout = build(layout, q, k)
    # through the real on-disk format for one file of each kind; the others in memory to save test time
    ckpt = load_checkpoint_file(write(obj, tmp_path / f"in{suffix}")) if layout in ON_DISK else obj
    assert detect_layout(ckpt) == want_layout
    for encoder, src in [("query", q)] + ([("key", k)] if layout in WITH_KEY_ENCODER else []):
        backbone, info = extract_backbone(ckpt, encoder=encoder)
        ref = backbone_of(src)
        assert info["layout"] == want_layout and info["num_tensors"] == len(ref) == 100
        assert set(backbone) == set(ref)
        assert infer_arch(backbone) == "resnet18"
        verify_backbone(backbone, "resnet18")
        d2 = to_detectron2(backbone)
        assert len(d2) == len(ref) and not any(n.startswith("stem.fc") for n in d2)
        for name, tensor in ref.items():
            assert np.array_equal(d2[ref_d2_name(name)], tensor.numpy()), name
            assert torch.equal(backbone[name], tensor), name
        tv = to_torchvision(backbone)
        assert all(torch.equal(tv[n], t) for n, t in ref.items())
        if encoder == "query" and layout in ("moco_v1", "moco_v2", "project"):
            assert info["dropped"]["encoder_q.fc"] == (2 if layout == "moco_v1" else 4)
    if layout == "detectron2_pkl":
        assert info["dropped"] == {"stem.fc": 1}


def test_dropped_counts_by_prefix(encoders):
    obj, _, _ = build("moco_v2", *encoders)
    _, info = extract_backbone(obj)
    # 20 BN counters per encoder; the key encoder's 100 + 4 head tensors; the v2 head fc.0 / fc.2
    assert info["dropped"] == {"*.num_batches_tracked": 40, "encoder_q.fc": 4, "encoder_k.fc": 4, "queue": 1,
                               "queue_ptr": 1, "state_dict/encoder_k. (encoder key)": 100}
    assert info["wrappers_removed"] == {"module.": 250} and info["encoder_reason"].startswith("the layout's default")


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_names_and_shapes_match_torchvision(arch):
    with torch.device("meta"):  # no memory, no init cost: only names and shapes are needed
        sd = getattr(torchvision.models, arch)(weights=None).state_dict()
    ref = {k: tuple(v.shape) for k, v in sd.items() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    assert expected_shapes(arch) == ref
    assert infer_arch(ref) == arch
    for name in ref:
        assert tv_to_d2_name(name) == ref_d2_name(name) and d2_to_tv_name(ref_d2_name(name)) == name
    assert tv_to_d2_name("fc.weight") is None and tv_to_d2_name("layer1.0.bn1.num_batches_tracked") is None


def test_prefix_is_matched_at_the_start_only():
    # "module.encoder_q." inside another key must not be taken for the query encoder
    sd = {"head.module.encoder_q.conv1.weight": torch.zeros(64, 3, 7, 7)}
    with pytest.raises(ConversionError, match="unknown checkpoint layout.*Entries found: head.encoder_q"):
        extract_backbone(sd)


def test_wrong_depth_and_missing_tensor_fail(encoders):
    backbone, _ = extract_backbone(encoders[0].state_dict())
    with pytest.raises(ConversionError, match="does not match resnet50: .* missing .*wrong shape"):
        verify_backbone(backbone, "resnet50")
    partial = {n: t for n, t in backbone.items() if n != "layer3.1.bn2.running_var"}
    with pytest.raises(ConversionError, match=r"1 missing \[layer3.1.bn2.running_var\]"):
        verify_backbone(partial, "resnet18")
    partial = {n: t for n, t in backbone.items() if not n.startswith("layer4.1.")}
    with pytest.raises(ConversionError, match="cannot infer the ResNet depth"):
        infer_arch(partial)


def test_empty_model_and_key_encoder_of_single_network():
    with pytest.raises(ConversionError, match="empty model"):
        extract_backbone({"state_dict": {}, "epoch": 0})
    with pytest.raises(ConversionError, match="holds a single network: there is no 'key' encoder"):
        extract_backbone({"conv1.weight": torch.zeros(64, 3, 7, 7)}, encoder="key")


@pytest.fixture(scope="module")
def resnet50_moco(tmp_path_factory):
    q = random_resnet("resnet50", 3)  # the key encoder is a copy at init in MoCo; its values do not matter here
    head = {k: torch.randn(s) for k, s in (("fc.0.weight", (32, 2048)), ("fc.0.bias", (32,)), ("fc.2.weight", (8, 32)))}
    sd = {**prefixed({**q.state_dict(), **head}, "module.encoder_q."), **prefixed(q.state_dict(), "module.encoder_k."),
          "module.queue": torch.randn(8, 16)}
    path = tmp_path_factory.mktemp("r50") / "moco_r50.pth.tar"
    torch.save({"epoch": 1, "arch": "resnet50", "state_dict": sd, "optimizer": {}}, path)
    return q, path


def test_resnet50_torchvision_round_trip(resnet50_moco, tmp_path):
    q, path = resnet50_moco
    manifest = convert_file(path, tmp_path / "r50.pth", fmt="torchvision")
    assert manifest["arch"] == "resnet50" and manifest["num_tensors"] == 265
    sd = torch.load(tmp_path / "r50.pth", weights_only=True)
    model = torchvision.models.resnet50(weights=None).eval()
    msg = model.load_state_dict(sd, strict=False)
    assert set(msg.missing_keys) == {"fc.weight", "fc.bias"} and msg.unexpected_keys == []
    model.load_state_dict({**sd, "fc.weight": model.fc.weight, "fc.bias": model.fc.bias}, strict=True)
    model.fc = nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():  # the source's pooled features: everything up to its fc
        ref = torch.flatten(q.avgpool(q.layer4(q.layer3(q.layer2(q.layer1(q.maxpool(q.relu(q.bn1(q.conv1(x))))))))), 1)
        assert torch.equal(model(x), ref)


def test_resnet50_detectron2_c4_backbone(resnet50_moco, tmp_path):
    pytest.importorskip("detectron2")
    from detectron2.config import get_cfg
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.backbone.resnet import build_resnet_backbone

    q, path = resnet50_moco
    convert_file(path, tmp_path / "r50.pkl")
    obj = load_pickle(tmp_path / "r50.pkl")
    assert obj["__author__"] == "moco-transfer-suite" and obj["matching_heuristics"] is True
    cfg = get_cfg()  # R50-C4 backbone with MoCo's overlay: stride in the 3x3 conv
    cfg.MODEL.RESNETS.DEPTH, cfg.MODEL.RESNETS.OUT_FEATURES = 50, ["res4"]
    cfg.MODEL.RESNETS.STRIDE_IN_1X1, cfg.MODEL.BACKBONE.FREEZE_AT = False, 0
    backbone = build_resnet_backbone(cfg, ShapeSpec(channels=3)).eval()
    msg = backbone.load_state_dict({k: torch.as_tensor(v) for k, v in obj["model"].items()}, strict=False)
    assert msg.missing_keys == []
    assert {k.split(".")[0] for k in msg.unexpected_keys} == {"res5"}  # C4: res5 lives in the ROI head
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = q.layer3(q.layer2(q.layer1(q.maxpool(q.relu(q.bn1(q.conv1(x)))))))
        torch.testing.assert_close(backbone(x)["res4"], ref, rtol=1e-4, atol=1e-4)


def ref_c2_name(tv: str) -> str:
    """The caffe2 (MSRA) blob name of a torchvision backbone tensor, written from the blob names listed in
    Detectron2's c2_model_loading.py: branch2a/b/c are conv1/2/3, branch1 the shortcut, BN as _bn_{s,b,rm,riv}."""
    bn = {"weight": "s", "bias": "b", "running_mean": "rm", "running_var": "riv"}
    p = tv.split(".")
    if p[0] == "conv1":
        return "conv1_w"
    if p[0] == "bn1":
        return f"res_conv1_bn_{bn[p[1]]}"
    block = f"res{int(p[0][-1]) + 1}_{p[1]}_"
    if p[2] == "downsample":
        return block + ("branch1_w" if p[3] == "0" else f"branch1_bn_{bn[p[4]]}")
    branch = "branch2" + "abc"[int(p[2][-1]) - 1]
    return block + branch + ("_w" if p[2].startswith("conv") else f"_bn_{bn[p[3]]}")


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_caffe2_names_convert_to_torchvision_names(arch):
    shapes = expected_shapes(arch)
    for name in shapes:
        assert c2_to_tv_name(ref_c2_name(name)) == name
    for other in ("fc1000_w", "res2_0_branch2a_w_momentum", "res2_0_branch2d_w", "res6_0_branch1_w", "conv1_b"):
        assert c2_to_tv_name(other) is None


def test_flat_caffe2_dict_converts_with_folded_bn(tmp_path):
    """An ImageNet caffe2 file is a flat dict of blobs (detection ones nest under ``blobs``); BN as scale/bias."""
    r18 = random_resnet("resnet18", 3)
    sd = r18.state_dict()
    blobs = {ref_c2_name(k): v.numpy() for k, v in sd.items()
             if not k.startswith("fc.") and not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    blobs.update({"fc1000_w": np.zeros((1000, 512), np.float32), "fc1000_b": np.zeros(1000, np.float32)})
    assert detect_layout(blobs) == "msra_caffe2" == detect_layout({"blobs": blobs})
    backbone, info = extract_backbone(blobs)
    verify_backbone(backbone, "resnet18")
    assert info["filled_bn_stats"] == 2 * sum(1 for k in backbone if k.endswith("running_mean"))
    assert info["dropped"] == {"fc1000": 2}
    # eval-mode BN with the filled statistics is exactly the caffe2 affine x * s + b
    bn = nn.BatchNorm2d(64).eval()
    bn.load_state_dict({k[len("layer1.0.bn2."):]: v for k, v in backbone.items() if k.startswith("layer1.0.bn2.")},
                       strict=False)
    x = torch.randn(2, 64, 3, 3)
    s, b = torch.from_numpy(blobs["res2_0_branch2b_bn_s"]), torch.from_numpy(blobs["res2_0_branch2b_bn_b"])
    torch.testing.assert_close(bn(x), x * s[:, None, None] + b[:, None, None])
