"""Where the ResNet sits in the checkpoints of the self-supervised codebases people publish, found by structure.

A checkpoint is flattened into tensor paths: nesting levels joined by ``/`` (``state_dict/``, ``teacher/``,
``classy_state_dict/base_model/model/trunk/``), the state-dict key after the last one, with the wrapper
components ``module`` (DataParallel / DDP) and ``_orig_mod`` (``torch.compile``) removed from it. Each
:class:`Layout` below names, relative to one of its roots, the prefix of every encoder it holds (the first is
the default, with the reason), and the prefixes of its known non-backbone entries (projection heads, prototypes,
queues, classifiers). Strict: a layout fits a file only when every tensor under its root is a backbone tensor of
one of its encoders or one of its known heads; tensors outside the root (optimizer, scaler, RNG state) are
counted and ignored. A file that fits no layout is refused with the entries that did not fit.

The prefixes are read from each project's own model and checkpoint code (cited per layout); fixtures built in
exactly these layouts are in ``tests/transfer/test_layouts.py``.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Set, Tuple

import numpy as np
import torch

from transfer.weights.names import ConversionError, to_tv_name

WRAPPERS = ("module", "_orig_mod")  # DataParallel/DDP and torch.compile components inside state-dict keys
STATE_ROOTS = ("", "state_dict/", "model/")  # a bare state dict, or one nested as most training scripts save it


@dataclass(frozen=True)
class Encoder:
    name: str
    prefix: str  # relative to the layout's root
    aliases: Tuple[str, ...] = ()  # e.g. "key"/"momentum" for an EMA encoder


@dataclass(frozen=True)
class Layout:
    name: str
    seen_in: str  # the projects whose files have this layout (and the code that writes it)
    encoders: Tuple[Encoder, ...]  # the default first, unless ``default_reason`` is empty (then none is)
    default_reason: str  # why the default is the one to transfer; "" = no default: the user must choose
    heads: Tuple[str, ...] = ()  # prefixes (relative to the root) of known entries that are not the backbone
    marks: Tuple[str, ...] = ()  # absolute path prefixes, one of which must be present (identifies the layout)
    roots: Tuple[str, ...] = STATE_ROOTS
    naming: str = "torchvision"  # or "detectron2" or "caffe2"

    def known_heads(self) -> Tuple[str, ...]:
        """``heads``, plus ``<encoder>fc.`` for torchvision-named encoders (their classifier or projection head:
        MoCo keeps its MLP there)."""
        fcs = tuple(e.prefix + "fc." for e in self.encoders) if self.naming == "torchvision" else ()
        return self.heads + fcs

    def encoder(self, choice: Optional[str]) -> Tuple[Encoder, str]:
        """The encoder asked for (a name or an alias; None = the default) and why it was taken."""
        if choice is None:
            if not self.default_reason:
                raise ConversionError(
                    f"layout {self.name} ({self.seen_in}) holds {len(self.encoders)} encoders and none is the one "
                    f"to transfer by default: choose with encoder=NAME, one of {[e.name for e in self.encoders]}")
            return self.encoders[0], f"the layout's default: {self.default_reason}"
        for enc in self.encoders:
            if choice == enc.name or choice in enc.aliases:
                return enc, f"asked for (encoder={choice})"
        if len(self.encoders) == 1:
            raise ConversionError(f"layout {self.name} ({self.seen_in}) holds a single network: there is no "
                                  f"{choice!r} encoder")
        names = [e.name + (f" ({', '.join(e.aliases)})" if e.aliases else "") for e in self.encoders]
        raise ConversionError(f"layout {self.name} has no encoder {choice!r}; it holds: {', '.join(names)}")


def _one(prefix: str = "") -> Tuple[Encoder, ...]:
    return (Encoder("backbone", prefix, ("query", "online")),)


_LIGHTNING = "pytorch-lightning_version"  # a top-level entry of every Lightning checkpoint

LAYOUTS: Tuple[Layout, ...] = (
    # facebookresearch/moco main_moco.py: {epoch, arch, state_dict: DDP(MoCo).state_dict(), optimizer}; PCL
    # (salesforce/PCL) and pretrain/checkpoint.py write the same
    Layout("moco_v1v2", "MoCo v1/v2 (facebookresearch/moco), PCL, this suite's pretraining",
           (Encoder("query", "encoder_q.", ("base", "online")), Encoder("key", "encoder_k.", ("momentum",))),
           "the query encoder, what MoCo transfers (its key encoder is the momentum copy)",
           heads=("queue", "queue_ptr")),
    # facebookresearch/moco-v3 main_moco.py: MoCo_ResNet with base_encoder/momentum_encoder (fc = projector)
    Layout("moco_v3", "MoCo v3 ResNet (facebookresearch/moco-v3)",
           (Encoder("base", "base_encoder.", ("query", "online")), Encoder("momentum", "momentum_encoder.", ("key",))),
           "the base encoder, what MoCo v3's linear probe and transfer use",
           heads=("predictor.",)),
    # facebookresearch/swav src/resnet50.py: ResNet with projection_head and prototypes (MultiPrototypes:
    # prototypes.prototypes{i}); main_swav.py saves {epoch, state_dict, optimizer, amp}; release files are bare
    Layout("swav", "SwAV, DeepCluster-v2, SeLa-v2 (facebookresearch/swav)", _one(), "a single network",
           heads=("projection_head.", "prototypes."),
           marks=tuple(r + h for r in ("", "state_dict/") for h in ("projection_head.", "prototypes."))),
    # facebookresearch/dino main_dino.py: {student, teacher, optimizer, epoch, args, dino_loss[, fp16_scaler]},
    # each network a MultiCropWrapper(backbone, head) (DDP-wrapped for ResNets)
    Layout("dino", "DINO full checkpoint (facebookresearch/dino main_dino.py)",
           (Encoder("teacher", "teacher/backbone.", ("momentum", "key")),
            Encoder("student", "student/backbone.", ("query", "online"))),
           "the teacher, what DINO evaluates and releases",
           heads=("teacher/head.", "student/head.", "dino_loss/", "optimizer/", "fp16_scaler/"),
           marks=("teacher/backbone.", "student/backbone."), roots=("",)),
    # facebookresearch/barlowtwins and facebookresearch/vicreg main_*.py: {epoch, model: DDP(model), optimizer};
    # the model holds backbone (fc = Identity), projector and (Barlow Twins) bn, a BatchNorm1d without affine
    Layout("barlow_vicreg", "Barlow Twins, VICReg full checkpoint.pth (facebookresearch/barlowtwins, vicreg)",
           _one("backbone."), "a single network", heads=("projector.", "bn."),
           marks=("model/projector.",), roots=("model/",)),
    # facebookresearch/vissl: classy_state_dict -> base_model -> model -> {trunk, heads}; ResNeXt trunks
    # name their torchvision layers _feature_blocks.<name>
    Layout("vissl", "VISSL (facebookresearch/vissl)", _one("trunk/_feature_blocks."), "a single network",
           heads=("heads/",), marks=("classy_state_dict/base_model/model/trunk/",),
           roots=("classy_state_dict/base_model/model/",)),
    # open-mmlab/mmselfsup 1.x, mmpretrain (mmengine): {meta, state_dict, optimizer, message_hub, ...}; momentum
    # methods keep an EMA of Sequential(backbone, neck) (momentum_encoder for MoCo, target_net for BYOL)
    Layout("mmselfsup", "MMSelfSup 1.x / MMPretrain (open-mmlab, mmengine checkpoints)",
           (Encoder("online", "backbone.", ("query", "base")), Encoder("momentum", "momentum_encoder.0.", ("key",)),
            Encoder("target", "target_net.0.")),
           "the online backbone, what MMSelfSup's benchmarks extract",
           heads=("neck.", "head.", "queue", "queue_ptr", "momentum_encoder.1.", "momentum_encoder.n_averaged",
                  "momentum_encoder.steps", "target_net.1.", "target_net.n_averaged", "target_net.steps",
                  "data_preprocessor."),
           marks=("meta", "state_dict/neck.", "state_dict/head."), roots=("state_dict/",)),
    # vturrisi/solo-learn solo/methods/base.py: Lightning checkpoints; backbone (older versions: encoder),
    # momentum_backbone, projector, classifier (online linear), predictor, queue ...
    Layout("solo_learn", "solo-learn (vturrisi/solo-learn, Lightning .ckpt)",
           (Encoder("online", "backbone.", ("query", "base")), Encoder("momentum", "momentum_backbone.", ("key",))),
           "the online backbone, what solo-learn's linear and kNN evaluations load",
           heads=("projector.", "momentum_projector.", "predictor.", "classifier.", "momentum_classifier.",
                  "prototypes.", "head.", "momentum_head.", "queue", "queue_ptr"),
           marks=("state_dict/classifier.", "state_dict/momentum_backbone.", "state_dict/projector."),
           roots=("state_dict/",)),
    Layout("solo_learn_old", "solo-learn before 1.0 (encoder.* names)",
           (Encoder("online", "encoder.", ("query", "base")), Encoder("momentum", "momentum_encoder.", ("key",))),
           "the online encoder, what solo-learn's evaluations load",
           heads=("projector.", "momentum_projector.", "predictor.", "classifier.", "prototypes.", "queue",
                  "queue_ptr"), marks=(_LIGHTNING,), roots=("state_dict/",)),
    # lightly-ai/lightly benchmarks/imagenet/resnet50/*.py: every method's forward() (and so its evaluation)
    # runs ``backbone``; the other copy is query_/key_/student_/teacher_backbone depending on the method
    Layout("lightly", "lightly benchmarks (lightly-ai/lightly, Lightning .ckpt)",
           (Encoder("backbone", "backbone.", ("online",)), Encoder("query", "query_backbone."),
            Encoder("key", "key_backbone.", ("momentum",)), Encoder("student", "student_backbone."),
            Encoder("teacher", "teacher_backbone.")),
           "backbone, what every lightly benchmark method evaluates (its forward())",
           heads=("projection_head.", "prediction_head.", "query_projection_head.", "key_projection_head.",
                  "student_projection_head.", "teacher_projection_head.", "prototypes.", "online_classifier.",
                  "criterion."),
           marks=("state_dict/online_classifier.",), roots=("state_dict/",)),
    # HobbitLong/PyContrast: {opt (argparse.Namespace), model, model_ema, contrast, optimizer, epoch}; the model
    # wraps the ResNet as ``encoder`` (with ``head``); model_ema is its momentum copy
    Layout("pycontrast", "PyContrast: InsDis, PIRL, MoCo, InfoMin (HobbitLong/PyContrast)",
           (Encoder("online", "model/encoder.", ("query", "base")),
            Encoder("momentum", "model_ema/encoder.", ("key", "ema"))),
           "the online model, what PyContrast's linear evaluation loads",
           heads=("model/head.", "model_ema/head.", "contrast/", "optimizer/"),
           marks=("model/encoder.",), roots=("",)),
    # HobbitLong/CMC: two encoders, one per view (L and ab channels); CMC evaluates both, so neither is a default
    Layout("cmc", "CMC (HobbitLong/CMC)",
           (Encoder("encoder1", "encoder1."), Encoder("encoder2", "encoder2.")), "",
           marks=("model/encoder1.",), roots=("model/",)),
    # torchvision and timm ResNets; the release files of DINO, Barlow Twins and VICReg are bare torchvision dicts
    Layout("torchvision", "torchvision, timm ResNets, DINO / Barlow Twins / VICReg release files", _one(),
           "a single network"),
    Layout("backbone_prefixed", "a ResNet saved as the `backbone` of a model", _one("backbone."),
           "a single network"),
    # Detectron2 names (this converter's outputs, MoCo's convert-pretrain-to-detectron2.py with its stem.fc.*)
    Layout("detectron2", "Detectron2 .pkl (tools/convert_to_d2.py, MoCo's converter)", _one(), "a single network",
           heads=("stem.fc.",), roots=("", "model/"), naming="detectron2"),
    # MSRA caffe2 ResNets of Detectron's model zoo (Detectron2's ImageNetPretrained/MSRA/R-50.pkl), flat or in blobs
    Layout("msra_caffe2", "MSRA caffe2 ResNets (Detectron's model zoo)", _one(), "a single network",
           heads=("fc1000_",), roots=("", "blobs/"), naming="caffe2"),
)
CAFFE2_LAYOUTS = frozenset(lay.name for lay in LAYOUTS if lay.naming == "caffe2")
_DEEP_STEM = re.compile(r"(^|\.)conv1\.\d+\.weight$")  # ResNet-D stems (timm resnet50d): conv1.0, conv1.3, conv1.6


def _is_array(v: Any) -> bool:
    return isinstance(v, (torch.Tensor, np.ndarray))


def _unwrap_key(key: str, removed: Counter) -> str:
    parts = key.split(".")
    kept = [p for p in parts if p not in WRAPPERS]
    for p in parts:
        if p in WRAPPERS:
            removed[p + "."] += 1
    return ".".join(kept)


def flatten(checkpoint: Any) -> Tuple[Dict[str, Any], Set[str], Dict[str, int]]:
    """``(tensor paths -> arrays, paths of the other leaves, wrapper components removed)``; see the module doc."""
    if not isinstance(checkpoint, Mapping):
        raise ConversionError(f"expected a dict of tensors, got {type(checkpoint).__name__}")
    tensors: Dict[str, Any] = {}
    others: Set[str] = set()
    removed: Counter = Counter()

    def walk(node: Mapping, path: str, depth: int) -> None:
        for k, v in node.items():
            if isinstance(v, Mapping) and depth < 8:
                walk(v, f"{path}{k}/", depth + 1)
            elif _is_array(v):
                full = path + _unwrap_key(str(k), removed)
                if full in tensors:
                    raise ConversionError(f"two entries are the same tensor once module./_orig_mod. are removed: "
                                          f"{path}{k} and another one of {full}")
                tensors[full] = v
            else:
                others.add(path + str(k))

    walk(checkpoint, "", 0)
    if not tensors:
        raise ConversionError(f"empty model: no tensors in the checkpoint (top-level keys: "
                              f"{sorted(map(str, checkpoint))})")
    return tensors, others, dict(sorted(removed.items()))


@dataclass
class Fit:
    """How one layout, under one root, accounts for a file's tensors."""
    layout: Layout
    root: str
    backbones: Dict[str, Dict[str, str]]  # encoder name -> {torchvision name: tensor path}
    dropped: Counter
    leftovers: List[str]
    marks: int  # marks present


def _group(rel: str, naming: str) -> str:
    """Label counting dropped entries: ``encoder_q.fc``, ``queue``, ``teacher/head``, ``fc1000``."""
    if rel.endswith("num_batches_tracked"):
        return "*.num_batches_tracked"
    if naming == "caffe2":
        return "*_momentum" if rel.endswith("_momentum") else rel.rsplit("_", 1)[0]
    head, _, tail = rel.rpartition("/")
    parts = tail.split(".")
    return head + ("/" if head else "") + ".".join(parts[:max(1, min(2, len(parts) - 1))])


def _fit(layout: Layout, root: str, tensors: Mapping[str, Any], others: Set[str]) -> Fit:
    heads = layout.known_heads()
    backbones: Dict[str, Dict[str, str]] = {e.name: {} for e in layout.encoders}
    dropped: Counter = Counter()
    leftovers: List[str] = []
    for path in tensors:
        if not path.startswith(root):
            dropped["(outside the model) " + path.split("/")[0]] += 1
            continue
        rel = path[len(root):]
        enc = next((e for e in layout.encoders if rel.startswith(e.prefix)
                    and to_tv_name(rel[len(e.prefix):], layout.naming) is not None), None)
        if enc is not None:
            backbones[enc.name][to_tv_name(rel[len(enc.prefix):], layout.naming)] = path
        elif rel.endswith("num_batches_tracked") or rel.startswith(heads) or (
                layout.naming == "caffe2" and rel.endswith("_momentum")):
            dropped[_group(rel, layout.naming)] += 1
        else:
            leftovers.append(path)
    present = set(tensors) | others
    marks = sum(any(p.startswith(m) for p in present) for m in layout.marks)
    return Fit(layout, root, backbones, dropped, leftovers, marks)


def _candidates(tensors: Mapping[str, Any], others: Set[str]) -> List[Fit]:
    fits = []
    for layout in LAYOUTS:
        for root in layout.roots:
            fit = _fit(layout, root, tensors, others)
            default = fit.backbones[layout.encoders[0].name]
            holds_one = default or (not layout.default_reason and any(fit.backbones.values()))
            if (layout.marks and not fit.marks) or not holds_one:
                continue
            fits.append(fit)
    return fits


def _prefix_summary(paths, limit: int = 20) -> str:
    counts = sorted(Counter(".".join(str(k).split(".")[:2]) for k in paths).items())
    more = f", ... ({len(counts) - limit} more)" if len(counts) > limit else ""
    return ", ".join(f"{p} ({n})" for p, n in counts[:limit]) + more


def _leftover_error(fit: Fit) -> ConversionError:
    left = fit.leftovers
    shown = ", ".join(left[:8]) + (f", ... ({len(left) - 8} more)" if len(left) > 8 else "")
    why = ""
    if any(_DEEP_STEM.search(p) for p in left):
        why = (" The stem is a deep one (conv1.0/conv1.3/conv1.6: ResNet-D, e.g. timm's resnet50d): not a "
               "torchvision ResNet, which the suite's models are; use a plain ResNet.")
    return ConversionError(
        f"checkpoint looks like layout {fit.layout.name} ({fit.layout.seen_in}), but {len(left)} tensors are "
        f"neither its backbone nor one of its known heads ({', '.join(fit.layout.known_heads()) or 'none'}): "
        f"{shown}.{why} "
        "Nothing was converted; a checkpoint is read only when every tensor is accounted for")


def match_layout(tensors: Mapping[str, Any], others: Set[str]) -> Fit:
    """The one layout (and root) that accounts for every tensor; ConversionError naming what did not fit."""
    fits = _candidates(tensors, others)
    full = [f for f in fits if not f.leftovers]
    if not full:
        if fits:
            raise _leftover_error(min(fits, key=lambda f: (len(f.leftovers), -f.marks)))
        known = ", ".join(f"{lay.name} [{', '.join(e.prefix or '(no prefix)' for e in lay.encoders)}]"
                          for lay in LAYOUTS)
        raise ConversionError(
            "unknown checkpoint layout: no ResNet backbone tensor (conv1/bn1/layer1-4, Detectron2 stem/res2-5, or "
            f"caffe2 conv1_w/res2_0_branch2a_w) where any known layout keeps it ({known}). "
            f"Entries found: {_prefix_summary(tensors)}")
    best = max(f.marks for f in full)
    top = [f for f in full if f.marks == best]
    if len(top) > 1:
        fits = [f"{f.layout.name} (root {f.root or 'the top level'})" for f in top]
        raise ConversionError(f"ambiguous checkpoint: it fits the layouts {fits} equally well")
    return top[0]


def extract_backbone(checkpoint: Any, encoder: Optional[str] = None) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Torchvision-named backbone tensors of one encoder of a checkpoint of any layout in :data:`LAYOUTS`.

    encoder: a name or alias of one of the layout's encoders (``query``/``key``, ``base``/``momentum``,
    ``teacher``/``student``, ``online``/``momentum``...), or None for the layout's default.
    Returns ``(backbone_sd, info)``: backbone_sd maps e.g. ``layer1.0.conv1.weight`` to a float tensor of
    the checkpoint's shape, without ``fc.*``, heads or ``num_batches_tracked``; info holds ``layout``,
    ``layout_seen_in``, ``encoder``, ``encoder_reason``, ``default_encoder`` (the layout's default, however named),
    ``encoders`` (all the layout holds), ``prefix``,
    ``root``, ``wrappers_removed``, ``num_tensors``, ``dropped`` (count per group) and ``filled_bn_stats``.
    """
    tensors, others, removed = flatten(checkpoint)
    fit = match_layout(tensors, others)
    enc, reason = fit.layout.encoder(encoder)
    chosen = fit.backbones[enc.name]
    if not chosen:
        raise ConversionError(f"layout {fit.layout.name}: encoder {enc.name} ({fit.root}{enc.prefix}) holds no "
                              f"backbone tensor in this file")
    dropped = Counter(fit.dropped)
    for other in fit.layout.encoders:
        if other.name != enc.name and fit.backbones[other.name]:
            dropped[f"{fit.root}{other.prefix} (encoder {other.name})"] += len(fit.backbones[other.name])
    out: Dict[str, torch.Tensor] = {}
    for tv, path in chosen.items():
        v = tensors[path]
        t = torch.from_numpy(np.array(v)) if isinstance(v, np.ndarray) else v.detach().cpu().clone()
        out[tv] = t.contiguous()
    filled = fill_folded_bn_stats(out) if fit.layout.naming == "caffe2" else 0
    info = {"layout": fit.layout.name, "layout_seen_in": fit.layout.seen_in, "encoder": enc.name,
            "encoder_reason": reason,
            "default_encoder": bool(fit.layout.default_reason) and enc is fit.layout.encoders[0],
            "encoders": [e.name for e in fit.layout.encoders if fit.backbones[e.name]],
            "prefix": fit.root + enc.prefix, "root": fit.root, "wrappers_removed": removed,
            "num_tensors": len(out), "dropped": dict(sorted(dropped.items())), "filled_bn_stats": filled}
    return out, info


def detect_layout(checkpoint: Any) -> str:
    """Name of the layout of a checkpoint or state dict (see :data:`LAYOUTS`); ConversionError if none fits."""
    tensors, others, _ = flatten(checkpoint)
    return match_layout(tensors, others).layout.name


def fill_folded_bn_stats(backbone_sd: Dict[str, torch.Tensor], eps: float = 1e-5) -> int:
    """Give every BN of a caffe2 backbone that has a scale but no running statistics (AffineChannel: the
    statistics were folded into scale and bias) ``running_mean`` 0 and ``running_var`` 1 - eps, so that
    BN in eval mode computes exactly ``x * weight + bias`` (eps: torchvision's BatchNorm2d; Detectron2's
    FrozenBatchNorm2d initialises running_var the same way). In place; returns the number of tensors added.
    BN layers are the 1-D ``.weight`` tensors (convolution weights are 4-D)."""
    added = 0
    for k in [k for k, v in backbone_sd.items() if k.endswith(".weight") and v.dim() == 1]:
        base, w = k[: -len(".weight")], backbone_sd[k]
        if base + ".running_mean" not in backbone_sd:
            backbone_sd[base + ".running_mean"] = torch.zeros_like(w)
            added += 1
        if base + ".running_var" not in backbone_sd:
            backbone_sd[base + ".running_var"] = torch.full_like(w, 1.0 - eps)
            added += 1
    return added
