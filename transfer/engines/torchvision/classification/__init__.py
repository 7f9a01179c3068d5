"""Classification probes on a frozen backbone: the linear protocol, the feature cache and kNN."""
