"""Reading checkpoints safely and writing converted weights with their manifest.

Checkpoints come from others and are untrusted: torch files load with ``weights_only=True`` and pickles
(Detectron2's ``.pkl``) with an unpickler that builds only plain containers, numbers, strings and numpy
arrays, so a pickle whose ``__reduce__`` runs code is refused before anything runs.

The manifest beside every output (``<output>.manifest.json``) records where the weights came from and the
input settings they need, so the transfer stage reads RGB / mean / std / STRIDE_IN_1X1 instead of trusting
the user to remember them (MoCo's detection configs carry them as the "_moco" overlay).
"""
from __future__ import annotations

import datetime
import json
import os
import pickle
import typing
from collections import OrderedDict, defaultdict
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from pretrain.utils.io import CheckpointError, atomic_path, safe_torch_load, sha256_file
from transfer.weights import supervised
from transfer.weights.conversion import (CAFFE2_LAYOUTS, detectron2_overlay, extract_backbone, infer_arch,
                                         input_settings, to_detectron2, to_torchvision, verify_backbone)

AUTHOR = "moco-transfer-suite"
FORMATS = ("detectron2", "torchvision")
WEIGHT_SUFFIXES = (".pkl", ".pickle", ".pth", ".pt", ".tar", ".ckpt", ".bin")

# Globals a weights pickle may name: numpy's array / scalar / dtype rebuilders (both the numpy<2
# ``numpy.core`` and numpy>=2 ``numpy._core`` spellings) and OrderedDict. Nothing that can call out.
_ALLOWED_GLOBALS = {
    (mod, name)
    for core in ("numpy.core", "numpy._core")
    for mod, name in ((f"{core}.multiarray", "_reconstruct"), (f"{core}.multiarray", "scalar"),
                      (f"{core}.numeric", "_frombuffer"))
} | {("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict"),
     # protocol-2 pickles written by Python 3 carry array bytes as _codecs.encode(text, "latin1"): it only
     # turns a string into bytes (torch's weights_only unpickler allows it for the same reason)
     ("_codecs", "encode")}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global outside ``_ALLOWED_GLOBALS`` (no ``os.system``, no classes)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: weights pickles may hold only dicts, lists, tuples, "
                "strings, numbers and numpy arrays")
        return super().find_class(module, name)


def load_pickle(path: str | os.PathLike) -> Any:
    """Read a ``.pkl`` weights file with :class:`RestrictedUnpickler`; one clear CheckpointError per failure."""
    path = Path(path)
    _check_exists(path)
    try:
        with open(path, "rb") as f:
            # latin1: Detectron/caffe2-era pickles were written by Python 2 (Detectron2 reads them this way too)
            return RestrictedUnpickler(f, encoding="latin1").load()
    except pickle.UnpicklingError as e:
        if "refusing" in str(e):
            raise CheckpointError(f"{path}: {e}") from None
        raise CheckpointError(f"{path}: not a readable pickle (truncated or corrupt?): {e}") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise CheckpointError(f"{path}: not a readable pickle (truncated or corrupt?): "
                              f"{type(e).__name__}: {e}") from None


def _check_exists(path: Path) -> None:
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint is empty (0 bytes): {path}")


class PlainObject:
    """What an allowed config object in a checkpoint (an ``argparse.Namespace``, an OmegaConf ``DictConfig`` and its
    nodes) becomes: a plain object holding the attributes the unpickler sets; the class it stood for never runs."""

    def __repr__(self) -> str:
        return f"PlainObject({sorted(vars(self))})"


# OmegaConf containers and nodes (solo-learn and Hydra-based codebases keep their config in the hyper-parameters)
_OMEGACONF_CLASSES = tuple(f"omegaconf.{m}" for m in (
    "dictconfig.DictConfig", "listconfig.ListConfig", "base.Metadata", "base.ContainerMetadata", "nodes.AnyNode",
    "nodes.StringNode", "nodes.IntegerNode", "nodes.FloatNode", "nodes.BooleanNode", "nodes.BytesNode",
    "nodes.PathNode"))
# the type references OmegaConf's metadata holds (``object_type=dict``, ``element_type=int``, ``ref_type=Any``)
_TYPE_REFERENCES = {"typing.Any": typing.Any, "collections.defaultdict": defaultdict,
                    **{f"builtins.{t.__name__}": t for t in (dict, list, tuple, int, float, str, bool)}}
# Lightning's hyper-parameter dicts (a dict subclass with attribute access), under every module path it had
_LIGHTNING_ATTRIBUTE_DICTS = ("pytorch_lightning.utilities.parsing.AttributeDict",
                              "lightning.pytorch.utilities.parsing.AttributeDict",
                              "lightning.fabric.utilities.data.AttributeDict",
                              "lightning_fabric.utilities.data.AttributeDict")


def _full_checkpoint_globals() -> Dict[str, Any]:
    """The globals full training checkpoints name beside their tensors, each mapped to what rebuilds it as plain
    data: DINO's and PyContrast's ``args``/``opt`` (``argparse.Namespace``), Lightning's ``hyper_parameters``
    (its AttributeDict; OmegaConf configs in them, as solo-learn saves), numpy scalars and arrays (numpy's own
    rebuilders: data only), and the builtin types OmegaConf's metadata names. Everything else stays refused."""
    import numpy as np
    from numpy import dtypes

    core = np._core if hasattr(np, "_core") else np.core  # numpy >= 2 renamed numpy.core
    out: Dict[str, Any] = {"argparse.Namespace": PlainObject, "numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype,
                           **{name: OrderedDict for name in _LIGHTNING_ATTRIBUTE_DICTS},
                           **{name: PlainObject for name in _OMEGACONF_CLASSES}, **_TYPE_REFERENCES}
    for spelling in ("numpy.core", "numpy._core"):  # files written under numpy 1 and numpy 2
        out[f"{spelling}.multiarray.scalar"] = core.multiarray.scalar
        out[f"{spelling}.multiarray._reconstruct"] = core.multiarray._reconstruct
    out.update({f"numpy.dtypes.{n}": getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")})
    return out


def _load_full_checkpoint(path: Path, first_error: CheckpointError) -> Any:
    """A torch file that ``weights_only=True`` refused: read again allowing only :func:`_full_checkpoint_globals`
    (still the weights-only unpickler: no other global is ever imported or called)."""
    allowed = _full_checkpoint_globals()
    try:
        named = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # a legacy (non-zip) file cannot be listed: the restricted load below still refuses
        named = []
    refused = sorted(set(named) - set(allowed))
    if refused:
        raise CheckpointError(f"{path}: refusing to load: the file names {refused}, which are not plain data. Full "
                              "checkpoints are read with only tensors, containers, argparse.Namespace, Lightning "
                              "hyper-parameter dicts, OmegaConf configs and numpy values allowed; save the model's "
                              "state_dict instead")
    try:
        with torch.serialization.safe_globals([(obj, name) for name, obj in allowed.items()]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{first_error} (and with the full-checkpoint allowlist: {text})") from None


def load_checkpoint_file(path: str | os.PathLike) -> Any:
    """Any supported input file: a torch file (zip or legacy, ``weights_only=True``; full training checkpoints
    with the plain types of :func:`_full_checkpoint_globals`) or a ``.pkl`` pickle."""
    path = Path(path)
    _check_exists(path)
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"  # torch.save's default container since torch 1.6
    if not is_zip and path.suffix in (".pkl", ".pickle"):
        return load_pickle(path)
    try:
        return safe_torch_load(path)
    except CheckpointError as e:
        if "weights_only" not in str(e):
            raise
        return _load_full_checkpoint(path, e)


def split_encoder(spec: str, encoder: Optional[str] = None) -> Tuple[str, Optional[str]]:
    """``FILE:encoder=NAME`` -> ``(FILE, NAME)``; the encoder may also come as a flag (``--encoder``), not both."""
    base, sep, named = str(spec).rpartition(":encoder=")
    if not sep:
        return str(spec), encoder
    if not named:
        raise ValueError(f"{spec!r}: ':encoder=' needs a name (e.g. FILE:encoder=momentum)")
    if encoder is not None and encoder != named:
        raise ValueError(f"{spec!r} names encoder {named!r} but --encoder says {encoder!r}")
    return base, named


def weights_stem(path: str | os.PathLike) -> str:
    """File name without weight suffixes: ``checkpoint_0199.pth.tar`` -> ``checkpoint_0199``."""
    name = Path(path).name
    while Path(name).suffix in WEIGHT_SUFFIXES and Path(name).stem:
        name = Path(name).stem
    return name


def manifest_path(weights_path: str | os.PathLike) -> Path:
    """``out.pkl`` -> ``out.pkl.manifest.json`` (kept per file so a .pkl and a .pth may share a stem)."""
    p = Path(weights_path)
    return p.with_name(p.name + ".manifest.json")


def read_manifest(weights_path: str | os.PathLike) -> Optional[Dict[str, Any]]:
    """The manifest beside a converter output, or None when there is none."""
    mp = manifest_path(weights_path)
    if not mp.is_file():
        return None
    try:
        return json.loads(mp.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{mp}: unreadable manifest: {e}") from None


_NOTES = {
    False: ("torchvision-convention weights: RGB input, ImageNet mean/std on the 0-255 scale, stride in the 3x3 conv "
            "(STRIDE_IN_1X1 False): MoCo's '_moco' overlay. The MSRA caffe2 convention is the opposite."),
    True: ("MSRA caffe2 weights: BGR input, mean in BGR order, std 1 on the 0-255 scale, stride in the 1x1 conv "
           "(STRIDE_IN_1X1 True): Detectron2's defaults. Their BN was folded into scale and bias: running_mean 0 "
           "and running_var 1 - eps were filled in. Never use them with the '_moco' overlay."),
}


def convert_file(input_path: str | os.PathLike, output_path: str | os.PathLike, fmt: Optional[str] = None,
                 encoder: Optional[str] = None, arch: Optional[str] = None) -> Dict[str, Any]:
    """Convert one checkpoint file; write the weights and their manifest atomically; return the manifest.

    fmt: ``detectron2`` (a ``.pkl`` of ``{"model": {d2 name: ndarray}, "__author__", "matching_heuristics"}``,
    what Detectron2's checkpointer reads) or ``torchvision`` (a state dict without ``fc``); by default
    taken from the output suffix. ``input_path`` may also name a supervised counterpart: ``supervised`` /
    ``supervised_tv[=FILE]`` (torchvision's ImageNet weights, from the torch hub cache or downloaded) or
    ``supervised_msra=FILE``; the manifest then records ``kind``. Raises ConversionError / CheckpointError
    and writes nothing on failure.
    """
    input_path, encoder = split_encoder(str(input_path), encoder)
    kind, spec_path = supervised.parse_spec(input_path)
    if kind == "random":
        raise ValueError("'random' has no weights to convert")
    input_path = supervised.source_file(kind, spec_path, arch) if kind != "file" else Path(input_path)
    output_path = Path(output_path)
    is_pkl = output_path.suffix in (".pkl", ".pickle")
    fmt = fmt or ("detectron2" if is_pkl else "torchvision")
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if (fmt == "detectron2") != is_pkl:  # Detectron2's checkpointer reads a file as a pickle iff it ends in .pkl
        raise ValueError(f"output {output_path.name}: use a .pkl name for detectron2 format and .pth for torchvision")
    checkpoint = load_checkpoint_file(input_path)
    backbone, info = extract_backbone(checkpoint, encoder=encoder)
    if kind != "file":
        supervised.check_layout(kind, info["layout"], str(input_path))
    arch = arch or infer_arch(backbone)
    verify_backbone(backbone, arch)
    manifest = {
        "name": weights_stem(output_path), "format": fmt, "arch": arch, "num_tensors": len(backbone),
        "input": str(input_path), "input_sha256": sha256_file(input_path), "layout": info["layout"],
        "kind": "checkpoint" if kind == "file" else kind, "layout_seen_in": info["layout_seen_in"],
        "encoder": info["encoder"], "encoder_reason": info["encoder_reason"], "encoders": info["encoders"],
        "prefix": info["prefix"], "wrappers_removed": info["wrappers_removed"],
        "dropped": info["dropped"], "filled_bn_stats": info["filled_bn_stats"], **input_settings(info["layout"]),
        "detectron2_overlay": detectron2_overlay(arch, input_settings(info["layout"])),
        "note": _NOTES[info["layout"] in CAFFE2_LAYOUTS],
        "converter": AUTHOR, "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
    }
    # Both files go to temporary names and are renamed only once both are complete.
    with atomic_path(output_path) as tmp_weights, atomic_path(manifest_path(output_path)) as tmp_manifest:
        if fmt == "detectron2":
            obj = {"model": to_detectron2(backbone), "__author__": AUTHOR, "matching_heuristics": True}
            with open(tmp_weights, "wb") as f:
                pickle.dump(obj, f, protocol=4)
        else:
            torch.save(to_torchvision(backbone), tmp_weights)
        manifest["output_sha256"] = sha256_file(tmp_weights)
        tmp_manifest.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def format_report(manifest: Dict[str, Any], output_path: str | os.PathLike) -> str:
    """Human summary of one conversion: what was converted, what was dropped (count per key group)."""
    lines = [f"converted {manifest['num_tensors']} tensors of {manifest['arch']} "
             f"({manifest['layout']}, {manifest['encoder']} encoder) -> {output_path} [{manifest['format']}]",
             f"layout {manifest['layout']}: {manifest.get('layout_seen_in', '')}; encoder {manifest['encoder']}: "
             f"{manifest.get('encoder_reason', '')}"]
    dropped = manifest["dropped"]
    lines.append(f"dropped {sum(dropped.values())} entries:" if dropped else "dropped nothing")
    lines += [f"  {group}: {n}" for group, n in dropped.items()]
    lines.append(f"input settings: {manifest['input_format']}, pixel mean {manifest['pixel_mean']}, std "
                 f"{manifest['pixel_std']}, STRIDE_IN_1X1 {manifest['stride_in_1x1']}")
    lines.append(f"manifest: {manifest_path(output_path)}")
    return "\n".join(lines)
