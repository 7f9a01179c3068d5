"""A tiny synthetic LVIS v0.5 in the real format, on the images of the synthetic COCO (as LVIS is on COCO's).

``root/lvis/lvis_v0.5_{train,val}.json`` over ``root/coco/{train,val}2017/`` (written by
:func:`transfer.data.synthetic.coco.make_coco` when missing): the COCO instances of each image as LVIS
annotations (polygons, no ``iscrowd``; COCO's crowd regions are left out, LVIS has none), categories with
``synonyms`` and a ``frequency`` so that each of the rare / common / frequent bins is present, and per
image the federated label sets: ``neg_category_ids`` (absent categories verified absent, some of the
absent ones) and ``not_exhaustive_category_ids`` (some of the present ones). ``file_name`` is the 2014
COCO name, as in the real v0.5 files, so that only a reader that follows ``coco_url`` finds the images.
``tools/make_synthetic_data.py --kinds lvis`` calls :func:`make_lvis`.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

FREQUENCY = {1: "f", 3: "c", 13: "r", 18: "c"}  # the synthetic COCO's categories: one bin each at least


def make_lvis(root: Path, *, seed: int = 0, neg_prob: float = 0.7, not_exhaustive_prob: float = 0.2,
              **coco_kwargs) -> Path:
    """Write ``root/lvis/lvis_v0.5_{train,val}.json`` (and the synthetic COCO if absent). Returns ``root/lvis``."""
    from transfer.data.synthetic.coco import make_coco

    root = Path(root)
    if not (root / "coco" / "annotations" / "instances_val2017.json").is_file():
        make_coco(root, seed=seed, **coco_kwargs)
    rng = random.Random(seed)
    out = root / "lvis"
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        coco = json.loads((root / "coco" / "annotations" / f"instances_{split}2017.json").read_text())
        cats = [{"id": c["id"], "name": c["name"].replace(" ", "_"), "synonyms": [c["name"].replace(" ", "_")],
                 "def": f"a synthetic {c['name']}", "synset": f"{c['name'].replace(' ', '_')}.n.01",
                 "frequency": FREQUENCY[c["id"]]} for c in coco["categories"]]
        anns = [{k: a[k] for k in ("id", "image_id", "category_id", "bbox", "area", "segmentation")}
                for a in coco["annotations"] if not a["iscrowd"]]
        present = {}
        for a in anns:
            present.setdefault(a["image_id"], set()).add(a["category_id"])
        images = []
        for im in coco["images"]:
            pos = present.get(im["id"], set())
            images.append({
                "id": im["id"], "height": im["height"], "width": im["width"],
                "file_name": f"COCO_{split}2014_{im['id']:012d}.jpg",
                "coco_url": f"http://images.cocodataset.org/{split}2017/{im['file_name']}",
                "flickr_url": "", "license": 1,
                "neg_category_ids": sorted(c["id"] for c in cats if c["id"] not in pos and rng.random() < neg_prob),
                "not_exhaustive_category_ids": sorted(c for c in pos if rng.random() < not_exhaustive_prob)})
        data = {"info": {**coco["info"], "description": f"synthetic LVIS v0.5 {split}"}, "licenses": coco["licenses"],
                "images": images, "annotations": anns, "categories": cats}
        (out / f"lvis_v0.5_{split}.json").write_text(json.dumps(data))
    return out
