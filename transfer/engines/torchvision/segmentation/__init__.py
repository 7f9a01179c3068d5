"""The built-in engine's semantic segmentation: the paper's FCN-16s (App. A.5) on VOC and Cityscapes."""
