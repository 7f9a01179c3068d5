"""Importing this package registers every built-in task (see ``transfer.registry``)."""
from transfer.tasks import cityscapes_instseg, coco, densepose, imagenet, lvis, semseg, voc_det  # noqa: F401
