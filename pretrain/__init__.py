"""MoCo pretraining: model, data, loop, checkpoints, and the small helpers the transfer stage reuses."""
