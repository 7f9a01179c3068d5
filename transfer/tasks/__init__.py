"""Importing this package registers every built-in task (see ``transfer.registry``)."""
from transfer.tasks import imagenet, voc_det  # noqa: F401
