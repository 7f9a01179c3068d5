"""The built-in engine on torchvision's models: detection (``detection/``) and classification
(``classification/``). Importing it registers its implementation of every built-in task."""
from transfer.engines.torchvision.classification import imagenet  # noqa: F401  (registration)
from transfer.engines.torchvision.detection import cityscapes_instseg, coco, lvis, voc  # noqa: F401  (registration)
from transfer.engines.torchvision.segmentation import semseg  # noqa: F401  (registration)
