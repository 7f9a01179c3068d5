"""load_backbone_weights: every kind of --weights spec resolves to torchvision-named tensors and input settings."""
from __future__ import annotations

import json

import pytest
import torch
import torchvision

from pretrain.utils.io import CheckpointError
from transfer.weights.files import convert_file, manifest_path
from transfer.weights.conversion import ConversionError
from transfer.weights.resolve import TORCHVISION_PIXEL_MEAN, load_backbone_weights


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A raw MoCo checkpoint (query != key), a torchvision state dict, and both converter outputs."""
    d = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    q, k = torchvision.models.resnet18(weights=None), torchvision.models.resnet18(weights=None)
    state = {**{"module.encoder_q." + n: v for n, v in q.state_dict().items()},
             **{"module.encoder_k." + n: v for n, v in k.state_dict().items()}, "module.queue": torch.randn(8, 16)}
    torch.save({"epoch": 1, "arch": "resnet18", "state_dict": state, "optimizer": {}}, d / "checkpoint_0001.pth.tar")
    torch.save(q.state_dict(), d / "supervised_r18.pth")
    convert_file(d / "checkpoint_0001.pth.tar", d / "moco_d2.pkl")
    convert_file(d / "checkpoint_0001.pth.tar", d / "moco_tv.pth")
    ref_q = {n: v for n, v in q.state_dict().items() if not n.startswith("fc.") and "num_batches" not in n}
    ref_k = {n: v for n, v in k.state_dict().items() if not n.startswith("fc.") and "num_batches" not in n}
    return d, ref_q, ref_k


def same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)


def test_random():
    w = load_backbone_weights("random")
    assert (w.name, w.arch, w.state_dict, w.layout) == ("random", "resnet50", None, "random")
    assert load_backbone_weights("random", arch="resnet18").name == "random-resnet18"
    with pytest.raises(ConversionError, match="unknown arch"):
        load_backbone_weights("random", arch="vit_b")


@pytest.mark.parametrize("fname", ["moco_d2.pkl", "moco_tv.pth"])
def test_converter_output_uses_its_manifest(fname, files):
    d, ref_q, _ = files
    w = load_backbone_weights(str(d / fname))
    assert same(w.state_dict, ref_q)  # Detectron2 names come back as torchvision names
    assert (w.name, w.arch, w.layout, w.source) == (fname.split(".")[0], "resnet18", "moco_v1v2", str(d / fname))
    assert (w.input_format, w.pixel_mean, w.stride_in_1x1) == ("RGB", TORCHVISION_PIXEL_MEAN, False)
    assert w.info()["sha256"] == json.loads(manifest_path(d / fname).read_text())["output_sha256"]


def test_settings_come_from_the_manifest(files, tmp_path, caplog):
    d, _, _ = files
    convert_file(d / "checkpoint_0001.pth.tar", tmp_path / "w.pth")
    m = json.loads(manifest_path(tmp_path / "w.pth").read_text())
    m["pixel_std"] = [1.0, 1.0, 1.0]  # another normalisation of a torchvision-style ResNet: used, but warned about
    manifest_path(tmp_path / "w.pth").write_text(json.dumps(m))
    w = load_backbone_weights(str(tmp_path / "w.pth"), name="custom")
    assert (w.stride_in_1x1, w.pixel_std, w.name) == (False, [1.0, 1.0, 1.0], "custom")
    assert "pixel_std [1.0, 1.0, 1.0] instead of" in caplog.text
    m["stride_in_1x1"] = True  # a MoCo ResNet strides in its 3x3 conv: a manifest saying otherwise is refused
    manifest_path(tmp_path / "w.pth").write_text(json.dumps(m))
    with pytest.raises(ConversionError, match="stride_in_1x1 True instead of False"):
        load_backbone_weights(str(tmp_path / "w.pth"))


def test_raw_checkpoint_converted_on_the_fly(files):
    d, ref_q, ref_k = files
    w = load_backbone_weights(str(d / "checkpoint_0001.pth.tar"))
    assert same(w.state_dict, ref_q) and w.layout == "moco_v1v2" and w.arch == "resnet18"
    assert w.name == f"checkpoint_0001-{w.sha256[:8]}"  # stable: the same file gives the same name
    assert load_backbone_weights(str(d / "checkpoint_0001.pth.tar")).name == w.name
    assert same(load_backbone_weights(str(d / "checkpoint_0001.pth.tar"), encoder="key").state_dict, ref_k)
    with pytest.raises(ConversionError, match="does not match resnet50"):
        load_backbone_weights(str(d / "checkpoint_0001.pth.tar"), arch="resnet50")


def test_plain_torchvision_state_dict(files):
    d, ref_q, _ = files
    w = load_backbone_weights(str(d / "supervised_r18.pth"))
    assert same(w.state_dict, ref_q) and w.layout == "torchvision" and w.name.startswith("supervised_r18-")
    model = torchvision.models.resnet18(weights=None)
    msg = model.load_state_dict(w.state_dict, strict=False)
    assert set(msg.missing_keys) == {"fc.weight", "fc.bias"} and msg.unexpected_keys == []


def test_stale_manifest_and_missing_file_fail(files, tmp_path):
    d, _, _ = files
    (tmp_path / "w.pth").write_bytes((d / "supervised_r18.pth").read_bytes())
    manifest_path(tmp_path / "w.pth").write_text(manifest_path(d / "moco_tv.pth").read_text())
    with pytest.raises(CheckpointError, match="describes another file"):
        load_backbone_weights(str(tmp_path / "w.pth"))
    with pytest.raises(CheckpointError, match="weights not found"):
        load_backbone_weights(str(tmp_path / "nope.pth"))


def test_non_finite_weights_are_refused(files, tmp_path):
    d, ref_q, _ = files
    bad = {**ref_q, "layer4.1.bn2.bias": torch.full((512,), float("nan"))}
    torch.save(bad, tmp_path / "diverged.pth")
    with pytest.raises(ConversionError, match=r"^backbone has non-finite values \(nan/inf\) in 1 of 100 tensors, "
                                              r"e\.g\. layer4\.1\.bn2\.bias: the pretraining diverged"):
        load_backbone_weights(str(tmp_path / "diverged.pth"))
