"""PASCAL VOC detection tasks (issue 4)."""
