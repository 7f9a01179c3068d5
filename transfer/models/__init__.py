"""Transfer models built from torchvision components (Faster R-CNN C4, ...)."""
