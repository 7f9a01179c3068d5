"""The supervised counterparts (issue 17): the MSRA caffe2 layout end to end on the built-in engine, the
stride-in-1x1 ResNet, ``--weights supervised`` offline and cached, and refused input-setting mismatches.

The MSRA file is a random ResNet-50 written here in caffe2 names (``conv1_w``, ``res_conv1_bn_s``,
``res2_0_branch2a_w`` ...; the names Detectron2's ``c2_model_loading.py`` converts), BN folded into scale
and bias, under ``blobs`` with a ``fc1000`` head and a ``_momentum`` blob, pickled as Python 2 did.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import pickle
import urllib.error

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

from pretrain.utils.io import CheckpointError
from transfer.engines.torchvision.backbone import (WeightLoadError, build_backbone_resnet, load_resnet_weights,
                                                   stride_in_1x1_of)
from transfer.engines.torchvision.classification.imagenet import build_feature_backbone, eval_tf
from transfer.engines.torchvision.detection.c4 import build_faster_rcnn_c4, c4_head_keys
from transfer.engines.torchvision.detection.fpn import build_rcnn_fpn, fpn_new_keys
from transfer.tasks.imagenet import ImageNetDataConfig
from transfer.weights import supervised
from transfer.weights.conversion import ConversionError
from transfer.weights.files import convert_file, load_pickle, manifest_path
from transfer.weights.resolve import load_backbone_weights

# Detectron2's config defaults (detectron2/config/defaults.py): what the MSRA weights were trained with
D2_BGR_MEAN, D2_STD = [103.530, 116.280, 123.675], [1.0, 1.0, 1.0]
R50_BLOCKS = (3, 4, 6, 3)


def caffe2_resnet50(seed: int = 0) -> dict:
    """Random caffe2-named ResNet-50 blobs; scales keep activations of order 1 through 16 blocks."""
    rng = np.random.default_rng(seed)
    blobs = {}

    def conv(name, cout, cin, k):
        blobs[name + "_w"] = (rng.standard_normal((cout, cin, k, k)) * np.sqrt(2.0 / (cin * k * k))).astype(np.float32)

    def affine(name, c, scale):
        blobs[name + "_bn_s"] = rng.uniform(0.5, 1.0, c).astype(np.float32) * scale
        blobs[name + "_bn_b"] = rng.normal(0.0, 0.1, c).astype(np.float32)

    conv("conv1", 64, 3, 7)
    affine("res_conv1", 64, 1.0)
    inplanes = 64
    for s, n in zip(range(2, 6), R50_BLOCKS):
        planes = 64 * 2 ** (s - 2)
        for b in range(n):
            pre = f"res{s}_{b}_"
            for branch, (cout, cin, k), scale in (("branch2a", (planes, inplanes, 1), 1.0),
                                                  ("branch2b", (planes, planes, 3), 1.0),
                                                  ("branch2c", (planes * 4, planes, 1), 0.2)):
                conv(pre + branch, cout, cin, k)
                affine(pre + branch, cout, scale)
            if b == 0:
                conv(pre + "branch1", planes * 4, inplanes, 1)
                affine(pre + "branch1", planes * 4, 1.0)
            inplanes = planes * 4
    blobs["fc1000_w"] = rng.standard_normal((1000, 2048)).astype(np.float32)
    blobs["fc1000_b"] = np.zeros(1000, np.float32)
    blobs["res2_0_branch2a_w_momentum"] = np.zeros_like(blobs["res2_0_branch2a_w"])
    return blobs


def reference_features(blobs: dict, x: torch.Tensor) -> torch.Tensor:
    """Caffe2's ResNet-50 forward written with functional ops on the raw blobs: x (N, 3, H, W), BGR minus
    the mean, std 1 -> pooled (N, 2048). AffineChannel after each conv; the stride in the 1x1 ``branch2a``."""
    def cbn(x, conv, bn, stride=1, pad=0):
        y = F.conv2d(x, torch.from_numpy(blobs[conv + "_w"]), stride=stride, padding=pad)
        s, b = torch.from_numpy(blobs[bn + "_bn_s"]), torch.from_numpy(blobs[bn + "_bn_b"])
        return y * s[:, None, None] + b[:, None, None]

    x = F.max_pool2d(F.relu(cbn(x, "conv1", "res_conv1", stride=2, pad=3)), 3, 2, 1)
    for s, n in zip(range(2, 6), R50_BLOCKS):
        for b in range(n):
            pre, stride = f"res{s}_{b}_", 2 if (b == 0 and s > 2) else 1
            out = F.relu(cbn(x, pre + "branch2a", pre + "branch2a", stride=stride))
            out = F.relu(cbn(out, pre + "branch2b", pre + "branch2b", pad=1))
            out = cbn(out, pre + "branch2c", pre + "branch2c")
            x = F.relu(out + (cbn(x, pre + "branch1", pre + "branch1", stride=stride) if b == 0 else x))
    return x.mean(dim=(2, 3))


@pytest.fixture(scope="module")
def msra(tmp_path_factory):
    """(folder, blobs, the raw caffe2 pickle, its Detectron2 .pkl and torchvision .pth converter outputs)."""
    d = tmp_path_factory.mktemp("msra")
    blobs = caffe2_resnet50()
    with open(d / "R-50.pkl", "wb") as f:
        pickle.dump({"blobs": blobs}, f, protocol=2)
    convert_file(d / "R-50.pkl", d / "msra_d2.pkl")
    convert_file(d / "R-50.pkl", d / "msra_tv.pth")
    return d, blobs


@pytest.fixture(scope="module")
def w_msra(msra):
    """The raw caffe2 pickle resolved by name (read once: a ResNet-50 file takes seconds)."""
    return load_backbone_weights(f"supervised_msra={msra[0] / 'R-50.pkl'}")


def test_msra_pickle_converts_with_the_msra_manifest(msra):
    d, blobs = msra
    for out in ("msra_d2.pkl", "msra_tv.pth"):
        m = json.loads(manifest_path(d / out).read_text())
        assert (m["layout"], m["arch"], m["input_format"], m["pixel_mean"], m["pixel_std"], m["stride_in_1x1"]) == \
            ("msra_caffe2", "resnet50", "BGR", D2_BGR_MEAN, D2_STD, True)
        o = m["detectron2_overlay"]
        assert (o["INPUT.FORMAT"], o["MODEL.PIXEL_MEAN"], o["MODEL.PIXEL_STD"], o["MODEL.RESNETS.STRIDE_IN_1X1"]) == \
            ("BGR", D2_BGR_MEAN, D2_STD, True)
        assert m["dropped"] == {"fc1000": 2, "*_momentum": 1}
    # the Detectron2 output holds the blobs under Detectron2's names (c2_model_loading's renaming), BN folded
    model = load_pickle(d / "msra_d2.pkl")["model"]
    np.testing.assert_array_equal(model["res3.0.conv1.weight"], blobs["res3_0_branch2a_w"])
    np.testing.assert_array_equal(model["res5.0.shortcut.norm.weight"], blobs["res5_0_branch1_bn_s"])
    np.testing.assert_array_equal(model["stem.conv1.norm.bias"], blobs["res_conv1_bn_b"])
    assert not model["res2.1.conv2.norm.running_mean"].any()


def test_msra_weights_resolve_with_their_input_settings(msra, w_msra):
    d, blobs = msra
    w = w_msra
    assert (w.name, w.kind, w.layout, w.input_format, w.pixel_mean, w.pixel_std, w.stride_in_1x1) == \
        ("supervised_msra", "supervised_msra", "msra_caffe2", "BGR", D2_BGR_MEAN, D2_STD, True)
    torch.testing.assert_close(w.state_dict["layer4.2.conv3.weight"], torch.from_numpy(blobs["res5_2_branch2c_w"]))
    torch.testing.assert_close(w.state_dict["layer1.0.downsample.1.weight"],
                               torch.from_numpy(blobs["res2_0_branch1_bn_s"]))
    # the converter outputs, given as plain files, read back with the same tensors and settings
    for out in ("msra_d2.pkl", "msra_tv.pth"):
        o = load_backbone_weights(str(d / out))
        assert (o.kind, o.layout, o.input_format, o.pixel_mean, o.stride_in_1x1) == \
            ("checkpoint", "msra_caffe2", "BGR", D2_BGR_MEAN, True)
        assert set(o.state_dict) == set(w.state_dict) and all(torch.equal(o.state_dict[k], v)
                                                              for k, v in w.state_dict.items())
        # what a Detectron2 engine sets: the same from the manifest and from weights resolved on the fly
        assert w.detectron2_overlay() == json.loads(manifest_path(d / out).read_text())["detectron2_overlay"]


def test_stride_placements_differ_and_each_loads_its_own_weights(w_msra):
    w_tv = dataclasses.replace(w_msra, name="as_torchvision", stride_in_1x1=False)  # same tensors, 3x3 stride
    x = torch.randn(2, 3, 64, 64)
    feats, models = {}, {}
    for w in (w_msra, w_tv):
        model = models[w.stride_in_1x1] = build_backbone_resnet(w).eval()
        assert stride_in_1x1_of(model) is w.stride_in_1x1
        assert model.layer3[0].conv1.stride == ((2, 2) if w.stride_in_1x1 else (1, 1))
        load_resnet_weights(model, w)  # exactly fc missing, else it raises
        with torch.no_grad():
            feats[w.stride_in_1x1] = model(x)
    assert feats[True].shape == feats[False].shape and not torch.allclose(feats[True], feats[False], atol=1e-3)
    with pytest.raises(WeightLoadError, match="need the stride in the 1x1 conv"):
        load_resnet_weights(models[False], w_msra)
    with pytest.raises(WeightLoadError, match="need the stride in the 3x3 conv"):
        load_resnet_weights(models[True], w_tv)


def test_msra_features_on_bgr_input_equal_the_caffe2_reference(msra, w_msra):
    d, blobs = msra
    w = w_msra
    rgb = np.random.default_rng(1).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    x = eval_tf(ImageNetDataConfig(image_size=48, resize_size=48), w)(Image.fromarray(rgb))
    with torch.no_grad():
        got = build_feature_backbone(w, torch.device("cpu"))(x[None])
    bgr = torch.from_numpy(rgb[..., ::-1].astype(np.float32) - np.float32(D2_BGR_MEAN)).permute(2, 0, 1)
    want = reference_features(blobs, bgr[None])
    assert want.abs().max() > 0.1  # a live network, not a vanishing one
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


@pytest.mark.parametrize("build,heads", [
    (lambda w: build_faster_rcnn_c4(w, num_classes=3), c4_head_keys),
    (lambda w: build_rcnn_fpn(w, num_classes=3), fpn_new_keys),
], ids=["c4", "fpn"])
def test_msra_weights_load_into_the_detectors_with_exactly_the_heads_missing(msra, w_msra, build, heads):
    d, blobs = msra
    model = build(w_msra)  # raises unless exactly the heads are missing
    sd = model.state_dict()
    assert heads(model) and all(not k.startswith(("backbone.conv1", "backbone.body.conv1")) for k in heads(model))
    res3 = next(m for k, m in model.named_modules() if k.endswith("layer2"))
    assert res3[0].conv1.stride == (2, 2) and res3[0].conv2.stride == (1, 1)
    torch.testing.assert_close(res3[0].conv1.weight.detach(), torch.from_numpy(blobs["res3_0_branch2a_w"]))
    # BGR, mean, std 1 reach the detector's normalisation (0-1 scale there)
    torch.testing.assert_close(torch.tensor(model.transform.image_mean) * 255, torch.tensor(D2_BGR_MEAN))
    torch.testing.assert_close(torch.tensor(model.transform.image_std) * 255, torch.tensor(D2_STD))
    assert len(sd) > len(heads(model))


def test_mismatched_settings_are_refused(msra, tmp_path):
    d, _ = msra
    (tmp_path / "w.pkl").write_bytes((d / "msra_d2.pkl").read_bytes())
    m = json.loads(manifest_path(d / "msra_d2.pkl").read_text())
    m["input_format"], m["pixel_mean"] = "RGB", D2_BGR_MEAN[::-1]  # the user "fixes" the colour order
    manifest_path(tmp_path / "w.pkl").write_text(json.dumps(m))
    with pytest.raises(ConversionError, match="msra_caffe2 but their input settings say input_format RGB"):
        load_backbone_weights(str(tmp_path / "w.pkl"))
    with pytest.raises(ConversionError, match="not torchvision.s: use supervised_msra="):
        load_backbone_weights(f"supervised_tv={d / 'R-50.pkl'}")
    tv = tmp_path / "tv.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tv)
    with pytest.raises(ConversionError, match="is not an MSRA caffe2 ResNet"):
        load_backbone_weights(f"supervised_msra={tv}")
    msra_url = "https://dl.fbaipublicfiles.com/detectron2/ImageNetPretrained/MSRA/R-50.pkl"
    with pytest.raises(CheckpointError, match=f"download {msra_url}"):
        load_backbone_weights("supervised_msra")


def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    calls = []

    def no_network(url, dst, hash_prefix=None, progress=True):
        calls.append(url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return calls


def test_supervised_offline_without_cache_fails_with_one_line(monkeypatch, tmp_path, capsys):
    from transfer.run_all import main

    root = logging.getLogger()  # the CLI replaces the root handlers: give the next tests back theirs
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "level", root.level)
    calls = _offline(monkeypatch, tmp_path)
    want = tmp_path / "torch_home" / "hub" / "checkpoints" / "resnet50-0676ba61.pth"
    with pytest.raises(CheckpointError) as e:
        load_backbone_weights("supervised")
    msg = str(e.value)
    assert calls == ["https://download.pytorch.org/models/resnet50-0676ba61.pth"]
    assert f"Download {calls[0]} and put it at {want}" in msg and "supervised_tv=/path/to/resnet50-0676ba61.pth" in msg
    assert "\n" not in msg and "name resolution" in msg
    assert main(["--weights", "supervised_tv", "--tasks", "imagenet_knn", "--output", str(tmp_path / "out"),
                 "--no-report"]) == 2
    err = capsys.readouterr().err
    assert "cannot load --weights supervised_tv" in err and str(want) in err and "Traceback" not in err


def test_supervised_from_the_cache_and_from_a_file(monkeypatch, tmp_path, caplog):
    calls = _offline(monkeypatch, tmp_path)
    torch.manual_seed(0)
    state = torchvision.models.resnet18(weights=None).state_dict()
    cached = supervised.hub_path(supervised.torchvision_entry("resnet18").url)
    cached.parent.mkdir(parents=True)
    torch.save(state, cached)
    w = load_backbone_weights("supervised", arch="resnet18")
    assert calls == [] and w.source == str(cached) and (w.kind, w.layout, w.stride_in_1x1) == \
        ("supervised_tv", "torchvision", False)
    assert all(torch.equal(v, state[k]) for k, v in w.state_dict.items()) and set(state) - set(w.state_dict) == \
        {"fc.weight", "fc.bias"} | {k for k in state if k.endswith("num_batches_tracked")}
    # not the published file (its SHA-256 does not start with the prefix in torchvision's file name): said so
    assert w.name.startswith("supervised_tv-") and "is not the file torchvision publishes" in caplog.text
    # the published file (simulated: a URL carrying this file's hash prefix) is labelled "supervised"
    url = f"https://download.pytorch.org/models/resnet18-{w.sha256[:8]}.pth"
    monkeypatch.setattr(supervised, "torchvision_entry", lambda arch: type("E", (), {"url": url})())
    (cached.parent / f"resnet18-{w.sha256[:8]}.pth").write_bytes(cached.read_bytes())
    w = load_backbone_weights("supervised", arch="resnet18")
    assert (w.name, w.info()["kind"]) == ("supervised-resnet18", "supervised_tv") and "IMAGENET1K_V1" in w.description
    w = load_backbone_weights(f"supervised_tv={cached}")
    assert w.kind == "supervised_tv" and w.source == str(cached)
