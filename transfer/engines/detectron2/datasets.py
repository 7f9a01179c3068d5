"""The suite's datasets in Detectron2's catalogs, read from ``--data-root`` with the suite's own readers.

Names are the suite's (``suite_voc_2007_trainval``, ``suite_coco_instances_val`` ...), never Detectron2's
builtin ones (``voc_2007_trainval``, ``coco_2017_val``), which Detectron2 registers at import from
``$DETECTRON2_DATASETS``. Each trial registers them again from its own data root (a name registered
before is replaced). Metadata carries what Detectron2's mappers and evaluators read: class names, the
COCO id mapping and json file, keypoint names and flip map, the VOC folder, year and split, the
evaluator type.

Training batches come from :class:`KeyedTrainLoader` (Detectron2's samplers, mappers and aspect-ratio grouping,
with each sample keyed by its place in the process's index stream), so a resumed trial continues the data
stream where the killed one stopped.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from detectron2.data import DatasetCatalog, DatasetFromList, DatasetMapper, MetadataCatalog, get_detection_dataset_dicts
from detectron2.data.samplers import RepeatFactorTrainingSampler, TrainingSampler
from detectron2.structures import BoxMode
from detectron2.utils import comm

from pretrain.data.augment import sample_rng
from transfer.engines.torchvision.detection.samplers import GroupedBatchSampler

from transfer.data.formats import COCOFormat
from transfer.data.voc import VOC_CLASSES, load_voc_sets, parse_set_name, voc_dir

log = logging.getLogger(__name__)


def register_dataset(name: str, loader: Callable[[], List[dict]], **metadata) -> str:
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, loader)
    MetadataCatalog.get(name).set(**metadata)
    return name


def voc_dicts(data_root: Path, set_name: str, use_difficult: bool, train: bool = True) -> List[dict]:
    """Detectron2 dataset dicts of one VOC set: 0-based ``XYXY_ABS`` boxes, ``category_id`` 0..19
    (the same boxes as the built-in engine's reader, :func:`transfer.data.voc.load_voc_records`: clipped to the
    image, empty ones dropped and, for a training set, counted in metrics.json)."""
    out = []
    for r in load_voc_sets(data_root, [set_name], use_difficult=use_difficult, count_fixes=train):
        anns = [{"bbox": [float(v) for v in box], "bbox_mode": BoxMode.XYXY_ABS, "category_id": int(label) - 1}
                for box, label in zip(r["boxes"].tolist(), r["labels"].tolist())]
        out.append({"file_name": r["file_name"], "image_id": r["image_id"], "height": r["height"],
                    "width": r["width"], "annotations": anns})
    return out


def register_voc(data_root: Path, set_name: str, use_difficult: bool = True, train: bool = True) -> str:
    """``2007_test`` -> ``suite_voc_2007_test``, evaluated by ``PascalVOCDetectionEvaluator``
    (11-point AP for 2007, as the devkit), which reads the XML files under ``dirname`` itself (``train=False``:
    its boxes are not trained on, so the reader's fixes are not counted)."""
    year, split = parse_set_name(set_name)
    data_root = Path(data_root)
    return register_dataset(f"suite_voc_{set_name}", lambda: voc_dicts(data_root, set_name, use_difficult, train),
                     thing_classes=list(VOC_CLASSES), dirname=str(voc_dir(data_root, year)), year=int(year),
                     split=split, evaluator_type="pascal_voc")


def coco_dicts(data_root: Path, dataset: COCOFormat, split: str) -> List[dict]:
    """Detectron2 dataset dicts of a COCO-format json (the suite's reader follows Detectron2's ``load_coco_json``;
    boxes are absolute ``XYXY_ABS``, categories contiguous)."""
    from transfer.data.coco import load_coco_instances

    json_file, image_root = dataset.paths(data_root, split)
    records, _ = load_coco_instances(json_file, image_root, keypoints=dataset.keypoints)
    for r in records:
        for a in r["annotations"]:
            a["bbox_mode"] = BoxMode.XYXY_ABS
    return records


def register_coco(data_root: Path, dataset: COCOFormat, split: str, train: bool, min_keypoints: int = 1) -> str:
    """``suite_<dataset.name>_<split>[_train]``: a COCO-format split (COCO's instances or person keypoints, or
    any dataset declared as a :class:`COCOFormat`); training sets drop crowd-only images (and, with keypoints,
    images with too few visible keypoints) as Detectron2's loader does."""
    from transfer.data.coco import load_coco_instances

    data_root = Path(data_root)
    keypoints = dataset.keypoints
    json_file, image_root = dataset.paths(data_root, split)
    _, meta = load_coco_instances(json_file, image_root, keypoints=keypoints)  # fails early on a bad file
    extra = {}
    if keypoints:
        extra = {"keypoint_names": meta["keypoint_names"], "keypoint_flip_map": meta["keypoint_flip_map"]}
    name = f"suite_{dataset.name}_{split}" + ("_train" if train else "")

    def load() -> List[dict]:
        from transfer.data.coco import filter_for_training

        recs = coco_dicts(data_root, dataset, split)
        return filter_for_training(recs, keypoints=keypoints, min_keypoints=min_keypoints) if train else recs

    return register_dataset(name, load, thing_classes=meta["thing_classes"], json_file=str(json_file),
                     image_root=str(image_root), evaluator_type="coco",
                     thing_dataset_id_to_contiguous_id={v: k for k, v in meta["contiguous_to_coco_id"].items()},
                     **extra)


def register_lvis(data_root: Path, split: str, train: bool) -> str:
    """LVIS v0.5 (images found under ``coco/`` by ``coco_url``) with the metadata Detectron2's ``LVISEvaluator``
    reads: the json file and the LVIS category ids; training sets keep images with annotations only."""
    from transfer.data.lvis import filter_empty, load_lvis_instances, lvis_paths

    data_root = Path(data_root)
    json_file, coco_root = lvis_paths(data_root, split)
    _, meta = load_lvis_instances(json_file, coco_root)  # fails early on a bad file

    def load() -> List[dict]:
        records, _ = load_lvis_instances(json_file, coco_root)
        for r in records:
            for a in r["annotations"]:
                a["bbox_mode"] = BoxMode.XYXY_ABS
        return filter_empty(records, json_file) if train else records

    return register_dataset(f"suite_lvis_v0.5_{split}" + ("_train" if train else ""), load,
                            thing_classes=meta["thing_classes"], json_file=str(json_file), evaluator_type="lvis",
                            thing_dataset_id_to_contiguous_id={v: k for k, v in meta["contiguous_to_lvis_id"].items()})


def register_cityscapes_instances(data_root: Path, split: str, train: bool) -> str:
    """Cityscapes fine instances read by the suite (``instanceIds`` PNGs -> RLE masks, so the configs use
    ``INPUT.MASK_FORMAT bitmask``), never by Detectron2's Cityscapes loader (issue #5436)."""
    from transfer.data.cityscapes_instseg import filter_for_training, load_cityscapes_instances

    data_root = Path(data_root)
    records, meta = load_cityscapes_instances(data_root, split)  # fails early on a bad layout

    def load() -> List[dict]:
        recs, _ = load_cityscapes_instances(data_root, split)
        for r in recs:
            for a in r["annotations"]:
                a["bbox_mode"] = BoxMode.XYXY_ABS
        return filter_for_training(recs) if train else recs

    return register_dataset(f"suite_cityscapes_instances_{split}" + ("_train" if train else ""), load,
                            thing_classes=meta["thing_classes"], gt_dir=meta["gt_dir"],
                            evaluator_type="cityscapes_instance")


# ---------------------------------------------------------------- resumable training batches

@contextlib.contextmanager
def keyed_rng(*key: int) -> Iterator[None]:
    """torch, ``random`` and numpy seeded from ``key`` inside the block, restored after (``sample_rng`` and
    numpy: Detectron2's augmentations draw from ``np.random``)."""
    state = np.random.get_state()
    with sample_rng(*key):
        np.random.seed(hash(tuple(int(k) for k in key)) & 0xFFFF_FFFF)
        try:
            yield
        finally:
            np.random.set_state(state)


class KeyedSamples(Dataset):
    """``dataset[(index, place)]``: ``mapper(dicts[index])`` with its randomness seeded by (seed, rank, place,
    stream) alone. A mapper that drops a sample (returns None, as Detectron2's ``MapDataset`` allows) is given
    the next index, under the same key."""

    def __init__(self, dicts: Sequence[dict], mapper: Callable[[dict], Any], seed: int, stream: int):
        self.dicts, self.mapper = DatasetFromList(list(dicts), copy=True), mapper
        self.seed, self.rank, self.stream = int(seed), comm.get_rank(), int(stream)

    def __len__(self) -> int:
        return len(self.dicts)

    def __getitem__(self, key):
        index, place = key
        for i in range(len(self.dicts)):
            with keyed_rng(self.seed, self.rank, place, self.stream):
                out = self.mapper(self.dicts[(index + i) % len(self.dicts)])
            if out is not None:
                return out
        raise RuntimeError("the mapper dropped every sample of the training set")


def _orientation(d: dict) -> int:
    """Detectron2's aspect-ratio groups: 0 for a landscape image (w > h), else 1; sizes from the dict, else from
    the image file's header (the semantic-segmentation records carry none)."""
    if "width" in d and "height" in d:
        w, h = d["width"], d["height"]
    else:
        with Image.open(d["file_name"]) as im:
            w, h = im.size
    return 0 if w > h else 1


class KeyedTrainLoader:
    """Detectron2's ``build_detection_train_loader`` made resumable: the same dataset dicts, sampler
    (``DATALOADER.SAMPLER_TRAIN``: ``TrainingSampler`` or ``RepeatFactorTrainingSampler``, seeded by ``SEED``),
    mapper (default ``DatasetMapper(cfg, True)``), aspect-ratio grouping and per-process batch size; but batches
    are formed from the index stream alone (:class:`~transfer.engines.torchvision.detection.samplers.
    GroupedBatchSampler`) and each sample is mapped under its key (:class:`KeyedSamples`), so batch ``k`` is the
    same whatever the worker count, and a resumed trial sets ``start_iter`` to continue at its batch.

    ``stream``: another augmentation stream over the same indices (PreciseBN's loader: 1)."""

    def __init__(self, cfg, mapper: Optional[Callable] = None, *, dataset: Optional[Sequence[dict]] = None,
                 stream: int = 0):
        if dataset is None:
            dataset = get_detection_dataset_dicts(
                cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
                min_keypoints=cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE if cfg.MODEL.KEYPOINT_ON else 0,
                proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None)
        self.dicts = list(dataset)
        self.mapper = mapper if mapper is not None else DatasetMapper(cfg, True)
        self.seed, self.stream, self.start_iter = int(cfg.SEED), int(stream), 0
        name = cfg.DATALOADER.SAMPLER_TRAIN
        if name == "TrainingSampler":
            self.sampler = TrainingSampler(len(self.dicts), seed=self.seed)
        elif name == "RepeatFactorTrainingSampler":
            factors = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(
                self.dicts, cfg.DATALOADER.REPEAT_THRESHOLD, sqrt=cfg.DATALOADER.REPEAT_SQRT)
            self.sampler = RepeatFactorTrainingSampler(factors, seed=self.seed)
        else:
            raise ValueError(f"DATALOADER.SAMPLER_TRAIN {name!r}: the detectron2 engine's resumable loader knows "
                             f"TrainingSampler and RepeatFactorTrainingSampler")
        self.groups = [_orientation(d) for d in self.dicts] if cfg.DATALOADER.ASPECT_RATIO_GROUPING else \
            [0] * len(self.dicts)
        self.batch_size = cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size()
        self.num_workers = int(cfg.DATALOADER.NUM_WORKERS)

    def __iter__(self) -> Iterator[List[dict]]:
        if self.start_iter:
            log.info("training batches continue at batch %d (the earlier ones are formed from indices, not read)",
                     self.start_iter)
        batches = GroupedBatchSampler(self.sampler, self.groups, self.batch_size, start_batch=self.start_iter)
        return iter(DataLoader(KeyedSamples(self.dicts, self.mapper, self.seed, self.stream), batch_sampler=batches,
                               num_workers=self.num_workers, collate_fn=list, persistent_workers=self.num_workers > 0,
                               generator=torch.Generator().manual_seed(self.seed)))


def build_keyed_train_loader(cfg, mapper: Optional[Callable] = None) -> KeyedTrainLoader:
    """:class:`KeyedTrainLoader` with ``build_detection_train_loader``'s signature (``train.train_and_evaluate``)."""
    return KeyedTrainLoader(cfg, mapper)
