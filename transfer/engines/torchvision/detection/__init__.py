"""Detection on torchvision's detection components: the C4 detector, the training loop, sync BN, PreciseBN."""
