"""Checkpoints of the major self-supervised codebases, each built in that project's exact nesting and key names
(``transfer/weights/layouts.py`` cites the code each one follows), converted by the CLI and by ``--weights``."""
from __future__ import annotations

import argparse
import json
import os
import sys
import types
from pathlib import Path

import pytest
import torch
import torchvision
from omegaconf import OmegaConf

from transfer.weights.conversion import ConversionError
from transfer.weights.files import load_checkpoint_file
from transfer.weights.resolve import load_backbone_weights
from scripts import load_script  # tests/scripts.py

REPO = Path(__file__).resolve().parents[2]


def resnet18_sd(seed: int, fc: bool = True) -> dict:
    torch.manual_seed(seed)
    sd = torchvision.models.resnet18(weights=None).state_dict()
    for k, v in sd.items():
        if k.endswith("running_var"):  # a valid BN: the probes refuse non-finite features
            v.uniform_(0.5, 1.5)
        elif v.is_floating_point():
            v.normal_(0, 0.1)
    return {k: v for k, v in sd.items() if fc or not k.startswith("fc.")}


def under(prefix: str, sd: dict) -> dict:
    return {prefix + k: v for k, v in sd.items()}


def backbone(sd: dict) -> dict:
    return {k: v for k, v in sd.items() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}


def mlp(prefix: str, dims=(512, 32, 16), bn: bool = True) -> dict:
    """A projection head as the projects write it: Linear, BatchNorm1d, ReLU, Linear."""
    out = {f"{prefix}0.weight": torch.randn(dims[1], dims[0]), f"{prefix}0.bias": torch.randn(dims[1])}
    if bn:
        out.update({f"{prefix}1.{p}": torch.randn(dims[1]) for p in ("weight", "bias", "running_mean", "running_var")})
        out[f"{prefix}1.num_batches_tracked"] = torch.tensor(3)
    out[f"{prefix}3.weight"] = torch.randn(dims[2], dims[1])
    return out


class AttributeDict(dict):
    """Lightning's hyper-parameter dict, pickled under its real name (FakeLightning)."""


class FakeLightning:
    """Lightning's AttributeDict under its real module path, for writing a .ckpt without Lightning installed."""
    NAMES = ("pytorch_lightning", "pytorch_lightning.utilities", "pytorch_lightning.utilities.parsing")

    def __enter__(self):
        mod = types.ModuleType(self.NAMES[-1])
        mod.AttributeDict = AttributeDict
        AttributeDict.__module__ = self.NAMES[-1]
        for n in self.NAMES:
            sys.modules[n] = mod
        return AttributeDict

    def __exit__(self, *exc):
        for n in self.NAMES:
            sys.modules.pop(n, None)


def lightning_ckpt(state_dict: dict, hparams: dict) -> dict:
    with FakeLightning() as AttributeDict:
        return {"epoch": 99, "global_step": 1000, "pytorch-lightning_version": "1.9.5", "state_dict": state_dict,
                "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.1}]}], "lr_schedulers": [],
                "callbacks": {}, "hparams_name": "kwargs", "hyper_parameters": AttributeDict(hparams)}


A, B = resnet18_sd(1), resnet18_sd(2)  # the two networks of a momentum method (online / EMA)
A_NOFC, B_NOFC = resnet18_sd(1, fc=False), resnet18_sd(2, fc=False)


def build(name: str):
    """(checkpoint object, {encoder: source state dict}, default encoder, expected layout)."""
    if name == "moco_pcl":  # salesforce/PCL main_pcl.py: the MoCo layout under DDP
        sd = {**under("module.encoder_q.", A_NOFC), **mlp("module.encoder_q.fc."),
              **under("module.encoder_k.", B_NOFC), **mlp("module.encoder_k.fc."),
              "module.queue": torch.randn(16, 32), "module.queue_ptr": torch.zeros(1, dtype=torch.long)}
        return {"epoch": 200, "arch": "resnet18", "state_dict": sd, "optimizer": {}}, {"query": A, "key": B}, "query", "moco_v1v2"
    if name == "moco_v3_compiled":  # moco-v3 saved from a torch.compile'd DDP model: module._orig_mod.
        sd = {**under("module._orig_mod.base_encoder.", A_NOFC), **mlp("module._orig_mod.base_encoder.fc."),
              **under("module._orig_mod.momentum_encoder.", B_NOFC), **mlp("module._orig_mod.momentum_encoder.fc."),
              **mlp("module._orig_mod.predictor.", (16, 32, 16))}
        return {"epoch": 100, "arch": "resnet18", "state_dict": sd, "optimizer": {}, "scaler": {}}, \
            {"base": A, "momentum": B}, "base", "moco_v3"
    if name == "swav_bare":  # facebookresearch/swav release: bare dict, DDP names, MultiPrototypes
        sd = {**under("module.", A_NOFC), **mlp("module.projection_head."),
              "module.prototypes.prototypes0.weight": torch.randn(30, 16),
              "module.prototypes.prototypes1.weight": torch.randn(20, 16)}
        return sd, {"backbone": A}, "backbone", "swav"
    if name == "swav_full":  # main_swav.py: {epoch, state_dict, optimizer, amp}
        sd = {**under("module.", A_NOFC), **mlp("module.projection_head."), "module.prototypes.weight": torch.randn(30, 16)}
        return {"epoch": 800, "state_dict": sd, "optimizer": {}, "amp": {}}, {"backbone": A}, "backbone", "swav"
    if name == "dino_full":  # main_dino.py save_dict, ResNet: DDP-wrapped MultiCropWrapper(backbone, head)
        def net(src):
            return {**under("module.backbone.", src), **mlp("module.head.mlp.", (512, 32, 16), bn=False),
                    "module.head.last_layer.weight_g": torch.ones(64, 1), "module.head.last_layer.weight_v": torch.randn(64, 16)}
        return {"student": net(B_NOFC), "teacher": net(A_NOFC), "optimizer": {"state": {}, "param_groups": []},
                "epoch": 100, "args": argparse.Namespace(arch="resnet50", lr=0.03, out_dim=60000),
                "dino_loss": {"center": torch.zeros(1, 64)}}, {"teacher": A, "student": B}, "teacher", "dino"
    if name == "dino_release":  # dino_resnet50_pretrain.pth: the backbone alone (fc = Identity)
        return dict(A_NOFC), {"backbone": A}, "backbone", "torchvision"
    if name == "barlow_full":  # barlowtwins main.py: {epoch, model: DDP(BarlowTwins), optimizer}
        sd = {**under("module.backbone.", A_NOFC), **mlp("module.projector."),
              "module.bn.running_mean": torch.zeros(16), "module.bn.running_var": torch.ones(16),
              "module.bn.num_batches_tracked": torch.tensor(0)}
        return {"epoch": 1000, "model": sd, "optimizer": {}}, {"backbone": A}, "backbone", "barlow_vicreg"
    if name == "vicreg_full":  # vicreg main_vicreg.py: {epoch, model, optimizer}; no bn
        sd = {**under("module.backbone.", A_NOFC), **mlp("module.projector.")}
        return {"epoch": 100, "model": sd, "optimizer": {}}, {"backbone": A}, "backbone", "barlow_vicreg"
    if name == "vissl":  # VISSL checkpoint: classy_state_dict -> base_model -> model -> trunk / heads
        model = {"trunk": under("_feature_blocks.", A_NOFC), "heads": {"0.clf.0.weight": torch.randn(16, 512)}}
        return {"phase_idx": 10, "iteration": 500, "loss": {},
                "classy_state_dict": {"train_phase_idx": 9, "base_model": {"model": model, "meta": {}},
                                      "optimizer": {"state": {"0": {"momentum_buffer": torch.zeros(3)}}}}}, \
            {"backbone": A}, "backbone", "vissl"
    if name == "mmselfsup_mocov2":  # mmselfsup 1.x MoCoV2: momentum_encoder = EMA(Sequential(backbone, neck))
        sd = {**under("backbone.", A_NOFC), **mlp("neck.mlp.", bn=False),
              **under("momentum_encoder.module.0.", B_NOFC), **mlp("momentum_encoder.module.1.mlp.", bn=False),
              "momentum_encoder.steps": torch.tensor(10), "queue": torch.randn(16, 32),
              "queue_ptr": torch.zeros(1, dtype=torch.long)}
        return {"meta": {"epoch": 200, "mmengine_version": "0.7.0"}, "state_dict": sd,
                "message_hub": {"log_scalars": {}}, "optimizer": {"state": {}, "param_groups": []}}, \
            {"online": A, "momentum": B}, "online", "mmselfsup"
    if name == "mmpretrain_byol":  # BYOL: target_net = EMA(Sequential(backbone, neck)); head = predictor
        sd = {**under("backbone.", A_NOFC), **mlp("neck.mlp."), **mlp("head.predictor.mlp."),
              **under("target_net.module.0.", B_NOFC), **mlp("target_net.module.1.mlp."),
              "target_net.steps": torch.tensor(10)}
        return {"meta": {"epoch": 300}, "state_dict": sd}, {"online": A, "target": B}, "online", "mmselfsup"
    if name == "solo_learn":  # solo-learn BYOL-style momentum method, Lightning checkpoint
        sd = {**under("backbone.", A_NOFC), **mlp("projector."), **mlp("predictor.", (16, 32, 16)),
              **under("momentum_backbone.", B_NOFC), **mlp("momentum_projector."),
              "classifier.weight": torch.randn(10, 512), "classifier.bias": torch.randn(10)}
        cfg = OmegaConf.create({"method": "byol", "backbone": {"name": "resnet18", "kwargs": {}}, "optimizer":
                                {"lr": 1.0, "kwargs": {"eta": 0.02}}, "max_epochs": 400, "devices": [0, 1]})
        return lightning_ckpt(sd, {"cfg": cfg}), \
            {"online": A, "momentum": B}, "online", "solo_learn"
    if name == "lightly_mocov2":  # lightly benchmarks mocov2.py: backbone (evaluated) + query_backbone
        sd = {**under("backbone.", A_NOFC), **mlp("projection_head.layers.", bn=False),
              **under("query_backbone.", B_NOFC), **mlp("query_projection_head.layers.", bn=False),
              "online_classifier.classification_head.weight": torch.randn(10, 512),
              "online_classifier.classification_head.bias": torch.randn(10)}
        return lightning_ckpt(sd, {"batch_size_per_device": 128, "num_classes": 10}), \
            {"backbone": A, "query": B}, "backbone", "lightly"
    if name == "lightly_dino":  # lightly dino.py: backbone is the teacher, student_backbone the student
        sd = {**under("backbone.", A_NOFC), **mlp("projection_head.layer.", bn=False),
              **under("student_backbone.", B_NOFC), **mlp("student_projection_head.layer.", bn=False),
              "online_classifier.classification_head.weight": torch.randn(10, 512)}
        return lightning_ckpt(sd, {"batch_size_per_device": 64, "num_classes": 10}), \
            {"backbone": A, "student": B}, "backbone", "lightly"
    if name == "pycontrast":  # PyContrast InfoMin: {opt, model, model_ema, contrast, optimizer, epoch}
        def net(src):
            return {**under("module.encoder.", src), **mlp("module.head.", bn=False)}
        return {"opt": argparse.Namespace(method="InfoMin", arch="resnet50"), "model": net(A), "model_ema": net(B),
                "contrast": {"memory": torch.randn(16, 32)}, "optimizer": {}, "epoch": 800}, \
            {"online": A, "momentum": B}, "online", "pycontrast"
    if name == "timm":  # timm resnet18: torchvision names, classifier as fc
        return dict(A), {"backbone": A}, "backbone", "torchvision"
    raise KeyError(name)


LAYOUT_FIXTURES = ["moco_pcl", "moco_v3_compiled", "swav_bare", "swav_full", "dino_full", "dino_release", "barlow_full",
                   "vicreg_full", "vissl", "mmselfsup_mocov2", "mmpretrain_byol", "solo_learn", "lightly_mocov2",
                   "lightly_dino", "pycontrast", "timm"]
SUFFIX = {"solo_learn": ".ckpt", "lightly_mocov2": ".ckpt", "lightly_dino": ".ckpt"}


def write(obj, path: Path) -> Path:
    with FakeLightning():  # a Lightning checkpoint names AttributeDict's module when it is saved
        torch.save(obj, path)
    return path


@pytest.mark.parametrize("name", LAYOUT_FIXTURES)
def test_every_layout_converts_by_the_cli_and_by_weights(name, tmp_path):
    obj, sources, default, layout = build(name)
    path = write(obj, tmp_path / f"{name}{SUFFIX.get(name, '.pth')}")
    # the CLI, default encoder: the manifest says which layout, which encoder and why
    out = tmp_path / "out.pth"
    assert load_script("tools/convert_to_d2.py").main([str(path), str(out)]) == 0
    manifest = json.loads((tmp_path / "out.pth.manifest.json").read_text())
    assert (manifest["layout"], manifest["encoder"], manifest["arch"]) == (layout, default, "resnet18")
    assert manifest["encoder_reason"].startswith("the layout's default")
    assert sorted(manifest["encoders"]) == sorted(sources)
    converted = torch.load(out, weights_only=True)
    ref = backbone(sources[default])
    assert set(converted) == set(ref) and all(torch.equal(converted[k], ref[k]) for k in ref)
    # --weights: the file's other encoders, by name (the default one went through the same code above)
    for encoder, src in sources.items():
        if encoder == default and len(sources) > 1:
            continue
        w = load_backbone_weights(f"{path}:encoder={encoder}")
        ref = backbone(src)
        assert w.layout == layout and set(w.state_dict) == set(ref), encoder
        assert all(torch.equal(w.state_dict[k], ref[k]) for k in ref), encoder


def test_a_leftover_tensor_is_refused_naming_it(tmp_path):
    obj, *_ = build("solo_learn")
    obj["state_dict"]["mystery_head.weight"] = torch.zeros(3)
    with pytest.raises(ConversionError, match=r"looks like layout solo_learn .* 1 tensors .*: state_dict/mystery_head\.weight"):
        load_backbone_weights(str(write(obj, tmp_path / "x.ckpt")))


def test_wrong_depth_width_stem_and_encoder_are_refused_with_the_reason(tmp_path):
    obj, *_ = build("dino_full")
    path = write(obj, tmp_path / "dino.pth")
    with pytest.raises(ConversionError, match="does not match resnet50"):
        load_backbone_weights(str(path), arch="resnet50")
    with pytest.raises(ConversionError, match=r"no encoder 'query_k'.*teacher \(momentum, key\), student"):
        load_backbone_weights(f"{path}:encoder=query_k")
    wide = {**A_NOFC, "conv1.weight": torch.zeros(128, 3, 7, 7), "bn1.weight": torch.zeros(128)}
    with pytest.raises(ConversionError, match="wide ResNet .*stem 128 channels"):
        load_backbone_weights(str(write(wide, tmp_path / "wide.pth")))
    with pytest.raises(ConversionError, match="stem is a 3x3 convolution, not ImageNet's 7x7: a CIFAR-style"):
        load_backbone_weights(str(write({**A_NOFC, "conv1.weight": torch.zeros(64, 3, 3, 3)}, tmp_path / "cifar.pth")))
    deep = {k: v for k, v in A.items() if not k.startswith(("conv1.", "bn1."))}
    deep.update({"conv1.0.weight": torch.zeros(32, 3, 3, 3), "conv1.1.weight": torch.zeros(32),
                 "conv1.3.weight": torch.zeros(32, 32, 3, 3), "conv1.6.weight": torch.zeros(64, 32, 3, 3)})
    with pytest.raises(ConversionError, match="deep one .*resnet50d"):
        load_backbone_weights(str(write(deep, tmp_path / "resnet18d.pth")))
    cmc = {"model": {**under("module.encoder1.", {**A_NOFC, "conv1.weight": torch.zeros(64, 1, 7, 7)}),
                     **under("module.encoder2.", {**B_NOFC, "conv1.weight": torch.zeros(64, 2, 7, 7)})}}
    path = write(cmc, tmp_path / "cmc.pth")
    with pytest.raises(ConversionError, match=r"none is the one to transfer by default.*\['encoder1', 'encoder2'\]"):
        load_backbone_weights(str(path))
    with pytest.raises(ConversionError, match="stem takes 1 input channels"):
        load_backbone_weights(f"{path}:encoder=encoder1")


def test_full_checkpoints_read_their_plain_types_and_refuse_any_other_global(tmp_path):
    obj, *_ = build("dino_full")
    loaded = load_checkpoint_file(write(obj, tmp_path / "dino.pth"))
    assert vars(loaded["args"]) == {"arch": "resnet50", "lr": 0.03, "out_dim": 60000}  # plain data, no argparse
    assert type(loaded["args"]).__module__ == "transfer.weights.files"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'PWNED'}",)

    obj["args"] = Payload()
    torch.save(obj, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match=r"refusing to load: the file names \['posix.system'\]"):
        load_backbone_weights(str(tmp_path / "evil.pth"))
    assert not (tmp_path / "PWNED").exists()

    class Evaluates:  # the builtins OmegaConf's metadata needs are allowed; no other builtin is
        def __reduce__(self):
            return eval, ("print('ran')",)

    obj["args"] = Evaluates()
    torch.save(obj, tmp_path / "evil2.pth")
    with pytest.raises(ValueError, match=r"refusing to load: the file names \['builtins.eval'\]"):
        load_backbone_weights(str(tmp_path / "evil2.pth"))
    # solo-learn keeps an OmegaConf config in its hyper-parameters: read as plain objects, never as OmegaConf
    ckpt = load_checkpoint_file(write(build("solo_learn")[0], tmp_path / "solo.ckpt"))
    assert type(ckpt["hyper_parameters"]["cfg"]).__name__ == "PlainObject"


@pytest.fixture(scope="module")
def suite_data(tmp_path_factory) -> Path:
    """The synthetic VOCdevkit and ImageNet folders the two smoke tasks read."""
    from pretrain.data.synthetic import make_imagenet_folders
    from transfer.data.synthetic.voc import make_vocdevkit

    data = tmp_path_factory.mktemp("suite_data")
    make_vocdevkit(data / "VOCdevkit", seed=0, trainval_2007=4, test_2007=3, trainval_2012=0, image_size=(96, 72))
    make_imagenet_folders(data / "imagenet", num_classes=2, train_per_class=4, val_per_class=2, image_size=32)
    return data


@pytest.mark.parametrize("name", LAYOUT_FIXTURES)
def test_run_all_transfers_every_layout(name, suite_data, tmp_path):
    """Every layout through ``run_all.py`` on the voc07_det and imagenet_knn smoke presets (shrunk by
    tests/tiny.py); a file with several encoders transfers a non-default one, named on ``--weights``."""
    from transfer.run_all import main
    import tiny  # tests/tiny.py

    obj, sources, default, layout = build(name)
    path = write(obj, tmp_path / f"{name}{SUFFIX.get(name, '.pth')}")
    encoder = next((e for e in sources if e != default), default)
    spec = f"{path}:encoder={encoder}" if encoder != default else str(path)
    out = tmp_path / "results"
    tasks = ("voc07_det", "imagenet_knn")
    assert main(["--weights", spec, "--tasks", ",".join(tasks), "--preset", "smoke", "--data-root", str(suite_data),
                 "--output", str(out), "--engine", "torchvision", "--no-report", *tiny.overrides(*tasks)]) == 0
    [folder] = [d for d in out.iterdir() if (d / "voc07_det").is_dir()]
    # another encoder than the default is other weights: never the default's results folder
    assert folder.name.endswith(f"-{encoder}") == (encoder != default)
    for task in tasks:
        rec = json.loads((folder / task / "torchvision" / "trial0" / "metrics.json").read_text())
        assert rec["status"] == "ok", rec.get("error")
        info = rec["weights_info"]
        assert (info["layout"], info["encoder"]) == (layout, encoder)
        want = f"asked for (encoder={encoder})" if encoder != default else "the layout's default"
        assert info["encoder_reason"].startswith(want), info["encoder_reason"]


def test_the_readme_lists_every_layout():
    from transfer.weights.layouts import LAYOUTS

    text = (REPO / "README.md").read_text()
    section = text[text.index("## Conversion"):text.index("## Transfer")]
    assert [lay.name for lay in LAYOUTS if f"| `{lay.name}` |" not in section and f"`{lay.name}`" not in section] == []
