"""Build VOC2012 ``train_aug`` (10,582 images) from VOC2012 and SBD, as MoCo's App. A.5 trains on.

    python tools/make_voc_train_aug.py --data-root datasets --sbd benchmark_RELEASE/dataset

Needs ``<data-root>/VOCdevkit/VOC2012`` (VOCtrainval_11-May-2012.tar) and SBD's ``benchmark_RELEASE/dataset``
(``cls/*.mat``, ``train.txt``, ``val.txt``; benchmark.tgz of the Semantic Boundaries Dataset). Writes
``VOC2012/SegmentationClassAug/*.png`` (single-channel class indices) and
``VOC2012/ImageSets/Segmentation/train_aug.txt``; see :func:`transfer.data.voc_seg.build_train_aug`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from transfer.data.voc_seg import TRAIN_AUG_SIZE, build_train_aug


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", type=Path, default=Path("datasets"), help="holds VOCdevkit/VOC2012")
    p.add_argument("--sbd", type=Path, required=True, help="SBD's benchmark_RELEASE/dataset folder")
    p.add_argument("--expected", type=int, default=TRAIN_AUG_SIZE, help="entries train_aug must have")
    a = p.parse_args()
    path = build_train_aug(a.data_root, a.sbd, a.expected)
    print(f"wrote {path} ({a.expected} images) and {path.parents[2] / 'SegmentationClassAug'}")


if __name__ == "__main__":
    main()
