"""Importing this package registers every built-in task (see ``transfer.registry``)."""
from transfer.tasks import coco, imagenet, semseg, voc_det  # noqa: F401
