"""The built-in engine on torchvision's models: detection (``detection/``), semantic segmentation
(``segmentation/``) and classification (``classification/``). Always available; the modules of a recipe are
imported when a trial first runs it."""
from transfer.registry import Engine, register_engine

_HERE = "transfer.engines.torchvision"

ENGINE = register_engine(Engine(
    name="torchvision",
    description="built-in: torchvision's detection and segmentation models, MoCo's protocol as closely as they allow",
    recipes={
        "voc_detection": f"{_HERE}.detection.voc:run_voc",
        "coco_rcnn": f"{_HERE}.detection.coco:run_coco",
        "lvis_rcnn": f"{_HERE}.detection.lvis:run_lvis",
        "cityscapes_instseg": f"{_HERE}.detection.cityscapes_instseg:run_cityscapes_instseg",
        "fcn_semseg": f"{_HERE}.segmentation.semseg:run_semseg",
        "imagenet_linear": f"{_HERE}.classification.imagenet:run_linear",
        "imagenet_linear_fast": f"{_HERE}.classification.imagenet:run_linear_fast",
        "imagenet_knn": f"{_HERE}.classification.imagenet:run_knn",
    },
    preference=0,
))
