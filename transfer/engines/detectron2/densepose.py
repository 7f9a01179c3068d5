"""COCO DensePose on Detectron2's DensePose project (``projects/DensePose``, imported as ``densepose``).

The datasets are registered from ``--data-root`` under the suite's names with DensePose's own loader and
metadata (its builtin registration reads ``./datasets`` at import and ignores ``$DETECTRON2_DATASETS``);
the config is ``configs/detectron2/densepose_rcnn_R_50_FPN_s1x_legacy.yaml`` on ``add_densepose_config``;
training is the engine's flow (:func:`.train.train_and_evaluate`) with DensePose's dataset dicts and mapper
batched by the engine's resumable loader (:func:`build_densepose_train_loader`) and DensePose's test loader;
the evaluator is DensePose's ``DensePoseCOCOEvaluator`` (the reference implementation: GPS-based AP in
``densepose_coco_evaluation.py``), its ``densepose_gps`` AP / AP50 / AP75 -> ``APdp`` / ``APdp50`` /
``APdp75`` (its GPSm and segm APs go to metrics.json as ``APdpgpsm*``, ``APdpsegm*``).

DensePose fetches four SMPL-derived files from dl.fbaipublicfiles.com at run time through Detectron2's
``PathManager`` (iopath): ``UV_symmetry_transforms.mat`` when its dataset mapper is built (training) and
``SMPL_subdiv.mat``, ``SMPL_SUBDIV_TRANSFORM.mat``, ``Pdist_matrix.pkl`` in the GPS evaluation. They are
fetched (or found in iopath's cache) before training starts, so an offline machine fails in seconds with
the list of files to place, not after 130k iterations. The GPS evaluation runs under
:func:`.densepose_compat.lenient_path_manager` (DensePose passes iopath 0.1.9 a keyword it refuses).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager

from transfer.context import TrialContext
from transfer.data.densepose import densepose_paths
from transfer.engines.detectron2.config import build_config
from transfer.engines.detectron2.datasets import KeyedTrainLoader
from transfer.engines.detectron2.densepose_compat import lenient_path_manager
from transfer.engines.detectron2.detection import _finish
from transfer.engines.detectron2.train import train_and_evaluate
from transfer.weights.resolve import BackboneWeights

log = logging.getLogger(__name__)

# DensePose's data files (densepose/data/datasets/coco.py DENSEPOSE_METADATA_URL_PREFIX, and the URLs in
# densepose/evaluation/densepose_coco_evaluation.py _loadGEval), and when each is read
SMPL_URL_PREFIX = "https://dl.fbaipublicfiles.com/densepose/data/"
SMPL_FILES = {"UV_symmetry_transforms.mat": "training (DensePose's dataset mapper: flip symmetries)",
              "SMPL_subdiv.mat": "GPS evaluation", "SMPL_SUBDIV_TRANSFORM.mat": "GPS evaluation",
              "Pdist_matrix.pkl": "GPS evaluation (geodesic distances between SMPL vertices)"}
_GPS = {"densepose_gps": "APdp", "densepose_gpsm": "APdpgpsm", "densepose_segm": "APdpsegm"}


class DensePoseFilesError(FileNotFoundError):
    """DensePose's SMPL files are neither in iopath's cache nor downloadable here."""


def smpl_cache_dir() -> Path:
    """Where Detectron2's ``PathManager`` keeps (and looks for) a download of ``SMPL_URL_PREFIX + name``:
    iopath's cache (``$FVCORE_CACHE``, else ``~/.torch/iopath_cache``) plus the URL's path."""
    from iopath.common.file_io import get_cache_dir

    return Path(get_cache_dir()) / "densepose" / "data"


def require_smpl_files() -> Dict[str, str]:
    """Each SMPL file's local path, downloading what is missing (what DensePose would do later).

    Raises :class:`DensePoseFilesError` listing every file that is neither cached nor downloadable, with the
    exact place to put it: the check runs before training, so an offline machine fails in seconds."""
    cache = smpl_cache_dir()
    found: Dict[str, str] = {}
    missing: List[Tuple[str, str]] = []
    for name, when in SMPL_FILES.items():
        if (cache / name).is_file():
            found[name] = str(cache / name)
            continue
        try:
            found[name] = PathManager.get_local_path(SMPL_URL_PREFIX + name)
        except Exception as e:  # noqa: BLE001  (offline: URLError, timeout, ...)
            missing.append((name, f"{when}; download failed: {type(e).__name__}"))
    if missing:
        lines = "; ".join(f"{SMPL_URL_PREFIX}{n} -> {cache / n} ({why})" for n, why in missing)
        raise DensePoseFilesError(
            f"DensePose needs {len(missing)} SMPL file(s) it downloads at run time, and this machine cannot "
            f"download them: fetch them elsewhere and place them in {cache} (iopath's cache; set $FVCORE_CACHE "
            f"to use another root, the files then go to $FVCORE_CACHE/densepose/data/): {lines}")
    return found


def register_densepose(data_root: Path, split: str) -> str:
    """``minival2014`` -> ``suite_densepose_coco_minival2014``, read by DensePose's own loader with DensePose's
    metadata (the SMPL file URLs), from ``data_root`` (:func:`transfer.data.densepose.densepose_paths`)."""
    from densepose.data.datasets.coco import CocoDatasetInfo, register_dataset

    json_file, image_root = densepose_paths(data_root, split)
    name = f"suite_densepose_coco_{split}"
    if name in DatasetCatalog.list():  # registered by an earlier trial, maybe from another data root
        DatasetCatalog.remove(name)
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)
    register_dataset(CocoDatasetInfo(name=name, images_root=str(image_root), annotations_fpath=str(json_file)))
    MetadataCatalog.get(name).set(evaluator_type="densepose")
    return name


def densepose_metrics(results: Dict[str, Dict[str, float]]) -> Dict[str, float]:
    """DensePose's ``{"densepose_gps": {"AP": .., "AP50": .., "APm": ..}, "densepose_gpsm": ..}`` ->
    ``{"APdp": .., "APdp50": .., "APdpm": .., "APdpgpsm": ..}``; a negative value (COCOeval's -1 for "nothing to
    evaluate", -100 after DensePose's percent scaling, e.g. no large persons) -> NaN."""
    out: Dict[str, float] = {}
    for key, prefix in _GPS.items():
        for name, value in results.get(key, {}).items():
            if name.startswith("AP") and "-" not in name:
                out[prefix + name[2:]] = float("nan") if value < 0 else float(value)
    return out


def build_densepose_train_loader(cfg, mapper=None) -> KeyedTrainLoader:
    """DensePose's ``build_detection_train_loader`` (``densepose/data/build.py``: its category maps in the
    metadata, its instance filter, its ``DatasetMapper``) batched by the engine's resumable loader."""
    from densepose.data import DatasetMapper
    from densepose.data import build as dp_build

    dp_build._add_category_whitelists_to_metadata(cfg)
    dp_build._add_category_maps_to_metadata(cfg)
    dp_build._maybe_add_class_to_mesh_name_map_to_metadata(cfg.DATASETS.TRAIN, cfg)
    dicts = dp_build.combine_detection_dataset_dicts(
        cfg.DATASETS.TRAIN, keep_instance_predicate=dp_build._get_train_keep_instance_predicate(cfg),
        proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None)
    return KeyedTrainLoader(cfg, mapper if mapper is not None else DatasetMapper(cfg, True), dataset=dicts)


def run_densepose(cfg: Any, weights: BackboneWeights, ctx: TrialContext) -> Dict[str, float]:
    from densepose.data import build_detection_test_loader
    from densepose.evaluation import DensePoseCOCOEvaluator
    from densepose.evaluation.evaluator import build_densepose_evaluator_storage

    # every rank needs the files (the mappers read the symmetry file); rank 0 fetches first
    if comm.is_main_process():
        require_smpl_files()
    comm.synchronize()
    require_smpl_files()
    train = [register_densepose(ctx.data_root, s) for s in cfg.data.train_splits]
    test = register_densepose(ctx.data_root, cfg.data.test_split)
    cfg_d2 = build_config(ctx.engine_config, cfg, weights, ctx, train, [test], cfg.data.num_workers)
    out_dir = str(Path(ctx.output_dir) / "d2_inference")
    if comm.is_main_process():
        os.makedirs(out_dir, exist_ok=True)

    class GPSEvaluator(DensePoseCOCOEvaluator):
        def evaluate(self, img_ids=None):
            with lenient_path_manager():  # DensePose's timeout_sec vs. iopath 0.1.9 (densepose_compat.py)
                return super().evaluate(img_ids)

    def evaluator(name: str) -> DensePoseCOCOEvaluator:
        # as DensePose's Trainer.build_evaluator (IUV, min IoU 0.5, its storage choice)
        return GPSEvaluator(name, cfg_d2.DENSEPOSE_EVALUATION.DISTRIBUTED_INFERENCE, out_dir,
                            evaluator_type=cfg_d2.DENSEPOSE_EVALUATION.TYPE,
                            min_iou_threshold=cfg_d2.DENSEPOSE_EVALUATION.MIN_IOU_THRESHOLD,
                            storage=build_densepose_evaluator_storage(cfg_d2, out_dir))

    run = train_and_evaluate(cfg_d2, weights, ctx, evaluator, log_period=cfg.log_period,
                             build_train_loader=build_densepose_train_loader,
                             build_test_loader=build_detection_test_loader)
    if not run:
        return {}
    return _finish(densepose_metrics(run["results"]), run, cfg_d2, ctx)
