"""Write the built-in synthetic datasets (real on-disk formats) used by tests and ``--preset smoke``.

    python tools/make_synthetic_data.py --root data/synthetic [--kinds imagenet,shards,voc,coco,voc_seg,cityscapes]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from pretrain.data.synthetic import make_imagenet_folders, make_tar_shards


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=Path("data/synthetic"))
    p.add_argument("--kinds", default="imagenet,shards")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--train-per-class", type=int, default=20)
    p.add_argument("--val-per-class", type=int, default=20)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    kinds = set(a.kinds.split(","))
    if "imagenet" in kinds:
        make_imagenet_folders(a.root / "imagenet", a.num_classes, a.train_per_class, a.val_per_class,
                              a.image_size, a.seed)
        print(f"wrote {a.root / 'imagenet'}")
    if "shards" in kinds:
        paths = make_tar_shards(a.root / "shards", num_classes=a.num_classes, image_size=a.image_size, seed=a.seed)
        print(f"wrote {len(paths)} shards under {a.root / 'shards'}")
    if "voc" in kinds:
        from transfer.data.synthetic.voc import make_vocdevkit  # written by the transfer stage

        make_vocdevkit(a.root / "VOCdevkit", seed=a.seed)
        print(f"wrote {a.root / 'VOCdevkit'}")
    if "voc_seg" in kinds:  # VOC2012 segmentation files beside the detection ones (own image ids)
        from transfer.data.synthetic.voc_seg import make_voc_seg

        make_voc_seg(a.root / "VOCdevkit", seed=a.seed)
        print(f"wrote {a.root / 'VOCdevkit' / 'VOC2012'} (segmentation)")
    if "cityscapes" in kinds:
        from transfer.data.synthetic.cityscapes import make_cityscapes

        make_cityscapes(a.root / "cityscapes", seed=a.seed)
        print(f"wrote {a.root / 'cityscapes'}")
    if "coco" in kinds:
        from transfer.data.synthetic.coco import make_coco

        print(f"wrote {make_coco(a.root, seed=a.seed)}")
    if "lvis" in kinds:  # LVIS v0.5 json files over the synthetic COCO's images (written first if absent)
        from transfer.data.synthetic.lvis import make_lvis

        print(f"wrote {make_lvis(a.root, seed=a.seed)}")


if __name__ == "__main__":
    main()
