"""Importing this package registers every built-in task (see ``transfer.registry``)."""
from transfer.tasks import cityscapes_inst, coco, densepose, imagenet, lvis, semseg, voc_det  # noqa: F401
