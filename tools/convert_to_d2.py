"""Convert a pretraining checkpoint's ResNet backbone to Detectron2 (.pkl) or torchvision (.pth) format.

    python tools/convert_to_d2.py INPUT OUTPUT.pkl                       # Detectron2 names
    python tools/convert_to_d2.py INPUT OUTPUT.pth --format torchvision  # torchvision names, no fc
        [--encoder query|key] [--arch resnet50]
    python tools/convert_to_d2.py supervised supervised.pkl               # torchvision's IMAGENET1K_V1 R50
    python tools/convert_to_d2.py supervised_msra=R-50.pkl msra.pth       # MSRA caffe2 R50 -> torchvision names

Inputs: MoCo v1/v2 (this project's and the official ``module.encoder_q.*``), MoCo v3
(``module.base_encoder.*``), plain torchvision state dicts, ``module.``/``backbone.`` prefixes, nested under
``state_dict`` or ``model``, Detectron2 ``.pkl`` files (this converter's outputs), the MSRA caffe2 ResNets
(Detectron2's ``ImageNetPretrained/MSRA/R-50.pkl``), and the supervised counterparts by name (``supervised``
= ``supervised_tv[=FILE]``, ``supervised_msra=FILE``). Fails (exit 1, nothing written) unless every backbone
tensor of the ResNet depth arrived with its shape. Writes ``OUTPUT.manifest.json`` beside the output with the
input settings to use: torchvision's (RGB, ImageNet mean/std, STRIDE_IN_1X1 False) or, for MSRA weights,
Detectron2's defaults (BGR, mean [103.530, 116.280, 123.675], std 1, STRIDE_IN_1X1 True).
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from transfer.weights.files import FORMATS, convert_file, format_report
from transfer.weights.conversion import ARCHS


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="checkpoint to convert (.pth/.pth.tar/.pkl), 'supervised[_tv][=FILE]' or "
                                 "'supervised_msra=FILE'")
    p.add_argument("output", help="output file: .pkl for detectron2, .pth for torchvision")
    p.add_argument("--format", choices=FORMATS, default=None, help="default: from the output suffix")
    p.add_argument("--encoder", default=None, help="which encoder to convert (default: the layout's, e.g. MoCo's "
                                                   "query encoder, DINO's teacher); also INPUT:encoder=NAME")
    p.add_argument("--arch", choices=sorted(ARCHS), default=None, help="default: inferred from the blocks")
    a = p.parse_args(argv)
    try:
        manifest = convert_file(a.input, a.output, fmt=a.format, encoder=a.encoder, arch=a.arch)
    except ValueError as e:  # ConversionError and CheckpointError are ValueErrors with one clear message each
        print(f"convert_to_d2: error: {e}", file=sys.stderr)
        return 1
    print(format_report(manifest, a.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
