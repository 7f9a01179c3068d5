"""tools/convert_to_d2.py: outputs, manifest, and every failure mode exits non-zero leaving nothing behind."""
from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from scripts import load_script  # tests/scripts.py

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "convert_to_d2.py"


def load_tool():
    return load_script("tools/convert_to_d2.py")


@pytest.fixture(scope="module")
def tool():
    return load_tool()


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval()


@pytest.fixture(scope="module")
def moco_ckpt(tmp_path_factory, resnet18):
    """An official-layout MoCo v2 checkpoint of a ResNet-18 (key encoder = copy, as at MoCo's init)."""
    sd = {k: v for k, v in resnet18.state_dict().items() if not k.startswith("fc.")}
    head = {"fc.0.weight": torch.randn(32, 512), "fc.0.bias": torch.randn(32), "fc.2.weight": torch.randn(8, 32),
            "fc.2.bias": torch.randn(8)}
    state = {**{"module.encoder_q." + k: v for k, v in {**sd, **head}.items()},
             **{"module.encoder_k." + k: v for k, v in {**sd, **head}.items()},
             "module.queue": torch.randn(8, 16), "module.queue_ptr": torch.zeros(1, dtype=torch.long)}
    path = tmp_path_factory.mktemp("in") / "moco_r18.pth.tar"
    torch.save({"epoch": 1, "arch": "resnet18", "state_dict": state, "optimizer": {}}, path)
    return path


def test_detectron2_output(tool, moco_ckpt, resnet18, tmp_path, capsys):
    out = tmp_path / "moco_r18.pkl"
    assert tool.main([str(moco_ckpt), str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "converted 100 tensors of resnet18 (moco_v1v2, query encoder)" in stdout
    for group in ("state_dict/encoder_k. (encoder key): 100", "encoder_k.fc: 4", "encoder_q.fc: 4",
                  "*.num_batches_tracked: 40", "queue: 1", "encoder query: the layout's default: the query encoder"):
        assert group in stdout
    with open(out, "rb") as f:  # our own file: plain pickle is fine here
        obj = pickle.load(f)
    assert set(obj) == {"model", "__author__", "matching_heuristics"} and obj["matching_heuristics"] is True
    model = obj["model"]
    assert len(model) == 100 and all(k.startswith(("stem.conv1.", "res2.", "res3.", "res4.", "res5.")) for k in model)
    sd = resnet18.state_dict()
    assert (model["stem.conv1.norm.running_var"] == sd["bn1.running_var"].numpy()).all()
    assert (model["res3.0.shortcut.norm.weight"] == sd["layer2.0.downsample.1.weight"].numpy()).all()
    assert (model["res5.1.conv2.weight"] == sd["layer4.1.conv2.weight"].numpy()).all()
    m = json.loads((tmp_path / "moco_r18.pkl.manifest.json").read_text())
    assert m["input_sha256"] and m["layout"] == "moco_v1v2" and m["encoder"] == "query" and m["arch"] == "resnet18"
    assert m["num_tensors"] == 100 and m["format"] == "detectron2" and m["name"] == "moco_r18"
    assert (m["input_format"], m["pixel_mean"], m["pixel_std"], m["stride_in_1x1"]) == \
        ("RGB", [123.675, 116.28, 103.53], [58.395, 57.12, 57.375], False)
    assert m["detectron2_overlay"]["MODEL.RESNETS.RES2_OUT_CHANNELS"] == 64 and "MSRA" in m["note"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moco_r18.pkl", "moco_r18.pkl.manifest.json"]


def test_torchvision_output_loads_strict(tool, moco_ckpt, resnet18, tmp_path, capsys):
    out = tmp_path / "r18.pth"
    assert tool.main([str(moco_ckpt), str(out), "--format", "torchvision", "--encoder", "key"]) == 0
    assert "key encoder" in capsys.readouterr().out
    model = torchvision.models.resnet18(weights=None)
    msg = model.load_state_dict(torch.load(out, weights_only=True), strict=False)
    assert set(msg.missing_keys) == {"fc.weight", "fc.bias"} and msg.unexpected_keys == []
    assert torch.equal(model.layer3[1].bn2.running_mean, resnet18.layer3[1].bn2.running_mean)


class RunsCode:
    """A pickle payload that would run a shell command when loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def make_input(kind: str, d: Path, moco_ckpt: Path) -> tuple[Path, list[str], str]:
    """(input file, extra CLI args, expected error text) for one failure mode."""
    if kind == "empty_model":
        torch.save({"epoch": 0, "state_dict": {}}, d / "empty.pth")
        return d / "empty.pth", [], "empty model"
    if kind == "foreign_prefix":
        torch.save({"state_dict": {"vit.blocks.0.attn.qkv.weight": torch.zeros(3, 3), "vit.head.weight": torch.zeros(2)}},
                   d / "vit.pth")
        return d / "vit.pth", [], "unknown checkpoint layout.*vit.blocks"
    if kind == "resnet18_as_resnet50":
        return moco_ckpt, ["--arch", "resnet50"], "does not match resnet50"
    if kind == "truncated_pth":
        data = moco_ckpt.read_bytes()
        (d / "cut.pth").write_bytes(data[: len(data) // 2])
        return d / "cut.pth", [], "truncated or corrupt"
    if kind == "truncated_pkl":
        data = pickle.dumps({"model": {"stem.conv1.weight": torch.zeros(64, 3, 7, 7).numpy()}}, protocol=4)
        (d / "cut.pkl").write_bytes(data[: len(data) // 2])
        return d / "cut.pkl", [], "truncated or corrupt"
    if kind == "code_pickle":
        (d / "evil.pkl").write_bytes(pickle.dumps({"model": RunsCode(d / "PWNED")}))
        return d / "evil.pkl", [], "refusing to load posix.system"
    if kind == "code_torch":
        torch.save({"state_dict": RunsCode(d / "PWNED")}, d / "evil.pth")
        return d / "evil.pth", [], r"refusing to load: the file names \['posix.system'\]"
    if kind == "suffix_mismatch":
        return moco_ckpt, ["--format", "torchvision"], "use a .pkl name for detectron2"
    if kind == "non_finite":  # a diverged pretraining
        ckpt = torch.load(moco_ckpt, weights_only=True)
        ckpt["state_dict"]["module.encoder_q.conv1.weight"][0, 0, 0, 0] = float("nan")
        ckpt["state_dict"]["module.encoder_q.layer1.0.bn1.running_var"][3] = float("inf")
        torch.save(ckpt, d / "diverged.pth")
        return d / "diverged.pth", [], (r"error: backbone has non-finite values \(nan/inf\) in 2 of 100 tensors, e\.g\. "
                                        r"conv1\.weight, layer1\.0\.bn1\.running_var: the pretraining diverged; "
                                        r"use an earlier checkpoint\n$")
    raise KeyError(kind)


FAILURES = ["empty_model", "foreign_prefix", "resnet18_as_resnet50", "truncated_pth", "truncated_pkl", "code_pickle",
            "code_torch", "suffix_mismatch", "non_finite"]


@pytest.mark.parametrize("kind", FAILURES)
def test_failure_exits_nonzero_and_writes_nothing(kind, tool, moco_ckpt, tmp_path, capsys):
    src_dir, out_dir = tmp_path / "in", tmp_path / "out"
    src_dir.mkdir()
    path, args, message = make_input(kind, src_dir, moco_ckpt)
    assert tool.main([str(path), str(out_dir / "out.pkl"), *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("convert_to_d2: error:")
    assert re.search(message, err), err
    assert not (src_dir / "PWNED").exists()  # the payload never ran
    assert not out_dir.exists() or list(out_dir.iterdir()) == []  # no output, manifest or temporary file


def test_wrong_depth_exit_code_via_subprocess(moco_ckpt, tmp_path):
    """The one end-to-end run of ``python tools/convert_to_d2.py`` (a fresh interpreter costs seconds)."""
    out = tmp_path / "out.pkl"
    r = subprocess.run([sys.executable, str(TOOL), str(moco_ckpt), str(out), "--arch", "resnet50"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "does not match resnet50" in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_supervised_by_name_from_the_hub_cache_or_one_line_error(tool, resnet18, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))

    def no_network(url, dst, hash_prefix=None, progress=True):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    out = tmp_path / "sup.pkl"
    assert tool.main(["supervised", str(out), "--arch", "resnet18"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "https://download.pytorch.org/models/resnet18-f37072fd.pth" in err[0]
    err = err[0]
    assert str(tmp_path / "th" / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in err and not out.exists()
    cached = tmp_path / "th" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True, exist_ok=True)  # the failed download made the folder
    torch.save(resnet18.state_dict(), cached)
    assert tool.main(["supervised_tv", str(out)]) == 1  # --arch defaults to resnet50: not cached
    assert tool.main(["supervised", str(out), "--arch", "resnet18"]) == 0
    m = json.loads((tmp_path / "sup.pkl.manifest.json").read_text())
    assert (m["kind"], m["layout"], m["input"], m["stride_in_1x1"]) == \
        ("supervised_tv", "torchvision", str(cached), False)
    assert tool.main([f"supervised_msra={cached}", str(tmp_path / "x.pkl")]) == 1
    assert "is not an MSRA caffe2 ResNet" in capsys.readouterr().err and not (tmp_path / "x.pkl").exists()


def test_a_directory_as_input_is_named_as_such(tool, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    assert tool.main([str(tmp_path / "run"), str(tmp_path / "out.pkl")]) == 1
    assert capsys.readouterr().err == f"convert_to_d2: error: {tmp_path / 'run'} is a directory, not a checkpoint file\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
